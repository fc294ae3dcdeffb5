"""The RL trainer, written once for every method (docs/methods.md §3–§5).

    rollout → reward → advantages → method.prepare → (method.loss → backward) per chunk → all-reduce → step

Randomness is keyed by (seed, step, shard), never by process: the prompts of a step are cut into
``shards`` and each shard's rollouts and MC draws come from its own generator, so a run on N
processes (each taking shards round-robin) computes what one process computes, and a resumed run
repeats the steps it lost bit for bit. How gradients cross processes (``parallel=ddp``: one
all-reduce per optimizer step, bit-exact; ``parallel=fsdp``: sharded parameters) is
``bgpo.parallel``'s business; this loop is the same for both.

Nothing non-finite is stored (issue 15): the run stops at the first non-finite loss, gradient norm
(before the optimizer step) or parameter (after it) with :class:`NonFinite` naming the step and
the quantity; that step is neither logged nor checkpointed, so the last checkpoint is a good one.
Resume trusts nothing (``bgpo.checkpoints``): ``last``, then ``prev``, is used only if it loads,
has the checkpoint's fields, records this run's key (``bgpo.results.run_key``) and every step up to
it has a valid metrics row; otherwise the run restarts. A checkpoint recording ANOTHER run's key is
refused (``StoreMismatch``); a failure of the machine (out of memory, CUDA, I/O) while loading
stops every rank and sets nothing aside. Under ``parallel=fsdp`` checkpoints are sharded
(``last.dcp/``: each rank writes and reads only its shards, nothing is gathered).

Memory at full scale (issue 25): the end-of-run parameter fingerprint is summed from each rank's
shards, one parameter chunk at a time (``Dist.fingerprint``), never as a float64 copy of the model;
``mem/peak_bytes`` is the peak of its own step (the counter is reset as each step starts).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from bgpo.checkpoints import (
    existing,
    load_into,
    load_weights,
    path_of,
    resume_state,
    save_checkpoint,
    save_weights,
)
from bgpo.config import to_container
from bgpo.evaluation import SELECTION, best_row, better, evaluate_on, has_validation, test_sources
from bgpo.loggers import Tracker, nested
from bgpo.model import DLLM, apply_lora, apply_precision, enable_activation_checkpointing, load_dllm
from bgpo.parallel import Dist
from bgpo.provision import base_model_path, local_model_folder, pick_device
from bgpo.results import (
    atomic_write_json,
    provenance,
    read_metrics,
    run_key,
    set_aside,
    warn,
)
from bgpo.rollout import rollout
from bgpo.tasks import get_task
from bgpo.update import advantages, update
from bgpo.validate import build_method, task_args

log = logging.getLogger(__name__)


def shard_generator(seed: int, step: int, shard: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(hash((seed, step, shard)) % 2**62)


def model_folder(cfg: DictConfig) -> str:
    """The base model's folder or hub name (a tiny run's was provisioned by ``bgpo.train.run``)."""
    return str(base_model_path(cfg.task.name, cfg.model)) if cfg.model.kind == "tiny" else cfg.model.path


def load_policy(cfg: DictConfig, device: str, empty: bool = False) -> DLLM:
    """The policy to train; ``empty``: parameters on the meta device, for ``Dist.materialize``."""
    m = cfg.model
    policy = load_dllm(m.kind, model_folder(cfg), m.dtype, device, m.mask_token_id, m.use_chat_template,
                       m.remote_code, revision=m.get("revision"), empty=empty)
    if m.activation_checkpointing:  # before LoRA wraps the network
        enable_activation_checkpointing(policy.net)
    if m.lora.enabled:
        apply_lora(policy, m.lora.r, m.lora.alpha, m.lora.dropout)
    return policy


class Preempted(Exception):
    """Raised after a checkpoint when SIGUSR2/SIGTERM asked the run to stop (Slurm preemption)."""


class NonFinite(RuntimeError):
    """A non-finite loss, gradient norm or parameter at ``step``: the run stops before the step is
    logged or checkpointed (``checkpoint_step`` is the last good checkpoint, 0 = none)."""

    def __init__(self, step: int, quantity: str, value: float | str, checkpoint_step: int) -> None:
        super().__init__(f"non-finite {quantity} ({value}) at step {step}")
        self.step, self.quantity, self.value, self.checkpoint_step = step, quantity, value, checkpoint_step


@dataclass
class Run:
    """What the phases of one run share: its settings, processes, model, method, optimizer, and
    where it stands (the resume point, the last good checkpoint, the best validation row)."""

    cfg: DictConfig
    run_dir: Path
    dist: Dist
    task: Any
    policy: DLLM
    method: Any
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: Any
    key: str  # the run key, recorded in every checkpoint: never resumed by another run
    shards: int  # the prompts of a step are cut into this many shards, each with its own generator
    mu: int  # optimizer steps per rollout batch (BGPO §4's mini-batches or d1's inner updates)
    std_adv: bool
    skip_flat: bool  # skip groups whose advantages are all zero (exact; never under FSDP)
    start: int = 0
    saved: int = 0  # the step of the last good checkpoint
    resumed_at: list[int] = field(default_factory=list)
    commits: list[str] = field(default_factory=list)
    wall_before: float | None = 0.0  # seconds of the sittings before this one (None: not recorded)
    t_sitting: float = 0.0  # time.time() when this sitting's training began
    best: dict[str, Any] | None = None  # rank 0: the best validation row so far

    @property
    def device(self) -> str:
        return self.dist.device

    @property
    def ckpt(self) -> Path:
        """``last.pt``, or ``last.dcp`` (every rank's shards) under FSDP: ``bgpo.checkpoints``."""
        return path_of(self.run_dir / "checkpoints", "last", self.dist)

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run (or resume) one RL run in ``run_dir``; return its summary (written by the caller)."""
    run = build(cfg, run_dir)
    resume(run)
    train_data = run.task.train_examples(cfg.steps * cfg.prompts_per_step, cfg.seed)
    run.t_sitting = time.time()
    # trackers (TensorBoard, W&B) see every metrics row and the test sets; INFO lines go to the job log
    tracker = Tracker.open(cfg.logger, run_dir, to_container(cfg), run.start, cfg.steps, log) \
        if run.dist.rank == 0 else Tracker()
    with Preemption() as preemption:
        try:
            if run.start == 0:
                evaluate_base(run, tracker)
            for step in progress_bar(run):
                t0 = time.time()
                reset_peak(run.device)  # mem/peak_bytes: this step's peak, not the model load's
                prompts = train_data[step * cfg.prompts_per_step : (step + 1) * cfg.prompts_per_step]
                work, rewards, lengths, gen_s = rollouts(run, step, prompts)
                row = optimize(run, step, work, rewards, lengths)
                row.update({"time/step_s": time.time() - t0,
                            "time/tokens_per_s": sum(lengths) / max(gen_s, 1e-9),
                            "mem/peak_bytes": peak_bytes(run.device)})
                validate_and_select(run, step, row)
                if run.dist.rank == 0:
                    with open(run.metrics, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    tracker.log(row)
                checkpoint(run, step, preemption)
        except NonFinite:
            tracker.close()
            raise
    return finish(run, tracker)


def build(cfg: DictConfig, run_dir: Path) -> Run:
    """Processes, task, policy (and the frozen reference when β > 0), method and optimizer."""
    dist = Dist.from_env(pick_device(cfg.device), cfg.parallel)
    device = dist.device  # several GPU processes: each on its own cuda:<local rank>
    shards = cfg.shards or dist.world
    if cfg.prompts_per_step % shards or shards % dist.world:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of shards={shards}, "
                         f"itself a multiple of the {dist.world} processes")
    torch.manual_seed(cfg.seed)
    task = get_task(cfg.task.name, **task_args(cfg.task))
    # FSDP: built on the meta device, sharded, then each rank reads only its slices of the weights
    empty = dist.fsdp and not cfg.model.lora.enabled and not cfg.model.remote_code
    policy = load_policy(cfg, device, empty)
    # model.precision: bf16-mixed computes in bfloat16 over float32 weights (autocast, or FSDP's policy)
    compute = torch.bfloat16 if cfg.model.precision == "bf16-mixed" else None
    apply_precision(policy, cfg.model.precision, sharded=dist.fsdp)
    make_method = build_method(cfg)
    beta = getattr(make_method.keywords["cfg"], "beta", 0.0)
    ref = copy.deepcopy(policy).net.requires_grad_(False) if beta > 0 else None
    if ref is not None and compute is not None:
        ref.to(compute)  # the frozen reference needs no float32 master copy
    ref_model = DLLM(**{**policy.__dict__, "net": dist.shard(ref, compute, frozen=True)}) \
        if ref is not None else None
    folder = local_model_folder(model_folder(cfg), cfg.model.get("revision")) if empty else None
    if ref is not None and folder:
        dist.materialize(ref, folder)
    method = make_method(ref=ref_model)
    # exact compute saving (not under FSDP, where every rank must run the same backward passes)
    free = getattr(method, "flat_groups_free", lambda: False)()
    dist.shard(policy.net, compute)  # parallel=fsdp: sharded before the optimizer sees the parameters
    if folder:
        dist.materialize(policy.net, folder)
    params = [p for p in policy.net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    return Run(cfg, run_dir, dist, task, policy, method, params, opt, sched, key=run_key(to_container(cfg)),
               shards=shards, mu=cfg.minibatches * cfg.inner_updates,
               std_adv=make_method.keywords["cfg"].std_adv,
               skip_flat=cfg.skip_flat_groups and free and not dist.fsdp)


def resume(run: Run) -> None:
    """Model, optimizer, scheduler, RNG and step from the last good checkpoint (``resume_state``),
    and the commits the run was trained with so far (this one appended)."""
    commit = provenance(run.device)["commit"]
    state = resume_state(run.run_dir, run.cfg.steps, run.device, run.dist, run.key)
    if state is not None:
        load_into(state, run.dist, run.policy.net, run.opt)
        run.sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        run.start = run.saved = state["step"]
        run.resumed_at = [*state.get("resumed_at", []), run.start]
        run.commits = list(state.get("commits", []))
        run.wall_before = state.get("wall_s")  # None: a checkpoint written before it was recorded
        if run.commits and run.commits[-1] != commit and run.dist.rank == 0:
            warn(f"{run.run_dir}: resuming at step {run.start} with commit {commit}; the run was trained so "
                 f"far with commit {run.commits[-1]} (both are recorded in the summary's 'commits')")
    if not run.commits or run.commits[-1] != commit:
        run.commits.append(commit)
    if run.dist.rank == 0:  # resumed: the best validation row so far (rows as resume_state left them)
        rows = read_metrics(run.metrics)[0]
        run.best = best_row([rows[k] for k in sorted(rows)])


def evaluate_base(run: Run, tracker: Tracker) -> None:
    """The base model, once: validation (the step-0 row) and the test sets (``eval_test.json``)."""
    t0 = time.time()
    row0 = validation(run) if has_validation(run.task) else {}
    tests = test_sets(run.policy, run.task, run.cfg, run.dist)
    if run.dist.rank == 0:
        atomic_write_json(run.run_dir / "eval_test.json", {"base": tests})
        with open(run.metrics, "a") as f:
            row0 = {"step": 0, **prefixed(row0, "val/"), "time/step_s": time.time() - t0}
            f.write(json.dumps(row0) + "\n")
        tracker.log({**row0, **nested("test", tests)})


def progress_bar(run: Run) -> Any:
    from tqdm.auto import tqdm

    return tqdm(range(run.start, run.cfg.steps), desc=run.run_dir.name, initial=run.start,
                total=run.cfg.steps, disable=not run.cfg.progress or run.dist.rank != 0)


def rollouts(run: Run, step: int, prompts: list[Any]) -> tuple[list[tuple[Any, torch.Tensor, Any]],
                                                               list[float], list[int], float]:
    """This rank's shards of the step: rollout → reward → advantages → ``method.prepare`` (the MC
    draws, once per rollout batch, and θ_old / reference statistics), each from its shard's generator."""
    cfg, policy = run.cfg, run.policy
    policy.net.train()
    per_shard = cfg.prompts_per_step // run.shards
    work, rewards, lengths, gen_s = [], [], [], 0.0
    for s in range(run.dist.rank, run.shards, run.dist.world):
        g = shard_generator(cfg.seed, step, s, run.device)
        t_gen = time.time()
        with run.dist.full_params(policy.net):  # the method may ask for its rollout order (JustGRPO)
            ro = rollout(policy, run.task, prompts[s * per_shard : (s + 1) * per_shard], cfg.task,
                         cfg.group_size, cfg.temperature, g, fast=cfg.sampler,
                         order=getattr(run.method, "ROLLOUT_ORDER", "blocks"))
        gen_s += time.time() - t_gen
        adv = advantages(ro.rewards, cfg.group_size, run.std_adv).to(run.device)
        work.append((ro.batch, adv, run.method.prepare(policy, ro.batch, run.mu, g)))
        rewards += ro.rewards.tolist()
        lengths += (ro.batch.completion != policy.eos_token_id).sum(-1).tolist()
    return work, rewards, lengths, gen_s


