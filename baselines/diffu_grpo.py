"""diffu-GRPO (d1, arXiv 2504.12216; SPEC §3): GRPO on the one-step mean-field estimator.

Per completion token k of response i: ``ρ_ik = exp(log p_θ − log p_old)`` from the one-step
estimator (completion fully masked, prompt masked at p = 0.15, the mask shared by θ, old and
ref); loss ``−min(ρA, clip(ρ, 1±ε)A) + β·k3(ref, θ)`` averaged over all scored completion tokens
of the batch (token-level normalisation). μ inner updates per rollout batch, each with a FRESH
prompt mask: update ``it`` uses draws ``it·n_t … (it+1)·n_t − 1``.

Departures and switches (defaults = d1; see paper/NOTES.md):
- ``n_t`` > 1 averages the loss over n_t prompt masks per update (BGPO's comparison: n_t = 1);
- on-policy (updates = 1) log p_old is log p_θ detached: no second forward pass;
- the scored window is d1's (up to the first EOS), ``elbo.window=full`` switches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bgpo import elbo
from bgpo.elbo import Batch, ELBOConfig
from bgpo.method import Prepared, clipped, k3
from bgpo.model import DLLM


@dataclass
class DiffuGRPOConfig:
    n_t: int = 1
    """one-step draws (prompt masks) per update (BGPO's comparison: 1)"""
    clip_eps: float = 0.5
    """PPO clip ε on the per-token ratio (d1: 0.5)"""
    beta: float = 0.04
    """k3 KL coefficient to the reference (d1: 0.04)"""
    std_adv: bool = False
    """A = r − mean_G r, no std normalisation (SPEC §3)"""
    elbo: ELBOConfig = field(default_factory=lambda: ELBOConfig(mode="one_step", window="eos"))


class DiffuGRPO:
    """SPEC §3 diffu-GRPO: per-token clipped ratio + k3 KL, token-level mean."""

    def __init__(self, cfg: DiffuGRPOConfig, ref: DLLM | None = None) -> None:
        self.cfg, self.ref = cfg, ref

    @torch.no_grad()
    def prepare(self, policy: DLLM, batch: Batch, updates: int,
                generator: torch.Generator | None) -> Prepared:
        c = self.cfg
        draws = elbo.draw(batch, c.elbo, c.n_t * updates, policy.eos_token_id, generator)
        old = elbo.token_logprobs_all(policy, batch, draws) if updates > 1 else None  # [μ·n_t, B, L]
        ref = elbo.token_logprobs_all(self.ref, batch, draws) if c.beta > 0 else None  # [μ·n_t, B, L]
        return Prepared(draws, old, ref)

    def backward(self, policy: DLLM, batch: Batch, adv: Tensor, prep: Prepared,
                 it: int) -> dict[str, float]:
        c = self.cfg
        stats = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "elbo/ell": 0.0}
        js = slice(it * c.n_t, (it + 1) * c.n_t)  # a fresh prompt mask per inner update
        logp = elbo.token_logprobs(policy, batch, prep.draws, js)  # [n_t, B, L]
        logp_old = logp.detach() if prep.old is None else prep.old[js]  # [n_t, B, L]
        # diffu-GRPO: per-token ratio, PPO clip, token-level normalisation
        ratio = (logp - logp_old).exp()  # [n_t, B, L]
        surr, was_clipped = clipped(ratio, adv[None, :, None], c.clip_eps, 0.0)  # [n_t, B, L]
        per_token = -surr  # [n_t, B, L]
        if c.beta > 0:
            kl_tok = k3(prep.ref[js], logp)  # [n_t, B, L]
            per_token = per_token + c.beta * kl_tok
        scored = prep.draws.scored.expand_as(per_token).to(per_token.dtype)  # [n_t, B, L]
        n_tok = scored.sum()
        loss = (per_token * scored).sum() / n_tok
        loss.backward()
        stats["loss"] += loss.item()
        if c.beta > 0:
            stats["kl"] += ((kl_tok * scored).sum() / n_tok).item()
        stats["clip_ratio"] += ((was_clipped * scored).sum() / n_tok).item()
        stats["elbo/ell"] += ((logp.detach() * scored).sum() / (c.n_t * adv.shape[0])).item()
        return stats
