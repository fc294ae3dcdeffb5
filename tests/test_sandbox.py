"""The code sandbox (issue 15.3): a table of hostile programs, each scoring 0 AND leaving nothing
behind (no file outside its dir, no process, no connection), while correct programs still score 1.

Every row is the wrong solution ``f(x) = x`` of "f(x) = x + 1" plus one trick; the trusted tests
below would pass for ``x + 1`` only. All rows of a table run at once through ``run_jobs`` (the
parallel path the trainer uses), with a short timeout; the sleepers and the fork bomb hit it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from textwrap import dedent

import pytest

from bgpo.tasks import sandbox
from bgpo.tasks.base import Example
from bgpo.tasks.humaneval import HumanEvalTask
from bgpo.tasks.sandbox import CodeJob, Isolation, isolation, run_jobs

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 3.0
KNOWN = "5ec7e7" * 5 + "ab"  # the secret, during test_secret_hunters only (32 hex digits)
TESTS = """import math
y = f(0)
assert f(1) == 2
assert abs(f(5) - 6) < 1e-9
assert math.isclose(f(2), 3)
assert sorted([f(3), f(0)]) == [1, 4]
"""
TESTS_ABS = "y = f(0)\nassert abs(f(5) - 6) < 1e-9\n"  # rows that patch a builtin
TESTS_ISCLOSE = "import math\ny = f(0)\nassert math.isclose(f(2), 3)\n"  # rows that patch a module
RIGHT = "def f(x):\n    return x + 1\n"
WRONG = "def f(x):\n    return x\n"

def prog(text: str) -> str:
    return dedent(text).strip("\n")


# ---- tricks that need nothing but the token: scored in both modes ----------------------------------
EXIT_TRICKS = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "raise SystemExit(0)": "raise SystemExit(0)",
    "exit()": "exit()",
    "quit() via site": "import site\nsite.setquit()\nquit()",
    "os._exit(0) inside f": "import os\ndef f(x):\n    os._exit(0)",
    "SystemExit inside f": "def f(x):\n    raise SystemExit(0)",
    "abort": "import os\nos.abort()",
    "kill self": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "kill the parent from a shell": "import subprocess\nsubprocess.run(['sh', '-c', 'kill -9 $PPID'])",
}
IN_PROCESS_TRICKS = {
    "print a success marker": "print('PASSED')\nprint('All tests passed')",
    "write markers to every fd": prog("""
        import os
        for fd in range(1, 64):
            try:
                os.write(fd, b'0' * 32 + b'\\n')
            except OSError:
                pass
    """),
    "patch builtins": (prog("""
        import builtins
        builtins.abs = lambda x: 0
        builtins.AssertionError = KeyError
    """), TESTS_ABS),
    "patch builtins inside f": (prog("""
        import builtins
        def f(x):
            builtins.abs = lambda x: 0
            return x
    """), TESTS_ABS),
    "patch math.isclose": ("import math\nmath.isclose = lambda *a, **k: True", TESTS_ISCLOSE),
    "patch math.isclose inside f": (prog("""
        def f(x):
            import math
            math.isclose = lambda *a, **k: True
            return x
    """), TESTS_ISCLOSE),
    "fake math module": (prog("""
        import sys, types
        m = types.ModuleType('math')
        m.isclose = lambda *a, **k: True
        sys.modules['math'] = m
    """), TESTS_ISCLOSE),
    "always-equal object": prog("""
        class A:
            def __eq__(self, o): return True
            def __sub__(self, o): return 0
            def __lt__(self, o): return True
            def __float__(self): return 3.0
            def __hash__(self): return 0
        def f(x):
            return A()
    """),
    "always-equal from a lambda": prog("""
        class A(int):
            __eq__ = lambda self, o: True
            __sub__ = lambda self, o: 0
            __float__ = lambda self: 3.0
            __hash__ = int.__hash__
        f = lambda x: A(x)
    """),
    "patch a stdlib class": prog("""
        from fractions import Fraction
        Fraction.__eq__ = lambda s, o: True
        Fraction.__sub__ = lambda s, o: Fraction(0)
        Fraction.__float__ = lambda s: 3.0
        def f(x):
            return Fraction(x)
    """),
    "replace the harness": prog("""
        import builtins, sys
        def fake_tests(*args):  # fills the first empty list (the result box), releases the locks
            [a for a in args if type(a) is list and not a][0].append(True)
            for a in args:
                if hasattr(a, 'release'):
                    a.release()
        m = sys.modules['__main__']
        m._run_tests = fake_tests
        builtins.exec = lambda *a, **k: None
    """),
    "stuff the harness's lists": prog("""
        import sys
        f = sys._getframe()
        while f is not None:
            for v in f.f_locals.values():
                if isinstance(v, list):
                    v.append(True)
                elif hasattr(v, 'release'):
                    try:
                        v.release()
                    except RuntimeError:
                        pass
            f = f.f_back
    """),
    "replace code objects": prog("""
        import sys
        for v in list(vars(sys.modules['__main__']).values()):
            if hasattr(v, '__code__'):
                v.__code__ = (lambda *a, **k: None).__code__
    """),
    "walk frames and tamper": (prog("""
        import sys
        def tamper(f):
            while f is not None:
                for v in [*f.f_locals.values(), *f.f_globals.values(), f.f_globals]:
                    if isinstance(v, dict) and isinstance(v.get('__builtins__'), dict):
                        v['__builtins__']['abs'] = lambda x: 0
                f = f.f_back
        tamper(sys._getframe())
        def f(x):
            tamper(sys._getframe())
            return x
    """), TESTS_ABS),
    "a generator's frame": (prog("""
        import sys
        def tamper(f):
            while f is not None:
                if isinstance(f.f_globals.get('__builtins__'), dict):
                    f.f_globals['__builtins__']['abs'] = lambda x: 0
                f = f.f_back
        def gen():
            while True:
                try:
                    tamper(sys._getframe())
                except Exception:
                    pass
                yield
        g = gen()
        try:
            fr = g.gi_frame
        except Exception:
            fr = None
        next(g)
        def f(x):
            next(g)
            if fr is not None:
                tamper(fr.f_back)
            return x
    """), TESTS_ABS),
    "a traceback's frames": (prog("""
        def f(x):
            try:
                raise ValueError
            except ValueError as e:
                f = e.__traceback__.tb_frame
                while f is not None:
                    if isinstance(f.f_globals.get('__builtins__'), dict):
                        f.f_globals['__builtins__']['abs'] = lambda x: 0
                    f = f.f_back
            return x
    """), TESTS_ABS),
    "a signal handler on the main thread": prog("""
        import os, signal, time
        def leak(frame):  # any 32 hex digits in the main thread's frames: written everywhere
            while frame is not None:
                for v in frame.f_locals.values():
                    if isinstance(v, bytes) and len(v) == 32 and not v.strip(b"0123456789abcdef"):
                        for fd in range(1, 64):
                            try:
                                os.write(fd, v + b"\\n")
                            except OSError:
                                pass
                        os._exit(0)
                frame = frame.f_back
        def arm():  # only code running on the main thread may install a handler
            try:
                signal.signal(signal.SIGALRM, lambda sig, frame: leak(frame))
                signal.setitimer(signal.ITIMER_REAL, 0.05)
            except ValueError:
                pass
        class Meta(type):
            @property
            def __module__(cls):  # read by whoever builds the tests' namespace
                arm()
                return "x"
        class Sneaky(metaclass=Meta):
            def __call__(self, *a):
                return 0
        sneaky = Sneaky()
        class Bomb:  # cyclic garbage: finalized by whichever thread allocates next
            def __del__(self):
                arm()
        for i in range(2000):
            b = Bomb()
            b.me = b
        del b
        def f(x):
            time.sleep(0.5)
            return x
    """),
    "tracing": (prog("""
        import sys, threading
        def tr(frame, ev, arg):
            if isinstance(frame.f_globals.get('__builtins__'), dict):
                frame.f_globals['__builtins__']['abs'] = lambda x: 0
            return tr
        threading.settrace(tr)
        sys.settrace(tr)
    """), TESTS_ABS),
    "gc walk": (prog("""
        import gc
        def f(x):
            for o in gc.get_objects():
                if isinstance(o, dict) and isinstance(o.get('__builtins__'), dict):
                    o['__builtins__']['abs'] = lambda x: 0
            return x
    """), TESTS_ABS),
    "background thread patches builtins": prog("""
        import builtins, threading, time
        def loop():
            while True:
                builtins.abs = lambda x: 0
                time.sleep(0.001)
        threading.Thread(target=loop, daemon=True).start()
    """),
    "huge output": prog("""
        import os, sys
        sys.stdout.write('x' * (20 << 20))
        for fd in range(3, 64):
            try:
                os.write(fd, b'A' * (1 << 20))
            except OSError:
                pass
    """),
    "memory bomb": "x = ' ' * (4 << 30)",
    "syntax error": "def f(x) return x",
    "infinite loop": "while True:\n    pass",
    "sleep": "import time\ntime.sleep(100)",
    "infinite loop inside f": "def f(x):\n    while True:\n        pass",
}

# ---- tricks against the machine: namespaces mode only ------------------------------------------
# {out}: files the program tries to create outside its dir; {port}: a listening loopback socket of
# the test; {marker}: a number that names the processes the program tries to leave behind
MACHINE_TRICKS = {
    "write outside its dir": prog("""
        for p in {out!r}:
            try:
                open(p, 'w').write('escaped')
            except OSError:
                pass
    """),
    "remount read-write": prog("""
        import subprocess
        subprocess.run(['mount', '-o', 'remount,rw', '/'])
        subprocess.run(['touch', *{out!r}])
    """),
    "remount in a nested namespace": prog("""
        import subprocess
        cmd = 'mount -o remount,rw / ; mount -o remount,rw /root ; touch ' + ' '.join({out!r})
        subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c', cmd])
    """),
    "connect to the test's socket": prog("""
        import socket
        try:
            socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'escaped')
        except OSError:
            pass
    """),
    "fork and linger": "import os\nif os.fork() == 0:\n    os.execvp('sleep', ['sleep', '{marker}1'])",
    "setsid child (start_new_session)": prog("""
        import subprocess
        subprocess.Popen(['sleep', '{marker}2'], start_new_session=True)
    """),
    "double-fork daemon": prog("""
        import os
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execvp('sleep', ['sleep', '{marker}3'])
            os._exit(0)
    """),
    "setsid(1) shell": "import subprocess\nsubprocess.run(['setsid', '-f', 'sleep', '{marker}4'])",
    "fork bomb": prog("""
        import os, time
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
    """),
}

# ---- correct programs, unusual but harmless: must still score 1 ----------------------------------
BENIGN = {
    "plain": "",
    "prints 20 MB": "print('x' * (20 << 20))",
    "writes and reads its dir": prog("""
        import tempfile
        open('scratch.txt', 'w').write('hi')
        assert open('scratch.txt').read() == 'hi'
        with tempfile.TemporaryFile() as t:
            t.write(b'x')
    """),
    "typing, namedtuple, dataclass, enum": prog("""
        import enum
        from collections import namedtuple
        from dataclasses import dataclass
        from typing import List, NamedTuple
        P = namedtuple('P', 'a b')
        class Q(NamedTuple):
            a: int
        @dataclass
        class D:
            a: int
        class E(enum.Enum):
            A = 1
    """),
    "generator and thread": prog("""
        import threading
        def g(n):
            yield from range(n)
        assert sum(g(4)) == 6
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
    """),
    "subprocess": "import subprocess\nassert subprocess.run(['true']).returncode == 0",
    "recursion": "def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\nassert depth(500) == 500",
}


FOOL_EXIT_STATUS = [
    "sys.exit(0)", "os._exit(0)", "raise SystemExit(0)", "exit()", "quit() via site", "os._exit(0) inside f",
    "SystemExit inside f", "patch builtins", "patch builtins inside f", "patch math.isclose",
    "patch math.isclose inside f", "fake math module", "always-equal object", "always-equal from a lambda",
    "patch a stdlib class",
]
"""Rows that pass the old verdict (the exit status of one script: program + tests)."""


def job(trick: str | tuple[str, str], base: str = WRONG) -> CodeJob:
    """``base`` + the trick's code, with the trick's own tests when it names them."""
    code, tests = trick if isinstance(trick, tuple) else (trick, TESTS)
    return CodeJob(program=base + code + "\n", tests=tests)


def test_the_tricks_are_real():
    """Each row compiles (a broken row would score 0 for nothing) and the rows above fool the old
    verdict: run as one plain script, they exit with status 0 although f is wrong."""
    machine = {k: v.format(out=[], port=1, marker=1) for k, v in MACHINE_TRICKS.items()}
    for name, trick in {**EXIT_TRICKS, **IN_PROCESS_TRICKS, **machine, **BENIGN}.items():
        if name != "syntax error":
            j = job(trick)
            compile(j.program, name, "exec")
            compile(j.tests, name, "exec")
    assert set(FOOL_EXIT_STATUS) <= {*EXIT_TRICKS, *IN_PROCESS_TRICKS}
    env = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    for name in FOOL_EXIT_STATUS:
        j = job({**EXIT_TRICKS, **IN_PROCESS_TRICKS}[name])
        script = j.program + j.tests
        p = subprocess.run([sys.executable, "-I", "-c", script], env=env, capture_output=True, timeout=60)
        assert p.returncode == 0, (name, p.stderr[-500:])


def leftover_processes(markers: list[str]) -> dict[int, str]:
    """pid -> command line of the processes that name one of ``markers``."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in text for m in markers):
            found[int(cmdline.parent.name)] = text
    return found


def sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("bgpo-sandbox-*")}


def cgroups() -> set[str]:
    base = isolation().pids_cgroup
    return {p.name for p in base.glob("bgpo-sandbox-*")} if base else set()


@pytest.fixture(scope="module")
def namespaces() -> Isolation:
    iso = isolation()
    if iso.mode != "namespaces":
        pytest.skip(f"namespaces are not available here: {iso.reason}")
    return iso


PROCESS = Isolation("process", None, "test")


# ---- the tables ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["namespaces", "process"])
def test_tricks_score_zero_and_correct_programs_one(mode, request):
    iso = request.getfixturevalue("namespaces") if mode == "namespaces" else PROCESS
    tricks = {**EXIT_TRICKS, **IN_PROCESS_TRICKS}
    if mode == "process":  # the shell and a signal may hit more than the sandbox without namespaces
        tricks = {k: v for k, v in tricks.items() if "shell" not in k}
    jobs = [job(t) for t in tricks.values()] + [job(b, RIGHT) for b in BENIGN.values()]
    before = sandbox_dirs()
    got = run_jobs(jobs, TIMEOUT, workers=4, mode=iso)
    scored = dict(zip([*tricks, *(f"benign: {b}" for b in BENIGN)], got, strict=True))
    assert [k for k in tricks if scored[k]] == []  # every trick scores 0
    assert [k for k in BENIGN if not scored[f"benign: {k}"]] == []  # every correct program scores 1
    assert leftover_processes([str(sandbox.HARNESS)]) == {}
    assert sandbox_dirs() <= before


