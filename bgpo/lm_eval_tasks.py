"""The suite's Countdown and Sudoku as lm-evaluation-harness tasks (the YAMLs in ``bgpo/lm_tasks/``).

Each YAML names the functions below with ``!function bgpo.lm_eval_tasks.<name>``, so the tasks
need nothing but the installed package: no data files, no hub.

Data. ``suite_dataset`` is the YAMLs' ``custom_dataset``: it builds the suite's task
(``bgpo.tasks.get_task``) and turns its test set into an in-memory ``datasets.Dataset`` (one row
per problem: the rendered prompt, the problem's ``fields`` and ``solution`` as JSON). lm-eval calls
it with the task's ``dataset_kwargs`` (``bgpo_task``, ``bgpo_source``, fixed by the YAML) and the
run's metadata (``--metadata`` on the CLI, ``TaskManager(metadata=...)`` in Python; on the CLI it
also holds the ``--model_args``). The metadata keys read here:

- ``bgpo_format``: ``compact`` (default, the tiny model) or ``d1`` (LLaDA-class prompts);
- ``bgpo_test_file``: a test file replacing the source (a relative path is taken against the
  current directory and made absolute here);
- ``bgpo_n_test``: the task's ``n_test`` (size of the suite's own set, or rows drawn from a file);
- ``bgpo_n``: keep only the first n problems (what the trainer's ``eval_n`` does);
- ``bgpo_options``: extra task constructor arguments (a dict, or its JSON);
- ``bgpo_shots``: worked examples before each prompt (``task.shots``; ``bgpo.tasks.prompt_text``).

``bgpo_source`` is ``own`` (the suite's seeded test set, what a fresh clone has), ``d1`` (d1's
test file for the task in ``bgpo.tasks.d1_data_dir()``: ``$BGPO_D1_DATA`` or ``../shared/data``)
or ``val`` (the suite's validation set, ``task.val_examples()``: what checkpoint selection reads;
disjoint from training and from both test sets).

Metric. ``process_results`` scores the generated text with the task's own check
(``bgpo.tasks.task_scores``: ``reward`` and ``correct`` from one check of the completion):
``accuracy`` (mean of ``correct``) and ``reward`` (mean reward) are the numbers
``bgpo.rollout.evaluate`` reports.

GSM8K, MATH500, HumanEval, MBPP: no suite YAML; use lm-eval's own tasks with ``bgpo_dllm``
(``gsm8k``, ``minerva_math500`` (HuggingFaceH4/MATH-500), ``humaneval``, ``mbpp``; the code tasks
need ``HF_ALLOW_CODE_EVAL=1`` and ``--confirm_run_unsafe_code``). Their data come from the hub
(or the HF cache under ``HF_DATASETS_OFFLINE=1``) and their metrics are lm-eval's (exact match,
pass@1), not the suite's d1-format rewards; the offline tests do not run them. For example::

    LLADA=pretrained=GSAI-ML/LLaDA-8B-Instruct,dtype=bfloat16,use_chat_template=true
    python -m bgpo.lm_eval_cli --model bgpo_dllm --device cuda --tasks gsm8k --batch_size 8 \\
        --model_args $LLADA,gen_length=256,block_length=32,steps=128
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from bgpo.tasks import Example, Task, d1_data_dir, get_task, prompt_text, task_scores
from bgpo.tasks.data import COUNTDOWN_D1_FILE, SUDOKU_D1_FILE

TASKS_DIR = Path(__file__).resolve().parent / "lm_tasks"
"""Folder of the suite's lm-eval task YAMLs (``--include_path`` / ``TaskManager(include_path=)``)."""

D1_FILES = {"countdown": COUNTDOWN_D1_FILE, "sudoku": SUDOKU_D1_FILE}
SOURCES = ("own", "d1", "val")


def lm_task_name(task: str, source: str = "own") -> str:
    """The lm-eval name of a suite task: ``bgpo_countdown``, ``bgpo_sudoku_d1``..."""
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not one of {list(SOURCES)}")
    if task not in D1_FILES:
        raise ValueError(f"task {task!r} has no lm-eval task in the suite; allowed: {sorted(D1_FILES)} "
                         "(gsm8k, math500, humaneval, mbpp: use lm-eval's own tasks)")
    return f"bgpo_{task}" if source == "own" else f"bgpo_{task}_{source}"


def d1_file(task: str) -> Path:
    """d1's test file for ``task``; a clear error when the d1 data folder is missing."""
    root = d1_data_dir()
    path = root / D1_FILES[task] if root is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"d1 test file for {task!r} not found ({path or D1_FILES[task]}): set $BGPO_D1_DATA to the "
            "folder holding countdown_cd3_test_d1.jsonl and sudoku_4x4_test_d1.csv"
        )
    return path


