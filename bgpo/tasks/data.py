"""Where task data comes from (docs/methods.md §6): the d1 test files, local files, or the Hugging Face hub.

``d1_data_dir`` finds the folder holding d1's Countdown and Sudoku test files. ``load_records``
reads a local JSON/JSONL/CSV/parquet file, or a hub data set through ``datasets.load_dataset``;
``datasets`` is imported only then, so building a task never touches the network.

Local or hub? A value "looks local" when it is absolute, starts with ``.`` or ``~``, has a
backslash or more than one ``/``, or ends with a data-file suffix (``.jsonl``, ``.json``, ``.csv``,
``.tsv``, ``.parquet``, ``.arrow``, ``.txt``, optionally ``.gz``/``.bz2``/``.xz``/``.zst``). A
local-looking value that names no existing file is an error naming the key and the file, never a
hub request: ``data/gsm8k_tset.jsonl`` fails, ``openai/gsm8k`` goes to the hub. ``*_file`` keys are
local files only. ``check_task_data`` checks a task's data keys (and its option names) at
start-up, before any data or model is loaded; it imports neither torch nor ``datasets``.
``check_test_rows`` checks every row of ``task.test_file`` at start-up, naming the first bad one.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import tempfile
from collections.abc import Callable, Mapping
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


_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt")
_PACKED = (".gz", ".bz2", ".xz", ".zst")


def looks_local(source: str | Path) -> bool:
    """True when ``source`` reads as a local path rather than a hub name (see the module docstring)."""
    s = str(source)
    if s.startswith(("/", ".", "~")) or "\\" in s or s.count("/") > 1:
        return True
    name = s.lower()
    for packed in _PACKED:
        name = name.removesuffix(packed)
    return name.endswith(_DATA_SUFFIXES)


def check_local_file(key: str, path: str | Path) -> Path:
    """``path`` as an existing file, or ``FileNotFoundError`` naming ``key`` and the file."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        what = "is a folder, not a file" if resolved.is_dir() else "no such file"
        raise FileNotFoundError(f"{key}={str(path)!r}: {what} ({resolved.resolve()})")
    return resolved


def check_source(key: str, source: str | Path) -> None:
    """A hub name, or an existing local file or folder; a local-looking value that names nothing
    fails here, naming ``key`` (it is never sent to the hub)."""
    path = Path(source).expanduser()
    if looks_local(source) and not path.exists():
        raise FileNotFoundError(f"{key}={str(source)!r}: no such file ({path.resolve()}); a hub data set is "
                                "named owner/name")


def load_records(source: str, config: str | None = None, split: str = "train", key: str = "source",
                 local: bool = False) -> list[dict[str, Any]]:
    """Rows of ``source``: a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file (``split`` ignored),
    or a hub data set name (``config``, ``split`` passed to ``datasets.load_dataset``). ``local``:
    ``source`` must be a local file. A missing local-looking path fails naming ``key``."""
    if local:
        check_local_file(key, source)
    else:
        check_source(key, source)
    path = Path(source).expanduser()
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
    import datasets  # lazy: only here may the hub be contacted (or a local data set folder be read)

    return list(datasets.load_dataset(str(path) if path.is_dir() else source, config, split=split))


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


def check_task_data(name: str, test_file: str | None = None,
                    options: Mapping[str, Any] | None = None) -> None:
    """Start-up check of a task's data settings, before anything is loaded: the option names are
    constructor arguments of the task, every local data path exists (``DATA_FILES``: local files;
    ``DATA_SOURCES``: hub name or local path). Errors name the key as configured
    (``task.test_file``, ``task.options.<key>``)."""
    import inspect

    from bgpo.tasks.base import _REGISTRY, task_names

    if name not in _REGISTRY:
        raise ValueError(f"task.name={name!r} is not a registered task; allowed: {task_names()}")
    cls = _REGISTRY[name]
    options = dict(options or {})
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = sorted(k for k in params if k not in ("self", "test_file", "n_test"))
    for k in options:
        if k in ("test_file", "n_test"):
            raise ValueError(f"task.options.{k}: set task.{k} instead")
        if k not in params and not takes_any:
            raise ValueError(f"task.options.{k} is not an option of task {name!r}; allowed: {allowed}")
    values = {"test_file": test_file, **options}
    for k in getattr(cls, "DATA_FILES", ("test_file",) if "test_file" in params else ()):
        if values.get(k):
            check_local_file("task.test_file" if k == "test_file" else f"task.options.{k}", values[k])
    for k in getattr(cls, "DATA_SOURCES", ()):
        if values.get(k):
            check_source(f"task.options.{k}", values[k])
def check_test_rows(task: str, test_file: str | None, n_test: int | None, options: dict[str, Any],
                    fmt: str) -> None:
    """Start-up check of ``task.test_file``'s ROWS (issue 15; after ``check_task_data``, which
    checks the keys and that the files exist), before any model is built: the file loads THROUGH
    THE TASK (its own parser and field checks) and every problem renders; a failure names the first
    bad row as ``file:line`` (found by loading ever shorter prefixes of the file, so any task's
    loader is covered)."""
    from bgpo.tasks.base import get_task

    if not test_file:
        return
    path = check_local_file("task.test_file", test_file)

    def load(file: Path, n: int | None = None) -> int:
        t = get_task(task, **{**options, "test_file": str(file), "n_test": n})
        examples = t.test_examples()
        for ex in examples:
            t.render(ex, fmt)  # type: ignore[arg-type]
        return len(examples)

    try:
        n_rows = load(path)
    except Exception as e:  # noqa: BLE001  (any loader error is a bad row: locate it)
        where = first_bad_row(path, load)
        raise ValueError(f"task.test_file={test_file}: bad row at {where}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())}") from None
    if n_rows == 0:
        raise ValueError(f"task.test_file={test_file}: the file has no rows")
    if n_test is not None:
        try:
            load(path, n_test)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"task.n_test={n_test} does not fit task.test_file={test_file} "
                             f"({n_rows} rows): {e}") from None


def first_bad_row(path: Path, load: Callable[[Path], object]) -> str:
    """``file:line`` of the first row of a JSONL / CSV file (``.gz`` too) at which ``load`` of the
    file's prefix fails (bisection over prefixes: log₂(rows) loads); ``file`` alone when the
    format has no lines or no prefix fails."""
    raw = path.read_bytes()
    gz = path.name.endswith(".gz")
    if gz:
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return f"{path}:{line} (not UTF-8)"
    name = path.name.removesuffix(".gz")
    if not name.endswith((".jsonl", ".csv")):
        return str(path)
    lines = text.splitlines(keepends=True)
    header = lines[:1] if name.endswith(".csv") else []
    rows = [(i + 1, line) for i, line in enumerate(lines) if line.strip() and i >= len(header)]

    def fails(k: int) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / path.name
            body = "".join(header + [line if line.endswith("\n") else line + "\n" for _, line in rows[:k]])
            part.write_bytes(gzip.compress(body.encode()) if gz else body.encode())
            try:
                load(part)
            except Exception:  # noqa: BLE001
                return True
            return False

    if not rows or not fails(len(rows)):
        return str(path)
    lo, hi = 1, len(rows)  # the answer is in [lo, hi]: the shortest failing prefix
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fails(mid) else (mid + 1, hi)
    return f"{path}:{rows[lo - 1][0]}"
