"""A run's checkpoints: written atomically, read back without trusting them (issues 15, 25).

Two formats of one content, chosen by the process layout (``bgpo.parallel``):

- ``last.pt`` (one process, ``parallel=ddp``): one ``torch.save`` file with the full state,
  written by rank 0;
- ``last.dcp/`` (``parallel=fsdp``): a ``torch.distributed.checkpoint`` folder in which every rank
  writes its own shard of the model and of AdamW's state, never gathered (LLaDA-8B with AdamW is
  ~96 GB: rank 0 would hold it all on the host, every ``ckpt_every`` steps), plus ``header.pt``
  with the rest. Resuming, each rank reads only its shard; a different world size is resharded by
  DCP, and either format resumes under either layout (``parallel`` is not part of the run key).

The content: ``step``, ``model``, ``opt``, ``sched``, ``rng``, ``resumed_at``, ``commits``, the
run's wall seconds up to the checkpoint over all its sittings ``wall_s`` and the run key ``run``
(``best`` holds ``step``, ``model`` and ``run``). ``last`` is written to a temporary name, fsynced
and renamed, the one before it kept as ``prev``: a crash leaves the old checkpoint or the new one,
whole. Reading: a file that fails to parse is set aside (``*.corrupt``, by name) and
the run goes on without it; a failure of the machine (out of memory, CUDA, I/O:
``bgpo.results.machine_error``) is never taken for corruption: every rank stops with it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from bgpo.parallel import Dist
from bgpo.results import (
    check_checkpoint_run,
    fsync_dir,
    keep_metrics,
    machine_error,
    missing_step,
    read_metrics,
    reason,
    set_aside,
    warn,
)

log = logging.getLogger(__name__)

SUFFIX = {False: ".pt", True: ".dcp"}
HEADER = "header.pt"
CHECKPOINT_FIELDS = ("step", "model", "opt", "sched", "rng")
UNVERIFIED = ("{path} records no run key (written before checkpoints carried one): used, but that it is this "
              "run's cannot be verified")


def path_of(folder: Path, name: str, dist: Dist) -> Path:
    """Where this layout writes checkpoint ``name`` (``last``, ``best``): ``.dcp`` under FSDP."""
    return folder / f"{name}{SUFFIX[dist.fsdp]}"


def existing(folder: Path, name: str) -> list[Path]:
    """Checkpoint ``name`` in either format, those that exist."""
    return [p for p in (folder / f"{name}.pt", folder / f"{name}.dcp") if p.exists()]


# ---- writing --------------------------------------------------------------------------------------
def save_checkpoint(path: Path, dist: Dist, net: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                    step: int, resumed_at: list[int], commits: list[str], key: str,
                    wall_s: float | None = None) -> None:
    """Model + optimizer (keyed by parameter name), scheduler, RNG, the commits the run was trained
    with, its wall seconds so far (None: unknown) and its run key ``key`` at ``path`` (``last.pt`` or
    ``last.dcp``), the previous checkpoint kept as ``prev`` (a last good one if this one is found
    corrupt). Every rank calls it."""
    header = {"step": step, "sched": sched.state_dict(), "rng": torch.get_rng_state(),
              "resumed_at": resumed_at, "commits": commits, "wall_s": wall_s, "run": key}
    if path.suffix == ".dcp":
        write_sharded(path, dist, {"model": net, "opt": opt}, header, keep_previous=True)
        return
    model, optim = dist.state_dicts(net, opt)  # ddp: every rank's own whole model; rank 0 writes it
    if dist.rank == 0:
        atomic_torch_save({**header, "model": model, "opt": optim}, path, keep_previous=True)


def save_weights(path: Path, dist: Dist, net: torch.nn.Module, step: int, key: str) -> None:
    """The model alone (``best``: no optimizer) and the run key; every rank calls it."""
    header = {"step": step, "run": key}
    if path.suffix == ".dcp":
        write_sharded(path, dist, {"model": net}, header)
        return
    model = dist.model_state_dict(net)
    if dist.rank == 0:
        atomic_torch_save({**header, "model": model}, path)


def atomic_torch_save(obj: Any, path: Path, keep_previous: bool = False) -> None:
    """``torch.save`` to a temp file, fsync, rename (the old file kept as ``prev.pt`` when
    ``keep_previous``), fsync the folder: a crash leaves the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        os.replace(path, path.with_name("prev.pt"))
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_sharded(path: Path, dist: Dist, parts: dict[str, Any], header: dict[str, Any],
                  keep_previous: bool = False) -> None:
    """A DCP folder: each rank's shards of ``parts`` (``model``: the network, ``opt``: its
    optimizer) written by that rank into ``<path>.tmp``, then ``header.pt`` by rank 0, then the
    folder renamed to ``path`` (the old one to ``prev.dcp`` when ``keep_previous``)."""
    tmp = path.with_name(path.name + ".tmp")
    if dist.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save torn by a crash
        tmp.mkdir(parents=True)
    dist.gather([None])  # every rank sees the empty folder before writing into it
    dist.save_sharded(tmp, parts["model"], parts.get("opt"))  # every shard on disk, fsynced, on return
    if dist.rank != 0:
        return
    atomic_torch_save(header, tmp / HEADER)
    if keep_previous and path.exists():
        prev = path.with_name("prev.dcp")
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(path, prev)
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ---- reading ----------------------------------------------------------------------------------
def read_header(path: Path, device: str = "cpu") -> dict[str, Any]:
    """What ``path`` says of itself without reading the weights: a ``.pt`` file mapped lazily (its
    ``model`` and ``opt`` are read when used), or a DCP folder's ``header.pt`` and index (every
    shard the index names must exist). Raises what the loader raises."""
    if path.suffix != ".dcp":
        return torch.load(path, map_location=device, weights_only=False, mmap=True)
    from torch.distributed.checkpoint import FileSystemReader

    header = torch.load(path / HEADER, map_location="cpu", weights_only=False)
    if not isinstance(header, dict):
        raise ValueError(f"{HEADER} is not a checkpoint header")
    meta = FileSystemReader(str(path)).read_metadata()
    files = {s.relative_path for s in (meta.storage_data or {}).values()}
    if missing := sorted(f for f in files if not (path / f).is_file()):
        raise ValueError(f"shard files missing: {', '.join(missing[:3])}")
    return {**header, "model": "sharded", "opt": "sharded", "path": path}


