"""Every config composes; bad overrides fail at start-up naming the key (before a model is built)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from bgpo.config import register
from bgpo.validate import build_method, validate_train

register()
CONF = Path(__file__).resolve().parents[1] / "bgpo" / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def cfg_of(*overrides: str):
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_groups_are_complete():
    assert METHODS == ["bgpo", "coupled_grpo", "diffu_grpo", "espo", "just_grpo", "spg", "tracerl", "vrpo",
                       "wd1"]
    assert TASKS == ["countdown", "deepcoder", "gsm8k", "humaneval", "math", "math500", "mbpp", "sudoku"]
    assert MODELS == ["dream_7b", "llada_8b_instruct", "tiny"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("task", TASKS)
def test_every_method_task_composes_and_validates(method, task):
    # JustGRPO's and TraceRL's likelihoods are the sampler's only at temperature 1 (refused otherwise)
    cfg = cfg_of(f"method={method}", f"task={task}", "mc=3", "temperature=1.0")
    validate_train(cfg)
    assert build_method(cfg).keywords["cfg"].n_t == 3


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes(model):
    validate_train(cfg_of(f"model={model}"))


PRESETS = sorted(p.stem for p in (CONF.parents[1] / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_sweep_preset_job_composes_and_validates(preset):
    """Each job a preset launches (every combination of its sweeper params) is a valid run."""
    from bgpo.sweep import sweep_jobs  # what the sweep's Validate callback checks before launching

    with initialize_config_module("bgpo.conf", version_base="1.3"):
        jobs = sweep_jobs(compose("sweep", overrides=[f"+sweeps={preset}"], return_hydra_config=True))
        for job in jobs:
            validate_train(compose("sweep", overrides=job))
    assert len(jobs) > (0 if preset == "smoke" else 1) and all(f"+sweeps={preset}" in job for job in jobs)


def test_paper_main_takes_spec_full_scale_settings():
    cfg = cfg_of("+sweeps=paper_main", "task=countdown", "method=vrpo")
    assert (cfg.task.gen_length, cfg.task.block_length, cfg.task.diffusion_steps) == (256, 32, 128)
    assert (cfg.steps, cfg.mc, cfg.model.kind, cfg.parallel) == (560, 4, "llada", "fsdp")
    cfg = cfg_of("+sweeps=paper_main", "task=humaneval", "method=bgpo")
    assert (cfg.task.gen_length, cfg.task.diffusion_steps, cfg.steps, cfg.mc) == (512, 512, 560, 16)


def test_pretrain_config_composes():
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        cfg = compose("pretrain", overrides=["task=sudoku"])
    assert cfg.task.name == "sudoku" and cfg.steps is None and cfg.task.pretrain_steps > 0


BAD = [
    (["method=ppo"], "method"),
    (["mc=0"], "mc"),
    (["mc=abc"], "mc"),
    (["task=chess"], "task"),
    (["task.name=chess"], "task.name"),
    (["task.gen_length=30"], "task.gen_length"),
    (["task.diffusion_steps=3"], "task.diffusion_steps"),
    (["steps=-1"], "steps"),
    (["group_size=0"], "group_size"),
    (["model.kind=gpt"], "model.kind"),
    (["method.cfg.elbo.level=banana"], "elbo.level"),
    (["method.cfg.clip_eps=abc"], "method.cfg.clip_eps"),
    (["lr=0"], "lr"),
    (["mcc=4"], "mcc"),
    (["sampler.mode=fast"], "sampler.mode"),
    (["val_sampler.mode=fast"], "val_sampler.mode"),
    (["val_sampler.mode=cached", "val_sampler.cache=full"], "val_sampler.cache"),
    (["parallel=zero3"], "parallel"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[b[0][0] for b in BAD])
def test_bad_overrides_fail_naming_the_key(overrides, key):
    with pytest.raises((ValueError, ConfigCompositionException, ValidationError)) as err:
        validate_train(cfg_of(*overrides))
    assert key in str(err.value) + str(err.value.__cause__)


def test_tiny_presets_share_their_rl_settings():
    """Every tiny_* preset (and beyond_tiny) trains with the same settings, so that runs borrowed
    across them (bgpo/paper.py VARIED: the n_t = 16 row of Table 2, the "both" row of Table 3) are
    the same experiment, and every row of the tiny tables is comparable."""
    keys = ("steps", "prompts_per_step", "group_size", "temperature", "lr", "eval_every", "eval_n")
    names = [p for p in PRESETS if p.startswith("tiny_") or p == "beyond_tiny"]
    assert {"tiny_quick", "tiny_repro", "tiny_offpolicy", "tiny_mc", "tiny_bounds",
            "tiny_equal_memory"} <= set(names)
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        settings = {p: tuple(compose("sweep", overrides=[f"+sweeps={p}"])[k] for k in keys) for p in names}
        settings["main job"] = tuple(compose("train")[k] for k in keys)  # the presets share its settings
    assert len(set(settings.values())) == 1, settings


def test_minibatches_are_checked_against_the_processes_torchrun_starts(monkeypatch):
    """Under torchrun (WORLD_SIZE=2, shards unset) each process rolls out prompts_per_step / 2 prompts;
    off-policy mini-batches must divide THAT, at start-up (the dry run found this at 2 processes)."""
    cfg = cfg_of("method=bgpo", "prompts_per_step=2", "minibatches=2")
    validate_train(cfg)  # one process: 2 prompt groups, 2 mini-batches
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="minibatches=2 must divide"):
        validate_train(cfg)


def test_user_runs_stay_out_of_the_committed_store():
    """With the defaults, runs (and Hydra's folders) go to runs/, which git ignores; only presets
    that make committed results write into results/."""
    import subprocess

    cfg = cfg_of()
    assert cfg.results_dir == "runs"
    root = CONF.parents[1]
    probe = "runs/bgpo-countdown-mc8-s0-0123456789/summary.json"
    ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=root)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, "runs/ is not git-ignored"
    for preset in PRESETS:
        text = (root / "sweeps" / f"{preset}.yaml").read_text()
        assert "results_dir:" in text, f"sweeps/{preset}.yaml must name its results folder"
