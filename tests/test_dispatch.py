"""The caches and fast paths of eager dispatch and jit cache hits: same results, same errors.

Dispatch keeps answers it has computed (shape rules per operand types, the array a Python scalar
becomes, pytree structures); these tests check that a kept answer is only ever reused where
recomputing it would give the same thing, and that errors still name the user's line.
"""

import warnings

import numpy as np
import pytest

import ember
import ember.numpy as enp
from ember.core.trace import _params_key, abstract_eval
from ember.errors import DTypeError, EmberError, ShapeError, TracerError
from ember.ir.types import ArrayType
from ember.numpy._core import promote_args
from ember.ops import elementwise as ew
from ember.ops import structural as st

F32 = np.dtype("float32")


# --- the shape-rule memo ---------------------------------------------------------------------

def test_memo_returns_the_rules_type_and_keeps_weak_and_sharding_apart():
    strong, weak = ArrayType((2, 3), F32), ArrayType((2, 3), F32, weak=True)
    sharded = ArrayType((2, 3), F32, sharding=("x", None))
    add = ew.add.prim
    first = abstract_eval(add, [strong, strong], {})
    assert first == add.abstract_eval(strong, strong)
    assert abstract_eval(add, [ArrayType((2, 3), F32)] * 2, {}) is first  # equal types: kept
    out_weak = abstract_eval(add, [weak, weak], {})
    assert out_weak.weak and not first.weak
    assert abstract_eval(add, [sharded, sharded], {}) == add.abstract_eval(sharded, sharded)
    assert abstract_eval(add, [strong, strong], {}) is first  # still the strong answer


def test_memo_keys_params_by_value_and_type():
    assert _params_key({"axes": (0, 1)}) == _params_key({"axes": (0, 1)})
    assert _params_key({"n": 1}) != _params_key({"n": True})  # 1 == True, but not the same
    assert _params_key({"dims": ((0,), (1, None))}) is not None
    assert _params_key({"dtype": F32, "weak": False}) is not None
    for unkeyable in (0.5, [0, 1], (0, 1.0), (True,), np.int64(3), object()):
        assert _params_key({"p": unkeyable}) is None


def test_memo_with_params_matches_the_rule():
    x = ArrayType((2, 3), F32)
    bcast = st.broadcast_in_dim_p
    params = {"shape": (4, 2, 3), "dims": (1, 2)}
    assert abstract_eval(bcast, [x], params) == bcast.abstract_eval(x, **params)
    other = {"shape": (5, 2, 3), "dims": (1, 2)}
    assert abstract_eval(bcast, [x], other).shape == (5, 2, 3)


def test_rule_error_names_the_users_line_when_the_memo_is_warm():
    a, b = enp.ones((2, 3)), enp.ones((3, 2))
    ew.add(a, a)  # warm: add of f64[2,3] is kept
    with pytest.raises(ShapeError, match=r"add: operands must have equal shapes") as e:
        ew.add(a, b)
    assert "test_dispatch.py" in str(e.value)
    with pytest.raises(ShapeError) as again:  # an error is never kept: raised anew each time
        ew.add(a, b)
    assert "test_dispatch.py" in str(again.value)


def test_eager_binary_ops_match_numpy_in_every_dtype_pairing():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((3, 4)).astype(np.float32), rng.integers(-5, 5, (3, 4)),
              rng.integers(0, 5, (4,)).astype(np.uint8), rng.random((3, 4)) > 0.5]
    for x in arrays:
        for y in arrays:
            for op in (np.add, np.multiply, np.subtract, np.maximum):
                if x.dtype == bool and y.dtype == bool and op is np.subtract:
                    continue  # NumPy refuses it too
                want = op(x, y)
                got = getattr(enp, op.__name__)(enp.asarray(x), enp.asarray(y))
                assert got.dtype == want.dtype, (op.__name__, x.dtype, y.dtype)
                np.testing.assert_array_equal(np.asarray(got), want)


