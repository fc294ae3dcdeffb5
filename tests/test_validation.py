"""Bad settings are rejected before any model is built, naming the key (issue 15).

The table goes through ``bgpo.train.run`` in-process with every way of building a model patched to
fail the test; a handful of cases go through the real CLIs in subprocesses (exit code 2, one line
on stderr, no traceback); the sweep's pre-launch check rejects a bad data file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import bgpo.model
import bgpo.pretrain
import bgpo.trainer
from bgpo.config import ConfigError, ConfigWarning, register
from bgpo.evaluate import validate_evaluate
from bgpo.sweep import Report, Validate
from bgpo.train import run
from bgpo.validate import validate_pretrain
from tests.helpers import micro_model

register()
ROOT = Path(__file__).resolve().parents[1]
GRID = "1234341221434321"  # a valid 4x4 grid; its puzzle: the first 8 cells given
PUZZLE = GRID[:8] + "0" * 8
CD_OK = '{"input": "30,100,93", "output": "23"}\n'


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


def make_data(d: Path) -> Path:
    """Test files with one bad row each (the line the message must name is in the file name)."""
    (d / "cd_bad_int_at_3.jsonl").write_text(CD_OK * 2 + '{"input": "1,2,x", "output": "4"}\n' + CD_OK)
    (d / "cd_cut_at_2.jsonl").write_text(CD_OK + '{"input": "30,1')
    (d / "cd_blank_then_bad_at_4.jsonl").write_text(CD_OK + "\n\n" + '["not", "an", "object"]\n' + CD_OK)
    (d / "cd_no_output_at_2.jsonl").write_text(CD_OK + '{"input": "1,2,3"}\n')
    (d / "cd_empty.jsonl").write_text("\n")
    (d / "cd_latin1_at_2.jsonl").write_bytes(CD_OK.encode() + b'{"input": "1,2,3", "output": "\xe9"}\n')
    (d / "cd_good.jsonl").write_text(CD_OK * 3)
    good = f"{PUZZLE},{GRID}\n"
    (d / "sd_short_puzzle_at_3.csv").write_text("Puzzle,Solution\n" + good + f"{PUZZLE[:15]},{GRID}\n")
    (d / "sd_bad_solution_at_2.csv").write_text("Puzzle,Solution\n" + f"{PUZZLE},2134{GRID[4:]}\n" + good)
    (d / "sd_good.csv").write_text("Puzzle,Solution\n" + good * 3)
    return d


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything builds, loads or pretrains a model."""
    def built(*args, **kwargs):
        raise AssertionError("a model was built before the bad setting was rejected")

    for mod, name in ((bgpo.model, "load_dllm"), (bgpo.model, "build_tiny"), (bgpo.trainer, "load_dllm"),
                      (bgpo.trainer, "load_policy"), (bgpo.trainer, "train"), (bgpo.pretrain, "build_tiny"),
                      (bgpo.pretrain, "ensure_base_model"), (bgpo.pretrain, "_build")):
        monkeypatch.setattr(mod, name, built)


def compose_train(*overrides: str, config: str = "train"):
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        return compose(config, overrides=list(overrides))


