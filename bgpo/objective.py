"""BGPO: Boundary-Guided Policy Optimization (Lin et al., arXiv 2510.11683, §3).

Per MC sample j, with ``d_j = ℓ_θ(j) − ℓ_old(j)`` on the same (t_j, mask_j):
  A ≥ 0: ``g_j = A·(1 + d_j)/n_t``  (tangent line e^z ≥ 1 + z, Lemma 1)
  A < 0: ``g_j = A·exp(d_j)/n_t``   (Jensen, exp(mean d) ≤ mean exp(d), Lemma 2)
``Σ_j g_j`` is a lower bound of VRPO-OL's ``exp(B̂_θ − B̂_old)·A``, equal in value and gradient
on-policy. It is LINEAR in the samples, so the loss ``−g_j/G`` of each chunk of ``mc_chunk``
samples is back-propagated on its own: peak memory is one chunk's, whatever n_t is.

Departures and switches (defaults = the paper; see docs/methods.md):
- on-policy (μ = 1) ℓ_old(j) is ℓ_θ(j) detached: no second forward pass;
- off-policy: ``minibatches=μ`` (BGPO §4: the rollout batch split into μ mini-batches, one
  optimizer step each, θ_old = the rollout policy on the same draws);
- ``bound``: ``both`` (the paper), ``tangent`` (Lemma 1 for every sample) or ``jensen`` (Lemma 2
  for every sample): the bounds ablation of BGPO Table 3;
- ``clip_eps`` / ``dual_clip``: PPO clip on the per-sample bound ratio (VeRL port: 0.2 / 3.0);
  off by default, as in the paper; inactive on-policy anyway;
- ``beta``: k3 KL to the reference per MC sample; off by default (paper: no KL);
- the estimator: count levels l ~ U{1..L} (weight L/l), stratified over the n_t samples, by
  default — finite variance where the paper's t ~ U(0,1] with weight 1/t has none
  (``elbo.level=time elbo.stratified=false`` restores it; paper/NOTES.md has the measurement);
  the other ELBO choices (window, length_norm, t_min) live in ``elbo`` too;
- the G completions of a prompt share their mask draws (``elbo.group_shared``, common random
  numbers; each ELBO estimate unbiased as before): on the laptop testbed BGPO reached 24% Countdown
  validation accuracy at step 40 with it, 14% without (paper/NOTES.md); ``=false`` is the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bgpo import elbo
from bgpo.elbo import Batch, ELBOConfig
from bgpo.method import Prepared, check_common, clipped, k3, reference
from bgpo.model import DLLM

BOUNDS = ("both", "tangent", "jensen")


@dataclass
class BGPOConfig:
    n_t: int = 16
    """MC samples per response (BGPO §4: 16 math/code/Countdown, 32 Sudoku)"""
    mc_chunk: int = 1
    """MC samples per backward pass; any chunking gives the same gradient"""
    bound: str = "both"
    """both: Lemma 1 for A ≥ 0, Lemma 2 for A < 0 (BGPO); tangent / jensen: one lemma for all (Table 3)"""
    clip_eps: float = 0.0
    """PPO clip ε on the per-sample ratio; 0 = off (paper)"""
    dual_clip: float = 0.0
    """dual-clip c for A < 0; 0 = off (paper)"""
    beta: float = 0.0
    """k3 KL coefficient to the reference; 0 = off (paper)"""
    std_adv: bool = True
    """A = (r − mean_G r)/std_G r (BGPO §3)"""
    elbo: ELBOConfig = field(default_factory=lambda: ELBOConfig(level="count", stratified=True,
                                                              group_shared=True))
    """the estimator (docs/methods.md §2): count levels, stratified — finite variance (the paper's
    t ~ U(0,1] with weight 1/t is elbo.level=time; paper/NOTES.md gives the measurement) — and
    shared across each prompt's group (elbo.group_shared)"""

    def __post_init__(self) -> None:  # pragma: no mutate block (validation)
        check_common(self, "bgpo")
        if self.bound not in BOUNDS:
            raise ValueError(f"method.cfg.bound={self.bound!r} is not one of {list(BOUNDS)}")


class BGPO:
    """BGPO §3: per-sample bound, backward per MC chunk."""

    OFF_POLICY = "minibatches"

    def __init__(self, cfg: BGPOConfig, ref: DLLM | None = None) -> None:
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
        return list(prep.draws.chunks(self.cfg.mc_chunk))  # BGPO: one backward per chunk

    def flat_groups_free(self) -> bool:
        """A prompt group of equal rewards (A = 0) adds nothing to this loss (g_j ∝ A, no KL term):
        the trainer may skip its ELBO passes (``skip_flat_groups``); the gradient is the same."""
        return self.cfg.beta == 0

    def loss(self, policy: DLLM, batch: Batch, adv: Tensor, prep: Prepared,
             js: slice) -> tuple[Tensor, dict[str, Tensor]]:
        c, B = self.cfg, adv.shape[0]
        ell_theta = elbo.ell(policy, batch, prep.draws, js)  # [k, B]
        ell_old = ell_theta.detach() if prep.old is None else prep.old[js]  # [k, B]
        d_j = ell_theta - ell_old  # [k, B]
        # BGPO: tangent bound for A ≥ 0, Jensen bound for A < 0 (exp only where selected)
        tangent = adv >= 0 if c.bound == "both" else torch.full_like(adv, c.bound == "tangent", dtype=bool)
        ratio = torch.where(tangent, 1 + d_j, torch.where(tangent, 0.0, d_j).exp())  # [k, B]
        g_j, was_clipped = clipped(ratio, adv, c.clip_eps, c.dual_clip)  # [k, B]
        loss = -g_j.sum() / (c.n_t * B)
        kl = torch.zeros(())
        if c.beta > 0:
            kl = k3(prep.ref[js], ell_theta).sum() / (c.n_t * B)
            loss = loss + c.beta * kl
        return loss, {"loss": loss.detach(), "kl": kl.detach(),
                      "clip_ratio": was_clipped.sum() / (c.n_t * B),
                      "elbo/ell": ell_theta.detach().sum() / (c.n_t * B)}
