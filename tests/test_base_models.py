"""The shipped tiny base models (issue 21.3): the main job starts from them by default, every file
is checked against its sha256 before anything is built, and a changed, missing or other-task file is
refused in one sentence naming it (exit code 2 from the entry points); nothing trains on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import bgpo.provision
from bgpo.config import ConfigError, to_container
from bgpo.pretrain import write_manifest_entry
from bgpo.provision import SHIPPED_DIR, base_model_path, shipped_manifest, shipped_path
from bgpo.results import base_model_identity, folder_hash, run_dir_of
from bgpo.validate import validate_train
from tests.helpers import micro_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TASKS = ("countdown", "sudoku")


def compose_train(*overrides: str):
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("task", SHIPPED_TASKS)
def test_the_repository_ships_each_tiny_base_model_small_and_intact(task: str) -> None:
    entry = shipped_manifest()[task]
    folder = shipped_path(task)  # every file against its sha256
    assert folder == SHIPPED_DIR / f"tiny-{task}"
    assert {"model.safetensors", "config.json", "tokenizer.json", "pretrain.json"} <= set(entry["files"])
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == sorted(entry["files"])
    assert all((folder / f).stat().st_size <= 15 * 2**20 for f in entry["files"])
    assert folder_hash(folder) == entry["sha256"]  # the base hash every run key carries
    meta = json.loads((folder / "pretrain.json").read_text())
    assert meta["task"] == task and entry["command"] == f"python -m bgpo.pretrain task={task} ship=true"
    assert entry["validation"]["accuracy"] == meta["eval"]["accuracy"] and entry["train_seconds"] > 0


@pytest.mark.parametrize("task", SHIPPED_TASKS)
def test_the_main_job_starts_from_the_shipped_base_with_its_hash_in_the_key(task: str, tmp_path) -> None:
    cfg = compose_train(f"task={task}", f"results_dir={tmp_path}")
    assert cfg.model.base == "shipped" and cfg.model.path is None
    validate_train(cfg)
    ident = base_model_identity(to_container(cfg))
    assert ident["sha256"] == shipped_manifest()[task]["sha256"]
    assert ident["path"] == str(SHIPPED_DIR / f"tiny-{task}")
    # the key depends on the weights' hash, never on where the checkout lies
    assert run_dir_of(to_container(cfg)).name.startswith(f"bgpo-{task}-mc")


@pytest.fixture()
def fake_shipped(tmp_path, monkeypatch) -> Path:
    """A shipped-models folder holding one micro Countdown base model, with its manifest."""
    root = tmp_path / "base_models"
    folder = root / "tiny-countdown"
    micro_model(dtype=torch.float32).save(folder)
    (folder / "pretrain.json").write_text(json.dumps({"task": "countdown"}))
    monkeypatch.setattr(bgpo.provision, "SHIPPED_DIR", root)
    write_manifest_entry("countdown", folder, {"train_seconds": 1.0, "total_seconds": 1.0,
                                               "eval": {"accuracy": 0.0}})
    assert shipped_path("countdown") == folder
    return folder


def _refused(match: str, *overrides: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_train(compose_train(*overrides))


def test_a_changed_shipped_file_is_refused_naming_it(fake_shipped: Path) -> None:
    weights = fake_shipped / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of the weights changed
    weights.write_bytes(bytes(data))
    _refused(rf"{weights} fails its sha256 check .*git checkout", "task=countdown")


def test_a_missing_shipped_file_is_refused_naming_it(fake_shipped: Path) -> None:
    (fake_shipped / "config.json").unlink()
    _refused(rf"{fake_shipped / 'config.json'} is missing from the shipped base model of countdown",
             "task=countdown")


def test_a_task_without_a_shipped_base_uses_the_cache(fake_shipped: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BGPO_CACHE", str(tmp_path / "cache"))
    cfg = compose_train("task=sudoku")
    validate_train(cfg)
    assert base_model_path("sudoku", cfg.model) == tmp_path / "cache" / "tiny-sudoku"
    with pytest.raises(ValueError, match=r"no base model is shipped for task 'sudoku' .*model.base=cache"):
        shipped_path("sudoku")


def test_a_base_model_of_another_task_is_refused(fake_shipped: Path) -> None:
    _refused(r"pretrained for task 'countdown', not task.name='sudoku'", "task=sudoku",
             f"model.path={fake_shipped}")
    validate_train(compose_train("task=countdown", f"model.path={fake_shipped}"))  # its own task: fine


def test_the_entry_point_exits_2_in_one_sentence_and_trains_nothing(tmp_path) -> None:
    """A real command line: a Countdown base model (pretrain.json says so) given to a Sudoku run."""
    base = tmp_path / "cd-base"
    micro_model(dtype=torch.float32).save(base)
    (base / "pretrain.json").write_text(json.dumps({"task": "countdown"}))
    res = subprocess.run([sys.executable, "-m", "bgpo.train", "task=sudoku", f"model.path={base}",
                          f"results_dir={tmp_path / 'r'}"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert f"{base}/pretrain.json" in res.stderr and "not task.name='sudoku'" in res.stderr
    made = [p.name for p in (tmp_path / "r").iterdir()] if (tmp_path / "r").exists() else []
    assert made in ([], [".hydra"]), made  # nothing trained: no run folder (Hydra's own log folder only)


def test_model_base_is_checked(tmp_path) -> None:
    _refused(r"model.base='hub' is not one of \['shipped', 'cache'\]", "model.base=hub")


def test_the_smoke_setting_runs_the_whole_pipeline_from_the_shipped_base(tmp_path) -> None:
    """README's `python -m bgpo.train +sweeps=smoke`: a complete run (summary, per-problem test
    results of the base, the selected and the final policy) from the shipped Countdown base."""
    res = subprocess.run([sys.executable, "-m", "bgpo.train", "+sweeps=smoke", f"results_dir={tmp_path}",
                          "threads=1", "progress=false"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("bgpo-countdown-mc4-s0-")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["base_model"]["sha256"] == shipped_manifest()["countdown"]["sha256"]
    tests = json.loads((run_dir / "eval_test.json").read_text())
    assert {"base", "final"} <= set(tests) and tests["base"]["own"]["n"] == 64
    assert "test set own (64 problems), accuracy %: base" in res.stderr + res.stdout


RUN_TRAIN_WITH_SHIPPED_DIR = """
import runpy, sys
from pathlib import Path
import bgpo.provision
bgpo.provision.SHIPPED_DIR = Path(sys.argv.pop(1))  # a copy of the shipped models, to damage
sys.argv[0] = "bgpo.train"
runpy.run_module("bgpo.train", run_name="__main__")
"""


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_a_damaged_shipped_file_stops_the_entry_point_in_one_sentence(damage: str, tmp_path) -> None:
    import shutil

    root = tmp_path / "base_models"
    shutil.copytree(SHIPPED_DIR, root)
    target = root / "tiny-countdown" / "model.safetensors"
    if damage == "missing":
        target.unlink()
    else:
        data = bytearray(target.read_bytes())
        data[4096] ^= 0x01
        target.write_bytes(bytes(data))
    cmd = [sys.executable, "-c", RUN_TRAIN_WITH_SHIPPED_DIR, str(root), f"results_dir={tmp_path / 'r'}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr and str(target) in lines[0], lines
    assert ("fails its sha256 check" if damage == "changed" else "is missing") in lines[0]
    made = [p.name for p in (tmp_path / "r").iterdir()] if (tmp_path / "r").exists() else []
    assert made in ([], [".hydra"]), made  # nothing trained
