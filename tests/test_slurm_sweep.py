"""Sweeps on the real one-node Slurm cluster: ``python -m bgpo.sweep -m hydra/launcher=slurm ...``.

Every run's summary arrives; a cancelled job fails the sweep; a preempted job (USR2, as Slurm sends
before a time limit or a preemption) checkpoints, is requeued by submitit and RESUMES.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import micro_model
from tests.slurm_cluster import SlurmCluster
from tests.test_sweep import REPO_ROOT, SWEEP, metrics, run_dirs, run_sweep, steps_once, sweep_cmd, sweep_env

pytestmark = pytest.mark.slurm

SWEEP_TIMEOUT_S = 240  # submit -> every summary, for a sweep of tiny runs (~20 s on an idle node)
START_TIMEOUT_S = 120  # submit -> the run's first checkpoint (job start + imports + one step)
STATE_TIMEOUT_S = 60  # a signal / scancel -> the job state it leads to


def launcher(cluster: SlurmCluster) -> list[str]:
    """The Slurm preset with resources the test node has (2 CPUs, no real GPUs)."""
    return ["hydra/launcher=slurm", f"hydra.launcher.partition={cluster.partition}",
            "hydra.launcher.mem_gb=1", "hydra.launcher.cpus_per_task=1", "hydra.launcher.gpus_per_node=0",
            # > 10 min: submitit counts a USR2 as a preemption, not as the time limit coming
            "hydra.launcher.timeout_min=15"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "micro"
    micro_model(dtype=torch.float32).save(path)
    return path


class Sweep:
    """A sweep running in the background (its own process group), with its Slurm jobs."""

    def __init__(self, cluster: SlurmCluster, base_model: Path, results_dir: Path, *overrides: str):
        self.cluster, self.results_dir = cluster, results_dir
        self.log_path = results_dir.parent / f"{results_dir.name}.log"
        self._log = open(self.log_path, "w")
        # jobs run in the submitting directory: the repo root, where `tests.toy_task` imports
        self.proc = subprocess.Popen(
            sweep_cmd(base_model, results_dir, *launcher(cluster), *overrides), cwd=REPO_ROOT,
            env=sweep_env(SLURM_CONF=str(cluster.conf)), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)

    def job_ids(self) -> list[str]:
        """Jobs submitted so far: ``<id>`` (a one-job sweep) or array tasks ``<id>_<i>``. Each has
        its folder in submitit_folder (``results_dir/.submitit/%j``) with its pickled call."""
        folder = self.results_dir / ".submitit"
        jobs = [p.name for p in folder.glob("*/*_submitted.pkl")] if folder.exists() else []
        return sorted(j.removesuffix("_submitted.pkl") for j in jobs)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def describe(self) -> str:
        logs = []
        for job in self.job_ids():
            for f in sorted((self.results_dir / ".submitit" / job).glob("*_log.*")):
                logs.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]))
        squeue = self.slurm("squeue", "-h", "-t", "all", "-o", "%i %T %r").stdout
        return (f"--- sweep output\n{self.output()[-4000:]}\n--- squeue\n{squeue}\n" + "\n".join(logs)
                + f"\n{self.cluster.logs(10)}")

    def slurm(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, env=self.cluster.env, capture_output=True, text=True, timeout=30,
                              check=check, stdin=subprocess.DEVNULL)

    def state(self, job: str) -> str:
        """slurmctld's view (no accounting lag); finished jobs stay listed for MinJobAge."""
        return self.slurm("squeue", "-h", "-t", "all", "-j", job, "-o", "%T").stdout.strip()

    def wait_for(self, what: str, cond, timeout_s: float, interval: float = 0.2):
        t0 = time.monotonic()
        while not (value := cond()):
            if time.monotonic() - t0 > timeout_s:
                pytest.fail(f"timed out after {timeout_s}s waiting for {what}:\n{self.describe()}")
            time.sleep(interval)
        return value

    def wait_exit(self, timeout_s: float = SWEEP_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the sweep did not end within {timeout_s}s:\n{self.describe()}")

    def close(self) -> None:
        """Stop whatever is left: the sweep's processes and its jobs."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        jobs = self.job_ids()
        if jobs:
            self.slurm("scancel", *jobs)
        self._log.close()


@pytest.fixture
def sweeps(slurm_cluster: SlurmCluster, base_model: Path) -> Iterator:
    started: list[Sweep] = []

    def start(results_dir: Path, *overrides: str) -> Sweep:
        started.append(Sweep(slurm_cluster, base_model, results_dir, *overrides))
        return started[-1]

    yield start
    for s in started:
        s.close()


def one_checkpoint(results_dir: Path) -> Path | None:
    """The run folder once the (single) run has written a checkpoint: it is in its RL loop."""
    found = [d for d in run_dirs(results_dir) if (d / "checkpoints" / "last.pt").exists()] \
        if results_dir.exists() else []
    return found[0] if found else None


def test_slurm_sweep_every_summary_arrives(sweeps, tmp_path):
    results_dir = tmp_path / "sweep"
    sweep = sweeps(results_dir, *SWEEP, "steps=2", "ckpt_every=1")
    rc = sweep.wait_exit()
    out = sweep.output()
    assert rc == 0, sweep.describe()
    assert "Submitit 'slurm' sweep output dir" in out
    assert f"results in {results_dir.resolve()}: 4 complete runs" in out
    dirs = run_dirs(results_dir)
    assert len(dirs) == 4
    for d in dirs:
        summary = json.loads((d / "summary.json").read_text())
        assert summary["run"] == d.name and summary["resumed_at"] == []
        assert steps_once(d, 2), [r["step"] for r in metrics(d)]
    jobs = sweep.job_ids()  # one array task per run, each with its result
    assert len(jobs) == 4 and len({j.split("_")[0] for j in jobs}) == 1  # one job array
    for job in jobs:
        assert list((results_dir / ".submitit" / job).glob("*_result.pkl")), job


def test_cancelled_job_fails_the_sweep(sweeps, tmp_path):
    results_dir = tmp_path / "cancel"
    # far more steps than the test waits for: only the cancel ends this job
    sweep = sweeps(results_dir, "method=bgpo", "mc=1", "steps=5000", "ckpt_every=1", "eval_every=0")
    run_dir = sweep.wait_for("the run's first checkpoint", lambda: one_checkpoint(results_dir),
                             START_TIMEOUT_S)
    (job,) = sweep.job_ids()
    sweep.slurm("scancel", job, check=True)
    rc = sweep.wait_exit(STATE_TIMEOUT_S)
    out = sweep.output()
    assert rc != 0, sweep.describe()
    # the run saw SIGTERM: it checkpointed and raised Preempted, which the sweep reports (had it
    # been killed before its result was written, submitit would report the job CANCELLED)
    assert "Error executing job with overrides" in out and ("Preempted" in out or "CANCELLED" in out), out
    sweep.wait_for(f"job {job} CANCELLED", lambda: sweep.state(job).startswith("CANCELLED"), STATE_TIMEOUT_S)
    assert not (run_dir / "summary.json").exists()
    assert (run_dir / "checkpoints" / "last.pt").exists()  # a re-run resumes it
    assert "[bgpo.sweep] results in" not in out  # no report of a sweep that failed


def test_preempted_job_is_requeued_and_resumes(sweeps, tmp_path):
    results_dir, steps = tmp_path / "requeue", 60
    sweep = sweeps(results_dir, "method=bgpo", "mc=1", f"steps={steps}", "ckpt_every=1", "eval_every=0")
    run_dir = sweep.wait_for("the run's first checkpoint", lambda: one_checkpoint(results_dir),
                             START_TIMEOUT_S)
    (job,) = sweep.job_ids()
    # what Slurm sends before a preemption or the time limit (sbatch --signal=USR2@...): the run
    # finishes its step, checkpoints, hands over to submitit, which requeues the job
    sweep.slurm("scancel", "--signal=USR2", job, check=True)
    sweep.wait_for(f"job {job} requeued (PENDING)", lambda: sweep.state(job) == "PENDING", STATE_TIMEOUT_S)
    # a requeued job may only start after the credential lifetime (120 s): start it now
    sweep.slurm("scontrol", "update", f"JobId={job}", "StartTime=now", check=True)
    rc = sweep.wait_exit()
    assert rc == 0, sweep.describe()

    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["resumed_at"]) == 1 and 1 <= summary["resumed_at"][0] < steps, summary
    assert steps_once(run_dir, steps), [r["step"] for r in metrics(run_dir)]  # each step once
    err = (results_dir / ".submitit" / job / f"{job}_0_log.err").read_text(errors="replace")
    assert "Caught signal SIGUSR2" in err  # the hand-off reached submitit's requeue handler
    assert err.count("Loading weights: 100%") == 2  # two attempts of one job
    assert f"results in {results_dir.resolve()}: 1 complete runs" in sweep.output()


def test_two_task_fsdp_job_matches_one_process(sweeps, base_model, tmp_path):
    """One Slurm job of two tasks (``hydra.launcher.tasks_per_node=2``) forms one gloo process
    group, shards the model (``parallel=fsdp``) and trains as one local process does."""
    common = ["method=bgpo", "mc=2", "steps=2", "shards=2", "model.dtype=float64", "eval_every=0"]
    local = run_sweep(base_model, tmp_path / "local", *common)
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-3000:]
    sweep = sweeps(tmp_path / "slurm", *common, "parallel=fsdp", "hydra.launcher.tasks_per_node=2",
                   "hydra.launcher.mem_gb=2")
    assert sweep.wait_exit() == 0, sweep.describe()
    (one,), (two,) = run_dirs(tmp_path / "local"), run_dirs(tmp_path / "slurm")
    assert one.name == two.name  # the layout is not part of the run's identity
    s_one, s_two = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s_two["world_size"] == 2 and s_two["parallel"] == "fsdp"
    assert s_two["local_param_numel"][0] < 0.6 * s_one["local_param_numel"][0]  # sharded
    fp_r0, fp_r1 = s_two["param_fingerprints"]
    assert fp_r0 == fp_r1
    assert fp_r0 == pytest.approx(s_one["param_fingerprints"][0], rel=1e-12)
    for row, ref in zip(metrics(two), metrics(one), strict=True):  # same rollouts, same statistics
        assert row.keys() == ref.keys()
        for k, v in ref.items():
            assert row[k] == pytest.approx(v, rel=1e-9, abs=1e-12), (row["step"], k)
