"""Countdown with 3 numbers (docs/methods.md §6): reach ``target`` with + - * / and parentheses, each
number once.

Data. Problems are generated, seeded: three numbers drawn uniformly from 1..100 (with
replacement), then a target drawn uniformly from the integers in 1..100 that some expression over
all three numbers reaches. This matches d1's test file (``countdown_cd3_test_d1.jsonl``: numbers
1..100, mean 50.7, 8 of 256 problems with a repeated number, i.e. drawn with replacement; integer
targets 1..100, mean 45.5, median 43, skewed to small values; the generator gives mean 44.5,
median 42). The ``solution`` is canonical: fewest parentheses, then numbers in prompt order.

Split. A problem is (sorted numbers, target). A stable hash (sha256) of it puts 1 in ``TEST_MOD``
of all problems in the test bucket and another 1 in ``TEST_MOD`` in the validation bucket; training
never draws from either. The suite's own test set (``n_test`` problems, default 1024, seed
``TEST_SEED``) is drawn only from the test bucket, the validation set (``n_val``, default 256, seed
``VAL_SEED``; checkpoint selection) only from the validation bucket. When ``test_file`` (a d1-style
JSONL, ``{"input": "30,100,93", "output": "23"}``) is given, it is the test set (its first
``n_test`` rows when ``n_test`` is set) and its problems are excluded from training and validation.

Reward (docs/methods.md §6). 1.0 if the multiset of literals equals the given numbers and the value is within
1e-5 of the target; 0.1 if the answer is an equation that parses (``arith.evaluate``) but is
wrong; 0 otherwise. The answer is the whole completion (``compact``) or the content of the last
``<answer>...</answer>`` (``d1``; none -> 0). Only ``[0-9+-*/() ]`` is parsed: any other
character (``=``, ``.``, letters) makes the answer "no equation" -> 0, where d1 would give 0.1.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections.abc import Sequence
from fractions import Fraction

from bgpo.tasks.arith import try_evaluate
from bgpo.tasks.base import (
    D1_INSTRUCTIONS,
    Example,
    Format,
    check_format,
    d1_completion,
    last_answer,
    register_task,
)
from bgpo.tasks.data import check_local_file

NUM_LO, NUM_HI = 1, 100  # range of the given numbers (d1 file: 1..100)
TARGET_LO, TARGET_HI = 1, 100  # range of the integer targets (d1 file: 1..100)
TEST_MOD = 10  # 1 in TEST_MOD problems (by hash) is reserved for testing
TEST_SEED = 20240501  # seed of the suite's own test set
N_TEST = 1024  # size of the suite's own test set: one run's 95% interval is about ±3 points
VAL_SEED = 20240511  # seed of the suite's validation set
TOLERANCE = Fraction(1, 10**5)
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_SLIP = {"+": "-", "-": "+", "*": "/", "/": "*"}  # near_miss: an operator and its inverse


def problem_key(numbers: Sequence[int], target: int) -> str:
    return ",".join(str(n) for n in sorted(numbers)) + f"={target}"


def bucket(numbers: Sequence[int], target: int) -> int:
    """Stable hash split of the problem space: 0 = test, 1 = validation, else training."""
    digest = hashlib.sha256(problem_key(numbers, target).encode()).hexdigest()
    return int(digest[:16], 16) % TEST_MOD


def in_test_bucket(numbers: Sequence[int], target: int) -> bool:
    """True for the 1/TEST_MOD of all problems reserved for testing."""
    return bucket(numbers, target) == 0


def _apply(x: float, op: str, y: float) -> float | None:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return x / y if y != 0 else None


def reachable(numbers: Sequence[int]) -> dict[int, list[str]]:
    """Integer targets in [TARGET_LO, TARGET_HI] reachable with all three numbers -> expressions.
    Floats for speed; the expression finally used is re-checked exactly."""
    out: dict[int, list[str]] = {}
    for a, b, c in sorted(set(itertools.permutations(numbers))):
        for o1, o2 in itertools.product("+-*/", repeat=2):
            # (a o1 b) o2 c
            ab = _apply(a, o1, b)
            v = _apply(ab, o2, c) if ab is not None else None
            left = f"({a}{o1}{b})" if _PREC[o1] < _PREC[o2] else f"{a}{o1}{b}"
            cands = [(v, f"{left}{o2}{c}")]
            # a o1 (b o2 c)
            bc = _apply(b, o2, c)
            v = _apply(a, o1, bc) if bc is not None else None
            paren = _PREC[o2] < _PREC[o1] or (_PREC[o2] == _PREC[o1] and o1 in "-/")
            cands.append((v, f"{a}{o1}({b}{o2}{c})" if paren else f"{a}{o1}{b}{o2}{c}"))
            for val, expr in cands:
                if val is None or abs(val - round(val)) > 1e-9:
                    continue
                t = round(val)
                if TARGET_LO <= t <= TARGET_HI:
                    out.setdefault(t, []).append(expr)
    return out


def _canonical_key(expr: str, numbers: Sequence[int]) -> tuple:
    """Order of preference among correct expressions, so the SFT target is a learnable function
    of the problem: fewest parentheses, then the numbers in the order the prompt gives them."""
    free = list(range(len(numbers)))
    positions = []
    for lit in re.findall(r"\d+", expr):
        i = next(j for j in free if numbers[j] == int(lit))
        free.remove(i)
        positions.append(i)
    return (expr.count("("), tuple(positions), expr)


def _draw(rng: random.Random) -> tuple[list[int], int, str]:
    """One random problem (numbers, target, a solving expression)."""
    while True:
        numbers = [rng.randint(NUM_LO, NUM_HI) for _ in range(3)]
        table = reachable(numbers)
        if not table:
            continue
        target = rng.choice(sorted(table))
        exprs = sorted(set(table[target]), key=lambda e: _canonical_key(e, numbers))
        for expr in exprs:  # the float search may round; keep an exactly correct one
            ev = try_evaluate(expr)
            if ev is not None and ev.value == target:
                return numbers, target, expr


def _example(numbers: Sequence[int], target: int, solution: str | None, **meta: object) -> Example:
    return Example(fields={"numbers": list(numbers), "target": int(target)}, solution=solution, meta=meta)


@register_task("countdown")
class CountdownTask:
    """docs/methods.md §6 Countdown (3 numbers). ``test_file``: d1-style JSONL used as the test set;
    ``n_test``: size of the own test set (default 1024) or the first ``n_test`` rows of the file."""

    DATA_FILES = ("test_file",)
    name = "countdown"

    def __init__(self, test_file: str | None = None, n_test: int | None = None, n_val: int = 256) -> None:
        self.test_file = test_file
        self.n_test = n_test
        self.n_val = n_val
        self._test: list[Example] | None = None

    # ---- data ----
    def test_examples(self) -> list[Example]:
        if self._test is None:
            self._test = self._load_file() if self.test_file else self._own_test()
        return self._test

    def _load_file(self) -> list[Example]:
        assert self.test_file is not None
        check_local_file("test_file", self.test_file)
        exs = []
        with open(self.test_file, encoding="utf-8") as f:
            for i, line in enumerate(x for x in f if x.strip()):
                row = json.loads(line)
                numbers = [int(x) for x in str(row["input"]).split(",")]
                exs.append(_example(numbers, int(row["output"]), None, source=self.test_file, index=i))
        return exs[: self.n_test] if self.n_test is not None else exs

    def _own_test(self) -> list[Example]:
        n = N_TEST if self.n_test is None else self.n_test
        return self._from_bucket(0, n, TEST_SEED, "generated-test")

    def val_examples(self) -> list[Example]:
        """The validation set (checkpoint selection): ``n_val`` problems of the validation bucket."""
        banned = set() if self.test_file is None else self._keys(self.test_examples())
        return [ex for ex in self._from_bucket(1, self.n_val + len(banned), VAL_SEED, "generated-val")
                if problem_key(ex.fields["numbers"], ex.fields["target"]) not in banned][: self.n_val]

    def _from_bucket(self, b: int, n: int, seed: int, source: str) -> list[Example]:
        rng = random.Random(seed)
        seen: set[str] = set()
        exs: list[Example] = []
        while len(exs) < n:
            numbers, target, expr = _draw(rng)
            key = problem_key(numbers, target)
            if bucket(numbers, target) == b and key not in seen:
                seen.add(key)
                exs.append(_example(numbers, target, expr, source=source, index=len(exs)))
        return exs

    @staticmethod
    def _keys(exs: list[Example]) -> set[str]:
        return {problem_key(ex.fields["numbers"], ex.fields["target"]) for ex in exs}

    def train_examples(self, n: int, seed: int) -> list[Example]:
        """``n`` generated problems; never from the test or validation buckets nor from ``test_file``."""
        banned = self._keys(self.test_examples())
        rng = random.Random(seed)
        exs: list[Example] = []
        while len(exs) < n:
            numbers, target, expr = _draw(rng)
            if bucket(numbers, target) in (0, 1) or problem_key(numbers, target) in banned:
                continue
            exs.append(_example(numbers, target, expr, source="generated-train"))
        return exs

    # ---- text ----
    def render(self, ex: Example, fmt: Format) -> str:
        check_format(fmt)
        nums, target = ex.fields["numbers"], ex.fields["target"]
        if fmt == "compact":
            return ",".join(str(x) for x in nums) + f"={target}|"
        return (
            f"Using the numbers {', '.join(str(x) for x in nums)}, write an arithmetic expression "
            f"equal to {target}. Use each number exactly once; the allowed operations are + - * / "
            "and parentheses.\n"
            + D1_INSTRUCTIONS
            + "\nThe final answer is the expression alone, for example <answer>(1+2)*3</answer>."
        )

    def target(self, ex: Example, fmt: Format) -> str:
        check_format(fmt)
        expr = ex.solution
        if expr is None:  # file problems carry no solution: search one
            table = reachable(ex.fields["numbers"])
            exprs = sorted(set(table.get(ex.fields["target"], [])))
            exact = [e for e in exprs if (ev := try_evaluate(e)) and ev.value == ex.fields["target"]]
            if not exact:
                raise ValueError(f"no expression found for {ex.fields}")
            expr = exact[0]
        if fmt == "compact":
            return expr
        return d1_completion(f"{expr} = {ex.fields['target']}", expr)

    def near_miss(self, ex: Example, fmt: Format) -> str:
        """The target with one systematic slip: its first operator swapped for its inverse (+ <-> -,
        * <-> /), so the numbers and the shape are right and the value (almost always) wrong. Mixed
        into the tiny base model's SFT targets (``task.sft_near_miss``)."""
        expr = self.target(ex, "compact")
        i = next(k for k, ch in enumerate(expr) if ch in _SLIP)
        slipped = expr[:i] + _SLIP[expr[i]] + expr[i + 1:]
        if fmt == "compact":
            return slipped
        return d1_completion(f"{slipped} = {ex.fields['target']}", slipped)

    # ---- reward (docs/methods.md §6) ----
    def reward(self, ex: Example, completion: str, fmt: Format) -> float:
        check_format(fmt)
        answer = completion if fmt == "compact" else last_answer(completion)
        if answer is None:
            return 0.0
        ev = try_evaluate(answer.strip())
        if ev is None:
            return 0.0  # no equation
        ok_numbers = sorted(ev.numbers) == sorted(ex.fields["numbers"])
        ok_value = abs(ev.value - ex.fields["target"]) <= TOLERANCE
        return 1.0 if ok_numbers and ok_value else 0.1

    def correct(self, ex: Example, completion: str, fmt: Format) -> bool:
        return self.reward(ex, completion, fmt) == 1.0