def test_machine_tricks_score_zero_and_leave_nothing(namespaces, tmp_path):
    tag = uuid.uuid4().hex[:8]
    out = [str(tmp_path / "escaped.txt"), str(Path.home() / f"bgpo-escape-{tag}"),
           f"/tmp/bgpo-escape-{tag}", str(ROOT / f"bgpo-escape-{tag}")]
    marker = f"{int(tag, 16) % 1000 + 1000}.{os.getpid()}"  # e.g. sleep 1234.5678<n>: a unique duration
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    tricks = {k: v.format(out=out, port=port, marker=marker) for k, v in MACHINE_TRICKS.items()}
    before_dirs, before_cgroups = sandbox_dirs(), cgroups()
    t0 = time.monotonic()
    try:
        got = run_jobs([job(t) for t in tricks.values()], TIMEOUT, workers=4, mode=namespaces)
        elapsed = time.monotonic() - t0
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()
    leaked = [p for p in out if Path(p).exists()]
    for p in leaked:
        Path(p).unlink()
    assert dict(zip(tricks, got, strict=True)) == dict.fromkeys(tricks, False)
    assert leaked == []
    assert leftover_processes([marker, str(sandbox.HARNESS)]) == {}
    assert sandbox_dirs() <= before_dirs and cgroups() <= before_cgroups
    assert elapsed < len(tricks) * (TIMEOUT + 2)  # bounded: each sandbox is killed at its timeout


