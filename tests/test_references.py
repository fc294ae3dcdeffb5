"""References recomputed from first principles in float64 (issue 24, item 1).

Nothing on the reference side comes from the code under test: no ``clipped``/``k3``/``k2``, no
``Draws.weight`` (each weight is recomputed from the drawn masks, or checked against its defining
property when the drawn level is not observable), no ``bgpo.elbo`` log-probability. Each test
names the planted bug it is written to catch:

- ESPO's length normalisation: ρ_i = exp((B̂_θ − B̂_old)/L_i) with L_i the SCORED length
  (``elbo.window=eos``: up to and including the first EOS), not the completion window;
- SPG's block time-level weight K/t (``bgpo/elbo.py``): the weight of a block draw must make the
  block ELBO unbiased, E[w · 1{i targeted}] = 1 for every scored token, and lie in [K, K/t_min];
- the same unbiasedness for every mask-drawing mode with a weight (elbo, complementary, block).

(θ_old of the off-policy mini-batches is checked on the trainer itself: tests/test_update_loop.py.)
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from baselines.espo import ESPO, ESPOConfig
from baselines.spg import SPG, SPGConfig
from bgpo import elbo
from bgpo.elbo import Batch, Draws, ELBOConfig
from bgpo.model import DLLM
from tests.helpers import micro_model, perturb, random_batch
from tests.test_objectives import assert_close, ref_grad, ref_token_logp, run_method

F64 = torch.float64
ADV = torch.tensor([1.5, -0.5, -1.0, 0.7, -2.0, 1.3], dtype=F64)
EOS_AT = [1, 3, 5, 2, 6, 0]  # first EOS per row (6 = none in a window of 6): scored lengths 2, 4, 6, 3, 6, 1


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_eos(model: DLLM, batch: Batch, eos_at: list[int]) -> Batch:
    """The batch with row b's completion set to EOS from position ``eos_at[b]`` on."""
    ids = batch.input_ids.clone()
    P = batch.prompt_len
    for b, k in enumerate(eos_at):
        ids[b, P + k :] = model.eos_token_id
    return Batch(ids, batch.attention_mask, P, batch.group_size, batch.trace)


def scored_lengths(batch: Batch, window: str, eos: int) -> list[int]:
    """L_b: the whole window, or up to and including the first EOS, found by a plain scan."""
    y = batch.input_ids[:, batch.prompt_len :].tolist()
    if window == "full":
        return [len(row) for row in y]
    return [next((i + 1 for i, tok in enumerate(row) if tok == eos), len(row)) for row in y]


# ---- ESPO with a scored window shorter than the completion window --------------------------------
def espo_reference(theta: DLLM, old: DLLM, refm: DLLM, batch: Batch, adv: Tensor, draws: Draws,
                   js: range, eps: float, beta: float, mode: str) -> Tensor:
    """ESPO from its definition, in float64 loops. For each row b with scored length L_b (EOS
    window) and each draw j: the hit set is the masked positions before L_b, of size n; the count
    weight is (L_b + 1)/n for complementary pairs (0 for an empty mask), L_b/n for plain count
    draws, recomputed here. B̂ = mean_j w_j Σ_hit log p; ρ = exp((B̂_θ − B̂_old)/L_b);
    loss = (1/B) Σ_b [−min(ρA, clip(ρ, 1−ε, 1+ε)A) + β · ½(B̂_θ − B̂_ref)²/L_b]."""
    P, B = batch.prompt_len, adv.shape[0]
    lens = scored_lengths(batch, "eos", theta.eos_token_id)
    lp = {(name, j): ref_token_logp(m, batch, draws.masked[j])
          for name, m in (("theta", theta), ("old", old), ("ref", refm)) for j in js}
    total = torch.zeros((), dtype=F64)
    for b in range(B):
        L_b = lens[b]
        seq = {"theta": torch.zeros((), dtype=F64), "old": torch.zeros((), dtype=F64),
               "ref": torch.zeros((), dtype=F64)}
        for j in js:
            hit = [i for i in range(L_b) if bool(draws.masked[j, b, P + i])]
            n = len(hit)
            if mode == "complementary":
                w = (L_b + 1) / n if n > 0 else 0.0
            else:
                w = L_b / n
            assert float(draws.weight[j, b]) == pytest.approx(w, rel=1e-12)  # a check; w is used below
            for name in seq:
                seq[name] = seq[name] + w * sum((lp[(name, j)][b, i] for i in hit),
                                                torch.zeros((), dtype=F64)) / len(js)
        bt, bo, br = seq["theta"], seq["old"].detach(), seq["ref"].detach()
        rho = torch.exp((bt - bo) / L_b)
        a = float(adv[b])
        clipped_rho = torch.clamp(rho, 1 - eps, 1 + eps) if eps > 0 else rho
        surr = torch.minimum(rho * a, clipped_rho * a)
        total = total - surr + beta * 0.5 * (bt - br) ** 2 / L_b
    return total / B