def test_bool_add_and_multiply_are_or_and_after_a_numeric_call():
    t, f = np.array([True, False, True]), np.array([True, True, False])
    enp.add(enp.ones(3), enp.ones(3))  # the numeric choice is kept per dtype
    np.testing.assert_array_equal(np.asarray(enp.add(t, f)), np.add(t, f))
    np.testing.assert_array_equal(np.asarray(enp.multiply(t, f)), np.multiply(t, f))
    with pytest.raises(DTypeError, match="subtract"):
        enp.subtract(enp.asarray(t), enp.asarray(f))


# --- quiet IEEE results --------------------------------------------------------------------

def test_eager_ops_give_ieee_results_without_warnings_and_leave_numpy_settings_alone():
    before = np.geterr()
    x = enp.asarray(np.array([1.0, -1.0, 0.0], np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = np.asarray(x / 0.0)
        big = np.asarray(enp.asarray(np.float32(3e38)) * 10.0)
        logs = np.asarray(enp.log(x))
    np.testing.assert_array_equal(out[:2], [np.inf, -np.inf])
    assert np.isnan(out[2]) and np.isinf(big) and np.isnan(logs[1])
    assert np.geterr() == before
    with pytest.warns(RuntimeWarning):  # NumPy itself still warns as the user set it
        np.float32(3e38) * np.float32(10)


# --- a Python scalar operand ---------------------------------------------------------------

def test_scalar_operands_match_numpy():
    rng = np.random.default_rng(1)
    cases = [rng.standard_normal((3, 4)).astype(np.float32), rng.integers(-5, 5, (3, 4)),
             rng.integers(0, 9, (5,)).astype(np.uint8), rng.standard_normal(3) + 1j,
             np.array(2.5, np.float16)]
    for x in cases:
        for s in (2.0, 3, True, -1.5, 2j):
            if np.iscomplexobj(s) and not np.iscomplexobj(x):
                continue
            for op in (np.add, np.multiply, np.subtract):
                fn = getattr(enp, op.__name__)
                for got, want in ((fn(enp.asarray(x), s), op(x, s)),
                                  (fn(s, enp.asarray(x)), op(s, x))):
                    assert got.dtype == want.dtype, (op.__name__, x.dtype, s)
                    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_kept_scalar_constants_tell_signed_zeros_and_nan_apart():
    x = enp.asarray(np.array([1.0, -2.0], np.float32))
    np.testing.assert_array_equal(np.signbit(np.asarray(x * 0.0)), [False, True])  # kept
    np.testing.assert_array_equal(np.signbit(np.asarray(x * -0.0)), [True, False])
    np.testing.assert_array_equal(np.signbit(np.asarray(x * 0.0)), [False, True])
    assert np.isnan(np.asarray(x + float("nan"))).all()
    np.testing.assert_array_equal(np.asarray(x + 1), [2.0, -1.0])
    np.testing.assert_array_equal(np.asarray(x + True), [2.0, -1.0])


def test_scalar_out_of_range_names_the_op_and_the_users_line():
    x = enp.asarray(np.arange(3, dtype=np.int8))
    x + 1  # warm the int8 path
    with pytest.raises(DTypeError, match="add: Python integer 1000 out of bounds") as e:
        x + 1000
    assert "test_dispatch.py" in str(e.value)


def test_a_caller_cannot_change_a_kept_constant():
    x = enp.asarray(np.ones((2, 2), np.float32))
    _, const = promote_args("multiply", x, 3.0)
    const[0, 0] = 100.0  # rebinds the caller's Array, not the kept buffer
    donate = ember.jit(lambda c: c + 1, donate_argnums=0)
    _, const2 = promote_args("multiply", x, 3.0)
    donate(const2)  # the donated Array lets go of its buffer; the kept one is untouched
    np.testing.assert_array_equal(np.asarray(x * 3.0), np.full((2, 2), 3.0))


def test_scalar_under_jit_is_staged_and_under_grad_differentiates():
    f = ember.jit(lambda x: x * 2.0)
    x = enp.asarray(np.arange(4.0, dtype=np.float32))
    text = f.lower(x).as_text()
    assert "broadcast_in_dim" in text and "mul" in text
    np.testing.assert_array_equal(np.asarray(f(x)), np.arange(4.0) * 2)
    g = ember.grad(lambda x: (3.0 * x * 2.0).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), np.full(4, 6.0))
    assert ember.vmap(lambda r: r + 1.0)(enp.ones((2, 3))).shape == (2, 3)


def test_unary_float_fast_path_matches_the_general_one():
    for x in (np.linspace(-1, 1, 5, dtype=np.float32), np.arange(5), np.array([1 + 1j])):
        np.testing.assert_allclose(np.asarray(enp.exp(enp.asarray(x))), np.exp(x), rtol=1e-6)
        assert enp.exp(enp.asarray(x)).dtype == np.exp(x).dtype
    with pytest.raises(DTypeError, match="arctan2|floor|cbrt"):
        enp.cbrt(enp.asarray(np.array([1j])))


# --- bind without a trace ------------------------------------------------------------------

def test_an_escaped_tracer_is_refused_when_nothing_is_traced():
    leaked = []
    ember.jit(lambda x: leaked.append(x) or x)(enp.ones(2))
    with pytest.raises(TracerError, match="escaped"):
        enp.add(leaked[0], 1.0)
    with pytest.raises(TracerError, match="escaped"):
        ew.exp(leaked[0])


def test_zero_dimensional_results_are_arrays_of_the_rules_dtype():
    s = enp.sum(enp.asarray(np.ones(3, np.float32)))
    assert type(s._buffer) is np.ndarray and s.dtype == np.float32 and s.shape == ()


# --- jit cache hits ------------------------------------------------------------------------

def test_outputs_fed_back_hit_the_cache_and_carry_the_inputs_types():
    step = ember.jit(lambda p, x: {k: v - 0.1 * x.sum() for k, v in p.items()})
    params = {"w": enp.ones((2, 2)), "b": enp.zeros(2)}
    x = enp.ones(3)
    for _ in range(3):
        new = step(params, x)
        assert new["w"].aval is params["w"].aval  # so the next call matches by identity
        params = new
    assert step.trace_count == 1 and step.cache_info()["hits"] == 2
    np.testing.assert_allclose(np.asarray(params["w"]), np.full((2, 2), 1 - 0.9))


def test_jit_hit_still_refuses_donated_and_non_array_leaves():
    f = ember.jit(lambda x: x * 2, donate_argnums=0)
    x = enp.ones(3)
    f(enp.ones(3))
    f(x)
    with pytest.raises(EmberError, match="donated"):
        f(x)
    g = ember.jit(lambda x, s: x)
    g(enp.ones(2), enp.ones(1))
    with pytest.raises(EmberError, match="not supported"):
        g(enp.ones(2), "text")


def test_jit_hit_with_static_arguments_and_numpy_leaves():
    f = ember.jit(lambda x, n: x * n, static_argnums=1)
    x = np.arange(3.0)
    np.testing.assert_array_equal(np.asarray(f(x, 2)), x * 2)
    np.testing.assert_array_equal(np.asarray(f(x, 2)), x * 2)
    np.testing.assert_array_equal(np.asarray(f(x, 3)), x * 3)
    assert f.trace_count == 2


def test_positional_array_calls_and_keyword_calls_key_apart():
    f = ember.jit(lambda x, y=None: x * 2 if y is None else x + y)
    x, y = enp.ones(2), enp.full(2, 3.0)
    np.testing.assert_array_equal(np.asarray(f(x)), [2, 2])
    np.testing.assert_array_equal(np.asarray(f(x)), [2, 2])
    np.testing.assert_array_equal(np.asarray(f(x, y)), [4, 4])
    np.testing.assert_array_equal(np.asarray(f(x, y=y)), [4, 4])
    np.testing.assert_array_equal(np.asarray(f(np.ones(2), y)), [4, 4])  # a NumPy leaf
    assert f.trace_count == 3 and f.cache_info()["hits"] == 2


# --- the compiled program's call path (cpu backend) ------------------------------------------

needs_cc = pytest.mark.skipif(
    not __import__("ember.backends.cpu.toolchain", fromlist=["x"]).available(),
    reason="no C compiler")

# Results of every dtype family (bfloat16 too, for which NumPy exports no buffer) and one of no
# elements, computed in C into new arrays whose addresses the program reads.
_DTYPES = ["float32", "float64", "float16", "bfloat16", "int32", "int8", "bool", "complex64"]


def _inputs(k):
    xs = [enp.asarray((np.arange(6).reshape(2, 3) + k).astype(enp.dtype(d))) for d in _DTYPES]
    return [*xs, enp.zeros((0, 3), enp.float32)]


@needs_cc
def test_compiled_outputs_of_every_dtype_are_fresh_arrays_matching_numpy():
    double = lambda xs: [x + x for x in xs]  # noqa: E731
    f, ref = ember.jit(double, backend="cpu"), ember.jit(double, backend="numpy")
    inputs = [_inputs(k) for k in range(3)]
    kept = []
    for xs in [*inputs, inputs[0], inputs[1]]:  # new inputs, then ones seen before
        got, want = f(xs), ref(xs)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        kept.append((got, want))
    for got, want in kept:  # a later call never wrote into an earlier call's results
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert f.trace_count == 1


def test_array_addresses_are_read_right_for_any_array():
    from ember.backends.cpu.program import _address, _interface_address

    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    frozen = base.copy()
    frozen.flags.writeable = False
    arrays = [base, base[1:, 2:], base.T, frozen, np.empty((0, 3)), np.float32(2.0) * base,
              np.ones(5, enp.dtype("bfloat16")), np.zeros((), np.complex64)]
    for a in arrays:
        assert _address(a) == _interface_address(a)


@needs_cc
def test_compiled_program_rebinds_inputs_after_a_call_from_another_thread():
    """The kept workspace's address table is brought up to date when the inputs changed in a
    call that ran in another workspace (a concurrent call)."""
    import threading

    closed = ember.jit(lambda x, y: x * y + 1.0).lower(enp.ones((4, 4), enp.float32),
                                                       enp.ones((4, 4), enp.float32)).graph
    program = ember.backends.get_backend("cpu").compile(closed)
    rng = np.random.default_rng(3)
    a, b, c = (rng.standard_normal((4, 4)).astype(np.float32) for _ in range(3))
    np.testing.assert_array_equal(program(a, b)[0], a * b + 1)
    with program._arena._lock:  # the kept workspace is busy: this call gets its own
        done = []
        t = threading.Thread(target=lambda: done.append(program(a, c)[0]))
        t.start()
        t.join()
    np.testing.assert_array_equal(done[0], a * c + 1)
    np.testing.assert_array_equal(program(a, c)[0], a * c + 1)  # kept workspace, new binding
    np.testing.assert_array_equal(program(a, b)[0], a * b + 1)


def test_arguments_without_keywords_flatten_as_the_pair_does_one_structure_each():
    from ember.transforms.jit import _flatten_arguments
    from ember.tree import tree_flatten

    xs = [enp.ones(2), enp.zeros(3)]
    cases = [(xs,), (xs, enp.ones(1)), ({"w": xs[0], "b": (xs[1], None)},), (), (np.ones(2), 3)]
    for args in cases:
        leaves, tree = _flatten_arguments(args, {})
        want_leaves, want_tree = tree_flatten((args, {}))
        assert tree == want_tree and hash(tree) == hash(want_tree)
        assert all(a is b for a, b in zip(leaves, want_leaves, strict=True))
        assert _flatten_arguments(args, {})[1] is tree  # compared by identity at a jit hit
    kw_leaves, kw_tree = _flatten_arguments((xs,), {"y": xs[0]})
    assert kw_tree == tree_flatten(((xs,), {"y": xs[0]}))[1] != _flatten_arguments((xs,), {})[1]


def test_jit_hits_on_a_list_argument_with_and_without_keywords_and_compiled_calls():
    first = ember.jit(lambda xs, scale=None: xs[0] if scale is None else xs[0] * scale)
    xs = [enp.asarray(np.arange(4.0, dtype=np.float32)), enp.ones(2)]
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(first(xs)), np.arange(4.0))
    np.testing.assert_array_equal(np.asarray(first(xs, scale=enp.full(4, 2.0))),
                                  np.arange(4.0) * 2)
    assert first.trace_count == 2 and first.cache_info()["hits"] == 2
    compiled = first.lower(xs).compile()
    np.testing.assert_array_equal(np.asarray(compiled(xs)), np.arange(4.0))
    with pytest.raises(EmberError, match="structure"):
        compiled(xs[:1])
