"""The native LLaDA and Dream (``bgpo.models``) against the published code's logits.

Golden fixtures: ``<repo root>/../shared/fixtures/{llada_tiny,dream_tiny}`` — 2-layer random
checkpoints in the published hub format plus the logits the published modeling code computed on
them (their README.txt says how). Skipped, with the reason, where the folder is absent.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import bgpo.sampler_cached as sc
from bgpo.model import DLLM, load_dllm
from bgpo.sampler import SamplerConfig, generate

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
ARCHS = {"llada": ("llada_tiny", 336), "dream": ("dream_tiny", 466)}  # folder, mask id of the fixture
KINDS = list(ARCHS)


def folder(kind: str) -> Path:
    path = FIXTURES / ARCHS[kind][0]
    if not (path / "golden.safetensors").is_file():
        pytest.skip(f"golden fixture {path} not found (the project's shared/fixtures folder)")
    return path


def load(kind: str, dtype: str = "float32", path: Path | None = None) -> DLLM:
    model = load_dllm(kind, path or folder(kind), dtype=dtype, mask_token_id=ARCHS[kind][1])
    model.net.eval()
    return model


def golden(kind: str) -> dict[str, torch.Tensor]:
    return load_file(folder(kind) / "golden.safetensors")


def compared(kind: str, attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions to compare: real tokens; for Dream not each row's first real token (after the shift
    it holds a pad position's output; it is never scored)."""
    keep = attention_mask.bool().clone()  # [B, T]
    if kind == "dream":
        first = attention_mask.long().argmax(-1)  # [B] index of the first real token
        keep[torch.arange(len(keep)), first] = False
    return keep


