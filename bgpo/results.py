"""The results store: run folders keyed by config and start point, atomic writes, provenance.

``results_dir/<method>-<task>-mc<mc>-s<seed>-<hash>/`` holds ``config.yaml`` (resolved, with the
base model's identity), ``metrics.jsonl`` (one JSON object per RL step / evaluation),
``checkpoints/`` (``last.pt`` and the one before it, ``prev.pt``; git-ignored) and either
``summary.json``, written atomically only when the run completes, or ``failed.json`` when it
stopped on a non-finite value. No timestamps: the folder is the run.

The run key (this module is the only place that builds it): the hash covers the resolved config
minus ``NON_IDENTITY_KEYS`` PLUS the identity of the base model the run starts from
(:func:`base_model_identity`: a sha256 over its weights and ``config.json``, or a hub name), so a
rebuilt or retrained base model never resumes or skips the runs of another one.

Nothing found on disk is trusted (issue 15): a run folder whose ``config.yaml`` differs from the
run's config fails naming the keys; a ``summary.json`` counts as complete only with every field
of ``COMPLETE_FIELDS``; a corrupt summary, metrics row or checkpoint is reported naming the file,
set aside (``*.corrupt``) and the run resumed from the last good checkpoint or restarted; the
summary is written only over a metrics file with a valid row for every step. Atomic writes are
fsynced, file and folder.

Identity, not only shape (issue 23, item 5): a summary counts as complete only when its run key,
method, task, n_t (``mc``) and seed are those of the run's config and the run's ``metrics.jsonl``
still has a whole row for every step (a row cut later is reported as ``file:line`` and the run
resumes, recomputing the lost rows exactly); a checkpoint records the run key it belongs to
(``run``) and its ``step``, and one recording another run's key is refused
(:class:`StoreMismatch`, one sentence naming the file and both keys), never resumed from,
evaluated or exported; one recording none (written before checkpoints carried it) is used with a
warning. A file the suite reads that cannot be parsed is :class:`UnreadableFile`, one sentence
naming it. Output folders are replaced only when the suite made them (:func:`check_replaceable`)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bgpo.config import ConfigError
from bgpo.provision import file_sha256 as _file_sha256

# keys that say WHERE or HOW a run executes, not WHAT it computes: excluded from the run key
# (``parallel``: ddp is bit-exact to one process; fsdp changes only the order of float sums;
# ``logger``: trackers observe a run, they do not change it)
NON_IDENTITY_KEYS = ("results_dir", "run_dir", "device", "progress", "hydra", "parallel", "threads",
                     "logger", "validate_only", "retry_failed")
# the part of ``base_model`` that identifies the weights (its ``path`` is where they were found)
BASE_IDENTITY_FIELDS = ("sha256", "hub")
# a summary.json counts as complete only with these fields, and a test result of the final policy
# on at least one test set (``final``: {source: {"accuracy", ...}}): ONE place
COMPLETE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "run": str, "method": str, "task": str, "mc": int, "seed": int, "steps": int, "final": dict,
    "commit": str, "resumed_at": list}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
log = logging.getLogger("bgpo.results")


class RunFailed(RuntimeError):
    """The run stopped on a non-finite value (``failed.json``), now or in an earlier session."""


class StoreError(RuntimeError):
    """The run folder cannot be finalised as it is (e.g. metrics rows are missing)."""


class StoreMismatch(ConfigError):
    """A file in a run folder belongs to another run (a checkpoint recording another run key): it
    is refused, never resumed from or exported. The command line prints the one sentence and exits
    with code 2."""


class UnreadableFile(ConfigError):
    """A file the suite reads (``config.yaml``, a checkpoint, a summary, ``paper/reported.yaml``...)
    cannot be parsed, or does not hold what it should; the message names the file. The command line
    prints the one sentence and exits with code 2."""


def reason(e: BaseException) -> str:
    """An exception as a short clause: its type and first 160 characters, on one line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def warn(msg: str) -> None:
    """A problem found in the store: a WARNING in the job log and on the console."""
    log.warning(f"[bgpo] {msg}")


