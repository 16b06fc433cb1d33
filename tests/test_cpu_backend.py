"""The compiled CPU backend against the NumPy backend: primitives, an MLP, a tiny Llama (forward,
gradient, a decode step with its cache donated), random graphs, the debug fill, the fallback."""

from __future__ import annotations

import os
import time
import warnings
from unittest import mock

import numpy as np
import pytest
from helpers import assert_close, chunks, jit_batched, tol
from hypothesis import given, settings
from hypothesis import strategies as st
from primitive_specs import cases, make_args
from tiny_models import tiny_model

import ember
import ember.numpy as enp
from ember import ops as lax
from ember.backends import get_backend
from ember.backends.cpu import toolchain

pytestmark = pytest.mark.skipif(not toolchain.available(), reason="no C compiler")

C_KINDS = ("contraction", "indexing")


def _program(fn, *args, donate=()):
    """The compiled program of ``fn`` on the cpu backend (for its C and its memory plan)."""
    compiled = ember.jit(fn, backend="cpu", donate_argnums=donate).lower(*args).compile()
    assert compiled.as_text() == compiled.program.as_text()  # the public view of the C
    return compiled.program


def _leaves(tree):
    return [np.asarray(x) for x in ember.tree.tree_leaves(tree)]


def _same(fn, *args, rtol=2e-5, atol=1e-6, **jit_kwargs):
    """``fn`` jitted on the cpu backend equals ``fn`` jitted on the NumPy backend."""
    expected = ember.jit(fn, **jit_kwargs)(*args)
    actual = ember.jit(fn, backend="cpu", **jit_kwargs)(*args)
    for a, e in zip(_leaves(actual), _leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)
    return actual


