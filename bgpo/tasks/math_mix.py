"""``math``: BGPO's math training set — MATH train + GSM8K train, one model (BGPO §4).

BGPO trains ONE math model on the union of MATH's and GSM8K's training problems and reports it on
MATH500 and GSM8K. This task is that training source; its test sets are the two tasks' own, named
in the config (``task.eval_tasks: {gsm8k: {}, math500: {}}``, ``bgpo.evaluation``).

Data (loaded on first use, never in the constructor; local JSON/JSONL/CSV/parquet files or hub
names, as ``bgpo.tasks.data.load_records`` reads them):
- ``gsm8k_train``: GSM8K's train split as a local file (rows ``question``, ``answer``); default the
  hub's ``openai/gsm8k`` (config ``main``, split ``train``: 7473 problems);
- ``math_train``: MATH's training problems (rows ``problem``, ``solution``, optionally
  ``answer``; 7500 in MATH), a local file or a hub name (``math_train_config``,
  ``math_train_split``). No default: the suite does not ship it and the hub has it only under
  mirrors' names; ``train_examples`` fails naming ``task.options.math_train``;
- ``math500_test``: MATH500 (default ``HuggingFaceH4/MATH-500``), read only to drop the MATH
  training problems that are MATH500 test problems (MATH500 is drawn from MATH's test split, so
  normally none is);
- ``gsm8k_test``: GSM8K's test split as a local file (default the hub's), for ``test_examples``.

Validation (checkpoint selection, ``bgpo.evaluation``): ``n_val`` problems held out of the
combined training pool (a fixed shuffle, the same for every run seed); training draws from the
rest. Every example keeps its origin (``meta["origin"]``: ``gsm8k`` | ``math``), and its prompt,
reward and correctness are those of ``GSM8KTask`` / ``Math500Task`` (d1 layout, final answer).
``test_examples`` is the union of both test sets (origin kept), what a run reports when
``task.eval_tasks`` is emptied.
"""

from __future__ import annotations

import dataclasses
import random

from bgpo.tasks.base import Example, Format, register_task
from bgpo.tasks.data import load_records, sample_pool
from bgpo.tasks.gsm8k import GSM8KTask, reference_answer
from bgpo.tasks.math500 import Math500Task, last_boxed

VAL_SEED = 0  # the held-out validation problems do not depend on the run's seed


@register_task("math")
class MathTask:
    """MATH train + GSM8K train (BGPO §4); see the module docstring for data and validation."""

    name = "math"

    def __init__(self, math_train: str | None = None, math_train_config: str | None = None,
                 math_train_split: str = "train", gsm8k_train: str | None = None,
                 gsm8k_test: str | None = None, math500_test: str = "HuggingFaceH4/MATH-500",
                 n_val: int = 128, test_file: str | None = None, n_test: int | None = None,
                 format_bonus: float = 0.0) -> None:
        if test_file is not None:
            raise ValueError("task.test_file: task math has two test sets; set "
                             "task.eval_tasks.gsm8k.test_file / task.eval_tasks.math500.test_source")
        if n_val < 1:
            raise ValueError(f"task.options.n_val={n_val} must be >= 1")
        self.math_train, self.math_train_config, self.math_train_split = math_train, math_train_config, \
            math_train_split
        self.gsm8k_train, self.n_val, self.n_test = gsm8k_train, n_val, n_test
        self.parts = {"gsm8k": GSM8KTask(train_file=gsm8k_train, test_file=gsm8k_test, n_test=n_test,
                                         format_bonus=format_bonus),
                      "math": Math500Task(test_source=math500_test, format_bonus=format_bonus)}
        self._split: tuple[list[Example], list[Example]] | None = None

    # ---- data ------------------------------------------------------------------------------------
    def _pool(self) -> tuple[list[Example], list[Example]]:
        """(validation, training) problems of the combined pool."""
        if self._split is None:
            if self.math_train is None:
                raise ValueError("task math needs task.options.math_train: MATH's training problems (a local "
                                 "file with problem/solution rows, or a hub data set name)")
            gsm8k = self.parts["gsm8k"]
            local = self.gsm8k_train is not None
            rows = load_records(self.gsm8k_train if local else gsm8k.hub_name,
                                None if local else gsm8k.hub_config, "train")
            pool = [Example({"question": r["question"], "answer": reference_answer(r["answer"])}, r["answer"],
                            {"origin": "gsm8k", "index": i}) for i, r in enumerate(rows)]
            test = {ex.fields["problem"].strip() for ex in self.parts["math"].test_examples()}
            math_rows = load_records(self.math_train, self.math_train_config, self.math_train_split)
            for i, r in enumerate(math_rows):
                if r["problem"].strip() not in test:
                    answer = r.get("answer") or last_boxed(r["solution"]) or ""
                    pool.append(Example({"problem": r["problem"], "answer": str(answer)}, r.get("solution"),
                                        {"origin": "math", "index": i}))
            if len(pool) <= self.n_val:
                raise ValueError(f"task.options.n_val={self.n_val} leaves no training problem of the "
                                 f"{len(pool)} in MATH + GSM8K train")
            random.Random(VAL_SEED).shuffle(pool)
            self._split = pool[: self.n_val], pool[self.n_val :]
        return self._split

    def train_examples(self, n: int, seed: int) -> list[Example]:
        """``n`` training problems (seeded shuffles of the pool minus validation, no repeat within a pass)."""
        return sample_pool(self._pool()[1], n, seed)

    def val_examples(self) -> list[Example]:
        """The ``n_val`` held-out training problems (checkpoint selection)."""
        return self._pool()[0]

    def test_examples(self) -> list[Example]:
        """GSM8K's test set then MATH500's (each cut to ``n_test``), origin kept."""
        return [dataclasses.replace(ex, meta={**ex.meta, "origin": origin})
                for origin in ("gsm8k", "math") for ex in self.parts[origin].test_examples()[: self.n_test]]

    # ---- prompts and rewards: those of the example's own task --------------------------------------
    def _part(self, ex: Example) -> GSM8KTask | Math500Task:
        return self.parts[ex.meta.get("origin", "math" if "problem" in ex.fields else "gsm8k")]

    def render(self, ex: Example, fmt: Format) -> str:
        return self._part(ex).render(ex, fmt)

    def target(self, ex: Example, fmt: Format) -> str:
        return self._part(ex).target(ex, fmt)

    def reward(self, ex: Example, completion: str, fmt: Format) -> float:
        return self._part(ex).reward(ex, completion, fmt)

    def correct(self, ex: Example, completion: str, fmt: Format) -> bool:
        return self._part(ex).correct(ex, completion, fmt)
