"""The shared ELBO sampler (docs/methods.md §2): draws, exact-ELBO convergence, coupling, memory."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from baselines.vrpo import VRPO, VRPOConfig
from bgpo import elbo
from bgpo.bench.memory import saved_bytes_peak
from bgpo.elbo import ELBOConfig
from bgpo.method import Prepared
from bgpo.method import backward as method_backward
from bgpo.objective import BGPO, BGPOConfig
from tests.helpers import micro_model, perturb, random_batch


def test_count_draws_mask_exactly_l_scored_tokens():
    model = micro_model()
    batch = random_batch(model, eos_at=3)
    for window in ("full", "eos"):
        cfg = ELBOConfig(level="count", window=window, stratified=True)
        d = elbo.draw(batch, cfg, 6, model.eos_token_id, torch.Generator().manual_seed(0))
        comp = d.masked[..., batch.prompt_len:]  # [n_t, B, L]
        l = (comp & d.scored).sum(-1)  # [n_t, B]
        L = d.scored.sum(-1).double()  # [B]
        assert torch.allclose(d.weight, L / l.double())
        assert torch.all(comp | d.scored)  # unscored (post-EOS) positions always masked
        assert not d.masked[..., : batch.prompt_len].any()  # the prompt is never masked
    assert int(L[0]) == 4  # eos window: 3 tokens + the first EOS


def test_stratified_levels_cover_the_range():
    model = micro_model()
    batch = random_batch(model, L=8)
    cfg = ELBOConfig(level="count", stratified=True)
    d = elbo.draw(batch, cfg, 8, model.eos_token_id, torch.Generator().manual_seed(0))
    l = (d.masked[..., batch.prompt_len:]).sum(-1)  # [n_t, B]
    for b in range(l.shape[1]):  # n_t = L strata: every count 1..L exactly once
        assert sorted(l[:, b].tolist()) == list(range(1, 9))


def test_one_step_mode():
    model = micro_model()
    batch = random_batch(model)
    cfg = ELBOConfig(mode="one_step", p_prompt=0.5)
    d = elbo.draw(batch, cfg, 3, model.eos_token_id, torch.Generator().manual_seed(0))
    P = batch.prompt_len
    assert d.masked[..., P:].all() and torch.all(d.weight == 1)
    pm = d.masked[..., :P]
    assert pm.any() and not torch.equal(pm[0], pm[1])  # fresh prompt mask per draw
    assert not (pm & ~batch.attention_mask[:, :P].bool()).any()  # padding is never masked


def exact_elbo(model, batch, b: int) -> float:
    """Σ_l S_l / (l·C(L,l)) by enumerating every completion mask (both weightings' expectation)."""
    P = batch.prompt_len
    y = batch.input_ids[b : b + 1]
    L = y.shape[1] - P
    total = 0.0
    for l in range(1, L + 1):
        S_l = 0.0
        for idx in itertools.combinations(range(L), l):
            x = y.clone()
            x[0, [P + i for i in idx]] = model.mask_token_id
            with torch.no_grad():
                logp = model.logits(x, batch.attention_mask[b : b + 1])[0, P:].log_softmax(-1)
            S_l += sum(logp[i, y[0, P + i]].item() for i in idx)
        total += S_l / (l * math.comb(L, l))
    return total


def expected_weight_by_count(level: str, L: int, l: int, t_min: float) -> float:
    """E[w · 1{exactly l of the L tokens masked}] of the estimator as specified (LLaDA 2502.09992 §2,
    eq. (3); the count form of LLaDA 1.5 2505.19223): 1/l for both levels when t_min = 0 — the
    weights that make the MC mean the exact ELBO Σ_l S_l/(l·C(L,l)). With a floor,
    t ~ U(t_min, 1]: (1/(1 − t_min)) ∫_{t_min}^1 t^{l−1} (1 − t)^{L−l} dt · C(L, l), expanded exactly."""
    if level == "count":
        return 1.0 / l
    integral = sum(math.comb(L - l, k) * (-1) ** k * (1 - t_min ** (l + k)) / (l + k)
                   for k in range(L - l + 1))
    return math.comb(L, l) * integral / (1 - t_min)


@pytest.mark.parametrize("cfg", [ELBOConfig(level="time"), ELBOConfig(level="time", t_min=0.05),
                                 ELBOConfig(level="count"), ELBOConfig(level="count", stratified=True),
                                 ELBOConfig(level="time", t_min=0.05, group_shared=True),
                                 ELBOConfig(level="count", stratified=True, group_shared=True)],
                         ids=["time", "time-floor", "count", "count-stratified", "time-floor-shared",
                              "count-stratified-shared"])
def test_draws_have_the_exact_elbo_weights(cfg):
    """2·10^6 independent draws (no model): for every l, mean(w · 1{l masked}) matches the
    specification within 0.6% (a weight off by 1% fails: ≥ 3 standard errors here), and given l
    every position is masked with probability l/L. Where the variance is infinite (time level,
    t_min = 0, l = 1) only 5%. Group-shared draws (groups of 4 share one draw) keep every row's
    marginal: the same check over 4× as many rows."""
    G = 4 if cfg.group_shared else 1
    L, n_t, B = 4, 2000, 1000 * G
    model = micro_model()
    y = torch.randint(4, 50, (B, L), generator=torch.Generator().manual_seed(0))
    batch = elbo.Batch(torch.cat([torch.full((B, 1), 7), y], 1), torch.ones(B, 1 + L, dtype=torch.long), 1, G)
    d = elbo.draw(batch, cfg, n_t, model.eos_token_id, torch.Generator().manual_seed(1))
    m = d.masked[..., 1:]  # [n_t, B, L]
    count = m.sum(-1)  # [n_t, B]
    assert not d.masked[..., 0].any()
    for l in range(1, L + 1):
        at_l = count == l
        got = (d.weight * at_l).mean().item()
        want = expected_weight_by_count(cfg.level, L, l, cfg.t_min)
        tol = 0.05 if (cfg.level == "time" and cfg.t_min == 0 and l == 1) else 0.006
        assert abs(got / want - 1) < tol, (l, got, want)
        pos = m[at_l].double().mean(0)  # [L]: masking rate of each position given l
        assert torch.allclose(pos, torch.full_like(pos, l / L), atol=0.01), (l, pos)
    if cfg.level == "count":
        assert torch.equal(d.weight, L / count.double())  # exact, per draw
        assert (count > 0).all()  # the count level never wastes a draw on an empty mask


@pytest.mark.parametrize("cfg", [ELBOConfig(level="time", t_min=0.01), ELBOConfig(level="count"),
                                 ELBOConfig(level="count", stratified=True)])
def test_mc_mean_converges_to_exact_elbo(cfg):
    """Through the model: the MC mean of ℓ is the exact ELBO (enumerated over every mask) within
    4 standard errors; the floor's bias is below the tolerance at t_min = 0.01."""
    model = micro_model()
    batch = random_batch(model, n_prompts=1, G=1, L=4)
    exact = exact_elbo(model, batch, 0)
    d = elbo.draw(batch, cfg, 4000, model.eos_token_id, torch.Generator().manual_seed(1))
    ells = elbo.ell_all(model, batch, d, 500)[:, 0]  # [n_t]
    se = ells.std().item() / math.sqrt(len(ells))
    if cfg.stratified:  # strata are dependent within a sequence: the iid SE overstates the error
        se = ells.view(-1, 4).mean(1).std().item() / math.sqrt(len(ells) / 4)
    assert abs(ells.mean().item() - exact) < 4 * se, (ells.mean().item(), exact, se)
    assert se < 0.02 * abs(exact)  # the check has teeth


def test_group_shared_draws_cancel_the_tokens_a_group_shares():
    """elbo.group_shared: the G completions of a prompt share levels and masks (different prompts do
    not), so for G identical completions and advantages summing to 0, Σ_i A_i ℓ_i is exactly 0 in
    every draw — with independent draws it is noise."""
    model = micro_model()
    one = random_batch(model, n_prompts=2, G=1, L=6)
    batch = elbo.Batch(one.input_ids.repeat_interleave(4, 0), one.attention_mask.repeat_interleave(4, 0),
                       one.prompt_len, 4)  # 2 prompts x 4 identical completions each
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5] * 2, dtype=torch.float64)
    sums = {}
    for shared in (True, False):
        cfg = ELBOConfig(level="count", stratified=True, group_shared=shared)
        d = elbo.draw(batch, cfg, 8, model.eos_token_id, torch.Generator().manual_seed(3))
        m = d.masked.view(8, 2, 4, -1)
        assert (m == m[:, :, :1]).all() == shared and (m[:, 0] != m[:, 1]).any()
        sums[shared] = (elbo.ell_all(model, batch, d, 8) * adv).view(8, 2, 4).sum(-1)  # [n_t, prompts]
    assert sums[True].abs().max() < 1e-9 and sums[False].abs().max() > 0.1


