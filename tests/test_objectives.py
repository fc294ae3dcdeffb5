"""Float64 tests of the objectives against an independent reference written from the papers.

The reference below never calls ``bgpo.elbo``: it scores each sequence ALONE (its left padding
dropped, the raw network called directly), finds the scored window itself, recomputes the
count-level weights L/l from the masks, and writes each method's equation as a plain loop. Value
AND gradient are compared for every method, on-policy and off-policy (θ ≠ θ_old: θ_old's statistics
must come from the SAME masks as θ's), several mini-batches / inner iterations included.
Equations: BGPO §3 (arXiv 2510.11683), VRPO-OL as BGPO §3 defines it, d1 §3.2 (arXiv 2504.12216),
wd1 §3 (arXiv 2507.08838).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from baselines.diffu_grpo import DiffuGRPO, DiffuGRPOConfig
from baselines.vrpo import VRPO, VRPOConfig
from baselines.wd1 import WD1, WD1Config
from bgpo import elbo
from bgpo.elbo import ELBOConfig
from bgpo.method import Prepared, minibatch
from bgpo.method import backward as method_backward
from bgpo.objective import BGPO, BGPOConfig
from tests.helpers import grads, micro_model, perturb, random_batch

ADV = torch.tensor([1.5, -0.5, -1.0, 0.7, -2.0, 1.3], dtype=torch.float64)
LEVELS = [ELBOConfig(level="time"), ELBOConfig(level="count"), ELBOConfig(level="count", stratified=True),
          ELBOConfig(level="time", t_min=0.1, window="eos", length_norm=True)]


# ---- the independent reference ---------------------------------------------------------------------
def ref_token_logp(model, batch, masked_j):
    """log p(y_i | x with ``masked_j`` replaced by the mask token) at every completion position,
    each row scored alone without its padding: ``[B, L]``. Gradients flow."""
    P, rows = batch.prompt_len, []
    for b in range(batch.input_ids.shape[0]):
        real = batch.attention_mask[b].bool()
        x = torch.where(masked_j[b], model.mask_token_id, batch.input_ids[b])[real]
        logits = model.net(input_ids=x[None]).logits[0].double()  # tiny kind: position i predicts i
        y = batch.input_ids[b, P:]  # the completion is never padded: the row's last L positions
        rows.append(logits.log_softmax(-1)[-y.shape[0] :].gather(-1, y[:, None]).squeeze(-1))
    return torch.stack(rows)  # [B, L]


def ref_scored(batch, window, eos):
    y = batch.input_ids[:, batch.prompt_len :]
    if window == "full":
        return torch.ones_like(y, dtype=torch.bool)
    out = torch.zeros_like(y, dtype=torch.bool)
    for b in range(y.shape[0]):
        for i in range(y.shape[1]):
            out[b, i] = True
            if y[b, i] == eos:
                break
    return out


def ref_ell(model, batch, draws, cfg, j):
    """ℓ(j) = w_j Σ_{i masked, scored} log p(y_i | ·): ``[B]``; the count-level weight L/l (and the
    length normalisation 1/L) recomputed here from the masks, the time-level 1/t taken as drawn."""
    P = batch.prompt_len
    scored = ref_scored(batch, cfg.window, model.eos_token_id)
    hit = draws.masked[j, :, P:] & scored  # [B, L]
    L = scored.sum(-1).double()
    if cfg.level == "count" and cfg.mode == "elbo":
        w = L / hit.sum(-1).double()
        assert torch.allclose(draws.weight[j] * (L if cfg.length_norm else 1.0), w, rtol=1e-12)
    else:
        w = draws.weight[j] * (L if cfg.length_norm else 1.0)
    if cfg.length_norm:
        w = w / L
    return w * (ref_token_logp(model, batch, draws.masked[j]) * hit).sum(-1)


def ref_ells(model, batch, draws, cfg, js):
    return torch.stack([ref_ell(model, batch, draws, cfg, j) for j in js])  # [k, B]


def ref_bgpo(theta, old, batch, adv, draws, cfg, bound="both"):
    n_t, B = draws.n_t, adv.shape[0]
    total = 0.0
    for j in range(n_t):
        d = ref_ell(theta, batch, draws, cfg, j) - ref_ell(old, batch, draws, cfg, j).detach()
        for b in range(B):
            tangent = adv[b] >= 0 if bound == "both" else bound == "tangent"
            g = adv[b] * (1 + d[b]) if tangent else adv[b] * torch.exp(d[b])
            total = total + g / n_t
    return -total / B


def ref_vrpo(theta, old, batch, adv, draws, cfg):
    B_theta = ref_ells(theta, batch, draws, cfg, range(draws.n_t)).mean(0)
    B_old = ref_ells(old, batch, draws, cfg, range(draws.n_t)).mean(0).detach()
    return -(torch.exp(B_theta - B_old) * adv).sum() / adv.shape[0]


def ref_diffu_grpo(theta, old, refm, batch, adv, draws, js, eps, beta):
    scored = ref_scored(batch, "eos", theta.eos_token_id)
    total, n = 0.0, 0
    for j in js:
        lp = ref_token_logp(theta, batch, draws.masked[j])
        lp_old = ref_token_logp(old, batch, draws.masked[j]).detach()
        lp_ref = ref_token_logp(refm, batch, draws.masked[j]).detach()
        for b in range(adv.shape[0]):
            for i in range(lp.shape[1]):
                if not scored[b, i]:
                    continue
                rho = torch.exp(lp[b, i] - lp_old[b, i])
                surr = torch.minimum(rho * adv[b], rho.clamp(1 - eps, 1 + eps) * adv[b])
                delta = lp_ref[b, i] - lp[b, i]
                total = total - surr + beta * (torch.exp(delta) - delta - 1)
                n += 1
    return total / n


def ref_wd1(theta, batch, adv, draws, js, psi):
    cfg = ELBOConfig(mode="one_step", window="eos")
    S = torch.stack([ref_ell(theta, batch, draws, cfg, j) for j in js]).mean(0)
    G = batch.group_size
    total = 0.0
    for g in range(adv.shape[0] // G):
        a, s = adv[g * G : (g + 1) * G], S[g * G : (g + 1) * G]
        total = total + (((-psi * a).softmax(0) - (psi * a).softmax(0)) * s).sum()
    return total / (adv.shape[0] // G)


def ref_ppo_clip(ratio: torch.Tensor, adv: torch.Tensor, eps: float, dual: float) -> torch.Tensor:
    """PPO's pessimistic surrogate, element by element in float64 (independent of
    ``bgpo.method.clipped``): ``min(ρA, clamp(ρ, 1 − ε, 1 + ε)·A)`` (ε = 0: ρA), then for A < 0 with a
    dual clip c > 0, ``max(·, c·A)``. ``adv`` broadcasts against ``ratio``. Gradients flow through ρ."""
    adv = adv.expand_as(ratio)
    out = []
    for rho, a in zip(ratio.flatten(), adv.flatten().tolist(), strict=True):
        s = rho * a
        if eps > 0:
            s = torch.minimum(s, torch.clamp(rho, 1 - eps, 1 + eps) * a)
        if dual > 0 and a < 0:
            s = torch.maximum(s, torch.tensor(dual * a, dtype=torch.float64))
        out.append(s)
    return torch.stack(out).view(ratio.shape)


def ref_k3(ref_lp: torch.Tensor, cur_lp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π_θ || π_ref) (Schulman's), written out (independent of ``bgpo.method.k3``):
    with δ = log π_ref − log π_θ, ``e^δ − δ − 1`` (≥ 0, zero where θ = ref)."""
    delta = ref_lp.double() - cur_lp
    return torch.exp(delta) - delta - 1


