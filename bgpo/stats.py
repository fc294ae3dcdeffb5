"""Intervals for accuracies measured on a finite test set (and a few seeds): what every table cell reports.

- ``wilson``: the 95% Wilson score interval of a binomial proportion — for ONE deterministic
  evaluation (the base model, greedy), whose only randomness is which problems the test set holds.
- ``bootstrap``: a paired, two-level percentile bootstrap over test problems and seeds. One
  replicate draws the problems with replacement ONCE (the same indices for every arm: the pairing)
  and, for each arm independently, its seeds with replacement; an arm's value is the mean over its
  drawn seeds and problems. A difference between two arms (a method and the base, or BGPO) is taken
  replicate by replicate, so what the arms share — the problems — cancels, as a paired test does.

Each arm is a matrix ``[seeds, problems]`` of per-problem scores (1/0 accuracy, or a fraction such
as Sudoku's share of empty cells right); every arm of one comparison holds the same problems in
the same order. Deterministic in ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    value: float
    lo: float
    hi: float
    n_problems: int
    n_seeds: int

    def pct(self, digits: int = 1) -> str:
        """``"15.4 [12.1, 18.9]"`` in percent."""
        return f"{100 * self.value:.{digits}f} [{100 * self.lo:.{digits}f}, {100 * self.hi:.{digits}f}]"

    def signed_pct(self, digits: int = 1) -> str:
        """``"+3.1 [+0.4, +5.9]"`` in percentage points (a difference)."""
        return f"{100 * self.value:+.{digits}f} [{100 * self.lo:+.{digits}f}, {100 * self.hi:+.{digits}f}]"

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def wilson(successes: float, n: int, z: float = Z95) -> Interval:
    """95% Wilson score interval of ``successes / n`` (one evaluation, one seed)."""
    if n <= 0:
        raise ValueError("wilson: n must be > 0")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n, 1)


def _as_matrix(scores: np.ndarray | list) -> np.ndarray:
    m = np.asarray(scores, dtype=np.float64)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"scores must be [seeds, problems], got shape {m.shape}")
    return m


def bootstrap(arms: dict[str, np.ndarray | list], diffs: list[tuple[str, str]] = (), n_boot: int = 2000,
              seed: int = 0, level: float = 0.95) -> dict[str, Interval]:
    """Percentile intervals of each arm's mean and of each difference ``a − b`` in ``diffs``
    (keys ``"a"`` and ``"a-b"``) by the paired two-level bootstrap described above."""
    mats = {k: _as_matrix(v) for k, v in arms.items()}
    n = {m.shape[1] for m in mats.values()}
    if len(n) != 1:
        raise ValueError(f"every arm must hold the same problems; got problem counts {sorted(n)}")
    P = n.pop()
    rng = np.random.default_rng(seed)
    problems = rng.integers(0, P, (n_boot, P))  # shared by every arm: the pairing
    reps = {}
    for k, m in mats.items():  # [n_boot] means over each replicate's drawn seeds and problems
        seeds = rng.integers(0, m.shape[0], (n_boot, m.shape[0]))
        reps[k] = m[seeds[:, :, None], problems[:, None, :]].mean(axis=(1, 2))
    alpha = (1 - level) / 2
    out: dict[str, Interval] = {}

    def interval(point: float, samples: np.ndarray, seeds: int) -> Interval:
        lo, hi = np.quantile(samples, [alpha, 1 - alpha])
        return Interval(point, float(lo), float(hi), P, seeds)

    for k, m in mats.items():
        out[k] = interval(float(m.mean()), reps[k], m.shape[0])
    for a, b in diffs:
        out[f"{a}-{b}"] = interval(float(mats[a].mean() - mats[b].mean()), reps[a] - reps[b],
                                   min(mats[a].shape[0], mats[b].shape[0]))
    return out
