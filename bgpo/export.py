"""Export a run's policy as a hub-format model folder (issue 12):

    python -m bgpo.export run_dir=results/<run> [which=final|best|last] [out=DIR] [lora=merge|adapter]
                          [dtype=bfloat16]
    python -m bgpo.evaluate checkpoint=DIR task=countdown     # evaluates the export

The folder holds what ``save_pretrained`` writes for the run's model class (config.json and
safetensors weights: the tiny Gemma3, or LLaDA / Dream in their hub format, loadable by
``bgpo.model.load_dllm``), the tokenizer, ``bgpo_export.json`` (the model settings the run used:
kind, mask id, chat template, precision, which ``bgpo.evaluate`` takes for the keys left at their
defaults; and the task's ``protocol``: format, gen_length, block_length, diffusion_steps, shots,
n_test and the task's numeric options, under which ``bgpo.evaluate`` scores the export) and a model
card ``README.md`` (how to load it, with transformers alone and with the suite, the run's config
``config.yaml`` and its test evaluation ``eval_test.json``: base model, validation-selected and
final policy, per test set).

An LLaDA / Dream export of the suite's native classes loads with transformers alone, without the
suite: it ships their modeling code (``modeling_llada.py`` or ``modeling_dream.py``, copies of
``bgpo/models/llada.py`` / ``dream.py``, and the ``layers.py`` they import) and config.json's
``auto_map`` names it (the hub's ``auto_map`` named modeling files the folder would not hold):
``AutoModel.from_pretrained(folder, trust_remote_code=True)``. (A run with ``model.remote_code=true``
trained the published code, which ``save_pretrained`` copies itself; the tiny Gemma3 is
transformers' own: ``AutoModelForCausalLM``.)

- ``which``: ``final`` (``checkpoints/last.pt`` of a COMPLETE run: its summary.json is the run's
  own, as the results store checks it: run key, method, task, n_t, seed, whole metrics),
  ``best`` (``checkpoints/best.pt``, the checkpoint selected on validation, ``bgpo.evaluation``),
  ``last`` (the latest checkpoint, complete or not);
- ``lora``: ``merge`` (the adapters folded into the base weights: a plain model folder) or
  ``adapter`` (peft's ``adapter_config.json`` + ``adapter_model.safetensors`` naming the base
  folder; ``bgpo.evaluate`` loads base + adapter);
- ``dtype``: the saved weights' dtype; default: as trained (float32 master weights under
  bf16-mixed); ``bfloat16`` halves the folder;
- ``out``: default ``<run_dir>/export-<which>``; written to a fresh temporary folder beside it,
  then renamed. An existing ``out`` is replaced only when it is an earlier export (it holds
  ``bgpo_export.json``, which every export writes) or empty; any other folder, or a file, is
  refused with one sentence (exit code 2): the export never deletes files it did not write.

The checkpoint must be the run's: one recording another run's key is refused (one sentence naming
the file and both keys); one written before checkpoints recorded their run is exported with a
warning. A missing, corrupt or truncated ``config.yaml``, checkpoint, base model folder,
``summary.json`` or ``eval_test.json`` is one sentence naming the file, exit code 2, never a
traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bgpo.config import ModelConfig
from bgpo.model import _DTYPES, DLLM, apply_lora, load_dllm
from bgpo.results import (
    UnreadableFile,
    check_checkpoint_run,
    check_replaceable,
    check_summary,
    expected_run_key,
    load_checkpoint,
    make_folder,
    reading,
    reason,
    stored_config,
    trainer_checkpoint,
    warn,
)

WHICH = {"final": "last", "best": "best", "last": "last"}
"""which checkpoint each ``which`` exports: ``<name>.pt``, or ``<name>.dcp`` of an FSDP run"""
PROTOCOL = ("format", "gen_length", "block_length", "diffusion_steps", "shots", "n_test")
"""the task keys that make the trained protocol (prompt format, lengths, few-shot, test-set size):
recorded in ``bgpo_export.json`` (``protocol``) and applied by ``bgpo.evaluate``"""
MODELING = {  # model.kind -> (suite file, file name in the export, auto_map: Auto class -> class)
    "llada": ("llada.py", "modeling_llada.py", {"AutoConfig": "LLaDAConfig", "AutoModel": "LLaDAModelLM",
                                                 "AutoModelForCausalLM": "LLaDAModelLM"}),
    "dream": ("dream.py", "modeling_dream.py", {"AutoConfig": "DreamConfig", "AutoModel": "DreamModel"}),
}
"""the suite's native modeling code an LLaDA / Dream export ships (with ``layers.py``, which it
imports relatively), and the ``auto_map`` that points transformers at it"""
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
    """The run's resolved config and the checkpoint to export; one sentence naming what is missing
    or unreadable."""
    if which not in WHICH:
        raise ValueError(f"which={which!r} is not one of {list(WHICH)}")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"run_dir={str(run_dir)!r} has no config.yaml: not a run folder")
    cfg = stored_config(run_dir, "cannot tell which model the run trained")
    sections = {"method": dict, "task": dict, "model": dict, "mc": int, "seed": int}
    bad = [k for k, t in sections.items() if not isinstance(cfg.get(k), t)]
    if bad or "_target_" not in cfg["method"] or "name" not in cfg["task"]:
        missing = ", ".join(bad) or "method or task"
        raise UnreadableFile(f"{run_dir / 'config.yaml'} lacks the run's {missing}: not a run's config")
    if which == "final":  # a summary of another run, or over damaged metrics, proves nothing
        if not (run_dir / "summary.json").is_file():
            why = "no summary.json"
        else:
            _, problem, damaged = check_summary(run_dir, cfg)
            why = problem or (damaged and f"its metrics are damaged: {damaged}")
        if why:
            raise FileNotFoundError(f"run_dir={str(run_dir)!r} is not complete ({why}): "
                                    "which=last exports its latest checkpoint")
    found = [p for p in (run_dir / "checkpoints" / f"{WHICH[which]}{s}" for s in (".pt", ".dcp"))
             if trainer_checkpoint(p)]
    latest = max(found, key=lambda p: p.stat().st_mtime) if found else None  # a run that changed layout
    ckpt = latest or run_dir / "checkpoints" / f"{WHICH[which]}.pt"
    if not found:
        why = " (selected on validation: the task has none, or no evaluation ran)" if which == "best" else ""
        raise FileNotFoundError(f"which={which}: {ckpt} does not exist{why}")
    return cfg, ckpt


def load_run_policy(run_dir: str | Path, which: str = "final", base: str | None = None,
                    device: str = "cpu") -> tuple[DLLM, dict[str, Any], dict[str, Any]]:
    """The policy of a run's checkpoint (as the trainer built it: LoRA-wrapped when the run used
    LoRA), the run's config and the checkpoint's ``step``."""
    from bgpo.provision import base_model_path

    run_dir = Path(run_dir).expanduser()
    cfg, ckpt = _run_files(run_dir, which)
    try:
        m = OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg["model"])
    except OmegaConfBaseException as e:
        raise UnreadableFile(f"{run_dir / 'config.yaml'}: its model section is not a model config "
                             f"({reason(e)})") from None
    state = load_checkpoint(ckpt, device=device)  # and whose it is, before any model is loaded
    if not check_checkpoint_run(state, ckpt, expected_run_key(run_dir, cfg)):
        warn(f"{ckpt} records no run key (written before checkpoints carried one): that it is this run's "
             "checkpoint cannot be verified")
    if which == "final" and state["step"] != cfg.get("steps"):
        raise UnreadableFile(f"{ckpt} is the checkpoint of step {state['step']}, not of the run's last step "
                             f"{cfg.get('steps')}: which=last exports it")
    tiny = str(base_model_path(cfg["task"]["name"], dict(cfg["model"]))) if m.kind == "tiny" else None
    path = base or m.path or tiny
    if path is None or (m.kind == "tiny" and not Path(path).is_dir()):
        raise FileNotFoundError(f"the base model of {run_dir} was not found ({path}): "
                                "pass base=<model folder>")
    with reading(path, "model folder"):
        policy = load_dllm(m.kind, path, m.dtype, device, m.mask_token_id, m.use_chat_template,
                           m.remote_code, revision=m.get("revision"))
    if m.lora.enabled:
        apply_lora(policy, m.lora.r, m.lora.alpha, m.lora.dropout)
    try:
        policy.net.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise UnreadableFile(f"{ckpt} does not fit the model in {path} ({reason(e)}): pass base=<the run's "
                             "base model folder>") from None
    return policy, cfg, {"step": state["step"], "checkpoint": str(ckpt), "base": str(path)}


def export(cfg: ExportConfig | DictConfig) -> Path:
    """Write the export folder (see the module docstring); return its path."""
    if cfg.lora not in LORA:
        raise ValueError(f"lora={cfg.lora!r} is not one of {list(LORA)}")
    if cfg.dtype is not None and (cfg.dtype not in _DTYPES or cfg.dtype == "auto"):
        raise ValueError(f"dtype={cfg.dtype!r} is not one of {[d for d in _DTYPES if d != 'auto']}")
    run_dir = Path(cfg.run_dir).expanduser()
    out = Path(cfg.out).expanduser() if cfg.out else run_dir / f"export-{cfg.which}"
    check_replaceable(out, SETTINGS, "out")  # before the model is loaded: a refusal costs nothing
    make_folder(out.parent, f"out={out}")
    policy, run_cfg, info = load_run_policy(run_dir, cfg.which, cfg.base)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))  # never another's
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders; an export is for everyone to read
    try:
        _write(cfg, run_dir, policy, run_cfg, info, tmp)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only when something failed: it was renamed otherwise
    print(f"[export] {run_dir.name} ({cfg.which}, step {info['step']}) -> {out}")
    return out


def replace_folder(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` (checked: an earlier export, or empty) is moved
    aside first and deleted only once the new folder is in place."""
    if not out.exists():
        os.replace(new, out)
        return
    check_replaceable(out, SETTINGS, "out")  # again: it may have changed while the model was written
    old = new.with_name(new.name[: -len(".tmp")] + ".old")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old)