# ---- helpers ----------------------------------------------------------------------------------
def run_method(method, model, batch, adv, prep, it=0):
    model.net.zero_grad(set_to_none=True)
    stats = method_backward(method, model, batch, adv, prep, it)
    return stats, grads(model).clone()


def ref_grad(model, loss):
    model.net.zero_grad(set_to_none=True)
    loss.backward()
    return grads(model).clone()


def assert_close(g, ref, what):
    assert ref.abs().max() > 0, f"{what}: the reference gradient is zero (test has no teeth)"
    err = (g - ref).norm() / ref.norm()
    assert err < 1e-9, f"{what}: relative gradient error {err:.2e}"


def off_policy_pair(seed=1, scale=0.05):
    old = micro_model()
    theta = copy.deepcopy(old)
    perturb(theta, scale, seed)
    return old, theta


# ---- BGPO and VRPO-OL ---------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", LEVELS, ids=["time", "count", "count-strat", "time-floor-eos-norm"])
@pytest.mark.parametrize("off", [False, True], ids=["on-policy", "off-policy"])
def test_bgpo_and_vrpo_match_the_reference(cfg, off):
    old, theta = off_policy_pair() if off else (micro_model(),) * 2
    batch = random_batch(old, eos_at=3 if cfg.window == "eos" else None)
    for cls, conf, ref in ((BGPO, BGPOConfig, ref_bgpo), (VRPO, VRPOConfig, ref_vrpo)):
        method = cls(conf(n_t=3, mc_chunk=2, elbo=cfg))
        prep = method.prepare(old, batch, 2 if off else 1, torch.Generator().manual_seed(3))
        assert (prep.old is not None) == off
        for adv in (ADV, ADV.abs(), -ADV.abs()):
            stats, g = run_method(method, theta, batch, adv, prep)
            loss = ref(theta, old, batch, adv, prep.draws, cfg)
            assert stats["loss"] == pytest.approx(loss.item(), rel=1e-10, abs=1e-12), cls.__name__
            assert_close(g, ref_grad(theta, loss), f"{cls.__name__} {cfg} off={off}")


