"""The miniature dry run of the full-scale presets (issue 12, item 5): every job composes and
validates with the miniature's overrides, and a sample job runs end to end on 2 gloo processes —
native LLaDA miniature, bf16-mixed under FSDP2 (parameters stay float32), activation
checkpointing, the math data from local files, both test sets, checkpoint, export."""

from __future__ import annotations

import json

import pytest
import yaml

from bgpo import dryrun
from bgpo.miniature import mini_id


def test_every_job_of_every_full_scale_preset_composes_in_miniature(tmp_path, monkeypatch):
    monkeypatch.setenv("BGPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BGPO_DATA", str(dryrun.data_folder(tmp_path)))
    presets = dryrun.full_scale_presets()
    # the tiny presets are not full-scale
    assert presets == ["paper_bounds", "paper_main", "paper_mc_ablation", "paper_offpolicy"]
    jobs = dryrun.plan(presets, [], [], steps=2, nproc=2, out=tmp_path)
    assert len(jobs) == 3 + 16 + 5 + 4
    for job in jobs:
        mini = dict(o.split("=", 1) for o in job.mini)
        assert mini["model.path"].startswith(str(tmp_path / "cache" / "miniature-llada"))
        assert mini["model.mask_token_id"] == str(mini_id("llada", 126336))
        # 2 processes x whole prompt groups for each off-policy mini-batch (paper_offpolicy, paper_bounds: 2)
        off_policy = job.preset in ("paper_offpolicy", "paper_bounds")
        assert int(mini["task.gen_length"]) == 64 and mini["prompts_per_step"] == ("4" if off_policy else "2")
    (job,) = dryrun.plan(["paper_main"], [{"method": "bgpo", "task": "countdown"}], ["model=dream_7b"], 1, 2,
                         tmp_path)
    assert "miniature-dream" in dict(o.split("=", 1) for o in job.mini)["model.path"]


def test_a_bad_override_stops_the_dry_run_before_any_job_starts(tmp_path, capsys):
    assert dryrun.main(["--presets", "paper_main", "--override", "mc=0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nothing launched; bad job paper_main" in err and "mc=0" in err
    assert not list(tmp_path.glob("paper_main/*"))


@pytest.mark.slow
def test_a_sample_job_runs_like_full_scale(tmp_path, monkeypatch):
    monkeypatch.setenv("BGPO_CACHE", str(tmp_path / "cache"))
    argv = ["--presets", "paper_main", "--select", "method=diffu_grpo,task=math", "--steps", "1",
            "--out", str(tmp_path)]
    assert dryrun.main(argv) == 0
    (job,) = json.loads((tmp_path / "dryrun.json").read_text())["jobs"]
    checks = job["checks"]
    assert job["status"] == "ok" and checks["test_sets"] == ["gsm8k", "math500"]
    assert checks["world_size"] == 2 and checks["parallel"] == "fsdp"
    assert checks["param_dtypes"] == ["float32"]  # bf16-mixed: float32 master weights under FSDP
    assert max(checks["local_param_numel"]) < 0.6 * sum(checks["local_param_numel"])  # sharded
    cfg = yaml.safe_load(open(f"{job['run_dir']}/config.yaml"))
    assert (cfg["model"]["kind"], cfg["model"]["precision"], cfg["model"]["activation_checkpointing"]) == (
        "llada", "bf16-mixed", True)
    assert cfg["task"]["options"]["math_train"].endswith("data/math_train.jsonl")  # local files, not the hub
    assert json.loads(open(f"{checks['export']}/bgpo_export.json").read())["mask_token_id"] == 896
