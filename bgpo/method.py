"""The one interface every RL objective implements, and the few formulas they share (SPEC §3).

A method is built once from its config (``_target_`` in ``conf/method/*.yaml``) and then, for
every rollout batch, the trainer calls
- ``prepare(policy, batch, updates, generator) -> Prepared``: draws the MC masks ONCE and computes
  the no-grad statistics (θ_old only when ``updates > 1``, the reference only when β > 0);
- ``backward(policy, batch, adv, prep, it) -> stats``: the loss of update ``it``; the method calls
  ``.backward()`` itself (BGPO once per MC chunk) and returns detached floats.
The trainer owns ``zero_grad``, gradient clipping and ``optimizer.step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from bgpo.elbo import Batch, Draws
from bgpo.model import DLLM


@dataclass
class Prepared:
    draws: Draws
    old: Tensor | None = None  # θ_old statistics on the same draws (None: on-policy, use θ detached)
    ref: Tensor | None = None  # reference statistics on the same draws (None: β = 0)


class Method(Protocol):
    def prepare(self, policy: DLLM, batch: Batch, updates: int,
                generator: torch.Generator | None) -> Prepared: ...

    def backward(self, policy: DLLM, batch: Batch, adv: Tensor, prep: Prepared,
                 it: int) -> dict[str, float]: ...


def clipped(ratio: Tensor, adv: Tensor, eps: float, dual_clip: float) -> tuple[Tensor, Tensor]:
    """PPO surrogate ``min(ρA, clip(ρ, 1±ε)A)`` (ε = 0: no clip) with dual clip ``max(·, cA)`` for
    A < 0 (c = 0: off). Returns the surrogate and a float mask of where clipping was active."""
    surr = ratio * adv
    if eps > 0:
        surr = torch.minimum(surr, ratio.clamp(1 - eps, 1 + eps) * adv)
    if dual_clip > 0:
        surr = torch.where(adv < 0, torch.maximum(surr, dual_clip * adv), surr)
    return surr, (surr != ratio * adv).float()


def k3(ref: Tensor, cur: Tensor) -> Tensor:
    """k3 estimator of KL(π_θ || π_ref) from log-probs: ``exp(ref − θ) − (ref − θ) − 1`` (≥ 0)."""
    delta = ref - cur
    return delta.exp() - delta - 1
