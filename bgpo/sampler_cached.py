"""Fast rollouts: block-wise KV cache + confidence-threshold parallel decoding (``sampler.mode=cached``).

The same block-wise, left-to-right schedule as the reference sampler (``bgpo.sampler``), with two
independent speed-ups (facts from Fast-dLLM, arXiv 2505.22618; the code is ours):

Parallel decoding (``sampler.threshold``). At each step of a block, commit the reference
schedule's ``k`` most confident masked predictions (``k`` = 1 when steps = gen_length) AND every
masked position whose confidence (softmax probability of its chosen token) exceeds ``threshold``.
A block ends as soon as it has no masked position left, so it takes at most the reference's
steps; rows of the batch that are done sit out the block's remaining forward passes. No
probability exceeds 1.0, so ``threshold = 1.0`` commits exactly the reference's tokens.

KV cache (``sampler.cache``). At the first step of each block one full forward pass over the
whole sequence (prompt, decoded blocks, the all-masked current block and suffix) gives that
step's logits — identical to the reference's — and every position's keys/values. The block's
later steps reuse them:
- ``prefix``: the prompt's and decoded blocks' K/V come from the cache; the current block AND the
  masked suffix are recomputed every step (queries ``[lo:T]``, keys ``[0:T]``).
  Approximation: the prefix's K/V are those of the block's first step, when the block was all
  masks; in the reference they would see the block's newly committed tokens (attention is
  bidirectional, so a prefix position's hidden states at layer >= 1 depend on the block).
- ``dual``: the masked suffix's K/V are cached too; only the current block is recomputed
  (queries ``[lo:hi]``). Approximation: the prefix's AND the suffix's K/V are stale in the same way.
- ``none``: a full forward pass every step (no approximation; only the threshold acts).
Given the cached K/V, the forward pass is exact: the block's logits equal those of a full pass
whose prefix (and suffix) keys/values are frozen at the block's first step
(``tests/test_sampler_cached.py`` checks it to float64 round-off). Attention being bidirectional,
the order of the keys does not matter, so the dual cache keeps ``[prefix, suffix]`` and the
block's fresh K/V are appended behind them, with the attention mask permuted alike.
No cache that reuses the prompt's K/V within a block can reproduce the reference beyond the
block's first step, the first block included. What it costs is measured, not assumed: on the tiny
Countdown model (``python -m bgpo.bench rollout``) the cache changed ~70% of greedy completions and
lowered accuracy from 9.8% to ~4%, whereas ``cache=none`` with threshold 0.9 kept 99.6% of them.

Backends: every ``model.kind`` has the cache when its network is native — the tiny Gemma3
(transformers) and the suite's LLaDA and Dream (``bgpo.models``) take the same call: ``cache``
(``past_key_values`` before transformers 5) = a ``DynamicCache``, ``position_ids``,
``logits_to_keep``, a 2-D ``attention_mask`` over the cached then the new keys. Dream's logits are
shifted (position ``i-1`` predicts token ``i``), so for it the recomputed query starts one
position earlier, at ``lo-1`` (the last prefix token, or the previous block's last token): its K/V
are recomputed at every step instead of cached, and its logits give the block's first token.
The published remote code (``model.remote_code=true``) has no usable cache (LLaDA's forward
asserts none; Dream's cache path under bidirectional masks is unverified): it falls back, with a
warning, to ``cache=none`` (threshold parallel decoding works for every backend; with
threshold = 1.0 that is exactly the reference sampler).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bgpo.model import DLLM
from bgpo.models.layers import CACHE_KWARG
from bgpo.sampler_config import SamplerConfig, gumbel_argmax, transfer_schedule

CACHE_KINDS = ("tiny", "llada", "dream")  # backends whose native forward takes a DynamicCache

KV = list[tuple[Tensor, Tensor]]  # per layer: keys, values [B, H, S, D]


def _full_pass(model: DLLM, x: Tensor, attn: Tensor, pos: Tensor, lo: int, hi: int,
               cache: str) -> tuple[Tensor, KV]:
    """First step of a block: a full forward pass; its block logits and the K/V to reuse."""
    s = int(model.shift)
    a = lo - s  # first position whose K/V are recomputed (Dream: lo-1, whose logits predict token lo)
    with model.autocast():  # bf16-mixed: the same precision as DLLM.logits
        out = model.net(input_ids=x, attention_mask=attn, position_ids=pos, use_cache=True)
    kv = []
    for layer in getattr(out, CACHE_KWARG).layers:
        k, v = layer.keys, layer.values  # [B, H, T, D]
        if cache == "prefix":
            kv.append((k[:, :, :a], v[:, :, :a]))
        else:  # dual: prefix and suffix, the block (and Dream's lo-1) left out: it is recomputed
            kv.append((torch.cat([k[:, :, :a], k[:, :, hi:]], 2),
                       torch.cat([v[:, :, :a], v[:, :, hi:]], 2)))
    return out.logits[:, a : hi - s], kv


def _cached_pass(model: DLLM, x: Tensor, attn: Tensor, pos: Tensor, lo: int, hi: int,
                 cache: str, kv: KV) -> Tensor:
    """Later steps: recompute the block (+ the suffix for ``prefix``) against the cached K/V."""
    from transformers import DynamicCache

    a = lo - int(model.shift)  # first recomputed position (Dream: lo-1, whose logits predict token lo)
    if cache == "prefix":  # keys: cached [0:a] + fresh [a:T]
        q, mask = slice(a, None), attn
    else:  # keys: cached [0:a] + [hi:T], then fresh [a:hi]
        q, mask = slice(a, hi), torch.cat([attn[:, :a], attn[:, hi:], attn[:, a:hi]], 1)
    with model.autocast():
        out = model.net(input_ids=x[:, q], attention_mask=mask, position_ids=pos[:, q],
                        **{CACHE_KWARG: DynamicCache(ddp_cache_data=kv)}, use_cache=True,
                        logits_to_keep=torch.arange(hi - lo, device=x.device))
    return out.logits  # [B, hi-lo, V]


def resolve_cache(model: DLLM, cache: str) -> str:
    """The cache this backend can use: ``cache``, or ``none`` (with a warning) where unsupported."""
    if cache != "none" and (model.kind not in CACHE_KINDS or model.remote_code):
        how = "with model.remote_code=true" if model.remote_code else f"for model.kind={model.kind!r}"
        warnings.warn(f"sampler.cache={cache!r} is not supported {how} "
                      "(see bgpo.sampler_cached); decoding with full forward passes (sampler.cache=none: "
                      "threshold parallel decoding still applies, threshold=1.0 is the reference sampler)",
                      stacklevel=3)
        return "none"
    return cache


@torch.no_grad()
def generate_cached(model: DLLM, prompt_ids: Tensor, prompt_mask: Tensor, cfg: SamplerConfig,
                    generator: torch.Generator | None = None, progress: bool = False,
                    return_trace: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Completions ``[B, gen_length]`` for left-padded prompts ``[B, P]`` (see the module doc); with
    ``return_trace`` also the step that committed each position (``bgpo.sampler.generate``)."""
    cache = resolve_cache(model, cfg.cache)
    B, P = prompt_ids.shape
    L, bl = cfg.gen_length, cfg.block_length
    n_blocks = L // bl
    steps_per_block = cfg.steps // n_blocks
    dev, M = prompt_ids.device, model.mask_token_id
    x = torch.full((B, P + L), M, dtype=torch.long, device=dev)  # [B, P+L]
    x[:, :P] = prompt_ids
    attn = torch.cat([prompt_mask, torch.ones(B, L, dtype=prompt_mask.dtype, device=dev)], 1)
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)  # as DLLM.logits: left padding starts at 0
    trace = torch.full((B, L), -1, dtype=torch.long, device=dev)  # [B, L] step that committed each position
    bar = tqdm(total=cfg.steps, desc="rollout (cached)", disable=not progress, leave=False)
    for b in range(n_blocks):
        lo, hi = P + b * bl, P + (b + 1) * bl
        schedule = transfer_schedule((x[:, lo:hi] == M).sum(-1), steps_per_block)  # [B, steps]
        kv: KV = []
        for s in range(steps_per_block):
            masked = x[:, lo:hi] == M  # [B, bl]
            active = masked.any(1)  # rows still decoding this block
            if not active.any():
                break  # the block is done early (parallel decoding)
            # rows that are done sit out (fewer FLOPs; the NFE is the slowest row's)
            r = slice(None) if s == 0 or active.all() else active.nonzero().squeeze(1)
            xr, masked = x[r], masked[r]
            if cache == "none":
                logits = model.logits(xr, attn[r])[:, lo:hi]
            elif s == 0:
                logits, kv = _full_pass(model, xr, attn, pos, lo, hi, cache)
            else:
                logits = _cached_pass(model, xr, attn[r], pos[r], lo, hi, cache,
                                      [(k[r], v[r]) for k, v in kv])
            logits = logits.double()  # [b, bl, V]
            x0 = gumbel_argmax(logits, cfg.temperature, generator)  # [b, bl]
            conf = logits.softmax(-1).gather(-1, x0[..., None]).squeeze(-1)  # [b, bl]
            conf = torch.where(masked, conf, torch.full_like(conf, -torch.inf))
            rank = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # [b, bl]
            commit = ((rank < schedule[r, s : s + 1]) | (conf > cfg.threshold)) & masked
            x[r, lo:hi] = torch.where(commit, x0, xr[:, lo:hi])
            trace[r, lo - P : hi - P] = trace[r, lo - P : hi - P].masked_fill(commit, b * steps_per_block + s)
            bar.update(1)
    bar.close()
    return (x[:, P:], trace) if return_trace else x[:, P:]


@dataclass
class NFE:
    calls: int = 0
    """forward passes of the network (NFE)"""
    rows: int = 0
    """sequences processed, summed over the passes (rows / batch size = passes per sequence)"""
    positions: int = 0
    """input positions processed (rows × query length), summed over the passes: the compute the
    cache and the sit-outs save, machine-independently (weights' FLOPs are linear in it)"""


@contextlib.contextmanager
def count_forwards(net: torch.nn.Module) -> Iterator[NFE]:
    """Count the network's forward passes: ``with count_forwards(model.net) as nfe: ...; nfe.calls``."""
    nfe = NFE()

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        nfe.calls += 1
        if isinstance(ids, Tensor):
            nfe.rows += int(ids.shape[0])
            nfe.positions += ids.numel()

    handle = net.register_forward_hook(hook, with_kwargs=True)
    try:
        yield nfe
    finally:
        handle.remove()