def _write(cfg: ExportConfig | DictConfig, run_dir: Path, policy: DLLM, run_cfg: dict[str, Any],
           info: dict[str, Any], tmp: Path) -> None:
    """The export's files, into the (new, empty) folder ``tmp``."""
    m = run_cfg["model"]
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
    code = ship_modeling_code(net, tmp) if (tmp / "config.json").is_file() else None
    task = run_cfg["task"]
    settings = {"kind": policy.kind, "mask_token_id": policy.mask_token_id,
                "use_chat_template": policy.use_chat_template, "precision": m.get("precision", "fp32"),
                "dtype": cfg.dtype or m.get("dtype", "float32"), "lora": cfg.lora if lora else None,
                "base": info["base"], "run": run_dir.name, "which": cfg.which, "step": info["step"],
                "task": task.get("name"), "eval_tasks": sorted(task.get("eval_tasks") or {}),
                "protocol": task_protocol(task), "modeling_code": code}
    (tmp / SETTINGS).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    (tmp / "README.md").write_text(model_card(run_dir, run_cfg, settings, info))


def task_protocol(task: dict[str, Any]) -> dict[str, Any]:
    """What of the run's task section reproduces its protocol: the ``PROTOCOL`` keys and the task's
    options that are numbers or booleans (``n_empty``, ``split_seed``, ``format_bonus``, ``timeout``...).
    String options name data (files, hub datasets, splits): they are the evaluating machine's."""
    out: dict[str, Any] = {k: task[k] for k in PROTOCOL if k in task}
    options = task.get("options") or {}
    out["options"] = {k: v for k, v in options.items() if isinstance(v, (bool, int, float))}
    return out


