"""JustGRPO: the dLLM as an autoregressive policy (Ni et al., arXiv 2601.15165).

Rollouts decode left to right, one token per step (``ROLLOUT_ORDER``: blocks of one, steps =
gen_length), and the policy's log-probability is then EXACT: ``log π(y) = Σ_k log p_θ(y_k | x,
y_<k, M…M)``, position k scored with every later position masked (``elbo.mode=ar``). Standard
GRPO on it, per token: ``ρ_k = exp(log p_θ − log p_old)``, loss
``−(1/(L·N_A)) Σ_i Σ_k min(ρ_k A_i, clip(ρ_k, 1±ε) A_i)`` with N_A the responses whose advantage is
non-zero. Positions are independent terms: one backward per ``mc_chunk`` positions, memory flat in
n_t (the authors' code backpropagates one position at a time).

How the rollout order is declared: the class attribute ``ROLLOUT_ORDER = "left_to_right"``; the
trainer hands every method's ``ROLLOUT_ORDER`` to ``bgpo.rollout.rollout`` without knowing which
method it runs (``bgpo.method``). Evaluation keeps the task's block-wise sampler.

Departures and switches. The paper's text could not be read (no arXiv HTML was found); the objective
and defaults follow its abstract and the authors' released code (LeapLabTHU/JustGRPO ``grpo.py``,
``train.py``), read line by line; check them against the paper before quoting results:
- n_t (= mc) positions per response: n_t ≥ L scores every position (the exact log-likelihood,
  the code); n_t < L samples n_t positions without replacement, weight L/n_t (unbiased, cheaper);
- advantages (r − mean_G r)/(std_G r + 1e-4), Bessel's std; ε = 0.2 (on-policy the clip is inactive);
  the code: G = 16 (8 generations × 2 repeats), 64 prompts per step, rollout temperature 1.0,
  L = 256 decoded in 256 steps, lr 5e-6, 125 steps, gradient clip 1.0;
- the normalisation by L·N_A is the code's (``gain / gen_length / valid_samples``), but the code counts
  N_A per gradient-accumulation step (8 prompts) and SUMS the 8 steps' gradients: its gradient is
  about 8 times this file's, with N_A counted over the whole (mini-)batch; a scale, which Adam
  ignores and the gradient clip does not;
- off-policy: ``minibatches=μ`` (θ_old = the rollout policy); the code is on-policy only;
- the whole window is scored, EOS padding included (``elbo.window=full``, as the code);
- rollout temperature 1 only (``ROLLOUT_TEMPERATURE``, refused otherwise at start-up): the code's
  loss divides the logits by its sampling temperature, which is 1; the normaliser N_A is counted
  per rollout shard (the trainer averages the shards' losses).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bgpo import elbo
from bgpo.elbo import Batch, ELBOConfig
from bgpo.method import Prepared, check_common, clipped, reference
from bgpo.model import DLLM


@dataclass
class JustGRPOConfig:
    n_t: int = 16
    """positions scored per response; ≥ gen_length: every one, the exact AR log-likelihood"""
    mc_chunk: int = 1
    """positions per backward pass; any chunking gives the same gradient"""
    clip_eps: float = 0.2
    """PPO clip ε on the per-token ratio (code: 0.2)"""
    std_adv: bool = True
    """A = (r − mean_G r)/std_G r (code)"""
    elbo: ELBOConfig = field(default_factory=lambda: ELBOConfig(mode="ar", window="full"))

    def __post_init__(self) -> None:  # pragma: no mutate block (validation)
        check_common(self, "just_grpo")
        if self.elbo.mode != "ar" or self.elbo.length_norm:
            raise ValueError(f"method.cfg.elbo.mode={self.elbo.mode!r} must be ar, without length_norm "
                             "(just_grpo)")


class JustGRPO:
    """JustGRPO: GRPO on the exact left-to-right log-probabilities, left-to-right rollouts."""

    OFF_POLICY = "minibatches"
    ROLLOUT_ORDER = "left_to_right"
    ROLLOUT_TEMPERATURE = 1.0  # the likelihood is the sampler's only at temperature 1

    def __init__(self, cfg: JustGRPOConfig, ref: DLLM | None = None) -> None:
        self.cfg, self.ref = cfg, reference(cfg, ref)

    @torch.no_grad()
    def prepare(self, policy: DLLM, batch: Batch, mu: int,
                generator: torch.Generator | None) -> Prepared:
        c = self.cfg
        draws = elbo.draw(batch, c.elbo, c.n_t, policy.eos_token_id, generator)
        old = elbo.token_logprobs_all(policy, batch, draws) if mu > 1 else None  # [n, B, L]
        return Prepared(draws, old)  # no KL: no reference

    def chunks(self, prep: Prepared, it: int) -> list[slice]:
        return list(prep.draws.chunks(self.cfg.mc_chunk))  # positions are independent terms

    def loss(self, policy: DLLM, batch: Batch, adv: Tensor, prep: Prepared,
             js: slice) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        logp = elbo.token_logprobs(policy, batch, prep.draws, js)  # [k, B, L]
        logp_old = logp.detach() if prep.old is None else prep.old[js]  # [k, B, L]
        hit = prep.draws.hit(js).to(logp.dtype)  # [k, B, L]: one position per draw and row
        w = prep.draws.weight[js].to(logp.dtype)[..., None]  # [k, B, 1] L/n
        norm = batch.completion.shape[1] * (adv != 0).sum().clamp(min=1)  # L · N_A
        # JustGRPO: GRPO's per-token clipped ratio on exact autoregressive log-probabilities
        ratio = (logp - logp_old).exp()  # [k, B, L]
        surr, was_clipped = clipped(ratio, adv[None, :, None], c.clip_eps, 0.0)  # [k, B, L]
        loss = -(w * hit * surr).sum() / norm
        return loss, {"loss": loss.detach(), "kl": torch.zeros(()),
                      "clip_ratio": (w * hit * was_clipped).sum() / norm,
                      "elbo/ell": (w * hit * logp.detach()).sum() / adv.shape[0]}