HUNTER = prog("""
    import glob, hashlib, os, re, sys
    H = {digest!r}  # sha256 of the secret: the program holds no copy of it
    def found(blob):
        if isinstance(blob, str):
            blob = blob.encode(errors="ignore")
        if not isinstance(blob, (bytes, bytearray)):
            return None
        for run in re.findall(rb"[0-9a-f]{{32,}}", bytes(blob)):
            for i in range(len(run) - 31):
                if hashlib.sha256(run[i:i + 32]).hexdigest() == H:
                    return run[i:i + 32]
        return None
    def win(secret):
        if secret:
            for fd in range(1, 64):
                try:
                    os.write(fd, secret + b"\\n")
                except OSError:
                    pass
            os._exit(0)
    def hunt():
        for k, v in os.environ.items():
            win(found(k) or found(v))
        for a in sys.argv:
            win(found(a))
        for fd in range(0, 64):
            try:
                win(found(os.read(fd, 1 << 16)))
            except OSError:
                pass
        paths = ["/proc/self/environ", "/proc/self/cmdline", "/proc/self/mem", "/proc/1/environ",
                 "/dev/fd/3", "/proc/self/fd/3", ".bgpo-job.json"]
        paths += glob.glob("/proc/self/fd/*") + glob.glob("/tmp/**", recursive=True)
        paths += glob.glob("**", recursive=True)
        for p in paths:
            try:
                win(found(open(p, "rb").read(1 << 22)))
            except OSError:
                pass
        try:
            f = sys._getframe()
            while f is not None:
                for v in [*f.f_locals.values(), *f.f_globals.values()]:
                    win(found(v) or found(repr(v)))
                f = f.f_back
        except RuntimeError:
            pass
        try:
            import gc
            for o in gc.get_objects():
                win(found(o) or found(repr(o)))
        except RuntimeError:
            pass
        try:
            import ctypes
            win(found(ctypes.string_at(id(sys.modules["__main__"]), 1 << 16)))
        except RuntimeError:
            pass
    hunt()
    def f(x):
        hunt()
        return x
""")


