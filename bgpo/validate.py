"""Start-up validation: every setting checked before a model is built.

Values that are well-typed but wrong (unknown task, gen_length not a multiple of block_length, mc = 0,
lr = nan, a test file with a bad row...) fail in ``validate_train`` / ``validate_pretrain`` with a
:class:`bgpo.config.ConfigError` naming the key and what is allowed. The entry points turn it
into one sentence on stderr and exit code 2 (:func:`cli_errors`), without a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import types
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bgpo.config import ConfigError, ConfigWarning, ModelConfig, PretrainConfig, TaskConfig, TrainConfig


@contextlib.contextmanager
def as_config_error() -> Iterator[None]:
    """Inside validation: a ValueError (or an interpolation / instantiation error) is a bad setting."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except ConfigError:
        raise
    except (ValueError, OmegaConfBaseException) as e:
        raise ConfigError(" ".join(str(e).split())) from None


@contextlib.contextmanager
def cli_errors(prog: str) -> Iterator[None]:
    """Entry points (``bgpo.train``, ``bgpo.sweep``, ``bgpo.evaluate``, ``bgpo.pretrain``): a bad
    setting is ONE sentence on stderr and exit code 2 — no traceback (Hydra only prints one for
    exceptions; SystemExit passes through it)."""
    try:
        yield
    except ConfigError as e:
        print(f"[{prog}] bad setting: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def check_number(key: str, v: Any, *, gt: float | None = None, ge: float | None = None,
                 lt: float | None = None, le: float | None = None, why: str = "") -> None:
    """``key``'s value is a finite number within the bounds, else a ValueError naming the key."""
    bounds = [f"> {gt}" if gt is not None else "", f">= {ge}" if ge is not None else "",
              f"< {lt}" if lt is not None else "", f"<= {le}" if le is not None else ""]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
        (gt is None or v > gt) and (ge is None or v >= ge)) and (lt is None or v < lt) and (
        le is None or v <= le)
    if not ok:
        cond = " and ".join(b for b in bounds if b)
        raise ValueError(f"{key}={v!r} must be a finite number{' ' + cond if cond else ''}{why}")


def check_int(key: str, v: Any, lo: int, optional: bool = False, why: str = "",
              hi: int | None = None) -> None:
    """``key``'s value is an int ``>= lo`` (and ``<= hi``; or None when ``optional``)."""
    if v is None and optional:
        return
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{key}={v!r} must be an integer >= {lo}{why}")
    if v < lo:
        raise ValueError(f"{key}={v!r} must be >= {lo}{why}")
    if hi is not None and v > hi:
        raise ValueError(f"{key}={v!r} must be <= {hi}{why}")


SEED_MAX = 2**63 - 1
"""the largest seed: torch keeps seeds as 64-bit integers (``torch.manual_seed``)"""
LR_MAX = 1.0
"""the largest learning rate: an AdamW step moves every weight by about lr, and the weights of the
models here are O(0.01–1), so lr >= 1 wrecks them in one step (finite, but meaningless)"""


def check_keys(cfg: Any, schema: Any, prefix: str = "") -> None:
    """Every key of ``cfg`` is a field of the dataclass ``schema`` (recursively): ``+foo=1`` adds a key
    Hydra accepts but nothing reads — it would enter the run key while changing nothing. Free-form
    dicts (``task.options``, ``task.eval_tasks``) and ``method`` (checked by its own dataclass) are
    not walked."""
    if not isinstance(cfg, DictConfig):
        return
    hints = typing.get_type_hints(schema)
    fields = {f.name for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in fields:
            import difflib

            near = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
            raise ValueError(f"{name} is not a setting{hint}; the settings here: {sorted(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            check_keys(cfg._get_node(key), tp, f"{name}.")
    if "method" in fields and isinstance(cfg.get("method"), DictConfig):
        extra = sorted(set(cfg.method.keys()) - {"_target_", "_partial_", "cfg"})
        if extra:
            raise ValueError(f"method.{extra[0]} is not a setting; "
                             "the method's settings live under method.cfg")


def check_folder(key: str, value: str | None) -> None:
    """An output folder (``results_dir``, ``run_dir``, ``out``) is a folder or can be made one: not a
    file, and its first existing parent is a writable folder. Nothing is created here."""
    if not value:
        return
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{key}={value} is a file, not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{key}={value} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={value} cannot be {'written' if parent == path else 'created'}: "
                         f"no write permission in {parent}")


def check_device_here(key: str, name: str) -> None:
    """The device exists on THIS machine (where the run executes; not on a sweep's login node)."""
    import torch

    if name == "auto" or name == "cpu":
        return
    dev = torch.device(name)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{key}={name}: no CUDA device on this machine (use device=auto or cpu)")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{key}={name}: this machine has {count} CUDA device(s), indices 0..{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{key}={name}: MPS is not available on this machine (use device=auto or cpu)")


