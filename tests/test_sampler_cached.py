"""The fast rollout sampler (``sampler.mode=cached``): exactness where it must be exact, the cache's
approximation pinned down to float64 round-off, valid outputs, fewer forward passes."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from bgpo.model import DLLM
from bgpo.sampler import SamplerConfig, generate
from bgpo.sampler_cached import _cached_pass, _full_pass, count_forwards
from tests.helpers import micro_model

PROMPTS = ["12,3,4=7|", "5,6=1|", "99,1,2,3=4|", "7,7=49|"]  # left-padded to different lengths


def _run(model, cfg, seed=0):
    ids, mask = model.encode_prompts(PROMPTS)
    with count_forwards(model.net) as nfe:
        out = generate(model, ids, mask, cfg, torch.Generator().manual_seed(seed))
    return out, nfe.calls


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("schedule", [dict(gen_length=16, block_length=8, steps=16),
                                      dict(gen_length=12, block_length=4, steps=6)])
def test_threshold_one_without_cache_is_the_reference(temperature, schedule):
    """No probability exceeds 1.0: the commit rule, the noise stream and the tokens are the reference's."""
    model = micro_model()
    ref, ref_nfe = _run(model, SamplerConfig(**schedule, temperature=temperature))
    out, nfe = _run(model, SamplerConfig(**schedule, temperature=temperature, mode="cached", cache="none"))
    assert torch.equal(out, ref) and nfe == ref_nfe == schedule["steps"]


def _state(model, decoded: int):
    """Left-padded prompts + 12 masked positions; ``decoded`` tokens committed in block [lo, lo+4)."""
    ids, pmask = model.encode_prompts(PROMPTS)
    B, P = ids.shape
    x = torch.full((B, P + 12), model.mask_token_id)
    x[:, :P] = ids
    x[:, P : P + 4] = 20  # an earlier, decoded block
    x[:, P + 4 : P + 4 + decoded] = torch.arange(30, 30 + decoded)
    attn = torch.cat([pmask, torch.ones(B, 12, dtype=pmask.dtype)], 1)
    return x, attn, (attn.cumsum(-1) - 1).clamp(min=0), P + 4, P + 8


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_pass_equals_full_pass_with_frozen_keys(cache):
    """The one approximation, stated exactly: the block's logits are those of a full forward pass in
    which the prefix's (dual: and the suffix's) keys/values are frozen at the block's first step."""
    model = micro_model()
    x0, attn, pos, lo, hi = _state(model, decoded=0)  # the block's first step: all masked
    logits0, kv = _full_pass(model, x0, attn, pos, lo, hi, cache)
    assert torch.equal(logits0, model.logits(x0, attn)[:, lo:hi])  # first step: the reference's logits
    # unchanged state: the cache reproduces the full pass (positions, padding, key order are right)
    assert torch.allclose(_cached_pass(model, x0, attn, pos, lo, hi, cache, kv), logits0, atol=1e-12)

    x1 = _state(model, decoded=3)[0]  # three tokens of the block committed since
    cached = _cached_pass(model, x1, attn, pos, lo, hi, cache, kv)
    frozen = torch.zeros(x1.shape[1], dtype=torch.bool)
    frozen[:lo] = True
    if cache == "dual":
        frozen[hi:] = True
    # the full pass on x1 with the frozen rows of every k/v projection replaced by x0's
    saved: dict[str, torch.Tensor] = {}
    projs = [(n, m) for n, m in model.net.named_modules() if n.endswith(("k_proj", "v_proj"))]
    record = [m.register_forward_hook(lambda m, i, o, n=n: saved.__setitem__(n, o)) for n, m in projs]
    model.logits(x0, attn)
    for h in record:
        h.remove()

    def freeze(m, i, o, n):
        return torch.where(frozen[None, :, None], saved[n], o)

    hooks = [m.register_forward_hook(lambda m, i, o, n=n: freeze(m, i, o, n)) for n, m in projs]
    try:
        expected = model.logits(x1, attn)[:, lo:hi]
    finally:
        for h in hooks:
            h.remove()
    assert torch.allclose(cached, expected, atol=1e-12)
    # ...and that is an approximation: the true full pass on x1 differs
    assert not torch.allclose(cached, model.logits(x1, attn)[:, lo:hi], atol=1e-6)


