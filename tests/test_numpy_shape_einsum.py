"""tile, repeat, flip, roll, pad, diagonal, rot90, unstack and einsum against NumPy.

Every case runs eagerly and under ``ember.jit`` (static arguments closed over); a few gradients
are checked against central finite differences.
"""

import numpy as np
import pytest

import ember
import ember.numpy as enp

RNG = np.random.default_rng(0)


def rand(*shape, dtype=np.float64):
    return RNG.standard_normal(shape).astype(dtype)


def check(fn_enp, fn_np, *arrays, rtol=1e-12, atol=1e-12):
    """``fn_enp`` eagerly and jitted equals ``fn_np`` on the same inputs (values and dtype)."""
    want = fn_np(*arrays)
    for got in (fn_enp(*[enp.asarray(a) for a in arrays]),
                ember.jit(fn_enp)(*[enp.asarray(a) for a in arrays])):
        got_np = np.asarray(got)
        assert got_np.shape == want.shape, (got_np.shape, want.shape)
        assert got_np.dtype == want.dtype, (got_np.dtype, want.dtype)
        np.testing.assert_allclose(got_np, want, rtol=rtol, atol=atol)


def numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        g[i] = (f(x + d) - f(x - d)) / (2 * eps)
    return g


def check_grad(fn, x):
    """``ember.grad`` of ``sum(fn(x) * w)`` for a fixed random ``w`` matches finite differences."""
    w = rand(*np.shape(np.asarray(fn(enp.asarray(x)))))

    def loss(v):
        return enp.sum(fn(v) * w)

    got = np.asarray(ember.grad(loss)(enp.asarray(x)))
    want = numeric_grad(lambda v: float(loss(enp.asarray(v))), x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    jitted = np.asarray(ember.jit(ember.grad(loss))(enp.asarray(x)))
    np.testing.assert_allclose(jitted, got, rtol=1e-12, atol=1e-12)


# --- tile ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(), (3,), (2, 3), (2, 0, 3)])
@pytest.mark.parametrize("reps", [2, (2, 1), (1, 2, 3), 0, (0, 2), [3]])
def test_tile(shape, reps):
    check(lambda x: enp.tile(x, reps), lambda x: np.tile(x, reps), rand(*shape))


def test_tile_int_dtype():
    check(lambda x: enp.tile(x, (2, 2)), lambda x: np.tile(x, (2, 2)),
          np.arange(6, dtype=np.int32).reshape(2, 3))


# --- repeat ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,repeats,axis", [
    ((2, 3), 2, None), ((2, 3), 2, 0), ((2, 3), 3, -1), ((2, 3), 0, 1), ((), 3, None),
    ((2, 3), [1, 0, 2], 1), ((2, 3), [2, 1], -2), ((4,), [0, 0, 0, 0], 0), ((2, 3), [2], 1),
    ((2, 0), 2, 1), ((2, 3), np.array([3, 1, 0]), 1),
])
def test_repeat(shape, repeats, axis):
    check(lambda x: enp.repeat(x, repeats, axis), lambda x: np.repeat(x, repeats, axis),
          rand(*shape))


def test_repeat_method_and_errors():
    x = rand(2, 3)
    np.testing.assert_array_equal(np.asarray(enp.asarray(x).repeat(2, axis=1)),
                                  x.repeat(2, axis=1))
    with pytest.raises(ember.EmberError, match="negative"):
        enp.repeat(x, -1)
    with pytest.raises(ember.ShapeError):
        enp.repeat(x, [1, 2], axis=1)


