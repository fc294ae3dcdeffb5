"""Float64 numeric tests of the four objectives (SPEC §3)."""

from __future__ import annotations

import copy

import pytest
import torch

from baselines.diffu_grpo import DiffuGRPO, DiffuGRPOConfig
from baselines.vrpo import VRPO, VRPOConfig
from baselines.wd1 import WD1, WD1Config
from bgpo import elbo
from bgpo.elbo import ELBOConfig
from bgpo.method import Prepared
from bgpo.method import backward as method_backward
from bgpo.objective import BGPO, BGPOConfig
from tests.helpers import grads, micro_model, perturb, random_batch

ADV = torch.tensor([1.5, -0.5, -1.0, 0.7, -2.0, 1.3], dtype=torch.float64)


def loss_and_grad(method, model, batch, adv, prep, it=0):
    model.net.zero_grad(set_to_none=True)
    stats = method_backward(method, model, batch, adv, prep, it)
    return stats["loss"], grads(model).clone()


@pytest.mark.parametrize("level", ["time", "count"])
def test_bgpo_equals_vrpo_on_policy(level):
    """On-policy BGPO's bound equals VRPO-OL's objective in value and gradient (both signs)."""
    model = micro_model()
    batch = random_batch(model)
    cfg = ELBOConfig(level=level)
    draws = elbo.draw(batch, cfg, 4, model.eos_token_id, torch.Generator().manual_seed(3))
    prep = Prepared(draws)
    for adv in (ADV, ADV.abs(), -ADV.abs()):
        lb, gb = loss_and_grad(BGPO(BGPOConfig(n_t=4, elbo=cfg)), model, batch, adv, prep)
        lv, gv = loss_and_grad(VRPO(VRPOConfig(n_t=4, elbo=cfg)), model, batch, adv, prep)
        assert lb == pytest.approx(lv, rel=1e-10, abs=1e-12)
        assert gb.abs().max() > 0
        assert torch.linalg.norm(gb - gv) <= 1e-10 * torch.linalg.norm(gv)


def test_bgpo_bound_below_vrpo_off_policy():
    """Off-policy (θ ≠ θ_old) the bound Σ_j g_j ≤ exp(B̂_θ − B̂_old)·A for every response and sign."""
    old = micro_model()
    batch = random_batch(old)
    draws = elbo.draw(batch, ELBOConfig(), 8, old.eos_token_id, torch.Generator().manual_seed(5))
    ell_old = elbo.ell_all(old, batch, draws, 8)  # [n_t, B]
    new = copy.deepcopy(old)
    perturb(new, 0.05)
    ell_new = elbo.ell_all(new, batch, draws, 8)  # [n_t, B]
    d = ell_new - ell_old  # [n_t, B]
    assert d.abs().max() > 1e-3  # the perturbation really moved the policy
    for sign in (1.0, -1.0):
        A = sign * ADV.abs()
        bound = torch.where(A >= 0, A * (1 + d), A * d.exp()).mean(0)  # [B]
        vrpo = (d.mean(0)).exp() * A  # [B]
        assert torch.all(bound <= vrpo + 1e-12)
        assert torch.any(bound < vrpo - 1e-9)  # a real gap off-policy
    # and through the methods' own code paths (loss = −mean ⇒ BGPO's loss ≥ VRPO's)
    prep = Prepared(draws, old=ell_old)
    for sign in (1.0, -1.0):
        A = sign * ADV.abs()
        lb, _ = loss_and_grad(BGPO(BGPOConfig(n_t=8, mc_chunk=8)), new, batch, A, prep)
        lv, _ = loss_and_grad(VRPO(VRPOConfig(n_t=8)), new, batch, A, prep)
        assert lb >= lv - 1e-12


def test_mc_chunk_gives_same_gradient():
    model = micro_model()
    batch = random_batch(model)
    draws = elbo.draw(batch, ELBOConfig(), 8, model.eos_token_id, torch.Generator().manual_seed(7))
    prep = Prepared(draws)
    gs = [loss_and_grad(BGPO(BGPOConfig(n_t=8, mc_chunk=k)), model, batch, ADV, prep)[1]
          for k in (1, 4, 8)]
    for g in gs[1:]:
        assert torch.allclose(g, gs[0], rtol=1e-10, atol=1e-13)


