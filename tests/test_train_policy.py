"""``bgpo.train_policy``: the tiny model trained from Python with a plain reward function, through
the suite's one loop and results store (issue 26)."""

from __future__ import annotations

import json

import pytest

from bgpo import train_policy
from bgpo.api import reward_task
from tests.helpers import micro_model

SETTINGS = ["steps=2", "prompts_per_step=2", "group_size=3", "mc=2", "eval_n=4", "eval_every=2",
            "progress=false", "task.gen_length=8", "task.block_length=4", "task.diffusion_steps=4",
            "temperature=1.0", "lr=1e-3"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "micro"
    micro_model(0, dtype=__import__("torch").float32).save(path)
    return path


def vowels(prompts: list[str], completions: list[str]) -> list[float]:
    return [sum(c in "aeiou" for c in y) / max(len(y), 1) for y in completions]


def test_train_policy_trains_the_tiny_model_with_a_plain_reward(base_model, tmp_path):
    calls = []

    def counted(prompts: list[str], completions: list[str]) -> list[float]:
        calls.append(len(completions))
        return vowels(prompts, completions)

    prompts = [f"{i}|" for i in range(10)]
    summary = train_policy(base_model, [counted], prompts, method="bgpo", results_dir=tmp_path,
                           correct_at=0.5, overrides=SETTINGS)
    run = tmp_path / summary["run"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and summary["steps"] == 2
    assert all(0 <= r["reward"] <= 1 for r in rows[1:]) and calls  # the reward function scored rollouts
    assert "own" in summary["final"]  # the held-out prompts are the test set
    again = train_policy(base_model, [counted], prompts, method="bgpo", results_dir=tmp_path,
                         correct_at=0.5, overrides=SETTINGS)
    assert again["run"] == summary["run"]  # the results store: complete, not trained twice


def test_reward_task_sums_the_functions_and_holds_out_prompts():
    task = reward_task([f"{i}|" for i in range(20)], [vowels, lambda p, c: [1.0] * len(c)])
    assert [ex.fields["prompt"] for ex in task.test_examples()] == ["18|", "19|"]
    assert {ex.fields["prompt"] for ex in task.train_examples(40, 0)} == {f"{i}|" for i in range(18)}
    assert task.rewards(task.test_examples(), ["ae", "xy"], "compact") == [2.0, 1.0]
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        reward_task(["a|", "b|"], [lambda p, c: [0.0]]).rewards(task.test_examples(), ["a", "b"], "compact")
