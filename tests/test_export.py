"""Export (issue 12, item 7): a finished run's policy as a hub-format folder that ``load_dllm`` and
``python -m bgpo.evaluate`` read back with the trained policy's logits — on the micro model of
tests/test_trainer.py (plain and LoRA, merged or as an adapter) and on a native LLaDA miniature."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bgpo import evaluate
from bgpo.config import ConfigError, ModelConfig
from bgpo.export import ExportConfig, export
from bgpo.miniature import build_miniature
from bgpo.model import apply_lora, load_dllm
from bgpo.results import StoreMismatch, UnreadableFile
from bgpo.train import run
from tests.helpers import micro_model
from tests.test_trainer import cfg_of

X = torch.tensor([[5, 9, 2, 40, 41, 42, 43], [7, 7, 8, 30, 31, 50, 51]])
MASK = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "micro"
    micro_model(dtype=torch.float32).save(path)
    return path


def trained(run_dir, kind: str, base, lora: bool = False):
    """The run's final policy rebuilt by hand: base + (LoRA) + last.pt's state."""
    model = load_dllm(kind, base)
    if lora:
        apply_lora(model, 4, 8, 0.0)
    model.net.load_state_dict(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"])
    return model.net.eval()


def logits(model, ids=X, mask=MASK) -> torch.Tensor:
    model.net.eval()
    with torch.no_grad():
        return model.logits(ids, mask)


def evaluated(folder, n: int = 2, **model_keys) -> dict:
    """``bgpo.evaluate`` on Countdown: the micro runs train on the toy task, which has no lm-eval
    task, so the mismatch is allowed explicitly (``task_mismatch=allow``)."""
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"checkpoint={folder}", "task=countdown", f"n={n}",
                                             f"out={folder}", "device=cpu", "task_mismatch=allow"])
    for k, v in model_keys.items():
        OmegaConf.update(cfg, f"model.{k}", v)
    return evaluate.run(cfg)


def test_micro_run_exports_a_folder_with_the_trained_logits_and_a_model_card(base_model, tmp_path):
    summary = run(cfg_of(base_model, tmp_path, "method=bgpo", "temperature=1.0", "steps=2"))
    run_dir = tmp_path / summary["run"]
    out = export(ExportConfig(run_dir=str(run_dir), which="final", out=str(tmp_path / "export")))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "bgpo_export.json"} <= {
        p.name for p in out.iterdir()}
    exported = load_dllm("tiny", out)
    ref = load_dllm("tiny", base_model)
    ref.net = trained(run_dir, "tiny", base_model)
    assert torch.equal(logits(exported), logits(ref))
    assert not torch.equal(logits(exported), logits(load_dllm("tiny", base_model)))  # it trained
    card = (out / "README.md").read_text()
    tests = json.loads((run_dir / "eval_test.json").read_text())
    assert f"| final | own | {tests['final']['own']['accuracy']:.4f} |" in card and "method:" in card
    best = export(ExportConfig(run_dir=str(run_dir), which="best", out=str(tmp_path / "best")))
    assert json.loads((best / "bgpo_export.json").read_text())["step"] == tests["best_step"]
    res = evaluated(out)  # python -m bgpo.evaluate checkpoint=<export> reads it back
    assert res["n"] == 2 and 0.0 <= res["accuracy"] <= 1.0


def test_lora_run_exports_merged_or_as_an_adapter(base_model, tmp_path):
    summary = run(cfg_of(base_model, tmp_path, "method=bgpo", "temperature=1.0", "steps=1", "lr=1e-2",
                         "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8",
                         "model.lora.dropout=0.0", "eval_every=0"))
    run_dir = tmp_path / summary["run"]
    ref = load_dllm("tiny", base_model)
    ref.net = trained(run_dir, "tiny", base_model, lora=True)
    for mode in ("merge", "adapter"):
        out = export(ExportConfig(run_dir=str(run_dir), out=str(tmp_path / mode), lora=mode))
        if mode == "merge":
            assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
            back = load_dllm("tiny", out)
        else:
            assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
            back = evaluate.load_adapter(out, OmegaConf.structured(ModelConfig), "cpu")
        torch.testing.assert_close(logits(back), logits(ref), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits(back), logits(load_dllm("tiny", base_model)), atol=1e-4)


def test_llada_miniature_bf16_mixed_run_exports_in_the_hub_format(tmp_path, monkeypatch):
    monkeypatch.setenv("BGPO_CACHE", str(tmp_path / "cache"))
    mini = build_miniature("llada")
    summary = run(cfg_of(mini, tmp_path, "method=bgpo", "temperature=1.0", "steps=1", "model.kind=llada",
                         "model.precision=bf16-mixed", "eval_every=0", "model.use_chat_template=true"))
    run_dir = tmp_path / summary["run"]
    out = export(ExportConfig(run_dir=str(run_dir), out=str(tmp_path / "export")))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
    exported = load_dllm("llada", out)
    ref = load_dllm("llada", mini)
    ref.net = trained(run_dir, "llada", mini)
    ids = torch.tensor([[640, 65, 66, 896, 896], [65, 70, 71, 896, 641]])
    assert torch.equal(logits(exported, ids, None), logits(ref, ids, None))  # float32 master weights
    half = export(ExportConfig(run_dir=str(run_dir), out=str(tmp_path / "bf16"), dtype="bfloat16"))
    assert load_dllm("llada", half, dtype="auto").net.model.transformer.wte.weight.dtype == torch.bfloat16
    model, _ = evaluate.load_model(OmegaConf.create({"checkpoint": str(out), "model": ModelConfig()}), "cpu")
    assert model.kind == "llada" and model.use_chat_template and model.mask_token_id == 896  # from the export
    assert evaluated(out, n=1)["n"] == 1  # python -m bgpo.evaluate checkpoint=<export>, model left default


def test_bad_exports_name_what_is_missing(base_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.yaml: not a run folder"):
        export(ExportConfig(run_dir=str(tmp_path)))
    cfg = cfg_of(base_model, tmp_path, "method=bgpo", "steps=1", "eval_every=0")
    summary = run(cfg)
    run_dir = tmp_path / summary["run"]
    (run_dir / "summary.json").rename(run_dir / "summary.moved")
    with pytest.raises(FileNotFoundError, match="not complete.*which=last"):
        export(ExportConfig(run_dir=str(run_dir)))
    assert export(ExportConfig(run_dir=str(run_dir), which="last")).is_dir()
    (run_dir / "checkpoints" / "best.pt").unlink()
    with pytest.raises(FileNotFoundError, match="best.pt does not exist"):
        export(ExportConfig(run_dir=str(run_dir), which="best"))
    with pytest.raises(ValueError, match="lora='fold'"):
        export(ExportConfig(run_dir=str(run_dir), which="last", lora="fold"))


# ---- nothing destroyed, nothing trusted, one sentence (issue 23, items 4, 6, 7) --------------
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(base_model, tmp_path_factory) -> Path:
    """A complete one-step micro run (toy task): its folder."""
    root = tmp_path_factory.mktemp("finished")
    return root / run(cfg_of(base_model, root, "method=bgpo", "steps=1", "eval_every=0"))["run"]


def copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / finished.name)
    return tmp_path / finished.name


def cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    """A suite command line in its own process, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BGPO_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=env, timeout=600)


