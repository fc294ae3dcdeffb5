"""Run model-written Python against trusted tests (docs/methods.md §6: "a sandboxed subprocess with a time
limit"). ``sandbox_harness.py`` is the trusted half that runs inside.

Design. The verdict is a per-run secret, never the exit status. The parent writes 32 random hex
digits into a pipe and passes only its read end (an fd number). The harness reads the secret and
closes the fd, sends stdout/stderr to /dev/null, and then runs three pieces of a ``CodeJob``:
1. ``setup`` (trusted: MBPP's setup code, HumanEval's prompt);
2. ``program`` (untrusted: setup + completion), on a thread of its own;
3. ``tests`` (trusted), on a fresh thread, with the builtins as they were before the program ran.
   Every program callable is wrapped, and setup names hide the program's except ``entry``.
If the tests return, the harness writes the secret to its saved stdout. The reward is 1 iff the
parent reads back exactly that line. The program sees the standard library only (``python -I -S``).

Covered:
- ``sys.exit(0)``, ``os._exit(0)``, ``exit()``, killing itself or the parent, and printing "passed"
  all score 0.
- The secret is in no argv, environment or file. An audit hook (PEP 578) allows frames only in the
  program's top-level thread (never a generator's). It blocks gc walks, ctypes, tracing, new
  hooks, ``os.kill``, code replacement, symlinks and any path with a ``proc`` component. Once the
  program starts, the main thread runs no Python: only it could install a signal handler, and a
  handler receives its frames.
- The harness runs on a private copy of the builtins. The pre-loaded standard modules are
  restored before the tests and checked after every call.
- A program callable must return plain data: atoms, containers, C types, or Python classes that
  existed unchanged before the program ran. An object that equals anything fails.
- Wall-clock timeout, then SIGKILL. rlimits: address space (1 GiB per process), CPU seconds, file
  size (16 MiB), open files, core dumps. Output over 4 KiB fails.
- ``namespaces`` mode, detected once by a probe job (Linux ≥ 5.12, ``unshare``, user
  namespaces). The harness is PID 1 of new user/PID/mount/network/IPC/UTS namespaces:
  - no network;
  - every mount read-only, with fresh tmpfs on the work dir (64 MiB), /tmp, /var/tmp, /run and
    /dev/shm (except a folder that holds Python), and /proc hidden;
  - no capabilities after a re-exec; all descendants (``setsid`` too) die with it;
  - at most 64 processes: a pids cgroup when root can make one, else ``RLIMIT_NPROC``.
- ``run_jobs``: N sandboxes at once, N = ``$BGPO_SANDBOX_WORKERS`` / the task's ``workers`` /
  min(8, CPUs).

NOT covered:
- ``process`` mode (``BGPO_SANDBOX_ISOLATION=process``, or the probe failed; a warning says so):
  network, writes outside the work dir, ``setsid`` escapes, the process count, and a root child
  reading the harness's memory.
- ``namespaces`` mode: reading files the user can read, connecting to host Unix sockets outside
  /tmp and /run, total memory (it is limited per process), and the process count for root
  without a pids cgroup (``RLIMIT_NPROC`` does not bind root).
- In-process defences raise the bar; they do not prove anything (CPython: audit hooks are no
  sandbox). A program written against this harness could still fake a pass, e.g. by patching a
  module the harness did not pre-load, or a class the tests build.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bgpo.tasks.base import last_answer

log = logging.getLogger(__name__)

HARNESS = Path(__file__).with_name("sandbox_harness.py")
WORKERS_ENV = "BGPO_SANDBOX_WORKERS"
ISOLATION_ENV = "BGPO_SANDBOX_ISOLATION"
ISOLATIONS = ("auto", "namespaces", "process")
MAX_PROCS = 64
OUTPUT_CAP = 4096

_BLOCK_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_OPEN_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*)\Z", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The code of a completion: inside the last ``<answer>`` if any, the last fenced block
    (```python ... ```; an unclosed final fence also counts), else the raw text."""
    region = last_answer(completion)
    if region is None:
        region = completion
    blocks = _BLOCK_RE.findall(region)
    if blocks:
        return blocks[-1]
    m = _OPEN_RE.search(region)
    return m.group(1) if m else region


