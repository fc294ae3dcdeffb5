"""BGPO: Boundary-Guided Policy Optimization (arXiv 2510.11683; SPEC §3).

Per MC sample j, with ``d_j = ℓ_θ(j) − ℓ_old(j)`` on the same (t_j, mask_j):
  A ≥ 0: ``g_j = A·(1 + d_j)/n_t``  (tangent line e^z ≥ 1 + z, Lemma 1)
  A < 0: ``g_j = A·exp(d_j)/n_t``   (Jensen, Lemma 2)
``Σ_j g_j`` is a lower bound of VRPO-OL's ``exp(B̂_θ − B̂_old)·A``, equal in value and gradient
on-policy. It is LINEAR in the samples, so the loss ``−g_j/G`` is back-propagated one chunk of
``mc_chunk`` samples at a time: peak memory is one chunk's, whatever n_t is.

Departures and switches (defaults = the paper; see paper/NOTES.md):
- on-policy (updates = 1) ℓ_old(j) is ℓ_θ(j) detached: no second forward pass;
- ``clip_eps`` / ``dual_clip``: PPO clip on the per-sample bound ratio (VeRL port: 0.2 / 3.0);
  off by default, as in the paper; inactive on-policy anyway;
- ``beta``: k3 KL to the reference per MC sample; off by default (paper: no KL);
- ELBO estimator choices (level, stratified, window, length_norm) live in ``elbo``.
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
class BGPOConfig:
    n_t: int = 16
    """MC samples per response (SPEC §4: 16 math/code/Countdown, 32 Sudoku)"""
    mc_chunk: int = 1
    """MC samples per backward pass; any chunking gives the same gradient"""
    clip_eps: float = 0.0
    """PPO clip ε on the per-sample ratio; 0 = off (paper)"""
    dual_clip: float = 0.0
    """dual-clip c for A < 0; 0 = off (paper)"""
    beta: float = 0.0
    """k3 KL coefficient to the reference; 0 = off (paper)"""
    std_adv: bool = True
    """A = (r − mean_G r)/std_G r (SPEC §3)"""
    elbo: ELBOConfig = field(default_factory=ELBOConfig)


class BGPO:
    """SPEC §3 BGPO: per-sample bound, backward per MC chunk."""

    def __init__(self, cfg: BGPOConfig, ref: DLLM | None = None) -> None:
        self.cfg, self.ref = cfg, ref

    @torch.no_grad()
    def prepare(self, policy: DLLM, batch: Batch, updates: int,
                generator: torch.Generator | None) -> Prepared:
        c = self.cfg
        draws = elbo.draw(batch, c.elbo, c.n_t, policy.eos_token_id, generator)
        old = elbo.ell_all(policy, batch, draws, c.mc_chunk) if updates > 1 else None  # [n_t, B]
        ref = elbo.ell_all(self.ref, batch, draws, c.mc_chunk) if c.beta > 0 else None  # [n_t, B]
        return Prepared(draws, old, ref)

    def backward(self, policy: DLLM, batch: Batch, adv: Tensor, prep: Prepared,
                 it: int) -> dict[str, float]:
        c, B = self.cfg, adv.shape[0]
        pos = adv >= 0  # [B]
        stats = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "elbo/ell": 0.0}
        for js in prep.draws.chunks(c.mc_chunk):
            ell_theta = elbo.ell(policy, batch, prep.draws, js)  # [k, B]
            ell_old = ell_theta.detach() if prep.old is None else prep.old[js]  # [k, B]
            d_j = ell_theta - ell_old  # [k, B]
            # BGPO: tangent bound for A ≥ 0, Jensen bound for A < 0 (exp only where selected)
            ratio = torch.where(pos, 1 + d_j, torch.where(pos, 0.0, d_j).exp())  # [k, B]
            g_j, was_clipped = clipped(ratio, adv, c.clip_eps, c.dual_clip)  # [k, B]
            loss = -g_j.sum() / (c.n_t * B)
            if c.beta > 0:
                kl = k3(prep.ref[js], ell_theta).sum() / (c.n_t * B)
                loss = loss + c.beta * kl
                stats["kl"] += kl.item()
            loss.backward()  # BGPO: one chunk's graph at a time
            stats["loss"] += loss.item()
            stats["clip_ratio"] += was_clipped.sum().item() / (c.n_t * B)
            stats["elbo/ell"] += ell_theta.detach().sum().item() / (c.n_t * B)
        return stats
