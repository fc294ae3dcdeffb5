"""wd1 (Tang et al., arXiv 2507.08838, §3): weighted likelihood, no ratio, no clip, no KL.

``S_i = Σ_k log p_θ(y_ik | x', M…M)`` from the one-step estimator; over each group
``w⁺ = softmax(ψA)``, ``w⁻ = softmax(−ψA)`` with ``A = r − mean_G r``; loss
``Σ_i (w⁻_i − w⁺_i)·S_i``, averaged over the groups of the batch. Equal rewards in a group give
w⁺ = w⁻ and a zero gradient.

Departures and switches (defaults = the wd1 paper; see docs/methods.md):
- ``n_t`` > 1 averages S_i over n_t prompt masks (the one-step estimator's MC samples);
- update ``it`` of μ (``inner_updates``) uses a fresh prompt mask, as diffu-GRPO;
- the scored window is d1's (up to the first EOS), ``elbo.window=full`` switches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bgpo import elbo
from bgpo.elbo import Batch, ELBOConfig
from bgpo.method import Prepared, check_common, reference
from bgpo.model import DLLM


@dataclass
class WD1Config:
    n_t: int = 1
    """one-step draws (prompt masks) per update"""
    psi: float = 1.0
    """temperature ψ of the group softmax weights (wd1: 1)"""
    std_adv: bool = False
    """A = r − mean_G r, no std normalisation (wd1 §3)"""
    elbo: ELBOConfig = field(default_factory=lambda: ELBOConfig(mode="one_step", window="eos"))

    def __post_init__(self) -> None:  # pragma: no mutate block (validation)
        check_common(self, "wd1")


class WD1:
    """wd1 §3: softmax(±ψA)-weighted log-likelihood."""

    OFF_POLICY = "inner_updates"

    def __init__(self, cfg: WD1Config, ref: DLLM | None = None) -> None:
        self.cfg, self.ref = cfg, reference(cfg, ref)

    @torch.no_grad()
    def prepare(self, policy: DLLM, batch: Batch, mu: int,
                generator: torch.Generator | None) -> Prepared:
        c = self.cfg
        draws = elbo.draw(batch, c.elbo, c.n_t * mu, policy.eos_token_id, generator)
        return Prepared(draws)  # wd1 needs neither θ_old nor a reference

    def chunks(self, prep: Prepared, it: int) -> list[slice]:
        return [slice(it * self.cfg.n_t, (it + 1) * self.cfg.n_t)]  # a fresh prompt mask per update

    def loss(self, policy: DLLM, batch: Batch, adv: Tensor, prep: Prepared,
             js: slice) -> tuple[Tensor, dict[str, Tensor]]:
        G = batch.group_size
        S = elbo.ell(policy, batch, prep.draws, js).mean(0).view(-1, G)  # [n_groups, G]
        # wd1: positive and negative softmax weights over each group
        A = adv.view(-1, G)  # [n_groups, G]
        w_pos, w_neg = (self.cfg.psi * A).softmax(-1), (-self.cfg.psi * A).softmax(-1)  # [n_groups, G]
        loss = ((w_neg - w_pos) * S).sum() / S.shape[0]
        zero = torch.zeros(())
        return loss, {"loss": loss.detach(), "kl": zero, "clip_ratio": zero, "elbo/ell": S.detach().mean()}