def test_export_replaces_only_folders_it_made(finished, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (tmp_path / "mine.tmp").mkdir()  # a folder the old export deleted as its scratch space
    (tmp_path / "mine.tmp" / "keep.txt").write_text("mine too")
    with pytest.raises(ConfigError, match=f"out={out} holds files the suite did not write"):
        export(ExportConfig(run_dir=str(finished), out=str(out)))
    assert (out / "notes.txt").read_text() == "my notes" and len(list(out.iterdir())) == 1
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        export(ExportConfig(run_dir=str(finished), out=str(tmp_path / "a-file")))
    with pytest.raises(ConfigError, match="cannot be created"):
        export(ExportConfig(run_dir=str(finished), out=str(tmp_path / "a-file" / "sub")))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(ExportConfig(run_dir=str(finished), out=str(empty))) == empty  # an empty folder is fine
    first = (empty / "model.safetensors").read_bytes()
    assert export(ExportConfig(run_dir=str(finished), out=str(empty), dtype="bfloat16")) == empty  # its own
    assert (empty / "model.safetensors").read_bytes() != first
    assert (tmp_path / "mine.tmp" / "keep.txt").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "empty", "mine", "mine.tmp"]  # no scratch


def test_export_refuses_unreadable_files_and_another_runs_checkpoint(finished, tmp_path, caplog):
    d = copy_run(finished, tmp_path)
    last = d / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=False)
    torch.save({**state, "run": "bgpo-toy-mc2-s9-0123456789"}, last)
    with pytest.raises(StoreMismatch, match=f"{last} is a checkpoint of run bgpo-toy-mc2-s9-0123456789, not "
                                            f"of this run {d.name}"):
        export(ExportConfig(run_dir=str(d), out=str(tmp_path / "x")))
    del state["run"]  # written before checkpoints carried a run key: exported, with a warning
    torch.save(state, last)
    assert export(ExportConfig(run_dir=str(d), out=str(tmp_path / "x"))).is_dir()
    assert f"{last} records no run key" in caplog.text
    last.write_bytes(last.read_bytes()[:500])  # torn
    with pytest.raises(UnreadableFile, match=f"{last} is not a readable checkpoint"):
        export(ExportConfig(run_dir=str(d), out=str(tmp_path / "x")))
    with pytest.raises(UnreadableFile, match=f"{last} is not a readable checkpoint"):
        evaluate.load_model(OmegaConf.create({"checkpoint": str(last), "base": None, "task": {"name": "toy"},
                                              "model": ModelConfig()}), "cpu")
    (d / "config.yaml").write_text("method: [unclosed\n")
    with pytest.raises(UnreadableFile, match=f"{d / 'config.yaml'} is unreadable"):
        export(ExportConfig(run_dir=str(d), out=str(tmp_path / "x")))


