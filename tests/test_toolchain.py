"""The C toolchain: building, the in-process memo, the disk cache and its failure paths."""

import ctypes
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ember
import ember.numpy as enp
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


HEADER = toolchain.Header("#include <math.h>\n#include <stdint.h>\n")
HEADED = HEADER.include + "double ember_root(double x) { return sqrt(x) + %d; }\n"


def test_header_is_precompiled_once_into_the_cache(cache):
    lib = toolchain.build(HEADED % 1, header=HEADER)
    lib.ember_root.restype, lib.ember_root.argtypes = ctypes.c_double, [ctypes.c_double]
    assert lib.ember_root(16.0) == 5.0
    header = cache / HEADER.name
    assert header.read_text() == HEADER.text
    assert (cache / (HEADER.name + ".gch")).stat().st_size > 0
    stamp = os.stat(str(header) + ".gch").st_mtime_ns
    toolchain.build(HEADED % 2, header=HEADER)
    assert os.stat(str(header) + ".gch").st_mtime_ns == stamp  # not precompiled again
    for entry in cache.iterdir():  # the cache emptied while the process runs
        entry.unlink()
    lib = toolchain.build(HEADED % 5, header=HEADER)
    lib.ember_root.restype, lib.ember_root.argtypes = ctypes.c_double, [ctypes.c_double]
    assert lib.ember_root(4.0) == 7.0