def test_on_policy_bgpo_equals_vrpo_and_its_value_is_minus_mean_advantage():
    model = micro_model()
    batch = random_batch(model)
    prep = BGPO(BGPOConfig(n_t=4)).prepare(model, batch, 1, torch.Generator().manual_seed(0))
    sb, gb = run_method(BGPO(BGPOConfig(n_t=4)), model, batch, ADV, prep)
    sv, gv = run_method(VRPO(VRPOConfig(n_t=4)), model, batch, ADV, prep)
    assert sb["loss"] == pytest.approx(-ADV.mean().item(), rel=1e-12) == sv["loss"]
    assert_close(gb, gv, "BGPO vs VRPO-OL on-policy")


def test_off_policy_bound_below_vrpo_and_the_gradients_relation():
    """Off-policy Σ_j g_j ≤ exp(B̂_θ − B̂_old)·A for every response (strictly somewhere), and per
    response: A ≥ 0 ⇒ ∇BGPO = ∇VRPO-OL · exp(−mean_j d_j) (tangent: constant weights); with
    n_t = 1 and A < 0 the two are identical (Jensen is then an equality)."""
    old, theta = off_policy_pair(scale=0.05)
    batch = random_batch(old)
    cfg = ELBOConfig(level="count")
    prep = BGPO(BGPOConfig(n_t=4, elbo=cfg)).prepare(old, batch, 2, torch.Generator().manual_seed(5))
    d = (ref_ells(theta, batch, prep.draws, cfg, range(4)) - prep.old).detach()  # [n_t, B]
    assert d.abs().max() > 1e-2  # θ really moved
    for sign in (1.0, -1.0):
        A = sign * ADV.abs()
        bound = torch.where(A >= 0, A * (1 + d), A * d.exp()).mean(0)
        vrpo = d.mean(0).exp() * A
        assert torch.all(bound <= vrpo + 1e-12) and torch.any(bound < vrpo - 1e-6)
        sb, _ = run_method(BGPO(BGPOConfig(n_t=4, elbo=cfg)), theta, batch, A, prep)
        sv, _ = run_method(VRPO(VRPOConfig(n_t=4, elbo=cfg)), theta, batch, A, prep)
        assert sb["loss"] > sv["loss"]  # loss = −objective
    for b in range(ADV.shape[0]):  # one response at a time: the others get A = 0
        A = torch.zeros_like(ADV)
        A[b] = abs(ADV[b].item())
        _, gb = run_method(BGPO(BGPOConfig(n_t=4, elbo=cfg)), theta, batch, A, prep)
        _, gv = run_method(VRPO(VRPOConfig(n_t=4, elbo=cfg)), theta, batch, A, prep)
        assert_close(gb, gv * torch.exp(-d[:, b].mean()), f"A ≥ 0 relation, response {b}")
    one = Prepared(elbo.Draws(prep.draws.masked[:1], prep.draws.weight[:1], prep.draws.scored), prep.old[:1])
    A = -ADV.abs()
    _, gb = run_method(BGPO(BGPOConfig(n_t=1, elbo=cfg)), theta, batch, A, one)
    _, gv = run_method(VRPO(VRPOConfig(n_t=1, elbo=cfg)), theta, batch, A, one)
    assert_close(gb, gv, "n_t = 1, A < 0")


