"""Two CPU processes (torchrun + accelerate, gloo over loopback) train as one process does:
``parallel=ddp`` bit for bit, ``parallel=fsdp`` (FSDP2, sharded parameters) to float64 round-off;
an FSDP run preempted on ONE rank stops on both after the same step and resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bgpo.export import load_run_policy
from bgpo.results import last_checkpoint, load_checkpoint
from tests.helpers import micro_model
from tests.test_sweep import metrics  # rows without wall-clock and memory keys

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["method=bgpo", "mc=2", "prompts_per_step=2", "shards=2", "group_size=3", "eval_n=2",
          "eval_every=0", "progress=false", "temperature=1.0", "lr=1e-3", "task.name=toy",
          "task.gen_length=8", "task.block_length=4", "task.diffusion_steps=4"]
ENV = {**os.environ, "BGPO_TASK_MODULES": "tests.toy_task", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def command(nproc: int, port: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "bgpo.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(port), "-m", "bgpo.train"]


def train(base: Path, out: Path, nproc: int, *overrides: str, port: int = 29517) -> Path:
    """Run to completion; return the run folder."""
    res = subprocess.run([*command(nproc, port), f"model.path={base}", *COMMON, *overrides,
                          f"results_dir={out}"], env=ENV, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    (summary,) = out.glob("*/summary.json")
    return summary.parent


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def model_state(run: Path) -> dict[str, torch.Tensor]:
    """The full model of a run's last checkpoint (``last.pt``, or an FSDP run's shards put together)."""
    return load_checkpoint(last_checkpoint(run))["model"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("micro") / "micro"
    micro_model(dtype=torch.float64).save(path)
    return path


@pytest.fixture(scope="module")
def one_process(base, tmp_path_factory) -> Path:
    return train(base, tmp_path_factory.mktemp("one"), 1, "steps=3", "model.dtype=float64")


@pytest.mark.slow
def test_two_processes_match_one(base, one_process, tmp_path):
    two = train(base, tmp_path, 2, "steps=3", "model.dtype=float64")
    s_one, s_two = summary(one_process), summary(two)
    assert s_one["world_size"] == 1 and s_two["world_size"] == 2
    fp_r0, fp_r1 = s_two["param_fingerprints"]
    assert fp_r0 == fp_r1  # both ranks end with identical parameters
    assert fp_r0 == s_one["param_fingerprints"][0]  # ... equal to the 1-process run
    start, one, got = micro_model().net.state_dict(), model_state(one_process), model_state(two)
    for k, v in one.items():
        assert torch.equal(v, got[k]), k
    assert any(not torch.equal(v, start[k]) for k, v in one.items())  # it trained
    assert metrics(two) == metrics(one_process)  # losses, rewards, grad norms: over both ranks


@pytest.mark.slow
def test_fsdp_matches_one_process(base, one_process, tmp_path):
    fsdp = train(base, tmp_path, 2, "steps=3", "model.dtype=float64", "parallel=fsdp", port=29518)
    s = summary(fsdp)
    assert s["world_size"] == 2 and s["parallel"] == "fsdp"
    total = sum(p.numel() for p in micro_model().net.parameters())
    assert all(n < 0.6 * total for n in s["local_param_numel"])  # each rank holds ~half: sharded
    assert s["param_fingerprints"][0] == s["param_fingerprints"][1]  # gathered: identical on both ranks
    start, one, got = micro_model().net.state_dict(), model_state(one_process), model_state(fsdp)
    assert set(got) == set(one)  # its shards (last.dcp) put together: the one-process model's keys
    for k in one:  # the update equals the one-process update up to the order of float sums
        d_one, d_fsdp = one[k] - start[k], got[k] - start[k]
        assert (d_fsdp - d_one).abs().max() <= 1e-9 * max(d_one.abs().max().item(), 1e-12), k
    same_rows(metrics(fsdp), metrics(one_process))


def same_rows(rows: list[dict], expected: list[dict]) -> None:
    """The same rollouts and statistics, up to the order of float sums (FSDP's reductions)."""
    for row, ref in zip(rows, expected, strict=True):
        assert row.keys() == ref.keys()
        for k, v in ref.items():
            assert row[k] == pytest.approx(v, rel=1e-9, abs=1e-12), (row["step"], k)


def child_with_rank(parent: int, rank: int) -> int | None:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    return None


@pytest.mark.slow
def test_fsdp_preempted_on_one_rank_resumes_exactly(base, tmp_path):
    """USR2 reaches rank 1 only, mid-run: both ranks checkpoint after the same step and stop; the
    same command resumes, and the metrics equal an uninterrupted run's."""
    overrides = ("steps=4", "ckpt_every=1", "parallel=fsdp")
    expected = metrics(train(base, tmp_path / "full", 2, *overrides, port=29519))

    out = tmp_path / "preempted"
    args = [*command(2, 29520), f"model.path={base}", *COMMON, *overrides, f"results_dir={out}"]
    proc = subprocess.Popen(args, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # wait for the row of step 1
        rows = [p for p in out.glob("*/metrics.jsonl") if '"step": 1' in p.read_text()]
        if rows:
            os.kill(child_with_rank(proc.pid, 1), signal.SIGUSR2)
            break
        time.sleep(0.02)
    log = proc.communicate(timeout=240)[0]
    assert proc.returncode != 0 and "Preempted" in log, log[-3000:]
    (ckpt,) = out.glob("*/checkpoints/last.dcp")
    stopped_at = torch.load(ckpt / "header.pt", weights_only=False)["step"]
    assert 1 <= stopped_at < 4 and not list(out.glob("*/summary.json"))
    print(f"stopped after step {stopped_at}")

    run = train(base, out, 2, *overrides, port=29521)
    assert summary(run)["resumed_at"] == [stopped_at]
    assert metrics(run) == expected


@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_and_resume_in_any_layout(base, one_process, tmp_path):
    """Under FSDP every rank writes its own shards (``last.dcp``: no file holds the whole model
    with its AdamW state, no rank gathers it) and reads only them back; an FSDP checkpoint resumes
    in ONE process (DCP reshards), and the run ends where the uninterrupted one-process run ends."""
    fsdp = train(base, tmp_path, 2, "steps=3", "ckpt_every=1", "model.dtype=float64", "parallel=fsdp",
                 port=29522)
    ckpt = fsdp / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.dcp", "last.dcp", "prev.dcp"]
    shards = sorted((ckpt / "last.dcp").glob("*.distcp"))
    state_bytes = 3 * sum(t.numel() * t.element_size() for t in micro_model().net.state_dict().values())
    sizes = [p.stat().st_size for p in shards]
    assert len(shards) == 2 and sum(sizes) > state_bytes  # between them: weights and both Adam moments
    assert max(sizes) < 0.6 * sum(sizes)  # each rank wrote about half (nothing was gathered to rank 0)
    headers = [torch.load(ckpt / f"{n}.dcp" / "header.pt", weights_only=False) for n in ("last", "prev")]
    assert [h["step"] for h in headers] == [3, 2] and headers[0]["run"] == headers[1]["run"]

    policy, _, info = load_run_policy(fsdp, "final")  # export and evaluate read the shards as one model
    assert info["checkpoint"].endswith("last.dcp") and info["step"] == 3
    for k, v in policy.net.state_dict().items():
        assert torch.equal(v, model_state(fsdp)[k]), k

    (fsdp / "summary.json").unlink()  # as if it had stopped after step 2: resume in one process
    shutil.rmtree(ckpt / "last.dcp")
    res = subprocess.run([*command(1, 0), f"model.path={base}", *COMMON, "steps=3", "ckpt_every=1",
                          "model.dtype=float64",
                          f"results_dir={tmp_path}"], env=ENV, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert summary(fsdp)["resumed_at"] == [2] and summary(fsdp)["world_size"] == 1
    same_rows(metrics(fsdp), metrics(one_process))
    start, one, got = micro_model().net.state_dict(), model_state(one_process), model_state(fsdp)
    for k in start:
        d_one, d_got = one[k] - start[k], got[k] - start[k]
        assert (d_got - d_one).abs().max() <= 1e-9 * max(d_one.abs().max().item(), 1e-12), k