@pytest.mark.parametrize("mode", ["complementary", "elbo"])
@pytest.mark.parametrize("mu", [1, 2], ids=["on-policy", "off-policy"])
def test_espo_divides_by_the_scored_length(mode: str, mu: int) -> None:
    """Kills: ESPO's ratio divided by the full window instead of the scored length (window=eos)."""
    old = micro_model()
    theta = micro_model()
    if mu > 1:
        perturb(theta, 0.3, seed=1)
    refm = micro_model(seed=5)
    batch = with_eos(old, random_batch(old), EOS_AT)
    lens = scored_lengths(batch, "eos", old.eos_token_id)
    assert len(set(lens)) > 2 and min(lens) < batch.completion.shape[1]  # L_b differs from the window
    cfg = ELBOConfig(mode=mode, level="count", stratified=True, window="eos")  # type: ignore[arg-type]
    method = ESPO(ESPOConfig(n_t=2, clip_eps=0.05, beta=0.1, elbo=cfg), ref=refm)
    prep = method.prepare(old, batch, mu, gen(0))
    k = cfg.patterns(2)
    for it in range(mu):
        stats, g = run_method(method, theta, batch, ADV, prep, it)
        loss = espo_reference(theta, old, refm, batch, ADV, prep.draws, range(it * k, (it + 1) * k), 0.05,
                              0.1, mode)
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-10, abs=1e-12), f"ESPO {mode} it={it}"
        assert_close(g, ref_grad(theta, loss), f"ESPO {mode} mu={mu} it={it}")


# ---- the weights of the drawn masks: unbiasedness, from first principles ---------------------------
WEIGHTED = [("elbo", "time"), ("elbo", "count"), ("complementary", "time"), ("complementary", "count"),
            ("block", "time"), ("block", "count")]


@pytest.mark.parametrize("window", ["full", "eos"])
@pytest.mark.parametrize("mode,level", WEIGHTED)
def test_drawn_weights_make_every_scored_token_count_once(mode: str, level: str, window: str) -> None:
    """The weight of a draw is defined by unbiasedness: for every scored token i,
    E_j[w_j · 1{i ∈ target_j}] = 1 (so E[ℓ(j)] is the (block-wise) ELBO Σ_i E[w log p]); for an
    unscored token it is 0. Checked with n = 4000 seeded draws per row, tolerance six standard errors
    of the empirical mean. Kills SPG's block time weight K/t replaced by 1/t (mean 1/K instead of 1)."""
    model = micro_model()
    batch = with_eos(model, random_batch(model, L=8), [8, 8, 5, 7, 2, 8])  # block 3: K = 3, 3, 2, 3, 1, 3
    cfg = ELBOConfig(mode=mode, level=level, window=window, t_min=0.2, block_length=3,  # type: ignore[arg-type]
                     p_prompt=0.2)
    n = 4000
    d = elbo.draw(batch, cfg, n, model.eos_token_id, gen(11))
    P, L = batch.prompt_len, batch.completion.shape[1]
    lens = scored_lengths(batch, window, model.eos_token_id)
    scored = torch.tensor([[i < lens[b] for i in range(L)] for b in range(len(lens))])  # [B, L]
    if d.target is not None:
        hit = d.target.double()  # [n', B, L]
    else:
        hit = (d.masked[..., P:] & scored).double()
    contrib = d.weight[..., None] * hit  # [n', B, L]  w_j · 1{i ∈ target_j}
    mean, se = contrib.mean(0), contrib.std(0) / math.sqrt(contrib.shape[0])
    want = scored.double()
    bad = (mean - want).abs() > 6 * se + 1e-12
    assert not bad.any(), f"{mode}/{level}/{window}: E[w·1{{hit}}] = {mean[bad].tolist()} where 1 or 0 is due"


