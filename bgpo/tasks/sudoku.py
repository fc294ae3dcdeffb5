"""4×4 Sudoku (docs/methods.md §6): 16-character strings read row by row, ``0`` = empty cell.

Grids. There are exactly 288 valid 4×4 grids (``all_grids``, by backtracking). The split is BY
GRID, so a test score never measures memorised grids:

- default: the sorted grids shuffled with ``split_seed`` -> 160 training grids, 40 validation grids
  and 88 test grids (the SPG paper's 200 / 88 re-split, its 200 cut into training and validation);
  the suite's own test set is ``n_test`` (default 1024) distinct puzzles made from test grids only,
  seed ``TEST_SEED``; the validation set (checkpoint selection) ``n_val`` (default 256) puzzles of
  the validation grids, seed ``VAL_SEED``;
- ``test_file`` (d1's CSV ``Puzzle,Solution``): the test set is the file, and training uses only
  the grids that occur in none of its solutions (59 for d1's file), minus the validation grids among
  them (a fifth, 12 for d1's file), which make the validation set. ``n_test=k`` draws k rows the
  way d1 does (``np.random.seed(42); np.random.choice(len, k, replace=False)``, assuming nothing
  else draws from numpy's global state in between); ``n_test=None`` keeps all rows in file order.

Puzzles. ``n_empty`` cells (default 8: every puzzle in d1's test file has exactly 8 empty cells)
are blanked at random, re-drawing up to 50 times until the puzzle has a unique solution (a bitmask
count over the 288 grids; d1's own file is only 75% unique: 376 of 500).

Reward (docs/methods.md §6). The fraction of originally-empty cells filled correctly: the answer (whole
completion for ``compact``; the last ``<answer>...</answer>`` for ``d1``, none -> 0) is reduced
to its ASCII digits, the first 16 are read as the grid, and each empty cell of the puzzle counts
if that digit equals the reference solution's; missing digits count as wrong. ``correct`` is
reward == 1.
"""

from __future__ import annotations

import csv
import functools
import itertools
import random

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

N_TRAIN_GRIDS = 200  # SPG's re-split: 200 training grids, 88 test grids
N_VAL_GRIDS = 40  # of those 200, held out for validation
TEST_SEED = 20240502  # seed of the suite's own test puzzles
N_TEST = 1024  # size of the suite's own test set: one run's 95% interval is about ±3 points
VAL_SEED = 20240512  # seed of the suite's validation puzzles
D1_SAMPLE_SEED = 42  # d1 evaluates n rows drawn with numpy seed 42
_DIGITS = frozenset("0123456789")


