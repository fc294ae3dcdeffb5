"""ESPO: ELBO-based Sequence-level Policy Optimization (Ou et al., arXiv 2512.03759).

The whole completion is ONE action, its likelihood the ELBO: a sequence-level, length-normalised
ratio ``ρ_i = exp((B̂_θ(y_i) − B̂_old(y_i)) / L_i)`` with ``B̂ = mean_j ℓ(j)``, PPO-clipped,
``−(1/B) Σ_i min(ρ_i A_i, clip(ρ_i, 1±ε) A_i)``, plus β·k2 KL to the reference,
``½ (B̂_θ − B̂_ref)² / L_i`` averaged over the batch. The ELBO's draws are coupled complementary
pairs (``elbo.mode=complementary``): each MC sample is a mask and its complement (count levels
l and L − l, l ~ U{0..L}, weights (L+1)/l and (L+1)/(L − l)), the levels stratified over the n_t
samples; θ, θ_old and the reference see the same masks. μ inner updates (``inner_updates``), a
fresh set of draws each, θ_old the rollout policy. The exponential of a mean keeps the update's
2·n_t graphs alive until its one backward: memory linear in n_t, like VRPO-OL.

Departures and switches. The paper's body could not be read (arXiv HTML: abstract and introduction
only); its abstract and the authors' project page give the ratio ρ_seq = exp((ℓ_θ − ℓ_old)/L) and the
k2 KL; the rest follows the authors' code (ML-GSAI/ESPO ``espo/espo_trainer.py``, ``recipes/``),
read line by line; check it against the paper before quoting results:
- n_t = 2 MC samples (the scripts' ``num_mc``), each a complementary pair: 4 forward passes per update;
- ε = 0.2, β = 0.01 (``recipes/train.yaml``); the task scripts set μ = 8 inner updates, G = 6 (MATH
  16, code 10) and β = 1e-3 (GSM8K, MATH), 1e-2 (Sudoku, code), 3e-3 (Countdown);
- the Countdown script sets ε = 0, which the code's clamp(ρ, 1 − ε, 1 + ε) reads as ρ clipped to 1;
  here ``clip_eps=0`` switches the clip OFF: ``clip_eps=1e-6`` gives the script's surrogate;
- the k2 KL is divided by L once (the code's ``kl.sum() / (B·L)``), the ratio's log by L;
- the code stratifies the mask counts over the rows of a micro-batch, here over a sequence's n_t
  samples (``elbo.stratified``); ``elbo.mode=elbo`` drops the complementary coupling;
- advantages r − mean_G r; the code's leave-one-out baseline is G/(G−1) times that;
- L_i is the scored window (``elbo.window``; default the whole window, EOS padding included, as the
  code, whose ELBO and L cover every completion position).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bgpo import elbo
from bgpo.elbo import Batch, ELBOConfig
from bgpo.method import Prepared, check_common, clipped, k2, reference
from bgpo.model import DLLM


@dataclass
class ESPOConfig:
    n_t: int = 2
    """MC samples per update, each a complementary pair of masks (code: num_mc = 2)"""
    clip_eps: float = 0.2
    """PPO clip ε on the sequence ratio (code: 0.2; 0 = no clip, unlike the code's ε = 0)"""
    beta: float = 0.01
    """k2 KL coefficient to the reference (code: 0.01; scripts 1e-3 to 1e-2, Countdown 3e-3)"""
    std_adv: bool = False
    """A = r − mean_G r (code: scale_rewards false)"""
    elbo: ELBOConfig = field(default_factory=lambda: ELBOConfig(mode="complementary", level="count",
                                                                stratified=True))

    def __post_init__(self) -> None:  # pragma: no mutate block (validation)
        check_common(self, "espo")
        if self.elbo.mode not in ("elbo", "complementary") or self.elbo.length_norm:
            raise ValueError(f"method.cfg.elbo.mode={self.elbo.mode!r} (length_norm={self.elbo.length_norm}) "
                             "must be elbo or complementary, without length_norm: ESPO divides by L itself")


class ESPO:
    """ESPO: a length-normalised sequence-level ELBO ratio, PPO clip, k2 KL."""

    OFF_POLICY = "inner_updates"

    def __init__(self, cfg: ESPOConfig, ref: DLLM | None = None) -> None:
        self.cfg, self.ref = cfg, reference(cfg, ref)

    @torch.no_grad()
    def prepare(self, policy: DLLM, batch: Batch, mu: int,
                generator: torch.Generator | None) -> Prepared:
        c = self.cfg
        draws = elbo.draw_updates(batch, c.elbo, c.n_t, mu, policy.eos_token_id, generator)
        k = c.elbo.patterns(c.n_t)
        old = elbo.ell_all(policy, batch, draws, k) if mu > 1 else None  # [μ·k, B]
        ref = elbo.ell_all(self.ref, batch, draws, k) if c.beta > 0 else None  # [μ·k, B]
        return Prepared(draws, old, ref)

    def chunks(self, prep: Prepared, it: int) -> list[slice]:
        k = self.cfg.elbo.patterns(self.cfg.n_t)
        return [slice(it * k, (it + 1) * k)]  # ESPO: one backward over the update's draws

    def loss(self, policy: DLLM, batch: Batch, adv: Tensor, prep: Prepared,
             js: slice) -> tuple[Tensor, dict[str, Tensor]]:
        c, B = self.cfg, adv.shape[0]
        ell_theta = elbo.ell(policy, batch, prep.draws, js)  # [k, B]
        ell_old = ell_theta.detach() if prep.old is None else prep.old[js]  # [k, B]
        L_i = prep.draws.scored.sum(-1).to(ell_theta.dtype)  # [B]
        # ESPO: one ratio per sequence, its log (an ELBO difference) divided by the length
        ratio = ((ell_theta.mean(0) - ell_old.mean(0)) / L_i).exp()  # [B]
        surr, was_clipped = clipped(ratio, adv, c.clip_eps, 0.0)  # [B]
        loss = -surr.sum() / B
        kl = torch.zeros(())
        if c.beta > 0:
            kl = (k2(prep.ref[js].mean(0), ell_theta.mean(0)) / L_i).sum() / B
            loss = loss + c.beta * kl
        return loss, {"loss": loss.detach(), "kl": kl.detach(), "clip_ratio": was_clipped.sum() / B,
                      "elbo/ell": ell_theta.detach().mean()}
