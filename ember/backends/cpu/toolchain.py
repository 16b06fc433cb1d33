"""The C toolchain: find the system compiler, build shared libraries, cache them on disk.

Every compiled CPU program and kernel goes through :func:`build`, which turns one C translation
unit into a loaded ``ctypes.CDLL``. Compiling costs a compiler start (tens to hundreds of
milliseconds), so results are memoised twice: in this process by source, and on disk under a
key that covers everything the machine code depends on (source, flags, compiler version, CPU
features). Writes go to a private temporary file renamed into place, so two processes building
the same library never see each other's half-written file; an entry that fails to load is
rebuilt. A cold build holds a lock on its key (:func:`entry_lock`), so when several processes
of a job compile the same program at once, one runs the compiler and the others load its result.
A compile error is ember's bug (the user never wrote the C): it is raised as
:class:`CompilerBugError`, with the source kept on disk for the report.

What is left of a compile's cost is cut without changing the machine code: the system headers
every program starts with are a :class:`Header`, precompiled once per cache directory, and big
shape-generic kernels are a :class:`KernelLibrary`, compiled once and linked by the programs
that call them.
:func:`stats` counts the compiles and their time (decision 0017).

Environment: ``EMBER_CC`` (the compiler; default ``cc``, then ``gcc``), ``EMBER_CACHE_DIR``
(default ``~/.cache/ember``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# -O3 -march=native: vectorised loops for this CPU (the CPU features are in the cache key).
# -ffp-contract=off: no fused multiply-adds the reference does not do, so elementwise results
# match NumPy bit for bit where the operation order is the same. -fno-math-errno lets sqrt and
# friends vectorise (errno is never read). -fopenmp: kernels split loops across cores.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11",
         "-ffp-contract=off", "-fno-math-errno")


class CompilerBugError(RuntimeError):
    """The C compiler rejected code ember generated: a bug in ember, not in the user's program."""


@dataclass(frozen=True)
class Compiler:
    """A usable C compiler: its path and the version line that goes into cache keys."""

    path: str
    version: str


def _resolve(name: str) -> str | None:
    return shutil.which(name) if os.sep not in name else (name if os.access(name, os.X_OK)
                                                           else None)


