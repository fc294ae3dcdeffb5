"""Run model-written Python against its tests (SPEC §5: "a sandboxed subprocess with a time limit").

Covered:
- the program runs in a separate ``python -I -B`` process (isolated mode: no user site, no
  ``PYTHON*`` variables), in a fresh temporary working directory that is deleted afterwards, with
  an almost empty environment and no stdin; its output is discarded;
- a wall-clock timeout (default 5 s); on expiry the whole process group is killed (SIGKILL);
- ``resource`` limits set in the child before exec: address space (default 1 GiB), CPU seconds,
  file size written (16 MiB), open files (256), no core dumps;
- the verdict is only the exit status: 0 = every test passed.

NOT covered (this is not a security boundary; run untrusted code inside a container or VM):
- the network, and the file system outside the working directory (the process runs as the same
  user and can read or write whatever that user can);
- processes that leave the process group (``setsid``) escape the kill; the number of processes is
  not limited (``RLIMIT_NPROC`` counts per user and is ignored for root);
- a program can fake success by calling ``os._exit(0)`` before the tests run.
- ``preexec_fn`` runs between fork and exec; Python warns it is not safe in a parent with threads
  (rare deadlocks). Call rewards from the main thread or a process pool.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bgpo.tasks.base import last_answer

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


def _limits(memory_bytes: int, cpu_seconds: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 1024) -> bool:
    """True iff ``program`` exits with status 0 within ``timeout`` seconds (see module docstring)."""
    with tempfile.TemporaryDirectory(prefix="bgpo-sandbox-") as work:
        path = Path(work) / "program.py"
        path.write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", str(path)],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # own process group, killed as a whole below
            preexec_fn=_limits(memory_mb << 20, int(timeout) + 1),
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # also any children left behind
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        return rc == 0
