"""Structured config schemas (Hydra ConfigStore), their resolvers, and the error of a bad setting.

A typo in a key or a wrong type fails when Hydra composes (the schemas below); values that are
well-typed but wrong fail in ``bgpo.validate`` before any model is built, with a
:class:`ConfigError` naming the key and what is allowed. The paper's numbers that configs
interpolate (``${paper_mc:...}``, ``${paper_task:...}``) live in ``bgpo.paper_settings``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from bgpo.paper_settings import equal_memory_mc, paper_mc, paper_task


@dataclass
class TaskConfig:
    name: str = "countdown"
    """registered task: countdown, sudoku, gsm8k, math500, humaneval, mbpp"""
    format: str = "compact"
    """prompt renderer: compact (tiny model) or d1 (LLaDA-class)"""
    test_file: str | None = None
    """evaluate on this file instead of the suite's own test set (e.g. d1's test sets)"""
    n_test: int | None = None
    """evaluate on the first/seeded n_test problems (None: the whole test set)"""
    gen_length: int = 16
    """completion length L, EOS padding included"""
    block_length: int = 8
    """semi-autoregressive block length; must divide gen_length"""
    diffusion_steps: int = 16
    """denoising steps per completion; a multiple of gen_length / block_length"""
    options: dict[str, Any] = field(default_factory=dict)
    """extra constructor arguments of the task (dataset paths...)"""
    shots: int = 0
    """the protocol's worked examples before each prompt (training problems; 0 = zero-shot, as BGPO
    and d1 evaluate): rollouts and every evaluation use the same prompt"""
    eval_tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """other registered tasks whose test sets the run reports instead of its own, each with its
    constructor options (``test_file``...), evaluated at the end with this task's format and lengths
    (BGPO §4: ONE math model, trained on MATH + GSM8K, tested on GSM8K and MATH500)"""
    pretrain_steps: int = 700
    """SFT steps of the tiny base model: stopped short of mastery so that RL has headroom"""
    sft_near_miss: float = 0.0
    """share of the tiny base model's SFT targets replaced by the task's near miss (``near_miss``:
    the solution with one systematic slip), so the base knows the answer but prefers the slip:
    a knowledgeable but blurred policy whose pass@G is far above its pass@1"""
    rl_lr: float = 1e-4
    """RL learning rate of the main job and the tiny presets on this task (``lr: ${task.rl_lr}``),
    chosen on validation runs; every method shares it"""


@dataclass
class LoraConf:
    enabled: bool = False
    r: int = 128
    alpha: int = 64
    dropout: float = 0.05


@dataclass
class ModelConfig:
    kind: str = "tiny"
    """tiny (embedded, CPU), llada, dream"""
    path: str | None = None
    """local folder or hub name; tiny: None = the task's base model named by ``base``"""
    base: str = "shipped"
    """tiny, with ``path`` unset: ``shipped`` (the repository's base model of the task, every file
    checked against its sha256 in bgpo/base_models/manifest.json; tasks without one use the cache)
    or ``cache`` ($BGPO_CACHE/tiny-<task>, pretrained there by bgpo.pretrain if missing)"""
    dtype: str = "float32"
    """storage dtype of the loaded weights (and so of gradients and AdamW state): float32,
    bfloat16, float64 (tests); it must suit ``precision``"""
    precision: str = "fp32"
    """fp32 (compute in model.dtype), bf16-mixed (float32 master weights and optimizer state,
    bfloat16 compute: torch.autocast, or FSDP2's MixedPrecisionPolicy with float32 gradient
    reduction; model.dtype float32) or bf16-pure (everything bfloat16: most small updates round
    away; for memory comparisons; model.dtype bfloat16)"""
    activation_checkpointing: bool = False
    """recompute each transformer block in the backward pass instead of storing its activations"""
    use_chat_template: bool = False
    mask_token_id: int | None = None
    remote_code: bool = False
    """llada/dream: load with the checkpoint's published modeling code (trust_remote_code, written
    for transformers 4.46; no KV cache) instead of the suite's native classes (bgpo.models)"""
    revision: str | None = None
    """hub branch, tag or commit of model.path (a hub name); part of the run key"""
    lora: LoraConf = field(default_factory=LoraConf)
    hidden: int = 192
    """tiny architecture: hidden size, layers, heads, MLP size"""
    layers: int = 6
    heads: int = 4
    intermediate: int = 512


@dataclass
class LoggerConf:
    """Metric trackers beside ``metrics.jsonl`` and the INFO lines of the job log (``bgpo.loggers``).
    How a run is observed is not what it computes: not part of the run key."""

    backends: list[str] = field(default_factory=list)
    """trackers, several at once: tensorboard (<run_dir>/tb/), wandb (<run_dir>/wandb/); [] = none"""
    log_every: int = 10
    """an INFO line (job log, console) every this many steps and at every evaluation; pretraining
    sends its loss (the mean over these steps) to the trackers this often"""
    project: str | None = None
    """W&B project (None: $WANDB_PROJECT, else bgpo)"""
    entity: str | None = None
    """W&B entity (team or user; None: $WANDB_ENTITY, else your default)"""
    wandb_mode: str | None = None
    """offline (nothing leaves the machine; `wandb sync` uploads later), online or disabled (None:
    $WANDB_MODE, else offline); the logs go to $WANDB_DIR when set, else the run folder"""


