"""``python -m bgpo.bench headroom``: how much a base model leaves for RL to find, on VALIDATION.

For each base model: greedy accuracy (the evaluation protocol: one token per step, temperature 0),
and, with the RL rollout sampler at the rollout temperature (``task.diffusion_steps``), pass@1
(the mean accuracy of all samples), pass@G (problems with at least one correct sample among G) and
the share of prompt groups whose rewards differ (a group of equal rewards has zero advantages:
no gradient). pass@G − pass@1 is what RL can realise by sharpening alone. Rows are appended to
``results/bench/headroom-<task>.jsonl`` (rewritten atomically), each with its command.

    python -m bgpo.bench headroom --task countdown                   # the shipped base model
    python -m bgpo.bench headroom --task sudoku --model PATH --name my-base
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bgpo.bench._common import command_line
from bgpo.results import atomic_write_text, folder_hash, git_commit


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bgpo.bench headroom", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="countdown", choices=["countdown", "sudoku"])
    p.add_argument("--model", default=None, help="a tiny model folder (default: the task's shipped base)")
    p.add_argument("--name", default=None, help="the row's model name (default: the folder's name)")
    p.add_argument("--G", type=int, default=8, help="samples per problem (the RL group size)")
    p.add_argument("--temperature", type=float, default=1.0, help="the rollout temperature")
    p.add_argument("--n", type=int, default=256, help="validation problems")
    p.add_argument("--prompts-per-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results/bench")
    return p.parse_args(argv)


def task_config(name: str):
    """The task's config as the main job resolves it (bgpo/conf/task/<name>.yaml)."""
    from hydra import compose, initialize_config_module

    from bgpo.config import register

    register()
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        return compose("train", overrides=[f"task={name}"]).task


@torch.no_grad()
def headroom(model, task, task_cfg, examples: list, G: int, temperature: float, prompts_per_batch: int,
             seed: int) -> dict:
    from bgpo.rollout import evaluate, rollout
    from bgpo.tasks import task_scores

    greedy = evaluate(model, task, examples, task_cfg)
    g = torch.Generator(device=model.device).manual_seed(seed)
    per_problem: list[list[bool]] = []
    spread, rewards = 0, []
    for lo in tqdm(range(0, len(examples), prompts_per_batch), desc="sample", leave=False):
        chunk = examples[lo : lo + prompts_per_batch]
        ro = rollout(model, task, chunk, task_cfg, G, temperature, g)
        flat = [ex for ex in chunk for _ in range(G)]
        scores = task_scores(task, flat, ro.texts, task_cfg.format)
        for i in range(len(chunk)):
            group = scores[i * G : (i + 1) * G]
            per_problem.append([s.correct for s in group])
            spread += len({s.reward for s in group}) > 1
            rewards += [s.reward for s in group]
    n = len(examples)
    return {"greedy": greedy["accuracy"], "greedy_reward": greedy["reward"],
            "pass@1": sum(sum(c) for c in per_problem) / (n * G),
            "pass@G": sum(any(c) for c in per_problem) / n,
            "groups_with_spread": spread / n, "sample_reward": sum(rewards) / len(rewards), "n": n}


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bgpo.model import load_dllm
    from bgpo.provision import check_base_task, shipped_path
    from bgpo.tasks import get_task

    path = Path(args.model) if args.model else shipped_path(args.task)
    check_base_task(path, args.task)
    model = load_dllm("tiny", path)
    model.net.eval()
    task_cfg = task_config(args.task)
    meta = json.loads((path / "pretrain.json").read_text()) if (path / "pretrain.json").is_file() else {}
    for key in ("gen_length", "block_length", "diffusion_steps"):  # the lengths the model was trained at
        if key in meta.get("config", {}).get("task", {}):
            task_cfg[key] = meta["config"]["task"][key]
    task = get_task(args.task)
    examples = task.val_examples()[: args.n]
    t0 = time.time()
    r = headroom(model, task, task_cfg, examples, args.G, args.temperature, args.prompts_per_batch, args.seed)
    row = {"task": args.task, "model": args.name or path.name, "base_sha256": folder_hash(path),
           "split": "val", "G": args.G, "gen_length": task_cfg.gen_length, "temperature": args.temperature,
           "seed": args.seed,
           "sft_steps": meta.get("config", {}).get("steps") or meta.get("config", {}).get("task", {}).get(
               "pretrain_steps"),
           "sft_near_miss": meta.get("config", {}).get("task", {}).get("sft_near_miss", 0.0),
           **r, "wall_s": round(time.time() - t0, 1), "threads": torch.get_num_threads(),
           "cmd": command_line("headroom", argv), "commit": git_commit()}
    out = Path(args.out) / f"headroom-{args.task}.jsonl"
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.is_file() else []
    key = lambda x: (x["model"], x["G"], x["temperature"])  # noqa: E731  (a re-run replaces its row)
    rows = [x for x in rows if key(x) != key(row)]
    atomic_write_text(out, "".join(json.dumps(x, sort_keys=True) + "\n" for x in [*rows, row]))
    print(f"{row['model']}: greedy {100 * r['greedy']:.1f}% · pass@1 {100 * r['pass@1']:.1f}% · "
          f"pass@{args.G} {100 * r['pass@G']:.1f}% (T={args.temperature}) · groups with spread "
          f"{100 * r['groups_with_spread']:.0f}% on {r['n']} validation problems; wrote {out}")
    return 0