def optimize(run: Run, step: int, work: list[Any], rewards: list[float],
             lengths: list[int]) -> dict[str, Any]:
    """μ optimizer steps on the rollout batch (``bgpo.update``), the non-finite checks of every rank
    (:class:`NonFinite`), and the step's metrics row (without its times and memory)."""
    cfg, dist = run.cfg, run.dist
    stats, norms, bad = update(run.method, run.policy, work, minibatches=cfg.minibatches, mu=run.mu,
                               skip_flat=run.skip_flat, shards=run.shards, dist=dist, params=run.params,
                               opt=run.opt, sched=run.sched, grad_clip=cfg.grad_clip)
    if bad is not None:
        raise NonFinite(step + 1, *bad, run.saved)
    grad_norm = sum(norms) / len(norms)
    rewards, lengths = dist.gather(rewards), dist.gather(lengths)
    # every rank computes the same number of shards; each checks its own parameters (shard)
    per_rank = dist.gather([(stats, first_non_finite(run.policy.net))])
    bad_param = next((name for _, name in per_rank if name), None)
    stats = {k: sum(r[k] for r, _ in per_rank) / len(per_rank) for k in stats}
    if bad_param or not math.isfinite(stats.get("loss", 0.0)):
        bad = (f"parameter {bad_param}", "nan/inf") if bad_param else ("loss", stats["loss"])
        raise NonFinite(step + 1, *bad, run.saved)
    r = torch.tensor(rewards).view(-1, cfg.group_size)
    return {"step": step + 1, "reward": r.mean().item(), "reward_std": r.std(-1).mean().item(),
            "frac_reward_zero_std": (r.std(-1) == 0).float().mean().item(),
            "completions/mean_length": sum(lengths) / len(lengths), "grad_norm": grad_norm,
            "lr": run.sched.get_last_lr()[0], **stats}


