"""Two CPU processes (torchrun + accelerate, gloo over loopback) train exactly as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import micro_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    base = tmp_path / "micro"
    micro_model(dtype=torch.float32).save(base)
    common = [f"model.path={base}", "method=bgpo", "mc=2", "steps=2", "prompts_per_step=2", "shards=2",
              "group_size=3", "eval_n=2", "eval_every=0", "progress=false", "temperature=1.0", "lr=1e-3",
              "task.name=toy", "task.gen_length=8", "task.block_length=4", "task.diffusion_steps=4"]
    env = {**os.environ, "BGPO_TASK_MODULES": "tests.toy_task", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    runs = {
        "one": [sys.executable, "-m", "bgpo.train"],
        "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29517", "-m", "bgpo.train"],
    }
    summaries, states = {}, {}
    for name, cmd in runs.items():
        out = subprocess.run([*cmd, *common, f"results_dir={tmp_path / name}"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        (run_dir,) = (tmp_path / name).glob("*/summary.json")
        summaries[name] = json.loads(run_dir.read_text())
        states[name] = torch.load(run_dir.parent / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert summaries["one"]["world_size"] == 1 and summaries["two"]["world_size"] == 2
    fp_one, (fp_r0, fp_r1) = summaries["one"]["param_fingerprints"], summaries["two"]["param_fingerprints"]
    assert fp_r0 == fp_r1  # both ranks end with identical parameters
    assert fp_r0 == fp_one[0]  # ... equal to the 1-process run
    base_state = micro_model(dtype=torch.float32).net.state_dict()
    for k, v in states["one"].items():
        assert torch.equal(v, states["two"][k]), k
    assert any(not torch.equal(v, base_state[k]) for k, v in states["one"].items())  # it trained
