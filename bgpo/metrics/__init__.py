"""The suite's task metrics as Hugging Face ``evaluate`` modules (issue 16.8).

Two local metric scripts, loadable offline by path, for pipelines that score with ``evaluate``
(a TRL reward function, an lm-eval ``metric: !function``, a notebook) rather than through the suite:

    import evaluate
    from bgpo.metrics import metric_path

    countdown = evaluate.load(metric_path("countdown"))
    countdown.compute(predictions=["(100-93)+30"], references=[{"numbers": [30, 100, 93], "target": 37}])
    # {'reward': 1.0, 'accuracy': 1.0}
    sudoku = evaluate.load(metric_path("sudoku"))
    sudoku.compute(predictions=[...], references=[{"puzzle": "1030...", "solution": "1234..."}])
    # {'cell_accuracy': ..., 'solved_accuracy': ...}

Both call the suite's own task code (``bgpo.tasks``: ``task_scores``), so their numbers are the
suite's rewards, never a second implementation: Countdown (docs/methods.md §6) reward (1 / 0.1 / 0) and
accuracy (reward 1); Sudoku (docs/methods.md §6) cell accuracy (the share of empty cells filled right, the
suite's reward) and solved accuracy (every empty cell right). ``format="d1"`` reads the answer
from the last ``<answer>`` tag (LLaDA-class completions); ``compact`` (default) reads the
completion itself (the tiny models). They need ``bgpo`` importable, nothing else; no hub access.
"""

from __future__ import annotations

from pathlib import Path

METRICS = ("countdown", "sudoku")


def metric_path(task: str) -> str:
    """The folder ``evaluate.load`` takes for the suite's metric of ``task``."""
    if task not in METRICS:
        raise ValueError(f"no evaluate metric for task {task!r}; allowed: {list(METRICS)}")
    return str(Path(__file__).resolve().parent / f"bgpo_{task}")