def resolve_test_file(task: str, source: str, test_file: str | None) -> str | None:
    """The absolute test file in use (None: the suite's own generated set)."""
    if test_file:  # relative to where the user typed it: the current directory
        path = Path(test_file).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"bgpo_test_file={test_file!r}: no such file ({path})")
        return str(path)
    if source == "d1":
        return str(d1_file(task))
    if source not in ("own", "val"):
        raise ValueError(f"bgpo_source={source!r} is not one of {list(SOURCES)}")
    return None


def _options(value: Any) -> dict[str, Any]:
    if value in (None, "", {}):
        return {}
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"bgpo_options={value!r} must be a dict (or its JSON)")
    return dict(value)


@functools.lru_cache(maxsize=32)
def _rows(task: str, fmt: str, test_file: str | None, n_test: int | None, options: str,
          split: str = "test", shots: int = 0) -> tuple[dict, ...]:
    """Documents of a test (or validation) set (cached: the trainer evaluates the same set many times)."""
    t = get_task(task, test_file=test_file, n_test=n_test, **json.loads(options))
    rows = []
    for i, ex in enumerate(t.val_examples() if split == "val" else t.test_examples()):
        rows.append({
            "doc_index": i, "task": task, "format": fmt, "prompt": prompt_text(t, ex, fmt, shots),  # type: ignore[arg-type]
            "fields": json.dumps(ex.fields, sort_keys=True), "solution": ex.solution or "",
            "has_solution": ex.solution is not None, "meta": json.dumps(ex.meta, sort_keys=True, default=str),
        })
    return tuple(rows)


def suite_rows(task: str, source: str = "own", fmt: str = "compact", test_file: str | None = None,
               n_test: int | None = None, n: int | None = None,
               options: dict[str, Any] | None = None, shots: int = 0) -> list[dict[str, Any]]:
    """The lm-eval documents of a suite task's test set (first ``n`` when given)."""
    if fmt not in ("compact", "d1"):
        raise ValueError(f"bgpo_format={fmt!r} is not one of ['compact', 'd1']")
    path = resolve_test_file(task, source, test_file)
    rows = _rows(task, fmt, path, None if n_test is None else int(n_test),
                 json.dumps(options or {}, sort_keys=True), "val" if source == "val" else "test", int(shots))
    return [dict(r) for r in (rows if n is None else rows[: int(n)])]


def _int_or_none(value: Any) -> int | None:
    return None if value in (None, "", "None", "null") else int(value)


def suite_dataset(bgpo_task: str, bgpo_source: str = "own", **metadata: Any) -> dict[str, Any]:
    """``custom_dataset`` of the suite's task YAMLs: ``{"test": datasets.Dataset}`` built in memory."""
    import datasets

    rows = suite_rows(
        bgpo_task, bgpo_source, fmt=str(metadata.get("bgpo_format") or "compact"),
        test_file=metadata.get("bgpo_test_file") or None, n_test=_int_or_none(metadata.get("bgpo_n_test")),
        n=_int_or_none(metadata.get("bgpo_n")), options=_options(metadata.get("bgpo_options")),
        shots=_int_or_none(metadata.get("bgpo_shots")) or 0,
    )
    if not rows:
        raise ValueError(f"bgpo_{bgpo_task}: the test set is empty (bgpo_n / bgpo_n_test = 0?)")
    return {"test": datasets.Dataset.from_list(rows)}


# ---- the YAMLs' doc_to_text / doc_to_target / process_results ----------------------------------
def doc_to_text(doc: dict[str, Any]) -> str:
    """The prompt exactly as ``task.render`` wrote it (no Jinja: whitespace stays as is)."""
    return doc["prompt"]


def doc_to_target(doc: dict[str, Any]) -> str:
    """The reference solution (compact), informational only: the metric is the task's reward."""
    return doc["solution"]


def example_of(doc: dict[str, Any]) -> Example:
    return Example(json.loads(doc["fields"]), doc["solution"] if doc["has_solution"] else None,
                   json.loads(doc["meta"]))


@functools.cache
def _task(name: str) -> Task:
    return get_task(name)  # reward and correct depend on the problem only, not on the test set


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """The suite's own metric of one generation: ``accuracy`` (task.correct) and ``reward``."""
    task, ex, fmt = _task(doc["task"]), example_of(doc), doc["format"]
    (score,) = task_scores(task, [ex], [results[0]], fmt)  # one check gives both numbers
    return {"accuracy": float(score.correct), "reward": score.reward}
