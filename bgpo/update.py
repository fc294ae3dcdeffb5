"""The update phase of the RL loop, written once for every method (docs/methods.md §3–§4):

    rewards → group advantages → μ optimizer steps, each: (method.loss → backward) per chunk of each
    rollout shard → mean over shards → clip → AdamW step

``μ = minibatches · inner_updates`` (at most one of the two is > 1): BGPO §4's off-policy
mini-batches (mini-batch ``it`` of each shard's prompt groups, every sample used once, θ_old the
rollout policy) or d1 §3.2's inner updates over the whole batch. ``bgpo.trainer`` calls these;
they are what the mutation score of the update loop measures (README, "Mutation testing").
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bgpo.method import backward as method_backward
from bgpo.method import informative, minibatch


def advantages(rewards: torch.Tensor, G: int, std_norm: bool) -> torch.Tensor:
    """Group advantages (docs/methods.md §3): ``r − mean_G r``, divided by ``std_G r`` when ``std_norm``."""
    r = rewards.view(-1, G)  # [n_prompts, G]
    a = r - r.mean(-1, keepdim=True)
    if std_norm:
        a = a / (r.std(-1, keepdim=True) + 1e-4)
    return a.flatten()  # [B]


def update(method: Any, policy: Any, work: list[tuple[Any, torch.Tensor, Any]], *, minibatches: int, mu: int,
           skip_flat: bool, shards: int, dist: Any, params: list[torch.nn.Parameter],
           opt: torch.optim.Optimizer, sched: Any, grad_clip: float,
           ) -> tuple[dict[str, float], list[float], tuple[str, float] | None]:
    """μ optimizer steps on this process's rollout shards ``work`` = [(batch, adv, prepared)]: the
    stats averaged over shards and steps, each step's gradient norm, and ``(quantity, value)`` of
    the first non-finite loss or gradient norm (then no step is taken) or None."""
    stats: dict[str, float] = {}
    norms: list[float] = []
    for it in range(mu):
        grads = dist.grad_sum(params)  # zeroes p.grad
        loss = 0.0
        for batch, adv, prep in work:
            if minibatches > 1:  # mini-batch `it`: its prompt groups, each sample used once
                batch, adv, prep = minibatch(batch, adv, prep, it, minibatches)
            share = 1.0
            if skip_flat:  # groups of equal rewards add nothing to this loss: skip their passes
                batch, adv, prep, share = informative(batch, adv, prep)
            # the method returns each chunk's loss; backward per chunk (BGPO's memory floor)
            if share > 0:
                for k, v in method_backward(method, policy, batch, adv, prep, it, share).items():
                    stats[k] = stats.get(k, 0.0) + v / (len(work) * mu)
                    loss += v if k == "loss" else 0.0
            grads.add_shard()
        grads.reduce(shards)  # mean over all shards of all processes, in p.grad
        norms.append(dist.grad_norm(params, grad_clip))
        if not math.isfinite(norms[-1]):  # the same on every rank: all stop, none steps
            return stats, norms, ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norms[-1])
        opt.step()
        sched.step()
    return stats, norms, None
