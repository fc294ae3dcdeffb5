"""Evaluate a model on a suite task, through lm-evaluation-harness (``bgpo_dllm``; issue 6) where the
task has a suite YAML (issue 25: every task, under the protocol the policy was trained with):

    python -m bgpo.evaluate checkpoint=PATH task=countdown            # the suite's own test set
    python -m bgpo.evaluate checkpoint=PATH task=sudoku data=d1 n=64   # d1's test file, first 64
    python -m bgpo.evaluate checkpoint=results/<run>/checkpoints/last.pt task=countdown
    python -m bgpo.evaluate checkpoint=PATH model=llada_8b_instruct task=countdown task.format=d1
    python -m bgpo.evaluate checkpoint=<a Countdown run's last.pt> task=sudoku task_mismatch=allow
    python -m bgpo.evaluate checkpoint=<a math export> task=math      # GSM8K and MATH500 ($BGPO_DATA)
    python -m bgpo.evaluate checkpoint=<a code export> task=deepcoder # HumanEval and MBPP, in the sandbox

``checkpoint`` is a model folder (``DLLM.save`` / ``save_pretrained``: a pretrained base, or a
policy exported by ``bgpo.export``, whose ``bgpo_export.json`` gives the kind, mask id and chat
template the run used; an LLaDA / Dream folder's kind is read from its config.json; a LoRA
``adapter`` export is loaded onto its base) or a trainer checkpoint ``last.pt``; for the latter the
run's ``config.yaml`` (two folders up) gives the model (kind, base path, LoRA) unless ``base=``
names the base folder. ``model.precision`` applies (bf16-mixed: bfloat16 autocast).

The trained protocol. A run's policy (an export, or a ``.pt``) is scored under the task settings it
was trained with: ``task.format``, ``gen_length``, ``block_length``, ``diffusion_steps``, ``shots``,
``n_test`` and, on the very task trained, its numeric options (``bgpo_export.json``'s ``protocol``,
or the run's ``config.yaml``), not the task YAML's defaults (the math YAML's length 512 for a policy
trained at 256, say). A ``task.<key>`` given explicitly (on the command line, or set to another value
than the YAML's) wins, with a warning naming both values; the log says where the protocol came from
and the eval.json entry records it (``protocol``: applied, overridden). An export made before exports
recorded their protocol is scored with the YAML's settings, with a warning.

Greedy, one token per step (``steps`` = ``task.gen_length``), exactly as ``bgpo.rollout.evaluate``.
Countdown and Sudoku go through lm-eval: the suite's task YAMLs (``bgpo/lm_tasks``,
``TaskManager(include_path=..., include_defaults=False)``: no built-in task is indexed), the
``bgpo_dllm`` model and the task's own reward as the metric
(``bgpo.lm_eval_model.evaluate_suite_task``). The other tasks (math, deepcoder, gsm8k, math500,
humaneval, mbpp) through the suite's sampler and the task's reward, as the trainer's test
evaluation (``bgpo.evaluation``): a task with ``task.eval_tasks`` (math: GSM8K and MATH500;
deepcoder: HumanEval and MBPP, whose rewards run in the sandbox) is scored on each of those test
sets with its own format and lengths. Their data are the files in ``$BGPO_DATA`` (the task YAMLs'
``${bgpo_data:NAME}``, see ``bgpo/conf/task/math.yaml``); a file that is not there falls back to
the hub name the YAML gives (MATH500's), else the task's error names the key. Such a task scored on
its own test set (gsm8k, math500, humaneval, mbpp alone) needs ``task.test_file`` (a local file: its
default test set is a download).

The result is merged into ``eval.json`` (written atomically) in ``out`` (default: the model
folder, or the run folder of a ``.pt``), keyed by the lm-eval task name (``bgpo_countdown``,
``bgpo_sudoku_d1``...) or ``bgpo_<task>_<test set>`` (``bgpo_math_gsm8k``, ``bgpo_deepcoder_mbpp``...),
and logged (console and Hydra's job log).

A run's checkpoint or export is scored only on the task it was trained for (its ``task.name``, or
one of its ``task.eval_tasks``); on another task it is refused (one sentence, exit code 2) unless
``task_mismatch=allow`` (default ``refuse``; a model of no known run, such as a base model, is
scored on any task). A checkpoint recording another run's key than its folder's is refused. A
corrupt or truncated ``.pt``, a garbage ``config.yaml``, ``bgpo_export.json``, ``eval.json`` or
model folder (``config.json``, weights, tokenizer) is one sentence naming the file or folder and
exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bgpo.config import ConfigError, ModelConfig, TaskConfig
from bgpo.config import register as register_config
from bgpo.results import (
    StoreMismatch,
    UnreadableFile,
    check_checkpoint_run,
    expected_run_key,
    load_checkpoint,
    make_folder,
    reading,
    reason,
    stored_config,
    trainer_checkpoint,
    warn,
)
from bgpo.validate import (
    as_config_error,
    check_device,
    check_int,
    check_number,
    cli_errors,
    task_args,
    validate_model,
    validate_task,
)

log = logging.getLogger("bgpo.evaluate")  # not __name__, which is "__main__" under python -m


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING
    """model folder, or a trainer checkpoint ``.pt`` (see ``base``)"""
    base: str | None = None
    """for a ``.pt``: the base model folder (default: the run's model.path, or the task's cached base)"""
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: str = "own"
    """own: the suite's seeded test set; d1: d1's test file (``$BGPO_D1_DATA`` or ../shared/data)"""
    n: int | None = None
    """evaluate the first n problems (None: the whole test set)"""
    batch_size: int = 64
    steps: int | None = None
    """denoising steps (None: task.gen_length, one token per step)"""
    temperature: float = 0.0
    out: str | None = None
    """folder of eval.json (default: the model folder, or the run folder of a .pt)"""
    device: str = "auto"
    log_samples: bool = False
    """also store the completions (test-set order) in eval.json"""
    task_mismatch: str = "refuse"
    """refuse: a run's checkpoint or export is scored only on the task it was trained for (or one of
    its ``task.eval_tasks``); allow: on any task"""


def register() -> None:
    """The evaluate schema, and the suite's resolvers (``${bgpo_data:...}`` in the math and deepcoder
    task configs): ``bgpo.config.register`` is what makes them known, and the train / sweep /
    pretrain entry points call it; without it ``task=math`` fails with "Unsupported interpolation
    type bgpo_data"."""
    register_config()
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(cfg: DictConfig, device: str) -> tuple[Any, Path]:
    """The DLLM to evaluate and the default output folder."""
    from bgpo.model import apply_lora, apply_precision, load_dllm

    path = Path(cfg.checkpoint).expanduser()
    m = cfg.model
    if path.is_dir() and not trainer_checkpoint(path):
        with reading(path, "model folder"):  # its config.json, weights, tokenizer
            m = exported_model(path, m)
            if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
                return load_adapter(path, m, device), path  # bgpo.export lora=adapter
            model = load_dllm(m.kind, path, m.dtype, device, m.mask_token_id, m.use_chat_template,
                              m.remote_code)
        return apply_precision(model, m.precision), path
    if not trainer_checkpoint(path):
        raise FileNotFoundError(f"checkpoint={cfg.checkpoint!r} is neither a model folder nor a trainer "
                                "checkpoint (.pt, or .dcp under FSDP)")
    from bgpo.provision import base_model_path

    run_dir = path.parent.parent
    stored = stored_config(run_dir, "cannot tell which model the run trained")
    run_model = stored.get("model") or {}  # the run's config.yaml (runs older than model.base: the cache)
    task = stored.get("task")
    run_task = task.get("name", cfg.task.name) if isinstance(task, dict) else cfg.task.name  # its base model
    if stored:  # the model the run trained (kind, base path, LoRA)
        try:
            m = OmegaConf.merge(OmegaConf.structured(ModelConfig), run_model)
        except (OmegaConfBaseException, ValueError) as e:
            raise UnreadableFile(f"{run_dir / 'config.yaml'}: its model section is not a model config "
                                 f"({reason(e)})") from None
    state = load_checkpoint(path, device=device)  # and whose it is, before any model is loaded
    if stored and not check_checkpoint_run(state, path, expected_run_key(run_dir, stored)):
        warn(f"{path} records no run key (written before checkpoints carried one): that it is the checkpoint "
             f"of {run_dir.name} cannot be verified")
    base = cfg.base or m.path or (base_model_path(run_task, dict(run_model) if stored else m)
                                  if m.kind == "tiny" else None)
    if not base or not Path(base).exists() and m.kind == "tiny":
        raise FileNotFoundError(f"base model of {path} not found ({base}): pass base=<model folder>")
    with reading(base, "model folder"):
        model = load_dllm(m.kind, base, m.dtype, device, m.mask_token_id, m.use_chat_template,
                          m.remote_code, revision=m.get("revision"))
    if m.lora.enabled:
        apply_lora(model, m.lora.r, m.lora.alpha, m.lora.dropout)
    try:
        model.net.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise UnreadableFile(f"{path} does not fit the model in {base} ({reason(e)}): pass base=<the run's "
                             "base model folder>") from None
    return apply_precision(model, m.precision), run_dir