@pytest.mark.parametrize("cache", ["prefix", "dual", "none"])
@pytest.mark.parametrize("threshold", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_outputs_are_valid_for_left_padded_batches(cache, threshold, temperature):
    model = micro_model()
    cfg = SamplerConfig(gen_length=12, block_length=4, steps=6, temperature=temperature, mode="cached",
                        cache=cache, threshold=threshold)
    out, nfe = _run(model, cfg)
    assert out.shape == (len(PROMPTS), 12) and out.dtype == torch.long
    assert not (out == model.mask_token_id).any()
    assert ((out >= 0) & (out < model.net.config.vocab_size)).all()
    assert 3 <= nfe <= 6  # at least one step per block, at most the reference's steps


def test_prompt_padding_does_not_change_a_completion():
    model = micro_model()
    cfg = SamplerConfig(gen_length=12, block_length=4, steps=12, mode="cached", cache="dual", threshold=0.5)
    batch = _run(model, cfg)[0]
    ids, mask = model.encode_prompts(PROMPTS[1:2])
    alone = generate(model, ids, mask, cfg)
    assert torch.equal(batch[1], alone[0])


@pytest.mark.parametrize("cache", ["prefix", "dual", "none"])
def test_lower_threshold_uses_fewer_forward_passes(cache):
    model = micro_model()
    nfes = []
    for threshold in (1.0, 0.03, 0.0):
        cfg = SamplerConfig(gen_length=16, block_length=8, steps=16, mode="cached", cache=cache,
                            threshold=threshold)
        nfes.append(_run(model, cfg)[1])
    assert nfes[0] == 16  # one token per step
    assert nfes[2] == 2  # every masked prediction clears 0: one step per block
    assert nfes[0] >= nfes[1] >= nfes[2]


def test_remote_code_backend_warns_and_decodes_without_cache():
    base = micro_model()
    remote = DLLM.wrap(base.net, base.tokenizer, kind="llada", mask_token_id=base.mask_token_id,
                       remote_code=True)  # the published code: no cache path
    ids, mask = remote.encode_prompts(PROMPTS)
    kw = dict(gen_length=8, block_length=4, steps=8, mode="cached", threshold=0.5)
    with pytest.warns(UserWarning, match="not supported with model.remote_code=true"):
        out = generate(remote, ids, mask, SamplerConfig(**kw, cache="dual"))
    assert torch.equal(out, generate(remote, ids, mask, SamplerConfig(**kw, cache="none")))


@pytest.mark.parametrize("bad", [dict(mode="fast"), dict(threshold=1.5), dict(threshold=-0.1),
                                 dict(cache="suffix")])
def test_bad_fast_settings_are_rejected(bad):
    with pytest.raises(ValueError, match="sampler."):
        SamplerConfig(**bad)


def test_bench_rollout_writes_rows(tmp_path):
    from bgpo.bench.__main__ import main as bench_main

    micro_model(dtype=torch.float32).save(tmp_path / "micro")
    argv = ["rollout", "--model-path", str(tmp_path / "micro"), "--n-prompts", "4", "--batch-size", "2",
            "--thresholds", "1.0,0.5", "--caches", "dual,none", "--long-gen-lengths", "",
            "--threads", "1", "--out", str(tmp_path / "bench")]
    threads = torch.get_num_threads()
    try:
        assert bench_main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # the bench sets it process-wide
    out = tmp_path / "bench" / "rollout-cpu-micro.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["mode"], r["cache"], r["threshold"]) for r in rows] == [
        ("reference", None, 1.0), ("cached", "dual", 1.0), ("cached", "dual", 0.5),
        ("cached", "none", 1.0), ("cached", "none", 0.5)]
    keys = {"mode", "threshold", "tokens_per_s", "nfe", "accuracy", "batch_size", "gen_length", "device",
            "model", "commit"}
    assert all(r["cmd"] == "python -m bgpo.bench " + shlex.join(argv) for r in rows)
    assert all(keys <= r.keys() for r in rows) and rows[0]["nfe"] == 16 and rows[3]["agreement"] == 1.0
    # compute saved: none at threshold 1.0 processes what the reference does; the dual cache far less
    assert rows[0]["work_ratio"] == rows[3]["work_ratio"] == 1.0
    assert rows[1]["work_ratio"] > 1.5 and rows[2]["work_ratio"] >= rows[1]["work_ratio"]
    with pytest.raises(SystemExit, match="python -m bgpo.pretrain task=countdown"):
        bench_main(["rollout", "--model-path", str(tmp_path / "missing")])
