"""The RL trainer on a micro model: every method updates parameters; resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_module

import bgpo.trainer as trainer
import bgpo.update
import tests.toy_task  # noqa: F401  (registers the toy task)
from bgpo.config import register
from bgpo.train import run
from tests.helpers import micro_model

register()


VOLATILE = ("time/", "mem/")  # wall-clock and RSS differ between runs; everything else must not


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "micro"
    micro_model(dtype=torch.float32).save(path)
    return path


def cfg_of(base, tmp, *overrides):
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        return compose("train", overrides=[
            f"model.path={base}", f"results_dir={tmp}", "steps=3", "prompts_per_step=2",
            "group_size=3", "eval_n=4", "eval_every=2", "ckpt_every=2", "progress=false",
            "mc=2", "lr=1e-3", "task.name=toy", "task.gen_length=8", "task.block_length=4",
            "task.diffusion_steps=4",
            *overrides])


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def test_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    assert torch.allclose(trainer.advantages(r, 3, False), torch.tensor([2, -1, -1, 0, 0, 0]) / 3)
    a = trainer.advantages(r, 3, True)
    assert a[3:].abs().max() == 0 and a[0] > 1.1  # equal rewards: zero advantage, no NaN


@pytest.mark.parametrize("method,extra", [("bgpo", "sampler.mode=cached"), ("vrpo", "minibatches=2"),
                                          ("diffu_grpo", "inner_updates=2"), ("wd1", "inner_updates=2")])
def test_each_method_trains(method, extra, base_model, tmp_path):
    cfg = cfg_of(base_model, tmp_path, f"method={method}", extra, "temperature=1.0")
    summary = run(cfg)
    run_dir = tmp_path / summary["run"]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and "val/accuracy" in rows[-1]
    assert "val/accuracy" in rows[0]  # the base model, before any update
    tests = json.loads((run_dir / "eval_test.json").read_text())
    assert set(tests) == {"base", "final", "best", "best_step", "selection"}
    assert len(tests["final"]["own"]["per_problem"]["accuracy"]) == 8
    from bgpo.evaluation import best_row

    assert tests["best_step"] == best_row(rows)["step"]  # selected on validation rows only
    assert torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)["step"] == tests["best_step"]
    assert all(r["grad_norm"] > 0 for r in rows[1:])
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    base = micro_model(dtype=torch.float32).net.state_dict()
    assert any(not torch.equal(state[k], base[k]) for k in base)  # parameters moved
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    assert run(cfg)["run"] == summary["run"]  # a complete run is skipped, not repeated


def test_killed_run_resumes_exactly(base_model, tmp_path, monkeypatch):
    full = run(cfg_of(base_model, tmp_path / "a", "method=bgpo", "steps=5", "temperature=1.0"))
    expected = metrics(tmp_path / "a" / full["run"])

    calls = {"n": 0}
    real = trainer.peak_bytes

    def dies_at_step_4(device):  # metrics of step 3 written, checkpoint at step 2: lost work
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real(device)

    monkeypatch.setattr(trainer, "peak_bytes", dies_at_step_4)
    cfg = cfg_of(base_model, tmp_path / "b", "method=bgpo", "steps=5", "temperature=1.0")
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    run_dir = tmp_path / "b" / full["run"]
    assert not (run_dir / "summary.json").exists()
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(trainer, "peak_bytes", real)
    run(cfg)
    assert metrics(run_dir) == expected


def test_lora_trains_only_adapters(base_model, tmp_path):
    """model.lora.enabled wraps the policy with peft: adapters move, base weights stay."""
    summary = run(cfg_of(base_model, tmp_path, "method=bgpo", "temperature=1.0", "model.lora.enabled=true",
                         "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0", "lr=1e-2"))
    state = torch.load(tmp_path / summary["run"] / "checkpoints" / "last.pt", weights_only=False)["model"]
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # B starts at zero: it moved
    base = micro_model(dtype=torch.float32).net.state_dict()
    frozen = [k for k in state if "base_layer.weight" in k]
    assert frozen
    for k in frozen:
        name = k.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(state[k], base[name]), k


def test_a_run_being_trained_elsewhere_is_skipped(base_model, tmp_path):
    """Two sweeps over the same runs never write the same files: the second skips a locked run."""
    from bgpo.results import run_dir_of, run_lock
    from bgpo.train import resolved_config

    cfg = cfg_of(base_model, tmp_path, "method=wd1")
    path = run_dir_of(resolved_config(cfg))  # the micro base's architecture, as run() records it
    with run_lock(path) as mine:
        assert mine
        assert run(cfg) == {"run": path.name, "skipped": "locked"}
        assert not (path / "metrics.jsonl").exists()
    assert run(cfg)["steps"] == 3  # once released, the run trains


def test_off_policy_minibatches_take_one_step_per_minibatch(base_model, tmp_path, monkeypatch):
    """BGPO §4's off-policy variant: a rollout batch of 4 prompts × G 3 split into 2 mini-batches —
    2 optimizer steps per RL step, each over 2 whole groups (6 responses), every response once, and
    θ_old statistics (computed once, on the rollout policy) present for both."""
    seen: list[tuple[int, torch.Tensor, bool]] = []
    n_steps = {"n": 0}
    real_backward, real_step = bgpo.update.method_backward, torch.optim.AdamW.step
    real_rollout = trainer.rollout
    full: list[torch.Tensor] = []

    def spy_rollout(*a, **k):
        ro = real_rollout(*a, **k)
        full.append(ro.batch.input_ids.clone())
        return ro

    def spy_backward(method, policy, batch, adv, prep, it, *rest):
        seen.append((n_steps["n"], batch.input_ids.clone(), prep.old is not None))
        return real_backward(method, policy, batch, adv, prep, it, *rest)

    def spy_step(self, *a, **k):
        n_steps["n"] += 1
        return real_step(self, *a, **k)

    monkeypatch.setattr(bgpo.update, "method_backward", spy_backward)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    monkeypatch.setattr(trainer, "rollout", spy_rollout)
    run(cfg_of(base_model, tmp_path, "method=bgpo", "minibatches=2", "prompts_per_step=4", "steps=2",
               "temperature=1.0", "skip_flat_groups=false"))  # whole mini-batches reach the method
    assert n_steps["n"] == 4  # 2 RL steps × 2 mini-batches
    by_step = [[ids for s, ids, _ in seen if s == k] for k in range(4)]
    assert all(len(parts) == 1 and parts[0].shape[0] == 6 for parts in by_step)
    for rl in range(2):  # the two mini-batches of one rollout batch are its two halves, in order
        assert torch.equal(torch.cat([by_step[2 * rl][0], by_step[2 * rl + 1][0]]), full[rl])
    assert all(old for _, _, old in seen)


@pytest.mark.parametrize("overrides,key", [(["method=bgpo", "inner_updates=2"], "inner_updates"),
                                           (["method=vrpo", "inner_updates=3"], "inner_updates"),
                                           (["method=diffu_grpo", "minibatches=2"], "minibatches"),
                                           (["method=wd1", "minibatches=2"], "minibatches"),
                                           (["method=bgpo", "minibatches=3"], "minibatches=3"),
                                           (["method=bgpo", "method.cfg.n_t=4"], "method.cfg.n_t")])
def test_bad_off_policy_combinations_fail_at_start_up(base_model, tmp_path, overrides, key):
    from bgpo.validate import validate_train

    with pytest.raises(ValueError, match=key):
        validate_train(cfg_of(base_model, tmp_path, *overrides))


def test_a_search_on_validation_never_evaluates_a_test_set(base_model, tmp_path, monkeypatch):
    """eval_test=false: only the validation set is evaluated (a settings search must not see test)."""
    sources: list[str] = []
    real = trainer.evaluate_on
    monkeypatch.setattr(trainer, "evaluate_on", lambda p, t, c, src, *a, **k: sources.append(src) or real(
        p, t, c, src, *a, **k))
    summary = run(cfg_of(base_model, tmp_path, "method=wd1", "eval_test=false"))
    assert set(sources) == {"val"} and summary["final"] == {}


@pytest.mark.parametrize("method,extra", [("bgpo", "mc=2"), ("vrpo", "minibatches=2")])
def test_skipping_flat_groups_leaves_the_gradient_unchanged(method, extra):
    """skip_flat_groups: the ELBO passes of prompt groups with equal rewards are skipped and the
    rest scaled by their share: the gradient of BGPO / VRPO-OL (β = 0) is the whole batch's, in
    float64, on- and off-policy (first mini-batch)."""
    from bgpo.elbo import Batch
    from bgpo.method import backward, informative, minibatch
    from tests.helpers import random_batch

    with initialize_config_module("bgpo.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"method={method}", extra])
    from bgpo.validate import build_method

    model = micro_model()
    m = build_method(cfg)(ref=None)
    assert m.flat_groups_free()
    batch: Batch = random_batch(model, n_prompts=4, G=3, L=6)
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.float64)  # groups 1, 3 flat
    adv = trainer.advantages(rewards, 3, True)
    mu = cfg.minibatches
    prep = m.prepare(model, batch, mu, torch.Generator().manual_seed(0))
    if mu > 1:
        batch, adv, prep = minibatch(batch, adv, prep, 0, mu)  # groups 0, 1: one flat

    def grad(*args):
        model.net.zero_grad(set_to_none=True)
        backward(m, model, *args)
        return torch.cat([p.grad.flatten() for p in model.net.parameters() if p.grad is not None])

    whole = grad(batch, adv, prep, 0)
    b, a, p, share = informative(batch, adv, prep)
    assert share == 0.5 and b.input_ids.shape[0] == batch.input_ids.shape[0] // 2
    assert torch.allclose(grad(b, a, p, 0, share), whole, rtol=1e-10, atol=1e-13) and whole.abs().max() > 0


def test_skipping_flat_groups_trains_the_same_run(base_model, tmp_path):
    """End to end: the same rewards and (to float rounding) the same parameters with and without."""
    runs = {}
    for skip in (True, False):
        summary = run(cfg_of(base_model, tmp_path / str(skip), "method=bgpo", "temperature=1.0",
                             f"skip_flat_groups={str(skip).lower()}", "group_size=2", "prompts_per_step=4"))
        rows = metrics(tmp_path / str(skip) / summary["run"])
        runs[skip] = (summary, [r.get("reward") for r in rows])
        assert any(r.get("frac_reward_zero_std", 0) > 0 for r in rows)  # there were groups to skip
    assert runs[True][1] == runs[False][1]
    fp = [s["param_fingerprints"][0] for s, _ in runs.values()]
    assert fp[0] == pytest.approx(fp[1], rel=1e-6)


def test_validation_may_use_the_fast_sampler_but_the_test_sets_never(base_model, tmp_path, monkeypatch):
    """``val_sampler.mode=cached`` decodes the validation problems with the KV-cached sampler (one
    token per step); the test sets stay on the reference sampler; the setting is part of the run
    key only when it is not the reference (run keys made before the key existed are unchanged)."""
    import bgpo.rollout
    from bgpo.config import to_container
    from bgpo.results import run_key

    modes = []
    real = bgpo.rollout.generate

    def spy(model, ids, mask, cfg, *a, **k):
        if cfg.steps == cfg.gen_length and cfg.temperature == 0.0:  # an evaluation's schedule
            modes.append(cfg.mode)
        return real(model, ids, mask, cfg, *a, **k)

    monkeypatch.setattr(bgpo.rollout, "generate", spy)
    cfg = cfg_of(base_model, tmp_path, "method=bgpo", "val_sampler.mode=cached", "eval_test=true")
    run(cfg)
    # validation (one batch): the base model, step 2 (eval_every=2) and the last step; the test sets
    # of the base and of the final policy (the best is the final or its own): the reference
    assert modes.count("cached") == 3 and modes.count("reference") >= 2
    assert set(modes) == {"cached", "reference"}
    assert modes[0] == "cached" and modes[-1] == "reference"
    default = cfg_of(base_model, tmp_path, "method=bgpo")
    ident = to_container(default)
    ident.pop("val_sampler")
    assert run_key(to_container(default)) == run_key(ident) != run_key(to_container(cfg))
