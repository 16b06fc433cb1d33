"""A cold compile holds its entry's lock: processes compiling the same program at once (an MPI
job's) run the C compiler once; a lock left by a killed process or held too long never hangs."""

import collections
import fcntl
import os
import subprocess
import sys
import textwrap
import time

import pytest

from ember.backends.cpu import toolchain

pytestmark = pytest.mark.skipif(not toolchain.available(), reason="no C compiler")

SOURCE = "int ember_lock_test(int a) { return a * %d; }\n"

# Each process says it is ready, waits for the other, then jits the same function: both reach
# the compiler at the same moment.
CHILD = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import ember, ember.numpy as enp
    from ember.backends.cpu import toolchain

    ready = sys.argv[1]
    open(os.path.join(ready, sys.argv[2]), "w").close()
    while len(os.listdir(ready)) < 2:
        time.sleep(0.001)
    x = np.linspace(-1.0, 1.0, 7, dtype=np.float32)
    y = ember.jit(lambda t: enp.sin(t) * 2.5 + 1.0)(x)
    np.testing.assert_allclose(np.asarray(y), np.sin(x) * 2.5 + 1.0, rtol=1e-6)
    s = toolchain.stats()
    print(s.compiles, s.loads)
""")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache directory and an empty in-process memo."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("EMBER_CACHE_DIR", str(directory))
    monkeypatch.setattr(toolchain, "_MEMO", {})
    return directory


def _slow_logging_compiler(tmp_path):
    """A compiler that appends each compile's arguments to a log, and takes half a second
    longer than the system's (so another process arrives while it runs)."""
    log, wrapper = tmp_path / "compiles.log", tmp_path / "cc"
    wrapper.write_text(f"#!/bin/sh\ncase \" $* \" in *\" -o \"*) echo \"$*\" >> {log}; "
                       f"sleep 0.5;; esac\nexec {toolchain.compiler().path} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper, log


def test_two_processes_compiling_the_same_program_run_the_compiler_once(tmp_path, cache):
    cc, log = _slow_logging_compiler(tmp_path)
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "EMBER_CC": str(cc)}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(ready), str(i)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(2)]
    results = [child.communicate(timeout=120) for child in children]
    for child, (out, err) in zip(children, results):
        assert child.returncode == 0, err
    counts = [tuple(map(int, out.split())) for out, _ in results]
    sources = [word for line in log.read_text().splitlines() for word in line.split()
               if word.endswith((".c", ".h"))]
    assert sources, "the program was not compiled"
    # Every C file (the program, the precompiled header) went through the compiler once, run
    # by one process or the other; the other process loaded what it built.
    assert collections.Counter(sources).most_common(1)[0][1] == 1, sources
    # (compiles, loads) of each: one compiled the program's library, the other loaded it.
    assert sorted(counts) == [(0, 1), (1, 0)], counts
    assert len([s for s in sources if s.endswith(".c")]) == 1, sources


def _compiles_of(source):
    before = toolchain.stats().compiles
    lib = toolchain.build(source)
    return toolchain.stats().compiles - before, lib


def test_a_lock_left_by_a_killed_process_does_not_block(cache, monkeypatch):
    monkeypatch.setattr(toolchain, "LOCK_TIMEOUT", 60.0)
    source = SOURCE % 3
    lock = cache / (toolchain.cache_key(source) + ".lock")
    cache.mkdir()
    # A process takes the entry's lock and dies holding it (as one killed mid-compile would).
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, signal
        fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.kill(os.getpid(), signal.SIGKILL)
    """)], check=False)
    assert lock.exists()
    started = time.monotonic()
    compiles, lib = _compiles_of(source)
    assert compiles == 1 and lib.ember_lock_test(5) == 15
    assert time.monotonic() - started < 30  # the kernel released the dead process's lock


def test_a_lock_held_past_the_timeout_compiles_privately(cache, monkeypatch):
    monkeypatch.setattr(toolchain, "LOCK_TIMEOUT", 0.3)
    source = SOURCE % 4
    cache.mkdir()
    fd = os.open(cache / (toolchain.cache_key(source) + ".lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a live holder that never finishes
        started = time.monotonic()
        compiles, lib = _compiles_of(source)
        assert compiles == 1 and lib.ember_lock_test(5) == 20
        assert time.monotonic() - started >= 0.3  # it waited for the holder first
    finally:
        os.close(fd)
