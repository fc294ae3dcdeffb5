"""VRPO-OL: VRPO (LLaDA 1.5, arXiv 2505.19223) as on-policy RL, as BGPO defines it (BGPO §3).

``R̂_i = exp(B̂_θ(y_i) − B̂_old(y_i))·A_i`` with ``B̂ = mean_j ℓ(j)`` over n_t coupled MC samples
(θ and θ_old see the same (t_j, mask_j)); loss ``−(1/G)Σ_i R̂_i``. The exponential of a SUM keeps
every sample's graph alive until the single backward: memory grows linearly with n_t. That is
the point of the comparison; it is deliberately not "fixed".

Departures and switches (defaults = the paper; see docs/methods.md):
- on-policy (μ = 1) B̂_old is B̂_θ detached: no second forward pass;
- off-policy: ``minibatches=μ`` (BGPO §4: the rollout batch split into μ mini-batches, one
  optimizer step each, θ_old = the rollout policy on the same draws);
- ``clip_eps`` / ``dual_clip``: PPO clip on the sequence ratio; off by default (not described);
- ``beta``: k3 KL to the reference per MC sample; off by default;
- ``mc_chunk`` only batches forward passes; all graphs are kept either way;
- the estimator: count levels, stratified, shared by the G completions of a prompt, by default,
  as BGPO's (``elbo.level=time elbo.stratified=false elbo.group_shared=false`` is the paper's;
  paper/NOTES.md).
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
class VRPOConfig:
    n_t: int = 4
    """MC samples per response (BGPO §4: 4, 2 for code: the most that fit in 80 GB)"""
    mc_chunk: int = 1
    """MC samples per forward pass (graphs are kept until one backward regardless)"""
    clip_eps: float = 0.0
    """PPO clip ε on the sequence ratio; 0 = off"""
    dual_clip: float = 0.0
    """dual-clip c for A < 0; 0 = off"""
    beta: float = 0.0
    """k3 KL coefficient to the reference; 0 = off"""
    std_adv: bool = True
    """A = (r − mean_G r)/std_G r (BGPO §3)"""
    elbo: ELBOConfig = field(default_factory=lambda: ELBOConfig(level="count", stratified=True,
                                                              group_shared=True))
    """the estimator (docs/methods.md §2): count levels, stratified — finite variance (the paper's
    t ~ U(0,1] with weight 1/t is elbo.level=time; paper/NOTES.md gives the measurement) — and
    shared across each prompt's group (elbo.group_shared)"""

    def __post_init__(self) -> None:  # pragma: no mutate block (validation)
        check_common(self, "vrpo")


class VRPO:
    """BGPO §3 VRPO-OL: exp of the ELBO difference, one backward over all n_t samples."""

    OFF_POLICY = "minibatches"

    def __init__(self, cfg: VRPOConfig, ref: DLLM | None = None) -> None:
        self.cfg, self.ref = cfg, reference(cfg, ref)

    @torch.no_grad()
    def prepare(self, policy: DLLM, batch: Batch, mu: int,
                generator: torch.Generator | None) -> Prepared:
        c = self.cfg
        draws = elbo.draw(batch, c.elbo, c.n_t, policy.eos_token_id, generator)
        old = elbo.ell_all(policy, batch, draws, c.mc_chunk) if mu > 1 else None  # [n_t, B]
        ref = elbo.ell_all(self.ref, batch, draws, c.mc_chunk) if c.beta > 0 else None  # [n_t, B]
        return Prepared(draws, old, ref)

    def chunks(self, prep: Prepared, it: int) -> list[slice]:
        return [slice(0, prep.draws.n_t)]  # VRPO-OL: one backward over all samples

    def flat_groups_free(self) -> bool:
        """A prompt group of equal rewards (A = 0) adds nothing to this loss (g_j ∝ A, no KL term):
        the trainer may skip its ELBO passes (``skip_flat_groups``); the gradient is the same."""
        return self.cfg.beta == 0

    def loss(self, policy: DLLM, batch: Batch, adv: Tensor, prep: Prepared,
             js: slice) -> tuple[Tensor, dict[str, Tensor]]:
        c, B = self.cfg, adv.shape[0]
        ell_theta = torch.cat([elbo.ell(policy, batch, prep.draws, fs)
                               for fs in prep.draws.chunks(c.mc_chunk)], 0)  # [n_t, B], all graphs
        ell_old = ell_theta.detach() if prep.old is None else prep.old  # [n_t, B]
        # VRPO-OL: exp of the difference of the MC ELBO estimates
        ratio = (ell_theta.mean(0) - ell_old.mean(0)).exp()  # [B]
        R_hat, was_clipped = clipped(ratio, adv, c.clip_eps, c.dual_clip)  # [B]
        loss = -R_hat.sum() / B
        kl = torch.zeros(())
        if c.beta > 0:
            kl = k3(prep.ref, ell_theta).sum() / (c.n_t * B)
            loss = loss + c.beta * kl
        return loss, {"loss": loss.detach(), "kl": kl.detach(), "clip_ratio": was_clipped.sum() / B,
                      "elbo/ell": ell_theta.detach().sum() / (c.n_t * B)}