@dataclass(frozen=True)
class CodeJob:
    """One sandbox run (see the module docstring for what sees what)."""

    program: str
    """untrusted code (the setup runs before it in the same namespace)"""
    tests: str
    """trusted code; the job passes iff it runs to its end without an exception"""
    setup: str = ""
    """trusted code run first, for the program and (separately) for the tests"""
    entry: tuple[str, ...] = ()
    """names the tests take from the program even when the setup defines them"""


@dataclass(frozen=True)
class Isolation:
    mode: str
    """``namespaces`` or ``process``"""
    pids_cgroup: Path | None = None
    """folder under which each run gets its own pids cgroup (root only), or None"""
    reason: str = ""
    """why ``process`` mode (empty in ``namespaces`` mode)"""


def default_workers() -> int:
    """``$BGPO_SANDBOX_WORKERS`` or min(8, CPU count)."""
    env = os.environ.get(WORKERS_ENV)
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{WORKERS_ENV}={env!r} must be an integer >= 1")
        return n
    return min(8, os.cpu_count() or 1)


# ---- running one job -------------------------------------------------------------------------
def _command(iso: Isolation, job_path: Path, fd: int, cgroup: Path | None, timeout: float,
             memory_mb: int) -> list[str]:
    """The command line of one run."""
    harness = [sys.executable, "-I", "-S", "-B", str(HARNESS)]
    cpu = str(int(timeout) + 1)
    if iso.mode == "namespaces":
        unshare = shutil.which("unshare") or "unshare"
        procs = str(cgroup / "cgroup.procs") if cgroup else "-"
        return [unshare, "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--kill-child",
                "--ipc", "--uts", "--", *harness, "stage1", str(job_path), str(fd), procs,
                str(memory_mb), cpu, str(MAX_PROCS)]
    # process mode: no RLIMIT_NPROC ("-"), which would count every process of the user
    return [*harness, "stage2", str(job_path), str(fd), str(memory_mb), cpu, "-"]


def _new_cgroup(base: Path) -> Path | None:
    path = base / f"bgpo-sandbox-{uuid.uuid4().hex[:12]}"
    try:
        path.mkdir()
        (path / "pids.max").write_text(f"{MAX_PROCS}\n")
        return path
    except OSError:
        _remove_cgroup(path)
        return None


def _remove_cgroup(path: Path) -> None:
    for _ in range(50):  # the namespace's processes are gone or going: wait for the kernel to reap them
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            try:
                for pid in (path / "cgroup.procs").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
    log.warning("sandbox: could not remove the pids cgroup %s", path)


