"""Where task data comes from (SPEC §5): the d1 test files, local files, or the Hugging Face hub.

``d1_data_dir`` finds the folder holding d1's Countdown and Sudoku test files. ``load_records``
reads a local JSON/JSONL/CSV/parquet file, or a hub data set through ``datasets.load_dataset``;
``datasets`` is imported only then, so building a task never touches the network.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

D1_ENV = "BGPO_D1_DATA"
COUNTDOWN_D1_FILE = "countdown_cd3_test_d1.jsonl"
SUDOKU_D1_FILE = "sudoku_4x4_test_d1.csv"


def d1_data_dir() -> Path | None:
    """``$BGPO_D1_DATA`` if set, else ``<repo root>/../shared/data`` if it exists, else None."""
    env = os.environ.get(D1_ENV)
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]  # bgpo/tasks/data.py -> repo root
    shared = repo_root.parent / "shared" / "data"
    return shared if shared.is_dir() else None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (``.gz`` allowed); blank lines are skipped."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        return [json.loads(line) for line in f if line.strip()]


def load_records(source: str, config: str | None = None, split: str = "train") -> list[dict[str, Any]]:
    """Rows of ``source``: a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file (``split`` ignored),
    or a hub data set name (``config``, ``split`` passed to ``datasets.load_dataset``)."""
    path = Path(source)
    if path.is_file():
        name = path.name.removesuffix(".gz")
        if name.endswith(".jsonl"):
            return read_jsonl(path)
        if name.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, list) else data[split]
        if name.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if name.endswith(".parquet"):
            import datasets  # lazy: heavy import

            return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
        raise ValueError(f"unsupported data file {source!r}: use .jsonl, .json, .csv or .parquet")
    import datasets  # lazy: only here may the hub be contacted

    return list(datasets.load_dataset(source, config, split=split))


def sample_pool(pool: list[T], n: int, seed: int) -> list[T]:
    """``n`` items of ``pool``: seeded shuffles of the whole pool, concatenated until ``n`` are drawn
    (so no item repeats before every item has been used)."""
    if not pool:
        raise ValueError("empty training pool")
    rng = random.Random(seed)
    out: list[T] = []
    while len(out) < n:
        order = list(pool)
        rng.shuffle(order)
        out.extend(order[: n - len(out)])
    return out
