"""MBPP (docs/methods.md §6): basic Python problems, pass@1 by running the tests in a sandbox.

Data. ``google-research-datasets/mbpp`` (config ``full``: ``train`` 374, ``test`` 500; rows
``task_id``, ``text``, ``code``, ``test_list``, ``test_setup_code``; the ``sanitized`` config's
``prompt``/``test_imports`` columns are read too), or local JSON/JSONL/CSV/parquet files with the
same columns (``train_file``, ``test_file``). Loaded on first use, never in the constructor.

Reward: the code (``sandbox.extract_code``: last fenced block inside the last ``<answer>``, or the
raw completion) is the program of a ``sandbox.CodeJob``; the setup code is its trusted setup and
the asserts its trusted tests (time limit ``timeout``; see that module for what the sandbox does
and does not cover): 1.0 if every assert passes (the sandbox's token, not the exit status), else
0. ``correct`` is reward == 1. ``rewards`` / ``scores`` run a batch in parallel (``workers``
sandboxes, default ``$BGPO_SANDBOX_WORKERS`` or min(8, CPUs)), each completion once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from bgpo.tasks.base import (
    D1_INSTRUCTIONS,
    Example,
    Format,
    Score,
    check_format,
    d1_completion,
    register_task,
)
from bgpo.tasks.data import load_records, sample_pool
from bgpo.tasks.sandbox import CodeJob, extract_code, run_jobs


def _to_example(row: dict[str, Any], source: str) -> Example:
    setup = "\n".join(x for x in [row.get("test_setup_code") or "", *(row.get("test_imports") or [])] if x)
    fields = {
        "task_id": row.get("task_id"),
        "text": row.get("text") or row.get("prompt", ""),
        "tests": list(row["test_list"]),
        "setup": setup,
    }
    return Example(fields, row.get("code"), {"source": source})


@register_task("mbpp")
class MBPPTask:
    """docs/methods.md §6 MBPP; see the module docstring for the sources and the sandbox."""

    DATA_FILES = ("train_file", "test_file")
    DATA_SOURCES = ("hub_name",)
    name = "mbpp"

    def __init__(
        self,
        train_file: str | None = None,
        test_file: str | None = None,
        n_test: int | None = None,
        hub_name: str = "google-research-datasets/mbpp",
        hub_config: str = "full",
        timeout: float = 5.0,
        workers: int | None = None,
    ) -> None:
        self.train_file, self.test_file, self.n_test = train_file, test_file, n_test
        self.hub_name, self.hub_config, self.timeout = hub_name, hub_config, timeout
        self.workers = workers
        self._cache: dict[str, list[Example]] = {}

    def _split(self, split: str, path: str | None) -> list[Example]:
        if split not in self._cache:
            source = path or self.hub_name
            if path:
                rows = load_records(path, None, split, key=f"{split}_file", local=True)
            else:
                rows = load_records(self.hub_name, self.hub_config, split, key="hub_name")
            self._cache[split] = [_to_example(r, source) for r in rows]
        return self._cache[split]

    def test_examples(self) -> list[Example]:
        return self._split("test", self.test_file)[: self.n_test]

    def train_examples(self, n: int, seed: int) -> list[Example]:
        """``n`` problems of the train split (seeded shuffles, no repeat within a pass)."""
        return sample_pool(self._split("train", self.train_file), n, seed)

    def render(self, ex: Example, fmt: Format) -> str:
        check_format(fmt)  # compact == d1 for this GPU-scale task
        tests = "\n".join(ex.fields["tests"])
        return (
            f"{ex.fields['text']}\nYour code should pass these tests:\n{tests}\n"
            + D1_INSTRUCTIONS
            + "\nThe final answer is the complete Python code in a ```python ... ``` block."
        )

    def target(self, ex: Example, fmt: Format) -> str:
        check_format(fmt)
        if ex.solution is None:
            raise ValueError("this MBPP example has no reference code")
        return d1_completion("A direct implementation.", f"```python\n{ex.solution.strip()}\n```")

    def job(self, ex: Example, completion: str) -> CodeJob:
        """The sandbox job: the setup (trusted), the extracted code, then every test assert. Its
        entry points are the functions the reference code defines and the tests use: the sandbox
        lets a program name that shadows a builtin (MBPP/126's ``sum``) reach the tests only then."""
        tests = ex.fields["tests"]
        defined = re.findall(r"^(?:def|class)\s+(\w+)", ex.solution or "", re.MULTILINE)
        used = set(re.findall(r"[A-Za-z_]\w*", "\n".join(tests)))
        return CodeJob(program=extract_code(completion), tests="\n".join([*tests, ""]),
                       setup=ex.fields["setup"], entry=tuple(sorted(set(defined) & used)))

    def scores(self, examples: Sequence[Example], completions: Sequence[str], fmt: Format) -> list[Score]:
        """Reward and correctness of a batch, each completion run once, in parallel."""
        check_format(fmt)
        jobs = [self.job(ex, y) for ex, y in zip(examples, completions, strict=True)]
        return [Score(float(ok), ok) for ok in run_jobs(jobs, self.timeout, workers=self.workers)]

    def rewards(self, examples: Sequence[Example], completions: Sequence[str], fmt: Format) -> list[float]:
        return [s.reward for s in self.scores(examples, completions, fmt)]

    def reward(self, ex: Example, completion: str, fmt: Format) -> float:
        return self.scores([ex], [completion], fmt)[0].reward

    def correct(self, ex: Example, completion: str, fmt: Format) -> bool:
        return self.scores([ex], [completion], fmt)[0].correct
