"""The intervals every table cell reports (bgpo.stats): known values, pairing, coverage."""

from __future__ import annotations

import numpy as np
import pytest

from bgpo.stats import bootstrap, wilson


def test_wilson_known_values():
    w = wilson(10, 100)  # textbook: 10/100 -> [0.0552, 0.1744]
    assert (round(w.lo, 4), round(w.hi, 4)) == (0.0552, 0.1744) and w.value == 0.1
    assert wilson(0, 50).lo == pytest.approx(0.0, abs=1e-12) and wilson(50, 50).hi == pytest.approx(1.0)
    with pytest.raises(ValueError):
        wilson(1, 0)


def test_pairing_cancels_what_the_arms_share():
    rng = np.random.default_rng(0)
    base = (rng.random(300) < 0.3).astype(float)
    same = np.stack([base, base])  # a "method" identical to the base on every problem
    better = base.copy()
    better[np.flatnonzero(base == 0)[:15]] = 1.0  # +5 points on the same problems
    out = bootstrap({"base": base, "same": same, "better": better}, [("same", "base"), ("better", "base")])
    assert out["same-base"].lo == out["same-base"].hi == 0.0  # paired: no spurious spread
    assert out["better-base"].value == pytest.approx(0.05) and out["better-base"].lo > 0
    # unpaired, a +5-point shift on 300 problems would not be significant: the pairing matters
    assert out["better"].lo < out["base"].hi


def test_seed_spread_widens_the_interval():
    rng = np.random.default_rng(1)
    p = rng.random(400) < 0.4
    calm = np.stack([p, p, p]).astype(float)
    noisy = calm.copy()
    noisy[0, :60], noisy[2, :60] = 1.0, 0.0  # seeds disagree
    out = bootstrap({"calm": calm, "noisy": noisy})
    assert (out["noisy"].hi - out["noisy"].lo) > (out["calm"].hi - out["calm"].lo)
    assert out["calm"].n_seeds == 3 and out["calm"].n_problems == 400


def test_bootstrap_covers_the_truth_about_95_percent():
    rng = np.random.default_rng(2)
    hits = 0
    for trial in range(200):
        scores = (rng.random(200) < 0.3).astype(float)
        ci = bootstrap({"a": scores}, n_boot=800, seed=trial)["a"]
        hits += ci.lo <= 0.3 <= ci.hi
    assert 0.90 <= hits / 200 <= 0.99


def test_arms_must_share_problems():
    with pytest.raises(ValueError, match="same problems"):
        bootstrap({"a": np.ones(5), "b": np.ones(6)})


def test_a_run_describes_its_gain_with_intervals():
    from bgpo.evaluation import describe

    n = 100
    res = lambda k: {"own": {"per_problem": {"accuracy": [1.0] * k + [0.0] * (n - k)}}}  # noqa: E731
    lines = describe({"base": res(10), "best": res(25), "final": res(20), "best_step": 40})
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("test set own (100 problems)")
    assert "base 10.0 [5.5, 17.4]" in line and "selected (step 40) 25.0 [" in line
    assert "(Δ +15.0 [" in line and "(Δ +10.0 [" in line  # paired: the same 10 problems right
