"""``bgpo.update.update`` on scripted fakes: what it averages, what it skips, what it reports and
when it steps (the bookkeeping the float64 loop tests in test_update_loop.py do not look at)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import bgpo.update as upd


class FakeDist:
    """Gradient norms from a script, one per optimizer step; records the shard bookkeeping."""

    def __init__(self, norms: list[float]) -> None:
        self.norms, self.events = list(norms), []

    def grad_sum(self, params: Any) -> FakeDist:
        self.events.append("zero")
        return self

    def add_shard(self) -> None:
        self.events.append("shard")

    def reduce(self, shards: int) -> None:
        self.events.append(f"reduce/{shards}")

    def grad_norm(self, params: Any, clip: float) -> float:
        self.events.append(f"clip/{clip}")
        return self.norms.pop(0)


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def step(self) -> None:
        self.n += 1


def drive(monkeypatch: pytest.MonkeyPatch, losses: list[dict[str, float]], norms: list[float], *,
          mu: int = 2, minibatches: int = 1, shards: int = 2, skip_flat: bool = False,
          share: float = 1.0) -> tuple[tuple, FakeDist, Counter, Counter, list]:
    """``update`` over ``shards`` fake rollout shards; method_backward returns ``losses`` in order."""
    calls: list = []
    script = list(losses)

    def backward(method, policy, batch, adv, prep, it, s):
        calls.append(("backward", batch, it, s))
        return script.pop(0)

    monkeypatch.setattr(upd, "method_backward", backward)
    monkeypatch.setattr(upd, "minibatch", lambda b, a, p, it, n: (calls.append(("mini", b, it, n)) or
                                                                 (f"{b}/mb{it}", a, p)))
    monkeypatch.setattr(upd, "informative", lambda b, a, p: (calls.append(("flat", b)) or (b, a, p, share)))
    dist, opt, sched = FakeDist(norms), Counter(), Counter()
    work = [(f"shard{s}", torch.zeros(1), None) for s in range(shards)]
    out = upd.update(None, None, work, minibatches=minibatches, mu=mu, skip_flat=skip_flat, shards=shards,
                     dist=dist, params=[], opt=opt, sched=sched, grad_clip=0.5)
    return out, dist, opt, sched, calls


def test_stats_are_the_mean_over_shards_and_steps(monkeypatch):
    losses = [{"loss": 1.0, "kl": 0.5}, {"loss": 3.0, "kl": 1.5}, {"loss": 5.0, "kl": 2.0},
              {"loss": 7.0, "kl": 4.0}]
    (stats, norms, bad), dist, opt, sched, calls = drive(monkeypatch, losses, [0.25, 0.75])
    assert stats == {"loss": 4.0, "kl": 2.0} and norms == [0.25, 0.75] and bad is None
    assert opt.n == sched.n == 2  # one optimizer and one scheduler step per update
    assert dist.events == ["zero", "shard", "shard", "reduce/2", "clip/0.5"] * 2
    assert [c[2] for c in calls if c[0] == "backward"] == [0, 0, 1, 1]  # the update index
    assert not any(c[0] in ("mini", "flat") for c in calls)


def test_minibatches_take_their_own_slice_of_every_shard(monkeypatch):
    losses = [{"loss": 1.0}] * 4
    _, _, opt, _, calls = drive(monkeypatch, losses, [1.0, 1.0], minibatches=2)
    assert [c[1:] for c in calls if c[0] == "mini"] == [("shard0", 0, 2), ("shard1", 0, 2),
                                                         ("shard0", 1, 2), ("shard1", 1, 2)]
    assert [c[1] for c in calls if c[0] == "backward"] == ["shard0/mb0", "shard1/mb0",
                                                            "shard0/mb1", "shard1/mb1"]
    assert opt.n == 2


def test_flat_groups_are_skipped_only_when_nothing_is_left(monkeypatch):
    (stats, _, bad), dist, opt, _, calls = drive(monkeypatch, [], [0.0, 0.0], skip_flat=True, share=0.0)
    assert not any(c[0] == "backward" for c in calls) and stats == {} and bad is None and opt.n == 2
    assert dist.events.count("shard") == 4  # every shard still counts in the mean over shards
    _, _, _, _, calls = drive(monkeypatch, [{"loss": 1.0}] * 4, [0.0, 0.0], skip_flat=True, share=0.5)
    assert [c[3] for c in calls if c[0] == "backward"] == [0.5] * 4  # the share reaches the loss


def test_a_non_finite_gradient_norm_stops_before_the_step(monkeypatch):
    (stats, norms, bad), _, opt, sched, _ = drive(monkeypatch, [{"loss": 1.0}] * 4, [0.5, math.inf])
    assert bad == ("gradient norm", math.inf) and norms == [0.5, math.inf]
    assert opt.n == sched.n == 1  # the first update stepped, the second did not


def test_a_non_finite_loss_is_named_as_the_loss(monkeypatch):
    losses = [{"loss": 1.0}, {"loss": math.inf}]
    (_, _, bad), _, opt, _, _ = drive(monkeypatch, losses, [math.nan], mu=1)
    assert bad == ("loss", math.inf) and opt.n == 0
    (_, _, bad), _, _, _, _ = drive(monkeypatch, [{"loss": math.nan}, {"loss": 1.0}], [math.nan], mu=1)
    assert bad[0] == "loss" and math.isnan(bad[1])


@pytest.mark.parametrize("std_norm", [False, True])
def test_advantages_against_a_float64_reference(std_norm):
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.0, 1.0, 5.0], dtype=torch.float64)
    got = upd.advantages(r, 3, std_norm)
    for g in range(3):
        x = [float(v) for v in r[3 * g: 3 * g + 3]]
        mean = sum(x) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in x) / 2)  # Bessel's, as torch.std
        want = [(v - mean) / (std + 1e-4) if std_norm else v - mean for v in x]
        assert got[3 * g: 3 * g + 3].tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_only_the_loss_decides_a_non_finite_stop(monkeypatch):
    """A non-finite statistic other than the loss (a KL metric) does not stop the update, nor is a
    stop named after it; a non-finite gradient norm of the only update is named with its value."""
    losses = [{"loss": 1.0, "kl": math.inf}, {"loss": 2.0, "kl": math.inf}]
    (stats, _, bad), _, opt, _, _ = drive(monkeypatch, losses, [0.5], mu=1)
    assert bad is None and opt.n == 1 and stats["loss"] == 1.5
    (_, _, bad), _, opt, _, _ = drive(monkeypatch, losses, [math.inf], mu=1)
    assert bad == ("gradient norm", math.inf) and opt.n == 0  # the loss was finite: the norm is named
    (_, norms, bad), _, opt, _, _ = drive(monkeypatch, [{"loss": 1.0}] * 2, [math.inf], mu=1)
    assert bad == ("gradient norm", math.inf) and norms == [math.inf] and opt.n == 0
