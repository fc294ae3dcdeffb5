"""``python -m bgpo.dryrun``: every job of the full-scale presets, in miniature, on the CPU (issue 12).

    python -m bgpo.dryrun                                   # every job of every full-scale preset
    python -m bgpo.dryrun --presets paper_main --select method=bgpo,task=math
    python -m bgpo.dryrun --override model=dream_7b         # the same jobs with Dream-7B's config

A full-scale preset is a ``sweeps/`` file whose jobs train LLaDA or Dream (``paper_main``,
``paper_mc_ablation``). Each job the sweep would launch (``bgpo.sweep.sweep_jobs``) runs through the
path it takes at scale — ``bgpo.train`` on ``--nproc`` processes under torchrun (gloo: one process
group, FSDP2 when the job says ``parallel=fsdp``), the native model class, the job's precision
(bf16-mixed: FSDP's MixedPrecisionPolicy), activation checkpointing, rollouts, the method's
backward with the job's n_t, checkpoints, validation and best.pt, the test sets at the end — then
its final policy is exported (``bgpo.export``) and loaded back. Only sizes differ, by overrides
appended to the job's own:

- the model: ``bgpo.miniature`` (the architecture at the golden fixtures' shapes, random weights,
  special-token ids mapped: ``model.mask_token_id`` is mapped when the job sets it);
- ``steps`` (``--steps``), one prompt per process, G = 2, ``task.gen_length`` = two blocks of the
  job's ``task.block_length``, ``task.diffusion_steps`` scaled with the length (the job's steps
  per token), ``eval_every=1``, ``eval_n=1``, ``task.n_test=2``, ``ckpt_every=1``, CPU;
- data: ``$BGPO_DATA`` is pointed at a folder of the repository's small local task files
  (``tests/fixtures/tasks``: MATH/GSM8K/DeepCoder training rows, GSM8K/MATH500/HumanEval/MBPP test
  rows) under the names the task configs read, so nothing comes from the hub.

A random miniature scores 0 on the paper's tasks, so its updates are zero: the dry run checks that
every job's code path runs and writes what it must, not that it learns (the tests that it learns
are the tiny-model ones). Every job is composed and validated before any is launched. Results go
to ``--out`` (default: a temporary folder, removed afterwards unless ``--keep``) and
``dryrun.json`` there; the exit status is 1 when a job fails (its first traceback is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "sweeps"
FIXTURES = ROOT / "tests" / "fixtures" / "tasks"
DATA_FILES = {  # $BGPO_DATA name (bgpo/conf/task/*.yaml) -> local task file of the repository
    "math_train.jsonl": "math_train.jsonl", "gsm8k_train.jsonl": "gsm8k_train.jsonl",
    "gsm8k_test.jsonl": "gsm8k_test.jsonl", "math500_test.jsonl": "math500_test.jsonl",
    "deepcoder_train.jsonl": "deepcoder_train.jsonl", "humaneval.jsonl": "humaneval.jsonl",
    "mbpp_test.jsonl": "mbpp_test.jsonl",
}


@dataclass
class Job:
    preset: str
    overrides: list[str]
    """the sweep's own overrides of this job"""
    mini: list[str] = field(default_factory=list)
    """the miniature's overrides, appended"""
    status: str = "pending"
    seconds: float | None = None
    run_dir: str | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    log_tail: str = ""

    @property
    def name(self) -> str:
        return " ".join(o for o in self.overrides if not o.startswith("+sweeps="))


def full_scale_presets() -> list[str]:
    """Presets whose jobs train LLaDA or Dream."""
    from hydra import compose, initialize_config_module

    from bgpo.config import register

    register()
    out = []
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        for path in sorted(SWEEPS.glob("*.yaml")):
            if compose("sweep", overrides=[f"+sweeps={path.stem}"]).model.kind != "tiny":
                out.append(path.stem)
    return out