def load_into(state: dict[str, Any], dist: Dist, net: torch.nn.Module,
              opt: torch.optim.Optimizer | None = None) -> None:
    """Put checkpoint ``state`` (``read_header``'s) into the network (and optimizer): from a DCP
    folder each rank reads its own shards; from a ``.pt`` file the full state is set (under FSDP
    rank 0's copy is broadcast and sliced). Every rank calls it."""
    if isinstance(state.get("path"), Path) and state["path"].suffix == ".dcp":
        dist.load_sharded(state["path"], net, opt)
    elif opt is not None:
        dist.load_state_dicts(net, opt, state["model"], state["opt"])
    else:
        dist.load_model_state_dict(net, state["model"])


def stop_together(dist: Dist, err: BaseException | None, path: Path) -> None:
    """Every rank says whether loading ``path`` failed for a reason of the machine (``err``: out of
    memory, CUDA, I/O); if one did, every rank raises — that rank its own error, the others one
    naming it — so none is left waiting in the next collective, and no file is set aside. Every
    rank calls it once per load."""
    if err is not None:
        not_corrupt(err, path)
    told = dist.gather([reason(err) if err is not None else None])
    if err is not None:
        raise err
    failed = [(r, why) for r, why in enumerate(told) if why]
    if failed:
        raise RuntimeError(f"{path}: rank {failed[0][0]} could not load it ({failed[0][1]}): an error of the "
                           "machine, not of the file; nothing was set aside")


def not_corrupt(e: BaseException, path: Path) -> None:
    """Note on ``e`` (raised while loading checkpoint ``path`` for a reason of the machine), and log,
    that the file was kept: the run stops (``e`` propagates) instead of setting a good checkpoint
    aside and restarting from step 0."""
    e.add_note(f"while loading {path}: {type(e).__name__} is an error of the machine (memory, device or "
               "I/O), not of the file; it is kept as it is (nothing was set aside)")
    log.error(f"[bgpo] {path}: could not be loaded ({reason(e)}); not set aside as corrupt")


