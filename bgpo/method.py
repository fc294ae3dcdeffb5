"""The one interface every RL objective implements, and the few formulas they share.

A method is built once from its config (``_target_`` in ``conf/method/*.yaml``). For every
rollout batch:

- ``prepare(policy, batch, mu, generator) -> Prepared`` draws the MC masks ONCE and computes the
  no-grad statistics on those same masks: θ_old when the batch serves ``mu > 1`` optimizer steps
  (off-policy), the reference when β > 0. A method whose μ means d1's inner iterations draws a
  fresh set of masks per iteration here.
- ``chunks(prep, it) -> list[slice]`` names the MC samples of each backward pass of update ``it``
  (BGPO: ``mc_chunk`` samples at a time; VRPO-OL: all n_t at once; d1: iteration ``it``'s masks).
- ``loss(policy, batch, adv, prep, js) -> (loss, stats)`` RETURNS the loss of samples ``js`` and
  detached statistics; it never calls ``.backward()``. A user's own loop can hand the loss to
  ``accelerator.backward``; the suite's trainer calls :func:`backward` below.

Two meanings of "more than one update per rollout batch" (``OFF_POLICY``, a class attribute):

- ``"minibatches"`` (BGPO §4, the paper's off-policy variant; BGPO, VRPO-OL, TraceRL, JustGRPO): the rollout
  batch is split into μ mini-batches of whole prompt groups, one optimizer step each, every sample
  used once; θ_old is the rollout policy, evaluated on the SAME coupled draws as θ.
- ``"inner_updates"`` (d1 §3.2, diffu-GRPO's μ; wd1, SPG, ESPO, coupled-GRPO): μ optimizer steps
  over the WHOLE batch, each with a fresh prompt mask (wd1 and SPG have no θ_old: plain gradient
  steps).

A method may also declare ``ROLLOUT_ORDER`` (a class attribute): ``"left_to_right"`` asks for
rollouts decoded one token per step, left to right (JustGRPO: the dLLM as an autoregressive
policy); the default ``"blocks"`` is the task's block-wise sampler. The trainer passes it to
``bgpo.rollout.rollout`` whatever the method is; rollouts always carry the sampler's trace
(``Batch.trace``), which a trajectory-likelihood method (TraceRL) scores. ``ROLLOUT_TEMPERATURE``
(JustGRPO, TraceRL: 1.0) is the only rollout temperature at which the method's likelihood is the
sampler's distribution; ``bgpo.config`` refuses any other at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

import torch
from torch import Tensor

from bgpo.elbo import Batch, Draws
from bgpo.model import DLLM
from bgpo.models.layers import is_fake

OFF_POLICY_KINDS = ("minibatches", "inner_updates")

R = TypeVar("R")


@dataclass
class Prepared:
    draws: Draws
    old: Tensor | None = None  # θ_old statistics on the same draws (None: on-policy, use θ detached)
    ref: Tensor | None = None  # reference statistics on the same draws (None: β = 0)

    def select(self, rows: Tensor) -> Prepared:
        """The rows ``rows`` of the batch (a mini-batch): draws, θ_old and reference alike."""
        pick = lambda t: None if t is None else t[:, rows]  # noqa: E731  [n, B, ...] -> [n, b, ...]
        return Prepared(self.draws.select(rows), pick(self.old), pick(self.ref))


class Method(Protocol):
    OFF_POLICY: ClassVar[str]

    def prepare(self, policy: DLLM, batch: Batch, mu: int,
                generator: torch.Generator | None) -> Prepared: ...

    def chunks(self, prep: Prepared, it: int) -> list[slice]: ...

    def loss(self, policy: DLLM, batch: Batch, adv: Tensor, prep: Prepared,
             js: slice) -> tuple[Tensor, dict[str, Tensor]]: ...


def backward(method: Method, policy: DLLM, batch: Batch, adv: Tensor, prep: Prepared,
             it: int, scale: float = 1.0) -> dict[str, float]:
    """Update ``it``'s backward passes, one per chunk: each chunk's graph is freed before the next
    is built (BGPO's constant memory in n_t). Returns the statistics summed over chunks. ``scale``
    multiplies the loss (and its statistic): the share of the batch's rows these are (see
    :func:`informative`)."""
    stats: dict[str, float] = {}
    for js in method.chunks(prep, it):
        loss, st = method.loss(policy, batch, adv, prep, js)
        (loss if scale == 1.0 else loss * scale).backward()
        for k, v in st.items():
            if is_fake(v):  # a memory plan on fake tensors (bgpo.plan): no values to report
                continue
            stats[k] = stats.get(k, 0.0) + float(v) * (scale if k == "loss" else 1.0)
    return stats


def informative(batch: Batch, adv: Tensor, prep: Prepared) -> tuple[Batch, Tensor, Prepared, float]:
    """The prompt groups whose advantages are not all zero, and the share of the rows they are.
    For a method whose loss is zero where A = 0 (``flat_groups_free``), the loss of these rows
    times that share has exactly the gradient of the whole batch's, for a fraction of the passes
    (a group of equal rewards is most of a Countdown batch)."""
    G = batch.group_size
    keep = (adv.view(-1, G) != 0).any(-1).repeat_interleave(G)  # [B]
    rows = keep.nonzero().flatten()
    share = rows.numel() / adv.numel()
    if share == 1.0:
        return batch, adv, prep, share
    return batch.select(rows), adv[rows], prep.select(rows), share


def minibatch(batch: Batch, adv: Tensor, prep: Prepared, m: int, n: int) -> tuple[Batch, Tensor, Prepared]:
    """Mini-batch ``m`` of ``n``: the m-th n-th of the batch's prompt groups (BGPO §4 off-policy)."""
    G = batch.group_size
    groups = batch.input_ids.shape[0] // G
    if groups % n:
        raise ValueError(f"minibatches={n} must divide the {groups} prompt groups of a rollout shard")
    per = groups // n
    rows = torch.arange(m * per * G, (m + 1) * per * G, device=adv.device)
    return batch.select(rows), adv[rows], prep.select(rows)


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