def check_device(key: str, name: str) -> None:
    """``auto`` or a device torch can parse (``cpu``, ``cuda``, ``cuda:1``...); availability is
    checked where the run executes (a sweep is validated on a login node without GPUs)."""
    if name == "auto":
        return
    import torch

    try:
        kind = torch.device(name).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{key}={name!r} is not a device: use auto, cpu, cuda, cuda:<index> or mps")


def check_types(obj: Any, prefix: str) -> None:
    """Check a (nested) dataclass instance's field values against its annotations."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        val, tp, key = getattr(obj, f.name), hints[f.name], f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(val):
            check_types(val, key)
        elif not _matches(val, tp):
            raise ValueError(f"{key}={val!r} is not of type {tp}")


def _matches(val: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return val in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(val, a) for a in typing.get_args(tp))
    if tp is type(None):
        return val is None
    if tp is float:
        return isinstance(val, (int, float)) and not isinstance(val, bool)
    if tp is int:
        return isinstance(val, int) and not isinstance(val, bool)
    if isinstance(tp, type):
        return isinstance(val, tp)
    return True


def validate_task(task: TaskConfig | DictConfig) -> None:
    """Task keys: name, format, the sampler schedule, sizes, options, and the test file (exists,
    parses, every row valid; the first bad row named ``file:line``)."""
    from bgpo.sampler import validate_schedule
    from bgpo.tasks import check_task_data, get_task, task_names
    from bgpo.tasks.data import check_test_rows

    if task.name not in task_names():
        raise ValueError(f"task.name={task.name!r} is not a registered task; allowed: {task_names()}")
    if task.format not in ("compact", "d1"):
        raise ValueError(f"task.format={task.format!r} is not one of ['compact', 'd1']")
    try:
        validate_schedule(task.gen_length, task.block_length, task.diffusion_steps)
    except ValueError as e:  # name the keys as the user writes them
        raise ValueError(str(e).replace("sampler.steps", "task.diffusion_steps")
                         .replace("sampler.", "task.")) from None
    for name in getattr(task, "eval_tasks", None) or {}:
        if name not in task_names():
            raise ValueError(f"task.eval_tasks.{name} is not a registered task; allowed: {task_names()}")
    check_int("task.n_test", task.n_test, 1, optional=True)
    check_int("task.pretrain_steps", task.pretrain_steps, 1)
    check_int("task.shots", task.shots, 0)
    check_number("task.rl_lr", task.rl_lr, gt=0)
    check_number("task.sft_near_miss", task.sft_near_miss, ge=0, le=1)
    try:  # option names, and the data files exist (never a hub request)
        check_task_data(task.name, task.test_file, task.options)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    try:  # constructors only store their arguments: cheap, and they reject what they do not take
        get_task(task.name, **task_args(task))
    except TypeError as e:
        m = re.search(r"keyword argument '(\w+)'", str(e))
        name = m.group(1) if m else "?"
        key = f"task.{name}" if name in ("test_file", "n_test") else f"task.options.{name}"
        raise ValueError(f"{key}: task {task.name!r} takes no such setting ({e})") from None
    try:
        check_test_rows(task.name, task.test_file, task.n_test, dict(task.options or {}), task.format)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None


def task_args(task: TaskConfig | DictConfig) -> dict[str, Any]:
    """The task constructor's arguments (``test_file`` only when set: not every task reads files)."""
    return {**({"test_file": task.test_file} if task.test_file else {}), "n_test": task.n_test,
            **(task.options or {})}


_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")  # org/name, as the Hugging Face hub spells models


