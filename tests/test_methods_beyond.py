"""The methods after BGPO (issue 17): float64 value and gradient against an independent reference,
the structure of their draws, SPG's sandwich, and a few training steps of each.

The reference never calls ``bgpo.elbo`` for a log-probability: it scores each sequence alone
(``tests.test_objectives.ref_token_logp``) and writes each paper's equation as a plain loop; where
the masks determine a weight (count levels, blocks, AR positions) it recomputes the weight and
checks the drawn one. Papers: SPG arXiv 2510.09541 (eq. 2, 5, 7, 8, Theorem 1), ESPO 2512.03759,
coupled-GRPO (DiffuCoder 2506.20639, eq. 4 and 13), TraceRL 2509.06949, JustGRPO 2601.15165.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import bgpo.trainer as trainer
from baselines.coupled_grpo import CoupledGRPO, CoupledGRPOConfig
from baselines.espo import ESPO, ESPOConfig
from baselines.just_grpo import JustGRPO, JustGRPOConfig
from baselines.spg import SPG, SPGConfig
from baselines.tracerl import TraceRL, TraceRLConfig
from bgpo import elbo
from bgpo.elbo import Batch, ELBOConfig
from bgpo.sampler import SamplerConfig, generate
from tests.helpers import micro_model, perturb, random_batch
from tests.test_objectives import (
    ADV,
    assert_close,
    off_policy_pair,
    ref_grad,
    ref_scored,
    ref_token_logp,
    run_method,
)

G1 = torch.Generator


def gen(seed: int) -> torch.Generator:
    return G1().manual_seed(seed)


def with_trace(batch: Batch, seed: int = 1) -> Batch:
    """A decoding order: one position per step, in a random order per row (trace[b, pos] = step)."""
    g = gen(seed)
    L = batch.completion.shape[1]
    return dataclasses.replace(batch, trace=torch.stack([torch.randperm(L, generator=g)
                                                         for _ in range(batch.input_ids.shape[0])]))


def comp_masks(batch: Batch, draws, j: int) -> torch.Tensor:
    return draws.masked[j, :, batch.prompt_len :]  # [B, L]


# ---- the draws --------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["time", "count"])
@pytest.mark.parametrize("window", ["full", "eos"])
def test_complementary_pairs_cover_every_scored_token_once(level, window):
    model = micro_model()
    batch = random_batch(model, eos_at=3 if window == "eos" else None)
    cfg = ELBOConfig(mode="complementary", level=level, window=window, stratified=True, full_mask=True)
    d = elbo.draw(batch, cfg, 4, model.eos_token_id, gen(0))
    scored = ref_scored(batch, window, model.eos_token_id)
    assert d.n_t == 2 * 4 + 1 and cfg.patterns(4) == 9
    assert not d.masked[..., : batch.prompt_len].any()  # the prompt is never masked
    L = scored.sum(-1).double()
    for j in range(4):
        a, b = comp_masks(batch, d, 2 * j) & scored, comp_masks(batch, d, 2 * j + 1) & scored
        assert torch.equal(a | b, scored) and not (a & b).any()  # each scored token once per pair
        assert torch.all(comp_masks(batch, d, 2 * j) | scored)  # the unscored tail always masked
        wa, wb = d.weight[2 * j], d.weight[2 * j + 1]
        if level == "count":  # (L+1)/l and (L+1)/(L − l), 0 for an empty mask
            for m, w in ((a, wa), (b, wb)):
                n = m.sum(-1).double()
                assert torch.allclose(w, torch.where(n > 0, (L + 1) / n.clamp(min=1), 0.0))
        else:  # 1/t and 1/(1 − t)
            assert torch.allclose(1 / wa + 1 / wb, torch.ones_like(wa))
    assert torch.equal(comp_masks(batch, d, 8) & scored, scored) and torch.all(d.weight[8] == 1)
    if level == "count":  # stratified: with L+1 pairs, the counts l are 0..L once each
        d = elbo.draw(batch, dataclasses.replace(cfg, full_mask=False, window="full"), 7, model.eos_token_id,
                      gen(1))
        l = torch.stack([comp_masks(batch, d, 2 * j).sum(-1) for j in range(7)])  # [7, B]
        assert all(sorted(l[:, b].tolist()) == list(range(7)) for b in range(l.shape[1]))


@pytest.mark.parametrize("level", ["time", "count"])
def test_complementary_draws_have_the_exact_elbo_weights(level):
    """Both masks of a pair are unbiased ELBO draws: for every count l, mean(w · 1{l masked}) = 1/l
    (the weight of the exact ELBO, as tests/test_elbo.py), stratified levels included."""
    from tests.test_elbo import expected_weight_by_count

    L, n, B = 4, 1500, 600
    y = torch.randint(4, 50, (B, L), generator=gen(0))
    batch = Batch(torch.cat([torch.full((B, 1), 7), y], 1), torch.ones(B, 1 + L, dtype=torch.long), 1, 1)
    d = elbo.draw(batch, ELBOConfig(mode="complementary", level=level, stratified=True), n, 2, gen(1))
    for member in (0, 1):
        count = d.masked[member::2, :, 1:].sum(-1)  # [n, B]
        for l in range(1, L + 1):
            got = (d.weight[member::2] * (count == l)).mean().item()
            want = expected_weight_by_count(level, L, l, 0.0)
            tol = 0.06 if (level == "time" and l == 1) else 0.015
            assert abs(got / want - 1) < tol, (member, l, got, want)


@pytest.mark.parametrize("window,block", [("full", 3), ("eos", 4)])
def test_block_draws_respect_blocks(window, block):
    model = micro_model()
    batch = random_batch(model, L=8, eos_at=4 if window == "eos" else None)
    cfg = ELBOConfig(mode="block", level="count", window=window, block_length=block, p_prompt=0.0)
    d = elbo.draw(batch, cfg, 400, model.eos_token_id, gen(0))
    scored = ref_scored(batch, window, model.eos_token_id)
    P, L = batch.prompt_len, 8
    chosen = torch.zeros(batch.input_ids.shape[0], L // block + 1)
    for j in range(d.n_t):
        for b in range(batch.input_ids.shape[0]):
            t = d.target[j, b].nonzero().flatten().tolist()
            L_b = int(scored[b].sum())
            K = -(-L_b // block)
            bb = t[0] // block
            assert t and all(i // block == bb and scored[b, i] for i in t)  # one block, scored tokens
            m = d.masked[j, b, P:]
            assert not m[: bb * block].any()  # earlier blocks clean (p_prompt = 0)
            assert m[(bb + 1) * block :].all()  # later blocks masked
            inside = m[bb * block : min((bb + 1) * block, L_b)].nonzero().flatten() + bb * block
            assert inside.tolist() == t  # inside the block: exactly the targets
            n_b = min((bb + 1) * block, L_b) - bb * block
            assert d.weight[j, b].item() == pytest.approx(K * n_b / len(t), rel=1e-12)
            chosen[b, bb] += 1
    freq = chosen[0, :3] / d.n_t  # full window, block 3, L 8: three blocks, uniform
    if window == "full":
        assert torch.allclose(freq, torch.full_like(freq, 1 / 3), atol=0.08)
    else:  # L_b = 5 with block 4: two blocks hold scored tokens, never the third
        assert chosen[:, 2:].sum() == 0 and abs(chosen[0, 0] / d.n_t - 0.5) < 0.1
    noisy = elbo.draw(batch, dataclasses.replace(cfg, p_prompt=0.5), 50, model.eos_token_id, gen(1))
    assert noisy.masked[..., :P].any()  # the prompt (and clean blocks) are perturbed at p_prompt


@pytest.mark.parametrize("window", ["full", "eos"])
def test_ar_draws_score_each_position_once_with_the_future_masked(window):
    model = micro_model()
    batch = random_batch(model, eos_at=3 if window == "eos" else None)
    scored = ref_scored(batch, window, model.eos_token_id)
    P, L = batch.prompt_len, 6
    d = elbo.draw(batch, ELBOConfig(mode="ar", window=window), 10, model.eos_token_id, gen(0))
    assert d.n_t == L and torch.all(d.weight == 1) and not d.masked[..., :P].any()
    assert torch.equal(d.target.sum(0), scored.long())  # every scored position exactly once
    for k in range(L):
        for b in range(batch.input_ids.shape[0]):  # position k alone, with exactly the future masked
            assert torch.equal(d.target[k, b], (torch.arange(L) == k) & scored[b, k])
            if scored[b, k]:
                assert torch.equal(d.masked[k, b, P:], torch.arange(L) >= k)
    d = elbo.draw(batch, ELBOConfig(mode="ar", window=window), 2, model.eos_token_id, gen(1))
    assert d.n_t == 2
    for b in range(batch.input_ids.shape[0]):
        pos = d.target[:, b].nonzero()[:, 1]
        L_b = int(scored[b].sum())
        assert len(set(pos.tolist())) == len(pos) == min(2, L_b) and all(scored[b, pos])
        assert torch.allclose(d.weight[:, b], torch.full((2,), L_b / min(2, L_b), dtype=torch.float64))


def test_trajectory_draws_reproduce_the_sampler_states(monkeypatch):
    """The rollout sampler's trace turned into draws: with one group per step (s = 1), draw g's
    input IS the sampler's input at step g, its targets what that step committed; with n_t groups
    of s steps, the state before the group's first step. Left-to-right order: step k commits k."""
    model = micro_model()
    prompt = torch.randint(4, 40, (3, 4), generator=gen(0))
    seen: list[torch.Tensor] = []
    real = type(model).logits
    monkeypatch.setattr(type(model), "logits",
                        lambda self, x, a=None: (seen.append(x.clone()), real(self, x, a))[1])
    cfg = SamplerConfig(gen_length=8, block_length=4, steps=8, temperature=1.0)
    comp, trace = generate(model, prompt, torch.ones_like(prompt), cfg, gen(1), return_trace=True)
    monkeypatch.setattr(type(model), "logits", real)
    assert torch.equal(generate(model, prompt, torch.ones_like(prompt), cfg, gen(1)), comp)  # same draws
    assert sorted(trace[0].tolist()) == list(range(8))  # one position per step
    batch = Batch.build(prompt, torch.ones_like(prompt), comp, 1, trace)
    M = model.mask_token_id
    for n_t, s in ((8, 1), (4, 2), (3, 3)):
        d = elbo.draw(batch, ELBOConfig(mode="trajectory"), n_t, model.eos_token_id)
        assert d.n_t == n_t and torch.all(d.weight == 1)
        assert torch.equal(d.target.sum(0), torch.ones_like(comp))  # every position in one group
        for g in range(n_t):
            state = torch.where(d.masked[g], M, batch.input_ids)  # what the draw feeds the model
            if g * s < 8:
                assert torch.equal(state, seen[g * s])  # the sampler's input before step g·s
            assert torch.equal(d.target[g], (trace // s) == g)
    ltr = SamplerConfig(gen_length=8, block_length=1, steps=8, temperature=1.0)
    from bgpo.config import TaskConfig
    from bgpo.rollout import sampler_config

    assert sampler_config(TaskConfig(gen_length=8, block_length=4, diffusion_steps=4), 1.0,
                          order="left_to_right") == ltr
    comp, trace = generate(model, prompt, torch.ones_like(prompt), ltr, gen(2), return_trace=True)
    assert torch.equal(trace, torch.arange(8).expand(3, 8))  # AR order: position k at step k
    batch = Batch.build(prompt, torch.ones_like(prompt), comp, 1, trace)
    traj = elbo.draw(batch, ELBOConfig(mode="trajectory"), 8, model.eos_token_id)
    ar = elbo.draw(batch, ELBOConfig(mode="ar"), 8, model.eos_token_id)
    assert torch.equal(traj.masked, ar.masked) and torch.equal(traj.target, ar.target)
    with pytest.raises(ValueError, match="trace"):
        elbo.draw(dataclasses.replace(batch, trace=None), ELBOConfig(mode="trajectory"), 2, 1)


# ---- SPG ---------------------------------------------------------------------------------------------
def ref_spg(model, batch, adv, draws, js, beta, omega, block, window, level):
    """Eq. 2, 7, 8, 5 as loops; the block weight K·n_b/l recomputed from the targets."""
    scored = ref_scored(batch, window, model.eos_token_id)
    lps = {j: ref_token_logp(model, batch, draws.masked[j]) for j in js}
    total = 0.0
    for b in range(adv.shape[0]):
        L_b = int(scored[b].sum())
        K = -(-L_b // block)
        L_elbo, inner = 0.0, {}
        for j in js:
            t = draws.target[j, b].nonzero().flatten().tolist()
            w = draws.weight[j, b].item()
            if t and level == "count":  # K blocks · n_b tokens in the drawn block / l masked
                bb = t[0] // block
                assert w == pytest.approx(K * (min((bb + 1) * block, L_b) - bb * block) / len(t), rel=1e-12)
            L_elbo = L_elbo + w * sum((lps[j][b, i] for i in t), 0.0) / len(js)
            for i in t:
                inner[i] = inner.get(i, 0.0) + w * torch.exp(beta * lps[j][b, i]) / len(js)
        L_eubo = sum(torch.log(v) for v in inner.values()) / beta
        L_hat = L_elbo if adv[b] >= 0 else omega * L_eubo + (1 - omega) * L_elbo
        total = total + adv[b] * L_hat
    return -total / adv.shape[0]


@pytest.mark.parametrize("omega,beta", [(0.5, 1.5), (1.0, 2.0), (0.0, 1.0)])
@pytest.mark.parametrize("window,block,level", [("full", 3, "count"), ("eos", 4, "time")])
def test_spg_matches_the_reference(omega, beta, window, block, level):
    model = micro_model()
    batch = random_batch(model, L=8, eos_at=5 if window == "eos" else None)
    cfg = ELBOConfig(mode="block", level=level, window=window, block_length=block, p_prompt=0.3)
    method = SPG(SPGConfig(n_t=3, eubo_beta=beta, omega=omega, elbo=cfg))
    prep = method.prepare(model, batch, 2, gen(0))
    assert prep.draws.n_t == 6 and prep.old is None  # a plain policy gradient: no ratio
    for it in range(2):
        stats, g = run_method(method, model, batch, ADV, prep, it)
        loss = ref_spg(model, batch, ADV, prep.draws, range(3 * it, 3 * it + 3), beta, omega, block, window,
                       level)
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-10)
        assert_close(g, ref_grad(model, loss), f"SPG it={it}")
    other, _ = run_method(SPG(SPGConfig(n_t=3, eubo_beta=beta, omega=1 - omega, elbo=cfg)), model, batch,
                          ADV, prep)
    assert other["loss"] != pytest.approx(stats["loss"], rel=1e-6)  # ω changes the A < 0 term


def exact_bounds(model, batch, beta, block=None):
    """log-likelihood, ELBO and EUBO(β) of response 0 by enumerating every unmasking order (one
    token at a time, uniformly random order: the continuous-time limit); ``block``: orders within
    each block, blocks left to right, later blocks masked (the semi-AR decoder's likelihood)."""
    P = batch.prompt_len
    L = batch.completion.shape[1]
    row = Batch(batch.input_ids[:1], batch.attention_mask[:1], P, 1)
    blocks = [range(lo, min(lo + (block or L), L)) for lo in range(0, L, block or L)]
    cache = {}

    def lp(masked: frozenset, i: int) -> torch.Tensor:
        if masked not in cache:
            m = torch.zeros(1, P + L, dtype=torch.bool)
            m[0, [P + k for k in masked]] = True
            cache[masked] = ref_token_logp(model, row, m)[0].detach()
        return cache[masked][i]

    logp, lower, upper = 0.0, 0.0, 0.0
    for bl in blocks:
        later = frozenset(range(bl[-1] + 1, L))
        orders = list(itertools.permutations(bl))
        joint, per_token = [], {i: [] for i in bl}
        for order in orders:
            total = 0.0
            for k, i in enumerate(order):
                x = lp(frozenset(order[k:]) | later, i)
                total = total + x
                per_token[i].append(x)
            joint.append(total)
        joint = torch.stack(joint)
        logp += torch.logsumexp(joint, 0) - math.log(len(orders))  # log E_σ Π p
        lower += joint.mean()  # E_σ Σ log p (Jensen)
        upper += sum(torch.logsumexp(beta * torch.stack(v), 0) - math.log(len(orders))
                     for v in per_token.values()) / beta  # Σ_i (1/β) log E_σ p_i^β
    return float(logp), float(lower), float(upper)


@pytest.mark.parametrize("block", [None, 2])
def test_spg_sandwich_and_its_estimator(block):
    """Theorem 1 on an enumerable case: ELBO ≤ log π ≤ EUBO(β) once β ≥ the length of what is
    decoded at random order (the whole completion, or a block), strictly; the EUBO grows with β.
    SPG's own Monte Carlo EUBO and ELBO (loss with A = −1, ω = 1 / ω = 0) converge to the exact ones."""
    model = micro_model()
    perturb(model, 0.3, seed=3)  # context-dependent predictions: bounds a visible gap apart
    L = 3 if block is None else 4
    batch = random_batch(model, n_prompts=1, G=1, L=L)
    n = L if block is None else block
    logp, lower, upper = exact_bounds(model, batch, n, block)
    _, _, upper1 = exact_bounds(model, batch, 1.0, block)
    _, _, upper_hi = exact_bounds(model, batch, n + 2, block)
    assert lower < logp < upper <= upper_hi and upper1 < upper
    cfg = (ELBOConfig(mode="elbo", level="count", stratified=True) if block is None
           else ELBOConfig(mode="block", level="count", block_length=block, p_prompt=0.0, stratified=True))
    A = torch.tensor([-1.0], dtype=torch.float64)
    for omega, exact in ((1.0, upper), (0.0, lower)):
        method = SPG(SPGConfig(n_t=3000, eubo_beta=float(n), omega=omega, elbo=cfg))
        prep = method.prepare(model, batch, 1, gen(0))
        with torch.no_grad():
            est = method.loss(model, batch, A, prep, slice(0, 3000))[0].item()  # = L̂ (A = −1, B = 1)
        assert abs(est - exact) < (upper - lower) / 4, (omega, est, exact, lower, upper)
        assert (est > logp) == (omega == 1.0)  # the estimates land on their side of log π


# ---- ESPO -------------------------------------------------------------------------------------------
def ref_espo(theta, old, refm, batch, adv, draws, js, eps, beta):
    """Sequence ELBOs from complementary count draws (weights (L+1)/l recomputed), then the
    length-normalised clipped ratio and the k2 KL divided by L."""
    scored = ref_scored(batch, "full", theta.eos_token_id)
    L = scored.sum(-1).double()

    def B_hat(model):
        vals = []
        for j in js:
            m = draws.masked[j, :, batch.prompt_len :] & scored
            n = m.sum(-1).double()
            w = torch.where(n > 0, (L + 1) / n.clamp(min=1), 0.0)
            assert torch.allclose(draws.weight[j], w)
            vals.append(w * (ref_token_logp(model, batch, draws.masked[j]) * m).sum(-1))
        return torch.stack(vals).mean(0)

    bt, bo, br = B_hat(theta), B_hat(old).detach(), B_hat(refm).detach()
    total = 0.0
    for b in range(adv.shape[0]):
        rho = torch.exp((bt[b] - bo[b]) / L[b])
        surr = torch.minimum(rho * adv[b], rho.clamp(1 - eps, 1 + eps) * adv[b])
        total = total - surr + beta * 0.5 * (bt[b] - br[b]) ** 2 / L[b]
    return total / adv.shape[0]


@pytest.mark.parametrize("mu", [1, 3])
def test_espo_matches_the_reference(mu):
    old, theta = off_policy_pair(scale=0.3) if mu > 1 else (micro_model(),) * 2
    refm = micro_model(seed=5)
    batch = random_batch(old)
    method = ESPO(ESPOConfig(n_t=2, clip_eps=0.02, beta=0.1), ref=refm)
    prep = method.prepare(old, batch, mu, gen(0))
    assert prep.draws.n_t == 4 * mu and (prep.old is not None) == (mu > 1)
    for it in range(mu):
        stats, g = run_method(method, theta, batch, ADV, prep, it)
        loss = ref_espo(theta, old, refm, batch, ADV, prep.draws, range(4 * it, 4 * it + 4), 0.02, 0.1)
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-10)
        assert_close(g, ref_grad(theta, loss), f"ESPO it={it}")
        assert stats["kl"] > 0 and (stats["clip_ratio"] > 0) == (mu > 1)


# ---- coupled-GRPO ----------------------------------------------------------------------------------------
def ref_coupled(theta, old, refm, batch, adv, draws, js, lam, eps, beta):
    """Eq. 13's per-token proxy (pairs summed, + the full mask, over λ+1), then eq. 4's per-token
    clipped ratio and k3 KL, a mean over the scored tokens (up to the first EOS)."""
    scored = ref_scored(batch, "eos", theta.eos_token_id)

    def proxy(model):
        out = 0.0
        for j in js:
            m = draws.masked[j, :, batch.prompt_len :] & scored
            out = out + draws.weight[j][:, None] * m * ref_token_logp(model, batch, draws.masked[j])
        return out / (lam + 1)

    e, eo, er = proxy(theta), proxy(old).detach(), proxy(refm).detach()
    total, n = 0.0, 0
    for b, i in scored.nonzero().tolist():
        rho = torch.exp(e[b, i] - eo[b, i])
        surr = torch.minimum(rho * adv[b], rho.clamp(1 - eps, 1 + eps) * adv[b])
        delta = er[b, i] - e[b, i]
        total, n = total - surr + beta * (torch.exp(delta) - delta - 1), n + 1
    return total / n


@pytest.mark.parametrize("mu", [1, 2])
def test_coupled_grpo_matches_the_reference(mu):
    old, theta = off_policy_pair(scale=0.2) if mu > 1 else (micro_model(),) * 2
    refm = micro_model(seed=5)
    batch = random_batch(old, eos_at=4)
    method = CoupledGRPO(CoupledGRPOConfig(n_t=2, clip_eps=0.05, beta=0.1), ref=refm)
    prep = method.prepare(old, batch, mu, gen(0))
    assert prep.draws.n_t == 5 * mu
    for it in range(mu):
        stats, g = run_method(method, theta, batch, ADV, prep, it)
        loss = ref_coupled(theta, old, refm, batch, ADV, prep.draws, range(5 * it, 5 * it + 5), 2, 0.05, 0.1)
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-10)
        assert_close(g, ref_grad(theta, loss), f"coupled-GRPO it={it}")
        assert (stats["clip_ratio"] > 0) == (mu > 1)


