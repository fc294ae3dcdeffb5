"""``python -m bgpo.gpu_check`` (or ``nox -s gpu_check``): the GPU measurements the suite still lacks,
in one short script for one CUDA GPU (issue 12; under 8 minutes by default).

    python -m bgpo.gpu_check [--budget-s 420] [--out results/bench]
    python -m bgpo.gpu_check --dry --out /tmp/check      # its pieces on the CPU, tiny shapes

What it runs, in order, each step writing its rows at once (a run cut short keeps what it has):

1. ``env``: the device, its memory, torch / CUDA versions;
2. ``matmul``: bfloat16 (and TF32 float32) matrix-product speed, TFLOP/s of 8192³ products
   (CUDA events, after warm-up) — the bf16 speed the step times below should be read against;
3. the memory curve of BGPO's Fig. 1 at LLaDA-8B's shape in bf16-mixed precision:
   ``python -m bgpo.bench memory --device cuda --arch native=llada,layers=8 --precision bf16-mixed
   --optimizer sgd --methods bgpo,vrpo --mcs 1,2,4,...,32`` (the native LLaDA at LLaDA-8B's width
   with 8 of its 32 blocks — the shape ``bgpo.plan`` finds where BGPO's flat line and VRPO-OL's
   slope both show 4+ points in 80 GB — random weights built on the GPU; 1 prompt × G 2, 128 + 512
   tokens, ``expandable_segments``; peak, backward-peak and static
   bytes and step times per (method, n_t); VRPO-OL's out-of-memory points recorded as
   ``oom: true``, its larger n_t skipped), in a subprocess with the remaining budget
   (``--budget-s``): its rows file ``memory-cuda-llada8b-l8-bf16-mixed.jsonl`` is rewritten after
   every round. Plain SGD: one GPU cannot hold 8B float32 weights, gradients AND AdamW moments;
4. the one-sample floor with activation checkpointing (the same model, ``--activation-checkpointing``,
   BGPO at n_t = 1), when at least ``--ac-reserve-s`` is left;
5. ``rl_job``: a short RL run on the GPU (``python -m bgpo.train``): a small native LLaDA (the
   miniature's shape, ``bgpo.miniature``, over the suite's character vocabulary so that random
   text is text), bf16-mixed, activation checkpointing, BGPO n_t = 4, 3 steps on the trainer
   tests' toy task, whose reward random text already varies (the update is not zero; no weight
   decay, so a moved weight is a gradient step): step times, peak memory, gradient norms, rewards
   and the share of weights that moved.

Rows go to ``<out>/gpu_check-<device>.jsonl`` (and the memory benchmark's own files beside it),
each naming the command that regenerates it. Without CUDA the script stops at once with a clear
message (exit status 2), unless ``--dry``: then every piece runs on the CPU with tiny shapes (what
the tests check). It needs the suite's dependencies, hydra-core and omegaconf included (a GPU
image without them: carry them as wheels); it reports missing ones at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NEEDED = {"torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers",
          "safetensors": "safetensors", "hydra": "hydra-core", "omegaconf": "omegaconf",
          "yaml": "pyyaml", "tqdm": "tqdm", "peft": "peft"}


class Rows:
    """The rows file, rewritten (atomically) whenever a row is added."""

    def __init__(self, path: Path, cmd: str) -> None:
        self.path, self.cmd, self.rows = path, cmd, []

    def add(self, kind: str, **fields: Any) -> dict[str, Any]:
        from bgpo.bench._common import write_rows
        from bgpo.results import git_commit

        row = {"kind": kind, **fields, "cmd": self.cmd, "commit": git_commit(), "time": round(time.time())}
        self.rows.append(row)
        write_rows(self.path, self.rows)
        shown = json.dumps({k: v for k, v in fields.items() if k != "log_tail"})[:400]
        print(f"[gpu_check] {kind}: {shown}", flush=True)
        return row


def missing_packages() -> list[str]:
    return [pip for mod, pip in NEEDED.items() if importlib.util.find_spec(mod) is None]


def env_row(device: str) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"device": device, "torch": torch.__version__, "python": sys.version.split()[0]}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(device_name=props.name, memory_bytes=props.total_memory, cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    return out


def matmul_tflops(n: int, dtype: Any, device: str, warmup: int = 3, iters: int = 10) -> float:
    """TFLOP/s of ``n × n × n`` products (mean over ``iters`` after ``warmup``)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        a @ b
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        seconds = time.perf_counter() - t0
    return 2 * n**3 * iters / seconds / 1e12


