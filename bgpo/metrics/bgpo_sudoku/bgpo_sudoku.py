"""Sudoku 4x4 cell and solved accuracy of bgpo-suite (docs/methods.md §6) as an ``evaluate`` metric.

Loaded by path (``evaluate.load(bgpo.metrics.metric_path("sudoku"))``); see ``bgpo.metrics``.
The numbers are the suite's own: ``bgpo.tasks.task_scores`` on the ``sudoku`` task.
"""

from __future__ import annotations

import datasets
import evaluate

from bgpo.tasks import Example, get_task, task_scores

_DESCRIPTION = """Sudoku 4x4 (16 digits, 0 = empty): the first 16 digits of the answer are the grid.
Cell accuracy (the suite's reward) is the share of originally empty cells filled right; solved
accuracy is the share of puzzles with every empty cell right."""

_KWARGS = """
Args:
    predictions: completions (str).
    references: puzzles, each {"puzzle": 16 digits with 0 for empty, "solution": 16 digits}.
    format: "compact" (the completion is the grid) or "d1" (the last <answer> tag).
Returns:
    cell_accuracy: mean share of empty cells right; solved_accuracy: share of puzzles solved.
"""

_CITATION = "bgpo-suite, docs/methods.md §6 (Sudoku task of d1: Zhao et al. 2025, arXiv 2504.12216)."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class BgpoSudoku(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": {"puzzle": datasets.Value("string"), "solution": datasets.Value("string")},
            }),
        )

    def _compute(self, predictions: list[str], references: list[dict], format: str = "compact") -> dict:
        examples = [Example({"puzzle": r["puzzle"]}, r["solution"]) for r in references]
        scores = task_scores(get_task("sudoku"), examples, predictions, format)  # type: ignore[arg-type]
        n = max(len(scores), 1)
        return {"cell_accuracy": sum(s.reward for s in scores) / n,
                "solved_accuracy": sum(s.correct for s in scores) / n}