# (overrides, what the message must contain). {d} is the folder of the data fixture.
BAD: list[tuple[list[str], str]] = [
    # issue 23: accepted and wrong, silently — unknown keys would enter the run key
    (["+foo=1"], "foo is not a setting"),
    (["+model.bar=2"], "model.bar is not a setting"),
    (["+logger.x=1"], "logger.x is not a setting"),
    (["+sampler.fast=true"], "sampler.fast is not a setting"),
    (["+task.bogus=1"], "task.bogus is not a setting"),
    (["+model.lora.rank=8"], "model.lora.rank is not a setting"),
    (["+method.zz=1"], "method.zz is not a setting"),
    (["+method.cfg.zz=1"], "unexpected keyword argument 'zz'"),
    (["+method.cfg.elbo.zz=1"], "unexpected keyword argument 'zz'"),
    (["+lrr=0.1"], "did you mean lr?"),
    # issue 23: the architecture keys against the base model that is really trained
    (["model.hidden=64"], "model.hidden=64, but the base model"),
    (["model.layers=2"], "model.layers=2, but the base model"),
    (["model.heads=2"], "model.heads=2, but the base model"),
    (["model.intermediate=256"], "model.intermediate=256, but the base model"),
    (["task=sudoku", "model.hidden=96"], "model.hidden=96, but the base model"),
    (["model=llada_8b_instruct", "model.hidden=64"], "applies to model.kind=tiny only"),
    (["model=dream_7b", "model.layers=2"], "applies to model.kind=tiny only"),
    (["model.mask_token_id=100"], "model.mask_token_id=100 is outside the vocabulary"),
    (["model.mask_token_id=126336"], "model.mask_token_id=126336 is outside the vocabulary"),
    # issue 23: seeds within torch's range, learning rates that do not wreck the weights
    (["seed=9223372036854775808"], "seed=9223372036854775808 must be <= 9223372036854775807"),
    (["seed=18446744073709551616"], "seed=18446744073709551616"),
    (["seed=2**64"], "seed"),
    (["lr=1e30"], "lr=1e+30"),
    (["lr=1.0"], "lr=1.0"),
    (["lr=5"], "lr=5"),
    # issue 24: a likelihood that is the sampler's only at temperature 1
    (["method=just_grpo", "temperature=0.6"], "temperature=0.6: JustGRPO's likelihood is the rollout"),
    (["method=tracerl", "temperature=0.9"], "temperature=0.9: TraceRL's likelihood"),
    (["method=just_grpo", "temperature=0"], "temperature=0.0: JustGRPO's likelihood"),
    # issue 23: devices and output folders
    (["device=meta"], "device='meta'"),
    (["device=xla"], "device='xla'"),
    (["device=cpu:0:1"], "device='cpu:0:1'"),
    (["results_dir={d}/cd_good.jsonl"], "results_dir={d}/cd_good.jsonl is a file"),
    (["results_dir={d}/cd_good.jsonl/sub"], "cannot be created: {d}/cd_good.jsonl is a file"),
    (["run_dir={d}/cd_good.jsonl"], "run_dir={d}/cd_good.jsonl is a file"),
    (["run_dir={d}/cd_good.jsonl/run"], "run_dir={d}/cd_good.jsonl/run cannot be created"),
    # issue 23: an estimator the method's objective is not defined with
    (["method.cfg.elbo.mode=one_step", "method.cfg.elbo.group_shared=false"],
     "elbo.mode='one_step' is not an estimator bgpo"),
    (["method.cfg.elbo.mode=ar", "method.cfg.elbo.group_shared=false"],
     "elbo.mode='ar' is not an estimator bgpo"),
    (["method.cfg.elbo.mode=trajectory", "method.cfg.elbo.group_shared=false"],
     "elbo.mode='trajectory' is not an estimator bgpo"),
    (["method=vrpo", "method.cfg.elbo.mode=one_step"], "group_shared=true applies to mode 'elbo' only"),
    (["method=vrpo", "method.cfg.elbo.mode=one_step", "method.cfg.elbo.group_shared=false"],
     "elbo.mode='one_step' is not an estimator vrpo"),
    (["method=diffu_grpo", "method.cfg.elbo.mode=elbo"], "elbo.mode='elbo' is not an estimator diffu_grpo"),
    (["method=wd1", "method.cfg.elbo.mode=block"], "elbo.mode='block' is not an estimator wd1"),
    (["method=just_grpo", "method.cfg.elbo.mode=elbo"], "elbo.mode='elbo' is not an estimator just_grpo"),
    (["method=tracerl", "method.cfg.elbo.mode=one_step"], "elbo.mode='one_step' is not an estimator tracerl"),
    (["method=coupled_grpo", "method.cfg.elbo.mode=ar"], "elbo.mode='ar' is not an estimator coupled_grpo"),
    # issue 21: the testbed's keys
    (["test_n=0"], "test_n=0"),
    (["method=diffu_grpo", "+method.cfg.elbo.group_shared=true"], "elbo.group_shared=true"),
    (["model.base=hub"], "model.base='hub'"),
    (["task.sft_near_miss=-0.1"], "task.sft_near_miss=-0.1"),
    # issue 15, "silently wrong, exit 0"
    (["grad_clip=-1"], "grad_clip=-1.0"),
    (["grad_clip=0"], "grad_clip=0.0"),
    (["group_size=1"], "group_size=1"),
    (["lr=inf"], "lr=inf"),
    (["temperature=nan"], "temperature=nan"),
    (["method.cfg.mc_chunk=-1"], "method.cfg.mc_chunk=-1"),
    (["method.cfg.clip_eps=-0.2"], "method.cfg.clip_eps=-0.2"),
    (["method.cfg.beta=-0.1"], "method.cfg.beta=-0.1"),
    (["method=diffu_grpo", "method.cfg.clip_eps=-0.5"], "method.cfg.clip_eps=-0.5"),
    (["method=diffu_grpo", "method.cfg.beta=-0.04"], "method.cfg.beta=-0.04"),
    (["mc=2", "method.cfg.n_t=4"], "method.cfg.n_t=4"),
    # issue 15, "rejected late"
    (["task.test_file={d}/missing.jsonl"], "task.test_file='{d}/missing.jsonl': no such file"),
    (["task.test_file={d}/cd_bad_int_at_3.jsonl"], "{d}/cd_bad_int_at_3.jsonl:3"),
    (["method.cfg.mc_chunk=0"], "method.cfg.mc_chunk=0"),
    (["adam_beta2=2"], "adam_beta2=2.0"),
    (["lr=nan"], "lr=nan"),
    (["task.n_test=0"], "task.n_test=0"),
    # learning rate, optimizer, clipping
    (["lr=0"], "lr=0.0"),
    (["lr=-1e-4"], "lr=-0.0001"),
    (["lr=-inf"], "lr=-inf"),
    (["adam_beta2=1.0"], "adam_beta2=1.0"),
    (["adam_beta2=-0.5"], "adam_beta2=-0.5"),
    (["adam_beta2=nan"], "adam_beta2=nan"),
    (["weight_decay=-0.01"], "weight_decay=-0.01"),
    (["weight_decay=nan"], "weight_decay=nan"),
    (["weight_decay=inf"], "weight_decay=inf"),
    (["weight_decay=2e4"], "lr·weight_decay must be < 1"),
    (["grad_clip=inf"], "grad_clip=inf"),
    (["grad_clip=nan"], "grad_clip=nan"),
    (["warmup_steps=-1"], "warmup_steps=-1"),
    # sampling and groups
    (["temperature=-0.5"], "temperature=-0.5"),
    (["temperature=inf"], "temperature=inf"),
    (["group_size=0"], "group_size=0"),
    (["method=wd1", "group_size=1"], "group_size=1"),
    (["prompts_per_step=0"], "prompts_per_step=0"),
    (["mc=0"], "mc=0"),
    (["mc=-3"], "mc=-3"),
    (["seed=-1"], "seed=-1"),
    # cadence and updates
    (["steps=0"], "steps=0"),
    (["steps=-1"], "steps=-1"),
    (["eval_every=-1"], "eval_every=-1"),
    (["eval_n=0"], "eval_n=0"),
    (["ckpt_every=0"], "ckpt_every=0"),
    (["ckpt_every=-5"], "ckpt_every=-5"),
    (["minibatches=0"], "minibatches=0"),
    (["inner_updates=0"], "inner_updates=0"),
    (["minibatches=3"], "minibatches=3"),
    (["inner_updates=2"], "inner_updates=2"),
    (["method=wd1", "minibatches=2"], "minibatches=2"),
    (["shards=0"], "shards=0"),
    (["shards=3"], "shards=3"),
    (["parallel=zero3"], "parallel='zero3'"),
    (["device=gpu"], "device='gpu'"),
    (["results_dir="], "results_dir"),
    (["threads=-1"], "threads=-1"),
    # sampler keys
    (["sampler.mode=fast"], "sampler.mode='fast'"),
    (["sampler.threshold=1.5"], "sampler.threshold=1.5"),
    (["sampler.threshold=nan"], "sampler.threshold=nan"),
    (["sampler.cache=full"], "sampler.cache='full'"),
    # task keys and data files
    (["task.name=chess"], "task.name='chess'"),
    (["task.format=chat"], "task.format='chat'"),
    (["task.gen_length=30"], "task.gen_length=30"),
    (["task.block_length=0"], "task.block_length=0"),
    (["task.diffusion_steps=3"], "task.diffusion_steps=3"),
    (["task.n_test=-1"], "task.n_test=-1"),
    (["task.pretrain_steps=0"], "task.pretrain_steps=0"),
    (["+task.options.bogus=1"], "task.options.bogus"),
    (["task=gsm8k", "+task.options.train_file={d}/missing.jsonl"], "task.options.train_file"),
    (["task=math500", "task.test_file={d}/cd_good.jsonl"], "task.test_file"),
    (["task.test_file={d}"], "task.test_file"),
    (["task.test_file={d}/cd_cut_at_2.jsonl"], "{d}/cd_cut_at_2.jsonl:2"),
    (["task.test_file={d}/cd_blank_then_bad_at_4.jsonl"], "{d}/cd_blank_then_bad_at_4.jsonl:4"),
    (["task.test_file={d}/cd_no_output_at_2.jsonl"], "{d}/cd_no_output_at_2.jsonl:2"),
    (["task.test_file={d}/cd_latin1_at_2.jsonl"], "{d}/cd_latin1_at_2.jsonl:2"),
    (["task.test_file={d}/cd_empty.jsonl"], "no rows"),
    (["task=sudoku", "task.test_file={d}/sd_short_puzzle_at_3.csv"], "{d}/sd_short_puzzle_at_3.csv:3"),
    (["task=sudoku", "task.test_file={d}/sd_bad_solution_at_2.csv"], "{d}/sd_bad_solution_at_2.csv:2"),
    (["task=sudoku", "task.test_file={d}/sd_good.csv", "task.n_test=5"], "task.n_test=5"),
    # model keys
    (["model.kind=gpt"], "model.kind='gpt'"),
    (["model.dtype=int8"], "model.dtype='int8'"),
    (["model.path={d}/no-such-model"], "model.path={d}/no-such-model"),
    (["model.path={d}"], "model.path={d}: no weights"),
    (["model.kind=llada"], "model.path"),
    (["model=llada_8b_instruct", "model.path=./no/such/llada"], "model.path=./no/such/llada"),
    (["model.mask_token_id=-1"], "model.mask_token_id=-1"),
    (["model.hidden=0"], "model.hidden=0"),
    (["model.heads=5"], "model.heads=5"),
    (["model.lora.enabled=true", "model.lora.r=0"], "model.lora.r=0"),
    (["model.lora.enabled=true", "model.lora.dropout=1.5"], "model.lora.dropout=1.5"),
    (["model.lora.enabled=true", "model.lora.alpha=0"], "model.lora.alpha=0"),
    # method keys
    (["method=bogus"], "method/bogus"),
    (["method.cfg.mc_chunk=2.5"], "method.cfg.mc_chunk"),
    (["method.cfg.clip_eps=nan"], "method.cfg.clip_eps=nan"),
    (["method.cfg.beta=inf"], "method.cfg.beta=inf"),
    (["method.cfg.dual_clip=0.5"], "method.cfg.dual_clip=0.5"),
    (["method.cfg.bound=upper"], "method.cfg.bound='upper'"),
    (["method.cfg.elbo.level=banana"], "elbo.level='banana'"),
    (["method.cfg.elbo.p_prompt=1.0"], "elbo.p_prompt=1.0"),
    (["method=wd1", "method.cfg.psi=0"], "method.cfg.psi=0"),
    (["method=vrpo", "method.cfg.mc_chunk=-2"], "method.cfg.mc_chunk=-2"),
]


