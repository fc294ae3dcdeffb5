"""The dLLM adapter (shift, mask id, padding, save/load) and the rollout sampler vs a reference."""

from __future__ import annotations

import pytest
import torch

from bgpo.model import DLLM, LLADA_MASK_ID, build_char_tokenizer, load_dllm
from bgpo.sampler import SamplerConfig, generate, transfer_schedule
from tests.helpers import micro_model


def test_char_tokenizer_round_trip():
    tok = build_char_tokenizer()
    text = "30,100,93=23|100-93+30"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.mask_token_id == 2 and tok.eos_token_id == 1 and tok.pad_token_id == 0


def test_left_padding_does_not_change_logits():
    model = micro_model()
    ids, mask = model.encode_prompts(["12,3,4=7|", "5,6=1|"])
    assert mask[1, :3].sum() == 0 and ids[1, 0] == model.pad_token_id
    padded = model.logits(ids, mask)[1, 3:]
    alone = model.logits(*model.encode_prompts(["5,6=1|"]))[0]
    assert torch.allclose(padded, alone, atol=1e-10)


def test_kinds_mask_ids_and_dream_shift():
    base = micro_model()
    llada = DLLM.wrap(base.net, base.tokenizer, kind="llada")
    assert llada.mask_token_id == LLADA_MASK_ID and not llada.shift
    dream = DLLM.wrap(base.net, base.tokenizer, kind="dream")
    assert dream.mask_token_id == base.tokenizer.mask_token_id and dream.shift
    x = torch.randint(4, 50, (2, 7))
    raw = base.net(input_ids=x).logits
    assert torch.equal(dream.logits(x)[:, 1:], raw[:, :-1])  # position i-1 predicts token i
    assert torch.equal(base.logits(x), raw)
    with pytest.raises(ValueError, match="model.kind"):
        DLLM.wrap(base.net, base.tokenizer, kind="gpt")


def test_save_load_round_trip(tmp_path):
    model = micro_model(dtype=torch.float32)
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    back = load_dllm("tiny", tmp_path / "m")
    x = torch.randint(4, 50, (2, 7))
    assert torch.equal(back.logits(x), model.logits(x))
    assert back.tokenizer.decode(back.tokenizer("1+2")["input_ids"]) == "1+2"
    assert (back.mask_token_id, back.eos_token_id) == (model.mask_token_id, model.eos_token_id)


def test_schedule_spreads_tokens_evenly():
    s = transfer_schedule(torch.tensor([8, 5, 0]), 3)
    assert s.tolist() == [[3, 3, 2], [2, 2, 1], [0, 0, 0]]


@pytest.mark.parametrize("bad", [dict(gen_length=30, block_length=8), dict(steps=6),
                                 dict(steps=-4), dict(temperature=-1.0)])
def test_bad_schedule_is_rejected(bad):
    with pytest.raises(ValueError, match="sampler."):
        SamplerConfig(**{**dict(gen_length=32, block_length=8, steps=32), **bad})


def reference_generate(model, prompt, cfg, noise):
    """One sequence, no padding, written straight from docs/methods.md §1 (loops, no batching tricks)."""
    L, bl = cfg.gen_length, cfg.block_length
    x = prompt.tolist() + [model.mask_token_id] * L
    P, steps_per_block = len(prompt), cfg.steps // (L // bl)
    for b in range(L // bl):
        lo = P + b * bl
        n = sum(1 for i in range(lo, lo + bl) if x[i] == model.mask_token_id)
        ks = [n // steps_per_block + (1 if s < n % steps_per_block else 0) for s in range(steps_per_block)]
        for s in range(steps_per_block):
            logits = model.logits(torch.tensor([x]))[0, lo : lo + bl].double()
            if cfg.temperature == 0:
                pred = logits.argmax(-1)
            else:
                pred = (logits / cfg.temperature - torch.log(-torch.log(next(noise)))).argmax(-1)
            probs = logits.softmax(-1)
            cands = [(probs[i, pred[i]].item(), i) for i in range(bl) if x[lo + i] == model.mask_token_id]
            cands.sort(key=lambda c: -c[0])
            for _, i in cands[: ks[s]]:
                x[lo + i] = int(pred[i])
    return x[P:]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sampler_matches_one_sequence_reference(temperature):
    model = micro_model()
    prompts = ["12,3,4=7|", "5,6=1|", "99,1,2,3=4|"]
    ids, mask = model.encode_prompts(prompts)
    cfg = SamplerConfig(gen_length=8, block_length=4, steps=6, temperature=temperature)
    out = generate(model, ids, mask, cfg, torch.Generator().manual_seed(0))
    assert out.shape == (3, 8) and not (out == model.mask_token_id).any()
    # the same noise stream, sliced per sequence: one [B, block, V] draw per step
    g = torch.Generator().manual_seed(0)
    V = model.net.config.vocab_size
    draws = [torch.rand((3, 4, V), generator=g, dtype=torch.float64) for _ in range(cfg.steps)]
    for b, text in enumerate(prompts):
        prompt = model.encode_prompts([text])[0][0]
        ref = reference_generate(model, prompt, cfg, iter(d[b].clamp_min(1e-300) for d in draws))
        assert out[b].tolist() == ref