def _assert_close_trees(actual, expected, rtol=1e-5, atol=1e-6):
    for a, e in zip(_leaves(actual), _leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


# --- every primitive ---------------------------------------------------------------------------

def _kind(spec):
    from ember.core.primitive import REGISTRY

    return REGISTRY[spec.name].kind


def _is_c_kind(spec):
    return _kind(spec) in C_KINDS


# Every dtype of the primitives with C rules of their own; representative dtypes of the rest
# (elementwise, reductions and movement become fused kernels; the others run through NumPy).
SPEC_CASES = ([p.values for p in cases(_is_c_kind)]
              + [p.values for p in cases(lambda s: not _is_c_kind(s), all_dtypes=False)])
CHUNK = 200  # cases per program: one translation unit, one compiler start, for all of them


@pytest.mark.parametrize("chunk", range(len(chunks(SPEC_CASES, CHUNK))))
def test_primitive_specs_batched_into_few_programs(chunk):
    rng = np.random.default_rng(chunk)
    chosen = chunks(SPEC_CASES, CHUNK)[chunk]
    arg_lists = [make_args(spec, rng, dt, shape) for spec, dt, shape in chosen]
    start = time.perf_counter()
    results = jit_batched([(spec.fn, args) for (spec, _, _), args in zip(chosen, arg_lists)])
    elapsed = time.perf_counter() - start
    for (spec, dt, shape), args, out in zip(chosen, arg_lists, results):
        expected = spec.ref(*args)
        atol = None
        if _kind(spec) == "contraction" and isinstance(expected, np.ndarray) and expected.size:
            # BLAS sums in its own order: errors scale with the result's magnitude, not each
            # element's (cancellation leaves small elements with the large ones' error).
            rtol, atol = tol(dt)
            atol = max(atol, rtol * float(np.abs(expected).max()))
        assert_close(out, expected, dt, atol=atol, err_msg=f"{spec.case_id}-{dt}-{shape}")
    print(f"{len(chosen)} primitive cases in one program: {elapsed:.2f} s (first call)")


@pytest.mark.parametrize("reduce", [lax.reduce_max, lax.reduce_min])
def test_max_over_an_empty_axis_raises_as_on_the_numpy_backend(reduce):
    """No identity: the C start value (-inf) would be returned where NumPy has no answer."""
    f = ember.jit(lambda x: reduce(x * 2.0, (0,)), backend="cpu")
    with pytest.raises(ember.ShapeError, match=f"{reduce.__name__}: zero-size array"):
        f(np.ones((0, 2)))
    np.testing.assert_array_equal(np.asarray(f(np.ones((1, 2)))), [2.0, 2.0])


@pytest.mark.parametrize("fn,operands", [
    (lambda x, i: lax.dynamic_slice(x, (i, 1), (2, 3)), [(5, 4), "i"]),
    (lambda x, u, i: lax.dynamic_update_slice(x, u, (i, 2)), [(5, 4), (2, 2), "i"]),
    (lambda x, i: lax.gather(x, i), [(5, 4), "idx"]),
    (lambda x, i, u: lax.scatter(x, i, u, "add"), [(5, 4), "idx", (3, 4)]),
    (lambda x, i, u: lax.scatter(x, i, u, "set"), [(5, 4), "idx", (3, 4)]),
])
def test_indexing_runs_in_c(fn, operands):
    """Float operands (shapes), a start index ("i", out of range too) and index vectors
    ("idx": [3, 1], with out-of-range ones, which gather clamps and scatter drops)."""
    rng = np.random.default_rng(10)
    args = [np.int64(6) if o == "i" else np.array([[1], [-1], [7]]) if o == "idx"
            else rng.standard_normal(o).astype(np.float32) for o in operands]
    _same(fn, *args)
    program = _program(fn, *args)
    assert [len(s) for s in program.segments] == [len(program.graph.eqns)]


@pytest.mark.parametrize("dims,lhs,rhs", [
    ((((1,), (0,)), ((), ())), (5, 3), (3, 4)),           # plain
    ((((0,), (0,)), ((), ())), (3, 5), (3, 4)),           # lhs transposed
    ((((1,), (1,)), ((), ())), (5, 3), (4, 3)),           # x @ W.T (a linear layer)
    ((((1,), (1,)), ((), ())), (1, 3), (4, 3)),           # one row: matrix-vector
    ((((2,), (1,)), ((0,), (0,))), (2, 5, 3), (2, 3, 4)),  # batched
    ((((2,), (2,)), ((1,), (1,))), (5, 2, 3), (4, 2, 3)),  # heads in the middle
    ((((1, 2), (0, 1)), ((), ())), (4, 2, 3), (2, 3, 5)),  # two contracted axes
    ((((1,), (0,)), ((), ())), (2, 0), (0, 3)),           # nothing to sum: zeros
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dot_general_layouts_call_blas_without_copies(dims, lhs, rhs, dtype):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal(lhs).astype(dtype), rng.standard_normal(rhs).astype(dtype)
    f = lambda a, b: lax.dot_general(a, b, dims[0], dims[1])  # noqa: E731
    _same(f, x, y)
    program = _program(f, x, y)
    # every equation in C, in one segment (the empty product may be folded away entirely)
    assert [len(s) for s in program.segments] == ([len(program.graph.eqns)]
                                                  if program.graph.eqns else [])


# --- models --------------------------------------------------------------------------------------

def _mlp_loss(params, x, y):
    h = x
    for w, b in params[:-1]:
        h = enp.tanh(h @ w + b)
    w, b = params[-1]
    return enp.mean((h @ w + b - y) ** 2)


def _mlp(rng, sizes=(8, 16, 16, 4)):
    return [(rng.standard_normal((m, n)).astype(np.float32) / np.sqrt(m),
             rng.standard_normal(n).astype(np.float32)) for m, n in zip(sizes, sizes[1:])]


def test_mlp_forward_and_gradient():
    rng = np.random.default_rng(2)
    params = _mlp(rng)
    x, y = rng.standard_normal((6, 8)).astype(np.float32), rng.standard_normal((6, 4))
    y = y.astype(np.float32)
    _same(ember.value_and_grad(_mlp_loss), params, x, y)


@pytest.fixture(scope="module")
def llama():
    return tiny_model(vocab_size=64, seed=3)


def test_llama_forward_and_value_and_grad(llama):
    ids = np.random.default_rng(4).integers(0, 64, size=(2, 7))
    _same(lambda m, i: m(i), llama, ids, rtol=1e-4, atol=1e-5)
    _same(ember.value_and_grad(lambda m, i: m.loss(i)), llama, ids, rtol=1e-4, atol=1e-5)


def _decode(model, cache, ids, pos):
    return model(ids, cache=cache, cache_pos=pos)


def test_decode_step_updates_the_donated_cache_in_place(llama):
    from ember.models.llama import KVCache

    config = llama.config
    step = ember.jit(_decode, donate_argnums=1, backend="cpu")
    reference = ember.jit(_decode, donate_argnums=1)
    cache, ref_cache = (KVCache.allocate(config, 1, 16) for _ in range(2))
    for pos, token in enumerate([5, 9, 2]):
        ids = np.array([[token]])
        before = [x._buffer.ctypes.data for x in cache.keys]  # addresses: no extra reference
        logits, cache = step(llama, cache, ids, pos)
        ref_logits, ref_cache = reference(llama, ref_cache, ids, pos)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-4,
                                   atol=1e-5)
        _assert_close_trees(cache, ref_cache)  # fused kernels: a few ulps
        if pos > 0:  # from the second step on, the cache is ours: written where it is
            assert [x._buffer.ctypes.data for x in cache.keys] == before
    program = _program(_decode, llama, cache, np.array([[1]]), 3, donate=1)
    assert len(program.overwrites) == 2 * config.num_hidden_layers


def test_donated_array_the_user_still_sees_is_not_written(llama):
    x = np.zeros((4, 3), np.float32)
    kept = enp.asarray(x)
    alias = kept  # a second reference: the program must not write into kept's buffer
    f = ember.jit(lambda c, u: lax.dynamic_update_slice(c, u, (1, 0)), donate_argnums=0,
                  backend="cpu")
    out = f(kept, enp.ones((1, 3), np.float32))
    np.testing.assert_array_equal(np.asarray(out)[1], 1.0)
    del alias
    np.testing.assert_array_equal(x, 0.0)


def test_llama_step_is_one_foreign_call_near_its_memory_lower_bound(llama):
    from ember.models.llama import KVCache

    ids = np.random.default_rng(5).integers(0, 64, size=(2, 7))
    program = _program(ember.value_and_grad(lambda m, i: m.loss(i)), llama, ids)
    assert [len(s) for s in program.segments] == [len(program.graph.eqns)]  # all C
    decode = _program(_decode, llama, KVCache.allocate(llama.config, 1, 16), np.array([[1]]), 3,
                      donate=1)
    assert [len(s) for s in decode.segments] == [len(decode.graph.eqns)]
    analysis = program.memory_analysis()
    assert analysis.temp_lower_bound <= analysis.temp_bytes <= 1.1 * analysis.temp_lower_bound
    assert analysis.output_bytes > 0 and analysis.argument_bytes > 0


# --- random graphs ----------------------------------------------------------------------------

@st.composite
def graphs(draw):
    """Chains mixing matrix products, indexing and elementwise work on [n, n] matrices."""
    ops = draw(st.lists(st.sampled_from(["matmul", "matmul_t", "take", "update", "window",
                                         "tanh", "add", "scatter_add"]),
                        min_size=1, max_size=8))
    starts = draw(st.lists(st.integers(-2, 6), min_size=len(ops), max_size=len(ops)))
    return ops, starts


def _apply(ops, starts, x, w, idx):
    values = [x]
    for op, s in zip(ops, starts):
        v = values[-1]
        if op == "matmul":
            v = v @ w
        elif op == "matmul_t":
            v = v @ values[0].T
        elif op == "take":
            v = lax.gather(v, idx)
        elif op == "update":
            v = lax.dynamic_update_slice(v, values[0][:2], (s, 0))
        elif op == "window":
            v = enp.concatenate([lax.dynamic_slice(v, (s, 0), (2, v.shape[1])), v[2:]])
        elif op == "tanh":
            v = enp.tanh(v)
        elif op == "add":
            v = v + values[len(values) // 2]
        else:
            v = lax.scatter(v, idx, values[0], "add")
        values.append(v)
    return values[-1], values[len(values) // 2]


@settings(max_examples=12, deadline=None)
@given(graphs(), st.booleans())
def test_random_graphs_match_the_numpy_backend(graph, fill_freed):
    """Also with freed memory poisoned: a program reading a dead buffer would differ."""
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((2, 5, 5)).astype(np.float32) / 2
    idx = rng.integers(-1, 6, size=(5, 1))
    with mock.patch.dict(os.environ, {"EMBER_DEBUG_FILL_FREED": "1" if fill_freed else "0"}):
        _same(lambda x, w, i: _apply(*graph, x, w, i), x, w, idx, rtol=1e-4, atol=1e-5)


# --- debug fill, fallback ---------------------------------------------------------------------

def test_debug_fill_of_freed_memory_changes_no_result(monkeypatch, llama):
    monkeypatch.setenv("EMBER_DEBUG_FILL_FREED", "1")
    rng = np.random.default_rng(7)
    params = _mlp(rng)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    y = rng.standard_normal((6, 4)).astype(np.float32)
    _same(ember.value_and_grad(_mlp_loss), params, x, y)
    ids = rng.integers(0, 64, size=(1, 5))
    _same(ember.value_and_grad(lambda m, i: m.loss(i)), llama, ids, rtol=1e-4, atol=1e-5)
    program = _program(ember.grad(_mlp_loss), params, x, y)
    assert "ember_poison" in program.as_text()


def test_freed_memory_is_poisoned_in_debug_mode(monkeypatch):
    """The fill itself: a temporary's bytes are NaN once its last reader has run."""
    monkeypatch.setenv("EMBER_DEBUG_FILL_FREED", "1")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)

    def f(a):
        t = a @ a.T          # a temporary in the arena, dead after the next product
        return (t @ a).sum()
    program = _program(f, a)
    temps = [b for b in program.plan.buffers if b.offset is not None]
    assert len(temps) == 2
    (total,) = program(a)
    assert total == (a @ a.T @ a).sum()
    for b in temps:  # freed in C (after the product) and in Python (after the NumPy sum)
        arena = program._arena._memory[b.offset: b.offset + b.nbytes]
        assert np.isnan(arena.view(np.float32)).all()


def test_without_a_compiler_jit_warns_once_and_computes(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_CC", str(tmp_path / "nonexistent"))
    backend = get_backend("cpu")
    monkeypatch.setattr(backend, "_warned", False)
    x = np.arange(6.0).reshape(2, 3)
    with pytest.warns(UserWarning, match="no C compiler") as record:
        out = ember.jit(lambda a: a @ a.T, backend="cpu")(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out2 = ember.jit(lambda a: (a @ a.T) * 2, backend="cpu")(x)  # no second warning
    assert len(record) == 1
    np.testing.assert_allclose(np.asarray(out), x @ x.T)
    np.testing.assert_allclose(np.asarray(out2), 2 * x @ x.T)


def test_program_is_one_translation_unit_with_one_segment_per_c_run():
    a = np.ones((3, 3), np.float32)
    program = _program(lambda a: (a @ a) @ a, a)
    assert len(program.segments) == 1  # all C: one foreign call
    assert program.as_text().count("void ember_segment_") == 1
    program = _program(lambda a: enp.sort(a @ a) @ a, a)
    assert len(program.segments) == 2  # the sort runs through NumPy between two segments


@pytest.mark.parametrize("fn,folded", [
    (lambda x, w: x @ w.T, True),                                         # a linear layer
    (lambda x, w: enp.einsum("bij,jk->bki", x.reshape(2, 3, 4), w), True),  # batch transposed
    (lambda x, w: lax.dot_general(lax.transpose(x.reshape(2, 3, 4), (2, 1, 0)), w,
                                  ((0,), (0,))), False),                  # reorders free axes
])
def test_transposes_feeding_products_are_read_through_strides(fn, folded):
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((4, 4))
    w = w.astype(np.float32)
    _same(fn, x, w)
    program = _program(fn, x, w)
    def transposes(e):  # a transpose, or a fused kernel holding one
        inner = e.params["body"].graph.eqns if e.prim.name == "fused" else [e]
        return any(i.prim.name == "transpose" for i in inner)
    operands = {a.id for e in program.graph.eqns if e.prim.name == "dot_general"
                for a in e.inputs}
    copied = [e for e in program.graph.eqns
              if transposes(e) and any(v.id in operands for v in e.outputs)]
    assert not copied if folded else copied


def test_control_flow_bodies_run_on_the_cpu_backend():
    def f(x, w):
        def body(c, _):
            return enp.tanh(c @ w), c.sum()
        return ember.lax.scan(body, x, None, length=3)
    rng = np.random.default_rng(9)
    x, w = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((4, 4))
    _same(f, x, w.astype(np.float32))
    _same(ember.grad(lambda x, w: f(x, w)[0].sum()), x, w.astype(np.float32))


def test_scalars_and_inputs_returned_as_they_are():
    a = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    s, out_a, prod = ember.jit(lambda s, a: (s, a, (a @ a.T) * s), backend="cpu")(2.0, a)
    assert np.asarray(s).shape == () and float(s) == 2.0
    np.testing.assert_array_equal(np.asarray(out_a), a)
    np.testing.assert_allclose(np.asarray(prod), a @ a.T * 2)


def test_a_group_without_a_kernel_runs_its_equations_through_numpy():
    """complex128 has no C kernel: the fused group is replaced by its equations."""
    z = (np.arange(6.0) + 1j).reshape(2, 3)
    f = lambda z: enp.exp(z) * 2 + z  # noqa: E731
    _same(f, z, rtol=1e-12, atol=1e-12)
    program = _program(f, z)
    assert not any(e.prim.name == "fused" for e in program.graph.eqns)
    assert not program.segments


def test_optimizer_step_writes_parameters_and_state_in_place():
    """AdamW on donated parameters and state: the fused update writes over its operands."""
    rng = np.random.default_rng(11)
    opt = ember.optim.AdamW(lr=1e-2)

    def step(params, state, x, y):
        return opt.update(params, ember.grad(_mlp_loss)(params, x, y), state)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    y = rng.standard_normal((6, 4)).astype(np.float32)
    fast = ember.jit(step, donate_argnums=(0, 1), backend="cpu")
    slow = ember.jit(step, donate_argnums=(0, 1))
    host = _mlp(rng)
    params, ref_params = (ember.tree.tree_map(enp.asarray, host) for _ in range(2))
    state, ref_state = opt.init(params), opt.init(ref_params)
    for i in range(3):
        before = [x._buffer.ctypes.data for x in ember.tree.tree_leaves((params, state))]
        params, state = fast(params, state, x, y)
        ref_params, ref_state = slow(ref_params, ref_state, x, y)
        _assert_close_trees((params, state), (ref_params, ref_state))  # keeps no view
        after = [x._buffer.ctypes.data for x in ember.tree.tree_leaves((params, state))]
        if i > 0:  # the first step copies the initial buffers, which the caller still held
            # Every result lives in a donated buffer (a kernel may store the new parameter
            # over the old moment of the same shape: any donated buffer of its size will do).
            assert sorted(after) == sorted(before)


def test_concurrent_calls_of_one_program_get_separate_arenas():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(12)
    xs = [rng.standard_normal((32, 32)).astype(np.float32) for _ in range(8)]
    f = ember.jit(lambda x: enp.tanh(x @ x) @ x, backend="cpu")
    f(xs[0])  # compile once
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: np.asarray(f(x)), xs * 4))
    for x, r in zip(xs * 4, results):
        np.testing.assert_allclose(r, np.tanh(x @ x) @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64", "complex64",
                                   "complex128"])
def test_poison_is_a_nan_of_every_float_type(dtype):
    from ember import dtypes
    from ember.backends.cpu.program import poison

    dt = dtypes.canonicalize(getattr(dtypes, dtype))
    unit, pattern = poison(dt)
    data = np.frombuffer(pattern.to_bytes(8, "little")[:unit] * (dt.itemsize // unit), dt)
    assert np.isnan(data.astype(np.complex128)).all()