def validate_and_select(run: Run, step: int, row: dict[str, Any]) -> None:
    """Every ``eval_every`` steps and at the end: the validation row, and ``best.pt`` when it is the
    best so far (checkpoint selection sees validation only, never a test set)."""
    cfg = run.cfg
    if not has_validation(run.task) or not (cfg.eval_every and (step + 1) % cfg.eval_every == 0
                                            or step + 1 == cfg.steps):
        return
    row.update(prefixed(validation(run), "val/"))
    if run.dist.any(run.dist.rank == 0 and better(row, run.best)):
        run.best = row if run.dist.rank == 0 else None
        save_weights(path_of(run.run_dir / "checkpoints", "best", run.dist), run.dist, run.policy.net,
                     step + 1, run.key)


def checkpoint(run: Run, step: int, preemption: Preemption) -> None:
    """``last`` every ``ckpt_every`` steps, at the end, and when a signal asked the run to stop
    (every rank stops after the same step); then the signal is handed over."""
    stopping = run.dist.any(preemption.asked is not None)
    if (step + 1) % run.cfg.ckpt_every == 0 or step + 1 == run.cfg.steps or stopping:
        save_checkpoint(run.ckpt, run.dist, run.policy.net, run.opt, run.sched, step + 1, run.resumed_at,
                        run.commits, run.key, wall_so_far(run))
        run.saved = step + 1
    if stopping and step + 1 < run.cfg.steps:
        preemption.hand_over(f"stopped by signal after step {step + 1}; checkpoint in {run.ckpt}")


