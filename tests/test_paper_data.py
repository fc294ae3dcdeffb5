"""BGPO §4's training data (issue 12, item 6): one math model on MATH + GSM8K train reported on
GSM8K and MATH500, one code model on DeepCoder-format problems reported on HumanEval and MBPP;
``task.eval_tasks`` names the test sets, ``$BGPO_DATA`` holds the files the suite cannot ship.
Everything reads the local files of tests/fixtures/tasks (never the hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from bgpo import evaluation
from bgpo.config import register
from bgpo.tasks import get_task
from tests.helpers import micro_model

register()
DATA = Path(__file__).resolve().parent / "fixtures" / "tasks"
MATH = dict(math_train=str(DATA / "math_train.jsonl"), gsm8k_train=str(DATA / "gsm8k_train.jsonl"),
            gsm8k_test=str(DATA / "gsm8k_test.jsonl"), math500_test=str(DATA / "math500_test.jsonl"))


def answer(text: str) -> str:
    return f"<reasoning>\nshown\n</reasoning>\n<answer>\n{text}\n</answer>"


def test_math_trains_on_math_and_gsm8k_holds_out_validation_and_drops_math500_problems():
    task = get_task("math", n_val=2, **MATH)
    val, train = task.val_examples(), task.train_examples(50, seed=0)
    pool = {ex.fields.get("question") or ex.fields["problem"] for ex in train}
    assert len(pool) == 3 and not pool & {ex.fields.get("question") or ex.fields["problem"] for ex in val}
    origins = [ex.meta["origin"] for ex in val + train]
    assert set(origins) == {"gsm8k", "math"}
    assert sum(o == "math" for o, _ in {(ex.meta["origin"], ex.meta["index"]) for ex in val + train}) == 2
    assert all("3}{4}" not in ex.fields.get("problem", "") for ex in val + train)  # a MATH500 problem
    for ex in val + train:  # each example is scored by its own task's checker
        assert task.reward(ex, task.target(ex, "d1"), "d1") == 1.0
        assert task.reward(ex, answer("-987654"), "d1") == 0.0
    boxed = next(ex for ex in train if ex.meta["origin"] == "math")
    assert "boxed" in task.render(boxed, "d1")
    assert [ex.meta["origin"] for ex in task.test_examples()] == ["gsm8k"] * 2 + ["math"] * 4


def test_math_without_its_training_file_names_the_key():
    with pytest.raises(ValueError, match="task.options.math_train"):
        get_task("math", **{**MATH, "math_train": None}).train_examples(1, 0)


def test_deepcoder_rewards_stdin_and_function_call_tests():
    task = get_task("deepcoder", train_file=str(DATA / "deepcoder_train.jsonl"), n_val=1)
    rows = task.val_examples() + task.train_examples(4, seed=0)
    assert {ex.fields["fn_name"] for ex in rows} == {None, "maxOf", "reverse"}
    assert {kind for ex in rows for kind, _, _ in ex.fields["tests"]} == {"stdin", "call"}
    for ex in rows:
        assert task.reward(ex, answer(f"```python\n{ex.solution}\n```"), "d1") == 1.0, ex.fields["problem"]
        assert task.reward(ex, answer("```python\nprint(0)\ndef maxOf(x): return 0\n```"), "d1") == 0.0
    call = next(ex for ex in rows if ex.fields["fn_name"] == "maxOf")
    assert "maxOf" in task.render(call, "d1") and "class Solution" in task.render(call, "d1")
    with pytest.raises(ValueError, match="task.options.train_file"):
        get_task("deepcoder").train_examples(1, 0)


def compose_task(*overrides: str):
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_bgpo_data_folder_supplies_the_files_the_suite_cannot_ship(tmp_path, monkeypatch):
    monkeypatch.setenv("BGPO_DATA", str(tmp_path))
    (tmp_path / "math_train.jsonl").write_text((DATA / "math_train.jsonl").read_text())
    cfg = compose_task("task=math")
    assert cfg.task.options.math_train == str(tmp_path / "math_train.jsonl")
    assert cfg.task.options.gsm8k_train is None  # not there: GSM8KTask's hub default
    assert cfg.task.eval_tasks.math500.test_source == "HuggingFaceH4/MATH-500"
    code = compose_task("task=deepcoder")
    assert code.task.options.train_file is None and list(code.task.eval_tasks) == ["humaneval", "mbpp"]


def test_paper_main_trains_one_math_and_one_code_model_in_bf16_mixed():
    math = compose_task("+sweeps=paper_main", "task=math", "method=bgpo")
    assert list(math.task.eval_tasks) == ["gsm8k", "math500"]
    assert evaluation.test_sources(math.task) == ["gsm8k", "math500"]
    assert (math.task.gen_length, math.task.diffusion_steps, math.steps, math.mc) == (512, 256, 700, 16)
    assert (math.model.precision, math.model.dtype, math.model.activation_checkpointing) == ("bf16-mixed",
                                                                                             "float32", True)
    code = compose_task("+sweeps=paper_main", "task=deepcoder", "method=vrpo")
    assert evaluation.test_sources(code.task) == ["humaneval", "mbpp"]
    assert (code.task.diffusion_steps, code.steps, code.mc) == (512, 560, 2)
    with initialize_config_module("bgpo.conf", version_base="1.3"):
        from bgpo.sweep import sweep_jobs

        jobs = sweep_jobs(compose("sweep", overrides=["+sweeps=paper_main"], return_hydra_config=True))
    assert sorted({j[1] for j in jobs}) == ["task=countdown", "task=deepcoder", "task=math", "task=sudoku"]


def test_eval_tasks_are_evaluated_on_their_own_test_sets():
    cfg = compose_task("task=math", "task.gen_length=8", "task.block_length=4", "task.diffusion_steps=4",
                       "task.n_test=1", f"task.eval_tasks.gsm8k.test_file={DATA / 'gsm8k_test.jsonl'}",
                       f"task.eval_tasks.math500.test_source={DATA / 'math500_test.jsonl'}")
    model = micro_model(dtype=torch.float32)
    for source, n in (("gsm8k", 1), ("math500", 1)):
        out = evaluation.evaluate_on(model, None, cfg.task, source, per_problem=True)
        assert out["n"] == n and len(out["per_problem"]["accuracy"]) == n
    with pytest.raises(ValueError, match="task.eval_tasks.chess"):
        from bgpo.validate import validate_task

        validate_task(compose_task("task=math", "+task.eval_tasks.chess={}").task)