def test_repeat_total_repeat_length():
    x = np.arange(4.0)
    counts = np.array([1, 0, 3, 2])
    # Concrete counts: cut, or padded with the last element.
    for total in (3, 6, 9):
        want = np.repeat(x, counts)[:total]
        want = np.concatenate([want, np.full(total - want.size, want[-1])])
        got = enp.repeat(enp.asarray(x), counts, total_repeat_length=total)
        np.testing.assert_array_equal(np.asarray(got), want)
        traced = ember.jit(lambda v, c, t=total: enp.repeat(v, c, total_repeat_length=t))
        np.testing.assert_array_equal(np.asarray(traced(enp.asarray(x), enp.asarray(counts))),
                                      want)
    scalar = ember.jit(lambda v, r: enp.repeat(v, r, axis=0, total_repeat_length=8))
    np.testing.assert_array_equal(np.asarray(scalar(enp.asarray(x), enp.asarray(2))),
                                  np.repeat(x, 2))


def test_repeat_traced_counts_need_total_length():
    with pytest.raises(ember.TracerError, match="total_repeat_length"):
        ember.jit(lambda v, c: enp.repeat(v, c))(enp.arange(3.0), enp.asarray([1, 2, 0]))


# --- flips and rotations ---------------------------------------------------------------------

@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2), 1])
def test_flip(axis):
    check(lambda x: enp.flip(x, axis), lambda x: np.flip(x, axis), rand(2, 3, 4))


def test_fliplr_flipud():
    x = rand(3, 4, 2)
    check(enp.fliplr, np.fliplr, x)
    check(enp.flipud, np.flipud, x)
    check(enp.flipud, np.flipud, rand(5))
    check(enp.flip, np.flip, np.float64(3.0))
    with pytest.raises(ember.ShapeError):
        enp.fliplr(enp.arange(3))


@pytest.mark.parametrize("k", [-3, -1, 0, 1, 2, 3, 5])
@pytest.mark.parametrize("axes", [(0, 1), (1, 0), (1, 2), (-1, 0)])
def test_rot90(k, axes):
    check(lambda x: enp.rot90(x, k, axes), lambda x: np.rot90(x, k, axes), rand(2, 3, 4))


def test_rot90_errors():
    with pytest.raises(ember.EmberError):
        enp.rot90(enp.ones((2, 2)), axes=(0, 0))
    with pytest.raises(ember.EmberError):
        enp.rot90(enp.ones(3))


# --- roll ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,shift,axis", [
    ((5,), 2, None), ((5,), -7, 0), ((2, 3), 4, None), ((2, 3), 1, -1),
    ((2, 3, 4), (1, -2), (0, 2)), ((2, 3, 4), 3, (1, 2)), ((2, 3), (1, 1), (1, 1)),
    ((3, 0), 2, 1), ((4,), 0, 0), ((4,), 8, 0),
])
def test_roll(shape, shift, axis):
    check(lambda x: enp.roll(x, shift, axis), lambda x: np.roll(x, shift, axis), rand(*shape))


@pytest.mark.parametrize("shift", [-6, -1, 0, 3, 11])
def test_roll_traced_shift(shift):
    x = rand(4, 5)
    f = ember.jit(lambda v, s: enp.roll(v, s, axis=1))
    np.testing.assert_array_equal(np.asarray(f(enp.asarray(x), enp.asarray(shift))),
                                  np.roll(x, shift, axis=1))
    g = ember.jit(lambda v, s: enp.roll(v, s))
    np.testing.assert_array_equal(np.asarray(g(enp.asarray(x), enp.asarray(shift))),
                                  np.roll(x, shift))


# --- pad -------------------------------------------------------------------------------------

PAD_WIDTHS = [1, (2,), (1, 3), ((0, 2), (3, 1)), ((4, 0),), ((7, 9), (1, 0))]


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "symmetric", "wrap"])
@pytest.mark.parametrize("pad_width", PAD_WIDTHS)
def test_pad_modes(mode, pad_width):
    x = rand(3, 4)
    check(lambda v: enp.pad(v, pad_width, mode), lambda v: np.pad(v, pad_width, mode), x)


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "symmetric", "wrap"])
def test_pad_1d_3d_and_size_one(mode):
    check(lambda v: enp.pad(v, 5, mode), lambda v: np.pad(v, 5, mode), rand(1))
    check(lambda v: enp.pad(v, 3, mode), lambda v: np.pad(v, 3, mode), rand(2))
    width = ((1, 2), (0, 3), (2, 2))
    check(lambda v: enp.pad(v, width, mode), lambda v: np.pad(v, width, mode), rand(2, 3, 2))
    check(lambda v: enp.pad(v, 0, mode), lambda v: np.pad(v, 0, mode), rand(2, 3))