def validate_model(model: ModelConfig | DictConfig) -> None:
    from bgpo.model import _DTYPES, KINDS, check_precision

    if model.kind not in KINDS:
        raise ValueError(f"model.kind={model.kind!r} is not one of {list(KINDS)}")
    if model.dtype not in _DTYPES:
        raise ValueError(f"model.dtype={model.dtype!r} is not one of {list(_DTYPES)}")
    check_precision(getattr(model, "precision", "fp32"), model.dtype)
    if model.kind != "tiny" and not model.path:
        raise ValueError(f"model.path must name a checkpoint for model.kind={model.kind!r}")
    from bgpo.provision import BASES

    if getattr(model, "base", "shipped") not in BASES:
        raise ValueError(f"model.base={model.base!r} is not one of {list(BASES)}")
    check_int("model.mask_token_id", model.mask_token_id, 0, optional=True)
    for key in ("hidden", "layers", "heads", "intermediate"):
        check_int(f"model.{key}", getattr(model, key), 1)
    if model.hidden % model.heads:
        raise ValueError(f"model.heads={model.heads} must divide model.hidden={model.hidden}")
    if model.lora.enabled:
        check_int("model.lora.r", model.lora.r, 1)
        check_number("model.lora.alpha", model.lora.alpha, gt=0)
        check_number("model.lora.dropout", model.lora.dropout, ge=0, lt=1)


def check_model_path(model: ModelConfig | DictConfig) -> None:
    """A local ``model.path`` must be a folder (its weights are hashed into the run key before any
    model is built: ``bgpo.results.folder_hash``); ``org/name`` not on disk is a hub name. Checked
    last, so that a run with several bad settings reports the values first."""
    if not model.path:
        return
    if Path(model.path).expanduser().is_dir():
        return
    if model.kind == "tiny" or not _HUB_NAME.match(str(model.path)):
        raise ValueError(f"model.path={model.path}: no such model folder"
                         + ("" if model.kind == "tiny" else " (nor a hub name org/name)"))


def build_method(cfg: DictConfig) -> Any:
    """Instantiate the method's partial (its dataclass config is built and type-checked here)."""
    from hydra.utils import instantiate

    if "_target_" not in cfg.method:
        raise ValueError("method: choose one of bgpo, vrpo, diffu_grpo, wd1, spg, espo, coupled_grpo, "
                         "tracerl, just_grpo (method=<name>)")
    from hydra.errors import InstantiationException

    try:
        partial = instantiate(cfg.method)
    except InstantiationException as e:  # a config's own check: keep its message, naming the key
        raise ValueError(f"method.cfg: {e.__cause__ or e}") from None
    check_types(partial.keywords["cfg"], "method.cfg")
    return partial


def validate_train(cfg: DictConfig, here: bool = True) -> None:
    """Everything that can be checked before a model is built (issue 15): the range of every
    numeric key, the task (and its data files), the model keys, the method config, and how they
    fit together. Raises :class:`ConfigError` naming the first bad key. ``here``: the run executes
    on this machine, so its device must exist here (false for a sweep validated on a login node).
    ``validate_only=true`` runs exactly this, as a real start does."""
    with as_config_error():
        _validate_train(cfg)
        if here:
            check_device_here("device", cfg.device)


