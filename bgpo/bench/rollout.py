"""``python -m bgpo.bench rollout``: speed and quality of the rollout sampler's modes (issue 8).

For each mode on the same model, prompts, batch size and seed: tokens/s (content tokens — the
completion up to its first EOS — per wall second of ``generate``; ``positions_per_s`` counts all
``gen_length`` positions), forward passes (``nfe``: per batch, i.e. the slowest row's;
``nfe_per_sequence``: passes each sequence takes part in, rows that are done sit out;
``work_ratio``: the reference's input positions processed ÷ this mode's, the compute saved), task
accuracy and mean reward, and ``agreement`` — the fraction of completions identical to the
reference mode's. The main point is the task's own
generation length (Countdown: 16, block 8, one token per step as in evaluation); the longer points
(default 64 and 128, block 32) reuse the same model, whose accuracy there means nothing
(``accuracy_meaningful`` is false): they measure tokens/s.

Rows go to ``results/bench/rollout-<device>-<model>.jsonl`` (rewritten atomically after every
configuration). Threshold choice: report the whole curve; the summary's headline is the fastest
cached configuration whose accuracy is within 1 point of the reference's (selected on the test
prompts themselves — say so when quoting it).

    python -m bgpo.bench rollout                       # tiny Countdown model, CPU
    python -m bgpo.bench rollout --thresholds 1.0,0.9 --long-gen-lengths ''
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bgpo.bench._common import command_line
from bgpo.model import DLLM, load_dllm
from bgpo.results import atomic_write_text, git_commit
from bgpo.sampler import SamplerConfig, generate
from bgpo.sampler_cached import count_forwards
from bgpo.tasks import task_scores


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _strs(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bgpo.bench rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="countdown")
    p.add_argument("--model-kind", default="tiny")
    p.add_argument("--model-path", default=None, help="default: the tiny base model of the task")
    p.add_argument("--format", default="compact")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-prompts", type=int, default=None, help="test prompts (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--gen-length", type=int, default=None, help="default: the model's training length")
    p.add_argument("--block-length", type=int, default=None, help="default: the model's training block")
    p.add_argument("--thresholds", type=_floats, default=_floats("1.0,0.95,0.9,0.8,0.7,0.5"))
    p.add_argument("--caches", type=_strs, default=_strs("prefix,dual,none"))
    p.add_argument("--long-gen-lengths", type=_ints, default=_ints("64,128"))
    p.add_argument("--long-block-length", type=int, default=32)
    p.add_argument("--long-n-prompts", type=int, default=64)
    p.add_argument("--long-thresholds", type=_floats, default=_floats("1.0,0.9"))
    p.add_argument("--long-caches", type=_strs, default=_strs("dual,none"))
    p.add_argument("--repeats", type=int, default=1,
                   help="time each batch this many times, keep the fastest (noisy shared CPUs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default="results/bench")
    return p.parse_args(argv)


def content_tokens(completions: torch.Tensor, eos: int) -> int:
    """Tokens before each row's first EOS (all of the row when it has none), summed."""
    is_eos = completions == eos
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), completions.shape[1])
    return int(first.sum())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model: DLLM, task, examples: list, cfg: SamplerConfig, args: argparse.Namespace) -> dict:
    """Generate for every example (batches of ``batch_size``): timing, NFE, texts, accuracy."""
    g = torch.Generator(device=model.device).manual_seed(args.seed)
    texts: list[str] = []
    wall, nfe, rows, positions, tokens, batches = 0.0, 0, 0, 0, 0, 0
    for lo in range(0, len(examples), args.batch_size):
        chunk = examples[lo : lo + args.batch_size]
        ids, mask = model.encode_prompts([task.render(ex, args.format) for ex in chunk])
        state = g.get_state()
        times = []
        for _ in range(max(args.repeats, 1)):  # the same draws each time: identical outputs
            g.set_state(state)
            _sync(args.device)
            t0 = time.perf_counter()
            with count_forwards(model.net) as n:
                out = generate(model, ids, mask, cfg, g)
            _sync(args.device)
            times.append(time.perf_counter() - t0)
        wall += min(times)
        nfe, rows, positions, batches = nfe + n.calls, rows + n.rows, positions + n.positions, batches + 1
        tokens += content_tokens(out, model.eos_token_id)
        texts += model.decode_completions(out)
    scores = task_scores(task, examples, texts, args.format)  # each completion checked once
    correct, reward = sum(s.correct for s in scores), sum(s.reward for s in scores)
    return {"tokens_per_s": tokens / wall, "positions_per_s": len(examples) * cfg.gen_length / wall,
            "nfe": nfe / batches, "nfe_total": nfe, "nfe_per_sequence": rows / len(examples),
            "positions_processed": positions,
            "wall_s": wall, "content_tokens": tokens, "accuracy": correct / len(examples),
            "reward": reward / len(examples), "texts": texts}