def ship_modeling_code(net: Any, folder: Path) -> list[str] | None:
    """An LLaDA / Dream export of the suite's native class loads with transformers alone: copy the
    class's module (as ``modeling_<kind>.py``) and ``layers.py`` into ``folder`` and point
    config.json's ``auto_map`` at them (the hub's ``auto_map`` names modeling files the folder does
    not hold). Returns the files shipped (None for the tiny model, which transformers knows, and for
    a network the published remote code built: ``save_pretrained`` copies that code itself)."""
    import bgpo.models as models

    kind = next((k for k, cls in models.NATIVE.items() if type(net) is cls), None)
    if kind is None:
        return None
    source, name, classes = MODELING[kind]
    here = Path(models.__file__).parent
    header = (f"# Shipped by bgpo.export: bgpo-suite's native {type(net).__name__} (bgpo/models/{source}),\n"
              "# not the published modeling code; it imports layers.py beside it. Load with\n"
              "# AutoModel.from_pretrained(<this folder>, trust_remote_code=True).\n")
    (folder / name).write_text(header + (here / source).read_text())
    shutil.copyfile(here / "layers.py", folder / "layers.py")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {auto: f"{Path(name).stem}.{cls}" for auto, cls in classes.items()}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [name, "layers.py"]


def export_settings(folder: str | Path) -> dict[str, Any]:
    """The model settings an export recorded (empty for any other folder); an unreadable
    ``bgpo_export.json`` is :class:`UnreadableFile`, one sentence naming it."""
    path = Path(folder) / SETTINGS
    if not path.is_file():
        return {}
    settings = read_json_file(path, "cannot tell which model settings the export used")
    if not isinstance(settings, dict):
        raise UnreadableFile(f"{path} is not a JSON object: cannot tell which model settings the export used")
    return settings