# ---- TraceRL ----------------------------------------------------------------------------------------------
def ref_tracerl(theta, old, batch, adv, n_t, eps, refm=None, beta=0.0, beta_old=0.0):
    """Steps merged s = ⌈steps/n_t⌉ at a time; group g scored with groups ≥ g masked; per-token
    clipped ratio, mean over the group's scored tokens, plus the k3 KLs (to the reference, and the
    code's toward θ_old) summed over those tokens; then a mean over (response, group) pairs."""
    scored = ref_scored(batch, "eos", theta.eos_token_id)
    P, (B, L) = batch.prompt_len, scored.shape
    group = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        steps = sorted(set(batch.trace[b].tolist()))
        s = -(-len(steps) // n_t)
        group[b] = torch.tensor([steps.index(st) // s for st in batch.trace[b].tolist()])
    k3 = lambda base, lp: torch.exp(base - lp) - (base - lp) - 1  # noqa: E731
    terms = []
    for g in range(n_t):
        masked = torch.zeros(B, P + L, dtype=torch.bool)
        masked[:, P:] = group >= g
        lp, lp_old = ref_token_logp(theta, batch, masked), ref_token_logp(old, batch, masked).detach()
        lp_ref = ref_token_logp(refm, batch, masked).detach() if refm is not None else None
        for b in range(B):
            toks = [i for i in range(L) if group[b, i] == g and scored[b, i]]
            if toks:
                surr = [torch.minimum(torch.exp(lp[b, i] - lp_old[b, i]) * adv[b],
                                      torch.exp(lp[b, i] - lp_old[b, i]).clamp(1 - eps, 1 + eps) * adv[b])
                        for i in toks]
                kl = sum(beta_old * k3(lp_old[b, i], lp[b, i]) for i in toks)
                if lp_ref is not None:
                    kl = kl + sum(beta * k3(lp_ref[b, i], lp[b, i]) for i in toks)
                terms.append(-sum(surr) / len(toks) + kl)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("off", [False, True], ids=["on-policy", "off-policy"])
@pytest.mark.parametrize("beta,beta_old", [(0.0, 0.0), (0.1, 0.3)], ids=["no-kl", "kl"])
def test_tracerl_matches_the_reference(off, beta, beta_old):
    old, theta = off_policy_pair(scale=0.2) if off else (micro_model(),) * 2
    refm = micro_model(seed=5) if beta > 0 else None
    batch = with_trace(random_batch(old, eos_at=4))
    cfg = TraceRLConfig(n_t=3, clip_eps=0.05, beta=beta, beta_old=beta_old)
    method = TraceRL(cfg, ref=refm)
    prep = method.prepare(old, batch, 2 if off else 1, gen(0))
    stats, g = run_method(method, theta, batch, ADV, prep)
    loss = ref_tracerl(theta, old, batch, ADV, 3, 0.05, refm, beta, beta_old)
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-10)
    assert_close(g, ref_grad(theta, loss), f"TraceRL off={off} beta={beta}")
    assert (stats["clip_ratio"] > 0) == off
    assert (stats["kl"] > 0) == (beta > 0) and (stats["kl_old"] > 0) == (off and beta_old > 0)
    _, g3 = run_method(TraceRL(dataclasses.replace(cfg, mc_chunk=3), ref=refm), theta, batch, ADV, prep)
    assert_close(g3, g, "TraceRL mc_chunk=3")


# ---- JustGRPO ----------------------------------------------------------------------------------------------
def ref_just_grpo(theta, old, batch, adv, eps, positions=None):
    """Position k scored with positions ≥ k masked; per-token clipped ratio summed over positions
    (``positions``: a sample of them, weight L/n), over L · #(A ≠ 0)."""
    P, (B, L) = batch.prompt_len, batch.completion.shape
    total = 0.0
    for k in range(L):
        masked = torch.zeros(B, P + L, dtype=torch.bool)
        masked[:, P + k :] = True
        lp, lp_old = ref_token_logp(theta, batch, masked), ref_token_logp(old, batch, masked).detach()
        for b in range(B):
            if positions is not None and k not in positions[b]:
                continue
            w = 1.0 if positions is None else L / len(positions[b])
            rho = torch.exp(lp[b, k] - lp_old[b, k])
            total = total - w * torch.minimum(rho * adv[b], rho.clamp(1 - eps, 1 + eps) * adv[b])
    return total / (L * int((adv != 0).sum()))


@pytest.mark.parametrize("off", [False, True], ids=["on-policy", "off-policy"])
def test_just_grpo_matches_the_reference(off):
    old, theta = off_policy_pair(scale=0.2) if off else (micro_model(),) * 2
    batch = random_batch(old)
    adv = ADV.clone()
    adv[2] = 0.0  # a response without signal is not counted in the normalisation
    for n_t in (6, 2):
        method = JustGRPO(JustGRPOConfig(n_t=n_t, mc_chunk=2, clip_eps=0.05))
        prep = method.prepare(old, batch, 2 if off else 1, gen(0))
        stats, g = run_method(method, theta, batch, adv, prep)
        positions = None if n_t == 6 else [set(prep.draws.target[:, b].nonzero()[:, 1].tolist())
                                           for b in range(6)]
        loss = ref_just_grpo(theta, old, batch, adv, 0.05, positions)
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-10)
        assert_close(g, ref_grad(theta, loss), f"JustGRPO n_t={n_t} off={off}")
        assert (stats["clip_ratio"] > 0) == off
    assert JustGRPO.ROLLOUT_ORDER == "left_to_right"


@pytest.mark.parametrize("conf,key", [(lambda: SPGConfig(eubo_beta=0.0), "eubo_beta"),
                                      (lambda: SPGConfig(omega=1.5), "omega"),
                                      (lambda: ESPOConfig(clip_eps=-1.0), "clip_eps"),
                                      (lambda: CoupledGRPOConfig(elbo=ELBOConfig()), "elbo.mode"),
                                      (lambda: TraceRLConfig(n_t=0), "n_t"),
                                      (lambda: TraceRLConfig(beta_old=-0.1), "beta_old"),
                                      (lambda: JustGRPOConfig(elbo=ELBOConfig(mode="ar", length_norm=True)),
                                       "elbo.mode")])
def test_bad_settings_name_the_key(conf, key):
    with pytest.raises(ValueError, match=f"method.cfg.{key}"):
        conf()


# ---- training from the CLI's config path -------------------------------------------------------
@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "micro"
    micro_model(dtype=torch.float32).save(path)
    return path


@pytest.mark.parametrize("method", ["spg", "espo", "coupled_grpo", "tracerl", "just_grpo"])
def test_each_new_method_trains(method, base_model, tmp_path, monkeypatch):
    """A few RL steps through bgpo.train's path: parameters move, metrics are written, and the
    rollouts are decoded in the order the method asks for (JustGRPO: left to right)."""
    import tests.toy_task  # noqa: F401
    from bgpo.train import run
    from tests.test_trainer import cfg_of, metrics

    orders, real = [], trainer.rollout

    def spy(*a, **k):
        ro = real(*a, **k)
        orders.append((k.get("order"), ro.batch.trace.clone()))
        return ro

    monkeypatch.setattr(trainer, "rollout", spy)
    extra = "minibatches=2" if method in ("tracerl", "just_grpo") else "inner_updates=2"
    summary = run(cfg_of(base_model, tmp_path, f"method={method}", extra, "temperature=1.0", "eval_every=0",
                         "steps=2"))
    rows = metrics(tmp_path / summary["run"])
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["grad_norm"] > 0 for r in rows[1:])
    state = torch.load(tmp_path / summary["run"] / "checkpoints" / "last.pt", weights_only=False)["model"]
    base = micro_model(dtype=torch.float32).net.state_dict()
    assert any(not torch.equal(state[k], base[k]) for k in base)
    want = "left_to_right" if method == "just_grpo" else "blocks"
    assert orders and all(o == want for o, _ in orders)
    if method == "just_grpo":
        assert all(torch.equal(t, torch.arange(8).expand_as(t)) for _, t in orders)


