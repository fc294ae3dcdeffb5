"""`python -m bgpo.pretrain` trains, saves (safetensors + tokenizer) and evaluates a base model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bgpo.model import load_dllm

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("task", ["countdown", "sudoku"])
def test_pretrain_cli_trains_saves_and_evaluates(task, tmp_path):
    out = tmp_path / f"tiny-{task}"
    cmd = [sys.executable, "-m", "bgpo.pretrain", f"task={task}", "steps=3", "batch_size=8",
           "n_train=64", "eval_n=4", f"out={out}", "model.hidden=32", "model.layers=2", "model.heads=2",
           "model.intermediate=64"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"[pretrain] {task}: validation accuracy" in res.stdout
    summary = json.loads((out / "pretrain.json").read_text())
    assert summary["eval"]["n"] == 4 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
    assert summary["config"]["task"]["name"] == task and summary["commit"]
    assert (out / "model.safetensors").exists() and not out.with_name(out.name + ".tmp").exists()
    model = load_dllm("tiny", out)
    assert model.net.config.hidden_size == 32 and model.mask_token_id == 2


def test_pretrain_rejects_bad_config(tmp_path):
    res = subprocess.run([sys.executable, "-m", "bgpo.pretrain", "task.gen_length=30",
                          f"out={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "task.gen_length" in res.stderr
    assert not (tmp_path / "x").exists()
