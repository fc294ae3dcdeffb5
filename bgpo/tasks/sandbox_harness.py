"""The trusted side of ``bgpo.tasks.sandbox``: this file runs INSIDE the sandbox, as a script.

It is started as ``python -I -S -B sandbox_harness.py <stage> ...`` and imports nothing but the
standard library. ``bgpo.tasks.sandbox`` (its docstring has the design and what is covered) starts
it; nothing imports it.

- ``stage1`` (namespaces mode only): runs as PID 1 of new user, PID, mount, network, IPC and UTS
  namespaces, root there and nowhere else. It joins the pids cgroup (if given), makes every mount
  read-only (``mount_setattr`` with ``AT_RECURSIVE``), mounts fresh size-limited tmpfs on /tmp,
  /var/tmp, /run and /dev/shm (each unless Python or this file lives below it) and on the work
  dir (the same path as the parent's temporary dir), hides /proc under an empty read-only tmpfs,
  empties the capability bounding set, sets no_new_privs and re-executes itself as ``stage2``:
  the new image starts with no capabilities at all.
- ``stage2``: sets the resource limits and PR_SET_DUMPABLE=0, reads the per-run secret from the
  inherited pipe fd and closes it, installs the audit hook, then runs the job
  (``setup``/``program``/``tests``, see ``run_job``) and writes the secret to its saved stdout
  only if every test ran without an exception. The program's own stdout/stderr go to /dev/null.
"""

from __future__ import annotations

import json
import os
import resource
import sys

# Exit statuses (the parent only reads the token; these help debugging).
SETUP_FAILED = 125


# ---- stage 1: namespaces set-up (root inside the new user namespace) ----------------------------
def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.syscall.restype = ctypes.c_long
    return ctypes, libc


