"""coupled-GRPO (DiffuCoder, Gong et al., arXiv 2506.20639, §5 eq. 4, App. A.3 eq. 13).

Per completion token k, a log-probability proxy from λ complementary mask pairs (t, t̂ = 1 − t:
each token is masked in exactly one mask of a pair) and the fully-masked pass (t = T):
  π̂_θ(o_k) = (1/(λ+1)) [Σ_pairs (L_t + L_t̂)_k + L_T,k],  L_t,k = M_t,k · (1/t) · log p_θ(o_k | x_t)
(eq. 13), then GRPO on it: ``ρ_ik = exp(π̂_θ − π̂_old)``, ``−min(ρA, clip(ρ, 1±ε)A) + β·k3(ref, θ)``
averaged over the scored completion tokens of the batch (up to the first EOS), μ inner updates
each with a fresh pair (``elbo.mode=complementary``, ``elbo.full_mask``).

Departures and switches (defaults = the paper; the released code where the paper is silent):
- λ = n_t = 1 pair (paper: "in practice, we choose λ = 1");
- t ~ U(0, 1) (App. A.4); the code draws t ~ U(0.2, 0.8): ``elbo.t_min=0.2``;
- ε = 0.5, β = 0.01 (k3), μ = 2 (``inner_updates``): the code's ``config_coupled_code.yaml``;
- advantages r − mean_G r (Algorithm 1); the released code hard-codes the leave-one-out
  advantages of Table 2 (no switch here), masks post-EOS positions with the pair's masks
  (``elbo.window=eos`` scores only up to the first EOS; no exact switch) and moves its reference
  toward the policy every 64 steps (TRL's ``sync_ref_model``; no switch);
- the code draws one t per micro-batch; ``elbo.t_min=0.2`` draws t ~ U(0.2, 0.8) per sequence;
- under t ~ U(0, 1) the 1/t weight is unbounded (the k3 KL exponentiates the weighted log-ratio);
  on the tiny Sudoku testbed seed 0 stopped at step 49 with an infinite gradient norm; the code's
  t_min = 0.2 bounds the weight by 5;
- eq. 13 SUMS a pair (per token one of its two terms is non-zero), so with λ = 1 the proxy is the
  mean of one 1/t-weighted masked log-prob and the full-mask one; App. A.4 analyses the antithetic
  mean of the pair instead. This file follows eq. 13 (and the code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bgpo import elbo
from bgpo.elbo import Batch, Draws, ELBOConfig
from bgpo.method import Prepared, check_common, clipped, k3, reference
from bgpo.model import DLLM


@dataclass
class CoupledGRPOConfig:
    n_t: int = 1
    """λ: complementary mask pairs per update (DiffuCoder §5: 1)"""
    clip_eps: float = 0.5
    """PPO clip ε on the per-token ratio (code: 0.5)"""
    beta: float = 0.01
    """k3 KL coefficient to the reference (code: 0.01)"""
    std_adv: bool = False
    """A = r − mean_G r (Algorithm 1)"""
    elbo: ELBOConfig = field(default_factory=lambda: ELBOConfig(mode="complementary", level="time",
                                                                window="eos", full_mask=True))

    def __post_init__(self) -> None:  # pragma: no mutate block (validation)
        check_common(self, "coupled_grpo")
        if self.elbo.mode != "complementary":
            raise ValueError(f"method.cfg.elbo.mode={self.elbo.mode!r} must be complementary (coupled_grpo)")


def coupled_logp(model: DLLM, batch: Batch, draws: Draws, js: slice, lam: int) -> Tensor:
    """Eq. 13: each token's weighted log-probs summed over the draws js, over λ(+1): ``[B, L]``."""
    logp = elbo.token_logprobs(model, batch, draws, js)  # [2λ+1, B, L]
    w, hit = draws.weight[js].to(logp.dtype), draws.hit(js)  # [2λ+1, B], [2λ+1, B, L]
    return (w[..., None] * hit * logp).sum(0) / lam  # [B, L]


class CoupledGRPO:
    """DiffuCoder §5 coupled-GRPO: per-token clipped ratio of the coupled proxy + k3 KL."""

    OFF_POLICY = "inner_updates"

    def __init__(self, cfg: CoupledGRPOConfig, ref: DLLM | None = None) -> None:
        self.cfg, self.ref = cfg, reference(cfg, ref)
        self.k = cfg.elbo.patterns(cfg.n_t)  # mask patterns per update
        self.lam = cfg.n_t + int(cfg.elbo.full_mask)  # eq. 13's λ + 1

    @torch.no_grad()
    def prepare(self, policy: DLLM, batch: Batch, mu: int,
                generator: torch.Generator | None) -> Prepared:
        c = self.cfg
        draws = elbo.draw_updates(batch, c.elbo, c.n_t, mu, policy.eos_token_id, generator)
        per_update = lambda m: torch.stack([coupled_logp(m, batch, draws, js, self.lam)  # noqa: E731
                                            for js in draws.chunks(self.k)])  # [μ, B, L]
        old = per_update(policy) if mu > 1 else None
        ref = per_update(self.ref) if c.beta > 0 else None
        return Prepared(draws, old, ref)

    def chunks(self, prep: Prepared, it: int) -> list[slice]:
        return [slice(it * self.k, (it + 1) * self.k)]  # a fresh pair per update

    def loss(self, policy: DLLM, batch: Batch, adv: Tensor, prep: Prepared,
             js: slice) -> tuple[Tensor, dict[str, Tensor]]:
        c, it = self.cfg, js.start // self.k
        logp = coupled_logp(policy, batch, prep.draws, js, self.lam)  # [B, L]
        logp_old = logp.detach() if prep.old is None else prep.old[it]  # [B, L]
        # coupled-GRPO: per-token ratio of the coupled proxy, PPO clip, token-level normalisation
        ratio = (logp - logp_old).exp()  # [B, L]
        surr, was_clipped = clipped(ratio, adv[:, None], c.clip_eps, 0.0)  # [B, L]
        per_token = -surr  # [B, L]
        kl_tok = torch.zeros_like(per_token)
        if c.beta > 0:
            kl_tok = k3(prep.ref[it], logp)  # [B, L]
            per_token = per_token + c.beta * kl_tok
        scored = prep.draws.scored.to(per_token.dtype)  # [B, L]
        n_tok = scored.sum()
        loss = (per_token * scored).sum() / n_tok
        return loss, {"loss": loss.detach(), "kl": (kl_tok.detach() * scored).sum() / n_tok,
                      "clip_ratio": (was_clipped * scored).sum() / n_tok,
                      "elbo/ell": (logp.detach() * scored).sum() / adv.shape[0]}
