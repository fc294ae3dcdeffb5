"""Integration tests against the real one-node Slurm cluster, through submitit directly."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import submitit
from submitit.core.utils import UncompletedJobError

from tests.slurm_cluster import REPO_ROOT, SlurmCluster

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 40  # submit -> done, per job (start latency is ~3 s on an idle node)
CANCEL_TIMEOUT_S = 20  # scancel -> submitit reports the failure


# Submitted functions live at module top level: the job unpickles them by reference, importing
# tests.test_slurm_cluster from its working directory (the repo root, see `executor`).
def add(a: int, b: int) -> int:
    return a + b


def sleep_long(seconds: float = 300.0) -> str:
    time.sleep(seconds)
    return "not cancelled"


def cuda_visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.fixture
def executor(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> submitit.AutoExecutor:
    # sbatch runs in the current directory, and so does the job: make `tests` importable there
    monkeypatch.chdir(REPO_ROOT)
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    ex.update_parameters(
        slurm_partition=slurm_cluster.partition,
        timeout_min=5,
        cpus_per_task=1,
        nodes=1,
        tasks_per_node=1,
        name="bgpo-test",
    )
    return ex


def _describe(job: submitit.Job, cluster: SlurmCluster) -> str:
    def read(f) -> str:
        try:
            return f() or ""
        except Exception as e:  # diagnostics only
            return f"<{e}>"

    return (
        f"job {job.job_id} state={job.watcher.get_state(job.job_id, mode='force')}\n"
        f"--- stdout\n{read(job.stdout)}\n--- stderr\n{read(job.stderr)}\n{cluster.logs(15)}"
    )


def _wait_done(job: submitit.Job, cluster: SlurmCluster, timeout_s: float) -> float:
    """Poll (forcing sacct) until the job is done; return the time it took."""
    t0 = time.monotonic()
    while not job.done(force_check=True):
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"job not done after {timeout_s}s:\n{_describe(job, cluster)}")
        time.sleep(0.5)
    return time.monotonic() - t0


def _wait_state(job: submitit.Job, cluster: SlurmCluster, state: str, timeout_s: float) -> None:
    """Poll sacct (what submitit reads; it may lag slurmctld by a few seconds) until `state`."""
    t0 = time.monotonic()
    while job.watcher.get_state(job.job_id, mode="force") != state:
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"job not {state} after {timeout_s}s:\n{_describe(job, cluster)}")
        time.sleep(0.5)


def _wait_running(job: submitit.Job, cluster: SlurmCluster, timeout_s: float) -> None:
    """Poll squeue (slurmctld's own view) until the job runs."""
    t0 = time.monotonic()
    while True:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job.job_id), "-o", "%T"],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        if out == "RUNNING":
            return
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"job not RUNNING after {timeout_s}s (squeue: {out!r}):\n{_describe(job, cluster)}")
        time.sleep(0.2)


def test_function_result_arrives(executor: submitit.AutoExecutor, slurm_cluster: SlurmCluster) -> None:
    job = executor.submit(add, 2, 3)
    _wait_done(job, slurm_cluster, JOB_TIMEOUT_S)
    assert job.result() == 5, _describe(job, slurm_cluster)
    # the result file can arrive before the accounting record: sacct catches up shortly after
    _wait_state(job, slurm_cluster, "COMPLETED", JOB_TIMEOUT_S)


def test_scancel_is_reported_as_failure(executor: submitit.AutoExecutor, slurm_cluster: SlurmCluster) -> None:
    job = executor.submit(sleep_long)
    _wait_running(job, slurm_cluster, JOB_TIMEOUT_S)
    subprocess.run(["scancel", str(job.job_id)], env=slurm_cluster.env, check=True, timeout=30)
    took = _wait_done(job, slurm_cluster, CANCEL_TIMEOUT_S)
    assert took < CANCEL_TIMEOUT_S
    # result() waits up to 15 s for a result file a slow shared filesystem may not show yet;
    # here the filesystem is local (submitit's own tests shorten this the same way)
    job._results_timeout_s = 1
    with pytest.raises(UncompletedJobError, match="CANCELLED"):
        job.result()


def test_gpus_per_node_sets_cuda_visible_devices(
    executor: submitit.AutoExecutor, slurm_cluster: SlurmCluster
) -> None:
    executor.update_parameters(gpus_per_node=1)
    job = executor.submit(cuda_visible_devices)
    _wait_done(job, slurm_cluster, JOB_TIMEOUT_S)
    devices = job.result()
    assert devices is not None and devices.strip() != "", _describe(job, slurm_cluster)
    assert len(devices.split(",")) == 1
