"""What every method promises the loop around it, and the draws' corner cases (the survivors of
the mutation run, README "Mutation testing"): the names of the statistics it reports, the
reference it keeps, when skipping flat groups is exact, VRPO-OL's single chunk, independent draws
per row, and the normalisations at their smallest counts (one scored token, one informative
response, one trajectory group)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from baselines.coupled_grpo import CoupledGRPO, CoupledGRPOConfig
from baselines.diffu_grpo import DiffuGRPO, DiffuGRPOConfig
from baselines.espo import ESPO, ESPOConfig
from baselines.just_grpo import JustGRPO, JustGRPOConfig
from baselines.spg import SPG, SPGConfig
from baselines.tracerl import TraceRL, TraceRLConfig
from baselines.vrpo import VRPO, VRPOConfig
from baselines.wd1 import WD1, WD1Config
from bgpo import elbo
from bgpo.elbo import Batch, ELBOConfig
from bgpo.objective import BGPO, BGPOConfig
from tests.helpers import micro_model, perturb, random_batch
from tests.test_methods_beyond import gen, ref_just_grpo, ref_tracerl, with_trace
from tests.test_objectives import ref_token_logp, run_method

METHODS = {"bgpo": (BGPO, BGPOConfig), "vrpo": (VRPO, VRPOConfig), "diffu_grpo": (DiffuGRPO, DiffuGRPOConfig),
           "wd1": (WD1, WD1Config), "spg": (SPG, SPGConfig), "espo": (ESPO, ESPOConfig),
           "coupled_grpo": (CoupledGRPO, CoupledGRPOConfig), "tracerl": (TraceRL, TraceRLConfig),
           "just_grpo": (JustGRPO, JustGRPOConfig)}
# the statistics each method reports (metrics.jsonl columns; the trainer averages them over ranks)
BASE_STATS = {"loss", "kl", "clip_ratio", "elbo/ell"}
STATS = {name: BASE_STATS for name in METHODS} | {"spg": BASE_STATS | {"elbo/eubo"},
                                                  "tracerl": BASE_STATS | {"kl_old"}}
ADV = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.0, 0.5], dtype=torch.float64)


def build(name: str, **over: object) -> tuple[object, object]:
    cls, conf = METHODS[name]
    cfg = conf(**over) if over else conf()
    ref = micro_model(seed=5) if getattr(cfg, "beta", 0.0) > 0 else None
    return cls(cfg, ref=ref), ref


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_reports_its_statistics_by_name(name: str) -> None:
    model = micro_model()
    method, _ = build(name)
    batch = with_trace(random_batch(model)) if name == "tracerl" else random_batch(model)
    prep = method.prepare(model, batch, 1, gen(0))
    stats, _ = run_method(method, model, batch, ADV, prep)
    assert set(stats) == STATS[name], f"{name} reports {sorted(stats)}"
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in stats.values())


@pytest.mark.parametrize("name", list(METHODS))
def test_a_method_keeps_the_reference_it_is_given(name: str) -> None:
    cls, conf = METHODS[name]
    sentinel = micro_model(seed=7)
    assert cls(conf(), ref=sentinel).ref is sentinel
    if any(f.name == "beta" for f in dataclasses.fields(conf)):  # a KL term needs the reference
        with pytest.raises(ValueError, match="method.cfg.beta"):
            cls(conf(beta=0.5), ref=None)


@pytest.mark.parametrize("name", ["bgpo", "vrpo"])
def test_flat_groups_are_free_only_without_a_kl_term(name: str) -> None:
    cls, conf = METHODS[name]
    assert cls(conf(beta=0.0)).flat_groups_free() is True
    assert cls(conf(beta=0.04), ref=micro_model(seed=5)).flat_groups_free() is False


def test_vrpo_takes_every_sample_in_one_chunk() -> None:
    model = micro_model()
    method = VRPO(VRPOConfig(n_t=4))
    prep = method.prepare(model, random_batch(model), 1, gen(0))
    (chunk,) = method.chunks(prep, 0)
    assert list(range(4)[chunk]) == [0, 1, 2, 3]


def test_ar_draws_are_independent_across_rows() -> None:
    """Rows with the same scored window get their own random positions (not one order for all)."""
    model = micro_model()
    one = random_batch(model, n_prompts=1, G=1, L=12)
    batch = Batch(one.input_ids.repeat(8, 1), one.attention_mask.repeat(8, 1), one.prompt_len, 8)
    d = elbo.draw(batch, ELBOConfig(mode="ar", window="full"), 3, model.eos_token_id, gen(1))
    chosen = {tuple(d.target[:, b].nonzero()[:, 1].tolist()) for b in range(8)}  # positions per row
    assert len(chosen) > 1


def test_ar_weight_of_a_row_with_one_scored_token_is_one() -> None:
    model = micro_model()
    batch = random_batch(model, n_prompts=1, G=2, L=6)
    batch.input_ids[0, batch.prompt_len:] = model.eos_token_id  # row 0: only the first EOS is scored
    d = elbo.draw(batch, ELBOConfig(mode="ar", window="eos"), 3, model.eos_token_id, gen(1))
    assert d.scored[0].sum() == 1 and d.scored[1].sum() == 6
    assert torch.equal(d.weight[:, 0], torch.ones(3, dtype=torch.float64))  # L_i / min(L_i, n) = 1
    assert torch.equal(d.weight[:, 1], torch.full((3,), 2.0, dtype=torch.float64))  # 6 / 3


def test_trajectory_groups_when_steps_do_not_divide_evenly() -> None:
    """7 decoding steps in n_t = 3 groups: ceil(7 / 3) = 3 steps a group (0-2, 3-5, 6)."""
    model = micro_model()
    batch = with_trace(random_batch(model, n_prompts=1, G=2, L=7))
    d = elbo.draw(batch, ELBOConfig(mode="trajectory", window="full"), 3, model.eos_token_id, gen(0))
    for g in range(3):
        assert torch.equal(d.target[g], batch.trace // 3 == g)


def test_just_grpo_with_one_informative_response() -> None:
    old = micro_model()
    batch = random_batch(old)
    adv = torch.zeros(6, dtype=torch.float64)
    adv[1] = -0.75  # #(A ≠ 0) = 1
    method = JustGRPO(JustGRPOConfig(n_t=6, mc_chunk=2, clip_eps=0.05))
    stats, _ = run_method(method, old, batch, adv, method.prepare(old, batch, 1, gen(0)))
    assert stats["loss"] == pytest.approx(ref_just_grpo(old, old, batch, adv, 0.05).item(), rel=1e-10)


def test_tracerl_with_one_response_and_one_group() -> None:
    old = micro_model()
    batch = with_trace(random_batch(old, n_prompts=1, G=1))
    adv = torch.tensor([0.5], dtype=torch.float64)
    method = TraceRL(TraceRLConfig(n_t=1, clip_eps=0.05))
    stats, _ = run_method(method, old, batch, adv, method.prepare(old, batch, 1, gen(0)))
    assert stats["loss"] == pytest.approx(ref_tracerl(old, old, batch, adv, 1, 0.05).item(), rel=1e-10)


def k3_ref(r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torch.exp(r - p) - (r - p) - 1


@pytest.mark.parametrize("name", ["diffu_grpo", "coupled_grpo"])
def test_the_kl_statistic_is_the_mean_k3_over_scored_tokens(name: str) -> None:
    """The reported KL, recomputed in float64 from the draws: the mean over scored tokens of
    k3 = e^(r−p) − (r−p) − 1 (diffu-GRPO: per draw; coupled-GRPO: of the coupled log-probs)."""
    model, refm = micro_model(), micro_model(seed=5)
    batch = random_batch(model, eos_at=4)
    cls, conf = METHODS[name]
    method = cls(conf(beta=0.5), ref=refm)
    prep = method.prepare(model, batch, 1, gen(0))
    stats, _ = run_method(method, model, batch, ADV, prep)
    d, scored = prep.draws, prep.draws.scored.double()
    with torch.no_grad():
        lp = torch.stack([ref_token_logp(model, batch, d.masked[j]) for j in range(d.n_t)])  # [n_t, B, L]
        rp = torch.stack([ref_token_logp(refm, batch, d.masked[j]) for j in range(d.n_t)])
    if name == "diffu_grpo":
        kl = (k3_ref(rp, lp) * scored).sum() / (d.n_t * scored.sum())
    else:
        lam = method.lam  # Eq. 13: λ, plus one when the fully masked draw is taken too
        w = d.weight[..., None] * d.hit(slice(None))  # [2λ+1, B, L]
        kl = (k3_ref((w * rp).sum(0) / lam, (w * lp).sum(0) / lam) * scored).sum() / scored.sum()
    assert kl > 1e-4 and stats["kl"] == pytest.approx(kl.item(), rel=1e-9)


def test_draws_stay_on_the_batch_device_in_float64_weights() -> None:
    """Every tensor a draw makes lives on the batch's device (on the meta device a stray CPU
    tensor fails), and the weights are float64 (``Draws.weight``) in every mode."""
    from bgpo.method import minibatch

    model = micro_model()
    batch = with_trace(random_batch(model, eos_at=5))
    meta = Batch(batch.input_ids.to("meta"), batch.attention_mask.to("meta"), batch.prompt_len,
                 batch.group_size, batch.trace.to("meta"))
    for mode in ("elbo", "one_step", "block", "ar", "complementary"):  # trajectory: no meta torch.unique
        for stratified in (False, True):
            cfg = ELBOConfig(mode=mode, window="eos", stratified=stratified)
            d = elbo.draw(meta, cfg, 3, model.eos_token_id, None)
            assert {t.device.type for t in (d.masked, d.weight, d.scored)} == {"meta"}, mode
    for mode in ("elbo", "one_step", "block", "ar", "complementary", "trajectory"):
        d = elbo.draw(batch, ELBOConfig(mode=mode, window="eos"), 3, model.eos_token_id, gen(0))
        assert d.weight.dtype == torch.float64, mode
    method = BGPO(BGPOConfig(n_t=2))
    prep = method.prepare(model, batch, 2, gen(0))
    prep_meta = dataclasses.replace(prep, draws=elbo.draw(meta, ELBOConfig(), 2, model.eos_token_id, None))
    adv = torch.zeros(6, device="meta")
    sub, sub_adv, _ = minibatch(meta, adv, prep_meta, 1, 2)
    assert sub.input_ids.device.type == "meta" and sub_adv.shape == (3,)


@pytest.mark.parametrize("name", ["vrpo", "espo"])
def test_the_clip_ratio_is_a_share_of_the_rows(name: str) -> None:
    """Sequence-level ratios off-policy with a tight clip: some rows clipped, the statistic their
    share (≤ 1)."""
    old = micro_model()
    theta = micro_model()
    perturb(theta, 0.2, 3)
    batch = random_batch(old)
    cls, conf = METHODS[name]
    method = cls(conf(n_t=2, clip_eps=1e-3, beta=0.0))
    prep = method.prepare(old, batch, 2, gen(0))
    stats, _ = run_method(method, theta, batch, ADV, prep)
    assert 0 < stats["clip_ratio"] <= 1


@pytest.mark.parametrize("mode", ["elbo", "block", "ar", "complementary", "trajectory"])
def test_draws_come_from_their_generator(mode: str) -> None:
    """The same seed replays the same draws whatever the global RNG did; another seed differs."""
    model = micro_model()
    batch = with_trace(random_batch(model, L=8))
    cfg = ELBOConfig(mode=mode, window="full")
    first = elbo.draw(batch, cfg, 2, model.eos_token_id, gen(3))
    torch.rand(7)  # the global generator moves on
    again = elbo.draw(batch, cfg, 2, model.eos_token_id, gen(3))
    assert torch.equal(first.masked, again.masked) and torch.equal(first.weight, again.weight)
    if mode != "trajectory":  # the trajectory's draws are the sampler's trace: nothing random
        others = [elbo.draw(batch, cfg, 2, model.eos_token_id, gen(s)).masked for s in range(4, 8)]
        assert any(not torch.equal(first.masked, o) for o in others)


def test_backward_scales_the_loss_and_only_the_loss_statistic() -> None:
    """``bgpo.method.backward(..., scale)``: the gradient and the "loss" statistic are scaled by
    the share of rows; the other statistics are not."""
    from bgpo.method import backward

    model = micro_model()
    w = next(model.net.parameters())

    class Fake:
        def chunks(self, prep: object, it: int) -> list[slice]:
            return [slice(0, 1), slice(1, 2)]

        def loss(self, policy: object, batch: object, adv: object, prep: object, js: slice) -> tuple:
            loss = (w.double() ** 2).sum() * (js.start + 1)
            return loss, {"loss": loss.detach(), "kl": torch.tensor(3.0)}

    grads = {}
    for scale in (1.0, 2.0, 0.25):
        model.net.zero_grad(set_to_none=True)
        stats = backward(Fake(), model, None, None, None, 0, scale)
        grads[scale] = w.grad.clone()
        base = 3 * (w.detach().double() ** 2).sum().item()
        assert stats["loss"] == pytest.approx(scale * base, rel=1e-12) and stats["kl"] == 6.0
    for scale in (2.0, 0.25):
        torch.testing.assert_close(grads[scale], scale * grads[1.0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", [n for n, (_, conf) in METHODS.items()
                                  if any(f.name == "beta" for f in dataclasses.fields(conf))])
def test_no_kl_term_at_beta_zero(name: str) -> None:
    """β = 0: no reference needed, the KL statistic is 0."""
    model = micro_model()
    cls, conf = METHODS[name]
    method = cls(conf(beta=0.0), ref=None)
    batch = with_trace(random_batch(model)) if name == "tracerl" else random_batch(model)
    stats, _ = run_method(method, model, batch, ADV, method.prepare(model, batch, 1, gen(0)))
    assert stats["kl"] == 0.0


@pytest.mark.parametrize("mode", ["elbo", "block", "ar", "complementary", "trajectory"])
def test_length_norm_divides_each_rows_weights_by_its_scored_length(mode: str) -> None:
    model = micro_model()
    batch = with_trace(random_batch(model, L=6))
    batch.input_ids[0, batch.prompt_len:] = model.eos_token_id  # row 0: one scored token (the EOS)
    plain = elbo.draw(batch, ELBOConfig(mode=mode, window="eos"), 2, model.eos_token_id, gen(1))
    cfg = ELBOConfig(mode=mode, window="eos", length_norm=True)
    normed = elbo.draw(batch, cfg, 2, model.eos_token_id, gen(1))
    L_i = plain.scored.sum(-1).double()  # [B]
    assert L_i[0] == 1 and torch.equal(plain.masked, normed.masked)
    torch.testing.assert_close(normed.weight, plain.weight / L_i, rtol=1e-15, atol=0)


def test_stratified_block_levels_visit_every_block() -> None:
    """Block mode, stratified, n_t = the number of blocks: each row's draws target every block once."""
    model = micro_model()
    batch = random_batch(model, L=8)
    d = elbo.draw(batch, ELBOConfig(mode="block", level="count", block_length=2, window="full",
                                        stratified=True), 4,
                  model.eos_token_id, gen(2))
    for b in range(batch.input_ids.shape[0]):
        blocks = sorted({int(d.target[j, b].nonzero()[0, 0]) // 2 for j in range(4)})
        assert blocks == [0, 1, 2, 3]


def test_group_shared_draws_are_shared_in_groups_of_two() -> None:
    model = micro_model()
    batch = random_batch(model, n_prompts=3, G=2, L=8)
    d = elbo.draw(batch, ELBOConfig(window="full", group_shared=True), 3, model.eos_token_id, gen(4))
    comp = d.masked[:, :, batch.prompt_len:]
    assert torch.equal(comp[:, 0::2], comp[:, 1::2]) and torch.equal(d.weight[:, 0::2], d.weight[:, 1::2])
    assert not torch.equal(comp[:, 0], comp[:, 2])  # another prompt, other draws


def test_complementary_levels_span_t_min_to_one_minus_t_min() -> None:
    model = micro_model()
    batch = random_batch(model, L=8)
    cfg = ELBOConfig(mode="complementary", level="time", window="full", t_min=0.25, full_mask=True)
    d = elbo.draw(batch, cfg, 16, model.eos_token_id, gen(5))
    assert d.weight.shape[0] == d.masked.shape[0] == 33  # 16 pairs and the fully masked draw
    t = 1 / d.weight[0:32:2]  # [16, B]: the masks' levels
    assert t.min() > 0.25 and t.max() <= 0.75 + 1e-12 and t.max() > 0.6


def test_block_masks_inside_the_target_block_are_the_target() -> None:
    """Block mode: inside block b only the target is masked (earlier blocks get p_prompt noise,
    later blocks are fully masked), for every draw and row."""
    model = micro_model()
    batch = random_batch(model, L=8)
    d = elbo.draw(batch, ELBOConfig(mode="block", level="count", block_length=2, window="full",
                                    p_prompt=0.5), 6, model.eos_token_id, gen(6))
    comp = d.masked[:, :, batch.prompt_len:]  # [n_t, B, L]
    for j in range(6):
        for b in range(batch.input_ids.shape[0]):
            lo = int(d.target[j, b].nonzero()[0, 0]) // 2 * 2  # the target block's first position
            assert torch.equal(comp[j, b, lo : lo + 2], d.target[j, b, lo : lo + 2])


def test_draws_for_several_updates_come_from_their_generator() -> None:
    model = micro_model()
    batch = random_batch(model)
    a = elbo.draw_updates(batch, ELBOConfig(), 2, 3, model.eos_token_id, gen(8))
    torch.rand(5)
    b = elbo.draw_updates(batch, ELBOConfig(), 2, 3, model.eos_token_id, gen(8))
    assert torch.equal(a.masked, b.masked) and a.n_t == 6


def test_token_logprobs_of_several_samples_at_once_in_bf16_and_fp64() -> None:
    """k samples in one forward equal k single-sample forwards; a bf16 model's log-probs come out
    in float32."""
    model = micro_model()
    batch = random_batch(model)
    d = elbo.draw(batch, ELBOConfig(), 3, model.eos_token_id, gen(9))
    with torch.no_grad():
        many = elbo.token_logprobs(model, batch, d, slice(0, 3))
        one = torch.cat([elbo.token_logprobs(model, batch, d, slice(j, j + 1)) for j in range(3)])
        torch.testing.assert_close(many, one, rtol=1e-10, atol=1e-10)
        model.net.to(torch.bfloat16)
        low = elbo.token_logprobs(model, batch, d, slice(0, 3))
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
