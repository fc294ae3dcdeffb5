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


def test_fsdp_runs_per_rank_under_a_fake_process_group() -> None:
    """``world`` 8: the trainer's FSDP2 sharding over torch's fake process group (rank 0 of 8, every
    collective answered in-process): weights and AdamW state are an eighth, the update's peak
    holds all-gathered blocks instead of whole-model gradients, and decoding gathers every block."""
    one = plan.plan_update("tiny", "bgpo", 2, BENCH_BATCH)
    eight = plan.plan_update("tiny", "bgpo", 2, BENCH_BATCH, world=8)
    assert eight["params"] == one["params"]  # the planned numel of a DTensor is the whole parameter's
    assert eight["static_bytes"] == pytest.approx(one["static_bytes"] / 8, rel=0.05)
    assert eight["rank_peak_bytes"] < one["rank_peak_bytes"]
    assert eight["update_peak_bytes"] < one["update_peak_bytes"]  # gradients reduce-scattered into shards
    weights = one["phase_peak_bytes"]["build"]
    assert eight["phase_peak_bytes"]["rollout"] - eight["static_bytes"] >= 0.9 * weights  # full_params


def test_the_command_line_validates(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "plan.jsonl"
    assert plan.main(["--methods", "bgpo", "--mc", "1", "--validate", str(MEASURED), "--out", str(out)]) == 0
    assert "within 10% for every row" in capsys.readouterr().out
    (row,) = load_rows(out)
    assert row["cmd"].startswith("python -m bgpo.plan") and row["fits"] == {"80GB": True, "141GB": True}


def test_every_phase_of_a_run_is_planned(planned: list[dict]) -> None:
    """Model build, rollout, update, evaluation, checkpoint save and the end-of-run fingerprint: the
    rank's peak is the largest; evaluation decodes more sequences at once than a rollout."""
    for r in planned:
        phases = r["phase_peak_bytes"]
        assert set(phases) == {"build", "rollout", "update", "evaluation", "checkpoint", "finish"}
        assert r["rank_peak_bytes"] == max(phases.values()) and phases["update"] == r["per_rank_peak_bytes"]
        assert phases["evaluation"] > phases["rollout"] > phases["checkpoint"] >= phases["build"]
        assert phases["finish"] - phases["checkpoint"] < 0.1 * r["static_bytes"]  # a few float64 chunks


def test_the_planned_rollout_equals_the_measured_one() -> None:
    """The sampler's planned bytes on fake tensors equal the same meter on the real tiny model."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bgpo.config import ModelConfig
    from bgpo.model import build_tiny

    m = ModelConfig()
    real = build_tiny(seed=0, hidden=m.hidden, layers=m.layers, heads=m.heads, intermediate=m.intermediate)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = plan.build("tiny", torch.float32, mode)
    measured = plan.decode_bytes(real, 32, BENCH_BATCH, 1.0)
    with mode:
        planned = plan.decode_bytes(fake, 32, BENCH_BATCH, 1.0)
    assert planned == pytest.approx(measured, rel=0.10) and measured > 0


def test_the_plan_reproduces_the_former_fingerprint_out_of_memory() -> None:
    """The end-of-run fingerprint before issue 25 built every parameter in float64 and concatenated
    them: planned at LLaDA-8B's shape that is ~128 GB on top of the 32 GB of float32 weights on one
    GPU, out of memory on 80 and 141 GB; the trainer's fingerprint (one chunk at a time) plans at a
    few hundred MB."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bgpo.parallel import local_fingerprint

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    net = plan.build("llada-8b", torch.float32, mode).net
    with mode:
        with plan.LiveBytes() as former:
            torch.cat([p.detach().double().flatten() for p in net.parameters()])  # the former code
        with plan.LiveBytes() as now:
            local_fingerprint(net.parameters())
    weights = plan.static_params(plan.DLLM.wrap(net, plan.build_char_tokenizer(), "llada", 126336))
    assert former.peak + weights > 141 * plan.GB and now.peak < 0.5 * plan.GB


def test_sharded_checkpoints_and_loads_keep_the_host_small() -> None:
    """At LLaDA-8B's shape over 8 ranks: loading reads and a checkpoint stages one tensor (shard) at
    a time on a rank's host, where the former paths held the whole model (32 GB on every rank) and
    model + AdamW gathered on rank 0 (96 GB)."""
    row = plan.plan_update("llada-8b", "bgpo", 1, BatchSpec(prompts=1, group=2, prompt_length=8,
                                                                  gen_length=8), "bf16-mixed", world=8,
                           layers=None, checkpointing=True)
    host = row["host_bytes"]
    assert host["load"] < 3 * plan.GB and host["checkpoint"] < 3 * plan.GB
    assert host["load_whole_model"] > 32 * plan.GB and host["checkpoint_gathered"] > 96 * plan.GB
    assert row["phase_peak_bytes"]["checkpoint"] < 13 * plan.GB  # this rank's eighth of ~96 GB


def test_the_slurm_preset_is_sized_from_the_plan() -> None:
    """The committed plan of every paper job sizes the Slurm launcher (``mem_gb`` for 8 ranks a
    node, ``signal_delay_s`` for a step and its checkpoint) and ``paper_main``'s ``ckpt_every``
    (checkpoints at most 5% of the time); the presets hold at least that."""
    import yaml

    from bgpo.paper_settings import paper_task

    rows = load_rows(ROOT / "results" / "bench" / "plan-paper-main.jsonl")
    steps = {t: paper_task(t, "diffusion_steps") for t in plan.PAPER_TASKS}
    sizing = plan.slurm_sizing(rows, plan.PAPER_WORLD, steps)
    assert all(r["slurm"] == sizing for r in rows)  # what the committed rows say is what it computes
    launcher = yaml.safe_load((ROOT / "bgpo" / "conf" / "hydra" / "launcher" / "slurm.yaml").read_text())
    assert launcher["mem_gb"] >= sizing["mem_gb"] and launcher["signal_delay_s"] >= sizing["signal_delay_s"]
    train = yaml.safe_load((ROOT / "bgpo" / "conf" / "train.yaml").read_text())
    paper = yaml.safe_load((ROOT / "sweeps" / "paper_main.yaml").read_text())
    assert paper.get("ckpt_every", train["ckpt_every"]) >= sizing["ckpt_every"]
    slower = plan.slurm_sizing(rows, plan.PAPER_WORLD, {t: 10 * n for t, n in steps.items()})
    assert slower["signal_delay_s"] > sizing["signal_delay_s"]  # the sizing follows the work of a step
