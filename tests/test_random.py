"""ember.random: keys, reproducibility, distributions, transformations and the global helper.

Distribution checks use many samples and tolerances several standard errors wide, so they are
deterministic (fixed keys) and still meaningful.
"""

import math

import numpy as np
import pytest
from helpers import assert_equal_or_close

import ember
import ember.numpy as enp
from ember import random as er
from ember.ops.random_bits import threefry_numpy

N = 200_000


def host(x):
    return np.asarray(x)


# --- keys ------------------------------------------------------------------------------------

def test_threefry_known_answer():
    z = np.zeros(1, np.uint32)
    a, b = threefry_numpy(z, z, z, z)
    assert (int(a[0]), int(b[0])) == (0x6B200159, 0x99BA4EFE)


@pytest.mark.parametrize("seed,want", [
    (0, [0, 0]), (1, [0, 1]), (2**32 + 5, [1, 5]), (-1, [2**32 - 1, 2**32 - 1]),
    (2**64 - 1, [2**32 - 1, 2**32 - 1]), (np.int64(7), [0, 7]),
])
def test_key_from_seed(seed, want):
    k = er.key(seed)
    assert k.dtype == np.uint32 and k.shape == (2,)
    assert host(k).tolist() == want
    assert host(er.PRNGKey(seed)).tolist() == want


def test_key_from_traced_seed():
    for seed in (0, 3, -1, 2**40 + 9):
        got = ember.jit(er.key)(enp.asarray(seed, dtype=enp.int64))
        assert host(got).tolist() == host(er.key(seed)).tolist()
    got = ember.jit(er.key)(enp.asarray(-2, dtype=enp.int32))
    assert host(got).tolist() == host(er.key(-2)).tolist()


def test_key_errors():
    with pytest.raises(ember.EmberError, match="64 bits"):
        er.key(2**64)
    with pytest.raises(ember.EmberError):
        er.key(1.5)
    with pytest.raises(ember.EmberError, match="expected a key"):
        er.uniform(enp.asarray([1, 2, 3], dtype=enp.uint32))
    with pytest.raises(ember.EmberError, match="vmap"):
        er.normal(er.split(er.key(0), 3))
    with pytest.raises(ember.EmberError, match="expected a key"):
        er.split(enp.asarray([1.0, 2.0]))


def test_split_and_fold_in():
    k = er.key(42)
    keys = er.split(k, 5)
    assert keys.shape == (5, 2) and keys.dtype == np.uint32
    rows = {tuple(r) for r in host(keys).tolist()}
    assert len(rows) == 5 and tuple(host(k).tolist()) not in rows
    assert host(er.split(k)).shape == (2, 2)
    # Deterministic, and different from the parent's bits.
    np.testing.assert_array_equal(host(er.split(k, 5)), host(keys))
    assert host(er.split(k, 1)).tolist()[0] == host(keys).tolist()[0]
    folds = [tuple(host(er.fold_in(k, i)).tolist()) for i in range(20)]
    assert len(set(folds)) == 20 and not set(folds) & rows
    assert host(er.fold_in(k, -1)).tolist() == host(er.fold_in(k, 2**32 - 1)).tolist()
    traced = ember.jit(er.fold_in)(k, enp.asarray(7))
    assert host(traced).tolist() == list(folds[7])
    assert host(er.split(k, 0)).shape == (0, 2)


def test_split_keys_give_independent_streams():
    a, b = (er.uniform(k, (N,)) for k in er.split(er.key(1)))
    corr = np.corrcoef(host(a), host(b))[0, 1]
    assert abs(corr) < 5 / math.sqrt(N)


