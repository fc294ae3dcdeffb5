"""Sweeps through the real CLI (``python -m bgpo.sweep -m ...``), in subprocesses.

A sweep puts one run per job into the results store; re-running it trains nothing that is
complete; a sweep killed with SIGKILL and re-run ends with exactly the results of an
uninterrupted one; bad overrides are rejected before any model is built, naming the key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import micro_model

REPO_ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("time/", "mem/")  # wall-clock and RSS differ between runs; everything else must not
STEPS, CKPT_EVERY = 12, 4
SWEEP = ["method=bgpo,vrpo", "mc=1,2"]
N_RUNS = 4
SWEEP_TIMEOUT_S = 240  # one local sweep of the four tiny runs (~10 s on an idle core)

# the micro model on the toy task: a step takes a few tens of milliseconds on one CPU thread
TINY = ["prompts_per_step=2", "group_size=3", "eval_n=4", "eval_every=6", "lr=1e-3",
        "temperature=1.0", "task.name=toy", "task.gen_length=8", "task.block_length=4",
        "task.diffusion_steps=4", "progress=false"]


def sweep_env(**extra: str) -> dict[str, str]:
    """The environment of a sweep (and of its Slurm jobs, which inherit it through sbatch)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["BGPO_TASK_MODULES"] = "tests.toy_task"
    # one thread: on a small shared machine, torch's thread pool makes micro-model steps 10x slower
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def sweep_cmd(base_model: Path, results_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "bgpo.sweep", "-m", f"model.path={base_model}",
            f"results_dir={results_dir}", *TINY, *overrides]