def test_pad_constant_values():
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    for cv in (7, -1.7, ((1, 2), (3, 4)), (5, 6), ((9,), (8,))):
        check(lambda v, c=cv: enp.pad(v, ((1, 2), (2, 1)), constant_values=c),
              lambda v, c=cv: np.pad(v, ((1, 2), (2, 1)), constant_values=c), x)
    check(lambda v: enp.pad(v, 2), lambda v: np.pad(v, 2), np.float32(3))
    check(lambda v: enp.pad(v, ((1, 1), (0, 0))), lambda v: np.pad(v, ((1, 1), (0, 0))),
          rand(0, 3))
    traced = ember.jit(lambda v, c: enp.pad(v, 1, constant_values=c))
    np.testing.assert_array_equal(np.asarray(traced(enp.asarray(x), enp.asarray(5.5))),
                                  np.pad(x, 1, constant_values=5))


def test_pad_errors():
    x = enp.ones((2, 3))
    with pytest.raises(ember.EmberError, match="negative"):
        enp.pad(x, -1)
    with pytest.raises(ember.ShapeError):
        enp.pad(x, ((1, 2), (3, 4), (5, 6)))
    with pytest.raises(ember.UnsupportedError):
        enp.pad(x, 1, mode="median")
    with pytest.raises(ember.EmberError, match="empty axis"):
        enp.pad(enp.ones((0, 3)), 1, mode="reflect")
    with pytest.raises(ember.TracerError):
        ember.jit(lambda v, w: enp.pad(v, w))(x, enp.asarray(1))


# --- diagonal and unstack --------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (5, 3), (2, 3, 4), (0, 3)])
@pytest.mark.parametrize("offset", [-4, -1, 0, 1, 2, 6])
def test_diagonal(shape, offset):
    check(lambda x: enp.diagonal(x, offset), lambda x: np.diagonal(x, offset), rand(*shape))


@pytest.mark.parametrize("axes", [(0, 2), (2, 0), (-1, 1), (1, -3)])
def test_diagonal_axes(axes):
    x = rand(3, 4, 5)
    check(lambda v: enp.diagonal(v, 1, *axes), lambda v: np.diagonal(v, 1, *axes), x)
    check(lambda v: v.diagonal(-1, *axes), lambda v: v.diagonal(-1, *axes), x)


def test_diagonal_users_and_errors():
    x = rand(4, 5)
    check(lambda v: enp.trace(v, 1), lambda v: np.trace(v, 1), x)
    check(lambda v: enp.diag(v, -2), lambda v: np.diag(v, -2), x)
    with pytest.raises(ember.ShapeError):
        enp.diagonal(enp.ones(3))
    with pytest.raises(ember.EmberError):
        enp.diagonal(enp.ones((2, 2)), 0, 1, -1)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_unstack(axis):
    x = rand(2, 3, 4)
    got = enp.unstack(enp.asarray(x), axis=axis)
    want = np.moveaxis(x, axis, 0)
    assert isinstance(got, tuple) and len(got) == want.shape[0]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)
    with pytest.raises(ember.ShapeError):
        enp.unstack(enp.asarray(1.0))


# --- einsum ----------------------------------------------------------------------------------