# ---- the benchmarks ------------------------------------------------------------------------------------
NEW = ("spg", "espo", "coupled_grpo", "tracerl", "just_grpo")


def test_memory_bench_runs_the_new_methods(base_model, tmp_path):
    """Tiny settings: every new method gets rows; those that back-propagate one term at a time
    (TraceRL's groups, JustGRPO's positions) stay flat in n_t, those whose estimator couples the
    update's draws (SPG's EUBO, ESPO's ratio, coupled-GRPO's proxy) grow with it."""
    from bgpo.bench import memory

    argv = ["memory", "--model", str(base_model), "--name", "micro", "--methods", ",".join(NEW),
            "--mcs", "1,4", "--prompts", "2", "--group", "4", "--prompt-length", "6", "--gen-length", "8",
            "--repeats", "1", "--no-rss", "--out", str(tmp_path), "--no-progress"]
    from bgpo.bench.__main__ import main as bench_main

    assert bench_main(argv) == 0
    rows = memory.load_rows(tmp_path / "memory-cpu-micro.jsonl")
    by = {(r["method"], r["mc"]): r["peak_bytes"] for r in rows}
    assert set(by) == {(m, n) for m in NEW for n in (1, 4)} and all(v > 0 for v in by.values())
    for m in ("tracerl", "just_grpo"):
        assert by[m, 4] <= 1.10 * by[m, 1], m
    for m in ("spg", "espo", "coupled_grpo"):
        assert by[m, 4] >= 2.5 * by[m, 1], m


def test_variance_bench_runs_the_new_methods(base_model, tmp_path):
    from bgpo.bench import variance

    argv = ["--model", str(base_model), "--name", "micro", "--methods", ",".join(NEW), "--mcs", "1,4",
            "--repeats", "2", "--gold-mc", "8", "--gold-chunk", "4", "--prompts", "1", "--group", "4",
            "--max-tries", "16", "--diff-ns", "1", "--diff-replicates", "4", "--diff-seqs", "2",
            "--out", str(tmp_path), "--no-progress"]
    assert variance.main(argv) == 0
    grads = {(r["method"], r["mc"]): r for r in variance.load_rows(tmp_path / "variance-micro.jsonl")
             if r["kind"] == "grad"}
    assert set(grads) == {(m, n) for m in NEW for n in (1, 4)}
    for (m, _), r in grads.items():  # TraceRL's trajectory draws are deterministic: no MC noise
        assert (r["grad_std"] == 0) == (m == "tracerl") and r["bias_rel"] >= 0, (m, r["grad_std"])