def mini_overrides(cfg: Any, steps: int, nproc: int, results_dir: Path) -> list[str]:
    """The size overrides of a composed job config (see the module docstring)."""
    from bgpo.miniature import build_miniature, mini_id

    kind = cfg.model.kind
    length = 2 * cfg.task.block_length
    per_token = cfg.task.diffusion_steps / cfg.task.gen_length  # the job's denoising steps per token
    diffusion = max(2, round(per_token * length / 2) * 2)  # a multiple of the 2 blocks
    out = [f"model.path={build_miniature(kind)}", f"steps={steps}",
           f"prompts_per_step={nproc * max(1, cfg.minibatches)}",  # whole groups for each mini-batch
           "group_size=2", "eval_every=1", "eval_n=1", "ckpt_every=1", "task.n_test=2",
           f"task.gen_length={length}", f"task.diffusion_steps={diffusion}", f"results_dir={results_dir}",
           "device=cpu", "progress=false"]
    if cfg.model.mask_token_id is not None:
        out.append(f"model.mask_token_id={mini_id(kind, cfg.model.mask_token_id)}")
    if "n_val" in cfg.task.options:  # a held-out validation slice of a few-row training file
        out.append("task.options.n_val=1")
    return out


def data_folder(out: Path) -> Path:
    """``$BGPO_DATA`` for the dry run: links to the repository's local task files."""
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for name, src in DATA_FILES.items():
        if not (FIXTURES / src).is_file():
            raise FileNotFoundError(f"{FIXTURES / src} is missing: the dry run reads the repository's "
                                    "task files")
        link = folder / name
        if not link.exists():
            link.symlink_to(FIXTURES / src)
    return folder


