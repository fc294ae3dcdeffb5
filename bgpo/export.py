"""Export a run's policy as a hub-format model folder (issue 12):

    python -m bgpo.export run_dir=results/<run> [which=final|best|last] [out=DIR] [lora=merge|adapter]
                          [dtype=bfloat16]
    python -m bgpo.evaluate checkpoint=DIR task=countdown     # evaluates the export

The folder holds what ``save_pretrained`` writes for the run's model class (config.json and
safetensors weights: the tiny Gemma3, or LLaDA / Dream in their hub format, loadable by
``bgpo.model.load_dllm`` and by transformers' Auto classes once ``bgpo.models`` is imported), the
tokenizer, ``bgpo_export.json`` (the model settings the run used: kind, mask id, chat template,
precision; ``bgpo.evaluate`` takes them for the keys left at their defaults) and a model card
``README.md`` with the run's config (``config.yaml``) and its test evaluation (``eval_test.json``:
base model, validation-selected and final policy, per test set).

- ``which``: ``final`` (``checkpoints/last.pt`` of a COMPLETE run: summary.json exists),
  ``best`` (``checkpoints/best.pt``, the checkpoint selected on validation, ``bgpo.evaluation``),
  ``last`` (the latest checkpoint, complete or not);
- ``lora``: ``merge`` (the adapters folded into the base weights: a plain model folder) or
  ``adapter`` (peft's ``adapter_config.json`` + ``adapter_model.safetensors`` naming the base
  folder; ``bgpo.evaluate`` loads base + adapter);
- ``dtype``: the saved weights' dtype; default: as trained (float32 master weights under
  bf16-mixed); ``bfloat16`` halves the folder;
- ``out``: default ``<run_dir>/export-<which>``; an existing folder is replaced (written to
  ``<out>.tmp`` first, then renamed).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from bgpo.config import ModelConfig
from bgpo.model import _DTYPES, DLLM, apply_lora, load_dllm

WHICH = {"final": "last.pt", "best": "best.pt", "last": "last.pt"}
LORA = ("merge", "adapter")
SETTINGS = "bgpo_export.json"
"""the model settings of the run, read back by ``bgpo.evaluate`` (``export_settings``)"""


@dataclass
class ExportConfig:
    run_dir: str = MISSING
    """the run folder (results_dir/<method>-<task>-...)"""
    which: str = "final"
    """final (last.pt of a complete run), best (validation-selected best.pt) or last"""
    out: str | None = None
    """output folder (default: <run_dir>/export-<which>)"""
    lora: str = "merge"
    """merge: fold LoRA adapters into the weights; adapter: save the peft adapter alone"""
    dtype: str | None = None
    """dtype of the saved weights (default: as trained)"""
    base: str | None = None
    """base model folder (default: the run's model.path, or the task's cached tiny base)"""


def register() -> None:
    ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def _run_files(run_dir: Path, which: str) -> tuple[dict[str, Any], Path]:
    """The run's resolved config and the checkpoint to export; one sentence naming what is missing."""
    if which not in WHICH:
        raise ValueError(f"which={which!r} is not one of {list(WHICH)}")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"run_dir={str(run_dir)!r} has no config.yaml: not a run folder")
    ckpt = run_dir / "checkpoints" / WHICH[which]
    if which == "final" and not (run_dir / "summary.json").is_file():
        raise FileNotFoundError(f"run_dir={str(run_dir)!r} is not complete (no summary.json): which=last "
                                "exports its latest checkpoint")
    if not ckpt.is_file():
        why = " (selected on validation: the task has none, or no evaluation ran)" if which == "best" else ""
        raise FileNotFoundError(f"which={which}: {ckpt} does not exist{why}")
    return yaml.safe_load((run_dir / "config.yaml").read_text()), ckpt


def load_run_policy(run_dir: str | Path, which: str = "final", base: str | None = None,
                    device: str = "cpu") -> tuple[DLLM, dict[str, Any], dict[str, Any]]:
    """The policy of a run's checkpoint (as the trainer built it: LoRA-wrapped when the run used
    LoRA), the run's config and the checkpoint's ``step``."""
    from bgpo.pretrain import base_model_path

    run_dir = Path(run_dir).expanduser()
    cfg, ckpt = _run_files(run_dir, which)
    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.get("model", {}))
    run_model = cfg.get("model", {})
    path = base or m.path or (str(base_model_path(cfg["task"]["name"], dict(run_model))) if m.kind == "tiny"
                              else None)
    if path is None or (m.kind == "tiny" and not Path(path).is_dir()):
        raise FileNotFoundError(f"the base model of {run_dir} was not found ({path}): "
                                "pass base=<model folder>")
    policy = load_dllm(m.kind, path, m.dtype, device, m.mask_token_id, m.use_chat_template, m.remote_code,
                       revision=m.get("revision"))
    if m.lora.enabled:
        apply_lora(policy, m.lora.r, m.lora.alpha, m.lora.dropout)
    state = torch.load(ckpt, map_location=device, weights_only=False)
    policy.net.load_state_dict(state["model"])
    return policy, cfg, {"step": state["step"], "checkpoint": str(ckpt), "base": str(path)}