@functools.lru_cache(maxsize=8)
def _probe(requested: str | None) -> Compiler | None:
    names = [requested] if requested else ["cc", "gcc"]
    for name in names:
        path = _resolve(name)
        if path is None:
            continue
        try:
            done = subprocess.run([path, "--version"], capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return Compiler(path, done.stdout.splitlines()[0] if done.stdout else path)
    return None


def compiler() -> Compiler | None:
    """The C compiler named by ``EMBER_CC`` (else ``cc``/``gcc`` on ``PATH``), or None."""
    return _probe(os.environ.get("EMBER_CC") or None)


def available() -> bool:
    """Whether a C compiler is there to build compiled programs."""
    return compiler() is not None


@functools.lru_cache(maxsize=1)
def cpu_features() -> str:
    """The CPU's model and feature flags: ``-march=native`` code is only valid on such a CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name", "Features"))]
        # One core's lines suffice (all cores are alike); sorted for a stable key.
        return platform.machine() + "|" + "|".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + "|" + platform.processor()


def cache_dir() -> str:
    return os.environ.get("EMBER_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "ember")


@dataclass(frozen=True)
class Library:
    """Extra compile and link arguments for a library a translation unit uses (BLAS, a
    :class:`KernelLibrary`); ``a + b`` uses both."""

    cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()

    def __add__(self, other: Library) -> Library:
        return Library(self.cflags + other.cflags, self.ldflags + other.ldflags)


@functools.lru_cache(maxsize=1)
def blas() -> Library:
    """OpenBLAS from the ``scipy-openblas32`` wheel: 32-bit integers, symbols prefixed with
    ``scipy_`` (so it never clashes with the OpenBLAS that NumPy loads)."""
    import scipy_openblas32 as ob

    lib = ob.get_lib_dir()
    return Library(cflags=(f"-I{ob.get_include_dir()}",),
                   ldflags=(f"-L{lib}", f"-l{ob.get_library()}", f"-Wl,-rpath,{lib}"))


def cache_key(source: str, library: Library = Library()) -> str:
    """Hash of everything the built library depends on."""
    cc = compiler()
    parts = [source, " ".join(FLAGS), " ".join(library.cflags), " ".join(library.ldflags),
             cc.path if cc else "", cc.version if cc else "", cpu_features()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _openmp_wait_policy() -> None:
    """Let OpenMP threads spin briefly between parallel regions on idle cores, and sleep at once
    on busy ones (unless the user chose, with ``OMP_WAIT_POLICY``).

    OpenMP's is the program's only pool (BLAS runs single-threaded on its threads: decision
    0016), so a spinning thread starves no other pool of ours. On idle cores waking a sleeping
    thread costs ~45 us a parallel region, and a decode step has ~120 regions: measured on 2
    idle cores, SmolLM2 decode 23.6 tok/s passive against 34.3 with the runtime's bounded spin,
    Q4_1 59 against 88. On cores other processes also use, a spinning thread costs whole time
    slices: decode 21.1 passive against 16.7 spinning with two busy processes beside it, and 9.8
    against 1.9 at a load of 4-5. So the runtime keeps its default (a bounded spin) unless the
    load average, less this process, is already half the cores this process may use. The
    runtime reads the setting when it loads, so it is decided before ember loads any library,
    once per process; a runtime another library loaded first (llama.cpp's, torch's) keeps its
    own policy.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if os.getloadavg()[0] - 1 >= (cores or 1) / 2:
        os.environ["OMP_WAIT_POLICY"] = "passive"


@dataclass(frozen=True)
class Header:
    """System headers that translation units start with, parsed once for all of them.

    Reading the C library's headers is a fixed part of every compile: about 10 ms of the 60 ms
    that a small program takes. Built with ``build(source, header=h)``, a source that begins
    with ``h.include`` finds the header precompiled (gcc's ``.gch``) in the cache directory.
    Where the compiler cannot use the precompiled form it reads the text instead: the machine
    code is the same either way. The header's name is a hash of its text, the flags, the
    compiler and the CPU, so the including source's cache key covers all of them.
    """

    text: str

    @property
    def name(self) -> str:
        return f"ember-{cache_key(self.text)[:16]}.h"

    @property
    def include(self) -> str:
        return f'#include "{self.name}"\n'


# An exported function's definition: "void ember_f(int64_t n,\n    float *y) {" at a line start.
_EXPORTED = re.compile(r"^((?:const )?\w+ \**ember_\w+\([^)]*\)) *\{", re.MULTILINE)


@dataclass(frozen=True)
class KernelLibrary:
    """Kernels compiled once per machine into a shared library that programs link.

    Big shape-generic kernels (attention, quantised products) took most of a program's compile
    time when every program compiled them again as static helpers. Here ``source`` defines them
    once, exported (``ember_`` names); a program declares what it calls and links
    :meth:`link`'s result. The library is cached like any build (same key: source, flags,
    compiler, CPU), and its path, which is that key, is on the program's link line and so in
    the program's key: different kernel code means different programs. ``uses_blas``: the
    kernels call OpenBLAS (the library links it).
    """

    source: str
    uses_blas: bool = False

    @functools.cached_property
    def prototypes(self) -> str:
        """C declarations of the functions the library exports: its definitions that start a
        line with their return type (``static`` ones are its own)."""
        return "".join(f"{head};\n" for head in _EXPORTED.findall(self.source))

    def link(self) -> Library:
        """The arguments that link a program with this library, built first unless it is on
        disk (in this cache directory) and loads."""
        return Library(ldflags=(shared_library(self.source,
                                               blas() if self.uses_blas else Library()),))


_MEMO: dict[tuple[str, str], ctypes.CDLL] = {}
_MEMO_LOCK = threading.Lock()


@dataclass(frozen=True)
class Stats:
    """What building has cost this process: C compiler runs, their wall time and the CPU time
    the compiler used (seconds; on a busy machine the wall time is the larger), and libraries
    loaded from the disk cache instead (a compile saved)."""

    compiles: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    loads: int = 0


_STATS = [Stats()]


def stats() -> Stats:
    """The compiles and disk-cache loads of this process so far (the test suite prints them:
    compiling is most of a cold run's time)."""
    return _STATS[0]


def _count(compiles: int = 0, seconds: float = 0.0, cpu_seconds: float = 0.0,
           loads: int = 0) -> None:
    s = _STATS[0]
    _STATS[0] = Stats(s.compiles + compiles, s.seconds + seconds,
                      s.cpu_seconds + cpu_seconds, s.loads + loads)


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def build(source: str, library: Library = Library(), header: Header | None = None
          ) -> ctypes.CDLL:
    """Compile ``source`` into a shared library and load it (memoised in-process and on disk).

    ``header``: the :class:`Header` that ``source`` starts by including, made available to it
    (precompiled) when the source is compiled. Raises :class:`CompilerBugError` when the
    compiler rejects the source, and :class:`FileNotFoundError` when there is no compiler
    (check :func:`available` first).
    """
    key = cache_key(source, library)
    directory = cache_dir()
    with _MEMO_LOCK:
        lib = _MEMO.get((directory, key))
        if lib is None:
            lib = _MEMO[directory, key] = _load_or_build(source, library, key, directory,
                                                         header)
    return lib


def load(key: str) -> ctypes.CDLL | None:
    """The library :func:`build` made under ``key`` (its :func:`cache_key`) in this cache
    directory, loaded; None when it is not there or does not load (then build it anew)."""
    directory = cache_dir()
    with _MEMO_LOCK:
        lib = _MEMO.get((directory, key))
        if lib is None:
            _openmp_wait_policy()
            try:
                lib = ctypes.CDLL(os.path.join(directory, key + ".so"))
            except OSError:  # absent, truncated, or a library it links has gone
                return None
            _MEMO[directory, key] = lib
            _count(loads=1)
    return lib


def read_entry(name: str) -> bytes | None:
    """The bytes of the cache directory's file ``name``, or None when there is none."""
    try:
        with open(os.path.join(cache_dir(), name), "rb") as f:
            return f.read()
    except OSError:
        return None


def write_entry(name: str, data: bytes) -> None:
    """Store ``data`` as the cache directory's file ``name`` (atomically: a reader sees the
    old file or the whole new one)."""
    directory = cache_dir()
    os.makedirs(directory, exist_ok=True)
    _write_atomically(os.path.join(directory, name), data)


def shared_library(source: str, library: Library = Library()) -> str:
    """The path of ``source`` built into a shared library, for other libraries to link (as
    :func:`build`, and rebuilt if the file has gone since: a program's link needs it on disk).

    Linked by this absolute path, the library needs no ``-rpath``: the dynamic loader finds it
    by the path the linker records, and a process that loaded it already shares that copy.
    """
    key = cache_key(source, library)
    directory = cache_dir()
    so_path = os.path.abspath(os.path.join(directory, key + ".so"))  # not the cwd's at load
    with _MEMO_LOCK:
        if (directory, key) not in _MEMO or not os.path.exists(so_path):
            _MEMO[directory, key] = _load_or_build(source, library, key, directory, None)
    return so_path


def _load_or_build(source: str, library: Library, key: str, directory: str,
                   header: Header | None) -> ctypes.CDLL:
    _openmp_wait_policy()
    os.makedirs(directory, exist_ok=True)
    so_path = os.path.join(directory, key + ".so")
    lib = _load_built(so_path)
    if lib is None:
        with entry_lock(key):
            lib = _load_built(so_path)  # built by another process while this one waited
            if lib is None:
                start, cpu = time.perf_counter(), _children_cpu()
                _compile(source, library, key, directory, so_path, header)
                _count(compiles=1, seconds=time.perf_counter() - start,
                       cpu_seconds=_children_cpu() - cpu)
                lib = ctypes.CDLL(so_path)
    return lib


def _load_built(so_path: str) -> ctypes.CDLL | None:
    """The library at ``so_path`` when it is there and loads, counted as a load."""
    if not os.path.exists(so_path):
        return None
    try:
        lib = ctypes.CDLL(so_path)
    except OSError:
        return None  # a corrupt or truncated entry (a crash mid-write elsewhere): rebuild it
    _count(loads=1)
    return lib


# How long a cold build waits for another process building the same entry before it builds
# its own copy (a waste of work, never a wrong result: every write is atomic).
LOCK_TIMEOUT = 300.0


@contextlib.contextmanager
def entry_lock(name: str) -> Iterator[bool]:
    """Hold the cache directory's lock of entry ``name`` for the block (yields True), so
    processes building the same entry take turns: the later ones find it built.

    It is ``flock`` on the file ``<name>.lock``: the kernel releases it when its holder exits
    or is killed, so a crashed process leaves no stale lock. After :data:`LOCK_TIMEOUT`
    seconds, or where the file system cannot lock, the block runs without it (yields False).
    The lock files stay (removing one could let two holders lock different files).
    """
    directory = cache_dir()
    os.makedirs(directory, exist_ok=True)
    try:
        fd = os.open(os.path.join(directory, name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        yield _acquire(fd, time.monotonic() + LOCK_TIMEOUT)
    finally:
        os.close(fd)  # releases the lock


def _acquire(fd: int, deadline: float) -> bool:
    """Poll for ``fd``'s exclusive lock until ``deadline`` (a blocking flock has no timeout)."""
    delay = 0.002
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(2 * delay, 0.05)
        except OSError:
            return False  # a file system without flock: build without it


def _compile(source: str, library: Library, key: str, directory: str, so_path: str,
             header: Header | None = None) -> None:
    cc = compiler()
    if cc is None:
        raise FileNotFoundError("no C compiler found (set EMBER_CC)")
    if header is not None:
        _precompile(cc, header, directory)
    c_path = os.path.join(directory, key + ".c")
    _write_atomically(c_path, source.encode())
    _run_compiler(c_path, so_path, lambda out: [cc.path, *FLAGS, *library.cflags, c_path,
                                               "-o", out, *library.ldflags, "-lm"])


def _precompile(cc: Compiler, header: Header, directory: str) -> None:
    """Write ``header`` into the cache directory with its precompiled form beside it (where
    the compiler looks for it), unless an earlier build did."""
    h_path = os.path.join(directory, header.name)
    if os.path.exists(h_path) and os.path.exists(h_path + ".gch"):
        return
    with entry_lock(header.name):
        if os.path.exists(h_path) and os.path.exists(h_path + ".gch"):
            return  # precompiled by another process while this one waited
        _write_atomically(h_path, header.text.encode())
        flags = [f for f in FLAGS if f != "-shared"]
        _run_compiler(h_path, h_path + ".gch",
                      lambda out: [cc.path, *flags, "-x", "c-header", h_path, "-o", out])


def _run_compiler(source_path: str, out_path: str, command: Callable[[str], list[str]]
                  ) -> None:
    """Run ``command(temporary output path)`` and move its output to ``out_path``."""
    directory, name = os.path.split(out_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=directory)
    os.close(fd)
    cmd = command(tmp)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise CompilerBugError(
                "ember generated C code that the C compiler rejected. This is a bug in ember, "
                "not in your program; please report it with the kept source.\n"
                f"  source: {source_path}\n  command: {' '.join(cmd)}\n"
                f"  compiler says:\n{_tail(done.stderr)}")
        os.replace(tmp, out_path)  # atomic: readers see the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_atomically(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join("    " + ln for ln in text.strip().splitlines()[-lines:])