def _peers(i: int) -> set[int]:
    r, c = divmod(i, 4)
    return {
        j
        for j in range(16)
        if j != i and (j // 4 == r or j % 4 == c or (j // 8 == i // 8 and (j % 4) // 2 == c // 2))
    }


_PEERS = [_peers(i) for i in range(16)]


@functools.lru_cache(maxsize=1)
def all_grids() -> tuple[str, ...]:
    """The 288 valid 4×4 Sudoku grids, sorted."""
    out: list[str] = []
    g = [0] * 16

    def fill(i: int) -> None:
        if i == 16:
            out.append("".join(map(str, g)))
            return
        for d in range(1, 5):
            if all(g[j] != d for j in _PEERS[i]):
                g[i] = d
                fill(i + 1)
                g[i] = 0

    fill(0)
    return tuple(sorted(out))


def is_valid_grid(s: str) -> bool:
    """A complete grid obeying the row, column and 2×2 box rules."""
    return len(s) == 16 and set(s) <= set("1234") and all(s[i] != s[j] for i in range(16) for j in _PEERS[i])


def grid_split(split_seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(160 training, 40 validation, 88 test grids), deterministic in ``split_seed``."""
    grids = list(all_grids())
    random.Random(split_seed).shuffle(grids)
    n = N_TRAIN_GRIDS - N_VAL_GRIDS
    return sorted(grids[:n]), sorted(grids[n:N_TRAIN_GRIDS]), sorted(grids[N_TRAIN_GRIDS:])


@functools.lru_cache(maxsize=1)
def _masks() -> list[list[int]]:
    """masks[cell][digit]: bitmask over ``all_grids()`` of grids holding ``digit`` at ``cell``."""
    masks = [[0] * 5 for _ in range(16)]
    for k, g in enumerate(all_grids()):
        for cell, ch in enumerate(g):
            masks[cell][int(ch)] |= 1 << k
    return masks


def n_solutions(puzzle: str) -> int:
    """Number of valid grids consistent with the givens of ``puzzle``."""
    masks = _masks()
    m = (1 << len(all_grids())) - 1
    for cell, ch in enumerate(puzzle):
        if ch != "0":
            m &= masks[cell][int(ch)]
    return m.bit_count()


def make_puzzle(grid: str, rng: random.Random, n_empty: int = 8, tries: int = 50) -> str:
    """Blank ``n_empty`` random cells of ``grid``; prefer a uniquely solvable puzzle."""
    puzzle = grid
    for _ in range(tries):
        empty = set(rng.sample(range(16), n_empty))
        puzzle = "".join("0" if i in empty else ch for i, ch in enumerate(grid))
        if n_solutions(puzzle) == 1:
            break
    return puzzle


def read_d1_csv(path: str) -> list[tuple[str, str]]:
    """(puzzle, solution) rows of a d1 CSV with header ``Puzzle,Solution``; a row whose puzzle is
    not 16 digits 0-4 or whose solution is not a valid grid keeping the puzzle's givens is an error
    (the start-up check names its line: ``bgpo.tasks.data.check_test_rows``)."""
    check_local_file("test_file", path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(row["Puzzle"].strip(), row["Solution"].strip()) for row in csv.DictReader(f)]
    for puzzle, solution in rows:
        if len(puzzle) != 16 or not set(puzzle) <= set("01234"):
            raise ValueError(f"puzzle {puzzle!r} is not 16 digits 0-4")
        if not is_valid_grid(solution) or any(puzzle[i] not in ("0", solution[i]) for i in range(16)):
            raise ValueError(f"solution {solution!r} is not a valid grid keeping the givens of {puzzle!r}")
    return rows


@register_task("sudoku")
class SudokuTask:
    """docs/methods.md §6 Sudoku 4×4 with a by-grid train/test split (see the module docstring)."""

    DATA_FILES = ("test_file",)
    name = "sudoku"

    def __init__(
        self, test_file: str | None = None, n_test: int | None = None, n_empty: int = 8, split_seed: int = 0,
        n_val: int = 256,
    ) -> None:
        self.test_file = test_file
        self.n_test = n_test
        self.n_val = n_val
        self.n_empty = n_empty
        self.split_seed = split_seed
        self._test: list[Example] | None = None

    # ---- data ----
    def test_examples(self) -> list[Example]:
        if self._test is None:
            self._test = self._load_file() if self.test_file else self._own_test()
        return self._test

    def _load_file(self) -> list[Example]:
        assert self.test_file is not None
        rows = read_d1_csv(self.test_file)
        if self.n_test is None:
            idx = list(range(len(rows)))
        else:
            import numpy as np  # d1's draw: np.random.seed(42); np.random.choice(...)

            idx = np.random.RandomState(D1_SAMPLE_SEED).choice(len(rows), self.n_test, replace=False).tolist()
        return [
            Example({"puzzle": rows[i][0]}, rows[i][1], {"source": self.test_file, "index": i}) for i in idx
        ]

    def _own_test(self) -> list[Example]:
        n = N_TEST if self.n_test is None else self.n_test
        return self._puzzles(grid_split(self.split_seed)[2], n, TEST_SEED, "generated-test")

    def val_examples(self) -> list[Example]:
        """The validation set (checkpoint selection): ``n_val`` puzzles of the validation grids."""
        return self._puzzles(self._grids()[1], self.n_val, VAL_SEED, "generated-val")

    def _puzzles(self, grids: list[str], n: int, seed: int, source: str) -> list[Example]:
        rng = random.Random(seed)
        seen: set[str] = set()
        exs: list[Example] = []
        while len(exs) < n:
            grid = rng.choice(grids)
            puzzle = make_puzzle(grid, rng, self.n_empty)
            if puzzle not in seen:
                seen.add(puzzle)
                exs.append(Example({"puzzle": puzzle}, grid, {"source": source, "index": len(exs)}))
        return exs

    def _grids(self) -> tuple[list[str], list[str]]:
        """(training, validation) grids: never a grid of the test set in use."""
        train, val, _ = grid_split(self.split_seed)
        if self.test_file:
            used = {sol for _, sol in read_d1_csv(self.test_file)}
            free = [g for g in all_grids() if g not in used]
            val = free[::5]  # every fifth free grid (sorted order)
            return [g for g in free if g not in set(val)], val
        return train, val

    def train_grids(self) -> list[str]:
        """Grids training may use: never a grid of the test set in use nor of the validation set."""
        return self._grids()[0]

    def train_examples(self, n: int, seed: int) -> list[Example]:
        grids = self.train_grids()
        rng = random.Random(seed)
        exs = []
        for _ in range(n):
            grid = rng.choice(grids)
            exs.append(Example({"puzzle": make_puzzle(grid, rng, self.n_empty)}, grid, {"source": "train"}))
        return exs

    # ---- text ----
    def render(self, ex: Example, fmt: Format) -> str:
        check_format(fmt)
        puzzle = ex.fields["puzzle"]
        if fmt == "compact":
            return f"{puzzle}|"
        return (
            "Solve this 4x4 Sudoku. The grid is written as 16 digits, row by row from the top left, "
            f"with 0 for an empty cell: {puzzle}\n"
            "Every row, every column and each of the four 2x2 boxes must contain 1, 2, 3 and 4 "
            "exactly once; keep the given digits.\n"
            + D1_INSTRUCTIONS
            + "\nThe final answer is the completed grid as 16 digits with no spaces."
        )

    def target(self, ex: Example, fmt: Format) -> str:
        check_format(fmt)
        if ex.solution is None:
            raise ValueError("this Sudoku example has no solution")
        if fmt == "compact":
            return ex.solution
        rows = " / ".join(ex.solution[i : i + 4] for i in range(0, 16, 4))
        return d1_completion(
            f"Filling each empty cell with the one digit its row, column and box lack: {rows}", ex.solution
        )

    def near_miss(self, ex: Example, fmt: Format) -> str:
        """The target with one systematic slip: the first empty cell holds the next digit (d % 4 + 1)
        instead of d, so 7 of 8 cells are right. Mixed into the tiny base model's SFT targets
        (``task.sft_near_miss``)."""
        if ex.solution is None:
            raise ValueError("this Sudoku example has no solution")
        i = ex.fields["puzzle"].index("0")
        sol = ex.solution
        slipped = sol[:i] + str(int(sol[i]) % 4 + 1) + sol[i + 1:]
        return self.target(Example(ex.fields, slipped, ex.meta), fmt)

    # ---- reward (docs/methods.md §6) ----
    def reward(self, ex: Example, completion: str, fmt: Format) -> float:
        check_format(fmt)
        answer = completion if fmt == "compact" else last_answer(completion)
        if answer is None or ex.solution is None:
            return 0.0
        digits = list(itertools.islice((ch for ch in answer if ch in _DIGITS), 16))  # stops at 16
        empty = [i for i, ch in enumerate(ex.fields["puzzle"]) if ch == "0"]
        if not empty:
            return 0.0
        hits = sum(1 for i in empty if i < len(digits) and digits[i] == ex.solution[i])
        return hits / len(empty)

    def correct(self, ex: Example, completion: str, fmt: Format) -> bool:
        return self.reward(ex, completion, fmt) == 1.0
