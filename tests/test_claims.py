"""The claims table's verdicts follow its rule, on runs whose per-problem scores are made up."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from bgpo.claims import Diff, claim_rows, later_rows, memory_claim, verdict
from bgpo.paper import Run
from bgpo.stats import Interval

N = 400


def run(method: str, seed: int, acc: float, task: str = "countdown", mc: int = 16) -> Run:
    rng = np.random.default_rng(zlib.crc32(f"{method}/{seed}/{task}/{mc}".encode()))
    per = (rng.random(N) < acc).astype(float).tolist()
    base = (np.random.default_rng(7).random(N) < 0.1).astype(float).tolist()
    tests = {w: {"own": {"per_problem": {"accuracy": per}}} for w in ("best", "final")}
    tests["base"] = {"own": {"per_problem": {"accuracy": base}}}
    return Run("tiny_repro", method, task, mc, seed, "v", "base", tests, "abc1234")


def arms(accs: dict[str, float], seeds: int = 3, task: str = "countdown") -> list[Run]:
    return [run(m, s, a, task) for m, a in accs.items() for s in range(seeds)]


def iv(lo: float, hi: float) -> Interval:
    return Interval((lo + hi) / 2, lo, hi, N, 3)


@pytest.mark.parametrize("ivs,seeds,expected", [
    ([iv(0.01, 0.05), iv(0.02, 0.1)], 3, "reproduced in direction"),
    ([iv(0.01, 0.05), iv(-0.02, 0.1)], 3, "inconclusive"),
    ([iv(0.01, 0.05), iv(-0.1, -0.02)], 3, "not reproduced"),
    ([iv(0.01, 0.05), iv(-0.1, -0.02)], 2, "pending (2 of 3 seeds)"),
    ([iv(0.01, 0.05), None], 3, "not yet run (1 of 2 comparisons have runs)"),
])
def test_verdict_rule(ivs, seeds, expected):
    assert verdict([Diff("d", x, seeds, N) for x in ivs]) == expected


def table(rows):
    return {claim: (text, v) for claim, _, text, v in rows}


def test_table1_claim_each_way():
    ahead = table(claim_rows(arms({"bgpo": 0.6, "vrpo": 0.3, "diffugrpo": 0.3, "wd1": 0.3}), [], [], [], []))
    assert ahead["BGPO ranks first among the four (Countdown)"][1] == "reproduced in direction"
    assert "(3 × 400)" in ahead["BGPO ranks first among the four (Countdown)"][0]
    behind = table(claim_rows(arms({"bgpo": 0.3, "vrpo": 0.6, "diffugrpo": 0.3, "wd1": 0.3}), [], [], [], []))
    assert behind["BGPO ranks first among the four (Countdown)"][1] == "not reproduced"
    tie = table(claim_rows(arms({"bgpo": 0.5, "vrpo": 0.5, "diffugrpo": 0.2, "wd1": 0.2}), [], [], [], []))
    assert tie["BGPO ranks first among the four (Countdown)"][1] == "inconclusive"
    two = arms({"bgpo": 0.6, "vrpo": 0.3, "diffugrpo": 0.3, "wd1": 0.3}, seeds=2)
    short = table(claim_rows(two, [], [], [], []))
    assert short["BGPO ranks first among the four (Countdown)"][1] == "pending (2 of 3 seeds)"
    assert short["off-policy BGPO works (Sudoku)"][1].startswith("not yet run")


def test_offpolicy_works_when_it_gains_and_is_not_worse():
    rows = table(claim_rows(arms({"bgpo": 0.5, "bgpo_offpolicy": 0.5}), [], [], [], []))
    assert rows["off-policy BGPO works (Countdown)"][1] == "reproduced in direction"
    rows = table(claim_rows(arms({"bgpo": 0.8, "bgpo_offpolicy": 0.4}), [], [], [], []))
    assert rows["off-policy BGPO works (Countdown)"][1] == "not reproduced"


def test_mc_claim_compares_the_largest_n_t_with_the_smallest():
    mc = [run("bgpo", s, 0.2 + 0.01 * m, mc=m) for m in (1, 4, 32) for s in range(3)]
    rows = table(claim_rows([], mc, [], [], []))
    text, v = rows["accuracy rises with n_t (Countdown)"]
    assert text.startswith("n_t 32 − n_t 1") and v == "reproduced in direction"


def test_memory_claim():
    rows = [{"device": "cpu", "model": "tiny", "method": m, "mc": mc,
             "peak_bytes": (1 if m == "bgpo" else mc) * 1e8} for m in ("bgpo", "vrpo") for mc in (1, 4, 32)]
    claim, _, text, v = memory_claim(rows)
    assert v == "reproduced in direction" and "1.00×" in text and "32.00×" in text
    rows = [{**r, "peak_bytes": r["mc"] * 1e8} for r in rows]
    assert memory_claim(rows)[3] == "not reproduced"
    assert memory_claim([])[3].startswith("not yet run")


def test_later_methods_name_who_is_ahead():
    rows = table(later_rows(arms({"bgpo": 0.3, "spg": 0.6, "espo": 0.3})))
    assert rows["SPG against BGPO (Countdown)"][1] == "SPG ahead"
    assert rows["ESPO against BGPO (Countdown)"][1] == "no difference resolved"
    assert rows["TraceRL against BGPO (Countdown)"][1].startswith("not yet run")


def test_compute_table_counts_threads_sittings_and_failed_runs(tmp_path):
    """Issue 22.2: core-minutes = wall minutes × the run's threads; a resumed run counts its earlier
    sittings (recorded, or pieced from the logged step times); a failed run's logged steps count as
    spent but not in the minutes per run."""
    import json

    import yaml

    from bgpo.claims import compute_table

    def folder(name: str, threads: int, summary: dict | None, steps: dict[int, float]) -> None:
        d = tmp_path / "tiny_mc" / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"method": {"_target_": "bgpo.objective.BGPO"},
                                                       "threads": threads}))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "time/step_s": v}) + "\n"
                                                 for k, v in steps.items()) + '{"step": 9, "ti')
        if summary is None:
            (d / "failed.json").write_text("{}")
        else:
            (d / "summary.json").write_text(json.dumps(summary))

    folder("bgpo-countdown-mc1-s0-a", 2, {"wall_s_this_session": 600.0, "resumed_at": []}, {0: 1.0})
    folder("bgpo-countdown-mc1-s1-b", 1, {"wall_s_this_session": 300.0, "wall_s_all_sittings": 1200.0,
                                         "resumed_at": [5]}, {0: 1.0})
    folder("bgpo-countdown-mc1-s2-c", 1, {"wall_s_this_session": 300.0, "resumed_at": [2]},
           {0: 60.0, 1: 120.0, 2: 120.0, 3: 999.0})
    folder("bgpo-countdown-mc2-s0-d", 1, None, {0: 600.0, 1: 600.0})
    t = compute_table(tmp_path)
    row = next(r for r in t.rows if r[0][0] == "`tiny_mc`")
    # minutes 20 (10 × 2 threads), 20 (all sittings), 10 (5 + 1 + 2 + 2 logged up to step 2)
    assert [c[0] for c in row[1:6]] == ["3 of 15", "1", "20.0 (10.0–20.0)", f"{(50 + 20) / 60:.1f}", "11"]
    assert any("1 run(s) ran with more than one thread" in n for n in t.notes)
    assert any(n.startswith("1 resumed run(s) began before") for n in t.notes)