# ---- atomic files ---------------------------------------------------------------------------
def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (a crash right after it keeps the new name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder: the file is old or new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are for everyone to read
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


MACHINE_ERRORS = ("out of memory", "can't allocate memory", "not enough memory", "cuda error",
                  "cublas_status", "cudnn_status", "nccl", "hip error")


def machine_error(e: BaseException) -> bool:
    """Whether loading a file failed for a reason of the machine, not of the file: host or GPU out
    of memory (``MemoryError``, ``torch.OutOfMemoryError``, an error saying "out of memory"), a
    CUDA/NCCL failure, or an OS error reading it (I/O, permissions). Such a file is never set
    aside as corrupt (an 8B checkpoint that did not fit is not a torn one): the error propagates.
    Only a file that fails to parse, or holds the wrong thing, is set aside."""
    if isinstance(e, (MemoryError, OSError)):
        return True
    if any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__):  # torch's, without importing torch
        return True
    text = str(e).lower()
    return any(m in text for m in MACHINE_ERRORS)


def set_aside(path: Path, why: str, suffix: str = "corrupt") -> Path:
    """Rename a file the store does not trust to ``<name>.<suffix>`` (``corrupt``: unreadable;
    ``unverified``: it could not be checked; ``.<suffix>-2``...: never overwrite evidence)."""
    aside, n = path.with_name(f"{path.name}.{suffix}"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.{suffix}-{n}")
    os.replace(path, aside)
    warn(f"{path}: {why}; kept as {aside.name}")
    return aside


# ---- run keys -------------------------------------------------------------------------------
def identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a run computes: the config minus paths and launcher settings; of ``base_model`` only
    the fields that identify the weights."""
    ident = {k: v for k, v in cfg.items() if k not in NON_IDENTITY_KEYS}
    if (ident.get("val_sampler") or {}).get("mode", "reference") == "reference":
        ident.pop("val_sampler", None)  # the validation every run had before the key existed: keys unchanged
    if isinstance(ident.get("base_model"), dict):
        ident["base_model"] = {k: v for k, v in ident["base_model"].items() if k in BASE_IDENTITY_FIELDS}
    return ident


def config_hash(cfg: dict[str, Any]) -> str:
    """A stable hash of a resolved config's identity (with ``base_model`` when it has one)."""
    blob = json.dumps(identity(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def method_name(cfg: dict[str, Any]) -> str:
    """The method of a resolved config as the run key and the summary name it (``bgpo``, ``vrpo``)."""
    return cfg["method"]["_target_"].rsplit(".", 1)[-1].lower()


def run_name(cfg: dict[str, Any]) -> str:
    return f"{method_name(cfg)}-{cfg['task']['name']}-mc{cfg['mc']}-s{cfg['seed']}-{config_hash(cfg)}"


def run_key(cfg: dict[str, Any]) -> str:
    """The run key: the folder name ``run_name`` gives the config with its base model's identity
    (what a checkpoint records, whatever folder ``run_dir`` names)."""
    return run_name(with_base_model(cfg))


def folder_hash(folder: Path) -> str:
    """sha256 over a model folder's weights (``*.safetensors``, ``*.bin``) and ``config.json``.
    Each file's hash is cached in ``$BGPO_CACHE/hashes/`` keyed by the folder, and reused while
    the file's size and mtime are unchanged (an 8B model is not re-read every run; model folders
    may be read-only, so the cache is not written beside them)."""
    from bgpo.model import cache_dir

    folder = folder.expanduser().resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file() and (
        p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)))
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in files):
        raise ConfigError(f"model.path={folder}: no weights (*.safetensors, *.bin) in the folder")
    cache_file = cache_dir() / "hashes" / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}.json"
    try:
        cached = json.loads(cache_file.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        cached = {}
    entries, total = {}, hashlib.sha256()
    for p in files:
        st = p.stat()
        hit = cached.get(p.name)
        if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            digest = hit["sha256"]
        else:
            digest = _file_sha256(p)
        entries[p.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        total.update(f"{p.name}\0{digest}\n".encode())
    if entries != cached:
        with contextlib.suppress(OSError):  # a read-only cache only costs the re-hash
            atomic_write_json(cache_file, {"folder": str(folder), "files": entries})
    return total.hexdigest()


class BaseModelMissing(FileNotFoundError):
    """The tiny base model of the task is not built yet (its hash cannot be part of the key)."""


def base_model_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The start point of a run (issue 16.4): ``{"sha256", "path"}`` of a model folder on disk
    (the task's shipped or cached tiny base model when ``model.path`` is unset: ``model.base``),
    ``{"hub": name}`` for a hub name that is not a folder here (with ``model.revision`` when set:
    pin a revision to make the key identify the weights). Raises :class:`BaseModelMissing` when
    the tiny base is not built yet."""
    m = cfg["model"]
    if m["kind"] == "tiny" and not m.get("path"):
        from bgpo.provision import base_model_path

        folder = base_model_path(cfg["task"]["name"], m)  # a shipped model is hash-checked here
        if not (folder / "pretrain.json").is_file():
            raise BaseModelMissing(f"the base model {folder} is not built yet")
    else:
        folder = Path(str(m["path"])).expanduser()
        if not folder.is_dir():
            return {"hub": str(m["path"]), **({"revision": m["revision"]} if m.get("revision") else {})}
    return {"sha256": folder_hash(folder), "path": str(folder.resolve())}


def with_base_model(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` plus its ``base_model`` identity (computed once; kept when already there)."""
    return cfg if "base_model" in cfg else {**cfg, "base_model": base_model_identity(cfg)}


def run_dir_of(cfg: dict[str, Any]) -> Path:
    """The run's folder: ``run_dir`` when given, else ``results_dir/<run_name>`` (the key includes
    the base model's identity, computed here when ``cfg`` does not carry it yet)."""
    if cfg.get("run_dir"):
        return Path(cfg["run_dir"])
    return Path(cfg["results_dir"]) / run_name(with_base_model(cfg))


# ---- provenance -----------------------------------------------------------------------------
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


# ---- what a run folder holds ----------------------------------------------------------------
def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: stored -> current`` for every identity key whose value differs (or is absent)."""
    a, b = _flat(identity(stored)), _flat(identity(current))
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
            for k in sorted(a.keys() | b.keys()) if a.get(k, "(absent)") != b.get(k, "(absent)")]


def check_stored_config(path: Path, cfg: dict[str, Any]) -> None:
    """A run folder that already holds a ``config.yaml`` must hold THIS run (e.g. an explicit
    ``run_dir`` reused with another method fails here, before anything is read or written)."""
    if not (path / "config.yaml").exists():
        return
    stored = stored_config(path, "cannot check that the run folder holds this config; move it away or "
                                 "choose another run_dir")
    diff = config_differences(stored, cfg)
    if diff:
        more = f" (and {len(diff) - 6} more)" if len(diff) > 6 else ""
        raise ConfigError(f"run folder {path} holds a run of another config — {'; '.join(diff[:6])}{more}: "
                          "choose another run_dir (or results_dir)")


def summary_mismatch(s: dict[str, Any], cfg: dict[str, Any], run: str | None = None) -> str | None:
    """Why the summary ``s`` is another run's than ``cfg``'s in the folder named ``run`` (None: its
    run key, method, task, n_t and seed are the config's). Fields the summary lacks are not compared
    (``summary_problem`` requires them of the store's own summaries), nor those the config lacks."""
    method, task = cfg.get("method"), cfg.get("task")
    expect = {"run": run, "method": method_name(cfg) if isinstance(method, dict) and "_target_" in method
              else None, "task": task.get("name") if isinstance(task, dict) else None,
              "mc": cfg.get("mc"), "seed": cfg.get("seed")}
    wrong = [f"{k}={s[k]!r} where the run's is {v!r}" for k, v in expect.items()
             if v is not None and k in s and s[k] != v]
    return f"the summary of another run ({', '.join(wrong)})" if wrong else None


def summary_problem(s: Any, cfg: dict[str, Any] | None = None, run: str | None = None) -> str | None:
    """Why ``s`` is not the summary of a complete run of ``cfg`` in the folder named ``run`` (None:
    it is). Its test results (``final``: {test set: {"accuracy", ...}}) may be empty only when the
    config turned the test sets off (``eval_test=false``)."""
    if not isinstance(s, dict):
        return "not a JSON object"
    missing = [k for k in COMPLETE_FIELDS if k not in s]
    if missing:
        return f"fields missing: {', '.join(missing)}"
    wrong = [k for k, t in COMPLETE_FIELDS.items() if not isinstance(s[k], t) or isinstance(s[k], bool)]
    if wrong:
        return f"fields of the wrong type: {', '.join(wrong)}"
    cfg = cfg or {}
    if other := summary_mismatch(s, cfg, run):
        return other
    if "steps" in cfg and s["steps"] != cfg["steps"]:
        return f"steps={s['steps']}, the config says {cfg['steps']}"
    if not all(isinstance(r, dict) and "accuracy" in r for r in s["final"].values()):
        return "a test result of the final policy ('final') has no accuracy"
    if not s["final"] and cfg.get("eval_test", True) and cfg:
        return "no test result of the final policy ('final')"
    return None


def check_summary(path: Path, cfg: dict[str, Any] | None = None) -> tuple[Any, str | None, str | None]:
    """The run folder's ``summary.json`` (it must exist), why it is not the summary of a complete run
    of ``cfg`` (else of the folder's ``config.yaml``), and why the ``metrics.jsonl`` under it is
    damaged (``file:line: why``); (summary, None, None): the run is complete."""
    try:
        s = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError) as e:
        return None, f"unreadable ({reason(e)})", None
    try:
        problem = summary_problem(s, cfg if cfg is not None else stored_config(path), path.name)
    except UnreadableFile as e:
        problem = str(e)
    return s, problem, None if problem else metrics_problem(path / "metrics.jsonl", s["steps"])


def read_summary(path: Path, cfg: dict[str, Any] | None = None, write: bool = True) -> dict[str, Any] | None:
    """The run's summary if it is complete (:func:`check_summary`). A corrupt, incomplete or foreign
    summary is reported naming the file and set aside (``write``: ``*.corrupt``), one over damaged
    metrics too (``*.unverified``, naming ``metrics.jsonl:<line>``); the run is then NOT complete
    (it resumes, and recomputes the lost rows exactly)."""
    file = path / "summary.json"
    if not file.exists():
        return None
    s, problem, damaged = check_summary(path, cfg)
    if problem is None and damaged is None:
        return s
    if write and problem is not None:
        set_aside(file, f"not the summary of a complete run ({problem}); the run resumes")
    elif write:
        set_aside(file, f"its metrics are damaged ({damaged}); the run resumes from the last checkpoint its "
                        "valid rows cover and recomputes the rest", suffix="unverified")
    return None


def stored_config(path: Path, consequence: str = "not a run folder's config") -> dict[str, Any]:
    """The run folder's ``config.yaml`` as a mapping (``{}`` when there is none); one that does not
    parse is :class:`UnreadableFile`, one sentence naming it and ``consequence``."""
    import yaml

    file = path / "config.yaml"
    if not file.exists():
        return {}
    try:
        cfg = yaml.safe_load(file.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UnreadableFile(f"{file} is unreadable ({reason(e)}): {consequence}") from None
    if not isinstance(cfg, dict):
        raise UnreadableFile(f"{file} is not a config mapping: {consequence}")
    return cfg


def metrics_problem(file: Path, steps: int) -> str | None:
    """Why a COMPLETE run's ``metrics.jsonl`` is not whole (``file:line: why``, or the first step
    without a row); None: a valid row for every step 0..steps."""
    rows, problems = read_metrics(file, complete=True)
    if problems:
        return problems[0]
    gap = missing_step(rows, steps)
    return None if gap is None else f"{file}: no row for step {gap}"


def read_failure(path: Path) -> dict[str, Any] | None:
    file = path / "failed.json"
    if not file.exists():
        return None
    try:
        info = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        return {"reason": f"{file} is unreadable ({type(e).__name__})"}
    return info if isinstance(info, dict) else {"reason": f"{file} is not a JSON object"}


def failure_message(path: Path, info: dict[str, Any]) -> str:
    return (f"{path} failed at step {info.get('step', '?')}: {info.get('reason', '?')} (see failed.json); "
            f"not retried: retry_failed=true resumes it from its last good checkpoint "
            f"(step {info.get('checkpoint_step', '?')})")


def record_failure(path: Path, info: dict[str, Any]) -> None:
    """``failed.json`` (atomic): the run is not complete and is not retried unless asked."""
    atomic_write_json(path / "failed.json", {"run": path.name, **info})


def open_run(cfg: dict[str, Any], write: bool = True,
             retry_failed: bool = False) -> tuple[Path, dict[str, Any] | None]:
    """The run folder (created, with ``config.yaml``, when ``write``) and the summary if the run is
    complete. Raises ConfigError when the folder holds another config, RunFailed when the run
    failed before and ``retry_failed`` is false."""
    import yaml

    cfg = with_base_model(cfg)
    path = run_dir_of(cfg)
    check_stored_config(path, cfg)
    summary = read_summary(path, cfg, write)
    if summary is not None:
        return path, summary
    failure = read_failure(path)
    if failure is not None and not retry_failed:
        raise RunFailed(failure_message(path, failure))
    if write and not (path / "config.yaml").exists():
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "config.yaml", yaml.safe_dump(cfg, sort_keys=True))
    return path, None


# ---- metrics.jsonl --------------------------------------------------------------------------
def read_metrics(file: Path, complete: bool = False) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Valid rows by step, and one problem per bad line (``file:line: why``): a corrupt row, a
    duplicate step. Valid rows AFTER a bad one are kept. An unfinished last line (no newline: the
    row a kill interrupted, of a step past the last checkpoint) is dropped without a problem, unless
    the run is ``complete`` (its last row was written whole: it has been cut since)."""
    rows: dict[int, dict[str, Any]] = {}
    problems: list[str] = []
    if not file.exists():
        return rows, problems
    text = file.read_text(errors="replace")
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if n < len(lines) or text.endswith("\n"):
                problems.append(f"{file}:{n}: not a JSON row (corrupt)")
            elif complete:
                problems.append(f"{file}:{n}: a row cut mid-line (no newline at the end)")
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            problems.append(f"{file}:{n}: no valid 'step'")
        elif step in rows:
            problems.append(f"{file}:{n}: a second row for step {step} (the first is kept)")
        else:
            rows[step] = row
    return rows, problems


def missing_step(rows: dict[int, Any], upto: int) -> int | None:
    """The first step in 0..upto without a valid row (None: all there)."""
    return next((s for s in range(upto + 1) if s not in rows), None)


def keep_metrics(file: Path, rows: dict[int, dict[str, Any]], upto: int, problems: list[str]) -> None:
    """Rewrite ``metrics.jsonl`` with the valid rows of steps ≤ ``upto`` (the resume point: later
    steps are recomputed exactly on resume); a file with bad lines is first kept as
    ``metrics.jsonl.corrupt``. ``upto`` < 0: start without a file."""
    if problems and file.exists():
        kept = f"its valid rows up to step {upto} are kept" if upto >= 0 else "the run restarts"
        set_aside(file, f"{len(problems)} bad line(s), first {problems[0]}; {kept}, later steps are "
                        "recomputed")
    keep = [rows[s] for s in sorted(rows) if s <= upto]
    if keep:
        atomic_write_text(file, "".join(json.dumps(r) + "\n" for r in keep))
    else:
        file.unlink(missing_ok=True)


def finish_run(path: Path, cfg: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json`` atomically: the run counts as complete only once it exists, and it is
    written only over metrics with a valid row for every step 0..steps and a complete summary."""
    file = path / "metrics.jsonl"
    rows, problems = read_metrics(file)
    gap = missing_step(rows, cfg["steps"])
    if problems or gap is not None:
        why = problems[0] if problems else f"no row for step {gap}"
        raise StoreError(f"{file}: {why}; the run is not finalised (re-run it to resume)")
    summary = {"run": path.name, "method": method_name(cfg),
               "task": cfg["task"]["name"], "mc": cfg["mc"], "seed": cfg["seed"],
               "base_model": cfg.get("base_model"),
               "wall_s": round(sum(r.get("time/step_s", 0.0) for r in rows.values()), 1), **result}
    problem = summary_problem(summary, cfg, path.name)
    if problem:
        raise StoreError(f"{path}: the summary would not be complete ({problem}); not written")
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


# ---- checkpoints: what they hold and whose they are ------------------------------------------
def load_checkpoint(path: Path, device: str = "cpu") -> dict[str, Any]:
    """A checkpoint of the suite (``torch.load``: its ``step`` and ``model``, and the ``run`` key
    when it records one); a torn, corrupt or foreign file is :class:`UnreadableFile`, one sentence
    naming it."""
    import torch

    try:
        state = read_sharded(path) if Path(path).is_dir() else torch.load(path, map_location=device,
                                                                           weights_only=False)
    except Exception as e:  # noqa: BLE001  (a torn or corrupt file: any loader error)
        raise UnreadableFile(f"{path} is not a readable checkpoint ({reason(e)})") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise UnreadableFile(f"{path} is not a checkpoint of the suite (no step and model in it)")
    if not isinstance(state["step"], int) or isinstance(state["step"], bool):
        raise UnreadableFile(f"{path} records no integer step (step={state['step']!r})")
    return state


def trainer_checkpoint(path: Path) -> bool:
    """A checkpoint the trainer wrote: a ``.pt`` file, or a sharded ``.dcp`` folder (FSDP)."""
    return path.is_file() and path.suffix == ".pt" or path.is_dir() and path.suffix == ".dcp"


def last_checkpoint(run_dir: Path) -> Path:
    """A run's ``checkpoints/last.pt``, or ``last.dcp`` when FSDP wrote it sharded."""
    dcp = run_dir / "checkpoints" / "last.dcp"
    return dcp if trainer_checkpoint(dcp) else run_dir / "checkpoints" / "last.pt"


def read_sharded(folder: Path) -> dict[str, Any]:
    """A sharded checkpoint folder (``last.dcp``, ``bgpo.checkpoints``) read whole into this one
    process: its header and its full ``model`` state (every rank's shards put together; the
    optimizer's state is not read)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state = torch.load(Path(folder) / "header.pt", map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        raise ValueError("header.pt is not a checkpoint header")
    reader = dcp.FileSystemReader(str(folder))
    entries = reader.read_metadata().state_dict_metadata
    model = {k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in entries.items() if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process, as meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return {**state, "model": model}


@contextlib.contextmanager
def reading(path: str | Path, what: str) -> Iterator[None]:
    """Errors while reading ``path`` (a model folder, an adapter...) as :class:`UnreadableFile`, one
    sentence naming it: a garbage ``config.json``, a torn ``model.safetensors`` raise whatever their
    parser raises. Missing files, the suite's own sentences and running out of memory pass through."""
    try:
        yield
    except (ConfigError, FileNotFoundError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001  (each parser has its own errors: safetensors, json, transformers)
        if type(e).__name__ == "OutOfMemoryError":  # torch's: a device error, not the file's
            raise
        raise UnreadableFile(f"{path} is not a readable {what} ({reason(e)})") from None


def check_checkpoint_run(state: dict[str, Any], path: Path, key: str) -> bool:
    """Whether checkpoint ``state`` (read from ``path``) records the run key ``key``: True; False
    when it records none (written before checkpoints carried one: its run cannot be verified).
    :class:`StoreMismatch` when it records another run's key."""
    recorded = state.get("run")
    if recorded is None:
        return False
    if recorded != key:
        raise StoreMismatch(f"{path} is a checkpoint of run {recorded}, not of this run {key}: it is not "
                            "used; move it away")
    return True


def expected_run_key(run_dir: Path, cfg: dict[str, Any]) -> str:
    """The run key of a run folder from its stored config (the folder name for configs written
    before the key held the base model's identity)."""
    if "base_model" not in cfg:
        return run_dir.name
    try:
        return run_name(cfg)
    except (KeyError, TypeError, AttributeError) as e:
        raise UnreadableFile(f"{run_dir / 'config.yaml'} lacks the run's settings ({reason(e)}): cannot tell "
                             "which run a checkpoint must belong to") from None


# ---- output folders the suite replaces ------------------------------------------------------
def check_replaceable(folder: Path, marker: str, key: str) -> None:
    """``folder`` may be replaced (or emptied) by the suite only when it does not exist, is empty,
    or holds ``marker``, the file the suite writes into the folders it makes; otherwise
    :class:`ConfigError`, one sentence naming ``key``. Nothing is created or deleted here."""
    if not folder.exists():
        if folder.is_symlink():
            raise ConfigError(f"{key}={folder} is a broken link: choose another folder")
        return
    if not folder.is_dir():
        raise ConfigError(f"{key}={folder} is a file, not a folder: choose a folder")
    if (folder / marker).is_file() or not any(folder.iterdir()):
        return
    raise ConfigError(f"{key}={folder} holds files the suite did not write (no {marker} in it): it is not "
                      "replaced; choose a new or empty folder, or move those files away")


def make_folder(folder: Path, setting: str) -> None:
    """Create ``folder`` (and its parents), for ``setting`` (``out=DIR``); :class:`ConfigError`
    naming it when the folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{setting} cannot be created ({e.strerror or type(e).__name__}: "
                          f"{e.filename or folder})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{setting} cannot be written (no write permission in {folder})")