def k2(ref: Tensor, cur: Tensor) -> Tensor:
    """k2 estimator of KL(π_θ || π_ref): ``½ (θ − ref)²`` (≥ 0; no exponential)."""
    return 0.5 * (cur - ref).square()


# The likelihood estimators (``method.cfg.elbo.mode``, bgpo/elbo.py) each objective is defined with:
# BGPO and VRPO-OL need unbiased Monte Carlo draws of the ELBO (BGPO §3); d1's one-step estimate,
# the exact AR likelihood and TraceRL's trajectory terms belong to their own methods.
ESTIMATORS = {"bgpo": ("elbo", "complementary", "block"), "vrpo": ("elbo", "complementary", "block"),
              "diffu_grpo": ("one_step",), "wd1": ("one_step",), "spg": ("block", "elbo"),
              "espo": ("complementary", "elbo"), "coupled_grpo": ("complementary",),
              "tracerl": ("trajectory",), "just_grpo": ("ar",)}


def reference(c: object, ref: R) -> R:  # pragma: no mutate block (validation)
    """``ref`` for a method whose KL term needs it (``beta`` > 0): one sentence, not an error deep in
    the estimator, when a method is built with a KL coefficient and no reference model."""
    beta = getattr(c, "beta", 0.0)
    if ref is None and isinstance(beta, (int, float)) and beta > 0:
        raise ValueError(f"method.cfg.beta={beta} needs a frozen reference model for its KL term: "
                         "build the method with ref=<a copy of the initial policy>, or set method.cfg.beta=0")
    return ref


def check_common(c: object, name: str) -> None:  # pragma: no mutate block (validation)
    """Range checks shared by the method configs (``method.cfg.<key>``), at construction time."""
    elbo = getattr(c, "elbo", None)
    if elbo is not None and name in ESTIMATORS and elbo.mode not in ESTIMATORS[name]:
        raise ValueError(f"method.cfg.elbo.mode={elbo.mode!r} is not an estimator {name}'s objective is "
                         f"defined with; allowed: {list(ESTIMATORS[name])}")
    for key, lo, strict in (("n_t", 1, False), ("mc_chunk", 1, False), ("clip_eps", 0.0, False),
                            ("beta", 0.0, False), ("psi", 0.0, True)):
        v = getattr(c, key, None)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"method.cfg.{key}={v!r} must be a number ({name})")
        if not v == v or v in (float("inf"), float("-inf")) or v < lo or (strict and v == lo):
            raise ValueError(f"method.cfg.{key}={v} must be {'>' if strict else '>='} {lo} ({name})")
    dual = getattr(c, "dual_clip", 0.0)
    if isinstance(dual, bool) or not isinstance(dual, (int, float)) or not (dual == 0 or dual > 1):
        raise ValueError(f"method.cfg.dual_clip={dual} must be 0 (off) or > 1 ({name})")