@pytest.mark.parametrize("bound", ["tangent", "jensen"])
def test_lemma_ablation_bounds(bound):
    """Table 3: one lemma for every sample. Each is then NOT a lower bound for the other sign."""
    old, theta = off_policy_pair(scale=0.05)
    batch = random_batch(old)
    cfg = ELBOConfig(level="count")
    method = BGPO(BGPOConfig(n_t=3, bound=bound, elbo=cfg))
    prep = method.prepare(old, batch, 2, torch.Generator().manual_seed(2))
    stats, g = run_method(method, theta, batch, ADV, prep)
    loss = ref_bgpo(theta, old, batch, ADV, prep.draws, cfg, bound)
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-10)
    assert_close(g, ref_grad(theta, loss), bound)
    both, _ = run_method(BGPO(BGPOConfig(n_t=3, elbo=cfg)), theta, batch, ADV, prep)
    assert stats["loss"] != pytest.approx(both["loss"], rel=1e-6)  # the switch changes the objective


def test_mc_chunk_and_minibatches_partition_the_same_objective():
    """Any mc_chunk gives the same gradient; the mini-batches of BGPO §4 cover every response once
    and their summed gradients (weighted by size) equal the whole batch's."""
    model = micro_model()
    batch = random_batch(model, n_prompts=2, G=3)
    method = BGPO(BGPOConfig(n_t=4, elbo=ELBOConfig(level="count")))
    prep = method.prepare(model, batch, 2, torch.Generator().manual_seed(7))
    _, whole = run_method(method, model, batch, ADV, prep)
    for k in (2, 3, 4):
        _, g = run_method(BGPO(BGPOConfig(n_t=4, mc_chunk=k, elbo=ELBOConfig(level="count"))),
                          model, batch, ADV, prep)
        assert_close(g, whole, f"mc_chunk={k}")
    parts, seen = [], []
    for m in range(2):
        b, a, p = minibatch(batch, ADV, prep, m, 2)
        seen.append(b.input_ids)
        parts.append(run_method(method, model, b, a, p)[1])
    assert torch.equal(torch.cat(seen), batch.input_ids)  # each response once, in order
    assert_close((parts[0] + parts[1]) / 2, whole, "mini-batches")
    with pytest.raises(ValueError, match="minibatches=4"):
        minibatch(batch, ADV, prep, 0, 4)


# ---- diffu-GRPO -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mu", [1, 3])
def test_diffu_grpo_matches_the_reference(mu):
    """Per-token clipped ratio (ε small enough to clip off-policy), k3 KL to the reference in its
    direction, token-level mean over the d1 window, a FRESH prompt mask per inner iteration."""
    old, theta = off_policy_pair(scale=0.2) if mu > 1 else (micro_model(),) * 2
    refm = micro_model(seed=5)
    batch = random_batch(old, eos_at=4)
    conf = DiffuGRPOConfig(n_t=2, clip_eps=0.05, beta=0.1, elbo=ELBOConfig(mode="one_step", window="eos",
                                                                          p_prompt=0.5))
    method = DiffuGRPO(conf, ref=refm)
    prep = method.prepare(old, batch, mu, torch.Generator().manual_seed(0))
    assert prep.draws.n_t == 2 * mu
    prompt_masks = prep.draws.masked[:, :, : batch.prompt_len]
    assert all(not torch.equal(prompt_masks[0], prompt_masks[j]) for j in range(1, 2 * mu))
    for it in range(mu):
        js = range(2 * it, 2 * it + 2)
        stats, g = run_method(method, theta, batch, ADV, prep, it)
        loss = ref_diffu_grpo(theta, old, refm, batch, ADV, prep.draws, js, 0.05, 0.1)
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-10)
        assert_close(g, ref_grad(theta, loss), f"diffu-GRPO it={it}")
        if mu > 1:
            assert stats["clip_ratio"] > 0 and stats["kl"] > 0
    if mu > 1:  # iteration 1 must use ITS masks: the reference on iteration 0's differs
        wrong = ref_diffu_grpo(theta, old, refm, batch, ADV, prep.draws, range(0, 2), 0.05, 0.1)
        stats, _ = run_method(method, theta, batch, ADV, prep, 1)
        assert stats["loss"] != pytest.approx(wrong.item(), rel=1e-6)