def _check(ret: int, what: str, ctypes) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def stage1(job_path: str, secret_fd: str, cgroup_procs: str, *limits: str) -> None:
    ctypes, libc = _libc()
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
    with open(job_path, encoding="utf-8") as f:
        job = f.read()
    work = os.path.dirname(os.path.abspath(job_path))
    keep = [os.path.realpath(p) for p in (sys.executable, sys.prefix, sys.base_prefix, __file__)]
    if cgroup_procs != "-":  # the pids cgroup made by the parent: this process and all it forks
        with open(cgroup_procs, "w") as f:
            f.write("0\n")

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = MountAttr(0x1 | 0x2, 0, 0, 0)  # MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
    ret = libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), ctypes.c_char_p(b"/"),  # mount_setattr
                       ctypes.c_uint(0x8000), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(int(ret), "mount_setattr(/, AT_RECURSIVE, RDONLY)", ctypes)
    for path in ("/tmp", "/var/tmp", "/run", "/dev/shm"):  # other sandboxes' dirs, host sockets...
        inside = any(k == path or k.startswith(path + "/") for k in keep)
        if os.path.isdir(path) and not os.path.islink(path) and not inside:
            _check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=1777"),
                   f"mount tmpfs {path}", ctypes)
    os.makedirs(work, exist_ok=True)  # in a fresh /tmp: made anew, under the same path
    _check(libc.mount(b"tmpfs", work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64m,mode=700"),
           "mount tmpfs on the work dir", ctypes)
    # /proc shows the host's processes (and /proc/self/mem): hide it
    _check(libc.mount(b"tmpfs", b"/proc", b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      b"size=4k,mode=555"), "mount tmpfs /proc", ctypes)
    inner_job = os.path.join(work, ".bgpo-job.json")
    with open(inner_job, "w", encoding="utf-8") as f:
        f.write(job)
    os.chdir(work)
    for cap in range(64):  # empty the bounding set: the re-executed image gets no capability
        if libc.prctl(24, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:  # PR_CAPBSET_DROP; EINVAL: done
            break
    _check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS", ctypes)
    os.execv(sys.executable, [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "stage2",
                              inner_job, secret_fd, *limits])


# ---- stage 2: limits, secret, audit hook, the job --------------------------------------------
RELEVANT = ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__len__", "__hash__",
            "__contains__", "__iter__", "__getitem__", "__abs__", "__neg__", "__add__", "__radd__",
            "__sub__", "__rsub__", "__float__", "__int__", "__index__", "__round__", "__class__",
            "__getattribute__", "__getattr__")
"""Special methods that decide what a test assertion sees of a value (compare, truth, tolerance)."""

PRELOAD = ("typing", "collections", "re", "math", "itertools", "functools", "heapq", "bisect", "string",
           "fractions", "random", "operator", "copy")
"""Standard modules imported before the program runs: snapshotted (see ``run``) and faster."""


def set_limits(memory_mb: str, cpu_s: str, nproc: str) -> None:
    """Address space, CPU seconds, file size, open files, core dumps and (unless ``nproc`` is "-")
    the number of processes of this user (in namespaces mode: of this sandbox's user namespace)."""
    limits = [(resource.RLIMIT_AS, int(memory_mb) << 20), (resource.RLIMIT_CPU, int(cpu_s)),
              (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_CORE, 0)]
    if nproc != "-":
        limits.append((resource.RLIMIT_NPROC, int(nproc)))
    for res, val in limits:
        resource.setrlimit(res, (val, val))


def stage2(job_path: str, secret_fd: str, memory_mb: str, cpu_s: str, nproc: str) -> None:
    import builtins
    import ctypes
    from types import FunctionType

    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0: no ptrace, no /proc/<pid>/mem
    set_limits(memory_mb, cpu_s, nproc)
    fd = int(secret_fd)
    secret = [os.read(fd, 256)]  # handed on in a list that ``run`` empties: no frame of the main
    os.close(fd)  # thread keeps it (the main thread may see a signal handler; see ``run``)
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    token_fd = os.dup(1)  # close-on-exec: children the program starts do not get it
    null = os.open(os.devnull, os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(null, i)
    os.close(null)
    # Seal the harness: its functions get a private globals dict whose builtins are a copy taken
    # now, so nothing the program later does to ``builtins`` or to this module reaches them.
    sealed = dict(globals())
    sealed["__builtins__"] = dict(builtins.__dict__)
    for name, fn in list(sealed.items()):
        if type(fn) is FunctionType:
            sealed[name] = FunctionType(fn.__code__, sealed, fn.__name__, fn.__defaults__, fn.__closure__)
    # the program's thread may see its runner's frame: that runner gets an empty globals dict
    sealed["_run_program"] = FunctionType(_run_program.__code__, {"__builtins__": {}}, "_run_program")
    sealed["run"](job, secret, token_fd)


def _snapshot_types() -> dict[type, tuple]:
    """Every heap type that exists now, with its own RELEVANT entries (``None`` when absent)."""
    heap = 1 << 9  # Py_TPFLAGS_HEAPTYPE
    todo, seen = [object], {}
    while todo:
        t = todo.pop()
        for sub in type.__subclasses__(t):
            if sub not in seen:
                seen[sub] = None
                todo.append(sub)
    tdict = type.__dict__["__dict__"].__get__
    return {t: tuple(tdict(t).get(n) for n in RELEVANT) for t in seen if t.__flags__ & heap}


def _snapshot_modules() -> list[tuple[str, object, list]]:
    """(name, module, [attr, value, ...]) of the callables of every module loaded now."""
    out = []
    for name, mod in list(sys.modules.items()):
        if name in ("__main__", "sys", "builtins") or type(mod) is not type(sys):  # typing.io is a class
            continue
        entries: list = []
        for k, v in list(vars(mod).items()):
            if callable(v):
                entries += [k, v]
        out.append((name, mod, entries))
    return out


def _make_checks(known: dict[type, tuple], modules: list[tuple[str, object, list]]):
    """Return ``plain(value)`` (may a test see this value?), ``intact()`` (are the loaded modules
    and the import system as they were?) and ``restore()``. Everything they call is bound here,
    before the program runs."""
    from collections import deque

    heap = 1 << 9
    mro_of, dict_of = type.__dict__["__mro__"].__get__, type.__dict__["__dict__"].__get__
    atoms = frozenset({int, float, complex, bool, str, bytes, type(None)})
    containers = (list, tuple, set, frozenset, deque)
    mods, meta, hooks = sys.modules, sys.meta_path, sys.path_hooks
    saved_meta, saved_hooks = tuple(meta), tuple(hooks)
    n_relevant = len(RELEVANT)

    def type_ok(t: type) -> bool:
        if not t.__flags__ & heap:  # a C type: its methods are what the interpreter ships
            return True
        for k in range(n_relevant):
            name = RELEVANT[k]
            for base in mro_of(t):
                d = dict_of(base)
                if name in d:  # a Python class must have existed, unchanged, before the program
                    if base.__flags__ & heap:
                        snap = known.get(base)
                        if snap is None or snap[k] is not d[name]:
                            return False
                    break
        return True

    def plain(value: object) -> bool:
        todo, seen = [value], set()
        while todo:
            v = todo.pop()
            t = type(v)
            if t in atoms or id(v) in seen:
                continue
            seen.add(id(v))
            if not type_ok(t):
                return False
            if isinstance(v, dict):
                for k, x in dict.items(v):
                    todo.append(k)
                    todo.append(x)
            elif isinstance(v, containers):
                todo.extend(iter(v))
        return True

    def intact() -> bool:
        if sys.modules is not mods or sys.meta_path is not meta or tuple(meta) != saved_meta:
            return False
        for name, mod, entries in modules:
            if mods.get(name) is not mod:
                return False
            d = mod.__dict__
            for k in range(0, len(entries), 2):
                if d.get(entries[k]) is not entries[k + 1]:
                    return False
        return True

    def restore() -> None:
        sys.modules, sys.meta_path, sys.path_hooks = mods, meta, hooks
        meta[:], hooks[:] = saved_meta, saved_hooks
        for name, mod, entries in modules:
            mods[name] = mod
            d = mod.__dict__
            for k in range(0, len(entries), 2):
                d[entries[k]] = entries[k + 1]

    return plain, intact, restore


def _make_guard(plain, intact, flag: list):
    """Wrap a program callable for the tests: a result that is not plain data, or modules left
    patched after the call, mark ``flag`` (read by the harness, out of the program's reach)."""

    def guard(fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            if not intact() or not plain(out):
                flag.append(1)
                raise AssertionError("sandbox: result is not plain data, or modules were patched")
            return out

        return call

    return guard


def _make_hook(state: dict):
    """The audit hook (PEP 578): no frames (but in the program's top-level thread, and never a
    generator's), no gc walks, ctypes, tracing, new hooks, signals, code replacement, symlinks, no
    path with a "proc" component (/proc/self/mem: matters without namespaces, where /proc shows)."""
    from _thread import get_ident

    deny = frozenset({"sys._current_frames", "sys._current_exceptions", "gc.get_objects",
                      "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
                      "sys.addaudithook", "os.kill", "os.killpg", "signal.pthread_kill", "os.symlink"})
    path_events = frozenset({"open", "os.chdir"})
    frame_attrs = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
    gen_flags = 0x20 | 0x80 | 0x100 | 0x200  # generator, coroutine, iterable coroutine, async gen

    def hook(event: str, args: tuple) -> None:
        if event in deny or event.startswith("ctypes."):
            raise RuntimeError(f"sandbox: {event} is not allowed")
        if event == "sys._getframe":
            if get_ident() != state["frames"]:
                raise RuntimeError("sandbox: sys._getframe is not allowed here")
            f = args[0]
            while f is not None:
                if f.f_code.co_flags & gen_flags:
                    raise RuntimeError("sandbox: frames of generators are not available")
                f = f.f_back
        elif event == "object.__getattr__" and args[1] in frame_attrs:
            raise RuntimeError(f"sandbox: {args[1]} is not available")
        elif event == "object.__setattr__" and args[1] == "__code__":
            raise RuntimeError("sandbox: replacing code objects is not allowed")
        elif event in path_events:
            path = args[0]
            if isinstance(path, bytes):
                path = path.decode("utf-8", "replace")
            if isinstance(path, str) and "proc" in path.split("/"):
                raise RuntimeError("sandbox: /proc is not available")

    return hook


def _run_program(code, ns: dict, go, done, exec_, base_exc, failed: list) -> None:
    """Phase 1 (its own thread): the program's top level. Everything arrives as an argument (this
    function runs with empty globals: the program may look at this frame)."""
    go.acquire()
    try:
        exec_(code, ns)
    except base_exc:
        failed.append(1)
    done.release()


def _run_tests(code, ns: dict, trusted: dict, clean: dict, entry: frozenset, guard, box: list, done,
               intact, flag: list) -> None:
    """Phase 2 (a fresh thread, where no frame is available). The tests' namespace: the program's
    names (callables guarded), the setup's names as the setup defined them (but the entry points)
    and the builtins as they were. It is built here, not on the main thread, because looking at
    the program's objects may run its code. ``box`` gets ONE value: did the tests all run without
    an exception, with nothing tampered with?"""
    try:
        tns = {}
        for k, v in list(ns.items()):
            if k != "__builtins__":
                typing_form = type(v).__module__ == "typing"
                tns[k] = guard(v) if callable(v) and not isinstance(v, type) and not typing_form else v
        for k, v in trusted.items():
            if k not in entry:
                tns[k] = v
        tns["__builtins__"] = dict(clean)
        exec(code, tns)
        ok = True
    except BaseException:
        ok = False
    box.append(ok and not flag and intact())
    done.release()


def _control(program, tests, ns: dict, trusted: dict, clean: dict, entry: frozenset, checks: tuple,
             state: dict, secret: bytes, token_fd: int, os_calls: tuple) -> None:
    """The controller thread: phase 1, restore, phase 2, then the token. It holds the secret; no
    frame of it is reachable from the program (frames are only available on phase 1's thread)."""
    exit_, write, start, new_lock = os_calls
    guard, intact, restore, flag = checks
    try:
        go, done, failed = new_lock(), new_lock(), []
        go.acquire()
        done.acquire()
        state["frames"] = start(_run_program, (program, ns, go, done, exec, BaseException, failed))
        go.release()
        done.acquire()
        state["frames"] = None
        if failed:
            exit_(1)
        restore()  # undo what the program did to the loaded modules' functions
        box: list = []
        done2 = new_lock()
        done2.acquire()
        start(_run_tests, (tests, ns, trusted, clean, entry, guard, box, done2, intact, flag))
        done2.acquire()
        if box == [True]:
            write(token_fd, secret + b"\n")
    except BaseException:
        exit_(1)
    exit_(0)


def run(job: dict, secret: list, token_fd: int) -> None:
    """Run the job; write the secret (``secret.pop()``) to ``token_fd`` iff the tests passed. Never
    returns. (Sealed: see ``stage2``. Module functions are bound before the program runs.)

    After the set-up the main thread only waits on a lock, so it runs no Python code: only the main
    thread may install a signal handler, and a handler is given the main thread's frame. (The
    program's finalizers and properties run on whichever thread touches them: never this one.)"""
    import _thread
    import builtins
    import importlib

    os_calls = (os._exit, os.write, _thread.start_new_thread, _thread.allocate_lock)
    exit_, new_lock = os._exit, _thread.allocate_lock
    try:
        opts = {"dont_inherit": True, "optimize": 0}  # asserts stay on
        setup = compile(job["setup"], "<setup>", "exec", **opts)
        tests = compile(job["tests"], "<tests>", "exec", **opts)
        program = compile(job["program"], "<program>", "exec", **opts)
    except BaseException:
        exit_(1)  # a program that does not compile fails; so does a broken job
    try:
        for name in PRELOAD:
            importlib.import_module(name)
        clean = dict(builtins.__dict__)
        plain, intact, restore = _make_checks(_snapshot_types(), _snapshot_modules())
        flag: list = []
        checks = (_make_guard(plain, intact, flag), intact, restore, flag)
        trusted = {"__name__": "__main__", "__builtins__": dict(clean)}
        exec(setup, trusted)  # trusted code, before any program code
        ns = {"__name__": "__main__", "__builtins__": builtins}
        exec(setup, ns)
        state = {"frames": None}
        entry = frozenset(job.get("entry") or ())
        sys.addaudithook(_make_hook(state))
        forever = new_lock()
        forever.acquire()
        _thread.start_new_thread(_control, (program, tests, ns, trusted, clean, entry, checks, state,
                                            secret.pop(), token_fd, os_calls))
        del program, tests, ns, trusted, clean, checks, state, job
        forever.acquire()  # the controller ends the process
    except BaseException:
        exit_(SETUP_FAILED)
    exit_(SETUP_FAILED)


if __name__ == "__main__":
    try:
        if sys.argv[1] == "stage1":
            stage1(*sys.argv[2:])
        elif sys.argv[1] == "stage2":
            stage2(*sys.argv[2:])
    except BaseException as e:  # set-up failure: say why on stderr (the parent logs it)
        print(f"sandbox harness: {type(e).__name__}: {e}", file=sys.stderr)
    os._exit(SETUP_FAILED)
