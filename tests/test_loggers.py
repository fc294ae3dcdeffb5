"""Trackers (``logger.*``, ``bgpo.loggers``): TensorBoard and W&B (offline) receive exactly the rows of
``metrics.jsonl``, continue across a resume, and never change the run key; pretraining logs its loss;
Hydra's job log of ``python -m bgpo.train`` records the run."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bgpo.loggers as loggers
import bgpo.train as bgpo_train
import bgpo.trainer as trainer
import tests.toy_task  # noqa: F401  (registers the toy task)
from bgpo.config import LoggerConf, ModelConfig, PretrainConfig, TaskConfig, to_container
from bgpo.pretrain import pretrain
from bgpo.results import run_name
from bgpo.train import run
from bgpo.validate import validate_train
from tests.helpers import micro_model
from tests.test_trainer import cfg_of

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "micro"
    micro_model(dtype=torch.float32).save(path)
    return path


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tb_scalars(log_dir: Path):
    """{tag: [(step, value)]} as TensorBoard reads the folder (purges applied), and the accumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}, acc


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file (W&B's LevelDB-style log: 7-byte file header,
    32 KiB blocks of records, each ``crc32 uint32, length uint16, type uint8`` + data; types
    1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, head = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", path
    pos, buf, out = head, b"", []
    while pos + head <= len(data):
        left = block - pos % block
        if left < head:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + head])
        if kind == 0:
            break
        buf += data[pos + head : pos + head + n]
        pos += head + n
        if kind in (1, 4):
            out.append(pb.Record.FromString(buf))
            buf = b""
    return out


# ---- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("override,key", [("logger.backends=[tensorboard,tensorbord]", "logger.backends"),
                                          ("logger.wandb_mode=cloud", "logger.wandb_mode"),
                                          ("logger.log_every=0", "logger.log_every")])
def test_bad_logger_config_fails_at_start_up(override, key, tmp_path):
    with pytest.raises(ValueError, match=key) as e:
        validate_train(cfg_of(tmp_path, tmp_path, override))
    if key == "logger.backends":
        assert "'tensorbord'" in str(e.value) and "['tensorboard', 'wandb']" in str(e.value)


def test_a_backend_whose_package_is_missing_fails_at_start_up(tmp_path, monkeypatch):
    real = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    with pytest.raises(ValueError, match=r"logger.backends: wandb needs the wandb package.*\[track\]"):
        validate_train(cfg_of(tmp_path, tmp_path, "logger.backends=[wandb]"))
    validate_train(cfg_of(tmp_path, tmp_path, "logger.backends=[tensorboard]"))


def test_logger_does_not_change_the_run_key(tmp_path):
    plain = run_name(to_container(cfg_of(tmp_path, tmp_path)))
    observed = run_name(to_container(cfg_of(tmp_path, tmp_path, "logger.backends=[tensorboard,wandb]",
                                            "logger.project=x", "logger.log_every=1")))
    assert plain == observed


