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
    assert check["rel_diff"] < 1e-5  # docs/methods.md §3: on-policy, BGPO's gradient is VRPO-OL's
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


def test_memory_bench_activation_checkpointing_lowers_the_one_sample_floor(micro_path, tmp_path):
    """The --activation-checkpointing row set (issue 12): the floor falls, the rows say so."""
    common = ["--model", str(micro_path), "--name", "micro", "--methods", "bgpo", "--mcs", "1,2", "--prompts",
              "2", "--group", "4", "--prompt-length", "6", "--gen-length", "8", "--repeats", "1", "--no-rss",
              "--out", str(tmp_path), "--no-progress"]
    assert memory.main(common) == 0
    assert memory.main([*common, "--activation-checkpointing"]) == 0
    plain = memory.load_rows(tmp_path / "memory-cpu-micro.jsonl")
    ckpt = memory.load_rows(tmp_path / "memory-cpu-micro-ac.jsonl")
    assert all(r["activation_checkpointing"] for r in ckpt)
    assert not any(r["activation_checkpointing"] for r in plain)
    assert ckpt[0]["floor_bytes"] < 0.8 * plain[0]["floor_bytes"]
    assert all(r["complete"] and r["rounds_done"] == 2 for r in plain + ckpt)


def test_memory_bench_native_llada_in_bf16_mixed_with_a_time_budget(tmp_path):
    """--arch native=llada builds the suite's LLaDAModelLM (llada8b: LLaDA-8B's config); a budget
    stops starting measurements and still leaves the rows measured so far."""
    arch = "native=llada,hidden=32,layers=2,heads=2,intermediate=64,vocab=256"
    argv = ["--arch", arch, "--name", "mini", "--methods", "bgpo,vrpo", "--mcs", "1,2", "--prompts", "1",
            "--group", "2", "--prompt-length", "4", "--gen-length", "8", "--precision", "bf16-mixed",
            "--optimizer", "sgd", "--no-rss", "--out", str(tmp_path), "--no-progress"]
    assert memory.main(argv) == 0
    rows = memory.load_rows(tmp_path / "memory-cpu-mini-bf16-mixed.jsonl")
    assert {(r["method"], r["mc"]) for r in rows} == {(m, n) for m in ("bgpo", "vrpo") for n in (1, 2)}
    assert all(r["precision"] == "bf16-mixed" and r["optimizer"] == "sgd" and r["arch"]["native"] == "llada"
               for r in rows)
    assert all(r["step_time_s"] > 0 and r["complete"] for r in rows)
    assert memory.main([*argv, "--budget-s", "0.001", "--name", "cut"]) == 0  # out of time at once
    cut = memory.load_rows(tmp_path / "memory-cpu-cut-bf16-mixed.jsonl")
    assert cut and not any(r["complete"] for r in cut) and all(r["step_time_s"] is None for r in cut)
    with pytest.raises(SystemExit):
        memory.parse(["--precision", "bf16-mixed", "--dtype", "bfloat16"])  # mixed keeps float32 weights


def test_llada8b_preset_is_the_native_class_with_the_published_shape():
    from bgpo.bench._common import parse_arch
    from bgpo.models import LLaDAConfig, LLaDAModelLM

    assert parse_arch("llada8b") == {"native": "llada"}
    with torch.device("meta"):
        from bgpo.bench._common import native_model

        model = native_model(parse_arch("llada8b"), torch.bfloat16, "meta")
    assert type(model.net) is LLaDAModelLM and model.net.config.d_model == LLaDAConfig().d_model == 4096
    assert sum(p.numel() for p in model.net.parameters()) > 8.0e9 and model.mask_token_id == 126336


def test_equal_memory_mc_fits_the_committed_memory_rows():
    """bgpo/config.py EQUAL_MEMORY_MC is read off results/bench/memory-cpu-tiny.jsonl: the budget is
    VRPO-OL's peak at n_t = 2; each baseline gets the largest measured n_t whose peak fits it, and BGPO's
    n_t = 16 fits it too. Re-running the benchmark with other rows makes this fail until the table is
    updated."""
    import json
    from pathlib import Path

    from bgpo.paper_settings import EQUAL_MEMORY_MC

    path = Path(__file__).resolve().parents[1] / "results" / "bench" / "memory-cpu-tiny.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    peak = {(r["method"].replace("_", ""), r["mc"]): r["peak_bytes"] for r in rows if not r["overrides"]}
    budget = peak[("vrpo", 2)]
    for method, mc in EQUAL_MEMORY_MC.items():
        fitting = [m for (name, m), p in peak.items() if name == method and p <= budget * 1.001]
        assert fitting, method
        expected = 16 if method == "bgpo" else max(fitting)
        assert mc == expected, (method, mc, sorted(fitting))
        assert peak[(method, mc)] <= budget * 1.001


def test_headroom_bench_measures_the_shipped_base_on_validation(tmp_path):
    """greedy, pass@1 and pass@G of the shipped Sudoku base on the first validation problems; a
    re-run replaces its row; pass@1 <= pass@G by definition, and the row names its command."""
    import json

    from bgpo.bench import headroom
    from bgpo.provision import shipped_manifest

    argv = ["--task", "sudoku", "--n", "4", "--G", "3", "--prompts-per-batch", "2", "--out", str(tmp_path)]
    assert headroom.main(argv) == 0
    assert headroom.main(argv) == 0
    rows = [json.loads(x) for x in (tmp_path / "headroom-sudoku.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    r = rows[0]
    assert r["model"] == "tiny-sudoku" and r["base_sha256"] == shipped_manifest()["sudoku"]["sha256"]
    assert r["n"] == 4 and r["G"] == 3 and r["split"] == "val" and r["gen_length"] == 17
    assert 0 <= r["pass@1"] <= r["pass@G"] <= 1 and 0 <= r["greedy"] <= 1
    assert r["cmd"].startswith("python -m bgpo.bench headroom --task sudoku")
