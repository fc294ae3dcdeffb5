"""The RL trainer, written once for every method (SPEC §3–§4).

    rollout → reward → advantages → method.prepare → (method.loss → backward) per chunk → all-reduce → step

Randomness is keyed by (seed, step, shard), never by process: the prompts of a step are cut into
``shards`` and each shard's rollouts and MC draws come from its own generator, so a run on N
processes (each taking shards round-robin) computes what one process computes, and a resumed run
repeats the steps it lost bit for bit. How gradients cross processes (``parallel=ddp``: one
all-reduce per optimizer step, bit-exact; ``parallel=fsdp``: sharded parameters) is
``bgpo.parallel``'s business; this loop is the same for both.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import resource
import signal
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from bgpo.config import build_method, to_container
from bgpo.evaluation import SELECTION, best_row, better, evaluate_on, has_validation, test_sources
from bgpo.loggers import Tracker, nested
from bgpo.method import backward as method_backward
from bgpo.method import minibatch
from bgpo.model import DLLM, apply_lora, apply_precision, enable_activation_checkpointing, load_dllm
from bgpo.parallel import Dist
from bgpo.pretrain import ensure_base_model, pick_device
from bgpo.results import atomic_write_json, provenance
from bgpo.rollout import rollout
from bgpo.tasks import get_task

log = logging.getLogger(__name__)


def advantages(rewards: torch.Tensor, G: int, std_norm: bool) -> torch.Tensor:
    """Group advantages (SPEC §3): ``r − mean_G r``, divided by ``std_G r`` when ``std_norm``."""
    r = rewards.view(-1, G)  # [n_prompts, G]
    a = r - r.mean(-1, keepdim=True)
    if std_norm:
        a = a / (r.std(-1, keepdim=True) + 1e-4)
    return a.flatten()  # [B]


def shard_generator(seed: int, step: int, shard: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(hash((seed, step, shard)) % 2**62)


def load_policy(cfg: DictConfig, device: str) -> DLLM:
    m = cfg.model
    path = ensure_base_model(cfg.task, m) if m.kind == "tiny" else m.path
    policy = load_dllm(m.kind, path, m.dtype, device, m.mask_token_id, m.use_chat_template, m.remote_code)
    if m.activation_checkpointing:  # before LoRA wraps the network
        enable_activation_checkpointing(policy.net)
    if m.lora.enabled:
        apply_lora(policy, m.lora.r, m.lora.alpha, m.lora.dropout)
    return policy


class Preempted(Exception):
    """Raised after a checkpoint when SIGUSR2/SIGTERM asked the run to stop (Slurm preemption)."""


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run (or resume) one RL run in ``run_dir``; return its summary (written by the caller)."""
    dist = Dist.from_env(pick_device(cfg.device), cfg.parallel)
    device = dist.device  # several GPU processes: each on its own cuda:<local rank>
    shards = cfg.shards or dist.world
    if cfg.prompts_per_step % shards or shards % dist.world:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of shards={shards}, "
                         f"itself a multiple of the {dist.world} processes")
    torch.manual_seed(cfg.seed)
    task = get_task(cfg.task.name, test_file=cfg.task.test_file, n_test=cfg.task.n_test, **cfg.task.options)
    policy = load_policy(cfg, device)
    # model.precision: bf16-mixed computes in bfloat16 over float32 weights (autocast, or FSDP's policy)
    compute = torch.bfloat16 if cfg.model.precision == "bf16-mixed" else None
    apply_precision(policy, cfg.model.precision, sharded=dist.fsdp)
    make_method = build_method(cfg)
    beta = getattr(make_method.keywords["cfg"], "beta", 0.0)
    ref = copy.deepcopy(policy).net.requires_grad_(False) if beta > 0 else None
    if ref is not None and compute is not None:
        ref.to(compute)  # the frozen reference needs no float32 master copy
    ref_model = DLLM(**{**policy.__dict__, "net": dist.shard(ref, compute)}) if ref is not None else None
    method = make_method(ref=ref_model)
    std_adv = make_method.keywords["cfg"].std_adv
    mu = cfg.minibatches * cfg.inner_updates  # optimizer steps per rollout batch
    dist.shard(policy.net, compute)  # parallel=fsdp: sharded before the optimizer sees the parameters
    params = [p for p in policy.net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))

    ckpt, metrics_path = run_dir / "checkpoints" / "last.pt", run_dir / "metrics.jsonl"
    start, resumed_at = 0, []
    if ckpt.exists():  # resume: model, optimizer, scheduler, RNG, step
        state = torch.load(ckpt, map_location=device, weights_only=False, mmap=True)
        dist.load_state_dicts(policy.net, opt, state["model"], state["opt"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
        resumed_at = [*state.get("resumed_at", []), start]
    if dist.rank == 0:
        truncate_metrics(metrics_path, start)

    # Preemption (Slurm sends USR2 through submitit): finish the step, checkpoint, then hand the
    # signal to the handler that was there before (submitit's: requeue) or stop with Preempted.
    stop: dict[str, Any] = {}
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: stop.update(signum=signum, frame=frame))

    train_data = task.train_examples(cfg.steps * cfg.prompts_per_step, cfg.seed)
    per_shard = cfg.prompts_per_step // shards
    my_shards = list(range(dist.rank, shards, dist.world))
    t_run = time.time()
    from tqdm.auto import tqdm

    bar = tqdm(range(start, cfg.steps), desc=run_dir.name, disable=not cfg.progress or dist.rank != 0,
               initial=start, total=cfg.steps)
    # trackers (TensorBoard, W&B) see every metrics row and the test sets; INFO lines go to the job log
    tracker = Tracker.open(cfg.logger, run_dir, to_container(cfg), start, cfg.steps, log) if dist.rank == 0 \
        else Tracker()
    validate = has_validation(task)
    best = best_row(read_metrics(metrics_path)) if dist.rank == 0 else None  # resumed: best so far
    if start == 0:  # the base model: validation (the step-0 row) and the test sets, once
        t0 = time.time()
        row0 = evaluation(policy, task, cfg, dist, "val", cfg.eval_n) if validate else {}
        tests = test_sets(policy, task, cfg, dist)
        if dist.rank == 0:
            atomic_write_json(run_dir / "eval_test.json", {"base": tests})
            with open(metrics_path, "a") as f:
                row0 = {"step": 0, **prefixed(row0, "val/"), "time/step_s": time.time() - t0}
                f.write(json.dumps(row0) + "\n")
            tracker.log({**row0, **nested("test", tests)})  # the base model's test sets
    for step in bar:
        t0 = time.time()
        policy.net.train()
        step_prompts = train_data[step * cfg.prompts_per_step : (step + 1) * cfg.prompts_per_step]
        work, rewards, lengths, gen_s = [], [], [], 0.0
        for s in my_shards:
            g = shard_generator(cfg.seed, step, s, device)
            # rollout
            t_gen = time.time()
            with dist.full_params(policy.net):  # the method may ask for its rollout order (JustGRPO)
                ro = rollout(policy, task, step_prompts[s * per_shard : (s + 1) * per_shard], cfg.task,
                             cfg.group_size, cfg.temperature, g, fast=cfg.sampler,
                             order=getattr(method, "ROLLOUT_ORDER", "blocks"))
            gen_s += time.time() - t_gen
            # reward → advantages
            adv = advantages(ro.rewards, cfg.group_size, std_adv).to(device)
            # method.prepare: MC draws once per rollout batch, θ_old / reference statistics
            work.append((ro.batch, adv, method.prepare(policy, ro.batch, mu, g)))
            rewards += ro.rewards.tolist()
            lengths += (ro.batch.completion != policy.eos_token_id).sum(-1).tolist()
        # method.backward: μ optimizer steps per rollout batch (at most one of the two keys is > 1):
        # the paper's off-policy mini-batches (BGPO §4) or d1's inner iterations over the whole batch
        stats: dict[str, float] = {}
        norms = []
        for it in range(mu):
            grads = dist.grad_sum(params)  # zeroes p.grad
            for batch, adv, prep in work:
                if cfg.minibatches > 1:  # mini-batch `it`: its prompt groups, each sample used once
                    batch, adv, prep = minibatch(batch, adv, prep, it, cfg.minibatches)
                # the method returns each chunk's loss; backward per chunk (BGPO's memory floor)
                for k, v in method_backward(method, policy, batch, adv, prep, it).items():
                    stats[k] = stats.get(k, 0.0) + v / (len(work) * mu)
                grads.add_shard()
            grads.reduce(shards)  # mean over all shards of all processes, in p.grad
            norms.append(dist.grad_norm(params, cfg.grad_clip))
            opt.step()
            sched.step()
        grad_norm = sum(norms) / len(norms)
        rewards, lengths = dist.gather(rewards), dist.gather(lengths)
        per_rank = dist.gather([stats])  # every rank computes the same number of shards
        stats = {k: sum(r[k] for r in per_rank) / len(per_rank) for k in stats}
        r = torch.tensor(rewards).view(-1, cfg.group_size)
        row = {"step": step + 1, "reward": r.mean().item(), "reward_std": r.std(-1).mean().item(),
               "frac_reward_zero_std": (r.std(-1) == 0).float().mean().item(),
               "completions/mean_length": sum(lengths) / len(lengths), "grad_norm": grad_norm,
               "lr": sched.get_last_lr()[0], **stats, "time/step_s": time.time() - t0,
               "time/tokens_per_s": sum(lengths) / max(gen_s, 1e-9), "mem/peak_bytes": peak_bytes(device)}
        if validate and (cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            row.update(prefixed(evaluation(policy, task, cfg, dist, "val", cfg.eval_n), "val/"))
            if dist.any(dist.rank == 0 and better(row, best)):  # checkpoint selection: validation only
                best = row if dist.rank == 0 else None
                save_weights(run_dir / "checkpoints" / "best.pt", dist, policy, step + 1)
        if dist.rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            tracker.log(row)
        bar.set_postfix(reward=f"{row['reward']:.3f}")
        stopping = dist.any(bool(stop))  # every rank stops after the same step
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps or stopping:
            save_checkpoint(ckpt, dist, policy, opt, sched, step + 1, resumed_at)
        if stopping and step + 1 < cfg.steps:
            for sig, h in previous.items():
                signal.signal(sig, h)
            handler = previous.get(stop.get("signum"))
            if callable(handler):
                handler(stop["signum"], stop["frame"])  # submitit: checkpoint() + requeue + exit
            raise Preempted(f"stopped by signal after step {step + 1}; checkpoint in {ckpt}")
    for sig, h in previous.items():
        signal.signal(sig, h)
    with torch.no_grad():  # one fingerprint of the final parameters per rank: they must agree
        flat = torch.cat([dist.full(p).double().flatten() for p in policy.net.parameters()])
        fingerprint = [flat.sum().item(), flat.square().sum().item()]
    # the test sets, once each: the final policy, then the validation-selected checkpoint
    tests = {"final": test_sets(policy, task, cfg, dist)}
    best_step = dist.gather([best["step"] if best else None])[0]
    if best_step is not None:
        if best_step != cfg.steps:
            state = torch.load(run_dir / "checkpoints" / "best.pt", map_location=device, weights_only=False)
            dist.load_model_state_dict(policy.net, state["model"])
        tests["best"] = tests["final"] if best_step == cfg.steps else test_sets(policy, task, cfg, dist)
    if dist.rank == 0:
        stored = json.loads((run_dir / "eval_test.json").read_text())
        atomic_write_json(run_dir / "eval_test.json", {**stored, **tests, "best_step": best_step,
                                                       "selection": SELECTION})
        tracker.log({"step": cfg.steps, **nested("test", tests["final"]),
                     **nested("test_selected", tests.get("best", {}))})
    tracker.close()
    summarise = lambda t: {src: {k: v for k, v in r.items() if k != "per_problem"} for src, r in t.items()}  # noqa: E731
    return {"final": summarise(tests["final"]), "selected": summarise(tests.get("best", {})),
            "best_step": best_step, "selection": SELECTION, "steps": cfg.steps,
            "resumed_at": resumed_at, "param_fingerprints": dist.gather([fingerprint]),
            "world_size": dist.world, "parallel": dist.strategy,
            "local_param_numel": dist.gather([sum(dist.local(p).numel() for p in policy.net.parameters())]),
            "wall_s_this_session": round(time.time() - t_run, 1),
            **provenance(device)}


def prefixed(out: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in out.items() if k != "per_problem"}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def evaluation(policy: DLLM, task: Any, cfg: DictConfig, dist: Dist, source: str, n: int | None = None,
               per_problem: bool = False) -> dict[str, Any]:
    """Greedy evaluation on rank 0 (other ranks get ``{}``): ``source`` = ``val`` | ``own`` | ``d1``
    (``bgpo.evaluation``). Every rank calls it (under FSDP the parameters are gathered first)."""
    with dist.full_params(policy.net):
        if dist.rank != 0:
            return {}
        return evaluate_on(policy, task, cfg.task, source, n, per_problem)


def test_sets(policy: DLLM, task: Any, cfg: DictConfig, dist: Dist) -> dict[str, Any]:
    """Every test set of the run (``bgpo.evaluation.test_sources``), per problem; none when
    ``eval_test=false`` (a search over settings on validation, which must not see the test sets)."""
    if not cfg.eval_test:
        return {}
    return {src: evaluation(policy, task, cfg, dist, src, per_problem=True) for src in test_sources(cfg.task)}


def save_weights(path: Path, dist: Dist, policy: DLLM, step: int) -> None:
    """The model's full state (no optimizer), written atomically by rank 0; every rank calls it."""
    model = dist.model_state_dict(policy.net)
    if dist.rank != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "model": model}, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, dist: Dist, policy: DLLM, opt: torch.optim.Optimizer, sched: Any,
                    step: int, resumed_at: list[int]) -> None:
    """Model + optimizer (full state, keyed by parameter name), scheduler, RNG; written atomically
    by rank 0. Every rank calls it (under FSDP the state is gathered)."""
    model, optim = dist.state_dicts(policy.net, opt)
    if dist.rank != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "model": model, "opt": optim, "sched": sched.state_dict(),
                "rng": torch.get_rng_state(), "resumed_at": resumed_at}, tmp)
    os.replace(tmp, path)


def truncate_metrics(path: Path, start: int) -> None:
    """Keep only complete rows of steps ≤ start (a killed run may have written past its checkpoint);
    a run that starts from scratch starts a new file."""
    if not path.exists() or start == 0:
        path.unlink(missing_ok=True)
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by the kill
        if row["step"] <= start:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
