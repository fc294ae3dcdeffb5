"""SPG: Sandwiched Policy Gradient (Wang et al., arXiv 2510.09541, §3, Algorithm 1).

``J_SPG = (1/g) Σ_j [1{A_j ≥ 0}·A_j·L_ELBO(x_j) + 1{A_j < 0}·A_j·L̃_Mix(x_j)]`` (eq. 5, 8) with
``A = r − mean_g r`` (eq. 4); no ratio, no clip, no KL (a plain policy gradient, App. F):
  L_ELBO = mean_j ℓ(j)                                                          (eq. 2)
  L̃_EUBO = (1/β) Σ_i log mean_j [w_j · 1{i ∈ target_j} · p_θ(y_i | z_j)^β]       (eq. 7)
  L̃_Mix  = ω·L̃_EUBO + (1 − ω)·L_ELBO                                            (eq. 8)
ELBO ≤ log π ≤ EUBO (Theorem 1): without its θ-free constant C(T), L̃_EUBO is itself an upper
bound for β ≥ the sequence length. The draws are block-wise (§3.3, ``elbo.mode=block``): a random
block, random masking inside it, earlier blocks clean (perturbed like the prompt at p = 0.15),
later blocks masked. The EUBO's log of a MEAN over the m draws couples them: one backward over
an update's n_t draws, memory linear in n_t.

Departures and switches (defaults = the paper, §4.1 and App. G.2):
- n_t = m = 2 MC samples per update, a fresh set per inner update (``inner_updates``; paper μ = 4);
- β = 1.5 (``eubo_beta``; the paper takes 1.0 for Sudoku), ω = 0.5 (``omega``: 1 = SPG w/ EUBO,
  0 = SPG w/ ELBO of Table 3);
- the block draw scores the drawn block's masked tokens only, weight K·n_b/l: an unbiased ELBO of
  the block-wise decoder; the authors' code averages the log-probs of EVERY masked completion token
  (later blocks included) per sequence and weights sequences by their length;
- positions that no draw targets have no EUBO estimate (log 0): left out of the sum, as the code;
- ``elbo.block_length`` follows ``task.block_length`` (the rollout sampler's); ``elbo.level=time``
  draws a time level inside the block instead of a count;
- the whole window is scored, EOS padding included (``elbo.window=full``); the code scores up to
  the first EOS (``elbo.window=eos``); the code picks the block from a permutation taken modulo K
  (no switch; ``elbo.stratified`` is the closest);
- with ``p_prompt`` = 0.15 the clean earlier blocks are perturbed, so the block draw is the ELBO of
  the block-wise decoder only at ``elbo.p_prompt=0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bgpo import elbo
from bgpo.elbo import Batch, ELBOConfig
from bgpo.method import Prepared, check_common, reference
from bgpo.model import DLLM


@dataclass
class SPGConfig:
    n_t: int = 2
    """m: block-wise MC draws per update (SPG App. G.2: 2)"""
    eubo_beta: float = 1.5
    """β of the evidence upper bound, > 0; Theorem 1 needs β ≥ 1 (Table 1: 1.5, Sudoku 1.0)"""
    omega: float = 0.5
    """ω of the mixture for A < 0 (eq. 8): 1 = SPG w/ EUBO, 0 = SPG w/ ELBO"""
    std_adv: bool = False
    """A = r − mean_g r (eq. 4)"""
    elbo: ELBOConfig = field(default_factory=lambda: ELBOConfig(mode="block", level="count", p_prompt=0.15))

    def __post_init__(self) -> None:  # pragma: no mutate block (validation)
        check_common(self, "spg")
        if not self.eubo_beta > 0:
            raise ValueError(f"method.cfg.eubo_beta={self.eubo_beta} must be > 0 (spg)")
        if not 0.0 <= self.omega <= 1.0:
            raise ValueError(f"method.cfg.omega={self.omega} must be in [0, 1] (spg)")
        if self.elbo.length_norm:
            raise ValueError("method.cfg.elbo.length_norm=true is not defined for the EUBO (spg)")


class SPG:
    """SPG §3: ELBO for A ≥ 0, the EUBO/ELBO mixture for A < 0, block-wise draws."""

    OFF_POLICY = "inner_updates"

    def __init__(self, cfg: SPGConfig, ref: DLLM | None = None) -> None:
        self.cfg, self.ref = cfg, reference(cfg, ref)

    @torch.no_grad()
    def prepare(self, policy: DLLM, batch: Batch, mu: int,
                generator: torch.Generator | None) -> Prepared:
        c = self.cfg
        draws = elbo.draw_updates(batch, c.elbo, c.n_t, mu, policy.eos_token_id, generator)
        return Prepared(draws)  # a plain policy gradient: neither θ_old nor a reference

    def chunks(self, prep: Prepared, it: int) -> list[slice]:
        k = self.cfg.elbo.patterns(self.cfg.n_t)
        return [slice(it * k, (it + 1) * k)]  # the EUBO couples the update's draws: one backward

    def loss(self, policy: DLLM, batch: Batch, adv: Tensor, prep: Prepared,
             js: slice) -> tuple[Tensor, dict[str, Tensor]]:
        c, B = self.cfg, adv.shape[0]
        logp = elbo.token_logprobs(policy, batch, prep.draws, js)  # [n_t, B, L]
        hit, w = prep.draws.hit(js), prep.draws.weight[js].to(logp.dtype)  # [n_t, B, L], [n_t, B]
        L_elbo = (w[..., None] * logp * hit).sum(-1).mean(0)  # [B]
        # SPG: the EUBO, a log OUTSIDE the mean of w·p^β over the draws, per token (in log space)
        seen = hit.any(0)  # [B, L] tokens some draw targets
        log_terms = torch.where(hit, w.log()[..., None] + c.eubo_beta * logp, -torch.inf)  # [n_t, B, L]
        log_terms = torch.where(seen, log_terms, 0.0)  # unseen columns stay finite; dropped below
        log_mean = log_terms.logsumexp(0) - math.log(hit.shape[0])  # [B, L]
        L_eubo = torch.where(seen, log_mean, 0.0).sum(-1) / c.eubo_beta  # [B]
        L_mix = c.omega * L_eubo + (1 - c.omega) * L_elbo  # [B]
        # SPG: the lower bound for A ≥ 0, the mixture with the upper bound for A < 0
        L_hat = torch.where(adv >= 0, L_elbo, L_mix)  # [B]
        loss = -(adv * L_hat).sum() / B
        zero = torch.zeros(())
        return loss, {"loss": loss.detach(), "kl": zero, "clip_ratio": zero,
                      "elbo/ell": L_elbo.detach().mean(), "elbo/eubo": L_eubo.detach().mean()}
