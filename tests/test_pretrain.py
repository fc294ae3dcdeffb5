"""`python -m bgpo.pretrain` trains, saves (safetensors + tokenizer) and evaluates a base model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    assert res.returncode == 2 and "task.gen_length" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1  # one sentence
    assert not (tmp_path / "x").exists()


# each process: wait for the go file, then ask for the (missing) tiny Sudoku base model
ENSURE = """
import functools, hashlib, logging, sys, time
from pathlib import Path
import bgpo.pretrain
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from bgpo.config import ModelConfig, TaskConfig
from bgpo.pretrain import ensure_base_model
# small data and evaluation, as the CLI test above sets them (ensure_base_model takes the defaults)
bgpo.pretrain.PretrainConfig = functools.partial(bgpo.pretrain.PretrainConfig, n_train=64, eval_n=4,
                                                 batch_size=8)
Path(sys.argv[1] + ".ready").touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.01)
path = ensure_base_model(TaskConfig(name="sudoku", gen_length=24, block_length=8, diffusion_steps=24,
                                    pretrain_steps=2),
                         ModelConfig(hidden=32, layers=2, heads=2, intermediate=64, base="cache"))
print("USING", path, hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest())
"""


def test_two_processes_build_the_base_model_once(tmp_path):
    """Issue 16.6: on an empty cache two processes need the same base model at the same moment;
    one pretrains it under the lock, the other waits and then uses that model."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BGPO_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", ENSURE, str(tmp_path / f"p{i}"), str(go)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"p{i}.ready").exists() for i in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process died"
            time.sleep(0.05)
        go.touch()  # both ask at once
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    text = "".join(outs)
    assert text.count("pretraining it now (once)") == 1, text[-3000:]  # built once...
    assert text.count("was built by another process meanwhile: using it") == 1, text[-3000:]  # ...waited
    using = {line for out in outs for line in out.splitlines() if line.startswith("USING")}
    assert len(using) == 1 and str(cache / "tiny-sudoku") in using.pop()  # both use the same model
    assert (cache / "tiny-sudoku" / "pretrain.json").exists()
    assert not [p.name for p in cache.iterdir() if ".tmp-" in p.name]  # no temporary folder left
