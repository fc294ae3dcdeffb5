"""The memory plan on fake tensors (``bgpo.plan``, issue 25.2) against measured memory: at the tiny
model's shape the planned saved-for-backward bytes of one RL update equal the memory benchmark's
committed CPU rows (the same meter on real tensors) within 10%."""

from __future__ import annotations

from pathlib import Path

import pytest

from bgpo import plan
from bgpo.bench._common import BatchSpec, load_rows

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "results" / "bench" / "memory-cpu-tiny.jsonl"
BENCH_BATCH = BatchSpec(prompts=4, group=8, prompt_length=16, gen_length=16)  # the rows' batch


@pytest.fixture(scope="module")
def planned() -> list[dict]:
    return [plan.plan_update("tiny", m, n, BENCH_BATCH) for m in ("bgpo", "vrpo") for n in (1, 4)]


def test_the_plan_matches_the_measured_tiny_rows(planned: list[dict]) -> None:
    measured = load_rows(MEASURED)
    rows = {(r["method"], r["mc"]) for r in measured}
    assert {("bgpo", 1), ("bgpo", 4), ("vrpo", 1), ("vrpo", 4)} <= rows  # the check has rows to meet
    assert all(r["batch_sequences"] == 32 and r["gen_length"] == 16 for r in measured)
    assert plan.validate(planned, measured) == []
    off = [{**r, "saved_bytes": int(r["saved_bytes"] * 1.2)} for r in planned]
    assert len(plan.validate(off, measured)) == 4  # a plan 20% off is caught


def test_the_plan_shows_bgpo_flat_and_vrpo_linear_in_n_t(planned: list[dict]) -> None:
    by = {(r["method"], r["mc"]): r for r in planned}
    assert by[("bgpo", 4)]["saved_bytes"] == by[("bgpo", 1)]["saved_bytes"]
    assert by[("vrpo", 4)]["saved_bytes"] == pytest.approx(4 * by[("vrpo", 1)]["saved_bytes"], rel=0.02)
    for r in planned:  # every allocation of the update counts, the saved activations among them
        assert r["update_peak_bytes"] >= r["saved_bytes"] > 0
        assert r["static_bytes"] >= 3 * r["grad_bytes"]  # weights + AdamW's two moments


def test_fsdp_is_modelled_per_rank() -> None:
    one = plan.plan_update("tiny", "bgpo", 2, BENCH_BATCH)
    eight = plan.plan_update("tiny", "bgpo", 2, BENCH_BATCH, world=8)
    assert eight["update_peak_bytes"] == one["update_peak_bytes"]  # the same update is run
    expected = (one["static_bytes"] / 8 + one["update_peak_bytes"] - one["grad_bytes"] * 7 / 8
                + one["fsdp_unit_bytes"])
    assert eight["per_rank_peak_bytes"] == int(expected) < one["per_rank_peak_bytes"]
    assert 0 < one["fsdp_unit_bytes"] < one["grad_bytes"] / 2  # one block of the several


def test_the_command_line_validates(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "plan.jsonl"
    assert plan.main(["--methods", "bgpo", "--mc", "1", "--validate", str(MEASURED), "--out", str(out)]) == 0
    assert "within 10% for every row" in capsys.readouterr().out
    (row,) = load_rows(out)
    assert row["cmd"].startswith("python -m bgpo.plan") and row["fits"] == {"80GB": True, "141GB": True}
