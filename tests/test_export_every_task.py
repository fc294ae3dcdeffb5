"""Export -> evaluate for every paper task (issue 25, item 4).

- ``python -m bgpo.evaluate task=math`` / ``task=deepcoder`` resolve ``${bgpo_data:...}`` (the
  resolver is registered by ``bgpo.evaluate`` itself, not only by the train entry points);
- an export records its task protocol (format, lengths, shots, n_test, numeric options) and
  ``bgpo.evaluate`` scores it under that protocol — reproducing the run's own ``eval_test.json`` —
  unless a ``task.<key>`` is given explicitly (which wins, with a warning);
- an exported LLaDA / Dream folder loads with transformers alone (the suite's modeling code is
  shipped beside config.json's ``auto_map``), in a fresh process where ``import bgpo`` fails.

Micro runs of one RL step on Countdown, Sudoku, math (MATH + GSM8K train, GSM8K / MATH500 test)
and deepcoder (HumanEval / MBPP test, scored in the sandbox), every file local: ``$BGPO_DATA`` is
tests/fixtures/tasks. The LLaDA / Dream checks read the golden fixtures in ../shared/fixtures
(skipped, with the reason, where that folder is absent).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from safetensors.torch import load_file, save_file

from bgpo import evaluate
from bgpo.export import ExportConfig, export
from bgpo.model import load_dllm
from bgpo.train import run
from tests.helpers import micro_model

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "tests" / "fixtures" / "tasks"
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
NATIVE = {"llada": ("llada_tiny", 336, "modeling_llada.py"),
          "dream": ("dream_tiny", 466, "modeling_dream.py")}  # fixture folder, its mask id, the shipped file
TASKS = ["countdown", "sudoku", "math", "deepcoder"]
TRAINED = {"gen_length": 8, "block_length": 4, "diffusion_steps": 4}
"""the runs' lengths: none is a task YAML's, so an evaluation under the YAML's would show"""
SETS = {"countdown": ["bgpo_countdown"], "sudoku": ["bgpo_sudoku"],
        "math": ["bgpo_math_gsm8k", "bgpo_math_math500"], "deepcoder": ["bgpo_deepcoder_humaneval",
                                                                       "bgpo_deepcoder_mbpp"]}


@pytest.fixture(scope="module", autouse=True)
def local_data():
    """The files the suite cannot ship, from tests/fixtures/tasks (never the hub)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BGPO_DATA", str(DATA))
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "micro"
    micro_model(dtype=torch.float32).save(path)
    return path


def train_cfg(base: Path, results: Path, task: str, *extra: str):
    options = ["task.options.n_val=1"] if task in ("math", "deepcoder") else []
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        return compose("train", overrides=[
            f"task={task}", f"model.path={base}", f"results_dir={results}", "method=bgpo", "steps=1",
            "prompts_per_step=1", "group_size=2", "mc=1", "lr=1e-3", "temperature=1.0", "eval_n=1",
            "eval_every=0", "ckpt_every=1", "progress=false", "test_n=2",
            *(f"task.{k}={v}" for k, v in TRAINED.items()), *options, *extra])


@pytest.fixture(scope="module")
def exported(base_model, tmp_path_factory):
    """``exported(task)``: (run folder, export folder) of a one-step micro run on ``task`` (cached)."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(task: str) -> tuple[Path, Path]:
        if task not in done:
            root = tmp_path_factory.mktemp(task)
            run_dir = root / run(train_cfg(base_model, root, task))["run"]
            done[task] = run_dir, export(ExportConfig(run_dir=str(run_dir), out=str(root / "export")))
        return done[task]

    return get


def evaluate_cfg(folder: Path, task: str, *extra: str, hydra: bool = False):
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        return compose("evaluate", overrides=[f"checkpoint={folder}", f"task={task}", "n=2", "device=cpu",
                                              *extra], return_hydra_config=hydra)


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BGPO_DATA": str(DATA), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=900)