def _collect(proc: subprocess.Popen, deadline: float) -> bytes | None:
    """Everything the harness writes to stdout until it exits; None on timeout or > OUTPUT_CAP."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    buf = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            exited = proc.poll() is not None
            left = deadline - time.monotonic()
            if left <= 0 and not exited:
                return None
            for _ in sel.select(0 if exited else min(0.05, left)):
                while True:
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    if not chunk:
                        return bytes(buf)
                    buf += chunk
                    if len(buf) > OUTPUT_CAP:
                        return None
            if exited:  # children may still hold the pipe (process mode): do not wait for EOF
                return bytes(buf)


def _spawn_and_judge(job: CodeJob, iso: Isolation, timeout: float, memory_mb: int,
                     stderr: int | None = subprocess.DEVNULL) -> tuple[bool, str]:
    secret = secrets.token_hex(16).encode()
    with tempfile.TemporaryDirectory(prefix="bgpo-sandbox-") as work:
        job_path = Path(work) / "job.json"
        job_path.write_text(json.dumps({"program": job.program, "tests": job.tests, "setup": job.setup,
                                        "entry": list(job.entry)}), encoding="utf-8")
        cgroup = _new_cgroup(iso.pids_cgroup) if iso.pids_cgroup else None
        r, w = os.pipe()
        try:
            os.write(w, secret)
            os.close(w)
            cmd = _command(iso, job_path, r, cgroup, timeout, memory_mb)
            env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=stderr, pass_fds=(r,), start_new_session=True)
        except BaseException:
            if cgroup:
                _remove_cgroup(cgroup)
            raise
        finally:
            os.close(r)
        try:
            out = _collect(proc, time.monotonic() + timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group; in namespaces mode also the namespace
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            for f in (proc.stdout, proc.stderr):
                if f:
                    f.close()
            if cgroup:
                _remove_cgroup(cgroup)
        shutil.rmtree(work, ignore_errors=True)  # files the program made there (process mode)
    return out == secret + b"\n", err


def run_job(job: CodeJob, timeout: float = 5.0, memory_mb: int = 1024, mode: Isolation | None = None) -> bool:
    """True iff the job's tests ran to their end in the sandbox within ``timeout`` seconds
    (``mode``: the detected ``isolation()`` unless given)."""
    return _spawn_and_judge(job, mode or isolation(), timeout, memory_mb)[0]


def run_jobs(jobs: Sequence[CodeJob], timeout: float = 5.0, memory_mb: int = 1024,
             workers: int | None = None, mode: Isolation | None = None) -> list[bool]:
    """``run_job`` for every job, ``workers`` (default ``default_workers()``) sandboxes at a time."""
    if workers is not None and workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    mode = mode or isolation()  # detected once, before any thread starts
    n = min(workers or default_workers(), len(jobs))
    if n <= 1:
        return [run_job(j, timeout, memory_mb, mode) for j in jobs]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="bgpo-sandbox") as pool:
        return list(pool.map(lambda j: run_job(j, timeout, memory_mb, mode), jobs))


# ---- detection -------------------------------------------------------------------------------
_ISOLATION: Isolation | None = None
_LOCK = threading.Lock()
PROBE = CodeJob(program="x = 1", tests="assert x == 1")


def isolation() -> Isolation:
    """The sandbox mode in use (detected once per process; see the module docstring)."""
    global _ISOLATION
    with _LOCK:
        if _ISOLATION is None:
            _ISOLATION = _detect()
        return _ISOLATION


def _pids_cgroup_base() -> Path | None:
    """The folder of this process's pids cgroup when it may create children there (root), else None."""
    if os.geteuid() != 0:
        return None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):  # cgroup v1
            base = Path("/sys/fs/cgroup/pids") / path.lstrip("/")
        elif controllers == "":  # cgroup v2: needs pids in the subtree controllers
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            try:
                if "pids" not in (base / "cgroup.subtree_control").read_text().split():
                    continue
            except OSError:
                continue
        else:
            continue
        probe = _new_cgroup(base)
        if probe is not None:
            _remove_cgroup(probe)
            return base
    return None


def _detect() -> Isolation:
    want = os.environ.get(ISOLATION_ENV, "auto") or "auto"
    if want not in ISOLATIONS:
        raise ValueError(f"{ISOLATION_ENV}={want!r} is not one of {list(ISOLATIONS)}")
    if want == "process":
        return Isolation("process", None, f"{ISOLATION_ENV}=process")
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        reason = "not Linux, or no unshare command"
    else:
        reason = ""
        cgroup = _pids_cgroup_base()
        for base in dict.fromkeys([cgroup, None]):
            iso = Isolation("namespaces", base)
            ok, err = _spawn_and_judge(PROBE, iso, 30.0, 1024, stderr=subprocess.PIPE)
            if ok:
                return iso
            reason = err.strip().splitlines()[-1] if err.strip() else "the namespaces probe failed"
    if want == "namespaces":
        raise RuntimeError(f"{ISOLATION_ENV}=namespaces, but namespaces are not available: {reason}")
    log.warning("code sandbox WITHOUT namespaces (%s): no network or file-system isolation, no "
                "process-count limit (see bgpo/tasks/sandbox.py)", reason)
    return Isolation("process", None, reason)