def test_diffu_grpo_kl_direction_and_sign():
    """k3 = exp(ref − θ) − (ref − θ) − 1 ≥ 0, zero at the reference; its gradient pulls θ toward ref."""
    from bgpo.method import k3

    ref, cur = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64), torch.tensor([-1.5, -1.0, -0.5],
                                                                                  dtype=torch.float64)
    assert torch.allclose(k3(ref, cur), torch.exp(ref - cur) - (ref - cur) - 1)
    assert k3(ref, cur)[2] == 0 and torch.all(k3(ref, cur) >= 0)
    cur = cur.clone().requires_grad_(True)
    k3(ref, cur).sum().backward()
    assert torch.all(torch.sign(cur.grad[:2]) == torch.sign(cur.detach() - ref)[:2])  # descent moves to ref


def test_clipped_surrogate_direction():
    from bgpo.method import clipped

    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 0.1], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    surr, was = clipped(ratio, adv, 0.2, 0.0)
    assert surr.tolist() == pytest.approx([1.2, 0.5, -1.5, -0.8, -0.8])  # pessimistic: min(ρA, clip·A)
    assert was.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    surr, _ = clipped(torch.tensor([10.0]), torch.tensor([-1.0]), 0.2, 3.0)
    assert surr.item() == -3.0  # dual clip bounds the loss of a large ratio with A < 0


# ---- wd1 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mu", [1, 2])
def test_wd1_matches_the_reference(mu):
    model = micro_model()
    batch = random_batch(model, eos_at=4)
    method = WD1(WD1Config(n_t=2, psi=0.7))
    prep = method.prepare(model, batch, mu, torch.Generator().manual_seed(0))
    for it in range(mu):
        stats, g = run_method(method, model, batch, ADV, prep, it)
        loss = ref_wd1(model, batch, ADV, prep.draws, range(2 * it, 2 * it + 2), 0.7)
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-10)
        assert_close(g, ref_grad(model, loss), f"wd1 it={it}")
    _, g = run_method(method, model, batch, torch.zeros(6, dtype=torch.float64), prep)
    assert g.abs().max() == 0  # equal rewards in a group: w⁺ = w⁻, no gradient


# ---- the options ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,conf", [(BGPO, BGPOConfig), (VRPO, VRPOConfig)])
def test_clip_and_kl_options_match_the_reference(cls, conf):
    """With clip ε, dual clip and β > 0 (off by default), value and gradient off-policy."""
    old, theta = off_policy_pair(scale=0.2)
    refm = micro_model(seed=5)
    batch = random_batch(old)
    cfg = ELBOConfig(level="count", length_norm=True)
    method = cls(conf(n_t=2, clip_eps=0.05, dual_clip=3.0, beta=0.1, elbo=cfg), ref=refm)
    prep = method.prepare(old, batch, 2, torch.Generator().manual_seed(0))
    stats, g = run_method(method, theta, batch, ADV, prep)
    assert stats["clip_ratio"] > 0 and stats["kl"] > 0
    ell_t = ref_ells(theta, batch, prep.draws, cfg, range(2))  # [n_t, B]
    ell_o = ref_ells(old, batch, prep.draws, cfg, range(2)).detach()
    ell_r = ref_ells(refm, batch, prep.draws, cfg, range(2)).detach()
    if cls is BGPO:
        d = ell_t - ell_o
        ratio = torch.where(ADV >= 0, 1 + d, d.exp())
        obj = ref_ppo_clip(ratio, ADV, 0.05, 3.0).sum() / (2 * 6)
    else:
        obj = ref_ppo_clip((ell_t.mean(0) - ell_o.mean(0)).exp(), ADV, 0.05, 3.0).sum() / 6
    loss = -obj + 0.1 * ref_k3(ell_r, ell_t).sum() / (2 * 6)
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-10)
    assert_close(g, ref_grad(theta, loss), cls.__name__)


@pytest.mark.parametrize("conf,key", [(lambda: BGPOConfig(n_t=0), "n_t"),
                                      (lambda: BGPOConfig(mc_chunk=0), "mc_chunk"),
                                      (lambda: VRPOConfig(clip_eps=-0.1), "clip_eps"),
                                      (lambda: BGPOConfig(beta=-1.0), "beta"),
                                      (lambda: BGPOConfig(dual_clip=0.5), "dual_clip"),
                                      (lambda: BGPOConfig(bound="lemma3"), "bound"),
                                      (lambda: WD1Config(psi=0.0), "psi"),
                                      (lambda: DiffuGRPOConfig(beta=math.nan), "beta")])
def test_bad_method_settings_name_the_key(conf, key):
    with pytest.raises(ValueError, match=f"method.cfg.{key}"):
        conf()
