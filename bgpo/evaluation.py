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
- ``task.eval_tasks`` (a training task whose test sets are OTHER tasks', BGPO §4: the one math
  model, trained on MATH + GSM8K, reported on MATH500 and GSM8K; the code model on HumanEval and
  MBPP) replaces those sources by the named tasks' own test sets, each built with its options and
  ``task.n_test`` and evaluated with the training task's format and lengths; validation stays the
  training task's (a held-out slice of its training data).

Countdown and Sudoku go through lm-evaluation-harness (``bgpo_dllm`` and the suite's task YAMLs, the
path of ``python -m bgpo.evaluate``); other tasks through the rollout sampler and the task's reward.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

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

    if getattr(task_cfg, "eval_tasks", None):  # other tasks' test sets (BGPO §4's math and code models)
        return list(task_cfg.eval_tasks)
    sources = ["own"]
    root = d1_data_dir()
    if task_cfg.name in D1_FILES and not task_cfg.test_file and root is not None \
            and (root / D1_FILES[task_cfg.name]).is_file():
        sources.append("d1")
    return sources


def evaluate_on(policy: DLLM, task: Any, task_cfg: Any, source: str, n: int | None = None,
                per_problem: bool = False, dist: Any = None, fast: Any = None) -> dict[str, Any]:
    """Greedy accuracy and reward of ``policy`` on a set: ``val``, ``own`` (the test set in use),
    ``d1``, or the name of one of ``task.eval_tasks``; the first ``n`` problems when given.
    ``dist`` (``bgpo.parallel.Dist``, every rank calling): the problems are split over the ranks
    and gathered, each rank returning the whole result; an lm-eval suite task runs on rank 0 alone
    (the others return ``{}``). ``fast`` (``val_sampler``, validation only): the sampler's mode."""
    if fast is not None and source != "val":
        raise ValueError(f"a fast sampler scores validation only, never the test set {source!r}")
    if source in (getattr(task_cfg, "eval_tasks", None) or {}):
        from bgpo.tasks import get_task

        sub = eval_task_config(task_cfg, source)
        files = {"test_file": sub.test_file} if sub.test_file else {}
        task = get_task(sub.name, n_test=sub.n_test, **files, **sub.options)
        return evaluate_on(policy, task, sub, "own", n, per_problem, dist)
    if suite_task(task_cfg.name):
        if dist is not None and dist.rank != 0:
            return {}
        from bgpo.lm_eval_model import evaluate_suite_task

        return evaluate_suite_task(policy, task_cfg.name, task_cfg, n, source=source, per_problem=per_problem)
    from bgpo.rollout import evaluate

    if source == "d1":
        raise ValueError(f"task {task_cfg.name!r} has no d1 test file")
    data = task.val_examples() if source == "val" else task.test_examples()
    split = {"rank": dist.rank, "world": dist.world, "gather": dist.gather} if dist is not None else {}
    out = evaluate(policy, task, data[:n] if n is not None else data, task_cfg, **split, fast=fast)
    if not per_problem:
        out.pop("per_problem")
    return out


def eval_task_config(task_cfg: Any, name: str) -> Any:
    """The task config that evaluates ``task.eval_tasks.<name>``: the training task's format,
    lengths and ``n_test``; the eval task's own options (its ``test_file`` option is the config's)."""
    cfg = (OmegaConf.to_container(task_cfg, resolve=True) if OmegaConf.is_config(task_cfg)
           else vars(task_cfg).copy())
    options = dict(cfg["eval_tasks"][name] or {})
    cfg.update(name=name, test_file=options.pop("test_file", None), options=options, eval_tasks={})
    return OmegaConf.create(cfg)


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


def describe(tests: dict[str, Any]) -> list[str]:
    """One line per test set of a run's ``eval_test.json``: the base model, the validation-selected
    and the final policy, each with its 95% Wilson interval (one greedy evaluation), and their
    gains over the base with a paired bootstrap interval over the problems (``bgpo.stats``)."""
    import numpy as np

    from bgpo.stats import bootstrap, wilson

    lines = []
    for src in tests.get("base") or {}:
        arms = {k: np.asarray(tests[k][src]["per_problem"]["accuracy"]) for k in ("base", "best", "final")
                if (tests.get(k) or {}).get(src)}
        n = len(arms["base"])
        diffs = bootstrap(arms, [(k, "base") for k in arms if k != "base"])
        parts = [f"base {wilson(arms['base'].sum(), n).pct()}"]
        for k, label in (("best", f"selected (step {tests.get('best_step')})"), ("final", "final")):
            if k in arms:
                gain = diffs[f"{k}-base"].signed_pct()
                parts.append(f"{label} {wilson(arms[k].sum(), n).pct()} (Δ {gain})")
        lines.append(f"test set {src} ({n} problems), accuracy %: " + " · ".join(parts))
    return lines