# --- bits ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_bits_dtypes_and_balance(dtype):
    x = host(er.bits(er.key(3), (N // 8,), dtype))
    assert x.dtype == dtype and x.shape == (N // 8,)
    width = np.dtype(dtype).itemsize * 8
    ones = np.unpackbits(x.view(np.uint8)).mean()
    assert abs(ones - 0.5) < 0.01
    assert len(np.unique(x)) > min(2**width, N // 8) * 0.5


def test_bits_shapes():
    k = er.key(0)
    assert er.bits(k).shape == ()
    assert er.bits(k, 3).shape == (3,)
    assert er.bits(k, (2, 0, 3)).shape == (2, 0, 3)
    assert er.bits(k, (3, 5)).shape == (3, 5)
    with pytest.raises(ember.DTypeError):
        er.bits(k, (2,), np.int32)
    with pytest.raises(ember.ShapeError):
        er.bits(k, (-1,))


# --- floats ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,expected", [(None, np.float64), (np.float64, np.float64),
                                            (np.float32, np.float32), (np.float16, np.float16),
                                            (enp.bfloat16, enp.bfloat16)])
def test_uniform_dtype_range_moments(dtype, expected):
    x = host(er.uniform(er.key(0), (N,), dtype))
    assert x.dtype == expected
    x = x.astype(np.float64)
    assert x.min() >= 0 and x.max() < 1
    assert abs(x.mean() - 0.5) < 0.01
    assert abs(x.var() - 1 / 12) < 0.01


def test_uniform_bounds():
    k = er.key(5)
    x = host(er.uniform(k, (N,), minval=-3.0, maxval=2.0))
    assert x.min() >= -3 and x.max() < 2 and abs(x.mean() + 0.5) < 0.03
    lo = enp.asarray([0.0, 10.0, -5.0])
    hi = enp.asarray([1.0, 11.0, -4.0])
    y = host(er.uniform(k, (1000, 3), minval=lo, maxval=hi))
    assert (y >= host(lo)).all() and (y < host(hi)).all()
    # Low precision never rounds up to maxval.
    z = host(er.uniform(k, (N,), enp.bfloat16, minval=1.0, maxval=2.0)).astype(np.float64)
    assert z.min() >= 1 and z.max() < 2
    with pytest.raises(ember.DTypeError):
        er.uniform(k, (2,), np.int32)
    with pytest.raises(ember.ShapeError):
        er.uniform(k, (3,), minval=enp.zeros(4))


@pytest.mark.parametrize("dtype", [None, np.float32, np.float16, enp.bfloat16])
def test_normal(dtype):
    x = host(er.normal(er.key(11), (N + 1,), dtype))
    assert x.dtype == (np.float64 if dtype is None else dtype) and x.shape == (N + 1,)
    x = x.astype(np.float64)
    assert np.isfinite(x).all()
    assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.02
    assert abs(np.mean(x ** 3)) < 0.05 and abs(np.mean(x ** 4) - 3) < 0.1
    assert abs((np.abs(x) < 1).mean() - 0.6827) < 0.01


def test_normal_shapes():
    k = er.key(0)
    assert er.normal(k).shape == ()
    assert er.normal(k, (3, 1)).shape == (3, 1)
    assert er.normal(k, (0,)).shape == (0,)


@pytest.mark.parametrize("lower,upper", [(-1.0, 2.0), (3.0, 4.0), (-4.0, -3.5), (-np.inf, 0.0),
                                         (0.5, np.inf), (-0.1, 0.1)])
def test_truncated_normal(lower, upper):
    x = host(er.truncated_normal(er.key(2), lower, upper, (N,)))
    assert x.dtype == np.float64
    assert (x >= lower).all() and (x <= upper).all() and np.isfinite(x).all()
    pdf = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi) if np.isfinite(t) else 0.0  # noqa: E731
    cdf = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    mass = cdf(upper) - cdf(lower)
    mean = (pdf(lower) - pdf(upper)) / mass
    assert abs(x.mean() - mean) < 0.01 * max(1.0, abs(mean))


def test_truncated_normal_array_bounds_and_dtype():
    lower = enp.asarray([-1.0, 0.0, 2.0])
    x = er.truncated_normal(er.key(0), lower, 3.0, dtype=np.float32)
    assert x.shape == (3,) and x.dtype == np.float32
    y = host(er.truncated_normal(er.key(0), lower, 3.0, (5000, 3)))
    assert (y >= host(lower)).all() and (y <= 3).all()


def test_gumbel():
    x = host(er.gumbel(er.key(4), (N,)))
    assert np.isfinite(x).all()
    assert abs(x.mean() - 0.5772156649) < 0.01
    assert abs(x.var() - math.pi ** 2 / 6) < 0.05
    assert er.gumbel(er.key(0), (3,), np.float16).dtype == np.float16


# --- integers --------------------------------------------------------------------------------

def test_randint_range_and_uniformity():
    x = host(er.randint(er.key(9), (N,), -3, 4))
    assert x.dtype == np.int64 and x.min() == -3 and x.max() == 3
    counts = np.bincount(x + 3)
    assert np.all(np.abs(counts / N - 1 / 7) < 0.005)
    np.testing.assert_array_equal(host(er.integers(er.key(9), (N,), -3, 4)), x)
    only_max = host(er.randint(er.key(9), (100,), 5))
    assert only_max.min() >= 0 and only_max.max() < 5


@pytest.mark.parametrize("dtype,lo,hi", [
    (np.int8, -128, 128), (np.uint8, 0, 256), (np.int16, -5, 5), (np.uint16, 60000, 65536),
    (np.int32, -2**31, 2**31), (np.uint32, 0, 2**32), (np.int64, -2**63, 2**63),
    (np.uint64, 2**63, 2**64 - 1), (np.int64, 2**62, 2**62 + 3),
])
def test_randint_dtypes_and_extreme_bounds(dtype, lo, hi):
    x = host(er.randint(er.key(1), (5000,), lo, hi, dtype))
    assert x.dtype == dtype
    assert all(lo <= int(v) < hi for v in x.tolist())
    assert len(np.unique(x)) > min(hi - lo, 5000) // 3


def test_randint_array_and_traced_bounds():
    lo = enp.asarray([0, 10, -5])
    hi = enp.asarray([2, 20, -4])
    x = host(er.randint(er.key(0), (1000, 3), lo, hi))
    assert (x >= host(lo)).all() and (x < host(hi)).all()
    f = ember.jit(lambda k, a, b: er.randint(k, (1000,), a, b))
    y = host(f(er.key(0), enp.asarray(-7), enp.asarray(7)))
    assert y.min() == -7 and y.max() == 6
    np.testing.assert_array_equal(y, host(er.randint(er.key(0), (1000,), -7, 7)))
    degenerate = host(f(er.key(0), enp.asarray(3), enp.asarray(3)))
    assert (degenerate == 3).all()


def test_randint_errors():
    k = er.key(0)
    with pytest.raises(ember.EmberError, match="greater"):
        er.randint(k, (2,), 5, 5)
    with pytest.raises(ember.EmberError, match="out of range"):
        er.randint(k, (2,), 0, 300, np.uint8)
    with pytest.raises(ember.DTypeError):
        er.randint(k, (2,), 0, 3, np.float32)
    with pytest.raises(ember.DTypeError):
        er.randint(k, (2,), enp.asarray(0.5), 3)


def test_bernoulli():
    k = er.key(8)
    x = host(er.bernoulli(k, 0.3, (N,)))
    assert x.dtype == np.bool_ and abs(x.mean() - 0.3) < 0.01
    p = enp.asarray([0.0, 0.5, 1.0])
    y = host(er.bernoulli(k, p))
    assert y.shape == (3,) and not y[0] and y[2]
    z = host(er.bernoulli(k, p, (N // 4, 3))).mean(0)
    np.testing.assert_allclose(z, [0, 0.5, 1], atol=0.01)


def test_categorical():
    k = er.key(6)
    probs = np.array([0.1, 0.2, 0.7])
    x = host(er.categorical(k, np.log(probs), shape=(N,)))
    assert x.dtype == np.int64
    np.testing.assert_allclose(np.bincount(x, minlength=3) / N, probs, atol=0.01)
    batch = np.log(np.array([[0.9, 0.1], [0.05, 0.95], [0.5, 0.5]]))
    assert er.categorical(k, batch).shape == (3,)
    many = host(er.categorical(k, batch, shape=(N // 4, 3)))
    np.testing.assert_allclose(many.mean(0), [0.1, 0.95, 0.5], atol=0.01)
    along0 = host(er.categorical(k, batch.T, axis=0, shape=(N // 4, 3)))
    np.testing.assert_allclose(along0.mean(0), [0.1, 0.95, 0.5], atol=0.01)
    never = host(er.categorical(k, np.array([-0.7, -np.inf, -0.7]), shape=(1000,)))
    assert not (never == 1).any()
    with pytest.raises(ember.ShapeError):
        er.categorical(k, batch, shape=(4,))


def test_permutation():
    k = er.key(12)
    p = host(er.permutation(k, 50))
    assert sorted(p.tolist()) == list(range(50)) and p.tolist() != list(range(50))
    x = np.arange(24).reshape(4, 6)
    rows = host(er.permutation(k, enp.asarray(x)))
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, x.tolist()))
    cols = host(er.permutation(k, enp.asarray(x), axis=-1))
    assert sorted(map(tuple, cols.T.tolist())) == sorted(map(tuple, x.T.tolist()))
    ind = host(er.permutation(k, enp.asarray(x), axis=1, independent=True))
    for r, orig in zip(ind, x):
        assert sorted(r.tolist()) == orig.tolist()
    assert host(er.permutation(k, 0)).shape == (0,)
    # Every position is uniform over the elements.
    firsts = host(ember.vmap(lambda kk: er.permutation(kk, 4))(er.split(k, 4000)))[:, 0]
    np.testing.assert_allclose(np.bincount(firsts) / 4000, 0.25, atol=0.03)
    with pytest.raises(ember.ShapeError):
        er.permutation(k, enp.asarray(3.0))


def test_choice():
    k = er.key(13)
    x = host(er.choice(k, 5, (N,)))
    assert x.dtype == np.int64 and set(np.unique(x).tolist()) == set(range(5))
    np.testing.assert_allclose(np.bincount(x) / N, 0.2, atol=0.01)
    p = np.array([0.1, 0.0, 0.6, 0.3])
    y = host(er.choice(k, 4, (N,), p=enp.asarray(p)))
    np.testing.assert_allclose(np.bincount(y, minlength=4) / N, p, atol=0.01)
    no_rep = host(er.choice(k, 10, (10,), replace=False))
    assert sorted(no_rep.tolist()) == list(range(10))
    weighted = host(er.choice(k, 4, (3,), replace=False, p=enp.asarray(p)))
    assert len(set(weighted.tolist())) == 3 and 1 not in weighted.tolist()
    a = np.arange(12.0).reshape(3, 4)
    picked = host(er.choice(k, enp.asarray(a), (2, 5), axis=1))
    assert picked.shape == (3, 2, 5)
    assert set(picked[0].ravel().tolist()) <= set(a[0].tolist())
    np.testing.assert_array_equal(picked[1] - picked[0], 4.0)
    assert er.choice(k, 3).shape == ()
    with pytest.raises(ember.EmberError, match="without replacement"):
        er.choice(k, 3, (4,), replace=False)
    with pytest.raises(ember.EmberError, match="empty"):
        er.choice(k, 0, (1,))
    with pytest.raises(ember.ShapeError):
        er.choice(k, 3, p=enp.asarray([0.5, 0.5]))


# --- transformations -------------------------------------------------------------------------

DRAWS = {
    "bits": lambda k: er.bits(k, (3, 5)),
    "bits64": lambda k: er.bits(k, (7,), np.uint64),
    "uniform": lambda k: er.uniform(k, (4, 3), minval=-1.0, maxval=3.0),
    "normal": lambda k: er.normal(k, (5,), np.float32),
    "truncated_normal": lambda k: er.truncated_normal(k, -1.0, 0.5, (6,)),
    "randint": lambda k: er.randint(k, (9,), -4, 9, np.int16),
    "bernoulli": lambda k: er.bernoulli(k, 0.4, (8,)),
    "gumbel": lambda k: er.gumbel(k, (3,)),
    "categorical": lambda k: er.categorical(k, enp.log(enp.asarray([0.2, 0.3, 0.5])), shape=(5,)),
    "permutation": lambda k: er.permutation(k, 7),
    "choice": lambda k: er.choice(k, 6, (3,), replace=False),
    "choice_p": lambda k: er.choice(k, 4, (5,), p=enp.asarray([0.1, 0.2, 0.3, 0.4])),
    "split": lambda k: er.split(k, 3),
    "fold_in": lambda k: er.fold_in(k, 5),
}


@pytest.mark.parametrize("name", sorted(DRAWS))
def test_jit_equals_eager_and_vmap_equals_loop(name):
    draw = DRAWS[name]
    k = er.key(2024)
    eager = host(draw(k))
    assert_equal_or_close(host(ember.jit(draw)(k)), eager)
    np.testing.assert_array_equal(host(draw(er.key(2024))), eager)  # reproducible
    keys = er.split(k, 4)
    batched = host(ember.vmap(draw)(keys))
    looped = np.stack([host(draw(keys[i])) for i in range(4)])
    np.testing.assert_array_equal(batched, looped)
    assert_equal_or_close(host(ember.jit(ember.vmap(draw))(keys)), looped)
    assert not all((looped[0] == looped[i]).all() for i in range(1, 4))


def test_gradient_through_sampling_is_zero_for_the_key_and_flows_for_scale():
    k = er.key(0)
    noise = er.normal(k, (4,))
    g = ember.grad(lambda s: enp.sum(s * er.normal(k, (4,))))(enp.asarray(2.0))
    np.testing.assert_allclose(host(g), host(noise).sum(), rtol=1e-12)


# --- the global generator --------------------------------------------------------------------

def test_global_generator_is_reproducible():
    er.seed(0)
    first = [host(er.rand(3)), host(er.randn(2, 2)), host(er.random()), host(er.next_key())]
    er.seed(0)
    second = [host(er.rand(3)), host(er.randn((2, 2))), host(er.random()), host(er.next_key())]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert first[0].dtype == np.float64 and first[1].shape == (2, 2) and first[2].shape == ()
    er.seed(1)
    assert not np.array_equal(host(er.rand(3)), first[0])
    # Successive draws differ (the hidden key advances).
    assert not np.array_equal(host(er.rand(3)), host(er.rand(3)))
    assert er.random((2, 3)).shape == (2, 3)
    er.seed()  # from OS entropy
    assert er.rand(2).shape == (2,)


def test_global_generator_under_jit_draws_fresh_numbers_each_call_as_eagerly():
    f = ember.jit(lambda x: x * er.rand(3))
    er.seed(4)
    eager = [host(enp.ones(3) * er.rand(3)) for _ in range(3)]
    er.seed(4)
    jitted = [host(f(enp.ones(3))) for _ in range(3)]
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(a, b)  # same key sequence: same numbers, call by call
    assert not np.array_equal(jitted[0], jitted[1])
    assert f.trace_count == 1
    # The key is a trailing input and output of the traced program.
    assert "u32[2]" in f.lower(enp.ones(3)).as_text().splitlines()[0]


def test_global_generator_under_grad_and_vmap_uses_the_current_key():
    er.seed(2)
    want = host(er.rand(3))
    er.seed(2)
    g = ember.grad(lambda x: enp.sum(x * er.rand(3)))(enp.ones(3))
    np.testing.assert_array_equal(host(g), want)
    er.seed(2)
    batched = ember.vmap(lambda x: x * er.rand(3))(enp.ones((2, 3)))
    np.testing.assert_array_equal(host(batched), np.stack([want, want]))


def test_jit_of_grad_threads_the_key_and_a_staged_body_refuses_it():
    er.seed(3)
    step = ember.jit(ember.grad(lambda x: enp.sum(x * er.rand(3))))
    a, b = host(step(enp.ones(3))), host(step(enp.ones(3)))
    er.seed(3)
    np.testing.assert_array_equal(a, host(er.rand(3)))
    np.testing.assert_array_equal(b, host(er.rand(3)))

    def loop(x):
        return ember.lax.fori_loop(0, 3, lambda i, c: c + er.rand(), x)

    with pytest.raises(ember.TracerError, match="Pass a key") as info:
        ember.jit(loop)(enp.asarray(0.0))
    assert "test_random.py" in str(info.value)