def _validate_train(cfg: DictConfig) -> None:
    check_keys(cfg, TrainConfig)
    for key, lo in (("mc", 1), ("steps", 1), ("prompts_per_step", 1), ("group_size", 1), ("minibatches", 1),
                    ("inner_updates", 1), ("eval_n", 1), ("ckpt_every", 1), ("eval_every", 0),
                    ("warmup_steps", 0), ("threads", 0)):
        check_int(key, getattr(cfg, key), lo)
    check_int("seed", cfg.seed, 0, hi=SEED_MAX)
    check_int("shards", cfg.shards, 1, optional=True)
    check_int("test_n", cfg.test_n, 1, optional=True)
    if cfg.shards and cfg.prompts_per_step % cfg.shards:
        raise ValueError(f"shards={cfg.shards} must divide prompts_per_step={cfg.prompts_per_step}")
    check_number("lr", cfg.lr, gt=0, lt=LR_MAX, why=" (an AdamW step moves each weight by about lr)")
    check_number("weight_decay", cfg.weight_decay, ge=0)
    if cfg.lr * cfg.weight_decay >= 1:
        raise ValueError(f"weight_decay={cfg.weight_decay} with lr={cfg.lr}: lr·weight_decay must be < 1 "
                         "(AdamW multiplies every weight by 1 − lr·weight_decay each step)")
    check_number("adam_beta2", cfg.adam_beta2, ge=0, lt=1)
    check_number("grad_clip", cfg.grad_clip, gt=0,
                 why=" (the max gradient norm: <= 0 zeroes or reverses every update; use a large value "
                     "to clip nothing)")
    check_number("temperature", cfg.temperature, ge=0)
    if not cfg.results_dir:
        raise ValueError("results_dir must name a folder")
    check_folder("results_dir", cfg.results_dir)
    check_folder("run_dir", cfg.run_dir)
    check_device("device", cfg.device)
    validate_task(cfg.task)
    validate_model(cfg.model)
    from bgpo.sampler import validate_mode

    validate_mode(cfg.sampler.mode, cfg.sampler.threshold, cfg.sampler.cache)
    try:
        validate_mode(cfg.val_sampler.mode, cfg.val_sampler.threshold, cfg.val_sampler.cache)
    except ValueError as e:
        raise ValueError(str(e).replace("sampler.", "val_sampler.")) from None
    from bgpo.loggers import validate as validate_logger

    validate_logger(cfg.logger)
    from bgpo.parallel import pg_timeout

    pg_timeout()  # $BGPO_DIST_TIMEOUT_S, read when the process group starts: checked at start-up
    from bgpo.parallel import STRATEGIES

    if cfg.parallel not in STRATEGIES:
        raise ValueError(f"parallel={cfg.parallel!r} is not one of {list(STRATEGIES)}")
    method = build_method(cfg)
    validate_updates(cfg, method)
    exact_at = getattr(method.func, "ROLLOUT_TEMPERATURE", None)  # bgpo.method: JustGRPO, TraceRL
    if exact_at is not None and cfg.temperature != exact_at:
        name = str(cfg.method._target_).split(".")[-1]
        raise ValueError(f"temperature={cfg.temperature}: {name}'s likelihood is the rollout sampler's "
                         f"distribution only at temperature {exact_at}; set temperature={exact_at}")
    if cfg.group_size < 2:
        std = method.keywords["cfg"].std_adv
        raise ValueError(f"group_size={cfg.group_size} must be >= 2: group advantages r − mean_G r are 0 "
                         "with one completion per prompt" + (" and the group std is NaN" if std else ""))
    if cfg.temperature == 0:
        warnings.warn("temperature=0: greedy rollouts give the G completions of a prompt identical — zero "
                      "advantages, no learning signal (evaluation is greedy anyway)", ConfigWarning,
                      stacklevel=3)
    check_model_path(cfg.model)
    check_base_model(cfg.task.name, cfg.model)
    check_model_architecture(cfg.task.name, cfg.model)


def check_base_model(task_name: str, model: ModelConfig | DictConfig) -> None:
    """The tiny base model a run starts from is the task's: a shipped one passes its sha256 check,
    a folder made by bgpo.pretrain was made for this task (before any model is built)."""
    if model.kind != "tiny":
        return
    from bgpo.provision import base_model_path, check_base_task
    from bgpo.tasks.base import _REGISTRY

    folder = base_model_path(task_name, model)  # the shipped model's files are checked here
    # a task that declares ANY_BASE_MODEL (bgpo.api: prompts + reward functions) starts from any model
    anything = getattr(_REGISTRY.get(task_name), "ANY_BASE_MODEL", False)
    if folder is not None and folder.is_dir() and not anything:
        check_base_task(folder, task_name)


def base_architecture(task_name: str, model: ModelConfig | DictConfig) -> dict[str, int]:
    """A tiny run's architecture keys as its existing base model folder has them (``{}`` when it
    is not built yet): the run's config.yaml then records the model that is really trained."""
    import json

    from bgpo.provision import base_model_path

    folder = base_model_path(task_name, model) if model.kind == "tiny" else None
    if folder is None or not (folder / "config.json").is_file():
        return {}
    conf = json.loads((folder / "config.json").read_text())  # checked by check_model_architecture
    return {key: conf[name] for key, name in TINY_ARCH.items() if isinstance(conf.get(name), int)}


TINY_ARCH = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
             "intermediate": "intermediate_size"}
"""model.<key> of the tiny architecture -> its name in the checkpoint's config.json"""