def finish(run: Run, tracker: Tracker) -> dict[str, Any]:
    """The parameter fingerprint, the test sets of the final and the validation-selected policy
    (``eval_test.json``), and the run's summary."""
    cfg, dist, policy = run.cfg, run.dist, run.policy
    # one fingerprint of the final parameters per rank (they must agree): from each rank's shards,
    # one parameter at a time (never the whole model in float64: 64 GB at 8B), summed over ranks
    fingerprint = dist.fingerprint(policy.net.parameters())
    tests = {"final": test_sets(policy, run.task, cfg, dist)}
    best_step = dist.gather([run.best["step"] if run.best else None])[0]
    if best_step is not None and best_step != cfg.steps:
        best = path_of(run.run_dir / "checkpoints", "best", dist)  # or the other format's (a resumed run
        best = best if best.exists() else next(iter(existing(best.parent, "best")), best)  # changed layout)
        if not load_weights(best, best_step, dist, policy.net, run.key):
            best_step = None  # unreadable: reported; the selected checkpoint's test result is lost
    if best_step is not None:
        tests["best"] = tests["final"] if best_step == cfg.steps else test_sets(policy, run.task, cfg, dist)
    if dist.rank == 0:
        out = run.run_dir / "eval_test.json"
        stored = read_json(out, "the base model's test results are missing from it")
        atomic_write_json(out, {**stored, **tests, "best_step": best_step, "selection": SELECTION})
        tracker.log({"step": cfg.steps, **nested("test", tests["final"]),
                     **nested("test_selected", tests.get("best", {}))})
    tracker.close()
    summarise = lambda t: {src: {k: v for k, v in r.items() if k != "per_problem"} for src, r in t.items()}  # noqa: E731
    return {"final": summarise(tests["final"]), "selected": summarise(tests.get("best", {})),
            "best_step": best_step, "selection": SELECTION, "steps": cfg.steps,
            "resumed_at": run.resumed_at, "commits": run.commits,
            "param_fingerprints": dist.gather([fingerprint]),
            "world_size": dist.world, "parallel": dist.strategy,
            "local_param_numel": dist.gather([sum(dist.local(p).numel() for p in policy.net.parameters())]),
            "wall_s_this_session": round(time.time() - run.t_sitting, 1),
            "wall_s_all_sittings": None if (wall := wall_so_far(run)) is None else round(wall, 1),
            **provenance(run.device)}