def test_the_table_is_large_and_covers_the_issue():
    assert len(BAD) >= 60
    quoted = ["grad_clip=-1", "grad_clip=0", "group_size=1", "lr=inf", "temperature=nan",
              "method.cfg.mc_chunk=-1", "method.cfg.clip_eps=-0.2", "method.cfg.beta=-0.1",
              "method.cfg.n_t=4", "method.cfg.mc_chunk=0", "adam_beta2=2", "lr=nan", "task.n_test=0"]
    flat = [o for overrides, _ in BAD for o in overrides]
    assert all(q in flat for q in quoted)


@pytest.mark.parametrize("validate_only", [False, True], ids=["start", "validate_only"])
@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_setting_is_rejected_before_any_model(overrides, key, validate_only, data, no_model, tmp_path):
    """A real start and ``validate_only=true`` reject every bad setting with the same sentence."""
    from hydra.errors import ConfigCompositionException

    overrides = [o.format(d=data) for o in overrides]
    try:
        cfg = compose_train(f"results_dir={tmp_path / 'results'}", f"validate_only={validate_only}",
                            *overrides)
    except ConfigCompositionException as e:  # Hydra's own check (unknown group option or key)
        assert key.format(d=data) in str(e) + str(e.__cause__)
        return
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert key.format(d=data) in str(err.value)
    assert "\n" not in str(err.value)  # one sentence
    assert not (tmp_path / "results").exists()  # no run folder was opened


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("validate_only", [False, True])
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_a_device_this_machine_lacks_is_rejected_before_any_model(device, validate_only, no_model, tmp_path):
    cfg = compose_train(f"results_dir={tmp_path}", f"device={device}", f"validate_only={validate_only}")
    with pytest.raises(ConfigError, match=f"device={device}: no CUDA device on this machine"):
        run(cfg)
    with pytest.raises(ConfigError, match="no CUDA device"):
        validate_pretrain(compose_train(f"device={device}", config="pretrain"))