def test_secret_hunters(monkeypatch):
    """The secret is known here: a program that looks for it everywhere (env, argv, fds, /proc,
    files, frames, gc, ctypes) and writes it to every fd would pass if it found it."""
    import hashlib

    monkeypatch.setattr(sandbox.secrets, "token_hex", lambda n: KNOWN)
    hunter = HUNTER.format(digest=hashlib.sha256(KNOWN.encode()).hexdigest())
    leak = f"import os\nos.environ['LEAK'] = {KNOWN!r}\n" + hunter  # the hunter works: it finds a leak
    got = run_jobs([job(hunter), job(leak), job("", RIGHT)], TIMEOUT, workers=3)
    assert got == [False, True, True]


def test_run_jobs_runs_in_parallel(namespaces):
    t0 = time.monotonic()
    got = run_jobs([job("import time\ntime.sleep(100)")] * 4, 1.0, workers=4, mode=namespaces)
    assert got == [False] * 4 and time.monotonic() - t0 < 3.5  # four 1 s timeouts at once, not 4 s
    with pytest.raises(ValueError, match=r"workers=0 must be >= 1"):
        run_jobs([job("")], workers=0)


def test_workers_env(monkeypatch):
    monkeypatch.setenv(sandbox.WORKERS_ENV, "3")
    assert sandbox.default_workers() == 3
    monkeypatch.setenv(sandbox.WORKERS_ENV, "zero")
    with pytest.raises(ValueError, match=r"BGPO_SANDBOX_WORKERS='zero' must be an integer >= 1"):
        sandbox.default_workers()