@dataclass
class PretrainConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0
    steps: int | None = None
    """optimizer steps of masked-diffusion SFT (default: task.pretrain_steps)"""
    batch_size: int = 128
    lr: float = 1e-3
    level: str = "time"
    """mask level of the SFT draws: time (t ~ U(0,1], weight 1/t: LLaDA's SFT) or count (L/l)"""
    n_train: int = 100_000
    """generated training problems (cycled)"""
    eval_n: int = 256
    out: str | None = None
    """output folder (default: $BGPO_CACHE/tiny-<task>)"""
    ship: bool = False
    """write the repository's shipped base model (bgpo/base_models/tiny-<task>) and its entry in
    bgpo/base_models/manifest.json (file hashes, command, measured time) instead of ``out``"""
    device: str = "auto"
    logger: LoggerConf = field(default_factory=LoggerConf)
    """trackers (logs in the output folder: tb/, wandb/)"""


@dataclass
class SamplerConf:
    """Rollout sampler of RL training (``sampler``), or of validation (``val_sampler``); the test
    sets always use the reference sampler."""

    mode: str = "reference"
    """reference (LLaDA's algorithm, bit for bit) or cached (KV cache + threshold decoding)"""
    threshold: float = 1.0
    """cached mode: also commit masked positions whose confidence exceeds this (1.0 = off)"""
    cache: str = "prefix"
    """cached mode: prefix, dual (also the masked suffix) or none (threshold decoding only)"""


@dataclass
class TrainConfig:
    method: Any = MISSING
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConf = field(default_factory=SamplerConf)
    val_sampler: SamplerConf = field(default_factory=SamplerConf)
    """sampler of the validation evaluations (checkpoint selection), one token per step: reference
    (default), or cached for speed at full scale (the test sets always use the reference)"""
    mc: int = 16
    """n_t: Monte Carlo samples of the ELBO per response"""
    seed: int = 0
    steps: int = 200
    """RL steps (rollout batches)"""
    prompts_per_step: int = 8
    group_size: int = 8
    """G: completions per prompt"""
    minibatches: int = 1
    """μ of BGPO §4's off-policy variant (bgpo, vrpo, tracerl, just_grpo): split each rollout batch into
    this many mini-batches of whole prompt groups, one optimizer step each, every sample used once,
    θ_old = the rollout policy (1 = on-policy)"""
    inner_updates: int = 1
    """μ of d1 (diffu_grpo, wd1, spg, espo, coupled_grpo): optimizer steps over the WHOLE rollout batch,
    each with a fresh prompt mask (1 = on-policy; d1 itself used 12 for math, 8 for planning)"""
    temperature: float = 0.6
    """rollout sampling temperature (evaluation is greedy)"""
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    eval_every: int = 20
    """evaluate the validation set every this many RL steps (0 = only at the end); the test sets are
    evaluated once, at the end, for the base, the validation-selected and the final policy"""
    eval_n: int = 256
    """validation problems per periodic evaluation (the first eval_n of the validation set)"""
    eval_test: bool = True
    """evaluate the test sets at the end (false: a search over settings on validation, which must
    never look at a test set; the run's tables then have no test cells)"""
    skip_flat_groups: bool = True
    """skip the ELBO passes of prompt groups whose rewards are all equal (A = 0) when the method's
    loss is zero there (BGPO, VRPO-OL without KL): the same gradient for less compute; metrics
    such as elbo/ell are then means over the groups that were scored. Never under parallel=fsdp"""
    test_n: int | None = None
    """evaluate only the first test_n problems of each test set (the smoke setting); None: all"""
    ckpt_every: int = 10
    shards: int | None = None
    """units of rollout randomness per step (default: the number of processes)"""
    parallel: str = "ddp"
    """multi-process layout: ddp (whole model per rank, one all-reduce per step) or fsdp (FSDP2)"""
    results_dir: str = "runs"
    """where run folders go: runs/ (git-ignored) unless a preset that makes committed results names
    results/<sweep> itself (sweeps/tiny_*.yaml, paper_*.yaml)"""
    run_dir: str | None = None
    """explicit run folder (default: results_dir/<method>-<task>-mc<mc>-s<seed>-<hash>)"""
    device: str = "auto"
    progress: bool = True
    threads: int = 0
    """torch threads of this process (0: torch's default); 1 for several runs at once on a small
    machine (hydra/launcher=local_parallel): two one-thread jobs beat one two-thread job on 2 cores"""
    logger: LoggerConf = field(default_factory=LoggerConf)
    """trackers (logs in the run folder: tb/, wandb/) and the job log's INFO lines"""
    validate_only: bool = False
    """run every start-up check, print "ok" and the run folder, exit without building a model"""
    retry_failed: bool = False
    """a run that stopped on a non-finite value (failed.json) is retried from its last good
    checkpoint only when this is true; otherwise it is reported and skipped"""


DATA_ENV = "BGPO_DATA"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def data_dir() -> Path:
    """Where users put the data files the suite cannot ship: ``$BGPO_DATA``, default
    ``~/.cache/bgpo/data`` (``$BGPO_CACHE/data``)."""
    from bgpo.model import cache_dir

    return Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else cache_dir() / "data"


def data_file(name: str, default: str | None = None) -> str | None:
    """``${bgpo_data:NAME[,DEFAULT]}``: ``NAME.jsonl`` (or .json, .parquet, .csv) in ``data_dir()``
    when it is there, else DEFAULT (a hub name, or None: the task's own default or error)."""
    for suffix in DATA_SUFFIXES:
        path = data_dir() / f"{name}{suffix}"
        if path.is_file():
            return str(path)
    return default


def register() -> None:
    for name, fn in (("paper_mc", paper_mc), ("paper_task", paper_task), ("equal_memory_mc", equal_memory_mc),
                     ("bgpo_data", data_file)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="pretrain_schema", node=PretrainConfig)


# ---------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A bad setting, found before any model is built; the message names the key."""


class ConfigWarning(UserWarning):
    """A legal setting that is very likely a mistake (e.g. greedy rollouts)."""


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