def read_json_file(path: Path, consequence: str) -> Any:
    """A JSON file; one that does not parse is :class:`UnreadableFile` naming it and ``consequence``."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnreadableFile(f"{path} is unreadable ({reason(e)}): {consequence}") from None


def _results_table(tests: dict[str, Any]) -> str:
    lines = ["| policy | test set | accuracy | reward | n |", "|---|---|---|---|---|"]
    for policy in ("base", "best", "final"):
        for source, r in (tests.get(policy) or {}).items():
            if isinstance(r, dict) and "accuracy" in r:
                lines.append(f"| {policy} | {source} | {r['accuracy']:.4f} | {r['reward']:.4f} | {r['n']} |")
    return "\n".join(lines) if len(lines) > 2 else "(no test evaluation recorded)"


def _protocol_text(protocol: dict[str, Any]) -> str:
    keys = [f"{k}={protocol[k]}" for k in PROTOCOL if protocol.get(k) is not None]
    return ", ".join(keys) if keys else "settings"


def _loading(settings: dict[str, Any]) -> str:
    """The model card's "how to load it": with transformers alone, and with the suite."""
    kind, mask = settings["kind"], settings["mask_token_id"]
    suite = f"""With the suite (its settings are in `{SETTINGS}`):

```python
from bgpo.model import load_dllm
model = load_dllm("{kind}", "<this folder>", mask_token_id={mask},
                  use_chat_template={settings['use_chat_template']})
```"""
    if settings.get("lora") == "adapter":
        return ("This folder is a peft LoRA adapter (`adapter_config.json` names its base model): load the "
                "base, then `peft.PeftModel.from_pretrained(base_net, \"<this folder>\")`. " + suite)
    code = settings.get("modeling_code")
    if code:
        shift = ("Position i's logits predict token i (no shift)." if kind == "llada" else
                 "Dream's logits are shifted: position i-1's logits predict token i.")
        files = ", ".join(f"`{c}`" for c in code)
        plain = f"""With transformers alone: the folder ships the suite's modeling code ({files}),
which config.json's `auto_map` names, so no suite install is needed:

```python
import torch
from transformers import AutoModel, AutoTokenizer
model = AutoModel.from_pretrained("<this folder>", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("<this folder>", trust_remote_code=True)  # reads config.json too
logits = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]; the mask token is id {mask}
```

{shift} (Without `trust_remote_code`, `import bgpo.models` first: it registers the same classes.)"""
    else:
        plain = f"""With transformers alone (a `{kind}` model transformers knows):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this folder>")
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
```

The mask token is id {mask}."""
    return f"## Loading\n\n{plain}\n\n{suite}"


def model_card(run_dir: Path, run_cfg: dict[str, Any], settings: dict[str, Any], info: dict[str, Any]) -> str:
    """The export's README.md: what it is, how to load it, its test evaluation and its config."""
    tests_path = run_dir / "eval_test.json"
    tests = read_json_file(tests_path, "no model card") if tests_path.is_file() else {}
    summary_path = run_dir / "summary.json"
    summary = read_json_file(summary_path, "no model card") if summary_path.is_file() else {}
    tests, summary = (x if isinstance(x, dict) else {} for x in (tests, summary))
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

{_loading(settings)}

Evaluate it under the protocol it was trained with: `python -m bgpo.evaluate checkpoint=<this folder>
task={run_cfg['task']['name']}` (the task's {_protocol_text(settings.get('protocol') or {})} are read from
`{SETTINGS}`; a `task.<key>=` given on the command line wins, and the evaluation log says so).
Generation is LLaDA's block-wise low-confidence remasking sampler (`bgpo.sampler`), not `generate()`.

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
        print("[bgpo.export] run_dir=<run folder> is required", file=sys.stderr)
        raise SystemExit(2)
    try:
        export(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad input (ConfigError included): one sentence
        print(f"[bgpo.export] {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