def test_coupled_draws_lower_variance_of_the_difference():
    """Var(B̂_θ − B̂_ref) is far smaller when θ and ref see the same masks (docs/methods.md §2, VRPO)."""
    ref = micro_model()
    batch = random_batch(ref, n_prompts=1, G=1, L=6)
    theta = copy.deepcopy(ref)
    perturb(theta, 0.02)
    cfg = ELBOConfig(level="time")
    d1 = elbo.draw(batch, cfg, 400, ref.eos_token_id, torch.Generator().manual_seed(1))
    d2 = elbo.draw(batch, cfg, 400, ref.eos_token_id, torch.Generator().manual_seed(2))
    coupled = elbo.ell_all(theta, batch, d1, 400) - elbo.ell_all(ref, batch, d1, 400)
    independent = elbo.ell_all(theta, batch, d1, 400) - elbo.ell_all(ref, batch, d2, 400)
    assert coupled.var() * 10 < independent.var()


def test_bgpo_memory_flat_in_n_t_vrpo_grows():
    model = micro_model(dtype=torch.float32)
    batch = random_batch(model, n_prompts=2, G=4, L=12)
    adv = torch.linspace(-1, 1, 8)

    def peak(method, n_t):
        d = elbo.draw(batch, ELBOConfig(), n_t, model.eos_token_id, torch.Generator().manual_seed(0))
        model.net.zero_grad(set_to_none=True)
        return saved_bytes_peak(lambda: method_backward(method, model, batch, adv, Prepared(d), 0))

    b1, b16 = peak(BGPO(BGPOConfig(n_t=1)), 1), peak(BGPO(BGPOConfig(n_t=16)), 16)
    v1, v4 = peak(VRPO(VRPOConfig(n_t=1)), 1), peak(VRPO(VRPOConfig(n_t=4)), 4)
    assert b16 <= 1.10 * b1
    assert v4 >= 3.5 * v1