EINSUM_CASES = [
    ("ij,jk->ik", [(3, 4), (4, 5)]),
    ("ij,jk", [(3, 4), (4, 5)]),
    ("ij,kj->ik", [(3, 4), (5, 4)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]),
    ("ij,jk,ki->", [(2, 3), (3, 4), (4, 2)]),
    ("ab,bc,cd,da", [(2, 3), (3, 4), (4, 2), (2, 2)]),
    ("i,i->", [(5,), (5,)]),
    ("i,i", [(5,), (5,)]),
    ("i,j->ij", [(3,), (4,)]),
    ("i,j", [(3,), (4,)]),
    ("ii->i", [(4, 4)]),
    ("ii", [(4, 4)]),
    ("iii->i", [(3, 3, 3)]),
    ("iij->j", [(3, 3, 2)]),
    ("iji->ij", [(3, 2, 3)]),
    ("ij->", [(3, 4)]),
    ("ij->j", [(3, 4)]),
    ("ij->ji", [(3, 4)]),
    ("ji", [(3, 4)]),
    ("ijk->kij", [(2, 3, 4)]),
    ("...ij->...ji", [(2, 3, 4)]),
    ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 2)]),
    ("i...,i...->...", [(3, 1, 4), (3, 5, 1)]),
    ("...,...", [(2, 3), (3,)]),
    ("...ii->...i", [(2, 3, 3)]),
    ("ij...,jk...->ik...", [(2, 3), (3, 4)]),
    ("...i,...i", [(2, 3), (2, 3)]),
    ("ij,ij->ij", [(3, 4), (3, 4)]),
    ("ij,ij->", [(3, 4), (3, 4)]),
    ("i,i->i", [(1,), (3,)]),
    ("ij,jk->ik", [(3, 1), (4, 5)]),
    ("ijk,ilk,mk->jlm", [(2, 3, 4), (2, 5, 4), (6, 4)]),
    ("bhqd,bhkd->bhqk", [(2, 3, 4, 5), (2, 3, 6, 5)]),
    ("bhqk,bhkd->bqhd", [(2, 3, 4, 6), (2, 3, 6, 5)]),
    (",->", [(), ()]),
    (",ij->ij", [(), (2, 3)]),
    ("i,->i", [(3,), ()]),
    ("ij,jk->ik", [(0, 3), (3, 4)]),
    ("ij,jk->ik", [(2, 0), (0, 4)]),
    ("Ab,bC->AC", [(2, 3), (3, 4)]),
    (" i j , j k -> i k ", [(2, 3), (3, 4)]),
    ("ijk,jk->", [(2, 3, 4), (3, 4)]),
    ("ab,cd,ef->", [(2, 2), (2, 2), (2, 2)]),
]


@pytest.mark.parametrize("subscripts,shapes", EINSUM_CASES)
def test_einsum(subscripts, shapes):
    operands = [rand(*s) for s in shapes]
    check(lambda *ops: enp.einsum(subscripts, *ops),
          lambda *ops: np.einsum(subscripts, *ops), *operands, rtol=1e-10, atol=1e-10)


def test_einsum_dtypes():
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    b = np.arange(8, dtype=np.int64).reshape(4, 2)
    check(lambda x, y: enp.einsum("ij,jk->ik", x, y), lambda x, y: np.einsum("ij,jk->ik", x, y),
          a, b)
    c = rand(3, 4, dtype=np.float32)
    d = rand(4, dtype=np.float32)
    check(lambda x, y: enp.einsum("ij,j", x, y), lambda x, y: np.einsum("ij,j", x, y), c, d,
          rtol=1e-5, atol=1e-5)
    check(lambda x, y: enp.einsum("ij,j", x, y), lambda x, y: np.einsum("ij,j", x, y), c,
          rand(4), rtol=1e-6, atol=1e-6)


def test_einsum_sublist_form():
    a, b = rand(2, 3), rand(3, 4)
    got = enp.einsum(enp.asarray(a), [0, 1], enp.asarray(b), [1, 2], [0, 2])
    np.testing.assert_allclose(np.asarray(got), a @ b, rtol=1e-12)
    got = enp.einsum(enp.asarray(a), [Ellipsis, 1], enp.asarray(b), [1, 2])
    np.testing.assert_allclose(np.asarray(got), np.einsum(a, [Ellipsis, 1], b, [1, 2]),
                               rtol=1e-12)