def test_export_and_evaluate_command_lines_give_one_sentence(finished, tmp_path):
    d = copy_run(finished, tmp_path)
    last = d / "checkpoints" / "last.pt"
    last.write_bytes(b"not a checkpoint")
    p = cli("bgpo.export", f"run_dir={d}", "which=last", cache=tmp_path / "cache")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"[bgpo.export] {last} is not a readable checkpoint" in p.stderr
    (theirs := tmp_path / "theirs").mkdir()
    (theirs / "notes.txt").write_text("mine")
    p = cli("bgpo.export", f"run_dir={finished}", f"out={theirs}", cache=tmp_path / "cache")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"[bgpo.export] out={theirs} holds files the suite did not write (no bgpo_export.json" in p.stderr
    assert [f.name for f in theirs.iterdir()] == ["notes.txt"]
    (d / "config.yaml").write_text("\x00garbage: [\n")
    p = cli("bgpo.evaluate", f"checkpoint={last}", "task=countdown", "device=cpu", cache=tmp_path / "cache")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"[bgpo.evaluate] {d / 'config.yaml'} is unreadable" in p.stderr


def test_evaluate_refuses_a_policy_of_another_task(finished, tmp_path):
    def validated(checkpoint: Path, task: str, *extra: str) -> None:
        with initialize_config_module("bgpo.conf", version_base="1.3"):
            cfg = compose("evaluate", overrides=[f"checkpoint={checkpoint}", f"task={task}", *extra])
        evaluate.validate_evaluate(cfg)

    folder = tmp_path / "countdown-export"
    folder.mkdir()
    (folder / "bgpo_export.json").write_text(json.dumps({"task": "countdown", "eval_tasks": []}))
    with pytest.raises(ConfigError, match=r"task=sudoku: .* a policy trained for countdown .*task_mismatch"):
        validated(folder, "sudoku")
    validated(folder, "sudoku", "task_mismatch=allow")
    validated(folder, "countdown")
    (folder / "bgpo_export.json").write_text(json.dumps({"run": "bgpo-countdown-mc16-s0-df214f6aa8"}))
    with pytest.raises(ConfigError, match="trained for countdown"):  # an export that predates "task"
        validated(folder, "sudoku")
    with pytest.raises(ConfigError, match=r"a policy trained for toy \(.*config.yaml\)"):  # a trainer .pt
        validated(finished / "checkpoints" / "last.pt", "countdown")
    with pytest.raises(ConfigError, match="task_mismatch='maybe' is not one of"):
        validated(folder, "countdown", "task_mismatch=maybe")