# ---- the resolver ------------------------------------------------------------------------------------
def test_evaluate_alone_resolves_every_task_config():
    """A fresh process that imports bgpo.evaluate and nothing else composes every task's config
    (before the fix: "Unsupported interpolation type bgpo_data" for math and deepcoder)."""
    code = textwrap.dedent("""
        import sys
        from hydra import compose, initialize_config_module
        from omegaconf import OmegaConf
        import bgpo.evaluate
        assert "bgpo.train" not in sys.modules
        for task in ("countdown", "sudoku", "math", "deepcoder", "gsm8k", "math500", "humaneval", "mbpp"):
            with initialize_config_module("bgpo.conf", version_base="1.3"):
                cfg = compose("evaluate", overrides=["checkpoint=x", f"task={task}"])
            resolved = OmegaConf.to_container(cfg, resolve=True)
            if task == "deepcoder":
                print(resolved["task"]["eval_tasks"]["humaneval"]["test_file"])
    """)
    p = cli("-c", code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(DATA / "humaneval.jsonl")


# ---- export -> evaluate, every task ------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_export_then_evaluate_reproduces_the_runs_test_scores(task, exported, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bgpo.evaluate")
    run_dir, out = exported(task)
    settings = json.loads((out / "bgpo_export.json").read_text())
    run_task = yaml.safe_load((run_dir / "config.yaml").read_text())["task"]
    assert settings["task"] == task and settings["protocol"] == {
        "format": run_task["format"], **TRAINED, "shots": 0, "n_test": None,
        "options": {k: v for k, v in run_task["options"].items() if isinstance(v, (bool, int, float))}}
    if task in ("math", "deepcoder"):
        assert settings["protocol"]["format"] == "d1" and settings["protocol"]["options"] == {"n_val": 1}
    res = evaluate.run(evaluate_cfg(out, task, f"out={tmp_path}"))  # the YAML's lengths are NOT the run's
    entries = res["sets"] if len(SETS[task]) > 1 else {SETS[task][0]: res}
    assert sorted(entries) == sorted(SETS[task])
    tests = json.loads((run_dir / "eval_test.json").read_text())["final"]  # the run's own test evaluation
    for key, entry in entries.items():
        source = key.split("_")[-1] if len(SETS[task]) > 1 else "own"
        assert entry["sampler"]["gen_length"] == 8 and entry["sampler"]["block_length"] == 4
        assert entry["format"] == run_task["format"] and entry["n"] == tests[source]["n"] == 2
        assert entry["accuracy"] == tests[source]["accuracy"]
        assert entry["reward"] == pytest.approx(tests[source]["reward"], abs=1e-9)
        assert entry["protocol"]["applied"]["gen_length"] == 8 and entry["protocol"]["overridden"] == {}
    assert sorted(json.loads((tmp_path / "eval.json").read_text())) == sorted(SETS[task])
    assert f"task {task} under the trained protocol from {out / 'bgpo_export.json'}: format=" in caplog.text


def test_an_explicit_task_key_wins_and_is_reported(exported, tmp_path, caplog):
    _, out = exported("countdown")
    cfg = evaluate_cfg(out, "countdown", "task.gen_length=4", "task.block_length=4", f"out={tmp_path}",
                       hydra=True)  # a command line: Hydra's override list names the keys
    entry = evaluate.run(cfg)
    assert entry["sampler"]["gen_length"] == 4  # block_length=4 is the run's own: nothing to override
    assert entry["protocol"]["overridden"] == {"gen_length": {"trained": 8, "used": 4}}
    assert entry["protocol"]["applied"]["diffusion_steps"] == 4  # the other keys stay the run's
    assert "task.gen_length=4 given explicitly overrides the trained gen_length=8" in caplog.text
    # without Hydra's override list, a value other than the YAML's is explicit too
    entry = evaluate.run(evaluate_cfg(out, "countdown", "task.gen_length=4", "task.block_length=2",
                                      f"out={tmp_path}"))
    assert (entry["sampler"]["gen_length"], entry["sampler"]["block_length"]) == (4, 2)
    # an export made before exports recorded their protocol: said, and the YAML's lengths are used
    old = tmp_path / "old"
    old.mkdir()
    for f in out.iterdir():
        (old / f.name).symlink_to(f)
    (old / "bgpo_export.json").unlink()
    settings = json.loads((out / "bgpo_export.json").read_text())
    del settings["protocol"]
    (old / "bgpo_export.json").write_text(json.dumps(settings))
    entry = evaluate.run(evaluate_cfg(old, "countdown", f"out={tmp_path}"))
    assert entry["sampler"]["gen_length"] == 16 and "protocol" not in entry
    assert f"{old / 'bgpo_export.json'} records no task protocol" in caplog.text


def test_evaluate_command_line_on_a_math_export(exported, tmp_path):
    """``python -m bgpo.evaluate checkpoint=<export> task=math``, as a user types it (the reported
    failure), with an explicit override on the command line."""
    _, out = exported("math")
    p = cli("-m", "bgpo.evaluate", f"checkpoint={out}", "task=math", "n=1", "device=cpu", f"out={tmp_path}",
            "task.gen_length=4", env={"BGPO_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr
    assert "Unsupported interpolation" not in p.stderr
    assert "task.gen_length=4 given explicitly overrides the trained gen_length=8" in p.stdout + p.stderr
    stored = json.loads((tmp_path / "eval.json").read_text())
    assert sorted(stored) == ["bgpo_math_gsm8k", "bgpo_math_math500"]
    assert all(e["sampler"]["gen_length"] == 4 and e["n"] == 1 and e["format"] == "d1"
               for e in stored.values())


# ---- LLaDA / Dream: transformers alone ---------------------------------------------------------------
BLOCK_BGPO = """
import sys
class _NoSuite:  # the suite is installed here: make sure nothing of it is imported
    def find_spec(self, name, path=None, target=None):
        if name == "bgpo" or name.startswith("bgpo."):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, _NoSuite())
"""

LOAD_ALONE = BLOCK_BGPO + """
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer
folder, io = sys.argv[1], sys.argv[2]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # else it asks (auto_map)
x = load_file(io + "/inputs.safetensors")
with torch.no_grad():
    out = {"plain": model(input_ids=x["input_ids"]).logits,
           "masked": model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits}
save_file(out, io + "/alone.safetensors")
assert not [m for m in sys.modules if m == "bgpo" or m.startswith("bgpo.")]
print("LOADED", type(model).__module__, type(model).__name__, type(config).__name__, len(tokenizer))
"""


def fixture_folder(kind: str) -> Path:
    path = FIXTURES / NATIVE[kind][0]
    if not (path / "config.json").is_file():
        pytest.skip(f"model fixture {path} not found (the project's shared/fixtures folder)")
    return path


@pytest.mark.parametrize("kind", list(NATIVE))
def test_native_export_loads_with_transformers_alone(kind, tmp_path):
    base, mask_id, modeling = fixture_folder(kind), NATIVE[kind][1], NATIVE[kind][2]
    cfg = train_cfg(base, tmp_path, "countdown", f"model.kind={kind}", f"model.mask_token_id={mask_id}",
                    "test_n=1", "eval_test=false")
    run_dir = tmp_path / run(cfg)["run"]
    out = export(ExportConfig(run_dir=str(run_dir), out=str(tmp_path / "export")))
    assert {modeling, "layers.py", "config.json", "model.safetensors", "README.md"} <= {
        p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    stem = modeling[: -len(".py")]
    cls, config_cls = {"llada": ("LLaDAModelLM", "LLaDAConfig"), "dream": ("DreamModel", "DreamConfig")}[kind]
    assert config["auto_map"]["AutoModel"] == f"{stem}.{cls}"
    assert config["auto_map"]["AutoConfig"] == f"{stem}.{config_cls}"
    assert json.loads((out / "bgpo_export.json").read_text())["modeling_code"] == [modeling, "layers.py"]
    card = (out / "README.md").read_text()
    assert 'AutoModel.from_pretrained("<this folder>", trust_remote_code=True)' in card and modeling in card
    g = load_file(base / "golden.safetensors")
    (io := tmp_path / "io").mkdir()
    save_file({"input_ids": g["input_ids"], "attention_mask": g["attention_mask"]}, io / "inputs.safetensors")
    p = cli("-c", LOAD_ALONE, str(out), str(io), cwd=tmp_path,
            env={"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONPATH": ""})
    assert p.returncode == 0, p.stderr
    assert "Do you wish to run the custom code" not in p.stdout and "model of type" not in p.stderr, p.stdout
    module, name = next(line for line in p.stdout.splitlines() if line.startswith("LOADED")).split()[1:3]
    assert module.startswith("transformers_modules.") and module.endswith(f".{stem}") and name == cls
    alone = load_file(io / "alone.safetensors")
    suite = load_dllm(kind, out, mask_token_id=mask_id)  # the suite's own loader: the same network
    suite.net.eval()
    with torch.no_grad():
        plain = suite.net(input_ids=g["input_ids"]).logits
        masked = suite.net(input_ids=g["input_ids"], attention_mask=g["attention_mask"]).logits
    assert torch.equal(alone["plain"], plain) and torch.equal(alone["masked"], masked)