@pytest.mark.parametrize("subscripts,shapes,error", [
    ("ij,jk->ik", [(2, 3), (4, 5)], ember.ShapeError),
    ("ij->ik", [(2, 3)], ember.EmberError),
    ("ij->ii", [(2, 3)], ember.EmberError),
    ("ijk", [(2, 3)], ember.ShapeError),
    ("ij,jk", [(2, 3)], ember.EmberError),
    ("ii->i", [(2, 3)], ember.ShapeError),
    ("i1->i", [(2, 3)], ember.EmberError),
    ("....i", [(2, 3)], ember.EmberError),
])
def test_einsum_errors(subscripts, shapes, error):
    with pytest.raises(error):
        enp.einsum(subscripts, *[enp.ones(s) for s in shapes])


def test_einsum_contracts_pairwise():
    """The jitted graph uses dot_general and never a product of the three operands' sizes."""
    f = ember.jit(lambda a, b, c: enp.einsum("ij,jk,kl->il", a, b, c))
    text = f.lower(enp.ones((2, 3)), enp.ones((3, 4)), enp.ones((4, 5))).as_text()
    assert text.count("dot_general") == 2


def test_einsum_under_vmap():
    a, b = rand(4, 2, 3), rand(3, 5)
    got = ember.vmap(lambda x: enp.einsum("ij,jk->ki", x, enp.asarray(b)))(enp.asarray(a))
    np.testing.assert_allclose(np.asarray(got), np.einsum("nij,jk->nki", a, b), rtol=1e-12)


# --- gradients -------------------------------------------------------------------------------

@pytest.mark.parametrize("subscripts,shapes", [
    ("ij,jk->ik", [(2, 3), (3, 4)]), ("ii->i", [(3, 3)]), ("...ij,jk", [(2, 2, 3), (3, 2)]),
    ("ij,jk,ki->", [(2, 3), (3, 2), (2, 2)]), ("i,i->i", [(1,), (3,)]),
])
def test_einsum_grad(subscripts, shapes):
    others = [enp.asarray(rand(*s)) for s in shapes[1:]]
    check_grad(lambda x: enp.einsum(subscripts, x, *others), rand(*shapes[0]))
    if others:
        first = enp.asarray(rand(*shapes[0]))
        rest = others[1:]
        check_grad(lambda y: enp.einsum(subscripts, first, y, *rest), rand(*shapes[1]))


@pytest.mark.parametrize("fn", [
    lambda x: enp.pad(x, ((1, 2), (3, 0)), mode="reflect"),
    lambda x: enp.pad(x, 2, mode="symmetric"),
    lambda x: enp.pad(x, ((0, 4), (1, 1)), mode="wrap"),
    lambda x: enp.pad(x, 1, mode="edge"),
    lambda x: enp.pad(x, 1, constant_values=2.0),
    lambda x: enp.roll(x, 2, axis=1),
    lambda x: enp.roll(x, (1, -1), axis=(0, 1)),
    lambda x: enp.tile(x, (2, 1, 2)),
    lambda x: enp.repeat(x, 2, axis=0),
    lambda x: enp.repeat(x, [1, 0, 3], axis=1),
    lambda x: enp.diagonal(x, 1),
    lambda x: enp.rot90(x),
    lambda x: enp.flip(x, 0),
])
def test_shape_grads(fn):
    check_grad(fn, rand(2, 3))


def test_shapes_under_vmap():
    x = rand(4, 3, 5)
    got = ember.vmap(lambda v: enp.pad(v, ((1, 0), (2, 1)), mode="reflect"))(enp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got), np.pad(x, ((0, 0), (1, 0), (2, 1)), "reflect"))
    got = ember.vmap(lambda v: enp.roll(enp.tile(v, 2), 3))(enp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got),
                                  np.stack([np.roll(np.tile(v, 2), 3) for v in x]))
    got = ember.vmap(lambda v: enp.diagonal(v, 1))(enp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got), np.diagonal(x, 1, 1, 2))