@pytest.mark.parametrize("window", ["full", "eos"])
def test_block_time_weight_is_K_over_t(window: str) -> None:
    """A block time-level draw masks each token of the drawn block with probability t ∈ (t_min, 1]
    and weighs it K/t, K = ⌈L_b/block⌉ the blocks holding scored tokens (recomputed here from the
    scored length): with t_min = 0.9 every weight lies in [K, K/0.9] — deterministically, per draw.
    The count level's K·n_b/l is recomputed exactly from the target (block index, block size, count).
    Kills the K/t → 1/t mutation without statistics."""
    model = micro_model()
    batch = with_eos(model, random_batch(model, L=8), [8, 8, 5, 7, 2, 8])
    lens = scored_lengths(batch, window, model.eos_token_id)
    bl = 3
    K = torch.tensor([max(1, -(-L_b // bl)) for L_b in lens], dtype=F64)  # [B]
    assert K.max() > 1
    d = elbo.draw(batch, ELBOConfig(mode="block", level="time", t_min=0.9, window=window, block_length=bl),
                  200, model.eos_token_id, gen(3))
    assert torch.all(d.weight >= K - 1e-12) and torch.all(d.weight <= K / 0.9 + 1e-12), "K/t, t in (0.9, 1]"
    d = elbo.draw(batch, ELBOConfig(mode="block", level="count", window=window, block_length=bl),
                  200, model.eos_token_id, gen(4))
    assert d.target is not None
    for j in range(d.n_t):
        for b, L_b in enumerate(lens):
            pos = d.target[j, b].nonzero().flatten().tolist()
            assert pos, "a count draw targets at least one token"
            blk = pos[0] // bl
            assert all(p // bl == blk and p < L_b for p in pos)  # one block, scored tokens only
            n_b = min((blk + 1) * bl, L_b) - blk * bl
            assert float(d.weight[j, b]) == pytest.approx(float(K[b]) * n_b / len(pos), rel=1e-12)


def spg_elbo_reference(model: DLLM, batch: Batch, adv: Tensor, draws: Draws, js: range, bl: int) -> Tensor:
    """SPG with ω = 0 (the ELBO for both signs): −(1/B) Σ_b A_b · mean_j w_j Σ_{i ∈ target_j} log p,
    the block count weight K·n_b/l recomputed from the target (not read from the draws)."""
    lens = scored_lengths(batch, "eos", model.eos_token_id)
    assert draws.target is not None
    total = torch.zeros((), dtype=F64)
    for j in js:
        lp = ref_token_logp(model, batch, draws.masked[j])
        for b, L_b in enumerate(lens):
            pos = draws.target[j, b].nonzero().flatten().tolist()
            K = max(1, -(-L_b // bl))
            blk = pos[0] // bl
            w = K * (min((blk + 1) * bl, L_b) - blk * bl) / len(pos)
            total = total - float(adv[b]) * w * sum((lp[b, i] for i in pos), torch.zeros((), dtype=F64))
    return total / (len(js) * adv.shape[0])


def test_spg_elbo_term_with_recomputed_block_weights() -> None:
    """SPG's ELBO term (ω = 0) on an EOS window of varying lengths, μ = 2 fresh sets of draws: value
    and gradient against the reference whose block weights come from the masks alone."""
    model = micro_model()
    batch = with_eos(model, random_batch(model, L=8), [8, 8, 5, 7, 2, 8])
    cfg = ELBOConfig(mode="block", level="count", window="eos", block_length=3, p_prompt=0.3)
    method = SPG(SPGConfig(n_t=2, omega=0.0, elbo=cfg))
    prep = method.prepare(model, batch, 2, gen(5))
    for it in range(2):
        stats, g = run_method(method, model, batch, ADV, prep, it)
        loss = spg_elbo_reference(model, batch, ADV, prep.draws, range(2 * it, 2 * it + 2), 3)
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-10)
        assert_close(g, ref_grad(model, loss), f"SPG ELBO it={it}")