def run_logged(cmd: list[str], timeout: float, env: dict[str, str]) -> tuple[int, str, float]:
    """Run ``cmd`` (its output streamed to ours and kept); return code, output tail, seconds."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = t0 + timeout
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            if time.time() > deadline:
                proc.kill()
                lines.append(f"[gpu_check] killed after {timeout:.0f} s\n")
                break
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = -9
    return rc, "".join(lines)[-3000:], round(time.time() - t0, 1)


# LLaDA-8B's width with 8 of its 32 blocks: planned (python -m bgpo.plan --model llada-8b --layers 8
# --precision bf16-mixed --optimizer sgd --prompts 1 --group 2 --prompt-length 128 --gen-length 512;
# results/bench/plan-gpu-check.jsonl) to hold BGPO flat at ~31 GB for every n_t and VRPO-OL at n_t =
# 1, 2, 4, 8 within 80 GB — at the full 32 blocks BGPO fits only n_t = 1 (the gradients of the
# first chunk stay live through the next) and VRPO-OL only n_t = 1 on an 80 GB GPU
GPU_ARCH, GPU_NAME = "native=llada,layers=8", "llada8b-l8"


def memory_argv(dry: bool, device: str, out: Path, budget: float) -> list[str]:
    if dry:
        shape = ["--arch", "native=llada,hidden=32,layers=2,heads=2,intermediate=64,vocab=256",
                 "--name", "llada-dry", "--mcs", "1,2", "--prompts", "1", "--group", "2",
                 "--prompt-length", "4", "--gen-length", "8", "--repeats", "1", "--no-rss"]
    else:
        shape = ["--arch", GPU_ARCH, "--name", GPU_NAME, "--mcs", "1,2,4,8,16,32", "--prompts", "1",
                 "--group", "2", "--prompt-length", "128", "--gen-length", "512", "--repeats", "2"]
    return ["--device", device, *shape, "--methods", "bgpo,vrpo", "--precision", "bf16-mixed",
            "--optimizer", "sgd", "--budget-s", f"{max(budget, 1):.0f}", "--out", str(out), "--no-progress"]


def small_llada(folder: Path) -> Path:
    """The RL job's model: LLaDA at the miniature's shape over the character tokenizer."""
    import torch

    from bgpo.miniature import SHAPES
    from bgpo.model import build_char_tokenizer
    from bgpo.models import LLaDAConfig, LLaDAModelLM

    if not (folder / "config.json").is_file():
        tok = build_char_tokenizer()
        torch.manual_seed(0)
        net = LLaDAModelLM(LLaDAConfig(**SHAPES["llada"], vocab_size=len(tok), embedding_size=len(tok),
                                       mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id))
        net.save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def rl_job_argv(dry: bool, device: str, results: Path) -> list[str]:
    size = (["steps=1", "task.gen_length=8", "task.block_length=4", "task.diffusion_steps=4", "mc=2"] if dry
            else ["steps=3", "task.gen_length=64", "task.block_length=32", "task.diffusion_steps=32", "mc=4"])
    model = small_llada(results / "model")
    return ["method=bgpo", "task.name=toy", f"model.path={model}", "model.kind=llada", "weight_decay=0.0",
            "model.precision=bf16-mixed", "model.activation_checkpointing=true",
            "prompts_per_step=2", "group_size=4", "temperature=1.0", "lr=1e-3", "eval_every=1", "eval_n=4",
            "task.n_test=4", "ckpt_every=1", f"device={device}", "progress=false", f"results_dir={results}",
            *size]


def rl_job_row(results: Path) -> dict[str, Any]:
    """What the short RL run measured (its metrics, summary and whether the weights moved)."""

    from bgpo.results import last_checkpoint, load_checkpoint

    (summary_path,) = results.glob("*-s*-*/summary.json")
    run = summary_path.parent
    summary = json.loads(summary_path.read_text())
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    state = load_checkpoint(last_checkpoint(run))["model"]
    import yaml

    from bgpo.model import load_dllm

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    start = load_dllm("llada", cfg["model"]["path"]).net.state_dict()
    moved = sum(int((state[k] != v).sum()) for k, v in start.items()) / sum(v.numel() for v in start.values())
    return {"step_time_s": [r["time/step_s"] for r in steps],
            "tokens_per_s": [r["time/tokens_per_s"] for r in steps],
            "peak_bytes": max(r["mem/peak_bytes"] for r in steps),
            "grad_norm": [r["grad_norm"] for r in steps],
            "reward": [r["reward"] for r in steps], "changed_fraction": moved,
            "param_dtypes": sorted({str(v.dtype) for v in state.values()}), "final": summary["final"],
            "device": summary["device"]}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bgpo.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=420, help="start no new step after this many seconds")
    p.add_argument("--out", default=None, help="rows folder (default: results/bench; --dry: a temporary one)")
    p.add_argument("--dry", action="store_true", help="run every piece on the CPU with tiny shapes")
    p.add_argument("--rl-reserve-s", type=float, default=100, help="seconds kept for the RL job")
    p.add_argument("--ac-reserve-s", type=float, default=90, help="seconds the checkpointing floor needs")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    t0 = time.time()
    missing = missing_packages()
    if missing:
        print(f"[gpu_check] missing Python packages: {', '.join(missing)} (pip install "
              f"{' '.join(missing)}, or carry their wheels)", file=sys.stderr)
        return 2
    import torch

    if not args.dry and not torch.cuda.is_available():
        print(f"[gpu_check] needs a CUDA GPU, and torch {torch.__version__} sees none "
              "(torch.cuda.is_available() is False); `python -m bgpo.gpu_check --dry` runs its pieces on the "
              "CPU with tiny shapes", file=sys.stderr)
        return 2
    device = "cpu" if args.dry else "cuda"
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="bgpo-gpu-check-")) if args.dry
                                           else ROOT / "results" / "bench")
    out.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["python -m bgpo.gpu_check", *map(shlex.quote, argv)])
    rows = Rows(out / f"gpu_check-{device}{'-dry' if args.dry else ''}.jsonl", cmd)
    left = lambda: args.budget_s - (time.time() - t0)  # noqa: E731
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1",
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}

    rows.add("env", **env_row(device))
    n = 256 if args.dry else 8192
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        rows.add("matmul", n=n, bf16_tflops=matmul_tflops(n, torch.bfloat16, device),
                 tf32_tflops=matmul_tflops(n, torch.float32, device))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if device == "cuda":
            torch.cuda.empty_cache()

    budget = left() - args.rl_reserve_s - args.ac_reserve_s
    mem_cmd = [sys.executable, "-m", "bgpo.bench", "memory", *memory_argv(args.dry, device, out, budget)]
    rc, tail, secs = run_logged(mem_cmd, budget + 150, env)
    name = "llada-dry" if args.dry else GPU_NAME
    rows_file = out / f"memory-{device}-{name}-bf16-mixed.jsonl"
    rows.add("memory_curve", rc=rc, seconds=secs, rows_file=str(rows_file), log_tail=tail if rc else "")

    if left() - args.rl_reserve_s >= args.ac_reserve_s or args.dry:
        ac = memory_argv(args.dry, device, out, max(left() - args.rl_reserve_s - 60, 1))
        ac[ac.index("--mcs") + 1], ac[ac.index("--methods") + 1] = "1", "bgpo"
        ac_cmd = [sys.executable, "-m", "bgpo.bench", "memory", *ac, "--activation-checkpointing"]
        rc, tail, secs = run_logged(ac_cmd, max(left() - args.rl_reserve_s, 30), env)
        rows.add("memory_floor_ac", rc=rc, seconds=secs, log_tail=tail if rc else "")
    else:
        rows.add("memory_floor_ac", skipped=f"{left():.0f} s left")

    results = Path(tempfile.mkdtemp(prefix="bgpo-gpu-rl-"))
    env_rl = {**env, "BGPO_TASK_MODULES": "tests.toy_task", "OMP_NUM_THREADS": "1" if args.dry else "8"}
    rc, tail, secs = run_logged([sys.executable, "-m", "bgpo.train", *rl_job_argv(args.dry, device, results)],
                                max(left(), 60), env_rl)
    try:
        measured = rl_job_row(results) if rc == 0 else {}
    except (OSError, ValueError, KeyError) as e:
        measured, rc = {"error": f"{type(e).__name__}: {e}"}, rc or 1
    rows.add("rl_job", rc=rc, seconds=secs, **measured, log_tail=tail if rc else "")
    failed = [r["kind"] for r in rows.rows if r.get("rc")]
    print(f"[gpu_check] {len(rows.rows)} rows -> {rows.path} in {time.time() - t0:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
