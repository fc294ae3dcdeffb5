"""Countdown reward and accuracy of bgpo-suite (docs/methods.md §6) as an ``evaluate`` metric.

Loaded by path (``evaluate.load(bgpo.metrics.metric_path("countdown"))``); see ``bgpo.metrics``.
The numbers are the suite's own: ``bgpo.tasks.task_scores`` on the ``countdown`` task.
"""

from __future__ import annotations

import datasets
import evaluate

from bgpo.tasks import Example, get_task, task_scores

_DESCRIPTION = """Countdown (3 numbers): write an expression equal to `target` using each number once
with + - * / and parentheses. Reward 1.0 when the numbers and the value (within 1e-5) are right,
0.1 for a well-formed but wrong expression, 0 otherwise; accuracy is the share with reward 1."""

_KWARGS = """
Args:
    predictions: completions (str).
    references: problems, each {"numbers": [int, int, int], "target": int}.
    format: "compact" (the completion is the expression) or "d1" (the last <answer> tag).
Returns:
    reward: mean reward; accuracy: share of completions with reward 1.
"""

_CITATION = "bgpo-suite, docs/methods.md §6 (Countdown task of d1: Zhao et al. 2025, arXiv 2504.12216)."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class BgpoCountdown(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": {"numbers": datasets.Sequence(datasets.Value("int64")),
                               "target": datasets.Value("int64")},
            }),
        )

    def _compute(self, predictions: list[str], references: list[dict], format: str = "compact") -> dict:
        examples = [Example({"numbers": [int(x) for x in r["numbers"]], "target": int(r["target"])})
                    for r in references]
        scores = task_scores(get_task("countdown"), examples, predictions, format)  # type: ignore[arg-type]
        n = max(len(scores), 1)
        return {"reward": sum(s.reward for s in scores) / n, "accuracy": sum(s.correct for s in scores) / n}