def test_a_slurm_sweep_checks_the_device_on_its_node_not_here(no_model):
    """The login node that launches a Slurm sweep has no GPU; a local sweep runs here."""
    from omegaconf import open_dict

    with initialize_config_module("bgpo.conf", version_base="1.3"):
        config = compose("sweep", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        with open_dict(config):
            config.hydra.overrides.task = ["device=cuda"]
        Validate().on_multirun_start(config)  # no exit: checked on the node
        local = compose("sweep", return_hydra_config=True)
        with open_dict(local):
            local.hydra.overrides.task = ["device=cuda"]
        if not torch.cuda.is_available():
            with pytest.raises(SystemExit):
                Validate().on_multirun_start(local)


def test_default_architecture_keys_take_the_base_model_s(no_model, tmp_path):
    """A tiny run from a folder whose architecture differs from the defaults records the folder's."""
    base = tmp_path / "micro"
    micro_model(dtype=torch.float32).save(base)
    cfg = compose_train(f"results_dir={tmp_path / 'r'}", f"model.path={base}", "validate_only=true",
                        "task.name=toy", "task.gen_length=8", "task.block_length=4", "task.diffusion_steps=4")
    conf = json.loads((base / "config.json").read_text())
    import tests.toy_task  # noqa: F401  (registers the toy task)

    run(cfg)
    assert cfg.model.hidden == conf["hidden_size"] != 192 and cfg.model.layers == conf["num_hidden_layers"]
    bad = compose_train(f"results_dir={tmp_path / 'r'}", f"model.path={base}", "model.hidden=64",
                        "task.name=toy", "task.gen_length=8", "task.block_length=4", "task.diffusion_steps=4")
    with pytest.raises(ConfigError, match="model.hidden=64, but the base model"):
        run(bad)


def test_greedy_rollouts_warn(no_model, tmp_path):
    cfg = compose_train(f"results_dir={tmp_path}", "temperature=0", "validate_only=true")
    with pytest.warns(ConfigWarning, match="temperature=0"):
        assert run(cfg)["ok"]


PRETRAIN_BAD = [("+foo=1", "foo is not a setting"), ("+model.bar=1", "model.bar is not a setting"),
                ("seed=9223372036854775808", "seed=9223372036854775808"), ("lr=2", "lr=2"),
                ("out=/etc/hostname", "out=/etc/hostname is a file"),
                ("out=/etc/hostname/x", "cannot be created: /etc/hostname is a file"),
                ("model.mask_token_id=100", "model.mask_token_id=100 is outside"),
                ("device=meta", "device='meta'"),
                ("steps=0", "steps=0"), ("batch_size=0", "batch_size=0"), ("lr=nan", "lr=nan"),
                ("level=banana", "level='banana'"), ("n_train=0", "n_train=0"), ("eval_n=0", "eval_n=0"),
                ("model.hidden=30", "model.heads=4"), ("task.gen_length=30", "task.gen_length=30"),
                ("device=tpu0", "device='tpu0'"), ("task.sft_near_miss=1.5", "task.sft_near_miss=1.5"),
                ("model.base=hub", "model.base='hub'")]


@pytest.mark.parametrize("override,key", PRETRAIN_BAD, ids=[b[0] for b in PRETRAIN_BAD])
def test_bad_pretrain_setting(override, key):
    with pytest.raises(ConfigError, match=key):
        validate_pretrain(compose_train(override, config="pretrain"))


def test_ship_writes_the_repository_s_model_folder_and_takes_no_out():
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        cfg = compose("pretrain", overrides=["ship=true", "out=/tmp/elsewhere"])
    with pytest.raises(ConfigError, match="ship=true writes bgpo/base_models/tiny-countdown: drop out="):
        validate_pretrain(cfg)


EVALUATE_BAD = [("n=0", "n=0"), ("batch_size=0", "batch_size=0"), ("steps=3", "steps=3"),
                ("temperature=nan", "temperature=nan"), ("data=d2", "data='d2'"),
                ("task=gsm8k", "gsm8k"), ("checkpoint={d}/nothing.pt", "checkpoint={d}/nothing.pt"),
                ("base={d}/nothing", "base={d}/nothing"),
                ("task.test_file={d}/cd_cut_at_2.jsonl", "{d}/cd_cut_at_2.jsonl:2")]


@pytest.mark.parametrize("override,key", EVALUATE_BAD, ids=[b[0] for b in EVALUATE_BAD])
def test_bad_evaluate_setting(override, key, data):
    cfg = compose_train(f"checkpoint={data}", override.format(d=data), config="evaluate")
    with pytest.raises(ConfigError, match=key.format(d=data)):
        validate_evaluate(cfg)


# one sweep override each (a list in a sweep value is a job each); what the message must contain
SWEEP_BAD = [("seed=0,18446744073709551616", "seed=18446744073709551616"), ("mc=2,0", "mc=0"),
             ("lr=1e-5,1e30", "lr=1e+30"), ("model.hidden=192,64", "model.hidden=64, but the base model"),
             ("+foo=1,2", "foo is not a setting"), ("group_size=4,1", "group_size=1"),
             ("method=bgpo,vrpo method.cfg.elbo.mode=one_step", "one_step"),
             ("device=cpu,meta", "device='meta'"), ("results_dir={d}/cd_good.jsonl", "is a file"),
             ("task.test_file={d}/cd_good.jsonl,{d}/cd_bad_int_at_3.jsonl", "cd_bad_int_at_3.jsonl:3")]


def validate_sweep(overrides: str) -> None:
    """The sweep's pre-launch check on ``-m <overrides>``: ConfigError-free, or SystemExit(2) with
    the bad job named on stderr."""
    from omegaconf import open_dict

    with initialize_config_module("bgpo.conf", version_base="1.3"):
        config = compose("sweep", return_hydra_config=True)
        with open_dict(config):  # what `-m key=a,b` puts there
            config.hydra.overrides.task = overrides.split()
        Validate().on_multirun_start(config)


@pytest.mark.parametrize("overrides,key", SWEEP_BAD, ids=[b[0] for b in SWEEP_BAD])
def test_bad_sweep_job_launches_nothing(overrides, key, data, no_model, capsys):
    with pytest.raises(SystemExit) as exit_:
        validate_sweep(overrides.format(d=data))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "nothing launched" in err and key.format(d=data) in err and "Traceback" not in err


def test_sweep_pre_launch_check_rejects_a_bad_data_file(data, no_model, capsys):
    """One job of the sweep has a test file with a bad row: nothing is launched, the row is named."""
    from omegaconf import open_dict

    bad = data / "cd_bad_int_at_3.jsonl"
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        config = compose("sweep", return_hydra_config=True)
        with open_dict(config):  # what `-m task.test_file=good,bad` puts there
            config.hydra.overrides.task = [f"task.test_file={data / 'cd_good.jsonl'},{bad}"]
        with pytest.raises(SystemExit) as exit_:
            Validate().on_multirun_start(config)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "nothing launched" in err and f"{bad}:3" in err


def test_sweep_report_lists_failed_runs_and_exits_1(tmp_path, caplog):
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "failed.json").write_text(json.dumps({"step": 7, "reason": "non-finite loss (nan)"}))
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        config = compose("sweep", overrides=[f"results_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_:
        Report().on_multirun_end(config)
    assert exit_.value.code == 1
    assert "r1: step 7: non-finite loss (nan)" in caplog.text


# ---- the real command lines (a handful: each starts Python) ----------------------------------
def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BGPO_TASK_MODULES": "tests.toy_task",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL)


def run_folders(results_dir: Path) -> list[Path]:
    """Run folders (Hydra's own ``.hydra`` folder is not one)."""
    return [p for p in results_dir.iterdir() if not p.name.startswith(".")] if results_dir.exists() else []


def assert_one_sentence(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert all(n in lines[0] for n in needles), lines[0]


def test_cli_train_bad_value_is_one_sentence_exit_2(tmp_path):
    assert_one_sentence(cli("bgpo.train", "lr=nan", f"results_dir={tmp_path}"), "[bgpo.train]", "lr=nan")
    assert not run_folders(tmp_path)


def test_cli_train_unknown_key_is_hydras_message_without_traceback(tmp_path):
    proc = cli("bgpo.train", "mcc=4", f"results_dir={tmp_path}")
    assert proc.returncode != 0 and "mcc" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_cli_sweep_bad_data_file_exit_2(data, tmp_path):
    bad = data / "sd_short_puzzle_at_3.csv"
    proc = cli("bgpo.sweep", "-m", "task=sudoku", f"task.test_file={data / 'sd_good.csv'},{bad}",
               f"results_dir={tmp_path}")
    assert_one_sentence(proc, "nothing launched", f"{bad}:3")
    assert not run_folders(tmp_path)


def test_cli_evaluate_bad_checkpoint_exit_2(tmp_path):
    assert_one_sentence(cli("bgpo.evaluate", f"checkpoint={tmp_path / 'none.pt'}"), "[bgpo.evaluate]",
                        "checkpoint=")


def test_cli_validate_only_prints_the_run_folder(tmp_path):
    base = tmp_path / "micro"
    micro_model(dtype=torch.float32).save(base)
    proc = cli("bgpo.train", "validate_only=true", f"model.path={base}", f"results_dir={tmp_path / 'r'}",
               "task.name=toy", "task.gen_length=8", "task.block_length=4", "task.diffusion_steps=4", "mc=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if "ok: run folder" in x)  # a log line (Hydra's format)
    assert f"{tmp_path / 'r'}/bgpo-toy-mc2-s0-" in line and line.endswith("(new)")
    assert not run_folders(tmp_path / "r") and "Loading weights" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("method", ["bgpo", "vrpo", "diffu_grpo", "espo", "coupled_grpo", "tracerl"])
def test_a_kl_term_without_a_reference_is_one_sentence(method):
    """Built from Python with beta > 0 and no reference model: a ValueError naming method.cfg.beta at
    construction, not an AttributeError from the estimator at the first update (issue 24)."""
    from hydra.utils import instantiate

    cfg = compose_train(f"method={method}", "method.cfg.beta=0.05", "temperature=1.0")
    make = instantiate(cfg.method)
    with pytest.raises(ValueError, match="method.cfg.beta=0.05 needs a frozen reference model"):
        make(ref=None)
    assert make(ref=object()).ref is not None


def test_the_bad_settings_document_lists_every_probe(tmp_path):
    """docs/bad_settings.md (the README's table, `python -m tests.bad_settings`) is current: one row
    per probe of the tables here and of the broken files, each rejected, none accepted, no traceback."""
    import re

    from tests.bad_settings import DOC, probes

    (tmp_path / "data").mkdir()
    expected = [(entry, command) for entry, command, _ in probes(tmp_path)]
    rows = [line.split(" | ") for line in DOC.read_text().splitlines() if re.match(r"\| \d+ \| ", line)]
    listed = [(r[1], r[2].strip("`")) for r in rows]
    assert listed == expected, "docs/bad_settings.md is stale: run python -m tests.bad_settings"
    assert len(rows) >= 180
    assert {r[3] for r in rows} <= {"rejected", "hydra"}, "a probe was accepted or ended in a traceback"


def test_the_sweep_says_what_each_job_will_do_before_it_launches(no_model, caplog):
    """The pre-launch plan (issue 26): each job's run folder and state, and a time estimated from
    the committed runs; nothing built."""
    import logging

    from omegaconf import open_dict

    caplog.set_level(logging.INFO, logger="bgpo.sweep")
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        config = compose("sweep", overrides=["+sweeps=tiny_quick"], return_hydra_config=True)
        with open_dict(config):  # what `-m +sweeps=tiny_quick seed=0,3` puts there
            config.hydra.overrides.task = ["+sweeps=tiny_quick", "seed=0,3"]
        Validate().on_multirun_start(config)
    text = caplog.text
    assert "plan: 4 jobs, 2 to train, 2 complete (skipped)" in text
    assert "bgpo-countdown-mc16-s0-" in text and "(complete)" in text
    assert "(new, ~" in text and "min of one thread (median of" in text