# ---- TensorBoard: every row, across a kill and a resume ---------------------------------------
def test_tensorboard_gets_every_metrics_row_and_continues_after_a_resume(base_model, tmp_path, monkeypatch):
    cfg = cfg_of(base_model, tmp_path, "method=bgpo", "steps=5", "temperature=1.0",
                 "logger.backends=[tensorboard]")
    real, calls = trainer.peak_bytes, {"n": 0}

    def dies_at_step_4(device):  # rows 0-3 logged, checkpoint at step 2: step 3 is logged twice
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real(device)

    monkeypatch.setattr(trainer, "peak_bytes", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(trainer, "peak_bytes", real)
    summary = run(cfg)
    run_dir = tmp_path / summary["run"]
    rows = rows_of(run_dir)
    scalars, acc = tb_scalars(run_dir / "tb")
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 2  # one file per attempt
    # TensorBoard shows each step once (the first attempt's step 3 purged), with metrics.jsonl's values
    assert scalars["reward"] == [(r["step"], pytest.approx(r["reward"])) for r in rows if "reward" in r]
    assert [s for s, _ in scalars["reward"]] == [1, 2, 3, 4, 5]
    assert scalars["val/accuracy"] == [(r["step"], pytest.approx(r["val/accuracy"]))
                                       for r in rows if "val/accuracy" in r]
    assert [s for s, _ in scalars["val/accuracy"]] == [0, 2, 4, 5]
    every_key = {k for r in rows for k in r} - {"step"}
    assert every_key <= set(scalars), every_key - set(scalars)
    # the test sets (eval_test.json): base at step 0, final and validation-selected at the last step
    tests = json.loads((run_dir / "eval_test.json").read_text())
    assert scalars["test/own/accuracy"] == [(0, pytest.approx(tests["base"]["own"]["accuracy"])),
                                            (5, pytest.approx(tests["final"]["own"]["accuracy"]))]
    assert scalars["test_selected/own/reward"] == [(5, pytest.approx(tests["best"]["own"]["reward"]))]
    # the resolved config: a text summary and the HPARAMS tab's session info
    from tensorboard.plugins.hparams import plugin_data_pb2

    assert "config/text_summary" in acc.Tags()["tensors"]
    info = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert info.hparams["mc"].number_value == 2 and info.hparams["task.name"].string_value == "toy"


def test_a_fresh_start_starts_new_logs(base_model, tmp_path):
    """Start 0 (no checkpoint) removes an earlier attempt's logs, as it starts a new metrics.jsonl."""
    cfg = cfg_of(base_model, tmp_path, "method=wd1", "steps=1", "logger.backends=[tensorboard]")
    from bgpo.results import run_dir_of
    from bgpo.train import resolved_config

    stale = run_dir_of(resolved_config(cfg)) / "tb" / "events.out.tfevents.0.stale"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    run(cfg)
    assert not stale.exists() and len(list(stale.parent.glob("events.out.tfevents.*"))) == 1


# ---- pretraining ------------------------------------------------------------------------------
def test_pretraining_logs_its_loss_and_final_evaluation(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bgpo.pretrain")
    out = tmp_path / "tiny-countdown"
    cfg = PretrainConfig(task=TaskConfig(name="countdown"), steps=5, batch_size=4, n_train=32, eval_n=4,
                         out=str(out), device="cpu", logger=LoggerConf(backends=["tensorboard"], log_every=2),
                         model=ModelConfig(hidden=32, layers=2, heads=2, intermediate=64))
    summary = pretrain(cfg)
    scalars, _ = tb_scalars(out / "tb")
    assert [s for s, _ in scalars["loss"]] == [2, 4, 5]  # every log_every steps and the last
    assert scalars["loss"][-1][1] == pytest.approx(summary["final_loss"])  # step 5 alone
    assert scalars["val/accuracy"] == [(5, pytest.approx(summary["eval"]["accuracy"]))]
    assert not out.with_name(out.name + ".tmp").exists()
    assert "step 4/5: loss" in caplog.text and "step 5/5: val/accuracy" in caplog.text


# ---- the CLI: Hydra's job log and W&B offline -------------------------------------------------
def test_cli_job_log_and_wandb_offline_hold_the_run(base_model, tmp_path):
    results = tmp_path / "results"
    wb = tmp_path / "wandb-home"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path,
           "BGPO_TASK_MODULES": "tests.toy_task", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "WANDB_CONFIG_DIR": str(wb), "WANDB_CACHE_DIR": str(wb), "WANDB_DATA_DIR": str(wb)}
    env.pop("WANDB_DIR", None)  # the logs go to $WANDB_DIR when set, else the run folder
    cmd = [sys.executable, "-m", "bgpo.train", f"model.path={base_model}", f"results_dir={results}",
           "steps=3", "prompts_per_step=2", "group_size=3", "eval_n=4", "eval_every=2", "progress=false",
           "mc=2", "task.name=toy", "task.gen_length=8", "task.block_length=4", "task.diffusion_steps=4",
           "logger.backends=[wandb]", "logger.log_every=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (run_dir,) = [p for p in results.iterdir() if not p.name.startswith(".")]
    rows = rows_of(run_dir)

    # Hydra's job log (hydra.run.dir = <results_dir>/.hydra/run) holds what the console got
    job_log = (results / ".hydra" / "run" / "train.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    final = f"{run_dir}: test accuracy {bgpo_train.test_line(summary)}"
    assert final in job_log and final in proc.stdout
    assert f"training {run_dir}" in job_log
    for r in rows[1:]:  # logger.log_every=1: one INFO line per step, with reward and loss
        assert f"step {r['step']}/3: reward {r['reward']:.4g}, loss {r['loss']:.4g}" in job_log
    assert f"step 0/3: val/accuracy {rows[0]['val/accuracy']:.4g}" in job_log

    # W&B offline: one run in <run_dir>/wandb, id derived from the run folder, every row as history
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(wandb_file)
    (run_rec,) = [r.run for r in records if r.HasField("run")]
    assert run_rec.run_id == loggers.wandb_id(run_dir) and run_rec.display_name == run_dir.name
    config = {i.key: json.loads(i.value_json) for i in run_rec.config.update}
    assert config["mc"] == 2 and config["task"]["name"] == "toy" and config["logger"]["backends"] == ["wandb"]
    history = {}
    for r in records:
        if r.HasField("history"):
            item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(item["_step"], {}).update(item)
    assert sorted(history) == [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        logged = history[r["step"]]
        assert {k: pytest.approx(v) for k, v in r.items() if k != "step"} == {k: logged[k] for k in r
                                                                              if k != "step"}
    tests = json.loads((run_dir / "eval_test.json").read_text())
    assert history[0]["test/own/accuracy"] == pytest.approx(tests["base"]["own"]["accuracy"])
    assert history[3]["test/own/accuracy"] == pytest.approx(tests["final"]["own"]["accuracy"])


# ---- W&B follows its own environment conventions unless a logger.* key is set (issue 26) -------
def test_wandb_follows_its_environment_unless_a_key_is_set(tmp_path, monkeypatch):
    conf = cfg_of(tmp_path, tmp_path).logger
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    defaults = {"project": "bgpo", "mode": "offline", "dir": str(tmp_path)}
    assert loggers.wandb_settings(conf, tmp_path) == defaults
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "theirs")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    assert loggers.wandb_settings(conf, tmp_path) == {"project": "theirs", "mode": "disabled",
                                                      "dir": str(tmp_path / "elsewhere")}
    keys = cfg_of(tmp_path, tmp_path, "logger.project=mine", "logger.wandb_mode=offline").logger
    assert loggers.wandb_settings(keys, tmp_path)["project"] == "mine"
    assert loggers.wandb_settings(keys, tmp_path)["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "cloud")
    with pytest.raises(ValueError, match=r"\$WANDB_MODE='cloud' is not one of"):
        loggers.validate(conf)


def test_wandb_mode_disabled_writes_nothing(base_model, tmp_path, monkeypatch):
    """WANDB_MODE=disabled (the W&B convention) turns the W&B backend off: the run trains, no
    wandb/ folder is written."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    cfg = cfg_of(base_model, tmp_path, "method=wd1", "steps=1", "logger.backends=[wandb]")
    summary = run(cfg)
    run_dir = tmp_path / summary["run"]
    assert (run_dir / "summary.json").exists() and not any((run_dir / "wandb").glob("*run-*"))
