"""Where a run's device and base model come from: ``device=auto``, and the tiny base model of a task
(``model.path``, else the shipped one, hash-checked, or the cached one; ``model.base``).

Building a missing base model is ``bgpo.pretrain``'s (``ensure_base_model``); this module only
finds, checks and locks, so that the config checks, the results store and the trainer can ask
where a run starts without importing the pretraining entry point.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bgpo.model import cache_dir

log = logging.getLogger("bgpo.provision")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


SHIPPED_DIR = Path(__file__).resolve().parent / "base_models"
"""The tiny base models shipped in the repository (``tiny-<task>/``) and their ``manifest.json``:
per task the sha256 of every file, the command that rebuilt them and its measured time."""
BASES = ("shipped", "cache")
"""``model.base`` (tiny, ``model.path`` unset): the shipped base model of the task, hash-checked,
or ``$BGPO_CACHE/tiny-<task>``, pretrained there if missing"""


def default_path(task_name: str) -> Path:
    """The task's base model in the cache (``model.base=cache``; ``bgpo.pretrain``'s default out)."""
    return cache_dir() / f"tiny-{task_name}"


def shipped_manifest() -> dict:
    try:
        return json.loads((SHIPPED_DIR / "manifest.json").read_text())
    except FileNotFoundError:
        return {}


def check_base_task(folder: Path, task_name: str) -> None:
    """A tiny base model folder made by ``bgpo.pretrain`` (it has ``pretrain.json``) must be the
    given task's: a Countdown model never trains on Sudoku."""
    meta = folder / "pretrain.json"
    if not meta.is_file():
        return
    try:
        made_for = json.loads(meta.read_text())["task"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{meta} is unreadable: it does not say which task the base model is for") from None
    if made_for != task_name:
        raise ValueError(f"{meta}: this base model was pretrained for task {made_for!r}, not task.name="
                         f"{task_name!r} (pick its own base model, or model.base=shipped)")


def shipped_path(task_name: str) -> Path:
    """The shipped base model of ``task_name``, every file checked against its sha256 in the
    manifest (a ValueError names the missing or changed file and how to restore it)."""
    entry = shipped_manifest().get(task_name)
    if entry is None:
        raise ValueError(f"model.base=shipped: no base model is shipped for task {task_name!r} (shipped: "
                         f"{sorted(shipped_manifest())}); model.base=cache pretrains one, or set model.path")
    folder = SHIPPED_DIR / entry["folder"]
    fix = (f"restore it (git checkout -- {folder}) or rebuild the shipped model with `python -m "
           f"bgpo.pretrain task={task_name} ship=true`")
    for name, digest in sorted(entry["files"].items()):
        f = folder / name
        if not f.is_file():
            raise ValueError(f"{f} is missing from the shipped base model of {task_name}: {fix}")
        if (got := file_sha256(f)) != digest:
            raise ValueError(f"{f} fails its sha256 check (expected {digest[:12]}…, found {got[:12]}…): "
                             f"{fix}")
    check_base_task(folder, task_name)
    return folder


def tiny_base(task_name: str) -> Path:
    """The task's shipped base model when one is shipped (checked), else its cached one."""
    return shipped_path(task_name) if task_name in shipped_manifest() else default_path(task_name)


def base_model_path(task_name: str, model: Any) -> Path | None:
    """The folder a tiny run starts from: ``model.path``, else the shipped base model of the task
    (``model.base=shipped``, checked; a task without one: the cache) or the cached one
    (``model.base=cache``; may not exist yet).
    ``model`` is a ModelConfig, DictConfig or plain dict (a run's config.yaml; runs made before
    ``model.base`` existed started from the cache)."""
    get = model.get if isinstance(model, dict) else lambda k, d=None: getattr(model, k, d)
    if get("path"):
        return Path(str(get("path"))).expanduser()
    if get("kind", "tiny") != "tiny":
        return None
    return tiny_base(task_name) if get("base", "cache") == "shipped" else default_path(task_name)


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Exclusive lock on building the model folder ``out`` (a lock file beside it); waits."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(f"[provision] another process is building {out}: waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def local_model_folder(path: str, revision: str | None = None) -> str:
    """``path`` itself when it is a folder; a hub name's snapshot folder otherwise (its config and
    safetensors files from the local cache, downloaded when missing unless ``HF_HUB_OFFLINE=1``)."""
    if Path(path).expanduser().is_dir():
        return str(Path(path).expanduser())
    from huggingface_hub import snapshot_download

    return snapshot_download(path, revision=revision, allow_patterns=["*.json", "*.safetensors"])
