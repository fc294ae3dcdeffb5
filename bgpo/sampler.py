"""Rollout generation: LLaDA's block-wise low-confidence remasking sampler (docs/methods.md §1).

The completion of length ``gen_length`` starts all-masked and is decoded block by block, left to
right; each block gets ``steps / num_blocks`` denoising steps. At every step all masked positions
of the current block are predicted (argmax at temperature 0, Gumbel-max in float64 otherwise) and
the ``k`` most confident predictions are committed, ``k`` spreading the block evenly over its
steps. Prompts are left-padded and the attention mask is passed to the model, so a prompt's
tokens are the same whatever else is in the batch.

``return_trace=True`` also returns the step at which each completion position was committed
(``[B, L]``, steps counted from 0 across blocks): the trajectory a trajectory-likelihood method
(TraceRL) scores. One token per step in blocks of one (``block_length=1``, ``steps=gen_length``)
is exact left-to-right (autoregressive) decoding: each step predicts the first masked position
with every later one masked, and commits it (JustGRPO's rollouts, ``bgpo.rollout``'s
``order="left_to_right"``).

``SamplerConfig.mode = "cached"`` dispatches to the fast sampler of ``bgpo.sampler_cached``
(block-wise KV cache + confidence-threshold parallel decoding); the reference path below is
untouched by it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bgpo.model import DLLM
from bgpo.sampler_config import (  # noqa: F401  (re-exported: the sampler's public names)
    CACHES,
    MODES,
    SamplerConfig,
    gumbel_argmax,
    transfer_schedule,
    validate_mode,
    validate_schedule,
)


@torch.no_grad()
def generate(model: DLLM, prompt_ids: Tensor, prompt_mask: Tensor, cfg: SamplerConfig,
             generator: torch.Generator | None = None, progress: bool = False,
             return_trace: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Sample completions ``[B, gen_length]`` for left-padded prompts ``[B, P]`` (and, with
    ``return_trace``, the step that committed each position, ``[B, gen_length]``)."""
    if cfg.mode == "cached":  # the fast sampler (imported here: it builds on this module)
        from bgpo.sampler_cached import generate_cached

        return generate_cached(model, prompt_ids, prompt_mask, cfg, generator, progress, return_trace)
    B, P = prompt_ids.shape
    L, bl = cfg.gen_length, cfg.block_length
    n_blocks = L // bl
    steps_per_block = cfg.steps // n_blocks
    dev = prompt_ids.device
    x = torch.full((B, P + L), model.mask_token_id, dtype=torch.long, device=dev)  # [B, P+L]
    x[:, :P] = prompt_ids
    attn = torch.cat([prompt_mask, torch.ones(B, L, dtype=prompt_mask.dtype, device=dev)], 1)
    trace = torch.full((B, L), -1, dtype=torch.long, device=dev)  # [B, L] step that committed each position
    bar = tqdm(total=cfg.steps, desc="rollout", disable=not progress, leave=False)
    for b in range(n_blocks):
        lo, hi = P + b * bl, P + (b + 1) * bl
        n_masked = (x[:, lo:hi] == model.mask_token_id).sum(-1)  # [B]
        schedule = transfer_schedule(n_masked, steps_per_block)  # [B, steps_per_block]
        for s in range(steps_per_block):
            logits = model.logits(x, attn)[:, lo:hi].double()  # [B, bl, V]
            x0 = gumbel_argmax(logits, cfg.temperature, generator)  # [B, bl]
            conf = logits.softmax(-1).gather(-1, x0[..., None]).squeeze(-1)  # [B, bl]
            masked = x[:, lo:hi] == model.mask_token_id  # [B, bl]
            conf = torch.where(masked, conf, torch.full_like(conf, -torch.inf))
            # commit the k most confident masked predictions of each row (k varies by row)
            order = conf.argsort(dim=-1, descending=True, stable=True)  # [B, bl]
            rank = order.argsort(dim=-1)  # [B, bl]: rank of each position
            commit = (rank < schedule[:, s : s + 1]) & masked  # [B, bl]
            x[:, lo:hi] = torch.where(commit, x0, x[:, lo:hi])
            trace[:, lo - P : hi - P].masked_fill_(commit, b * steps_per_block + s)
            bar.update(1)
    bar.close()
    return (x[:, P:], trace) if return_trace else x[:, P:]