def wall_so_far(run: Run) -> float | None:
    """The run's wall seconds over all its sittings, each counted up to the checkpoint the next one
    resumed from (work redone after a stop is not counted); None when a checkpoint resumed from did
    not record it."""
    return None if run.wall_before is None else run.wall_before + time.time() - run.t_sitting


class Preemption:
    """Slurm asks a job to stop with SIGUSR2 (through submitit) or SIGTERM: the run finishes its
    step and checkpoints, then hands the signal to the handler that was there before (submitit's:
    requeue) or stops with :class:`Preempted`. The handlers are restored on leaving."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __enter__(self) -> Preemption:
        self.asked: tuple[int, Any] | None = None
        self.previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        for sig in self.SIGNALS:
            signal.signal(sig, self._ask)
        return self

    def _ask(self, signum: int, frame: Any) -> None:
        self.asked = (signum, frame)

    def __exit__(self, *exc: object) -> None:
        for sig, h in self.previous.items():
            signal.signal(sig, h)

    def hand_over(self, message: str) -> None:
        self.__exit__()
        handler = self.previous.get(self.asked[0]) if self.asked else None
        if callable(handler):
            handler(*self.asked)  # submitit: checkpoint() + requeue + exit
        raise Preempted(message)


def prefixed(out: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in out.items() if k != "per_problem"}


def evaluation(policy: DLLM, task: Any, cfg: DictConfig, dist: Dist, source: str, n: int | None = None,
               per_problem: bool = False, fast: Any = None) -> dict[str, Any]:
    """Greedy evaluation over every rank (each a slice of the problems, gathered; an lm-eval suite
    task on rank 0 alone), the result on rank 0 (the others get ``{}``): ``source`` = ``val`` |
    ``own`` | ``d1`` (``bgpo.evaluation``). Every rank calls it (under FSDP the parameters are
    gathered first)."""
    with dist.full_params(policy.net):
        out = evaluate_on(policy, task, cfg.task, source, n, per_problem, dist=dist, fast=fast)
    return out if dist.rank == 0 else {}


def validation(run: Run) -> dict[str, Any]:
    """The validation set's numbers (on rank 0), decoded by ``val_sampler`` (default: the reference)."""
    fast = run.cfg.val_sampler if run.cfg.val_sampler.mode != "reference" else None
    return evaluation(run.policy, run.task, run.cfg, run.dist, "val", run.cfg.eval_n, fast=fast)