def test_isolation_env(monkeypatch):
    monkeypatch.setattr(sandbox, "_ISOLATION", None)
    monkeypatch.setenv(sandbox.ISOLATION_ENV, "process")
    assert isolation() == Isolation("process", None, "BGPO_SANDBOX_ISOLATION=process")
    monkeypatch.setattr(sandbox, "_ISOLATION", None)
    monkeypatch.setenv(sandbox.ISOLATION_ENV, "chroot")
    with pytest.raises(ValueError, match=r"BGPO_SANDBOX_ISOLATION='chroot' is not one of"):
        isolation()


# ---- HumanEval: the prompt's helpers are trusted; scores() runs each completion once ---------------
PROMPT = 'def enc(s: str) -> str:\n    return s[::-1]\n\n\ndef dec(s: str) -> str:\n    """enc inverted."""\n'
CHECK = "def check(candidate):\n    for s in ['ab', 'xyz', '']:\n        assert candidate(enc(s)) == s\n"
EX = Example({"task_id": "T/0", "prompt": PROMPT, "entry_point": "dec", "test": CHECK})


def test_humaneval_helpers_come_from_the_prompt():
    task = HumanEvalTask(timeout=TIMEOUT)
    completions = ["    return s[::-1]\n",  # right, as a body
                   "```python\ndef dec(s):\n    return enc(s)\n```",  # right, a whole function
                   "    return s\n\ndef enc(s):\n    return s\n",  # redefines the helper the tests use
                   "    return s\n"]
    assert [s.reward for s in task.scores([EX] * 4, completions, "d1")] == [1.0, 1.0, 0.0, 0.0]


def test_scores_run_each_completion_once(monkeypatch):
    calls: list[int] = []
    real = sandbox.run_jobs

    def counting(jobs, *args, **kwargs):
        calls.append(len(jobs))
        return real(jobs, *args, **kwargs)

    monkeypatch.setattr("bgpo.tasks.humaneval.run_jobs", counting)
    task = HumanEvalTask(timeout=TIMEOUT)
    scores = task.scores([EX] * 3, ["    return s[::-1]\n", "    return s\n", "    return s[::-1]\n"], "d1")
    assert [(s.reward, s.correct) for s in scores] == [(1.0, True), (0.0, False), (1.0, True)]
    assert calls == [3]  # one parallel batch; reward and correctness share each verdict


def test_no_process_survives_a_timed_out_sandbox(namespaces):
    """A grandchild in a new session (the classic escape from a process-group kill) dies too."""
    marker = f"{uuid.uuid4().int % 1000 + 2000}.{os.getpid()}"
    prog = (f"import subprocess, time\nsubprocess.Popen(['setsid', 'sleep', '{marker}'])\n"
            "time.sleep(100)")
    assert run_jobs([job(prog)], 1.0, mode=namespaces) == [False]
    assert leftover_processes([marker]) == {}
    # the same program without namespaces leaves its setsid grandchild behind: what the docstring says
    assert run_jobs([job(prog)], 1.0, mode=PROCESS) == [False]
    time.sleep(0.2)
    left = leftover_processes([f"sleep {marker}"])
    for pid in left:  # the processes this test made, by pid
        os.kill(pid, signal.SIGKILL)
    assert left, "process mode is expected to leak setsid children (documented as not covered)"