def plan(presets: list[str], selects: list[dict[str, str]], extra: list[str], steps: int, nproc: int,
         out: Path) -> list[Job]:
    """Every selected job of the presets with its miniature overrides, composed and validated."""
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException

    from bgpo.config import register
    from bgpo.sweep import sweep_jobs
    from bgpo.validate import validate_train

    register()
    jobs = []
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        for preset in presets:
            if not (SWEEPS / f"{preset}.yaml").is_file():
                raise ValueError(f"--presets: {preset!r} is not a preset in {SWEEPS}")
            try:
                spec = compose("sweep", overrides=[f"+sweeps={preset}", *extra], return_hydra_config=True)
            except ConfigCompositionException as e:  # a bad --override: Hydra's one sentence
                raise ValueError(f"[bgpo.dryrun] nothing launched; --override {' '.join(extra)}: "
                                 f"{str(e).splitlines()[0]}") from None
            for overrides in sweep_jobs(spec):
                pairs = dict(o.split("=", 1) for o in overrides)
                if selects and not any(all(pairs.get(k) == v for k, v in s.items()) for s in selects):
                    continue
                job = Job(preset, overrides)
                full = compose("sweep", overrides=overrides)
                job.mini = mini_overrides(full, steps, nproc, out / preset)
                try:
                    validate_train(compose("sweep", overrides=[*overrides, *job.mini]))
                except ValueError as e:
                    raise ValueError(f"[bgpo.dryrun] nothing launched; bad job {preset}: {job.name}: "
                                     f"{e}") from None
                jobs.append(job)
    return jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: Job, nproc: int, timeout: float, env: dict[str, str]) -> None:
    """Run one job to completion (torchrun for nproc > 1), then check and export its run."""
    train = ["-m", "bgpo.train", *job.overrides, *job.mini]
    cmd = [sys.executable, *train] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(_free_port()), *train]
    t0 = time.time()
    try:
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, log = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:
        rc, log = -1, f"timed out after {timeout:.0f} s\n{(e.stdout or b'')[-2000:]!r}"
    job.seconds = round(time.time() - t0, 1)
    results = Path(next(o.split("=", 1)[1] for o in job.mini if o.startswith("results_dir=")))
    runs = sorted(results.glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    if rc != 0 or not runs:
        first = log.find("Traceback (most recent call last)")  # the first process's own error
        job.status, job.log_tail = "failed", (log[first : first + 4000] if first >= 0 else log[-3000:])
        return
    job.run_dir = str(runs[-1].parent)
    try:
        job.checks = check_run(Path(job.run_dir))
        job.status = "ok"
    except Exception as e:  # noqa: BLE001  (report any failure of the checks, then go on)
        job.status, job.log_tail = "failed", f"after training: {type(e).__name__}: {e}"


def check_run(run_dir: Path) -> dict[str, Any]:
    """What a finished miniature run must have: its summary, the test sets, float32 master weights
    under bf16-mixed, and an export that loads back."""
    import yaml

    from bgpo.export import ExportConfig, export
    from bgpo.model import load_dllm
    from bgpo.results import last_checkpoint, load_checkpoint

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    tests = json.loads((run_dir / "eval_test.json").read_text())
    state = load_checkpoint(last_checkpoint(run_dir))
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state["model"].values()})
    if cfg["model"].get("precision") == "bf16-mixed" and dtypes != ["float32"]:
        raise AssertionError(f"bf16-mixed checkpoint holds {dtypes} parameters, not float32")
    out = export(ExportConfig(run_dir=str(run_dir), which="final"))
    load_dllm(cfg["model"]["kind"], out, mask_token_id=cfg["model"]["mask_token_id"])
    return {"test_sets": sorted(tests["final"]), "final": summary["final"], "best_step": summary["best_step"],
            "world_size": summary["world_size"], "parallel": summary["parallel"], "param_dtypes": dtypes,
            "local_param_numel": summary["local_param_numel"], "export": str(out)}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bgpo.dryrun", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=None, help="comma list (default: every full-scale preset)")
    p.add_argument("--select", action="append", default=[],
                   help="KEY=VAL[,KEY=VAL]: run only the jobs with these sweep values (repeatable: any)")
    p.add_argument("--override", action="append", default=[],
                   help="a Hydra override added to every job (e.g. model=dream_7b)")
    p.add_argument("--limit", type=int, default=None, help="at most this many jobs")
    p.add_argument("--steps", type=int, default=2, help="RL steps per job")
    p.add_argument("--nproc", type=int, default=2, help="processes per job (torchrun; 1: one process)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per job")
    p.add_argument("--out", default=None, help="results folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the default temporary folder")
    args = p.parse_args(argv)
    for s in args.select:
        if not all("=" in kv for kv in s.split(",")):
            p.error(f"--select {s!r}: expected KEY=VAL[,KEY=VAL]")
    if args.steps < 1 or args.nproc < 1 or (args.limit is not None and args.limit < 1):
        p.error("--steps, --nproc and --limit must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bgpo-dryrun-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BGPO_DATA": str(data_folder(out)), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    os.environ["BGPO_DATA"] = env["BGPO_DATA"]  # the configs resolve ${bgpo_data:...} here too
    presets = args.presets.split(",") if args.presets else full_scale_presets()
    selects = [dict(kv.split("=", 1) for kv in s.split(",")) for s in args.select]
    try:
        jobs = plan(presets, selects, args.override, args.steps, args.nproc, out)[: args.limit]
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"[bgpo.dryrun] {len(jobs)} jobs of {', '.join(presets)} on {args.nproc} process(es) -> {out}")
    t0 = time.time()
    for i, job in enumerate(jobs):
        launch(job, args.nproc, args.timeout, env)
        print(f"  [{i + 1}/{len(jobs)}] {job.status:6} {job.seconds:6.1f} s  {job.preset}: {job.name}"
              + (f"  tests: {', '.join(job.checks['test_sets'])}" if job.status == "ok" else ""), flush=True)
        if job.status != "ok":
            print("    " + job.log_tail.replace("\n", "\n    ")[-3000:], file=sys.stderr)
    failed = [j for j in jobs if j.status != "ok"]
    report = {"presets": presets, "nproc": args.nproc, "steps": args.steps,
              "wall_s": round(time.time() - t0, 1), "failed": len(failed), "jobs": [asdict(j) for j in jobs]}
    (out / "dryrun.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[bgpo.dryrun] {len(jobs) - len(failed)}/{len(jobs)} jobs ok in {report['wall_s']} s; "
          f"report: {out / 'dryrun.json'}")
    if not args.out and not args.keep and not failed:
        shutil.rmtree(out, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