def test_sets(policy: DLLM, task: Any, cfg: DictConfig, dist: Dist) -> dict[str, Any]:
    """Every test set of the run (``bgpo.evaluation.test_sources``), per problem; none when
    ``eval_test=false`` (a search over settings on validation, which must not see the test sets)."""
    if not cfg.eval_test:
        return {}
    return {src: evaluation(policy, task, cfg, dist, src, cfg.get("test_n"), per_problem=True)
            for src in test_sources(cfg.task)}


def read_json(path: Path, consequence: str) -> dict[str, Any]:
    """A JSON object the run wrote earlier; a missing or corrupt one is reported (and set aside)."""
    try:
        obj = json.loads(path.read_text())
        if isinstance(obj, dict):
            return obj
        raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        if path.exists():
            set_aside(path, f"unreadable ({type(e).__name__}); {consequence}")
        else:
            warn(f"{path} is missing: {consequence}")
        return {}


@torch.no_grad()
def first_non_finite(net: torch.nn.Module) -> str | None:
    """Name of the first trained parameter (this rank's shard) holding a NaN or inf; one sync."""
    params = [(n, p.to_local() if hasattr(p, "to_local") else p) for n, p in net.named_parameters()
              if p.requires_grad]
    if not params or torch.stack([torch.isfinite(p).all() for _, p in params]).all():
        return None
    return next(n for n, p in params if not torch.isfinite(p).all())


def reset_peak(device: str) -> None:
    """Start a new peak for ``peak_bytes`` (called at the start of every RL step): on CUDA the
    allocator's peak (``torch.cuda.reset_peak_memory_stats``); on CPU the kernel's resident-set
    high-water mark (Linux: ``/proc/self/clear_refs``; where it cannot be reset, ``peak_bytes``
    stays the process's peak so far)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_bytes(device: str) -> int:
    """Peak memory since the last ``reset_peak``: CUDA tensors allocated on ``device``; on CPU the
    resident set (``VmHWM``; ``ru_maxrss``, the whole process's peak, where /proc has none)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        line = next(ln for ln in status if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
