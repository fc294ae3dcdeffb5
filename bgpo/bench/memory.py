"""``python -m bgpo.bench memory``: peak memory and step time of one RL update against n_t (issue 5;
BGPO's Fig. 1 and its step-time comparison, docs/methods.md §5).

For every method (bgpo, vrpo, diffu_grpo, wd1 and the methods after BGPO: spg, espo, coupled_grpo,
tracerl, just_grpo; ``--methods``) and n_t, real training steps run on one fixed
synthetic rollout batch (``--prompts`` × ``--group`` completions of ``--gen-length`` tokens after a
``--prompt-length`` prompt, with a synthetic block-wise decoding trace for TraceRL):
``method.prepare`` + ``method.backward`` + grad-norm clip + AdamW
step, as the trainer does (methods built from ``conf/method/*.yaml`` with ``mc = n_t``). Recorded:

- ``saved_bytes``: peak bytes of activation storage held by autograd for backward (saved-tensor
  hooks; each storage counted once; parameters and buffers excluded). Deterministic on CPU: it
  is ``peak_bytes`` there;
- on CUDA: ``peak_bytes`` = ``torch.cuda.max_memory_allocated`` over the whole update (after
  ``reset_peak_memory_stats``; weights, gradients and optimizer state included),
  ``backward_peak_bytes`` over prepare + backward only, and ``static_bytes`` before the step;
- on CPU: ``rss_peak_bytes``, the peak RSS (``ru_maxrss``) of a FRESH process that builds the
  model and runs one update of that point only (forked from a forkserver that has imported the
  libraries and nothing else); ``rss_setup_bytes`` is its high-water mark before the update;
- the floor: one MC sample's forward + backward alone (``ℓ(j)`` for one j, ``.sum().backward()``),
  the limit BGPO should approach: ``floor_bytes`` (same measure as ``peak_bytes``; on CUDA
  compare it with ``backward_peak_bytes``), ``floor_rss_bytes``, ``floor_time_s``;
- ``step_time_s``: median over ``--repeats`` timed rounds after ``--warmup`` rounds, the points
  measured INTERLEAVED (every round visits every (method, n_t), alternating the order) so that
  load from other processes hits all methods alike; ``time_per_sample_s`` = step time / n_t;
  on BGPO rows ``step_time_ratio_vs_vrpo`` is the median over rounds of the paired ratio.

Defaults (CPU, tiny model): 4 prompts × G 8 = 32 sequences of 16 prompt + 16 completion tokens
(Countdown's training length), n_t ∈ {1, 2, 4, 8, 16, 32}, 1 warm-up + 5 timed rounds, one torch
thread (``--threads``: on a shared machine a thread team stalls whenever another process holds a
core). VRPO-OL at n_t = 32 then holds ~6 GB of activations.

CUDA runs catch out-of-memory (``oom: true``; larger n_t of that method are skipped). Rows go to
``<out>/memory-<device>-<model>[-<precision>][-ac].jsonl`` (atomically, with ``commit`` and the
regenerating ``cmd``), rewritten after every round: a run stopped early (``--budget-s``: no new
measurement starts after that many seconds; or killed) leaves the rows measured so far
(``rounds_done``, ``complete``).

Model options (issue 12): ``--arch llada8b`` is the suite's native ``LLaDAModelLM(LLaDAConfig())``
with random weights built on the device; ``--precision bf16-mixed`` keeps float32 weights and
computes under bfloat16 autocast (what ``sweeps/paper_main.yaml`` trains with; ``--dtype bfloat16``
alone is pure bf16); ``--activation-checkpointing`` recomputes each block in the backward pass
(rows say ``activation_checkpointing``; compare their ``floor_bytes`` with a run without it);
``--optimizer sgd`` replaces AdamW by plain SGD, which holds no state: one GPU cannot hold
LLaDA-8B's float32 weights, gradients AND AdamW moments (128 GB) — under FSDP over 8 GPUs they are
16 GB per GPU — while the activation memory this benchmark compares is the same.

    python -m bgpo.bench memory                                   # tiny model, CPU
    python -m bgpo.bench memory --activation-checkpointing        # the one-sample floor with it
    python -m bgpo.bench memory --device cuda --arch llada8b --precision bf16-mixed --optimizer sgd \\
        --methods bgpo,vrpo --prompts 1 --group 2 --prompt-length 128 --gen-length 512 --mcs 1,2,4,8,16,32
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import resource
import statistics
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bgpo import elbo
from bgpo.bench._common import (
    METHODS,
    BatchSpec,
    ModelSpec,
    bench_main,
    check_model_args,
    common_meta,
    count_params,
    ints,
    load_model,
    load_rows,
    make_ref,
    method_partial,
    model_spec,
    needs_ref,
    std_adv,
    strs,
    synthetic_batch,
    write_rows,
)
from bgpo.elbo import ELBOConfig
from bgpo.method import backward as method_backward
from bgpo.trainer import advantages

__all__ = ["SavedTensorMeter", "load_rows", "main", "saved_bytes_peak"]


# ---- the deterministic figure: bytes held by autograd -------------------------------------------
class _Held:
    __slots__ = ("t", "key", "meter")

    def __init__(self, t: Tensor, key: int | None, meter: SavedTensorMeter) -> None:
        self.t, self.key, self.meter = t, key, meter

    def __del__(self) -> None:
        if self.key is not None:
            self.meter._release(self.key)


class SavedTensorMeter:
    """Context manager: live and peak bytes of tensor storage saved by autograd for backward.

    Every storage is counted once however many saved tensors (views) refer to it, from the first
    save until the last saved reference is freed (the graph released by ``backward``). Storages
    of ``exclude`` (pass the parameters and buffers: they are resident anyway) are not counted.
    On CPU the figure is deterministic, unlike RSS or allocator statistics.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.skip = {t.untyped_storage()._cdata for t in exclude}  # the storage itself (fake ones too)
        self.live: dict[int, list[int]] = {}  # key -> [references, bytes]
        self.now = self.peak = 0
        self._ctx: Any = None

    def _pack(self, t: Tensor) -> _Held:
        try:
            st = t.untyped_storage()
            key, nbytes = st._cdata, st.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse & co: no storage; count the tensor
            key, nbytes = id(t), t.numel() * t.element_size()
        if key in self.skip or nbytes == 0:
            return _Held(t, None, self)
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [1, nbytes]
            self.now += nbytes
            self.peak = max(self.peak, self.now)
        else:
            entry[0] += 1
        return _Held(t, key, self)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[key]

    def __enter__(self) -> SavedTensorMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h.t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def saved_bytes_peak(fn: Callable[[], object], exclude: Iterable[Tensor] = ()) -> int:
    """Peak bytes held by autograd for backward while ``fn()`` runs (deterministic on CPU)."""
    with SavedTensorMeter(exclude) as meter:
        fn()
    return meter.peak


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ---- one process's model, optimizer and batch -----------------------------------------------------
class Rig:
    """The model under test, its AdamW, the reference (when a method needs one) and the batch."""

    def __init__(self, spec: ModelSpec, bspec: BatchSpec, lr: float, with_ref: bool,
                 optimizer: str = "adamw") -> None:
        self.device = spec.device
        self.policy = load_model(spec)
        self.params = [p for p in self.policy.net.parameters() if p.requires_grad]
        if optimizer == "sgd":  # no optimizer state (see the module docstring)
            self.opt: torch.optim.Optimizer = torch.optim.SGD(self.params, lr=lr)
        else:
            self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
        self.ref = make_ref(self.policy) if with_ref else None
        self.batch, self.rewards = synthetic_batch(self.policy, bspec)
        self.G = bspec.group
        self.static = [*self.policy.net.parameters(), *self.policy.net.buffers()]

    def build(self, partial: Any) -> tuple[Any, Tensor]:
        """The method instance (reference attached when β > 0) and its advantages."""
        impl = partial(ref=self.ref if needs_ref(partial) else None)
        adv = advantages(self.rewards, self.G, std_adv(partial)).to(self.device, torch.float32)
        return impl, adv

    def gen(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def update(self, impl: Any, adv: Tensor, seed: int, cuda: dict[str, int] | None = None) -> None:
        """One RL update as the trainer does it (one rollout batch, on-policy)."""
        self.opt.zero_grad(set_to_none=True)
        prep = impl.prepare(self.policy, self.batch, 1, self.gen(seed))
        method_backward(impl, self.policy, self.batch, adv, prep, 0)
        if cuda is not None:  # the backward peak, then the optimizer's
            cuda["backward_peak"] = torch.cuda.max_memory_allocated()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()

    def floor(self, seed: int, cuda: dict[str, int] | None = None) -> None:
        """One MC sample's forward + backward alone: the physical limit of a per-sample method."""
        self.opt.zero_grad(set_to_none=True)
        draws = elbo.draw(self.batch, ELBOConfig(), 1, self.policy.eos_token_id, self.gen(seed))
        elbo.ell(self.policy, self.batch, draws, slice(0, 1)).sum().backward()
        if cuda is not None:
            cuda["backward_peak"] = torch.cuda.max_memory_allocated()

    def run(self, impl: Any, adv: Tensor | None, seed: int, cuda: dict[str, int] | None = None) -> None:
        if impl is None:
            self.floor(seed, cuda)
        else:
            self.update(impl, adv, seed, cuda)


def _child(job: dict[str, Any]) -> dict[str, int]:
    """A fresh process: build everything, run ONE update of one point, report its peak RSS."""
    torch.set_num_threads(job["threads"])
    partial = job["partial"]
    with_ref = partial is not None and needs_ref(partial)
    rig = Rig(job["spec"], job["bspec"], job["lr"], with_ref, job["optimizer"])
    impl, adv = rig.build(partial) if partial is not None else (None, None)
    setup = maxrss_bytes()
    rig.run(impl, adv, job["seed"])
    return {"rss_setup_bytes": setup, "rss_peak_bytes": maxrss_bytes()}


# ---- the benchmark ------------------------------------------------------------------------------
@dataclass
class Point:
    method: str  # "floor": one MC sample's forward + backward
    mc: int
    partial: Any = None
    impl: Any = None
    adv: Tensor | None = None
    times: dict[int, float] = field(default_factory=dict)  # timed round -> seconds
    saved: int | None = None
    cuda_peak: int = 0
    cuda_backward_peak: int = 0
    cuda_static: int = 0
    oom: bool = False
    rss: dict[str, int] = field(default_factory=dict)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bgpo.bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", type=strs, default=list(METHODS), help="comma list of " + ",".join(METHODS))
    p.add_argument("--mcs", type=ints, default=ints("1,2,4,8,16,32"), help="n_t values")
    p.add_argument("--model", default="tiny", help="tiny (the shipped, else cached, base) or a folder")
    p.add_argument("--arch", default=None, help="random model: hidden=..,layers=..,heads=..,"
                   "intermediate=..,vocab=..[,kv_heads=..,tied=0|1] or 'llada8b'")
    p.add_argument("--name", default=None, help="model name in the results file name")
    p.add_argument("--task", default="countdown", help="whose cached tiny base model to use")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--precision", default=None,
                   help="fp32 | bf16-mixed (float32 weights, bfloat16 autocast) | bf16-pure "
                   "(default: from --dtype)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block in the backward pass "
                   "(model.activation_checkpointing)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="sgd: no optimizer state (an 8B model's float32 AdamW state does not fit one GPU)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new measurement after this many seconds (rows so far are kept)")
    p.add_argument("--device", default="auto")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument("--gen-length", type=int, default=16, help="L (Countdown's training length)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds (the first measures saved bytes)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--override", action="append", default=[],
                   help="Hydra override for the methods (method.cfg.mc_chunk=2; bgpo:method.cfg.beta=0.1 "
                   "for one method)")
    p.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: peak RSS of a fresh process per point")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the tiny model's ops gain nothing from more, and a thread team "
                   "stalls whenever another process holds a core; 0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    check_model_args(p, args)
    bad = sorted(set(args.methods) - set(METHODS))
    if bad or not args.methods:
        p.error(f"--methods: {bad} not in {list(METHODS)}")
    if not args.mcs or min(args.mcs) < 1:
        p.error("--mcs must be positive integers")
    if args.warmup < 1 or args.repeats < 1:
        p.error("--warmup and --repeats must be >= 1")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    return args


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _measure(rig: Rig, pt: Point, seed: int, round_: int, warmup: int) -> None:
    """One update of ``pt``: saved bytes on the first round, timed (and CUDA peaks) after warm-up."""
    import time

    cuda = rig.device.startswith("cuda")
    rig.opt.zero_grad(set_to_none=True)  # the previous point's gradients are not this one's memory
    if round_ == 0:
        with SavedTensorMeter(rig.static) as meter:
            rig.run(pt.impl, pt.adv, seed)
        pt.saved = meter.peak
        return
    stats: dict[str, int] | None = None
    if cuda and round_ >= warmup:
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        stats = {}
        t0 = time.perf_counter()
    else:
        t0 = time.perf_counter()
    rig.run(pt.impl, pt.adv, seed, stats)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if round_ >= warmup:
        pt.times[round_] = dt
        if stats is not None:
            pt.cuda_static = static
            pt.cuda_peak = max(pt.cuda_peak, torch.cuda.max_memory_allocated())
            pt.cuda_backward_peak = max(pt.cuda_backward_peak, stats["backward_peak"])


def _rss_points(points: list[Point], spec: ModelSpec, bspec: BatchSpec, lr: float, seed: int,
                bar: Any, optimizer: str = "adamw") -> None:
    """Peak RSS of one update per point, each in a fresh process (forkserver: imports only)."""
    from bgpo.bench import memory as this  # importable by name even when run as __main__

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["bgpo.bench.memory", "transformers.models.gemma3.modeling_gemma3"])
    for pt in points:
        job = {"spec": spec, "bspec": bspec, "lr": lr, "seed": seed, "threads": torch.get_num_threads(),
               "partial": pt.partial, "optimizer": optimizer}
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
            pt.rss = ex.submit(this._child, job).result()
        bar.update(1)


def _median(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return statistics.median(xs) if xs else None


def run(args: argparse.Namespace, cmd: str) -> tuple[Path, list[dict[str, Any]]]:
    import time

    from tqdm.auto import tqdm

    t_start = time.monotonic()
    spec = model_spec(args.model, args.arch, args.name, args.dtype, args.device, args.lora, args.seed,
                      args.task, args.precision, args.activation_checkpointing)
    bspec = BatchSpec(args.prompts, args.group, args.prompt_length, args.gen_length, args.seed)
    cuda = spec.device.startswith("cuda")
    floor = Point("floor", 1)
    points = [Point(m, n, partial=method_partial(m, n, args.override))
              for n in args.mcs for m in args.methods]
    rig = Rig(spec, bspec, args.lr, any(needs_ref(p.partial) for p in points), args.optimizer)
    for pt in points:
        pt.impl, pt.adv = rig.build(pt.partial)
    every = [floor, *points]
    do_rss = args.rss and not cuda
    rounds = args.warmup + args.repeats
    n_params, n_train = count_params(rig.policy)
    meta = {**common_meta(spec, cmd), "params": n_params, "trainable_params": n_train,
            "prompts": args.prompts, "group_size": args.group, "prompt_length": args.prompt_length,
            "gen_length": args.gen_length, "batch_sequences": args.prompts * args.group,
            "warmup": args.warmup, "repeats": args.repeats, "overrides": args.override,
            "optimizer": args.optimizer, "budget_s": args.budget_s}
    dev = "cuda" if cuda else spec.device
    suffix = ("-bf16-mixed" if spec.resolved_precision == "bf16-mixed" else "") + (
        "-ac" if spec.activation_checkpointing else "")
    path = Path(args.out) / f"memory-{dev}-{spec.name}{suffix}.jsonl"
    bar = tqdm(total=rounds * len(every) + (len(every) if do_rss else 0), disable=not args.progress,
               desc=f"memory {spec.name}")
    rounds_done, out_of_time = 0, False
    for r in range(rounds):
        for i, pt in enumerate(every if r % 2 == 0 else every[::-1]):  # interleaved, alternating
            if args.budget_s is not None and time.monotonic() - t_start > args.budget_s:
                out_of_time = True  # no new measurement starts; the rows so far are written below
                break
            bar.set_postfix_str(f"round {r} {pt.method} n_t={pt.mc}")
            if not pt.oom:
                try:
                    _measure(rig, pt, args.seed + 1000 * r + i, r, args.warmup)
                except torch.OutOfMemoryError:
                    for q in points:  # this method's larger n_t would not fit either
                        q.oom |= q.method == pt.method and q.mc >= pt.mc
                    rig.opt.zero_grad(set_to_none=True)
                    _free(spec.device)
            bar.update(1)
        if out_of_time:
            break
        rounds_done = r + 1
        write_rows(path, _rows(points, floor, meta, cuda, rounds_done, complete=False))  # partial results
    if do_rss and not out_of_time:
        bar.set_postfix_str("peak RSS (fresh processes)")
        _rss_points(every, spec, bspec, args.lr, args.seed, bar, args.optimizer)
    bar.close()
    rows = _rows(points, floor, meta, cuda, rounds_done, complete=not out_of_time)
    write_rows(path, rows)
    return path, rows


def _rows(points: list[Point], floor: Point, meta: dict[str, Any], cuda: bool, rounds_done: int,
          complete: bool) -> list[dict[str, Any]]:
    """One row per (method, n_t) from what has been measured so far."""
    floor_bytes = floor.cuda_peak if cuda else floor.saved
    vrpo = {pt.mc: pt for pt in points if pt.method == "vrpo"}
    rows = []
    for pt in points:
        t = _median(pt.times.values())
        peak = (pt.cuda_peak or None) if cuda else pt.saved
        row = {"method": pt.method, "mc": pt.mc, "oom": pt.oom,
               "peak_bytes": None if pt.oom else peak,
               "saved_bytes": None if pt.oom else pt.saved,
               "floor_bytes": floor_bytes, "floor_saved_bytes": floor.saved,
               "floor_time_s": _median(floor.times.values()),
               "step_time_s": None if pt.oom else t,
               "step_times_s": [pt.times[k] for k in sorted(pt.times)],
               "time_per_sample_s": None if pt.oom or t is None else t / pt.mc,
               "rss_peak_bytes": pt.rss.get("rss_peak_bytes"),
               "rss_setup_bytes": pt.rss.get("rss_setup_bytes"),
               "floor_rss_bytes": floor.rss.get("rss_peak_bytes"), **meta,
               "rounds_done": rounds_done, "complete": complete}
        if cuda:
            row.update(backward_peak_bytes=None if pt.oom else (pt.cuda_backward_peak or None),
                       static_bytes=pt.cuda_static, floor_backward_peak_bytes=floor.cuda_backward_peak)
        ref_peak = row.get("backward_peak_bytes") if cuda else peak
        row["peak_over_floor"] = ref_peak / floor_bytes if ref_peak and floor_bytes else None
        v = vrpo.get(pt.mc)
        if pt.method == "bgpo" and v is not None and not pt.oom and not v.oom:
            paired = [pt.times[k] / v.times[k] for k in pt.times if k in v.times]
            row["step_time_ratio_vs_vrpo"] = _median(paired)
        rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]]) -> str:
    """The headline ratios of a memory results file."""
    by = {(r["method"], r["mc"]): r for r in rows}
    out = []
    bg = sorted(r["mc"] for r in rows if r["method"] == "bgpo" and r["peak_bytes"])
    if bg:
        lo, hi = by["bgpo", bg[0]], by["bgpo", bg[-1]]
        out.append(f"BGPO peak n_t={bg[-1]} / n_t={bg[0]}: {hi['peak_bytes'] / lo['peak_bytes']:.3f}; "
                   f"peak/floor: " + ", ".join(f"{by['bgpo', n]['peak_over_floor']:.3f}" for n in bg))
    vr = sorted(r["mc"] for r in rows if r["method"] == "vrpo" and r["peak_bytes"])
    if vr:
        out.append(f"VRPO peak n_t={vr[-1]} / n_t={vr[0]}: "
                   f"{by['vrpo', vr[-1]]['peak_bytes'] / by['vrpo', vr[0]]['peak_bytes']:.2f}")
    ratios = [(n, by["bgpo", n].get("step_time_ratio_vs_vrpo")) for n in bg]
    if any(x is not None for _, x in ratios):
        out.append("BGPO/VRPO step time (paired median): "
                   + ", ".join(f"n_t={n}: {x:.3f}" for n, x in ratios if x is not None))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    return bench_main("memory", argv, parse, run, summary)


if __name__ == "__main__":
    sys.exit(main())
