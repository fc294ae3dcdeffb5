"""diffu-GRPO (d1, Zhao et al., arXiv 2504.12216, §3): GRPO on the one-step mean-field estimator.

Per completion token k of response i: ``ρ_ik = exp(log p_θ − log p_old)`` from the one-step
estimator (completion fully masked, prompt masked at p = 0.15, the mask shared by θ, old and
ref); loss ``−min(ρA, clip(ρ, 1±ε)A) + β·k3(ref, θ)`` averaged over all scored completion tokens
of the batch (token-level normalisation). μ inner updates per rollout batch (d1's μ:
``inner_updates``), each with a FRESH prompt mask: update ``it`` uses draws ``it·n_t … (it+1)·n_t − 1``.

Departures and switches (defaults = d1 in BGPO's setup; see docs/methods.md):
- ``n_t`` > 1 averages the loss over n_t prompt masks per update (BGPO's comparison: n_t = 1);
- on-policy (μ = 1) log p_old is log p_θ detached: no second forward pass;
- the scored window is d1's (up to the first EOS), ``elbo.window=full`` switches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bgpo import elbo
from bgpo.elbo import Batch, ELBOConfig
from bgpo.method import Prepared, check_common, clipped, k3, reference
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
    """A = r − mean_G r, no std normalisation (d1 §3)"""
    elbo: ELBOConfig = field(default_factory=lambda: ELBOConfig(mode="one_step", window="eos"))

    def __post_init__(self) -> None:  # pragma: no mutate block (validation)
        check_common(self, "diffu_grpo")


class DiffuGRPO:
    """d1 §3 diffu-GRPO: per-token clipped ratio + k3 KL, token-level mean."""

    OFF_POLICY = "inner_updates"

    def __init__(self, cfg: DiffuGRPOConfig, ref: DLLM | None = None) -> None:
        self.cfg, self.ref = cfg, reference(cfg, ref)

    @torch.no_grad()
    def prepare(self, policy: DLLM, batch: Batch, mu: int,
                generator: torch.Generator | None) -> Prepared:
        c = self.cfg
        draws = elbo.draw(batch, c.elbo, c.n_t * mu, policy.eos_token_id, generator)
        old = elbo.token_logprobs_all(policy, batch, draws) if mu > 1 else None  # [μ·n_t, B, L]
        ref = elbo.token_logprobs_all(self.ref, batch, draws) if c.beta > 0 else None  # [μ·n_t, B, L]
        return Prepared(draws, old, ref)

    def chunks(self, prep: Prepared, it: int) -> list[slice]:
        return [slice(it * self.cfg.n_t, (it + 1) * self.cfg.n_t)]  # a fresh prompt mask per update

    def loss(self, policy: DLLM, batch: Batch, adv: Tensor, prep: Prepared,
             js: slice) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        logp = elbo.token_logprobs(policy, batch, prep.draws, js)  # [n_t, B, L]
        logp_old = logp.detach() if prep.old is None else prep.old[js]  # [n_t, B, L]
        # diffu-GRPO: per-token ratio, PPO clip, token-level normalisation
        ratio = (logp - logp_old).exp()  # [n_t, B, L]
        surr, was_clipped = clipped(ratio, adv[None, :, None], c.clip_eps, 0.0)  # [n_t, B, L]
        per_token = -surr  # [n_t, B, L]
        kl_tok = torch.zeros_like(per_token)
        if c.beta > 0:
            kl_tok = k3(prep.ref[js], logp)  # [n_t, B, L]
            per_token = per_token + c.beta * kl_tok
        scored = prep.draws.scored.expand_as(per_token).to(per_token.dtype)  # [n_t, B, L]
        n_tok = scored.sum()
        loss = (per_token * scored).sum() / n_tok
        return loss, {"loss": loss.detach(), "kl": (kl_tok.detach() * scored).sum() / n_tok,
                      "clip_ratio": (was_clipped * scored).sum() / n_tok,
                      "elbo/ell": (logp.detach() * scored).sum() / (c.n_t * adv.shape[0])}