def load_weights(path: Path, step: int, dist: Dist, net: torch.nn.Module, key: str) -> bool:
    """Put ``best`` of ``step`` (``path``: ``.pt`` or ``.dcp``) into ``net``; False (reported, set
    aside by rank 0) when it is unreadable; one of another run than ``key`` is refused
    (``StoreMismatch``), one recording no run key is used with a warning. Every rank calls it."""
    state, unparsed, machine = None, None, None
    try:
        state = read_header(path, dist.device)
        if not isinstance(state, dict) or state.get("step") != step or "model" not in state:
            raise ValueError(f"not the weights of step {step}")
    except Exception as e:  # noqa: BLE001  (a torn or corrupt file: any loader error)
        if machine_error(e):  # out of memory, CUDA, I/O: the file is not to blame
            machine = e
        else:
            unparsed = e
    stop_together(dist, machine, path)
    if unparsed is not None:
        if dist.rank == 0 and path.exists():
            set_aside(path, f"unreadable ({type(unparsed).__name__}); the test result of the "
                            f"validation-selected checkpoint (step {step}) is not reported")
        return False
    if not check_checkpoint_run(state, path, key) and dist.rank == 0:
        warn(UNVERIFIED.format(path=path))
    load_into(state, dist, net)
    return True


def resume_state(run_dir: Path, steps: int, device: str, dist: Dist, key: str) -> dict[str, Any] | None:
    """The checkpoint to resume from (``read_header``'s; ``load_into`` puts it in the model): of
    ``last`` and ``prev`` in either format, the newest that loads, has the checkpoint's fields,
    records the run key ``key`` and has a valid metrics row for every step up to it (rows before
    the resume point are history that cannot be recomputed; rows after it are recomputed exactly).
    None: start from step 0. A checkpoint of another run is refused (``StoreMismatch``, before
    anything is touched); one recording no run key (written before checkpoints carried one) is
    used, with a warning. Every rank decides from the same files; rank 0 then reports, sets corrupt
    files aside (``*.corrupt``) and rewrites ``metrics.jsonl`` up to the resume point."""
    metrics_path = run_dir / "metrics.jsonl"
    rows, problems = read_metrics(metrics_path)
    notes, corrupt, found, chosen, machine = [], [], [], None, None
    for path in [p for name in ("last", "prev") for p in existing(run_dir / "checkpoints", name)]:
        try:
            state = read_header(path, device)
            if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_FIELDS):
                raise ValueError(f"not a trainer checkpoint (fields {list(CHECKPOINT_FIELDS)})")
            if not isinstance(state["step"], int) or not 1 <= state["step"] <= steps:
                raise ValueError(f"step={state['step']!r} is not in 1..{steps}")
        except Exception as e:  # noqa: BLE001  (a torn or corrupt file: any loader error)
            if machine_error(e):  # out of memory, CUDA, I/O: never taken for corruption
                machine = (e, path)
                break
            why = " ".join(str(e).split())[:200]
            corrupt.append((path, f"unreadable checkpoint ({type(e).__name__}: {why})"))
            continue
        found.append((path, state))
    for path, state in sorted(found, key=lambda f: -f[1]["step"]) if machine is None else []:
        verified = check_checkpoint_run(state, path, key)  # another run's key: StoreMismatch
        gap = missing_step(rows, state["step"])
        if gap is None:
            chosen = state
            if not verified:
                notes.append(UNVERIFIED.format(path=path))
            break
        notes.append(f"{path} (step {state['step']}) is not used: {metrics_path} has no valid row for "
                     f"step {gap}")
    stop_together(dist, *(machine or (None, run_dir / "checkpoints")))  # every rank raises, none hangs
    start = chosen["step"] if chosen is not None else 0
    if dist.gather([start]) != [start] * dist.world:
        raise RuntimeError(f"{run_dir}: the processes disagree on the resume point")
    if dist.rank == 0:
        for p in problems:
            warn(p)
        for path, why in corrupt:
            set_aside(path, why)
        for n in notes:
            warn(n)
        if chosen is None and (corrupt or notes):
            warn(f"{run_dir}: no usable checkpoint; the run restarts from step 0")
        keep_metrics(metrics_path, rows, start if chosen is not None else -1, problems)
    return chosen