def test_diffu_grpo_on_policy_is_policy_gradient():
    """θ = θ_old, β = 0: value −mean(A) over tokens, gradient −Σ A_i ∇log p_ik / N_tokens."""
    model = micro_model()
    batch = random_batch(model, eos_at=4)
    method = DiffuGRPO(DiffuGRPOConfig(beta=0.0))
    prep = method.prepare(model, batch, 1, torch.Generator().manual_seed(0))
    loss, g = loss_and_grad(method, model, batch, ADV, prep)
    scored = prep.draws.scored.double()  # [B, L]
    n_tok = scored.sum()
    assert loss == pytest.approx(-(ADV[:, None] * scored).sum().item() / n_tok.item(), rel=1e-12)
    model.net.zero_grad(set_to_none=True)
    logp = elbo.token_logprobs(model, batch, prep.draws, slice(0, 1))[0]  # [B, L]
    (-(ADV[:, None] * logp * scored).sum() / n_tok).backward()
    ref = grads(model)
    assert torch.allclose(g, ref, rtol=1e-10, atol=1e-13)


def test_diffu_grpo_kl_zero_at_reference_and_clip_active_off_policy():
    model = micro_model()
    batch = random_batch(model, eos_at=4)
    method = DiffuGRPO(DiffuGRPOConfig(beta=0.04, clip_eps=0.01), ref=copy.deepcopy(model))
    prep = method.prepare(model, batch, 2, torch.Generator().manual_seed(0))
    assert prep.old.shape[0] == 2 and not torch.equal(prep.draws.masked[0], prep.draws.masked[1])
    stats = method_backward(method, model, batch, ADV, prep, 0)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-12) and stats["clip_ratio"] == 0.0
    perturb(model, 0.2)
    stats = method_backward(method, model, batch, ADV, prep, 1)
    assert stats["kl"] > 0 and stats["clip_ratio"] > 0


def test_wd1_zero_gradient_when_rewards_equal_and_value():
    model = micro_model()
    batch = random_batch(model)
    method = WD1(WD1Config())
    prep = method.prepare(model, batch, 1, torch.Generator().manual_seed(0))
    _, g = loss_and_grad(method, model, batch, torch.zeros(6, dtype=torch.float64), prep)
    assert g.abs().max() == 0
    # value: Σ_i (w⁻ − w⁺)·S_i averaged over groups, by hand
    loss, g = loss_and_grad(method, model, batch, ADV, prep)
    S = elbo.ell_all(model, batch, prep.draws, 1)[0].view(2, 3)
    A = ADV.view(2, 3)
    expect = ((A.neg().softmax(-1) - A.softmax(-1)) * S).sum() / 2
    assert loss == pytest.approx(expect.item(), rel=1e-12) and g.abs().max() > 0


@pytest.mark.parametrize("cls,cfg", [(BGPO, BGPOConfig(n_t=2, clip_eps=0.2, dual_clip=3.0, beta=0.1)),
                                     (VRPO, VRPOConfig(n_t=2, clip_eps=0.2, dual_clip=3.0, beta=0.1))])
def test_clip_and_kl_options(cls, cfg):
    """Clipping is inactive on-policy; the KL term is 0 at the reference and > 0 away from it."""
    model = micro_model()
    batch = random_batch(model)
    method = cls(cfg, ref=copy.deepcopy(model))
    prep = method.prepare(model, batch, 1, torch.Generator().manual_seed(0))
    stats = method_backward(method, model, batch, ADV, prep, 0)
    assert stats["clip_ratio"] == 0 and stats["kl"] == pytest.approx(0, abs=1e-12)
    old = method.prepare(model, batch, 2, torch.Generator().manual_seed(0))
    perturb(model, 0.3)
    stats = method_backward(method, model, batch, ADV, old, 0)
    assert stats["kl"] > 0 and stats["clip_ratio"] > 0
