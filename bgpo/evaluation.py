"""What a training run evaluates, and on which data (greedy, one token per step, as BGPO §4).

- During training, only the VALIDATION set (``task.val_examples()``: disjoint from the training
  problems and from every test set) is evaluated: at step 0 (the base model) and every
  ``eval_every`` steps, as ``val/accuracy`` and ``val/reward``. Checkpoint selection reads these and
  nothing else: the RL checkpoint with the best validation accuracy (then reward, then the earlier
  step) is kept as ``checkpoints/best.pt``.
- At the end, the TEST sets are evaluated once each for the base model, the validation-selected
  checkpoint and the final one, per problem (``eval_test.json``): the suite's own test set
  (``own``) and, for Countdown and Sudoku, d1's test file (``d1``) when it is found
  (``bgpo.tasks.d1_data_dir``). Per-problem scores are what the tables' paired bootstrap needs.

Countdown and Sudoku go through lm-evaluation-harness (``bgpo_dllm`` and the suite's task YAMLs, the
path of ``python -m bgpo.evaluate``); other tasks through the rollout sampler and the task's reward.
"""

from __future__ import annotations

from typing import Any

from bgpo.model import DLLM

SELECTION = "val/accuracy, then val/reward, then the earlier step"


def suite_task(name: str) -> bool:
    from bgpo.lm_eval_tasks import D1_FILES

    return name in D1_FILES


def test_sources(task_cfg: Any) -> list[str]:
    """The test sets a run reports: ``own`` (or ``task.test_file`` when set), plus ``d1`` when the
    task has a d1 file, no ``test_file`` replaces it, and the file is found."""
    from bgpo.lm_eval_tasks import D1_FILES
    from bgpo.tasks import d1_data_dir

    sources = ["own"]
    root = d1_data_dir()
    if task_cfg.name in D1_FILES and not task_cfg.test_file and root is not None \
            and (root / D1_FILES[task_cfg.name]).is_file():
        sources.append("d1")
    return sources


def evaluate_on(policy: DLLM, task: Any, task_cfg: Any, source: str, n: int | None = None,
                per_problem: bool = False) -> dict[str, Any]:
    """Greedy accuracy and reward of ``policy`` on a set: ``val``, ``own`` (the test set in use) or
    ``d1``; the first ``n`` problems when given."""
    if suite_task(task_cfg.name):
        from bgpo.lm_eval_model import evaluate_suite_task

        return evaluate_suite_task(policy, task_cfg.name, task_cfg, n, source=source, per_problem=per_problem)
    from bgpo.rollout import evaluate

    if source == "d1":
        raise ValueError(f"task {task_cfg.name!r} has no d1 test file")
    data = task.val_examples() if source == "val" else task.test_examples()
    out = evaluate(policy, task, data[:n] if n is not None else data, task_cfg)
    if not per_problem:
        out.pop("per_problem")
    return out


def has_validation(task: Any) -> bool:
    return callable(getattr(task, "val_examples", None))


def better(row: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Whether an evaluation row beats the best so far (``SELECTION``; ties keep the earlier)."""
    if best is None:
        return True
    return (row["val/accuracy"], row["val/reward"]) > (best["val/accuracy"], best["val/reward"])


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The validation-selected RL checkpoint's row among a run's metrics rows (step > 0)."""
    best = None
    for r in rows:
        if r.get("step", 0) > 0 and "val/accuracy" in r and better(r, best):
            best = r
    return best
