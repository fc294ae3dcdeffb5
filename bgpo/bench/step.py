"""``python -m bgpo.bench step``: where one RL step's time goes, and how close it runs to the machine.

One training step as ``bgpo.trainer`` runs it — rollout (the reference sampler at the task's
diffusion steps), reward, ``method.prepare`` (MC draws, θ_old / reference statistics), the
method's backward passes (``bgpo.method.backward``), the optimizer step — and one validation
evaluation (greedy, one token per step, ``eval_n`` problems), each timed over ``--repeats`` steps
(the median). FLOPs are COUNTED, not estimated: each phase is run once more under
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention), and the achieved FLOP/s of a
phase is its count divided by its median time. The machine's peak is measured the same way: the
median of ``--peak-repeats`` float32 GEMMs of ``--peak-n``³ on the same threads.

Rows (``<out>/step-<device>-<model>.jsonl``): one per phase (``phase``, ``seconds``, ``flops``,
``gflops_per_s``, ``fraction_of_peak``, ``share_of_step``), one ``matmul_peak`` row, and the
settings (method, n_t, prompts × G, lengths, threads, commit, the command).

    python -m bgpo.bench step                                   # BGPO, the main job's settings
    python -m bgpo.bench step --override method=diffu_grpo --override mc=1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bgpo.bench._common import (
    bench_main,
    check_model_args,
    common_meta,
    compose_train,
    load_model,
    model_spec,
    write_rows,
)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bgpo.bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--override", action="append", default=[],
                   help="Hydra override of the train config (method=..., mc=..., prompts_per_step=...)")
    p.add_argument("--model", default="tiny", help="tiny (the shipped, else cached, base) or a folder")
    p.add_argument("--arch", default=None)
    p.add_argument("--name", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--peak-n", type=int, default=1024, help="GEMM size of the peak measurement")
    p.add_argument("--peak-repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench")
    args = p.parse_args(argv)
    check_model_args(p, args)
    if args.repeats < 1 or args.peak_repeats < 1:
        p.error("--repeats and --peak-repeats must be >= 1")
    return args


def matmul_peak(n: int, repeats: int, device: str) -> tuple[float, float]:
    """(seconds, FLOPs) of one n×n×n float32 GEMM: the median over ``repeats`` after a warm-up."""
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        (a @ b).sum().item()  # .item(): wait for the device
        times.append(time.perf_counter() - t0)
    return statistics.median(times), 2.0 * n**3


def counted(fn: Callable[[], Any]) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def run(args: argparse.Namespace, cmd: str) -> tuple[Path, list[dict[str, Any]]]:
    from bgpo.evaluation import evaluate_on
    from bgpo.method import backward
    from bgpo.rollout import rollout
    from bgpo.tasks import get_task
    from bgpo.trainer import advantages, shard_generator
    from bgpo.validate import build_method

    cfg = compose_train(args.override)
    spec = model_spec(args.model, args.arch, args.name, args.dtype, args.device, 0, args.seed, cfg.task.name)
    policy = load_model(spec)
    task = get_task(cfg.task.name, test_file=cfg.task.test_file, n_test=cfg.task.n_test, **cfg.task.options)
    make = build_method(cfg)
    method = make(ref=None)
    c = make.keywords["cfg"]
    opt = torch.optim.AdamW([p for p in policy.net.parameters() if p.requires_grad], lr=cfg.lr)
    prompts = task.train_examples(cfg.prompts_per_step * (args.repeats + 1), args.seed)
    mu = cfg.minibatches * cfg.inner_updates
    order = getattr(method, "ROLLOUT_ORDER", "blocks")
    state: dict[str, Any] = {}

    def phases(step: int) -> dict[str, Callable[[], Any]]:
        g = shard_generator(args.seed, step, 0, spec.device)
        exs = prompts[step * cfg.prompts_per_step : (step + 1) * cfg.prompts_per_step]

        def do_rollout() -> None:
            state["ro"] = rollout(policy, task, exs, cfg.task, cfg.group_size, cfg.temperature, g,
                                  fast=cfg.sampler, order=order)

        def do_prepare() -> None:
            ro = state["ro"]
            state["adv"] = advantages(ro.rewards, cfg.group_size, c.std_adv).to(spec.device)
            state["prep"] = method.prepare(policy, ro.batch, mu, g)

        def do_backward() -> None:
            opt.zero_grad(set_to_none=True)
            backward(method, policy, state["ro"].batch, state["adv"], state["prep"], 0)

        return {"rollout": do_rollout, "prepare": do_prepare, "backward": do_backward, "optimizer": opt.step}

    times: dict[str, list[float]] = {k: [] for k in ("rollout", "prepare", "backward", "optimizer")}
    flops: dict[str, float] = {}
    policy.net.train()
    for step in range(args.repeats + 1):  # step 0 warms up and is counted, not timed
        for name, fn in phases(step).items():
            if step == 0:
                flops[name] = counted(fn)
                continue
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    val = lambda: evaluate_on(policy, task, cfg.task, "val", cfg.eval_n)  # noqa: E731
    flops["evaluation"] = counted(val)
    t0 = time.perf_counter()
    val()
    times["evaluation"] = [time.perf_counter() - t0]
    peak_s, peak_flops = matmul_peak(args.peak_n, args.peak_repeats, spec.device)
    peak = peak_flops / peak_s
    med = {k: statistics.median(v) for k, v in times.items()}
    step_s = sum(v for k, v in med.items() if k != "evaluation")
    B = cfg.prompts_per_step * cfg.group_size
    name = cfg.method._target_.rsplit(".", 1)[-1].lower()
    meta = {**common_meta(spec, cmd), "method": name, "mc": cfg.mc,
            "sequences": B, "gen_length": cfg.task.gen_length, "diffusion_steps": cfg.task.diffusion_steps,
            "eval_n": cfg.eval_n, "repeats": args.repeats, "overrides": args.override,
            "params": sum(p.numel() for p in policy.net.parameters())}
    rows = [{**meta, "phase": k, "seconds": med[k], "flops": flops[k],
             "gflops_per_s": flops[k] / med[k] / 1e9, "fraction_of_peak": flops[k] / med[k] / peak,
             "share_of_step": med[k] / step_s if k != "evaluation" else None} for k in med]
    step_flops = sum(v for k, v in flops.items() if k != "evaluation")
    rows.append({**meta, "phase": "step", "seconds": step_s, "flops": step_flops,
                 "gflops_per_s": step_flops / step_s / 1e9, "fraction_of_peak": step_flops / step_s / peak,
                 "share_of_step": 1.0})
    rows.append({**meta, "phase": "matmul_peak", "seconds": peak_s, "flops": peak_flops,
                 "gflops_per_s": peak / 1e9, "fraction_of_peak": 1.0, "share_of_step": None,
                 "peak_n": args.peak_n})
    path = Path(args.out) / f"step-{spec.device.split(':')[0]}-{spec.name}.jsonl"
    write_rows(path, rows)
    return path, rows


def summary(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        share = f", {100 * r['share_of_step']:.0f}% of the step" if r.get("share_of_step") is not None else ""
        out.append(f"{r['phase']:11s} {r['seconds']:8.3f} s  {r['flops'] / 1e9:9.2f} GFLOP  "
                   f"{r['gflops_per_s']:7.1f} GFLOP/s  ({100 * r['fraction_of_peak']:.0f}% of peak{share})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    return bench_main("step", argv, parse, run, summary)


if __name__ == "__main__":
    raise SystemExit(main())