def test_evaluate_command_line_refuses_another_task_in_one_sentence(finished, tmp_path):
    last = finished / "checkpoints" / "last.pt"
    p = cli("bgpo.evaluate", f"checkpoint={last}", "task=sudoku", "device=cpu", cache=tmp_path / "cache")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert (f"[bgpo.evaluate] bad setting: task=sudoku: checkpoint={last} is a policy trained for toy "
            f"({finished / 'config.yaml'}), so its score on sudoku would measure nothing it learned; pass "
            "that task, or task_mismatch=allow to score it anyway\n") in p.stderr
    assert not (finished / "eval.json").exists()


@pytest.mark.parametrize("file,garbage", [("config.json", b"{garbage"), ("config.json", b"null"),
                                          ("model.safetensors", b"\x00garbage"), ("tokenizer.json", b"{")])
def test_unreadable_model_folders_are_one_sentence(file, garbage, base_model, finished, tmp_path):
    """A model folder (an export, or the base of a run) whose files do not parse: evaluate and export
    name the folder, whatever the parser raised."""
    folder = tmp_path / "model"
    shutil.copytree(base_model, folder)
    (folder / file).write_bytes(garbage)
    expected = f"{folder} is not a readable model folder"
    with pytest.raises(UnreadableFile, match=expected):
        evaluate.load_model(OmegaConf.create({"checkpoint": str(folder), "model": ModelConfig()}), "cpu")
    with pytest.raises(UnreadableFile, match=expected):
        evaluate.load_model(OmegaConf.create({"checkpoint": str(finished / "checkpoints" / "last.pt"),
                                              "base": str(folder), "task": {"name": "toy"},
                                              "model": ModelConfig()}), "cpu")
    with pytest.raises(UnreadableFile, match=expected):
        export(ExportConfig(run_dir=str(finished), out=str(tmp_path / "x"), base=str(folder)))
    assert not (tmp_path / "x").exists()


def test_evaluate_unreadable_json_and_out_that_is_a_file(finished, tmp_path):
    def validated(*overrides: str) -> None:
        with initialize_config_module("bgpo.conf", version_base="1.3"):
            evaluate.validate_evaluate(compose("evaluate", overrides=list(overrides)))

    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "bgpo_export.json").write_text("{garbage")
    with pytest.raises(UnreadableFile, match=f"{export_dir / 'bgpo_export.json'} is unreadable"):
        validated(f"checkpoint={export_dir}", "task=countdown")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=f"out={tmp_path / 'a-file'} is a file, not a folder"):
        validated(f"checkpoint={finished / 'checkpoints' / 'last.pt'}", "task=countdown",
                  "task_mismatch=allow", f"out={tmp_path / 'a-file'}")
    (eval_json := tmp_path / "eval.json").write_text('{"bgpo_countdown": ')
    with pytest.raises(UnreadableFile, match=f"{eval_json} is unreadable .*: the result is not merged"):
        evaluate.read_eval_json(eval_json)
    assert eval_json.read_text() == '{"bgpo_countdown": '  # kept, not overwritten
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("[1, 2")
    with pytest.raises(UnreadableFile, match=f"{adapter / 'adapter_config.json'} is unreadable"):
        evaluate.load_model(OmegaConf.create({"checkpoint": str(adapter), "model": ModelConfig()}), "cpu")


def test_export_final_needs_the_runs_own_summary(finished, tmp_path):
    """which=final exports only a complete run: a summary of another seed's run is no proof."""
    d = copy_run(finished, tmp_path)
    s = json.loads((d / "summary.json").read_text())
    (d / "summary.json").write_text(json.dumps({**s, "seed": 7}))
    with pytest.raises(FileNotFoundError, match=r"is not complete \(the summary of another run \(seed=7 "
                                                r"where the run's is 0\)\): which=last exports"):
        export(ExportConfig(run_dir=str(d), out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists() and (d / "summary.json").is_file()  # reported, not moved
    assert export(ExportConfig(run_dir=str(d), which="last", out=str(tmp_path / "x"))).is_dir()