def run_sweep(base_model: Path, results_dir: Path, *overrides: str,
              timeout: float = SWEEP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(sweep_cmd(base_model, results_dir, *overrides), cwd=REPO_ROOT, env=sweep_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def run_dirs(results_dir: Path) -> list[Path]:
    """Run folders of the store (``.hydra``, ``.submitit`` are not runs)."""
    return sorted(p for p in results_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def steps_once(run_dir: Path, steps: int) -> bool:
    """Each RL step has exactly one metrics row (step 0, the base model's evaluation, at most one)."""
    rows = [r["step"] for r in metrics(run_dir)]
    return rows in (list(range(1, steps + 1)), list(range(0, steps + 1)))


def last_step(path: Path) -> int:
    """The step of the last row fully written to a metrics file (a row cut by a kill has no newline
    yet); -1 when there is none."""
    try:
        lines = path.read_bytes().split(b"\n")[:-1]
    except FileNotFoundError:
        return -1
    return json.loads(lines[-1])["step"] if lines else -1


def assert_complete_store(results_dir: Path, steps: int, names: list[str] | None = None) -> None:
    """Every run once, complete, each step exactly once, nothing half-written left behind."""
    dirs = run_dirs(results_dir)
    if names is not None:
        assert [d.name for d in dirs] == names
    for d in dirs:
        summary = json.loads((d / "summary.json").read_text())
        assert summary["run"] == d.name and summary["steps"] == steps
        assert steps_once(d, steps), (d.name, [r["step"] for r in metrics(d)])
        leftovers = [p.relative_to(d) for p in d.rglob("*") if p.name.endswith(".tmp")]
        assert not leftovers, f"{d.name}: temp files left behind: {leftovers}"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "micro"
    micro_model(dtype=torch.float32).save(path)
    return path


@pytest.fixture(scope="module")
def reference(base_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted sweep of four runs: (results_dir, the sweep's process)."""
    results_dir = tmp_path_factory.mktemp("reference")
    proc = run_sweep(base_model, results_dir, *SWEEP, f"steps={STEPS}", f"ckpt_every={CKPT_EVERY}")
    assert proc.returncode == 0, output(proc)[-5000:]
    return results_dir, proc


@pytest.mark.slow
def test_sweep_runs_every_job_once_and_rerun_trains_nothing(reference, base_model):
    results_dir, proc = reference
    out = output(proc)
    assert out.count("Loading weights: 100%") == N_RUNS  # each job built its model once
    assert f"results in {results_dir.resolve()}: {N_RUNS} complete runs" in out
    dirs = run_dirs(results_dir)
    assert len(dirs) == N_RUNS
    assert sorted({d.name.split("-mc")[0] for d in dirs}) == ["bgpo-toy", "vrpo-toy"]
    assert_complete_store(results_dir, STEPS)
    for d in dirs:
        assert d.name in out  # the report names every run
        assert json.loads((d / "summary.json").read_text())["resumed_at"] == []

    def snapshot() -> dict[str, tuple[int, bytes]]:
        files = [f for d in dirs for f in (d / "metrics.jsonl", d / "summary.json",
                                           d / "checkpoints" / "last.pt")]
        return {str(f): (f.stat().st_mtime_ns, f.read_bytes()) for f in files}

    before = snapshot()
    again = run_sweep(base_model, results_dir, *SWEEP, f"steps={STEPS}", f"ckpt_every={CKPT_EVERY}")
    out = output(again)
    assert again.returncode == 0, out[-5000:]
    assert "Loading weights" not in out  # no model was built: nothing trained
    for d in dirs:
        assert f"{d} is complete (summary.json exists): nothing to train" in out
    assert f"results in {results_dir.resolve()}: {N_RUNS} complete runs" in out
    assert snapshot() == before
    assert run_dirs(results_dir) == dirs


@pytest.mark.slow
def test_parallel_local_launcher_gives_the_same_runs(reference, base_model, tmp_path):
    """hydra/launcher=local_parallel (two one-thread joblib workers) trains the same runs, with the
    same metrics, as the sequential launcher."""
    ref_dir, _ = reference
    proc = run_sweep(base_model, tmp_path, *SWEEP, f"steps={STEPS}", f"ckpt_every={CKPT_EVERY}",
                     "hydra/launcher=local_parallel", "threads=1")
    assert proc.returncode == 0, output(proc)[-5000:]
    assert [d.name for d in run_dirs(tmp_path)] == [d.name for d in run_dirs(ref_dir)]
    for d in run_dirs(tmp_path):
        assert metrics(d) == metrics(ref_dir / d.name), d.name


@pytest.mark.slow
def test_each_job_log_records_its_run(reference):
    """Hydra's job logs (``<results_dir>/.hydra/sweep/<num>/sweep.log``) hold each run's messages:
    one run per job, its start, an INFO line at its last step, its final line; the sweep's report
    goes to the console only, not into the last job's log."""
    results_dir, proc = reference
    logs = sorted((results_dir / ".hydra" / "sweep").glob("*/sweep.log"))
    assert len(logs) == N_RUNS
    trained = []
    for log in logs:
        text = log.read_text()
        (d,) = [d for d in run_dirs(results_dir) if f"training {d}" in text]
        trained.append(d)
        assert f"step {STEPS}/{STEPS}: reward" in text and f"{d}: test accuracy" in text
        assert "complete runs" not in text
    assert sorted(trained) == run_dirs(results_dir)
    assert f"[bgpo.sweep] results in {results_dir.resolve()}" in proc.stdout


def _kill_point(results_dir: Path) -> Path | None:
    """The run to kill the sweep in: a later run (an earlier one is complete) that has a checkpoint
    and metrics rows past it (work the kill will lose), not at its last step."""
    if not results_dir.exists() or not any(results_dir.glob("*/summary.json")):
        return None
    for d in run_dirs(results_dir):
        n = last_step(d / "metrics.jsonl")  # so the checkpoint of step n - n % CKPT_EVERY is on disk
        if (not (d / "summary.json").exists() and (d / "checkpoints" / "last.pt").exists()
                and n % CKPT_EVERY >= 1 and n < STEPS):
            return d
    return None


@pytest.mark.slow
def test_killed_sweep_reruns_to_the_uninterrupted_results(reference, base_model, tmp_path):
    ref_dir, _ = reference
    results_dir = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(
        sweep_cmd(base_model, results_dir, *SWEEP, f"steps={STEPS}", f"ckpt_every={CKPT_EVERY}"),
        cwd=REPO_ROOT, env=sweep_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)  # its own process group: the kill takes everything it started
    victim = None
    try:
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        while victim is None:
            if proc.poll() is not None:
                pytest.fail(f"the sweep ended (rc={proc.returncode}) before it could be killed mid-run:\n"
                            + (tmp_path / "killed.log").read_text()[-3000:])
            if time.monotonic() > deadline:
                pytest.fail(f"no run reached a kill point within {SWEEP_TIMEOUT_S}s")
            if _kill_point(results_dir) is not None:
                # freeze, then look again: what is on disk now is exactly what the kill leaves
                os.killpg(proc.pid, signal.SIGSTOP)
                victim = _kill_point(results_dir)
                if victim is None:
                    os.killpg(proc.pid, signal.SIGCONT)
                    continue
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.01)
    finally:
        if proc.poll() is None and victim is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL

    # the kill landed mid-sweep, mid-run, past the victim's checkpoint
    done_before = sorted(p.parent.name for p in results_dir.glob("*/summary.json"))
    assert 1 <= len(done_before) < N_RUNS
    ckpt_step = torch.load(victim / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert ckpt_step % CKPT_EVERY == 0 and 0 < ckpt_step < last_step(victim / "metrics.jsonl") < STEPS

    proc = run_sweep(base_model, results_dir, *SWEEP, f"steps={STEPS}", f"ckpt_every={CKPT_EVERY}")
    out = output(proc)
    assert proc.returncode == 0, out[-5000:]
    for name in done_before:  # complete runs are skipped, the rest trained (the victim resumed)
        assert f"{results_dir / name} is complete (summary.json exists): nothing to train" in out
    assert out.count("Loading weights: 100%") == N_RUNS - len(done_before)

    names = [d.name for d in run_dirs(ref_dir)]
    assert_complete_store(results_dir, STEPS, names)
    for name in names:
        assert metrics(results_dir / name) == metrics(ref_dir / name), name
        resumed_at = json.loads((results_dir / name / "summary.json").read_text())["resumed_at"]
        assert resumed_at == ([ckpt_step] if name == victim.name else [])


# bad overrides on the command line: (override, what the message must contain). The model folder has
# a config.json but no weights (it passes the start-up check of model.path), so a run that got as far
# as building a model would fail differently (and later).
BAD = [
    ("method=ppo", "method/ppo"),
    ("mc=0", "mc=0 must be >= 1"),
    ("mc=abc", "full_key: mc"),
    ("task=chess", "task/chess"),
    ("task.name=chess", "task.name='chess' is not a registered task"),
    ("task.gen_length=10", "task.gen_length=10 must be a multiple of task.block_length=4"),
    ("mc=2,0", "nothing launched; bad job"),  # a bad value inside a sweep list: before ANY job runs
    ("task.block_length=4,3", "task.gen_length=8 must be a multiple of task.block_length=3"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_override_is_rejected_before_a_model_is_built(override, message, tmp_path):
    results_dir = tmp_path / "results"
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "config.json").write_text("{}")
    proc = run_sweep(tmp_path / "not-a-model", results_dir, "steps=2", override, timeout=120)
    out = output(proc)
    assert proc.returncode != 0, out[-3000:]
    assert message in out, out[-3000:]
    assert "Loading weights" not in out and "not-a-model" not in out.replace(
        f"model.path={tmp_path / 'not-a-model'}", "")
    assert not results_dir.exists() or not run_dirs(results_dir)  # no run folder was opened
