"""The profiler of compiled programs (``Compiled.profile``, ``ember/backends/cpu/profile.py``).

A program with a product, a fused kernel, attention, indexing and an equation that runs
through NumPy is profiled: every equation of the program is reported once, with its kind, a
positive time, the FLOPs of products and attention as computed from the shapes, and the timed
parts add up to at most the measured total, most of it for a program with real work. The timed
program computes what the default one does, is a different source (the default has no timer),
leaves its arguments (donated ones too) and the random state as they were, and is refused on
the NumPy backend and for a bad ``runs``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import ember
import ember.numpy as enp
from ember import lax
from ember.backends.cpu import toolchain
from ember.backends.cpu.profile import KINDS, Profile
from ember.errors import EmberError, EmberValueError, UnsupportedError
from ember.ops.attention import attention

pytestmark = pytest.mark.skipif(not toolchain.available(), reason="no C compiler")

RNG = np.random.default_rng(5)
M, K, N = 192, 160, 256
HEADS, LENGTH, DIM = 4, 64, 32


def _mixed(x, w, q, k, v, i):
    h = enp.tanh(x @ w)                                    # product, fused kernel
    row = lax.dynamic_slice(h, (i, 0), (1, N))             # indexing
    ordered = enp.sort(h, axis=-1)                         # NumPy (no C for sort)
    out, _ = attention(q, k, v, causal=True)               # attention
    return ordered + row, out


def _arguments():
    def f32(*shape):
        return enp.asarray(RNG.standard_normal(shape).astype(np.float32))
    return (f32(M, K), f32(K, N), f32(HEADS, LENGTH, DIM), f32(HEADS, LENGTH, DIM),
            f32(HEADS, LENGTH, DIM), enp.asarray(np.int32(7)))


@pytest.fixture(scope="module")
def profiled():
    args = _arguments()
    compiled = ember.jit(_mixed, backend="cpu").lower(*args).compile()
    return compiled, args, compiled.profile(*args, runs=2)


def test_every_equation_once_with_its_kind(profiled):
    compiled, _, profile = profiled
    eqns = compiled.program.graph.eqns
    assert [e.index for e in profile.entries] == list(range(len(eqns)))
    kinds = {e.kind for e in profile.entries}
    assert {"product", "fused kernel", "attention", "indexing", "numpy"} <= kinds
    by_prim = {eqn.prim.name: e for eqn, e in zip(eqns, profile.entries)}
    assert by_prim["sort"].kind == "numpy"
    assert by_prim["dynamic_slice"].kind == "indexing"
    assert all(e.seconds > 0 for e in profile.entries)


def test_products_and_attention_count_their_flops(profiled):
    _, _, profile = profiled
    (product,) = [e for e in profile.entries if e.kind == "product"]
    assert product.flops == 2 * M * N * K
    assert f"{M}x{N}x{K}" in product.what and "gemm" in product.what
    (attn,) = [e for e in profile.entries if e.kind == "attention"]
    assert attn.flops == 0.5 * HEADS * LENGTH * LENGTH * 2 * (DIM + DIM)  # causal: half
    kernel = next(e for e in profile.entries if e.kind == "fused kernel")
    assert kernel.flops is None and kernel.nbytes > 0 and "GB/s" in kernel.rate()


def test_parts_add_up_to_the_total(profiled):
    _, _, profile = profiled
    assert math.isclose(sum(profile.by_kind.values()), profile.timed, rel_tol=1e-9)
    assert 0 <= profile.untimed < profile.total
    # The timers cover the work; only the call itself is outside them.
    assert profile.timed >= 0.5 * profile.total


def test_table_lists_every_kind_and_the_total(profiled):
    _, _, profile = profiled
    text = str(profile)
    order = [k for k in KINDS if k in profile.by_kind]
    positions = [text.index(f"\n{k} ") for k in order]
    assert positions == sorted(positions)
    assert "untimed (calls)" in text and "\ntotal " in text
    assert f"{M}x{N}x{K} float32" in text and "GFLOP/s" in text
    assert len(profile.grouped()) <= len(profile.entries)


def test_timed_program_computes_the_same_and_is_another_source(profiled):
    compiled, args, _ = profiled
    twin = compiled.program._twin
    assert "ember_profile" in twin.as_text() and "ember_profile" not in compiled.as_text()
    assert twin._arena._memory is None  # kept between profiles without its memory
    for a, b in zip(compiled(*args), twin(*[a._buffer for a in args])):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_identical_equations_are_grouped():
    def layers(x, w):
        for _ in range(3):
            x = enp.tanh(x @ w)
        return x
    x = enp.asarray(RNG.standard_normal((32, 48)).astype(np.float32))
    w = enp.asarray(RNG.standard_normal((48, 48)).astype(np.float32))
    profile = ember.jit(layers, backend="cpu").lower(x, w).compile().profile(x, w, runs=1)
    counts = {entry.what: n for entry, n, _ in profile.grouped()}
    assert [n for what, n in counts.items() if what.startswith("32x48x48 float32")] == [3]
    assert isinstance(profile, Profile) and profile.runs == 1


def test_donated_arguments_are_left_as_they_were():
    def write(cache, update, at):
        return lax.dynamic_update_slice(cache, update, (at,))
    cache = enp.asarray(np.arange(6, dtype=np.float32))
    update = enp.asarray(np.full(2, -1.0, np.float32))
    jitted = ember.jit(write, backend="cpu", donate_argnums=0)
    compiled = jitted.lower(cache, update, np.int32(1)).compile()
    assert compiled.program.overwrites  # the result is stored over the cache
    compiled.profile(cache, update, np.int32(1), runs=2)
    np.testing.assert_array_equal(np.asarray(cache), np.arange(6, dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(jitted(cache, update, np.int32(1))),
                                  [0, -1, -1, 3, 4, 5])


def test_random_state_is_left_as_it_was():
    def draw(x):
        return x + ember.random.normal(ember.random.next_key(), x.shape, enp.float32)
    x = enp.zeros(4, enp.float32)
    jitted = ember.jit(draw, backend="cpu")
    compiled = jitted.lower(x).compile()
    ember.random.seed(3)
    first = np.asarray(jitted(x))
    ember.random.seed(3)
    compiled.profile(x, runs=2)
    np.testing.assert_array_equal(np.asarray(jitted(x)), first)


def test_empty_results_are_reported_as_skipped():
    def f(x, w):
        return x[:0] * 2.0, x @ w
    x, w = enp.ones((4, 3)), enp.ones((3, 2))
    profile = ember.jit(f, backend="cpu").lower(x, w).compile().profile(x, w, runs=1)
    kinds = [e.kind for e in profile.entries]
    assert "empty" in kinds and "product" in kinds
    assert all(e.seconds == 0 for e in profile.entries if e.kind == "empty")


def test_refused_where_it_cannot_run():
    x = enp.ones((2, 2))
    compiled = ember.jit(lambda a: a @ a, backend="cpu").lower(x).compile()
    with pytest.raises(EmberValueError, match="runs must be an integer >= 1"):
        compiled.profile(x, runs=0)
    with pytest.raises(EmberError, match="profiled with structure"):
        compiled.profile(x, x)
    numpy_compiled = ember.jit(lambda a: a @ a, backend="numpy").lower(x).compile()
    with pytest.raises(UnsupportedError, match="'numpy' backend"):
        numpy_compiled.profile(x)
