"""GSM8K (docs/methods.md §6): grade-school word problems, scored on the final number.

Data. ``openai/gsm8k`` config ``main`` (``train`` / ``test`` splits; rows ``question``,
``answer``), or local JSON/JSONL/CSV/parquet files with the same columns (``train_file``,
``test_file``). Loaded on first use, never in the constructor. The reference answer is the number
after ``####``; the text before it (``<<...>>`` calculator notes removed) is the reasoning used by
``target``.

Answers. The prediction is taken from the last ``<answer>...</answer>`` if present, else from the
whole completion; inside it, the last ``\\boxed{}`` if present, else the text itself; the last
number in that (thousands commas and ``$`` ignored) is compared exactly with the reference.

Reward: 1.0 if correct else 0, plus ``format_bonus`` (default 0, i.e. off) when the completion
has the d1 layout, a small stand-in for d1's format terms.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from bgpo.tasks.base import (
    D1_INSTRUCTIONS,
    Example,
    Format,
    check_format,
    d1_completion,
    has_d1_layout,
    last_answer,
    register_task,
)
from bgpo.tasks.data import load_records, sample_pool
from bgpo.tasks.math500 import last_boxed, parse_number

_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?")


def reference_answer(answer: str) -> str:
    """The final number of a GSM8K reference solution (after ``####``, commas removed)."""
    return answer.split("####")[-1].strip().replace(",", "")


def last_number(text: str) -> str | None:
    """Last number in ``text``; commas between digit groups are dropped first."""
    cleaned = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    found = _NUM_RE.findall(cleaned)
    return found[-1] if found else None


def extract_answer(completion: str) -> str | None:
    """The predicted final number (see the module docstring)."""
    region = last_answer(completion)
    if region is None:
        region = completion
    boxed = last_boxed(region)
    return last_number(boxed if boxed is not None else region)


def same_number(pred: str | None, ref: str) -> bool:
    if pred is None:
        return False
    try:
        return parse_number(pred) == Fraction(ref)
    except (ValueError, ZeroDivisionError):
        return False


def _to_example(row: dict[str, Any], index: int, source: str) -> Example:
    return Example(
        {"question": row["question"], "answer": reference_answer(row["answer"])},
        row["answer"],
        {"source": source, "index": index},
    )


@register_task("gsm8k")
class GSM8KTask:
    """docs/methods.md §6 GSM8K; see the module docstring for the sources and the answer check."""

    DATA_FILES = ("train_file", "test_file")
    DATA_SOURCES = ("hub_name",)
    name = "gsm8k"

    def __init__(
        self,
        train_file: str | None = None,
        test_file: str | None = None,
        n_test: int | None = None,
        hub_name: str = "openai/gsm8k",
        hub_config: str = "main",
        format_bonus: float = 0.0,
    ) -> None:
        self.train_file, self.test_file, self.n_test = train_file, test_file, n_test
        self.hub_name, self.hub_config = hub_name, hub_config
        self.format_bonus = format_bonus
        self._cache: dict[str, list[Example]] = {}

    def _split(self, split: str, path: str | None) -> list[Example]:
        if split not in self._cache:
            source = path or self.hub_name
            if path:
                rows = load_records(path, None, split, key=f"{split}_file", local=True)
            else:
                rows = load_records(self.hub_name, self.hub_config, split, key="hub_name")
            self._cache[split] = [_to_example(r, i, source) for i, r in enumerate(rows)]
        return self._cache[split]

    def test_examples(self) -> list[Example]:
        return self._split("test", self.test_file)[: self.n_test]

    def train_examples(self, n: int, seed: int) -> list[Example]:
        """``n`` problems of the train split (seeded shuffles, no repeat within a pass)."""
        return sample_pool(self._split("train", self.train_file), n, seed)

    def render(self, ex: Example, fmt: Format) -> str:
        check_format(fmt)  # compact == d1 for this GPU-scale task
        return f"{ex.fields['question']}\n" + D1_INSTRUCTIONS + "\nThe final answer is a single number."

    def target(self, ex: Example, fmt: Format) -> str:
        check_format(fmt)
        reasoning = re.sub(r"<<.*?>>", "", (ex.solution or "").split("####")[0])
        return d1_completion(reasoning or ex.fields["answer"], ex.fields["answer"])

    def correct(self, ex: Example, completion: str, fmt: Format) -> bool:
        return same_number(extract_answer(completion), ex.fields["answer"])

    def reward(self, ex: Example, completion: str, fmt: Format) -> float:
        check_format(fmt)
        bonus = self.format_bonus if self.format_bonus and has_d1_layout(completion) else 0.0
        return float(self.correct(ex, completion, fmt)) + bonus
