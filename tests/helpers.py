"""Shared test fixtures: a micro dLLM (float64) and random rollout batches."""

from __future__ import annotations

import types

import torch

from bgpo.elbo import Batch
from bgpo.model import DLLM, build_tiny

MICRO = dict(hidden=32, layers=2, heads=2, intermediate=64, max_len=64)


def micro_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> DLLM:
    model = build_tiny(seed=seed, dtype=dtype, **MICRO)
    model.net.eval()  # no dropout: deterministic logits
    if dtype == torch.float64:
        _norms_in_float64(model.net)
    return model


def _norms_in_float64(net: torch.nn.Module) -> None:
    """Gemma3's RMSNorm always computes in float32; keep float64 tests in float64 end to end."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    for mod in net.modules():
        if isinstance(mod, Gemma3RMSNorm):  # a BOUND method: copy.deepcopy rebinds it to the copy's weights
            mod.forward = types.MethodType(_norm64, mod)


def _norm64(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self._norm(x) * (1.0 + self.weight)


def random_batch(model: DLLM, n_prompts: int = 2, G: int = 3, P: int = 5, L: int = 6,
                 seed: int = 0, eos_at: int | None = None) -> Batch:
    """Prompts with left padding, random completions (EOS from ``eos_at`` when given)."""
    g = torch.Generator().manual_seed(seed)
    B = n_prompts * G
    V = len(model.tokenizer)
    prompt = torch.randint(4, V, (n_prompts, P), generator=g).repeat_interleave(G, 0)
    attn = torch.ones(B, P + L, dtype=torch.long)
    attn[:G, :2] = 0  # the first group's prompt is left-padded by two tokens
    prompt[:G, :2] = model.pad_token_id
    comp = torch.randint(4, V, (B, L), generator=g)
    if eos_at is not None:
        comp[:, eos_at:] = model.eos_token_id
    return Batch(torch.cat([prompt, comp], 1), attn, P, G)


def perturb(model: DLLM, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def grads(model: DLLM) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.net.parameters() if p.grad is not None])