def load_model(args: argparse.Namespace) -> tuple[DLLM, Path, dict]:
    from bgpo.provision import tiny_base

    path = Path(args.model_path) if args.model_path else tiny_base(args.task)
    if args.model_kind == "tiny" and not (path / "config.json").exists():
        raise SystemExit(f"bench rollout: no model at {path}. Build the tiny base model first:\n"
                         f"    python -m bgpo.pretrain task={args.task}\n"
                         "(or pass --model-path)")
    model = load_dllm(args.model_kind, path, dtype=args.dtype, device=args.device)
    model.net.eval()
    meta = path / "pretrain.json"
    trained = json.loads(meta.read_text())["config"]["task"] if meta.exists() else {}
    return model, path, trained


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bgpo.tasks import get_task

    model, path, trained = load_model(args)
    task = get_task(args.task)
    examples = task.test_examples()
    gen_length = args.gen_length or trained.get("gen_length", 16)
    block_length = args.block_length or trained.get("block_length", 8)
    points = [(gen_length, block_length, examples[: args.n_prompts], args.thresholds, args.caches)]
    points += [(L, min(args.long_block_length, L), examples[: args.long_n_prompts], args.long_thresholds,
                args.long_caches) for L in args.long_gen_lengths]
    out = Path(args.out) / f"rollout-{args.device.replace(':', '')}-{path.name}.jsonl"
    common = {"cmd": command_line("rollout", argv), "batch_size": args.batch_size, "device": args.device,
              "model": path.name,
              "commit": git_commit(), "task": args.task, "seed": args.seed,
              "temperature": args.temperature, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "repeats": args.repeats}
    # warm-up (first-call allocations, lazy imports): not timed
    generate(model, *model.encode_prompts([task.render(examples[0], args.format)]),
             SamplerConfig(8, 8, 2, mode="cached", cache="dual"))
    rows: list[dict] = []
    for L, bl, exs, thresholds, caches in points:
        configs = [("reference", "none", 1.0)]
        configs += [("cached", c, t) for c in caches for t in thresholds]
        ref_texts: list[str] = []
        ref_positions = 0
        for mode, cache, threshold in configs:
            cfg = SamplerConfig(L, bl, L, args.temperature, mode=mode, threshold=threshold, cache=cache)
            r = measure(model, task, exs, cfg, args)
            texts = r.pop("texts")
            ref_texts, ref_positions = ref_texts or texts, ref_positions or r["positions_processed"]
            row = {"mode": mode, "cache": cache if mode == "cached" else None, "threshold": threshold,
                   **r, "agreement": sum(a == b for a, b in zip(texts, ref_texts, strict=True)) / len(exs),
                   "work_ratio": ref_positions / r["positions_processed"],
                   "gen_length": L, "block_length": bl, "steps": L, "n_prompts": len(exs),
                   "accuracy_meaningful": L == trained.get("gen_length", gen_length), **common}
            rows.append(row)
            atomic_write_text(out, "".join(json.dumps(x, sort_keys=True) + "\n" for x in rows))
            print(f"L={L:<4} {mode:9} {row['cache'] or '-':6} thr={threshold:<5} "
                  f"{row['tokens_per_s']:9.1f} tok/s  nfe={row['nfe']:5.1f} "
                  f"({row['nfe_per_sequence']:4.1f}/seq, work /{row['work_ratio']:4.2f})  "
                  f"acc={row['accuracy']:.3f}  "
                  f"reward={row['reward']:.3f}  agree={row['agreement']:.3f}", flush=True)
    summarize(rows)
    print(f"wrote {out}")
    return 0


def summarize(rows: list[dict]) -> None:
    for L in sorted({r["gen_length"] for r in rows}):
        at = [r for r in rows if r["gen_length"] == L]
        ref = next(r for r in at if r["mode"] == "reference")
        cached = [r for r in at if r["mode"] == "cached"] or at
        if ref["accuracy_meaningful"]:
            ok = [r for r in cached if abs(r["accuracy"] - ref["accuracy"]) <= 0.01]
            best, rule = max(ok or cached, key=lambda r: r["tokens_per_s"]), "fastest within 1 pt"
        else:
            best, rule = max(cached, key=lambda r: r["tokens_per_s"]), "fastest (accuracy not meaningful)"
        print(f"L={L}: reference {ref['tokens_per_s']:.1f} tok/s (acc {100 * ref['accuracy']:.1f}); {rule}: "
              f"{best['cache']}/thr={best['threshold']} {best['tokens_per_s']:.1f} tok/s = "
              f"{best['tokens_per_s'] / ref['tokens_per_s']:.2f}x, acc {100 * best['accuracy']:.1f} "
              f"({100 * (best['accuracy'] - ref['accuracy']):+.1f} pt), agreement {best['agreement']:.3f}, "
              f"compute /{best['work_ratio']:.2f}")
