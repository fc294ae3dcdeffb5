"""The trainer's update loop against a hand-written float64 reference loop (issue 24, item 2).

``bgpo.trainer.train`` is driven for ONE RL step on a float64 micro model, with everything around
the update loop replaced by fixed inputs: the rollout returns fixed batches and rewards, nothing
is evaluated. Spies record what the loop hands to the method (advantages, mini-batches, θ_old, the
draws) and, at every optimizer step, the gradient it steps with and the parameters after it. The
reference loop below then recomputes, from the recorded draws only (masks, never their weights or
statistics), in float64:

    per-group advantages → per update: rows (mini-batch m / whole batch), the method's loss written
    as a loop (count weights L/l recomputed from the masks; θ_old and the reference = a frozen copy
    of the initial parameters) → autograd gradient, mean over shards → clip to grad_clip → AdamW
    (decoupled weight decay, bias corrections, warm-up schedule)

for the three update schemes: on-policy (BGPO, two shards, the clip active), BGPO §4's off-policy
mini-batches (``minibatches=2``; the warm-up schedule and one group of equal rewards, which the
trainer skips) and d1's inner updates (diffu-GRPO, ``inner_updates=2``: clip, k3 KL to the
reference, a fresh prompt mask per update).

The loop body of ``train`` is not a function of its own, so the test drives ``train`` (0.5–2 s a
run) rather than a seam; see the report of issue 24 for the refactor that would give one.
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import Tensor

import bgpo.trainer as trainer
import bgpo.update
import tests.toy_task  # noqa: F401  (registers the toy task)
from baselines.diffu_grpo import DiffuGRPO
from bgpo.config import register
from bgpo.elbo import Batch
from bgpo.method import Prepared
from bgpo.model import DLLM, build_tiny
from bgpo.objective import BGPO
from bgpo.rollout import Rollouts
from bgpo.validate import validate_train
from tests.helpers import MICRO, random_batch
from tests.test_objectives import ref_token_logp
from tests.test_references import with_eos

register()
F64 = torch.float64


# ---- a float64 micro model whose copies are independent -------------------------------------------
def _norm64(self: torch.nn.Module, x: Tensor) -> Tensor:
    return self._norm(x) * (1.0 + self.weight)  # type: ignore[operator]


def f64_model(seed: int = 0) -> DLLM:
    """The micro model in float64 end to end. Unlike ``tests.helpers.micro_model``, the float64
    RMSNorm is a BOUND method, so ``copy.deepcopy`` (the trainer's frozen reference) rebinds it
    to the copy's own weights."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    model = build_tiny(seed=seed, dtype=F64, **MICRO)
    model.net.eval()
    for mod in model.net.modules():
        if isinstance(mod, Gemma3RMSNorm):
            mod.forward = types.MethodType(_norm64, mod)
    return model


def params_of(model: DLLM) -> list[Tensor]:
    return [p.detach().clone() for p in model.net.parameters()]


# ---- driving the trainer ---------------------------------------------------------------------------
@dataclass
class Call:
    """One ``method_backward`` call of the trainer."""

    it: int
    batch: Batch
    adv: Tensor
    prep: Prepared
    share: float
    params: list[Tensor]  # the policy's parameters when the call was made


@dataclass
class Trace:
    policy: DLLM
    init: list[Tensor]
    advs: list[Tensor] = field(default_factory=list)  # trainer.advantages, per shard
    preps: list[Prepared] = field(default_factory=list)  # method.prepare, per shard
    calls: list[Call] = field(default_factory=list)
    minibatches: list[tuple[int, int, Tensor]] = field(default_factory=list)  # (m, n, rows' ids)
    grads: list[list[Tensor]] = field(default_factory=list)  # per optimizer step: the gradient stepped with
    after: list[list[Tensor]] = field(default_factory=list)  # per optimizer step: parameters after it


def compose_cfg(tmp: Path, *overrides: str) -> Any:
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        return compose("train", overrides=[
            f"results_dir={tmp}", "steps=1", "task.name=toy", "progress=false", "eval_test=false",
            "ckpt_every=1", "device=cpu", "seed=3", *overrides])


def drive(monkeypatch: pytest.MonkeyPatch, tmp: Path, method_cls: type, rollouts: list[tuple[Batch, Tensor]],
          *overrides: str) -> Trace:
    """One RL step of ``bgpo.trainer.train`` on a float64 micro model; rollouts[s] is shard s's."""
    cfg = compose_cfg(tmp, *overrides)
    validate_train(cfg)
    policy = f64_model(0)
    trace = Trace(policy, params_of(policy))
    queue = list(rollouts)

    def fake_rollout(*_a: Any, **_k: Any) -> Rollouts:
        batch, rewards = queue.pop(0)
        return Rollouts(batch, [""] * batch.input_ids.shape[0], rewards.clone())

    real_adv, real_prepare = trainer.advantages, method_cls.prepare
    real_backward, real_minibatch = bgpo.update.method_backward, bgpo.update.minibatch
    real_step = torch.optim.AdamW.step

    def spy_adv(rewards: Tensor, G: int, std: bool) -> Tensor:
        trace.advs.append(real_adv(rewards, G, std).clone())
        return trace.advs[-1].clone()

    def spy_prepare(self: Any, *a: Any, **k: Any) -> Prepared:
        prep = real_prepare(self, *a, **k)
        trace.preps.append(prep)
        return prep

    def spy_backward(method: Any, pol: DLLM, batch: Batch, adv: Tensor, prep: Prepared, it: int,
                     scale: float = 1.0) -> dict[str, float]:
        trace.calls.append(Call(it, batch, adv.clone(), prep, scale, params_of(pol)))
        return real_backward(method, pol, batch, adv, prep, it, scale)

    def spy_minibatch(batch: Batch, adv: Tensor, prep: Prepared, m: int, n: int) -> tuple:
        out = real_minibatch(batch, adv, prep, m, n)
        trace.minibatches.append((m, n, out[0].input_ids.clone()))
        return out

    def spy_step(self: torch.optim.Optimizer, *a: Any, **k: Any) -> Any:
        trace.grads.append([p.grad.detach().clone() for p in policy.net.parameters()])
        out = real_step(self, *a, **k)
        trace.after.append(params_of(policy))
        return out

    monkeypatch.setattr(trainer, "load_policy", lambda _cfg, _device, _empty=False: policy)
    monkeypatch.setattr(trainer, "has_validation", lambda _task: False)
    monkeypatch.setattr(trainer, "run_key", lambda _cfg: "update-loop-test")  # no base model folder to hash
    monkeypatch.setattr(trainer, "rollout", fake_rollout)
    monkeypatch.setattr(trainer, "advantages", spy_adv)
    monkeypatch.setattr(method_cls, "prepare", spy_prepare)
    monkeypatch.setattr(bgpo.update, "method_backward", spy_backward)
    monkeypatch.setattr(bgpo.update, "minibatch", spy_minibatch)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    run_dir = tmp / "run"
    run_dir.mkdir(parents=True)
    trainer.train(cfg, run_dir)
    assert not queue, "every shard's rollout was used"
    return trace


# ---- the reference, in float64 ---------------------------------------------------------------------
def ref_advantages(rewards: Tensor, G: int, std_norm: bool) -> Tensor:
    """Per group of G consecutive responses: r − mean, divided by (sample std + 1e-4) when asked."""
    out = []
    for g in range(rewards.shape[0] // G):
        r = [float(x) for x in rewards[g * G : (g + 1) * G]]
        mean = sum(r) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
        out += [(x - mean) / (std + 1e-4) if std_norm else x - mean for x in r]
    return torch.tensor(out, dtype=F64)


def ref_elbo_count(model: DLLM, batch: Batch, masked_j: Tensor) -> Tensor:
    """ℓ(j) of count-level draws on the full window: (L / l) Σ_{masked} log p, l counted here: [B]."""
    P = batch.prompt_len
    hit = masked_j[:, P:]  # [B, L]
    l = hit.sum(-1).double()
    assert torch.all(l >= 1)
    return (hit.shape[1] / l) * (ref_token_logp(model, batch, masked_j) * hit).sum(-1)


def ref_bgpo_loss(theta: DLLM, old: DLLM | None, batch: Batch, adv: Tensor, masked: Tensor) -> Tensor:
    """BGPO §3: −(1/(n_t B)) Σ_j Σ_b [A(1 + d) if A ≥ 0 else A·e^d], d = ℓ_θ(j) − ℓ_old(j) (on-policy:
    ℓ_old = ℓ_θ detached)."""
    n_t, B = masked.shape[0], adv.shape[0]
    total = torch.zeros((), dtype=F64)
    for j in range(n_t):
        lt = ref_elbo_count(theta, batch, masked[j])
        lo = lt.detach() if old is None else ref_elbo_count(old, batch, masked[j]).detach()
        for b in range(B):
            a, d = float(adv[b]), lt[b] - lo[b]
            total = total + (a * (1 + d) if a >= 0 else a * torch.exp(d))
    return -total / (n_t * B)


def ref_diffu_grpo_loss(theta: DLLM, old: DLLM, refm: DLLM, batch: Batch, adv: Tensor, masked: Tensor,
                        eps: float, beta: float) -> Tensor:
    """d1 §3: per scored token (up to and including the first EOS), −min(ρA, clip(ρ)A) + β·k3, k3 =
    e^δ − δ − 1 with δ = log p_ref − log p_θ; a mean over the scored tokens of the update's draws."""
    P = batch.prompt_len
    y = batch.input_ids[:, P:].tolist()
    lens = [next((i + 1 for i, t in enumerate(row) if t == theta.eos_token_id), len(row)) for row in y]
    total, n = torch.zeros((), dtype=F64), 0
    for j in range(masked.shape[0]):
        lp = ref_token_logp(theta, batch, masked[j])
        lo = ref_token_logp(old, batch, masked[j]).detach()
        lr = ref_token_logp(refm, batch, masked[j]).detach()
        for b, L_b in enumerate(lens):
            a = float(adv[b])
            for i in range(L_b):
                rho = torch.exp(lp[b, i] - lo[b, i])
                surr = torch.minimum(rho * a, torch.clamp(rho, 1 - eps, 1 + eps) * a)
                delta = lr[b, i] - lp[b, i]
                total = total - surr + beta * (torch.exp(delta) - delta - 1)
                n += 1
    return total / n


LossFn = Callable[[DLLM, DLLM, int, int], Tensor]  # (θ, θ_0, shard, update) -> loss


def reference_loop(loss_of: LossFn, init_seed: int, n_shards: int, mu: int, lr: float, warmup: int,
                   weight_decay: float, beta2: float, max_norm: float) -> tuple[list[list[Tensor]],
                                                                           list[list[Tensor]], list[float]]:
    """μ optimizer steps from the initial parameters: gradients (after the clip), parameters after
    each step, and the pre-clip gradient norms."""
    theta, theta0 = f64_model(init_seed), f64_model(init_seed)
    params = list(theta.net.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    beta1, adam_eps = 0.9, 1e-8
    grads_seq, after_seq, norms = [], [], []
    for k in range(mu):
        total = [torch.zeros_like(p) for p in params]
        for s in range(n_shards):
            theta.net.zero_grad(set_to_none=True)
            loss_of(theta, theta0, s, k).backward()
            for acc, p in zip(total, params, strict=True):
                if p.grad is not None:
                    acc += p.grad
        g = [t / n_shards for t in total]
        norm = math.sqrt(sum(float((x * x).sum()) for x in g))
        norms.append(norm)
        coef = min(1.0, max_norm / (norm + 1e-6))
        g = [x * coef for x in g]
        grads_seq.append([x.clone() for x in g])
        step_lr = lr * min(1.0, (k + 1) / (warmup + 1))  # the linear warm-up, one step per update
        t = k + 1
        with torch.no_grad():
            for p, gi, mi, vi in zip(params, g, m, v, strict=True):
                p.mul_(1 - step_lr * weight_decay)
                mi.mul_(beta1).add_((1 - beta1) * gi)
                vi.mul_(beta2).add_((1 - beta2) * gi * gi)
                m_hat, v_hat = mi / (1 - beta1**t), vi / (1 - beta2**t)
                p.sub_(step_lr * m_hat / (v_hat.sqrt() + adam_eps))
        after_seq.append([p.detach().clone() for p in params])
    return grads_seq, after_seq, norms


def assert_sequences_match(trace: Trace, grads: list[list[Tensor]], after: list[list[Tensor]]) -> None:
    assert len(trace.grads) == len(grads) == len(trace.after), "one optimizer step per update"
    for k, (g_code, g_ref) in enumerate(zip(trace.grads, grads, strict=True)):
        gc, gr = torch.cat([x.flatten() for x in g_code]), torch.cat([x.flatten() for x in g_ref])
        assert gr.abs().max() > 0
        err = float((gc - gr).norm() / gr.norm())
        assert err < 1e-9, f"optimizer step {k}: relative gradient error {err:.2e}"
    for k, (p_code, p_ref) in enumerate(zip(trace.after, after, strict=True)):
        moved = max(float((a - b).abs().max()) for a, b in zip(p_ref, trace.init, strict=True))
        worst = max(float((a - b).abs().max()) for a, b in zip(p_code, p_ref, strict=True))
        assert moved > 1e-4 and worst < 1e-9 * moved, \
            f"parameters after optimizer step {k}: off by {worst:.2e} (moved {moved:.2e})"


def rows_in(full: Tensor, part: Tensor) -> list[int]:
    """The row of ``full`` each row of ``part`` is (rows are distinct random sequences)."""
    out = []
    for row in part:
        hits = [i for i in range(full.shape[0]) if torch.equal(full[i], row)]
        assert len(hits) == 1
        out.append(hits[0])
    return out


# ---- the three update schemes -----------------------------------------------------------------------
def test_on_policy_step_with_two_shards_and_the_clip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On-policy BGPO (μ = 1): two shards of one prompt group each — their gradients averaged —
    θ_old = θ detached, the gradient clipped to grad_clip, one AdamW step."""
    model = f64_model(0)
    rollouts = [(random_batch(model, n_prompts=1, G=3, seed=10 + s),
                 torch.tensor([[0.2, 0.9, 0.4], [1.0, 0.0, 0.3]][s], dtype=F64)) for s in range(2)]
    lr, clip = 1e-2, 0.05
    trace = drive(monkeypatch, tmp_path, BGPO, rollouts, "method=bgpo", "mc=2", "prompts_per_step=2",
                  "group_size=3", "shards=2", f"lr={lr}", f"grad_clip={clip}", "warmup_steps=0")
    assert [p.old for p in trace.preps] == [None, None]  # on-policy: no θ_old pass
    for s, (_, rewards) in enumerate(rollouts):
        assert torch.allclose(trace.advs[s], ref_advantages(rewards, 3, True), rtol=1e-12, atol=0)

    def loss_of(theta: DLLM, _theta0: DLLM, s: int, _k: int) -> Tensor:
        batch, rewards = rollouts[s]
        adv = ref_advantages(rewards, 3, True)
        return ref_bgpo_loss(theta, None, batch, adv, trace.preps[s].draws.masked)

    grads, after, norms = reference_loop(loss_of, 0, 2, 1, lr, 0, 0.01, 0.999, clip)
    assert norms[0] > clip  # the clip is active: its scale is part of what is compared
    assert_sequences_match(trace, grads, after)


def test_off_policy_minibatch_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """BGPO §4: 4 prompt groups split into 2 mini-batches of 2 groups, one AdamW step each (the
    warm-up: lr/2 then lr), θ_old the rollout policy on the draws prepared once; group 3 has equal
    rewards (skipped by the trainer, A = 0 in the reference). Every response in exactly one
    mini-batch, whole groups, in order."""
    model = f64_model(0)
    batch = random_batch(model, n_prompts=4, G=3, seed=20)
    rewards = torch.tensor([0.1, 0.8, 0.3, 1.0, 0.0, 0.0, 0.6, 0.6, 0.6, 0.2, 0.9, 0.5], dtype=F64)
    lr, warmup = 2e-2, 1
    trace = drive(monkeypatch, tmp_path, BGPO, [(batch, rewards)], "method=bgpo", "mc=2",
                  "prompts_per_step=4", "group_size=3", "minibatches=2", f"lr={lr}", "grad_clip=1000",
                  f"warmup_steps={warmup}")
    adv = ref_advantages(rewards, 3, True)
    assert torch.allclose(trace.advs[0], adv, rtol=1e-12, atol=0) and torch.all(adv[6:9] == 0)
    # coverage: mini-batch m holds groups 2m, 2m+1 — every response exactly once
    assert [(m, n) for m, n, _ in trace.minibatches] == [(0, 2), (1, 2)]
    rows = [rows_in(batch.input_ids, ids) for _, _, ids in trace.minibatches]
    assert sorted(r for part in rows for r in part) == list(range(12))
    assert rows == [list(range(0, 6)), list(range(6, 12))]
    prep = trace.preps[0]
    assert prep.old is not None  # θ_old statistics computed at rollout time

    def loss_of(theta: DLLM, theta0: DLLM, _s: int, k: int) -> Tensor:
        r = torch.arange(6 * k, 6 * k + 6)
        sub = Batch(batch.input_ids[r], batch.attention_mask[r], batch.prompt_len, 3)
        return ref_bgpo_loss(theta, theta0, sub, adv[r], prep.draws.masked[:, r])

    grads, after, _ = reference_loop(loss_of, 0, 1, 2, lr, warmup, 0.01, 0.999, 1000.0)
    assert_sequences_match(trace, grads, after)


def test_minibatch_theta_old_is_the_rollout_policy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The θ_old that mini-batch 2 sees is the ROLLOUT policy (the initial parameters) on the SAME
    draws as prepared at rollout time — not the policy after mini-batch 1 — so its d_j ≠ 0.
    Kills: θ_old recomputed after each off-policy mini-batch (every mini-batch then on-policy)."""
    model = f64_model(0)
    batch = random_batch(model, n_prompts=4, G=3, seed=21)
    rewards = torch.tensor([0.1, 0.8, 0.3, 1.0, 0.0, 0.2, 0.6, 0.1, 0.4, 0.2, 0.9, 0.5], dtype=F64)
    trace = drive(monkeypatch, tmp_path, BGPO, [(batch, rewards)], "method=bgpo", "mc=2",
                  "prompts_per_step=4", "group_size=3", "minibatches=2", "lr=2e-2", "grad_clip=1000",
                  "skip_flat_groups=false")
    assert [c.it for c in trace.calls] == [0, 1]
    second = trace.calls[1]
    assert second.prep.old is not None
    rows = rows_in(batch.input_ids, second.batch.input_ids)
    assert rows == list(range(6, 12))
    full = trace.preps[0].draws
    assert torch.equal(second.prep.draws.masked, full.masked[:, rows])  # the same draws, not new ones
    rollout_policy, now = f64_model(0), f64_model(0)
    with torch.no_grad():
        for p, q in zip(now.net.parameters(), second.params, strict=True):
            p.copy_(q)
    moved = max(float((a - b).abs().max()) for a, b in zip(second.params, trace.init, strict=True))
    assert moved > 1e-3  # mini-batch 1's step happened before mini-batch 2
    with torch.no_grad():
        want = torch.stack([ref_elbo_count(rollout_policy, second.batch, second.prep.draws.masked[j])
                            for j in range(2)])  # [n_t, 6]
        current = torch.stack([ref_elbo_count(now, second.batch, second.prep.draws.masked[j])
                               for j in range(2)])
    assert torch.allclose(second.prep.old, want, rtol=1e-10, atol=1e-10), "θ_old is not the rollout policy"
    d = current - second.prep.old
    assert d.abs().max() > 1e-4, "mini-batch 2 is on-policy: d_j = 0"


def test_inner_updates_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """d1's μ = 2 inner updates (diffu-GRPO: clip 0.5, β = 0.04 k3 KL to the frozen initial policy):
    each update over the WHOLE batch with its own prompt masks (draws it·n_t … (it+1)·n_t − 1),
    θ_old the rollout policy, advantages r − mean per group, one AdamW step each."""
    model = f64_model(0)
    batch = with_eos(model, random_batch(model, n_prompts=2, G=3, seed=30), [6, 2, 4, 1, 6, 3])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.3, 0.3, 0.9], dtype=F64)
    lr = 2e-2
    trace = drive(monkeypatch, tmp_path, DiffuGRPO, [(batch, rewards)], "method=diffu_grpo", "mc=2",
                  "prompts_per_step=2", "group_size=3", "inner_updates=2", f"lr={lr}", "grad_clip=1000",
                  "warmup_steps=0", "method.cfg.elbo.p_prompt=0.5")
    adv = ref_advantages(rewards, 3, False)
    assert torch.allclose(trace.advs[0], adv, rtol=1e-12, atol=0)
    prep = trace.preps[0]
    assert prep.draws.n_t == 4 and prep.old is not None and prep.ref is not None
    assert [c.it for c in trace.calls] == [0, 1]
    assert all(torch.equal(c.batch.input_ids, batch.input_ids) for c in trace.calls)  # the whole batch
    prompt_masks = prep.draws.masked[:, :, : batch.prompt_len]
    assert not torch.equal(prompt_masks[0:2], prompt_masks[2:4])  # a fresh prompt mask per update

    def loss_of(theta: DLLM, theta0: DLLM, _s: int, k: int) -> Tensor:
        return ref_diffu_grpo_loss(theta, theta0, theta0, batch, adv, prep.draws.masked[2 * k : 2 * k + 2],
                                   0.5, 0.04)

    grads, after, _ = reference_loop(loss_of, 0, 1, 2, lr, 0, 0.01, 0.999, 1000.0)
    assert_sequences_match(trace, grads, after)


# ---- advantages ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("std_norm", [False, True])
def test_advantages_are_per_group(std_norm: bool) -> None:
    """A_i depends only on the rewards of i's own group (G consecutive responses): equal to the
    per-group reference, unchanged when another group's rewards change, permuted with the groups."""
    G = 4
    rewards = torch.rand(5 * G, generator=torch.Generator().manual_seed(0), dtype=F64)
    rewards[2 * G : 3 * G] = 0.25  # a group of equal rewards: A = 0, no NaN
    a = trainer.advantages(rewards, G, std_norm)
    assert torch.allclose(a, ref_advantages(rewards, G, std_norm), rtol=1e-12, atol=1e-15)
    assert torch.all(a[2 * G : 3 * G] == 0)
    for g in range(5):
        assert abs(float(a[g * G : (g + 1) * G].sum())) < 1e-12  # zero mean within each group
    other = rewards.clone()
    other[G : 2 * G] += torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=F64)
    b = trainer.advantages(other, G, std_norm)
    keep = torch.ones(5 * G, dtype=torch.bool)
    keep[G : 2 * G] = False
    assert torch.equal(a[keep], b[keep]) and not torch.allclose(a[G : 2 * G], b[G : 2 * G])
    order = torch.tensor([3, 0, 4, 1, 2])
    perm = (order[:, None] * G + torch.arange(G)).flatten()
    assert torch.allclose(trainer.advantages(rewards[perm], G, std_norm), a[perm], rtol=0, atol=1e-15)


def test_f64_model_copies_are_independent() -> None:
    """The reference's frozen θ_0 (and the trainer's deepcopy reference) must not share norm weights
    with the trained copy."""
    a = f64_model(0)
    b = copy.deepcopy(a)
    x = torch.randint(4, 50, (1, 7))
    with torch.no_grad():
        before = a.net(input_ids=x).logits.clone()
        for p in b.net.parameters():
            p.add_(0.5)
        assert torch.equal(a.net(input_ids=x).logits, before)
        assert not torch.allclose(b.net(input_ids=x).logits, before)
