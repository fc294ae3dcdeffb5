"""The GPU check (issue 12, item 8) without a GPU: it refuses at once with a clear message, and
its pieces — matmul probe, the memory curve's benchmark call, the short RL job and its row — run
on the CPU with the tiny shapes of ``--dry`` (in this process: the script runs them as
subprocesses; ``python -m bgpo.gpu_check --dry`` does the whole thing)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

import tests.toy_task  # noqa: F401  (registers the toy task the RL job trains on)
from bgpo import gpu_check
from bgpo.bench import memory
from bgpo.config import register
from bgpo.train import run

register()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda_and_says_what_to_do(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "torch.cuda.is_available() is False" in err and "--dry" in err
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_pieces_run_on_cpu_with_tiny_shapes(tmp_path):
    assert gpu_check.matmul_tflops(64, torch.bfloat16, "cpu", warmup=1, iters=2) > 0
    argv = gpu_check.memory_argv(True, "cpu", tmp_path, budget=120)
    assert "--budget-s" in argv and "bf16-mixed" in argv
    assert memory.main(argv) == 0
    rows = memory.load_rows(tmp_path / "memory-cpu-llada-dry-bf16-mixed.jsonl")
    assert {r["method"] for r in rows} == {"bgpo", "vrpo"} and all(r["complete"] for r in rows)
    full = gpu_check.memory_argv(False, "cuda", tmp_path, 100)
    assert full[full.index("--arch") + 1] == "native=llada,layers=8"
    assert full[full.index("--name") + 1] == "llada8b-l8" and full[full.index("--gen-length") + 1] == "512"
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        cfg = compose("train", overrides=gpu_check.rl_job_argv(True, "cpu", tmp_path / "rl"))
    m = cfg.model
    assert (m.kind, m.precision, m.activation_checkpointing) == ("llada", "bf16-mixed", True)
    run(cfg)
    row = gpu_check.rl_job_row(tmp_path / "rl")
    assert row["param_dtypes"] == ["torch.float32"] and row["step_time_s"][0] > 0
    assert row["grad_norm"][0] > 0 and row["changed_fraction"] > 0.5  # no weight decay: gradient steps