def test_compiler_uses_the_precompiled_header(cache):
    cc = toolchain.compiler()
    about = subprocess.run([cc.path, "--version"], capture_output=True, text=True).stdout
    if "Free Software Foundation" not in about:
        pytest.skip("checks gcc's precompiled headers")
    toolchain.build(HEADED % 3, header=HEADER)
    source = cache / "probe.c"
    source.write_text(HEADED % 4)
    # -H lists the headers read; gcc marks a valid precompiled header with "!".
    done = subprocess.run([cc.path, *toolchain.FLAGS, "-H", "-Winvalid-pch", str(source),
                           "-o", str(cache / "probe.so")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"! {cache / HEADER.name}.gch" in done.stderr, done.stderr


def test_header_name_covers_its_text():
    assert HEADER.name == toolchain.Header(HEADER.text).name
    assert HEADER.name != toolchain.Header(HEADER.text + "#include <string.h>\n").name


def test_missing_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_CC", str(tmp_path / "nonexistent"))
    assert not toolchain.available()
    with pytest.raises(FileNotFoundError, match="EMBER_CC"):
        toolchain._compile(SOURCE % 7, toolchain.Library(), "k", str(tmp_path), "x.so")


# --- what programs compile ---------------------------------------------------------------------

def _compiles_of(fn, *args):
    """``fn`` jitted on the cpu backend: its results and how many compiles its first call made."""


    before = toolchain.stats().compiles
    out = ember.jit(fn, backend="cpu")(*args)
    return out, toolchain.stats().compiles - before


def test_program_of_empty_results_compiles_nothing(cache):
    import ember.numpy as enp

    x = np.arange(6.0).reshape(2, 3)
    (a, b), compiles = _compiles_of(lambda x: (enp.sin(x[:, :0]) * 2, x[:0].sum(1)), x)
    assert compiles == 0
    assert (a.shape, b.shape) == ((2, 0), (0,))


def test_empty_result_between_kernels_runs_in_one_program(cache):
    import ember.numpy as enp

    x = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
    (y, e), compiles = _compiles_of(lambda x: (enp.exp(enp.tanh(x) * 3) + 1, enp.cos(x[:0])), x)
    assert compiles == 1
    expected = ember.jit(lambda x: enp.exp(enp.tanh(x) * 3) + 1, backend="numpy")(x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-6)
    assert e.shape == (0, 4)


def test_programs_start_with_the_prelude_their_helpers_need(cache):
    from ember.backends.cpu import program

    x = np.ones((2, 3), np.float32)
    plain = ember.jit(lambda x: x * 2 + 1, backend="cpu").lower(x).compile().as_text()
    a, w = np.ones((2, 64), np.float32), np.ones((32, 64), np.float32)  # the SIMD gemv
    simd = ember.jit(lambda a, w: a @ w.T, backend="cpu").lower(a, w).compile().as_text()
    assert plain.startswith(program._PRELUDE.include)
    assert simd.startswith(program._PRELUDE_SIMD.include)
    assert sorted(p.name for p in cache.iterdir() if p.suffix == ".gch") == sorted(
        [program._PRELUDE.name + ".gch", program._PRELUDE_SIMD.name + ".gch"])


# --- kernel libraries: compiled once, linked by the programs that call them ---------------------

KERNELS = toolchain.KernelLibrary("int ember_twice(int a) { return 2 * a + %d; }\n")
CALLER = "int ember_twice(int a);\nint ember_call(int a) { return ember_twice(a) + 1; }\n"


def test_kernel_library_is_built_once_and_linked(cache):
    kernels = toolchain.KernelLibrary(KERNELS.source % 0)
    before = toolchain.stats().compiles
    one = toolchain.build(CALLER, kernels.link())
    two = toolchain.build(CALLER + "int ember_other(void) { return ember_twice(5); }\n",
                          kernels.link())
    assert (one.ember_call(3), two.ember_other()) == (7, 10)
    assert toolchain.stats().compiles == before + 3  # the library, then each program
    assert len(_entries(cache)) == 3


def test_program_key_covers_the_kernel_library(cache):
    """Other kernel code: another library path, so another program (not a stale one)."""
    old, new = (toolchain.KernelLibrary(KERNELS.source % n) for n in (0, 100))
    assert toolchain.cache_key(CALLER, old.link()) != toolchain.cache_key(CALLER, new.link())
    assert toolchain.build(CALLER, old.link()).ember_call(3) == 7
    assert toolchain.build(CALLER, new.link()).ember_call(3) == 107


def test_corrupt_kernel_library_is_rebuilt(cache):
    kernels = toolchain.KernelLibrary(KERNELS.source % 2)
    path = cache / (toolchain.cache_key(kernels.source) + ".so")
    path.write_bytes(b"not a shared library")  # a crash mid-write elsewhere
    assert kernels.link().ldflags == (str(path),)
    assert toolchain.build(CALLER, kernels.link()).ember_call(1) == 5


def test_kernel_library_in_a_relative_cache_dir_links_by_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBER_CACHE_DIR", "relative")
    monkeypatch.setattr(toolchain, "_MEMO", {})
    link = toolchain.KernelLibrary(KERNELS.source % 4).link()
    assert toolchain.build(CALLER, link).ember_call(1) == 7
    program = tmp_path / "relative" / (toolchain.cache_key(CALLER, link) + ".so")
    load = "import ctypes, sys; print(ctypes.CDLL(sys.argv[1]).ember_call(1))"
    done = subprocess.run([sys.executable, "-c", load, str(program)], capture_output=True,
                          text=True, cwd=tmp_path / "relative")  # another cwd, a new process
    assert done.stdout.strip() == "7", done.stderr


def test_deleted_kernel_library_is_built_again_before_linking(cache):
    kernels = toolchain.KernelLibrary(KERNELS.source % 3)
    (path,) = kernels.link().ldflags
    os.unlink(path)  # the cache emptied while the process runs
    assert toolchain.build(CALLER, kernels.link()).ember_call(1) == 6
    assert os.path.exists(path)


def _attention_case():
    from ember.backends.cpu import attention
    from ember.ops.attention import attention as attend

    q = np.random.default_rng(0).standard_normal((1, 2, 4, 8)).astype(np.float32)
    return (attention.KERNELS, lambda q: attend(q, q, q)[0], (q,), "ember_attention_forward(",
            "ember_att_gemm(")


def _quant_case():
    from specs_quantized import random_blocks

    from ember.backends.cpu import quant
    from ember.ops.quantized import quant_matmul

    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    return (quant.kernels("q4_1"), lambda x, w: quant_matmul(x, w, "q4_1"),
            (x, random_blocks("q4_1", 5, 64)), "ember_qmv_q4_1_m3(", "ember_decode_q4_1(")


@pytest.mark.parametrize("case", [_attention_case, _quant_case], ids=["attention", "quant"])
def test_program_calling_kernels_compiles_without_their_source(cache, case):
    kernels, f, args, call, internal = case()
    kernels.link()  # the library, once per cache
    before = toolchain.stats()
    compiled = ember.jit(f, backend="cpu").lower(*args).compile()
    assert toolchain.stats().compiles == before.compiles + 1
    text = compiled.as_text()
    assert call in text and kernels.prototypes in text  # called and declared ...
    assert internal in kernels.source and internal not in text  # ... but not compiled again
    expected = ember.jit(f, backend="numpy")(*args)
    np.testing.assert_allclose(np.asarray(compiled(*args)), np.asarray(expected), rtol=1e-5,
                               atol=1e-5)


# --- programs kept by their graph (program_cache.py) -------------------------------------------

def _program_entries(directory):
    return sorted(p for p in directory.iterdir() if p.name.endswith(".program.json"))


def _refuse_passes(monkeypatch):
    """Make the backend's passes (fusion, lowering...) fail: only a kept program can run."""
    from ember.backends.cpu import backend

    def refuse(closed):
        raise AssertionError("the graph was compiled again despite a kept program")

    monkeypatch.setattr(backend, "prepare", refuse)


RNG = np.random.default_rng(7)
W = RNG.standard_normal((16, 16)).astype(np.float32)  # a big constant: passed by address
SHIFT = np.arange(4, dtype=np.float32)  # a small one: keyed by its bytes


def _layer(w, shift):
    def f(x, h):
        return enp.tanh(x @ w + enp.tile(shift, 4)), h * 2.0
    return f


def _layer_args():
    return (enp.asarray(RNG.standard_normal((3, 16)).astype(np.float32)),
            enp.asarray(RNG.standard_normal((3, 16)).astype(np.float32)))


def _expected(w, shift, x, h):
    return np.tanh(np.asarray(x) @ w + np.tile(shift, 4)), np.asarray(h) * 2.0


def _check(got, want):
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)


def test_a_new_process_runs_the_kept_program_without_compiling_the_graph(cache, monkeypatch):
    from ember.backends.cpu import program_cache

    # One version of ember's code in both processes (others may edit the tree meanwhile).
    monkeypatch.setattr(program_cache, "code_version", lambda: "test")
    x, h = _layer_args()
    _check(ember.jit(_layer(W, SHIFT))(x, h), _expected(W, SHIFT, x, h))
    assert len(_program_entries(cache)) == 1
    script = textwrap.dedent("""
        import sys, numpy as np
        sys.path.insert(0, sys.argv[1])
        import test_toolchain as t
        from ember.backends.cpu import backend, program_cache, toolchain
        program_cache.code_version = lambda: "test"
        backend.prepare = lambda closed: sys.exit("compiled the graph again")
        x, h = np.ones((3, 16), np.float32), np.full((3, 16), 3.0, np.float32)
        out = t.ember.jit(t._layer(t.W, t.SHIFT))(x, h)
        t._check(out, t._expected(t.W, t.SHIFT, x, h))
        print(toolchain.stats().compiles)
    """)
    env = {**os.environ, "EMBER_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"  # no compile: the library of the kept program loaded


def test_a_kept_program_computes_its_c_and_plan_when_asked(cache, monkeypatch):
    x, h = _layer_args()
    first = ember.jit(_layer(W, SHIFT)).lower(x, h).compile()
    monkeypatch.setattr(toolchain, "_MEMO", {})  # as a new process would start
    kept = ember.jit(_layer(W, SHIFT)).lower(x, h).compile()
    assert "_build_in_full" in vars(kept.program)  # loaded, not compiled
    _check(kept(x, h), _expected(W, SHIFT, x, h))
    assert kept.as_text() == first.as_text()
    assert kept.memory_analysis() == first.memory_analysis()
    _check(kept(x, h), _expected(W, SHIFT, x, h))  # and still runs, now built in full


def test_equal_graphs_with_other_big_constants_share_the_program_not_the_values(cache,
                                                                               monkeypatch):
    x, h = _layer_args()
    ember.jit(_layer(W, SHIFT))(x, h)
    _refuse_passes(monkeypatch)
    w2 = RNG.standard_normal((16, 16)).astype(np.float32)
    _check(ember.jit(_layer(w2, SHIFT))(x, h), _expected(w2, SHIFT, x, h))
    assert len(_program_entries(cache)) == 1


def test_key_covers_small_constants_donation_code_and_the_debug_fill(cache, monkeypatch):
    from ember.backends.cpu import program_cache
    from ember.backends.cpu.program_cache import program_key

    x, h = _layer_args()

    def key(shift=SHIFT, donate=(False, False)):
        closed = ember.jit(_layer(W, shift)).lower(x, h).graph
        return program_key(closed, donate)

    base = key()
    assert key() == base  # traced again: the same key
    assert key(shift=SHIFT + 1) != base
    assert key(donate=(False, True)) != base
    version = program_cache.code_version()
    assert len(version) == 64 and program_cache.code_version() == version
    monkeypatch.setattr(program_cache, "code_version", lambda: "other code")
    assert key() != base
    monkeypatch.setattr(program_cache, "code_version", lambda: version)
    monkeypatch.setenv("EMBER_DEBUG_FILL_FREED", "1")
    assert key() != base


def test_corrupt_program_entry_is_compiled_anew_and_rewritten(cache, monkeypatch):
    x, h = _layer_args()
    ember.jit(_layer(W, SHIFT))(x, h)
    (entry,) = _program_entries(cache)
    good = entry.read_bytes()
    for bad in (b"{not json", b'{"library": 3}', good.replace(b'"const_positions": [',
                                                               b'"const_positions": [99, ')):
        entry.write_bytes(bad)
        monkeypatch.setattr(toolchain, "_MEMO", {})
        _check(ember.jit(_layer(W, SHIFT))(x, h), _expected(W, SHIFT, x, h))
        assert entry.read_bytes() == good


def test_kept_program_whose_library_is_gone_is_compiled_anew(cache, monkeypatch):
    x, h = _layer_args()
    ember.jit(_layer(W, SHIFT))(x, h)
    for so in cache.glob("*.so"):  # replaced, not overwritten: this process maps them
        so.unlink()
        so.write_bytes(b"\x7fELF truncated")
    monkeypatch.setattr(toolchain, "_MEMO", {})
    _check(ember.jit(_layer(W, SHIFT))(x, h), _expected(W, SHIFT, x, h))


def test_programs_running_numpy_equations_are_not_kept(cache):
    x = enp.asarray(RNG.standard_normal(8).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(ember.jit(lambda x: enp.sort(x * 2.0))(x)),
                                  np.sort(np.asarray(x) * 2.0))
    assert _program_entries(cache) == []


@pytest.mark.parametrize("load, user, expected", [
    (1.2, None, None),          # only this process running: the runtime's bounded spin
    (5.0, None, "passive"),     # busy cores: sleep at once
    (5.0, "active", "active"),  # the user's choice wins
    (0.0, "passive", "passive"),
])
def test_openmp_wait_policy_follows_the_load_unless_the_user_chose(monkeypatch, load, user,
                                                                   expected):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    if user is not None:
        monkeypatch.setenv("OMP_WAIT_POLICY", user)
    monkeypatch.setattr(toolchain.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(toolchain.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    toolchain._openmp_wait_policy()
    assert os.environ.get("OMP_WAIT_POLICY") == expected