def export(cfg: ExportConfig | DictConfig) -> Path:
    """Write the export folder (see the module docstring); return its path."""
    if cfg.lora not in LORA:
        raise ValueError(f"lora={cfg.lora!r} is not one of {list(LORA)}")
    if cfg.dtype is not None and (cfg.dtype not in _DTYPES or cfg.dtype == "auto"):
        raise ValueError(f"dtype={cfg.dtype!r} is not one of {[d for d in _DTYPES if d != 'auto']}")
    run_dir = Path(cfg.run_dir).expanduser()
    policy, run_cfg, info = load_run_policy(run_dir, cfg.which, cfg.base)
    m = run_cfg["model"]
    out = Path(cfg.out).expanduser() if cfg.out else run_dir / f"export-{cfg.which}"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net = policy.net
    lora = m.get("lora", {}).get("enabled", False)
    if lora and cfg.lora == "merge":
        net = net.merge_and_unload()  # plain model: W + (alpha/r)·B·A
    if cfg.dtype is not None:
        net.to(_DTYPES[cfg.dtype])
    config = getattr(net, "config", None)
    if policy.kind != "tiny" and config is not None and not (lora and cfg.lora == "adapter"):
        config.mask_token_id = policy.mask_token_id  # the id the run used (model.mask_token_id)
    net.save_pretrained(tmp)  # safetensors (+ config.json, or adapter_config.json for lora=adapter)
    policy.tokenizer.save_pretrained(tmp)
    settings = {"kind": policy.kind, "mask_token_id": policy.mask_token_id,
                "use_chat_template": policy.use_chat_template, "precision": m.get("precision", "fp32"),
                "dtype": cfg.dtype or m.get("dtype", "float32"), "lora": cfg.lora if lora else None,
                "base": info["base"], "run": run_dir.name, "which": cfg.which, "step": info["step"]}
    (tmp / SETTINGS).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    (tmp / "README.md").write_text(model_card(run_dir, run_cfg, settings, info))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"[export] {run_dir.name} ({cfg.which}, step {info['step']}) -> {out}")
    return out


def export_settings(folder: str | Path) -> dict[str, Any]:
    """The model settings an export recorded (empty for any other folder)."""
    path = Path(folder) / SETTINGS
    return json.loads(path.read_text()) if path.is_file() else {}


def _results_table(tests: dict[str, Any]) -> str:
    lines = ["| policy | test set | accuracy | reward | n |", "|---|---|---|---|---|"]
    for policy in ("base", "best", "final"):
        for source, r in (tests.get(policy) or {}).items():
            if isinstance(r, dict) and "accuracy" in r:
                lines.append(f"| {policy} | {source} | {r['accuracy']:.4f} | {r['reward']:.4f} | {r['n']} |")
    return "\n".join(lines) if len(lines) > 2 else "(no test evaluation recorded)"


def model_card(run_dir: Path, run_cfg: dict[str, Any], settings: dict[str, Any], info: dict[str, Any]) -> str:
    """The export's README.md: what it is, how to load it, its test evaluation and its config."""
    tests_path = run_dir / "eval_test.json"
    tests = json.loads(tests_path.read_text()) if tests_path.is_file() else {}
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    method = run_cfg["method"]["_target_"].rsplit(".", 1)[-1]
    base = settings["base"]
    hub_base = not Path(base).exists() and base.count("/") == 1
    front = {"library_name": "transformers", "tags": ["bgpo", "dllm", "diffusion-language-model",
                                                       "reinforcement-learning", settings["kind"]]}
    if hub_base:
        front["base_model"] = base
    selected = tests.get("best_step")
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {run_dir.name}: the {settings['which']} policy (RL step {settings['step']})

A masked diffusion LM ({settings['kind']}) fine-tuned by bgpo-suite with {method}
(n_t = {run_cfg.get('mc')}) on task `{run_cfg['task']['name']}` for {info['step']} of
{run_cfg.get('steps')} RL steps, from `{base}`.
Precision {settings['precision']}, weights saved as {settings['dtype']}; LoRA: {settings['lora'] or 'none'}.
Checkpoint: `{info['checkpoint']}`; validation-selected step: {selected}; commit {summary.get('commit', '?')}.

Load it with the suite (its settings are in `{SETTINGS}`):

```python
from bgpo.model import load_dllm
model = load_dllm("{settings['kind']}", "<this folder>", mask_token_id={settings['mask_token_id']},
                  use_chat_template={settings['use_chat_template']})
```

or evaluate it: `python -m bgpo.evaluate checkpoint=<this folder> task=<task>`. Generation is
LLaDA's block-wise low-confidence remasking sampler (`bgpo.sampler`), not `generate()`.

## Test evaluation (`eval_test.json`: greedy, one token per step)

{_results_table(tests)}

Selection: {tests.get('selection', 'none')}.

## Training config (`config.yaml`)

```yaml
{yaml.safe_dump(run_cfg, sort_keys=True).strip()}
```
"""


register()


@hydra.main(config_path="conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise SystemExit("[bgpo.export] run_dir=<run folder> is required")
    try:
        export(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad input: one sentence, no traceback
        raise SystemExit(f"[bgpo.export] {e}") from None


if __name__ == "__main__":
    main()