def exported_model(folder: Path, m: DictConfig) -> DictConfig:
    """The model settings of a model folder: an export's ``bgpo_export.json`` (``bgpo.export``) fills
    the keys left at their defaults (kind, mask id, chat template); otherwise an LLaDA / Dream
    folder's kind comes from its config.json when ``model.kind`` is left at ``tiny``."""
    from bgpo.export import export_settings
    from bgpo.lm_eval_model import detect_kind

    saved, default = export_settings(folder), ModelConfig()
    m = OmegaConf.merge(m, {})  # a copy
    for key in ("kind", "mask_token_id", "use_chat_template"):
        if key in saved and m[key] == getattr(default, key):
            m[key] = saved[key]
    if m.kind == default.kind and (folder / "config.json").is_file() and detect_kind(folder) != "tiny":
        m.kind = detect_kind(folder)
    return m


def load_adapter(folder: Path, m: DictConfig, device: str) -> Any:
    """A LoRA adapter export: its base model (``adapter_config.json``) with the adapter applied."""
    import json

    from peft import PeftModel

    from bgpo.model import apply_precision, load_dllm

    file = folder / "adapter_config.json"
    try:
        base = json.loads(file.read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UnreadableFile(f"{file} is unreadable ({reason(e)}): no base model for the adapter") from None
    with reading(base, "model folder"):
        model = load_dllm(m.kind, base, m.dtype, device, m.mask_token_id, m.use_chat_template,
                          m.remote_code, revision=m.get("revision"))
    with reading(folder, "LoRA adapter"):
        model.net = PeftModel.from_pretrained(model.net, folder).to(device)
    return apply_precision(model, m.precision)


def validate_evaluate(cfg: DictConfig) -> None:
    """Every key before a model is loaded (a :class:`bgpo.config.ConfigError` names it)."""
    from bgpo.evaluation import eval_task_config
    from bgpo.lm_eval_tasks import SOURCES, lm_task_name
    from bgpo.sampler import validate_schedule

    with as_config_error():
        validate_task(cfg.task)
        validate_model(cfg.model)
        if cfg.data not in SOURCES:
            raise ValueError(f"data={cfg.data!r} is not one of {list(SOURCES)}")
        if cfg.data == "d1" and cfg.task.test_file:
            raise ValueError("data=d1 and task.test_file are exclusive: d1 means d1's own test file")
        check_int("n", cfg.n, 1, optional=True)
        check_int("batch_size", cfg.batch_size, 1)
        check_int("steps", cfg.steps, 1, optional=True)
        if cfg.steps is not None:
            try:
                validate_schedule(cfg.task.gen_length, cfg.task.block_length, cfg.steps)
            except ValueError as e:
                raise ValueError(str(e).replace("sampler.", "task.").replace("task.steps", "steps")) from None
        check_number("temperature", cfg.temperature, ge=0)
        check_device("device", cfg.device)
        if suite_task(cfg.task.name):
            lm_task_name(cfg.task.name, cfg.data)
        elif cfg.data == "d1":
            raise ValueError(f"data=d1: task {cfg.task.name} has no d1 test file (countdown and sudoku "
                             "have); data=own evaluates its test sets")
        elif cfg.data == "own" and not cfg.task.eval_tasks and not cfg.task.test_file:
            raise ValueError(f"task={cfg.task.name} is scored on a local test file: pass task.test_file=<its "
                             "test set> (its default test set is a download; task=math and task=deepcoder "
                             "read theirs from $BGPO_DATA)")
        if cfg.data == "own":
            for sub in cfg.task.eval_tasks or {}:  # math: gsm8k and math500; deepcoder: humaneval and mbpp
                validate_task(eval_task_config(cfg.task, sub))
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_dir() and not trainer_checkpoint(path):
            raise ValueError(f"checkpoint={cfg.checkpoint}: neither a model folder nor a trainer checkpoint "
                             "(.pt, or .dcp under FSDP)")
        if cfg.base and not Path(cfg.base).expanduser().is_dir():
            raise ValueError(f"base={cfg.base}: no such model folder")
        if cfg.task_mismatch not in TASK_MISMATCH:
            raise ValueError(f"task_mismatch={cfg.task_mismatch!r} is not one of {list(TASK_MISMATCH)}")
        if cfg.out and Path(cfg.out).expanduser().is_file():
            raise ValueError(f"out={cfg.out} is a file, not a folder")
    check_task(cfg)


TASK_MISMATCH = ("refuse", "allow")
RUN_NAME = re.compile(r"^[a-z0-9_]+-(?P<task>[a-z0-9_]+)-mc\d+-s\d+-[0-9a-f]{10}$")
"""``<method>-<task>-mc<n_t>-s<seed>-<hash>``: a run folder's name (``bgpo.results.run_name``)"""


def trained_tasks(checkpoint: Path) -> tuple[list[str], Path] | None:
    """The tasks a run's policy may be scored on (the task it was trained for, then its
    ``task.eval_tasks``) and the file that says so; None for a model of no known run (a base model,
    a folder made elsewhere)."""
    from bgpo.export import SETTINGS, export_settings

    if checkpoint.is_dir() and not trainer_checkpoint(checkpoint):
        saved, source = export_settings(checkpoint), checkpoint / SETTINGS
        name, extra = saved.get("task"), saved.get("eval_tasks")
        if name is None:  # an export made before it recorded the task: its run's name says it
            match = RUN_NAME.match(str(saved.get("run", "")))
            name = match["task"] if match else None
    else:
        run_dir = checkpoint.parent.parent
        source = run_dir / "config.yaml"
        stored = stored_config(run_dir, "cannot tell which task the run trained on")
        task = stored.get("task") if isinstance(stored.get("task"), dict) else {}
        name, extra = task.get("name"), task.get("eval_tasks")
    if not isinstance(name, str):
        return None
    return [name, *sorted(str(k) for k in (extra if isinstance(extra, (list, dict)) else []))], source


def check_task(cfg: DictConfig) -> None:
    """``task`` is one the checkpoint's run was trained for, unless ``task_mismatch=allow``."""
    known = trained_tasks(Path(cfg.checkpoint).expanduser())
    if known is None or cfg.task.name in known[0] or cfg.task_mismatch == "allow":
        return
    tasks, source = known
    raise ConfigError(f"task={cfg.task.name}: checkpoint={cfg.checkpoint} is a policy trained for "
                      f"{' / '.join(tasks)} ({source}), so its score on {cfg.task.name} would measure "
                      "nothing it learned; pass that task, or task_mismatch=allow to score it anyway")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate, merge the result into ``<out>/eval.json``, log and return it: the entry of the one
    test set, or ``{"task", "sets": {eval.json key: entry}}`` for a task with several
    (``task.eval_tasks``: math, deepcoder)."""
    from bgpo.results import atomic_write_json, provenance

    protocol = apply_protocol(cfg)  # the format and lengths the policy was trained with
    validate_evaluate(cfg)
    device = _device(cfg.device)
    model, default_out = load_model(cfg, device)
    entries: dict[str, dict[str, Any]] = {}
    for key, task_cfg, source in scored_sets(cfg):
        t0 = time.time()
        res, harness = score(model, task_cfg, source, cfg)
        entries[key] = {
            "task": cfg.task.name, **({"test_set": task_cfg.name} if task_cfg.name != cfg.task.name else {}),
            **harness, "data": source, "format": task_cfg.format, "test_file": task_cfg.test_file, **res,
            "wall_s": round(time.time() - t0, 2),
            "checkpoint": str(Path(cfg.checkpoint).expanduser().resolve()),
            "sampler": {"gen_length": task_cfg.gen_length, "block_length": task_cfg.block_length,
                        "steps": cfg.steps or task_cfg.gen_length, "temperature": cfg.temperature},
            **({"protocol": protocol} if protocol else {}), **provenance(device),
        }
    out = Path(cfg.out).expanduser() if cfg.out else default_out
    make_folder(out, f"out={out}")
    path = out / "eval.json"
    merged = read_eval_json(path)
    merged.update(entries)
    atomic_write_json(path, merged)
    for key, e in entries.items():
        log.info(f"[eval] {cfg.task.name} ({key}): accuracy {e['accuracy']:.4f} reward {e['reward']:.4f} "
                 f"on {e['n']} problems -> {path}")
    if len(entries) == 1:
        return next(iter(entries.values()))
    return {"task": cfg.task.name, "sets": entries}


def scored_sets(cfg: DictConfig) -> list[tuple[str, DictConfig, str]]:
    """``(eval.json key, task config, source)`` of each set to score: a task's ``task.eval_tasks``
    (with ``data=own``: each with the task's format and lengths, as ``bgpo.evaluation`` reports
    them, keyed ``bgpo_<task>_<set>``), else the task's own set (``bgpo_<task>[_<data>]``)."""
    from bgpo.evaluation import eval_task_config
    from bgpo.lm_eval_tasks import lm_task_name

    task = cfg.task
    if cfg.data == "own" and task.eval_tasks:
        return [(f"bgpo_{task.name}_{sub}", eval_task_config(task, sub), "own") for sub in task.eval_tasks]
    return [(lm_task_name(task.name, cfg.data) if suite_task(task.name) else
             f"bgpo_{task.name}" + ("" if cfg.data == "own" else f"_{cfg.data}"), task, cfg.data)]


def suite_task(name: str) -> bool:
    from bgpo.evaluation import suite_task as has_yaml

    return has_yaml(name)


def score(model: Any, task_cfg: DictConfig, source: str, cfg: DictConfig) -> tuple[dict[str, Any], dict]:
    """Accuracy, reward and n of one set, and what scored it (keys of the eval.json entry): lm-eval with
    the suite's task YAML
    (Countdown, Sudoku), else the suite's sampler and the task's own reward (as the trainer's
    ``bgpo.evaluation`` does for math, code and the other tasks)."""
    if suite_task(task_cfg.name):
        import lm_eval

        from bgpo.lm_eval_model import evaluate_suite_task
        from bgpo.lm_eval_tasks import lm_task_name

        res = evaluate_suite_task(model, task_cfg.name, task_cfg, cfg.n, source=source,
                                  batch_size=cfg.batch_size, steps=cfg.steps, temperature=cfg.temperature,
                                  log_samples=cfg.log_samples)
        return res, {"lm_eval_task": lm_task_name(task_cfg.name, source), "lm_eval": lm_eval.__version__}
    return sampled_scores(model, task_cfg, source, cfg.n, cfg.batch_size, cfg.steps, cfg.temperature,
                          cfg.log_samples), {"harness": "bgpo.sampler + the task's reward"}


def sampled_scores(model: Any, task_cfg: DictConfig, source: str, n: int | None, batch_size: int,
                   steps: int | None, temperature: float, log_samples: bool = False) -> dict[str, Any]:
    """``bgpo.rollout.evaluate`` with the sampler's ``steps`` and ``temperature`` open (seed 0):
    the first ``n`` problems of the task's test (or ``source="val"``: validation) set."""
    import torch

    from bgpo.sampler import SamplerConfig, generate
    from bgpo.tasks import get_task, prompt_text, task_scores

    task = get_task(task_cfg.name, **task_args(task_cfg))
    data = task.val_examples() if source == "val" else task.test_examples()
    data = data[:n] if n is not None else data
    sampler = SamplerConfig(task_cfg.gen_length, task_cfg.block_length, steps or task_cfg.gen_length,
                            temperature)
    device = next(model.net.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0) if temperature > 0 else None
    shots = task_cfg.get("shots", 0) or 0
    was_training = model.net.training
    model.net.eval()
    scores, texts = [], []
    try:
        for lo in range(0, len(data), batch_size):
            chunk = data[lo : lo + batch_size]
            ids, mask = model.encode_prompts([prompt_text(task, ex, task_cfg.format, shots) for ex in chunk])
            with torch.no_grad():
                decoded = model.decode_completions(generate(model, ids, mask, sampler, gen))
            scores += task_scores(task, chunk, decoded, task_cfg.format)
            texts += decoded
    finally:
        model.net.train(was_training)
    k = max(len(data), 1)
    out: dict[str, Any] = {"accuracy": sum(float(sc.correct) for sc in scores) / k,
                           "reward": sum(sc.reward for sc in scores) / k, "n": len(data)}
    if log_samples:
        out["completions"] = texts
    return out


# ---- the trained protocol: the task's format and lengths, from the export or the run -------------
def trained_protocol(checkpoint: Path) -> tuple[dict[str, Any] | None, list[str], Path] | None:
    """What the checkpoint's run recorded of its task protocol (``bgpo.export.task_protocol``: None
    for an export made before exports recorded it), the tasks it was trained for and the file that
    says so; None for a model of no known run."""
    from bgpo.export import SETTINGS, export_settings, task_protocol

    known = trained_tasks(checkpoint)
    if known is None:
        return None
    tasks, source = known
    if checkpoint.is_dir() and not trainer_checkpoint(checkpoint):
        protocol = export_settings(checkpoint).get("protocol")
        return (protocol if isinstance(protocol, dict) else None), tasks, checkpoint / SETTINGS
    task = stored_config(checkpoint.parent.parent, "cannot tell which task the run trained on").get("task")
    return task_protocol(task), tasks, source


def explicit_task_keys(cfg: DictConfig) -> set[str]:
    """The ``task.`` keys given explicitly: named in the command line's overrides (Hydra's, or a
    ``compose(..., return_hydra_config=True)`` config's), or holding another value than the task's
    YAML (``bgpo/conf/task/<name>.yaml``) gives them."""
    from hydra.core.hydra_config import HydraConfig

    from bgpo.export import PROTOCOL

    overrides: list[str] = []
    if "hydra" in cfg and OmegaConf.select(cfg, "hydra.overrides.task") is not None:
        overrides = list(cfg.hydra.overrides.task)
    elif HydraConfig.initialized():
        overrides = list(HydraConfig.get().overrides.task)
    keys = {o.split("=", 1)[0].lstrip("+~")[len("task."):] for o in overrides
            if o.split("=", 1)[0].lstrip("+~").startswith("task.")}
    yaml_file = Path(__file__).parent / "conf" / "task" / f"{cfg.task.name}.yaml"
    default = OmegaConf.merge(OmegaConf.structured(TaskConfig),
                              OmegaConf.load(yaml_file) if yaml_file.is_file() else {})
    keys |= {k for k in PROTOCOL if cfg.task.get(k) != default.get(k)}
    options, default_options = cfg.task.get("options") or {}, default.get("options") or {}
    keys |= {f"options.{k}" for k, v in options.items()
             if isinstance(v, (bool, int, float)) and (k not in default_options or default_options[k] != v)}
    return keys


def apply_protocol(cfg: DictConfig) -> dict[str, Any] | None:
    """Set ``cfg.task``'s format, lengths, shots and n_test (and, on the very task trained, its
    numeric options) to what the checkpoint's run used (``bgpo_export.json``'s ``protocol``, or a
    ``.pt``'s run ``config.yaml``) — an explicit ``task.<key>`` wins, with a warning — and say so in
    the log; returns what was applied and overridden (recorded in the eval.json entry). Nothing for
    a model of no known run, or on a task the run was not trained for (``task_mismatch=allow``)."""
    from bgpo.export import PROTOCOL

    path = Path(cfg.checkpoint).expanduser()
    if not (path.is_dir() or path.is_file() and path.suffix == ".pt"):
        return None  # validate_evaluate names it
    found = trained_protocol(path)
    if found is None:
        return None
    protocol, tasks, source = found
    if cfg.task.name not in tasks:
        log.info(f"[eval] {source} records the protocol of {' / '.join(tasks)}, not of task={cfg.task.name}: "
                 "the task config's format and lengths are used")
        return None
    if protocol is None:
        warn(f"{source} records no task protocol (an export made before bgpo.export recorded it): task "
             f"{cfg.task.name} is evaluated with the task config's format and lengths, which may not be the "
             "ones the policy was trained with")
        return None
    wanted = {k: protocol[k] for k in PROTOCOL if k in protocol}
    if cfg.task.name == tasks[0]:  # its own options (an eval task takes only the format and lengths)
        wanted.update({f"options.{k}": v for k, v in (protocol.get("options") or {}).items()})
    explicit = explicit_task_keys(cfg)
    applied, overridden = {}, {}
    for key, value in wanted.items():
        used = OmegaConf.select(cfg.task, key)
        if key in explicit and used != value:
            overridden[key] = {"trained": value, "used": used}
            continue
        if used != value:
            OmegaConf.update(cfg, f"task.{key}", value, force_add=True)
        applied[key] = value
    log.info(f"[eval] task {cfg.task.name} under the trained protocol from {source}: "
             + ", ".join(f"{k}={v}" for k, v in applied.items() if k not in overridden))
    for key, v in overridden.items():
        warn(f"task.{key}={v['used']} given explicitly overrides the trained {key}={v['trained']} "
             f"({source}): the score is not under the protocol the policy was trained with")
    return {"source": str(source), "applied": applied, "overridden": overridden}


def read_eval_json(path: Path) -> dict[str, Any]:
    """The results ``eval.json`` holds already (``{}`` when there is none); an unreadable one is
    :class:`UnreadableFile` (it is not overwritten: its results would be lost)."""
    if not path.is_file():
        return {}
    try:
        merged = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnreadableFile(f"{path} is unreadable ({reason(e)}): the result is not merged into it; move it "
                             "away or pass out=<another folder>") from None
    if not isinstance(merged, dict):
        raise UnreadableFile(f"{path} is not a JSON object: the result is not merged into it; move it away "
                             "or pass out=<another folder>")
    return merged


register()


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with cli_errors("bgpo.evaluate"):  # a bad setting: "bad setting: ..." and exit code 2
        try:
            run(cfg)  # validates every key first
        except (UnreadableFile, StoreMismatch, FileNotFoundError) as e:  # a file: one sentence, exit code 2
            print(f"[bgpo.evaluate] {' '.join(str(e).split())}", file=sys.stderr)
            raise SystemExit(2) from None


if __name__ == "__main__":
    main()