# ---- logits ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_the_published_code(kind):
    model, g = load(kind), golden(kind)
    with torch.no_grad():
        raw = model.net(input_ids=g["input_ids"]).logits  # no mask: the network itself
        out = model.logits(g["input_ids"], g["attention_mask"])  # what the suite computes with
    torch.testing.assert_close(raw, g["logits_no_attention_mask"], atol=1e-5, rtol=0)
    keep = compared(kind, g["attention_mask"])
    torch.testing.assert_close(out[keep], g["expected_dllm_logits"][keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_rows_equal_each_row_alone(kind):
    model, g = load(kind), golden(kind)
    ids, mask = g["input_ids"], g["attention_mask"]
    keep = compared(kind, mask)
    with torch.no_grad():
        batch = model.logits(ids, mask)  # [3, 16, V]
        for b in range(len(ids)):
            real = mask[b].bool()
            alone = model.logits(ids[b : b + 1, real])[0]  # [L_b, V], no padding at all
            first = 1 if kind == "dream" else 0  # Dream: the first position holds a pad's output
            published = g[f"expected_dllm_logits_row{b}_alone" if kind == "dream" else f"logits_row{b}_alone"]
            torch.testing.assert_close(batch[b][keep[b]], alone[first:], atol=1e-5, rtol=0)
            torch.testing.assert_close(alone[first:], published[first:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_auto_classes_pick_the_native_model(kind):
    from transformers import AutoConfig, AutoModel

    from bgpo.lm_eval_model import detect_kind
    from bgpo.models import NATIVE

    path = folder(kind)
    assert "auto_map" in json.loads((path / "config.json").read_text())  # the hub's remote-code pointer
    net = AutoModel.from_pretrained(path)  # no trust_remote_code
    assert type(net) is NATIVE[kind] and type(AutoConfig.from_pretrained(path)) is NATIVE[kind].config_class
    assert detect_kind(path) == kind


def test_default_configs_build_the_published_8b_and_7b_shapes():
    """docs/methods.md §1: LLaDA-8B has 291 tensors (untied, no biases); Dream-7B is Qwen2-7B (GQA 28/4)."""
    from bgpo.models import DreamModel, LLaDAModelLM

    shapes = {LLaDAModelLM: (291, 8.0156e9, "model.transformer.blocks.31.k_proj.weight", (4096, 4096)),
              DreamModel: (339, 7.6156e9, "model.layers.27.self_attn.k_proj.bias", (512,))}
    for cls, (n_tensors, n_params, name, shape) in shapes.items():
        with torch.device("meta"):  # no memory
            sd = cls(cls.config_class()).state_dict()
        assert len(sd) == n_tensors and tuple(sd[name].shape) == shape
        assert abs(sum(t.numel() for t in sd.values()) - n_params) < 1e6


# ---- saving --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_writes_the_hub_format(kind, tmp_path):
    model = load(kind)
    model.save(tmp_path / "m")
    hub = json.loads((folder(kind) / "config.json").read_text())
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    renamed = {"torch_dtype", "dtype"}  # transformers 5 writes dtype for torch_dtype
    assert set(hub) ^ set(saved) in (renamed, set())
    assert {k: v for k, v in saved.items() if k in hub and k != "transformers_version"} == {
        k: v for k, v in hub.items() if k in saved and k != "transformers_version"}
    with safe_open(folder(kind) / "model.safetensors", "pt") as a, \
            safe_open(tmp_path / "m" / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    back = load(kind, path=tmp_path / "m")
    x, mask = golden(kind)["input_ids"], golden(kind)["attention_mask"]
    with torch.no_grad():
        assert torch.equal(back.logits(x, mask), model.logits(x, mask))


# ---- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    model, g = load(kind), golden(kind)
    model.net.train()  # dropout is 0 in both configs
    target = torch.randint(0, 512, g["input_ids"].shape, generator=torch.Generator().manual_seed(0))

    def grads() -> list[torch.Tensor]:
        model.net.zero_grad()
        logits = model.logits(g["input_ids"], g["attention_mask"])  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(logits[g["attention_mask"].bool()],
                                                 target[g["attention_mask"].bool()])
        loss.backward()
        return [p.grad.clone() for p in model.net.parameters()]

    calls = []
    name = "k_proj"  # inside every block: recomputed in the backward pass under checkpointing
    for n, m in model.net.named_modules():
        if n.endswith(name):
            m.register_forward_hook(lambda *a: calls.append(1))
    plain = grads()
    n_plain = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 prefers activation_checkpointing_*
        model.net.gradient_checkpointing_enable()
    checkpointed = grads()
    assert len(calls) - n_plain == 2 * n_plain  # each block ran twice: forward, then recomputed
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


# ---- the KV cache of the fast sampler (as tests/test_sampler_cached.py pins it for tiny) --------
def _state(kind: str, model: DLLM, decoded: int):
    """The fixture's left-padded rows cut to 10 prompt positions + 12 masked ones: an earlier decoded
    block [P, P+4), the current block [P+4, P+8) with ``decoded`` tokens committed, a masked suffix."""
    g = golden(kind)
    ids, pmask = g["input_ids"][:, :10], g["attention_mask"][:, :10]  # rows with 0, 5 and 8 pads
    B, P = ids.shape
    x = torch.full((B, P + 12), model.mask_token_id)
    x[:, :P] = ids
    x[:, P : P + 4] = 20
    x[:, P + 4 : P + 4 + decoded] = torch.arange(30, 30 + decoded)
    attn = torch.cat([pmask, torch.ones(B, 12, dtype=pmask.dtype)], 1)
    return x, attn, (attn.cumsum(-1) - 1).clamp(min=0), P + 4, P + 8


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_pass_equals_full_pass_with_frozen_keys(kind, cache):
    model = load(kind, dtype="float64")
    x0, attn, pos, lo, hi = _state(kind, model, decoded=0)
    with torch.no_grad():
        logits0, kv = sc._full_pass(model, x0, attn, pos, lo, hi, cache)
        assert torch.equal(logits0, model.logits(x0, attn)[:, lo:hi])  # first step: the reference's
        assert torch.allclose(sc._cached_pass(model, x0, attn, pos, lo, hi, cache, kv), logits0, atol=1e-12)
        x1 = _state(kind, model, decoded=3)[0]
        cached = sc._cached_pass(model, x1, attn, pos, lo, hi, cache, kv)
        frozen = torch.zeros(x1.shape[1], dtype=torch.bool)
        frozen[: lo - int(model.shift)] = True  # Dream recomputes lo-1 (its logits predict token lo)
        if cache == "dual":
            frozen[hi:] = True
        # the full pass on x1 with the frozen rows of every k/v projection replaced by x0's
        saved: dict[str, torch.Tensor] = {}
        projs = [(n, m) for n, m in model.net.named_modules() if n.endswith(("k_proj", "v_proj"))]
        record = [m.register_forward_hook(lambda m, i, o, n=n: saved.__setitem__(n, o)) for n, m in projs]
        model.logits(x0, attn)
        for h in record:
            h.remove()
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: torch.where(frozen[None, :, None], saved[n], o))
                 for n, m in projs]
        try:
            expected = model.logits(x1, attn)[:, lo:hi]
        finally:
            for h in hooks:
                h.remove()
        assert torch.allclose(cached, expected, atol=1e-12)
        assert not torch.allclose(cached, model.logits(x1, attn)[:, lo:hi], atol=1e-6)  # an approximation


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("kind", KINDS)
def test_first_step_of_every_block_is_the_reference(kind, cache, monkeypatch):
    model = load(kind, dtype="float64")
    ids, mask = model.encode_prompts(["12,3,4=7|", "5,6=1|", "99,1,2,3=4|"])
    firsts = []

    def checked_full_pass(m, x, attn, pos, lo, hi, c):
        logits, kv = full_pass(m, x, attn, pos, lo, hi, c)
        assert torch.equal(logits, m.logits(x, attn)[:, lo:hi])  # the state the sampler is in
        firsts.append(lo)
        return logits, kv

    full_pass = sc._full_pass
    monkeypatch.setattr(sc, "_full_pass", checked_full_pass)
    kw = dict(gen_length=12, block_length=4, temperature=0.8)
    cfg = SamplerConfig(**kw, steps=6, mode="cached", cache=cache)
    out = generate(model, ids, mask, cfg, torch.Generator().manual_seed(0))
    assert len(firsts) == 3 and not (out == model.mask_token_id).any()
    # one step per block: every step is a block's first, so the cached sampler IS the reference
    one = dict(kw, steps=3)
    ref = generate(model, ids, mask, SamplerConfig(**one), torch.Generator().manual_seed(0))
    fast = generate(model, ids, mask, SamplerConfig(**one, mode="cached", cache=cache),
                    torch.Generator().manual_seed(0))
    assert torch.equal(fast, ref)


# ---- the remote-code opt-in --------------------------------------------------------------------
class _Recorder(torch.nn.Module):
    """Stands in for a published network: records what DLLM.logits hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.kwargs: dict = {}

    def forward(self, input_ids, **kwargs):
        self.kwargs = kwargs
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 5)})()


@pytest.mark.parametrize("kind", KINDS)
def test_remote_code_gets_the_inputs_its_forward_takes(kind):
    base = load("llada")
    net = _Recorder()
    model = DLLM.wrap(net, base.tokenizer, kind, mask_token_id=3, remote_code=True)
    x, mask = torch.ones(2, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    model.logits(x, mask)
    if kind == "llada":  # the published LLaDA takes no position ids
        assert "position_ids" not in net.kwargs and torch.equal(net.kwargs["attention_mask"], mask)
    else:  # the published Dream hands its mask to SDPA: a [B, 1, T, T] bool key mask
        am = net.kwargs["attention_mask"]
        assert am.shape == (2, 1, 4, 4) and am.dtype == torch.bool and not am[0, 0, :, 0].any()
    native = DLLM.wrap(net, base.tokenizer, kind, mask_token_id=3)
    native.logits(x, mask)
    assert torch.equal(net.kwargs["attention_mask"], mask) and "position_ids" in net.kwargs
    with pytest.warns(UserWarning, match="not supported with model.remote_code=true"):
        assert sc.resolve_cache(model, "dual") == "none"
    assert sc.resolve_cache(native, "dual") == "dual"


# ---- bad input: one sentence -------------------------------------------------------------------
def _copy(kind: str, dest: Path, config: dict | None = None, weights: dict | None = None) -> Path:
    """The fixture's files linked into ``dest`` (a temporary folder), config / weights rewritten."""
    dest.mkdir()
    for f in folder(kind).iterdir():
        if f.name != "golden.safetensors":
            (dest / f.name).symlink_to(f)
    if config is not None:
        (dest / "config.json").unlink()
        (dest / "config.json").write_text(json.dumps(config))
    if weights is not None:
        (dest / "model.safetensors").unlink()
        save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_renamed_parameters_are_named(tmp_path):
    sd = load_file(folder("llada") / "model.safetensors")
    renamed = {k.replace(".blocks.1.", ".layers.1."): v for k, v in sd.items()}
    bad = _copy("llada", tmp_path / "bad", weights=renamed)
    with pytest.raises(ValueError, match=r"bad: the checkpoint's parameters do not match LLaDAModelLM "
                                         r"\(missing: model\.transformer\.blocks\.1\..*\(\+6 more\); "
                                         r"unexpected: model\.transformer\.layers\.1\."):
        load_dllm("llada", bad)


def test_wrong_shape_is_named(tmp_path):
    sd = load_file(folder("dream") / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(32)
    bad = _copy("dream", tmp_path / "bad", weights=sd)
    with pytest.raises(ValueError, match="of another shape: model.norm.weight"):
        load_dllm("dream", bad)


def test_config_of_another_model_type_names_the_file_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"llada_tiny/config.json has model_type='llada' but model.kind="
                                         r"'dream' needs model_type 'Dream' \(it is a model.kind=llada"):
        load_dllm("dream", folder("llada"))
    with pytest.raises(ValueError, match="needs model_type 'gemma3_text'"):
        load_dllm("tiny", folder("dream"))


def test_unsupported_setting_names_the_key(tmp_path):
    cfg = json.loads((folder("llada") / "config.json").read_text())
    bad = _copy("llada", tmp_path / "bad", config={**cfg, "alibi": True})
    with pytest.raises(ValueError, match="LLaDA config alibi=True is not implemented.*remote_code=true"):
        load_dllm("llada", bad)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_dllm("llada", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_dllm("dream", tmp_path / "empty")
