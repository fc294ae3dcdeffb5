"""Rows taken out of a rollout batch (BGPO §4's mini-batches, the skip of flat groups) carry every
per-row tensor with them — the batch's sampler trace, the draws' targets, θ_old's and the
reference's statistics — and methods with β = 0 need no reference (mutation gaps, issue 24)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from baselines.coupled_grpo import CoupledGRPO, CoupledGRPOConfig
from baselines.diffu_grpo import DiffuGRPO, DiffuGRPOConfig
from bgpo.elbo import Draws
from bgpo.method import Prepared, informative, minibatch
from tests.helpers import micro_model, random_batch


def prepared(B: int, L: int, mu: int = 2) -> Prepared:
    g = torch.Generator().manual_seed(0)
    draws = Draws(masked=torch.rand(3, B, 5 + L, generator=g) < 0.5, weight=torch.rand(3, B, generator=g,
                                                                                   dtype=torch.float64),
                  scored=torch.ones(B, L, dtype=torch.bool), target=torch.rand(3, B, L, generator=g) < 0.5)
    return Prepared(draws, old=torch.randn(mu, B, L, generator=g), ref=torch.randn(mu, B, L, generator=g))


def test_a_minibatch_carries_every_per_row_tensor():
    batch = random_batch(micro_model(), n_prompts=4, G=3, L=6)
    batch = dataclasses.replace(batch, trace=torch.arange(12 * 6).view(12, 6))
    prep = prepared(12, 6)
    adv = torch.arange(12, dtype=torch.float64)
    b, a, p = minibatch(batch, adv, prep, 1, 2)  # prompt groups 2 and 3: rows 6..11
    rows = torch.arange(6, 12)
    assert torch.equal(b.input_ids, batch.input_ids[rows]) and torch.equal(b.trace, batch.trace[rows])
    assert torch.equal(a, adv[rows])
    assert torch.equal(p.old, prep.old[:, rows]) and torch.equal(p.ref, prep.ref[:, rows])
    assert torch.equal(p.draws.target, prep.draws.target[:, rows])
    assert torch.equal(p.draws.masked, prep.draws.masked[:, rows]) and torch.equal(p.draws.weight,
                                                                                prep.draws.weight[:, rows])


def test_informative_keeps_the_groups_whose_advantages_are_not_all_zero():
    batch = random_batch(micro_model(), n_prompts=3, G=3, L=6)
    prep = prepared(9, 6)
    adv = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, -0.5, 0.0], dtype=torch.float64)
    b, a, p, share = informative(batch, adv, prep)
    assert share == pytest.approx(6 / 9) and torch.equal(a, adv[3:])
    assert torch.equal(p.ref, prep.ref[:, 3:]) and torch.equal(b.input_ids, batch.input_ids[3:])
    same = informative(batch, torch.ones(9, dtype=torch.float64), prep)
    assert same[3] == 1.0 and same[0] is batch  # nothing flat: the batch itself


@pytest.mark.parametrize("make", [lambda: DiffuGRPO(DiffuGRPOConfig(n_t=2, beta=0.0)),
                                  lambda: CoupledGRPO(CoupledGRPOConfig(n_t=1, beta=0.0))],
                         ids=["diffu_grpo", "coupled_grpo"])
def test_beta_zero_needs_no_reference(make):
    model = micro_model()
    batch = random_batch(model, n_prompts=2, G=3, L=6)
    method = make()
    prep = method.prepare(model, batch, 1, torch.Generator().manual_seed(0))
    assert prep.ref is None
    adv = torch.tensor([1.0, -1.0, 0.0, 0.5, -0.5, 0.0], dtype=torch.float64)
    for js in method.chunks(prep, 0):
        loss, stats = method.loss(model, batch, adv, prep, js)
        assert torch.isfinite(loss) and float(stats["kl"]) == 0.0
