"""The results store: run folders keyed by config, atomic writes, provenance (no timestamps).

``results_dir/<method>-<task>-mc<mc>-s<seed>-<hash>/`` holds ``config.yaml`` (resolved),
``metrics.jsonl`` (one JSON object per RL step / evaluation), ``checkpoints/`` (git-ignored) and
``summary.json``, written atomically (temp file + rename) only when the run completes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# keys that say WHERE or HOW a run executes, not WHAT it computes: excluded from the run key
# (``parallel``: ddp is bit-exact to one process; fsdp changes only the order of float sums;
# ``logger``: trackers observe a run, they do not change it)
NON_IDENTITY_KEYS = ("results_dir", "run_dir", "device", "progress", "hydra", "parallel", "threads", "logger")


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are for everyone to read
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def config_hash(cfg: dict[str, Any]) -> str:
    """A stable hash of a resolved config, minus paths and launcher settings."""
    ident = {k: v for k, v in cfg.items() if k not in NON_IDENTITY_KEYS}
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_name(cfg: dict[str, Any]) -> str:
    method = cfg["method"]["_target_"].rsplit(".", 1)[-1].lower()
    return f"{method}-{cfg['task']['name']}-mc{cfg['mc']}-s{cfg['seed']}-{config_hash(cfg)}"


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device: str) -> dict[str, Any]:
    """Commit, package versions and device: recorded in every summary and benchmark row."""
    import torch
    import transformers

    return {"commit": git_commit(), "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(),
            "device": device}


def run_dir_of(cfg: dict[str, Any]) -> Path:
    """The run's folder: ``run_dir`` when given, else ``results_dir/<run_name>``."""
    return Path(cfg["run_dir"]) if cfg.get("run_dir") else Path(cfg["results_dir"]) / run_name(cfg)


def open_run(cfg: dict[str, Any], write: bool = True) -> tuple[Path, dict[str, Any] | None]:
    """Create the run folder with its resolved config; return the summary if the run is complete."""
    import yaml

    path = run_dir_of(cfg)
    summary = path / "summary.json"
    if summary.exists():
        return path, json.loads(summary.read_text())
    if write:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "config.yaml", yaml.safe_dump(cfg, sort_keys=True))
    return path, None


def finish_run(path: Path, cfg: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json`` atomically: the run counts as complete only once it exists."""
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    summary = {"run": path.name, "method": cfg["method"]["_target_"].rsplit(".", 1)[-1].lower(),
               "task": cfg["task"]["name"], "mc": cfg["mc"], "seed": cfg["seed"],
               "wall_s": round(sum(r["time/step_s"] for r in rows), 1), **result}
    atomic_write_json(path / "summary.json", summary)
    return summary


@contextlib.contextmanager
def run_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on a run folder while training it: yields False (and holds nothing)
    when another process — a second sweep, a requeued duplicate — is training the same run."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
