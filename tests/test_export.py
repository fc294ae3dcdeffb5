"""Export (issue 12, item 7): a finished run's policy as a hub-format folder that ``load_dllm`` and
``python -m bgpo.evaluate`` read back with the trained policy's logits — on the micro model of
tests/test_trainer.py (plain and LoRA, merged or as an adapter) and on a native LLaDA miniature."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bgpo import evaluate
from bgpo.config import ModelConfig
from bgpo.export import ExportConfig, export
from bgpo.miniature import build_miniature
from bgpo.model import apply_lora, load_dllm
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
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"checkpoint={folder}", "task=countdown", f"n={n}",
                                             f"out={folder}", "device=cpu"])
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
