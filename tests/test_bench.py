"""Benchmarks of issue 5 on a micro model with tiny settings: memory against n_t, estimator variance."""

from __future__ import annotations

import pytest
import torch

from bgpo.bench import memory, variance
from bgpo.bench.__main__ import main as bench_main
from bgpo.bench.memory import SavedTensorMeter
from tests.helpers import micro_model

MEMORY_KEYS = {"method", "mc", "peak_bytes", "saved_bytes", "rss_peak_bytes", "rss_setup_bytes",
               "floor_bytes", "floor_rss_bytes", "floor_time_s", "step_time_s", "step_times_s",
               "time_per_sample_s", "peak_over_floor", "device", "model", "commit", "cmd"}


@pytest.fixture(scope="module")
def micro_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "micro"
    micro_model(dtype=torch.float32).save(path)
    return path


def test_saved_tensor_meter_counts_each_storage_once_and_skips_parameters():
    w = torch.randn(16, requires_grad=True)
    x = torch.randn(16, requires_grad=True)
    with SavedTensorMeter(exclude=[w]) as meter:
        y = x * x  # x saved twice: one storage, 64 bytes
        z = (y * w).sum()  # y saved (64 bytes); w is excluded
        assert meter.now == 128
        z.backward()  # the graph is released
        assert meter.now == 0
    assert meter.peak == 128


def test_memory_bench_bgpo_flat_vrpo_grows(micro_path, tmp_path):
    argv = ["memory", "--model", str(micro_path), "--name", "micro", "--methods", "bgpo,vrpo,diffu_grpo,wd1",
            "--mcs", "1,4", "--prompts", "2",
            "--group", "4", "--prompt-length", "6", "--gen-length", "8", "--repeats", "2",
            "--out", str(tmp_path), "--no-progress"]
    assert bench_main(argv) == 0  # through the dispatcher: python -m bgpo.bench memory ...
    rows = memory.load_rows(tmp_path / "memory-cpu-micro.jsonl")
    assert {(r["method"], r["mc"]) for r in rows} == {(m, n) for m in ("bgpo", "vrpo", "diffu_grpo", "wd1")
                                                      for n in (1, 4)}
    for r in rows:
        assert MEMORY_KEYS <= set(r), MEMORY_KEYS - set(r)
        assert r["peak_bytes"] > 0 and r["step_time_s"] > 0 and len(r["step_times_s"]) == 2
        assert r["rss_peak_bytes"] >= r["rss_setup_bytes"] > 0 and r["floor_rss_bytes"] > 0
        assert r["cmd"].startswith("python -m bgpo.bench memory --model") and r["device"] == "cpu"
    by = {(r["method"], r["mc"]): r for r in rows}
    b1, b4, floor = by["bgpo", 1]["peak_bytes"], by["bgpo", 4]["peak_bytes"], by["bgpo", 1]["floor_bytes"]
    assert abs(b4 - b1) <= 0.10 * b1  # BGPO: one sample's graph whatever n_t is
    assert b4 <= 1.10 * floor
    assert by["vrpo", 4]["peak_bytes"] >= 3.5 * by["vrpo", 1]["peak_bytes"]  # all n_t graphs alive
    assert by["bgpo", 4]["step_time_ratio_vs_vrpo"] > 0


def test_variance_bench_coupling_lowers_variance(micro_path, tmp_path):
    argv = ["--model", str(micro_path), "--name", "micro", "--methods", "diffu_grpo,vrpo,bgpo",
            "--mcs", "1,4", "--repeats", "3",
            "--gold-mc", "16", "--gold-chunk", "8", "--prompts", "1", "--group", "4", "--max-tries", "16",
            "--diff-ns", "1,4", "--diff-replicates", "16", "--tail-draws", "256", "--out", str(tmp_path),
            "--no-progress"]
    assert variance.main(argv) == 0
    rows = variance.load_rows(tmp_path / "variance-micro.jsonl")
    grads = {(r["method"], r["mc"]): r for r in rows if r["kind"] == "grad"}
    assert set(grads) == {(m, n) for m in ("diffu_grpo", "vrpo", "bgpo") for n in (1, 4)}
    for r in grads.values():
        assert r["grad_std"] > 0 and r["bias_rel"] >= 0 and r["commit"] and r["cmd"]
    check = next(r for r in rows if r["kind"] == "onpolicy_check")
    assert check["rel_diff"] < 1e-5  # SPEC §3: on-policy, BGPO's gradient is VRPO-OL's
    diffs = [r for r in rows if r["kind"] == "elbo_diff"]
    assert len(diffs) == len(variance.ESTIMATORS) * 2 * 2  # estimator × n × coupled
    for level, strat, t_min in variance.ESTIMATORS:
        for n in (1, 4):
            sel = {r["coupled"]: r["var"] for r in diffs
                   if (r["level"], r["stratified"], r["t_min"], r["n"]) == (level, strat, t_min, n)}
            assert sel[True] < sel[False], (level, strat, n, sel)
    tails = {(r["level"], r["stratified"], r["t_min"]): r for r in rows if r["kind"] == "estimator"}
    assert set(tails) == set(variance.ESTIMATORS)
    count = tails["count", False, 0.0]
    assert count["max_weight"] <= count["gen_length"]  # L/l with l >= 1
    assert tails["time", False, 1e-3]["max_weight"] <= 1000 + 1e-9  # the floor bounds 1/t


def test_step_bench_counts_every_phase(micro_path, tmp_path):
    from bgpo.bench import step

    argv = ["--model", str(micro_path), "--name", "micro", "--repeats", "1", "--peak-n", "64",
            "--peak-repeats", "2", "--override", "prompts_per_step=2", "--override", "group_size=2",
            "--override", "mc=2", "--override", "eval_n=4", "--out", str(tmp_path)]
    assert step.main(argv) == 0
    rows = {r["phase"]: r for r in variance.load_rows(tmp_path / "step-cpu-micro.jsonl")}
    assert set(rows) == {"rollout", "prepare", "backward", "optimizer", "evaluation", "step", "matmul_peak"}
    assert rows["prepare"]["flops"] == 0  # on-policy BGPO, β = 0: no θ_old or reference pass
    assert min(rows[k]["flops"] for k in ("rollout", "backward", "evaluation")) > 0
    assert rows["step"]["seconds"] == pytest.approx(sum(rows[k]["seconds"] for k in
                                                       ("rollout", "prepare", "backward", "optimizer")))
    assert 0 < rows["step"]["fraction_of_peak"] and rows["matmul_peak"]["gflops_per_s"] > 0
    assert rows["step"]["cmd"].startswith("python -m bgpo.bench step")