def check_model_architecture(task_name: str, model: ModelConfig | DictConfig) -> None:
    """The architecture keys describe the model that will really be trained: for a tiny run that
    starts from an existing folder (shipped, cached or ``model.path``) a value set away from the
    default must equal its config.json (else the run key would name a model that is not the one
    trained; defaults take the folder's values: :func:`base_architecture`); for llada/dream they
    do not apply. ``model.mask_token_id`` lies within the vocabulary."""
    import json

    from bgpo.provision import base_model_path

    defaults = ModelConfig()
    if model.kind != "tiny":
        for key in TINY_ARCH:
            if getattr(model, key) != getattr(defaults, key):
                raise ValueError(f"model.{key}={getattr(model, key)} applies to model.kind=tiny only; the "
                                 f"{model.kind} checkpoint's config.json fixes its architecture")
    folder = base_model_path(task_name, model)
    if folder is None and model.path and Path(model.path).expanduser().is_dir():
        folder = Path(model.path).expanduser()
    conf_file = folder / "config.json" if folder is not None else None
    vocab: int | None = None
    if conf_file is not None and conf_file.is_file():
        try:
            conf = json.loads(conf_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{conf_file} cannot be read as JSON ({e})") from None
        if not isinstance(conf, dict):
            raise ValueError(f"{conf_file} is not a JSON object")
        if model.kind == "tiny":
            for key, name in TINY_ARCH.items():
                if name in conf and conf[name] != getattr(model, key) != getattr(defaults, key):
                    raise ValueError(f"model.{key}={getattr(model, key)}, but the base model {folder} has "
                                     f"{name}={conf[name]}: a tiny run trains its base model's architecture "
                                     f"(drop model.{key}, or pretrain a base with it: model.base=cache or "
                                     "model.path=<folder>)")
        vocab = conf.get("vocab_size") if isinstance(conf.get("vocab_size"), int) else None
    elif model.kind == "tiny":
        from bgpo.model import build_char_tokenizer

        vocab = len(build_char_tokenizer())
    if vocab is not None and model.mask_token_id is not None and model.mask_token_id >= vocab:
        raise ValueError(f"model.mask_token_id={model.mask_token_id} is outside the vocabulary "
                         f"(vocab_size={vocab}: ids 0..{vocab - 1})")


def validate_pretrain(cfg: PretrainConfig | DictConfig) -> None:
    """``python -m bgpo.pretrain``'s keys, before a model is built (:class:`ConfigError`)."""
    with as_config_error():
        check_keys(cfg, PretrainConfig)
        validate_task(cfg.task)
        validate_model(cfg.model)
        if cfg.level not in ("time", "count"):
            raise ValueError(f"level={cfg.level!r} is not one of ['time', 'count']")
        check_int("steps", cfg.steps, 1, optional=True)
        for key in ("batch_size", "n_train", "eval_n"):
            check_int(key, getattr(cfg, key), 1)
        check_int("seed", cfg.seed, 0, hi=SEED_MAX)
        check_number("lr", cfg.lr, gt=0, lt=LR_MAX, why=" (an AdamW step moves each weight by about lr)")
        check_device("device", cfg.device)
        check_device_here("device", cfg.device)
        check_folder("out", cfg.out)
        if cfg.model.kind == "tiny" and cfg.model.mask_token_id is not None:
            from bgpo.model import build_char_tokenizer

            vocab = len(build_char_tokenizer())
            if cfg.model.mask_token_id >= vocab:
                raise ValueError(f"model.mask_token_id={cfg.model.mask_token_id} is outside the tiny "
                                 f"vocabulary (ids 0..{vocab - 1})")
        if getattr(cfg, "ship", False) and cfg.out:
            raise ValueError(f"ship=true writes bgpo/base_models/tiny-{cfg.task.name}: drop out={cfg.out}")
        from bgpo.loggers import validate as validate_logger

        validate_logger(cfg.logger)


def validate_updates(cfg: DictConfig, method: Any) -> None:
    """The two meanings of μ > 1 (``bgpo.method``): each method takes the one of its paper; n_t
    is ``mc``; mini-batches cut a rollout shard into whole prompt groups."""
    cls, mcfg = method.func, method.keywords["cfg"]
    name = cls.__name__.lower()
    if mcfg.n_t != cfg.mc:
        raise ValueError(f"method.cfg.n_t={mcfg.n_t} differs from mc={cfg.mc}: set mc (the run folder, "
                         "summary and tables are keyed by it), not method.cfg.n_t")
    kind = cls.OFF_POLICY
    other = "inner_updates" if kind == "minibatches" else "minibatches"
    if getattr(cfg, other) > 1:
        raise ValueError(f"{other}={getattr(cfg, other)} does not apply to method {name}, whose μ > 1 means "
                         f"{kind} (bgpo.method: minibatches for bgpo/vrpo, inner_updates for d1-style "
                         "methods); use that key")
    shards = cfg.shards or int(os.environ.get("WORLD_SIZE", "1"))  # the trainer's default: one per process
    shard_prompts = cfg.prompts_per_step // shards
    if cfg.minibatches > 1 and shard_prompts % cfg.minibatches:
        raise ValueError(f"minibatches={cfg.minibatches} must divide the prompts of each rollout shard "
                         f"(prompts_per_step={cfg.prompts_per_step} / shards={shards})")
