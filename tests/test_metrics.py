"""The suite's task metrics as offline ``evaluate`` modules (issue 16.8): loaded by path, they give
exactly the numbers of the suite's own reward and accuracy."""

from __future__ import annotations

import pytest

from bgpo.metrics import metric_path
from bgpo.tasks import get_task


@pytest.fixture
def offline(monkeypatch):
    """No hub: evaluate's offline switch on, and any download attempt fails the test."""
    import evaluate
    import huggingface_hub

    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_hub(*args, **kwargs):
        raise AssertionError("hub access")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    return evaluate


def mean(xs) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("fmt", ["compact", "d1"])
def test_countdown_metric_equals_the_suite_reward(offline, fmt):
    task = get_task("countdown")
    exs = task.test_examples()[:12]
    # right (reward 1), well-formed but wrong (0.1), garbage (0), numbers reused (0.1)
    answers = [task.target(ex, "compact") if i % 4 == 0 else ["1+2", "abc", "30+30+30"][i % 4 - 1]
               for i, ex in enumerate(exs)]
    preds = [a if fmt == "compact" else f"<reasoning>r</reasoning>\n<answer>{a}</answer>" for a in answers]
    metric = offline.load(metric_path("countdown"))
    got = metric.compute(predictions=preds, references=[ex.fields for ex in exs], format=fmt)
    rewards = [task.reward(ex, y, fmt) for ex, y in zip(exs, preds, strict=True)]
    assert got == {"reward": pytest.approx(mean(rewards), abs=1e-12),
                   "accuracy": mean([task.correct(ex, y, fmt) for ex, y in zip(exs, preds, strict=True)])}
    assert set(rewards) == {0.0, 0.1, 1.0}  # every branch of the reward is exercised


def test_sudoku_metric_equals_the_suite_reward(offline):
    task = get_task("sudoku")
    exs = task.test_examples()[:9]
    preds = []
    for i, ex in enumerate(exs):  # solved, two cells changed, nothing
        sol = ex.solution or ""
        preds.append([sol, sol[:2][::-1] + sol[2:-1] + "9", "no idea"][i % 3])
    metric = offline.load(metric_path("sudoku"))
    refs = [{"puzzle": ex.fields["puzzle"], "solution": ex.solution} for ex in exs]
    got = metric.compute(predictions=preds, references=refs)
    rewards = [task.reward(ex, y, "compact") for ex, y in zip(exs, preds, strict=True)]
    assert got == {"cell_accuracy": pytest.approx(mean(rewards), abs=1e-12), "solved_accuracy": 3 / 9}
    assert 0.0 < mean(rewards) < 1.0 and len(set(rewards)) > 2


def test_unknown_metric():
    with pytest.raises(ValueError, match=r"no evaluate metric for task 'gsm8k'; allowed: \['countdown'"):
        metric_path("gsm8k")
