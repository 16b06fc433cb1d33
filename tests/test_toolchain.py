"""The C toolchain: building, the in-process memo, the disk cache and its failure paths."""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from ember.backends.cpu import toolchain

pytestmark = pytest.mark.skipif(not toolchain.available(), reason="no C compiler")

SOURCE = "int ember_add(int a, int b) { return a + b + %d; }\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache directory and an empty in-process memo."""
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(toolchain, "_MEMO", {})
    return tmp_path


def _entries(directory):
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".so")


def test_build_loads_a_callable_library(cache):
    lib = toolchain.build(SOURCE % 1)
    assert lib.ember_add(2, 3) == 6
    assert len(_entries(cache)) == 1
    assert toolchain.build(SOURCE % 1) is lib  # in-process memo


def test_second_build_hits_the_disk_cache(cache, monkeypatch):
    toolchain.build(SOURCE % 2)
    monkeypatch.setattr(toolchain, "_MEMO", {})  # as a new process would start

    def refuse(*args, **kwargs):
        raise AssertionError("compiled again despite a cached library")

    monkeypatch.setattr(toolchain, "_compile", refuse)
    assert toolchain.build(SOURCE % 2).ember_add(1, 1) == 4


def test_stats_count_compiles_and_disk_loads(cache, monkeypatch):
    before = toolchain.stats()
    toolchain.build(SOURCE % 8)
    toolchain.build(SOURCE % 8)  # in-process memo: neither a compile nor a load
    compiled = toolchain.stats()
    assert compiled.compiles == before.compiles + 1
    assert compiled.seconds > before.seconds
    assert compiled.cpu_seconds > before.cpu_seconds
    assert compiled.loads == before.loads
    monkeypatch.setattr(toolchain, "_MEMO", {})
    toolchain.build(SOURCE % 8)
    after = toolchain.stats()
    assert after == toolchain.Stats(compiled.compiles, compiled.seconds,
                                    compiled.cpu_seconds, compiled.loads + 1)


def test_key_covers_source_flags_and_library():
    a = toolchain.cache_key(SOURCE % 3)
    assert a == toolchain.cache_key(SOURCE % 3)
    assert a != toolchain.cache_key(SOURCE % 4)
    assert a != toolchain.cache_key(SOURCE % 3, toolchain.Library(cflags=("-DX",)))


def test_corrupt_entry_is_rebuilt(cache):
    # A truncated entry, as a crash of a process without atomic writes would leave (never
    # overwrite a loaded library in place: it is mapped into this process).
    entry = cache / (toolchain.cache_key(SOURCE % 5) + ".so")
    entry.write_bytes(b"\x7fELF truncated")
    assert toolchain.build(SOURCE % 5).ember_add(0, 0) == 5
    assert entry.stat().st_size > 1000


def test_two_processes_building_the_same_source_both_succeed(cache):
    script = textwrap.dedent(f"""
        from ember.backends.cpu import toolchain
        print(toolchain.build({SOURCE % 6!r}).ember_add(1, 2))
    """)
    env = {**os.environ, "EMBER_CACHE_DIR": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert [out.strip() for out, _ in results] == ["9", "9"]
    assert len(_entries(cache)) == 1
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_compile_error_is_reported_as_embers_bug_with_the_source_kept(cache):
    broken = "int ember_broken(void) { return undeclared_name; }\n"
    with pytest.raises(toolchain.CompilerBugError, match="bug in ember") as info:
        toolchain.build(broken)
    message = str(info.value)
    kept = next(line.split(": ", 1)[1] for line in message.splitlines()
                if line.strip().startswith("source:"))
    assert open(kept).read() == broken
    assert "undeclared_name" in message  # the compiler's own diagnostic is in the report
    assert not _entries(cache)


def test_blas_library_links(cache):
    source = textwrap.dedent("""
        #include <cblas.h>
        float ember_dot(const float *x, const float *y, int n) {
            return scipy_cblas_sdot(n, x, 1, y, 1);
        }
    """)
    lib = toolchain.build(source, toolchain.blas())
    lib.ember_dot.restype = ctypes.c_float
    x = (ctypes.c_float * 3)(1, 2, 3)
    y = (ctypes.c_float * 3)(4, 5, 6)
    assert lib.ember_dot(x, y, 3) == 32.0


def test_missing_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_CC", str(tmp_path / "nonexistent"))
    assert not toolchain.available()
    with pytest.raises(FileNotFoundError, match="EMBER_CC"):
        toolchain._compile(SOURCE % 7, toolchain.Library(), "k", str(tmp_path), "x.so")
