"""TraceRL: trajectory-aware RL for diffusion LMs (Wang et al., arXiv 2509.06949, §3).

The likelihood is that of the rollout's own decoding trajectory: the sampler records the step
that committed each position (``Batch.trace``), the steps are merged s at a time into n_t groups,
and group g's tokens are scored in the sampler's state before group g (``elbo.mode=trajectory``:
earlier groups revealed, group g and later masked). Per token of group g of response i,
``ρ = exp(log p_θ − log p_old)``, and the loss is the PPO-clipped surrogate averaged over the
group's tokens, then over every (response, group) pair of the batch:
``−(1/N) Σ_(i,g) (1/|τ_ig|) Σ_(k ∈ τ_ig) min(ρA_i, clip(ρ, 1±ε)A_i)``. The groups are
independent terms: one backward per ``mc_chunk`` groups, memory flat in n_t.

Departures and switches. The paper's text could not be read (no arXiv HTML was found; the authors'
README shows its Table 2 only): the objective and defaults follow its abstract and the authors'
released code (Gen-Verse/dLLM-RL ``train/rl_llada.py``, ``configs/rl_llada.yaml``), read line by
line; check them against the paper before quoting:
- n_t (= mc) is the number of forward passes per response: the trajectory's distinct steps merged
  into n_t groups of s = ⌈steps / n_t⌉ (the code's shrinkage s = 8; s = 1 scores every step in
  exactly the sampler's state); ``mc_chunk`` groups per backward pass;
- no value model (the paper's optional diffusion value model): advantages (r − mean_G r)/(std_G r +
  1e-4) with Bessel's std; the code's z-score uses the population std and no 1e-4 (a constant
  factor √(G/(G−1)) per group), and it drops every group whose accuracy is > 0.8 or < 0.2 and counts
  a response within 5 tokens of the length limit as wrong (``reward/rl_reward.py``): not done here;
- ε = 0.2; ``beta_old``: the code's k3 KL toward θ_old (``configs/rl_llada.yaml``: β = 0.01; no
  gradient on-policy, a trust-region term across mini-batches), default off; ``beta``: k3 KL to the
  reference, which the code does not have. Both are summed over a group's tokens and averaged over
  the (response, group) pairs, as the code's ``kl_seq`` (the clipped term is a mean per group);
- off-policy: ``minibatches=μ`` (θ_old = the rollout policy; the trajectory draws are fixed); the code
  walks its (response, group) rows in order, 2·128 per process and optimizer step, so one response's
  groups can fall into two steps; here a mini-batch is whole prompt groups;
- the scored window is up to the first EOS (``elbo.window=eos``; the code also drops the first EOS);
- rollouts with ``sampler.mode=cached`` are scored with full forward passes, i.e. not in the
  exact (stale-cache) state the sampler saw;
- rollout temperature 1 only (``ROLLOUT_TEMPERATURE``, refused otherwise at start-up): the code
  samples at 0.8 and scores untempered log-softmax, a likelihood of another distribution; even at 1
  the likelihood leaves out which positions the sampler chose to commit.
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
class TraceRLConfig:
    n_t: int = 2
    """forward passes per response: the trajectory's steps in n_t groups (s = steps / n_t; code s = 8)"""
    mc_chunk: int = 1
    """trajectory groups per backward pass; any chunking gives the same gradient"""
    clip_eps: float = 0.2
    """PPO clip ε on the per-token ratio (code: 0.2)"""
    beta: float = 0.0
    """k3 KL coefficient to the reference; 0 = off (the code has none)"""
    beta_old: float = 0.0
    """k3 KL coefficient toward θ_old, the code's term (its config: 0.01); 0 = off"""
    std_adv: bool = True
    """A = (r − mean_G r)/std_G r (code)"""
    elbo: ELBOConfig = field(default_factory=lambda: ELBOConfig(mode="trajectory", window="eos"))

    def __post_init__(self) -> None:  # pragma: no mutate block (validation)
        check_common(self, "tracerl")
        b = self.beta_old
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not b >= 0:
            raise ValueError(f"method.cfg.beta_old={b!r} must be a number >= 0 (tracerl)")
        if self.elbo.mode != "trajectory":
            raise ValueError(f"method.cfg.elbo.mode={self.elbo.mode!r} must be trajectory (tracerl)")


class TraceRL:
    """TraceRL §3: per-token clipped ratio on the rollout's own trajectory, mean per step group."""

    OFF_POLICY = "minibatches"
    ROLLOUT_TEMPERATURE = 1.0  # the likelihood is the sampler's only at temperature 1

    def __init__(self, cfg: TraceRLConfig, ref: DLLM | None = None) -> None:
        self.cfg, self.ref = cfg, reference(cfg, ref)

    @torch.no_grad()
    def prepare(self, policy: DLLM, batch: Batch, mu: int,
                generator: torch.Generator | None) -> Prepared:
        c = self.cfg
        draws = elbo.draw(batch, c.elbo, c.n_t, policy.eos_token_id, generator)
        old = elbo.token_logprobs_all(policy, batch, draws) if mu > 1 else None  # [n_t, B, L]
        ref = elbo.token_logprobs_all(self.ref, batch, draws) if c.beta > 0 else None  # [n_t, B, L]
        return Prepared(draws, old, ref)

    def chunks(self, prep: Prepared, it: int) -> list[slice]:
        return list(prep.draws.chunks(self.cfg.mc_chunk))  # groups are independent terms

    def loss(self, policy: DLLM, batch: Batch, adv: Tensor, prep: Prepared,
             js: slice) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        logp = elbo.token_logprobs(policy, batch, prep.draws, js)  # [k, B, L]
        logp_old = logp.detach() if prep.old is None else prep.old[js]  # [k, B, L]
        hit = prep.draws.hit(js).to(logp.dtype)  # [k, B, L]
        n_rows = prep.draws.hit(slice(None)).any(-1).sum().clamp(min=1)  # (response, group) pairs
        # TraceRL: per-token clipped ratio, a mean over each group's tokens, a mean over groups
        ratio = (logp - logp_old).exp()  # [k, B, L]
        surr, was_clipped = clipped(ratio, adv[None, :, None], c.clip_eps, 0.0)  # [k, B, L]
        kl_ref, kl_old = torch.zeros_like(logp), torch.zeros_like(logp)  # [k, B, L]
        if c.beta > 0:
            kl_ref = k3(prep.ref[js], logp)  # [k, B, L]
        if c.beta_old > 0:
            kl_old = k3(logp_old, logp)  # [k, B, L] the code's KL: toward θ_old
        per_row = hit.sum(-1).clamp(min=1)  # [k, B] tokens of each group
        mean = lambda t: ((t * hit).sum(-1) / per_row).sum() / n_rows  # noqa: E731  mean in a group
        total = lambda t: (t * hit).sum() / n_rows  # noqa: E731  sum in a group (the code's KL)
        loss = mean(-surr) + total(c.beta * kl_ref + c.beta_old * kl_old)
        return loss, {"loss": loss.detach(), "kl": total(kl_ref.detach()), "kl_old": total(kl_old.detach()),
                      "clip_ratio": mean(was_clipped),
                      "elbo/ell": (logp.detach() * hit).sum() / adv.shape[0]}
