"""Layers shared by the native LLaDA and Dream models (``llada.py``, ``dream.py``).

Both are Llama-style pre-norm transformers WITHOUT a causal mask (LLaDA, arXiv 2502.09992 §2.1:
"a Transformer without a causal mask"; Dream-7B: Qwen2-7B's weights and layers, attention made
bidirectional). What they share lives here, written once:

- ``RMSNorm``: ``weight * x / rms(x)``, the statistics in float32 (both published files do so);
- RoPE in the rotate-half convention (both: ``x·cos + rotate_half(x)·sin``), computed from
  explicit position ids at every forward pass (no buffer to initialise or to lose on loading);
- ``attention``: ``F.scaled_dot_product_attention`` over every non-padding key, with grouped-query
  heads and an optional transformers ``Cache`` (the cached sampler's K/V, ``bgpo/sampler_cached.py``);
- the forward-pass glue: the 2-D padding mask turned into a key mask, default position ids, the
  cache, ``logits_to_keep``, the output object.

What differs (parameter names, biases, where RoPE is computed in float32) stays in each file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale and no bias.

    The mean square is taken in float32 (or wider: float64 models stay float64), the result is cast
    back to the input's dtype before the scale, as in both published files."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * wide.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """RoPE's ``cos, sin`` ``[B, 1, T, D]`` at ``position_ids`` ``[B, T]``.

    Frequencies ``theta^(-2i/D)``; computed in float32, or float64 for a float64 model."""
    wide = torch.promote_types(dtype, torch.float32)
    half = torch.arange(0, head_dim, 2, device=position_ids.device).to(wide) / head_dim  # [D/2]
    inv_freq = 1.0 / (theta**half)  # [D/2]
    freqs = position_ids.to(wide)[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, D]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """``x`` ``[B, H, T, D]`` rotated in ``compute_dtype``, returned in ``x``'s dtype."""
    xc = x.to(compute_dtype)
    x1, x2 = xc.chunk(2, dim=-1)  # [B, H, T, D/2] each
    rotated = torch.cat([-x2, x1], dim=-1)  # rotate_half
    return (xc * cos.to(compute_dtype) + rotated * sin.to(compute_dtype)).to(x.dtype)


def split_heads(t: Tensor, head_dim: int) -> Tensor:
    """``[B, T, H*D]`` -> ``[B, H, T, D]``."""
    B, T, _ = t.shape
    return t.view(B, T, -1, head_dim).transpose(1, 2)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, cache: Cache | None,
              layer_idx: int, dropout_p: float = 0.0) -> Tensor:
    """Bidirectional attention of ``q`` ``[B, H, T, D]`` over ``k, v`` ``[B, Hkv, T, D]``.

    With a ``cache``, this layer's cached keys/values come first (``[B, Hkv, S, D]``, S = cached + T)
    and the new ones are appended to it. ``key_mask`` ``[B, 1, 1, S]`` (True: may be attended) or
    None. Returns ``[B, T, H*D]``."""
    if cache is not None:
        k, v = cache.update(k, v, layer_idx)  # [B, Hkv, S, D]
    if k.shape[1] != q.shape[1]:  # grouped-query attention: one K/V head serves H/Hkv query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [B, H, S, D]
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)  # [B, H, T, D]
    return y.transpose(1, 2).flatten(2)  # [B, T, H*D]


def swiglu(x: Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> Tensor:
    """The SwiGLU MLP ``down(silu(gate(x)) * up(x))`` (``[B, T, C]`` -> ``[B, T, C]``)."""
    return down(F.silu(gate(x)) * up(x))


# ---- forward-pass glue --------------------------------------------------------------------------
@dataclass
class Inputs:
    """What every block needs besides the hidden states."""

    key_mask: Tensor | None
    """``[B, 1, 1, S]`` bool (True: a real token), or None when nothing is padded"""
    position_ids: Tensor
    """``[B, T]`` RoPE positions of the new tokens"""
    cache: Cache | None
    """the K/V cache to read and extend, or None"""


def prepare_inputs(input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                   cache: Cache | None, use_cache: bool | None) -> Inputs:
    """Normalise a forward call's arguments.

    ``attention_mask``: the tokenizer's ``[B, S]`` 0/1 mask over the cached AND the new positions,
    in cache order (S = cached + T); padded keys are never attended. A padded query still gets an
    output (it attends to the real tokens); a row without any real token attends to all its keys
    rather than producing NaN. A 4-D ``[B, 1, T, S]`` bool or additive float mask is passed to SDPA
    as it is. ``position_ids`` default to ``cached .. cached + T - 1`` for every row."""
    B, T = input_ids.shape
    if cache is None and use_cache:
        cache = DynamicCache()
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)
    key_mask = None
    if attention_mask is not None and attention_mask.dim() == 4:
        key_mask = attention_mask
    elif attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [batch, keys] with 1 on real tokens (what a tokenizer "
                             f"returns) or a 4-D SDPA mask; got shape {tuple(attention_mask.shape)}")
        real = attention_mask.bool()  # [B, S]
        # no padding: no mask, so SDPA may pick its fastest kernel (a memory plan on fake tensors,
        # bgpo.plan, cannot look at values: it takes the mask, the larger case)
        if is_fake(real) or not bool(real.all()):
            real = real | ~real.any(-1, keepdim=True)
            key_mask = real[:, None, None, :]  # [B, 1, 1, S]
    return Inputs(key_mask, position_ids, cache)


def is_fake(t: Tensor) -> bool:
    """A tensor without data (``FakeTensorMode`` or the meta device): its values cannot be read."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return t.device.type == "meta" or _is_fake(t)


def keep_positions(h: Tensor, logits_to_keep: int | Tensor) -> Tensor:
    """The hidden states ``[B, T, C]`` whose logits are wanted: all (0), the last n (int n), or the
    query positions a 1-D index tensor names (transformers' ``logits_to_keep`` convention)."""
    if isinstance(logits_to_keep, int):
        return h if logits_to_keep == 0 else h[:, -logits_to_keep:]
    return h[:, logits_to_keep]


CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
"""The name of the K/V cache, as a forward argument and an output field: transformers 5 renamed
``past_key_values`` to ``cache`` (the native models accept both)."""


def output(logits: Tensor, cache: Cache | None) -> CausalLMOutputWithPast:
    """The forward pass's result: ``.logits`` ``[B, T', V]`` and the cache (field ``CACHE_KWARG``)."""
    return CausalLMOutputWithPast(logits=logits, **{CACHE_KWARG: cache})
