"""Arrays are values: no write a user makes through NumPy, and no write Ember makes in place
(donation, ``x[i] = v``, buffer reuse), changes any other Ember array or any NumPy array the
user holds (decision record 0008).

The regression tests pin each way this broke before; the property test runs random sequences
of creations, copies, writes, NumPy views and jitted calls (with and without donation) and
checks after every step that every value observed so far is unchanged.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

import ember
import ember.numpy as enp
from ember import ops as lax

N = 6


def _update_front(cache, update):
    return lax.dynamic_update_slice(cache, update, [enp.asarray(0, dtype=enp.int32)])


write_front = ember.jit(_update_front, donate_argnums=0)
write_front_kept = ember.jit(_update_front)


# --- the ways it broke ---------------------------------------------------------------------

def test_copy_and_array_are_new_values():
    a = enp.arange(4.0)
    for b in (a.copy(), enp.copy(a), enp.array(a), enp.asarray(a, copy=True)):
        assert b is not a
        b[0] = 7
        np.testing.assert_array_equal(np.asarray(a), [0, 1, 2, 3])
        np.testing.assert_array_equal(np.asarray(b), [7, 1, 2, 3])
    assert enp.asarray(a) is a  # asarray of an Ember array is the array itself (no copy needed)


def test_copy_under_jit_is_a_new_traced_value():
    def f(a):
        b = a.copy()
        b[0] = 7.0
        return a, b

    a, b = ember.jit(f)(enp.arange(3.0))
    np.testing.assert_array_equal(np.asarray(a), [0, 1, 2])
    np.testing.assert_array_equal(np.asarray(b), [7, 1, 2])


@pytest.mark.parametrize("make", [enp.asarray, enp.array, lambda h: enp.asarray(h, "float32"),
                                  enp.copy, lambda h: enp.reshape(h, (2, 2)),
                                  lambda h: enp.from_dlpack(h)])
def test_host_memory_is_copied_where_it_enters(make):
    host = np.arange(4.0)
    x = make(host)
    host[0] = 99.0
    assert np.asarray(x).ravel()[0] == 0.0


def test_jitted_functions_do_not_see_later_writes_to_numpy_inputs_or_constants():
    host = np.arange(3.0)
    captured = np.ones(3)
    f = ember.jit(lambda x: x + captured)
    x = enp.asarray(host)
    before = np.asarray(f(x)).copy()
    host[:] = 50.0
    captured[:] = 50.0
    np.testing.assert_array_equal(np.asarray(f(x)), before)
    # A NumPy argument passed straight to jit is copied too: the result never aliases it.
    y = ember.jit(lambda v: v)(host)
    host[:] = -1.0
    np.testing.assert_array_equal(np.asarray(y), [50.0, 50.0, 50.0])


@pytest.mark.parametrize("make", [
    lambda: enp.arange(4).reshape(2, 2), lambda: enp.arange(6.0)[1:4], lambda: enp.ones((2, 3)),
    lambda: enp.arange(4.0).T, lambda: enp.zeros((3,)) + 1, lambda: enp.asarray([1, 2]),
    lambda: ember.jit(lambda v: v * 2)(enp.arange(3.0)),
])
def test_numpy_views_of_arrays_are_read_only(make):
    x = make()
    before = np.array(x)
    view = np.asarray(x)
    assert not view.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view[...] = 7
    writeable = np.array(x)  # an explicit copy is the user's to write
    writeable[...] = 7
    np.testing.assert_array_equal(np.asarray(x), before)


def test_dlpack_consumers_get_copies():
    torch = pytest.importorskip("torch")
    x = enp.arange(4.0)
    t = torch.from_dlpack(x)
    t[0] = 5.0
    np.testing.assert_array_equal(np.asarray(x), [0, 1, 2, 3])
    np.testing.assert_array_equal(np.from_dlpack(x), [0, 1, 2, 3])


def test_donation_never_writes_into_user_memory_or_shared_buffers():
    host = np.zeros(4)
    out = write_front(enp.asarray(host), enp.ones(2))
    np.testing.assert_array_equal(host, 0)
    np.testing.assert_array_equal(np.asarray(out), [1, 1, 0, 0])

    seen = enp.arange(4.0) * 0
    view = np.asarray(seen)
    write_front(seen, enp.ones(2))
    np.testing.assert_array_equal(view, 0)

    a = enp.arange(4.0) * 0
    b = a.copy()
    write_front(a, enp.ones(2))
    np.testing.assert_array_equal(np.asarray(b), 0)

    shared = np.zeros(4)
    write_front(enp.asarray(shared, copy=False), enp.ones(2))
    np.testing.assert_array_equal(shared, 0)


def test_donation_writes_in_place_when_nothing_else_sees_the_buffer():
    cache = enp.arange(4.0) * 0
    buffer = weakref.ref(cache._buffer)
    out = write_front(cache, enp.ones(2))
    assert out._buffer is buffer()
    with pytest.raises(ember.EmberError, match="donated"):
        np.asarray(cache)


def test_copy_false_shares_read_only_and_refuses_when_a_copy_is_needed():
    host = np.arange(3.0)
    x = enp.asarray(host, copy=False)
    host[0] = 10.0  # the documented contract: shared memory, the user promised not to write
    assert float(x[0]) == 10.0
    assert not np.asarray(x).flags.writeable
    with pytest.raises(ValueError, match="copy=False"):
        enp.asarray(host, dtype=enp.float32, copy=False)
    with pytest.raises(ValueError, match="copy=False"):
        enp.asarray([1.0, 2.0], copy=False)
    with pytest.raises(ValueError, match="copy=False"):
        enp.asarray(enp.arange(3), dtype=enp.float32, copy=False)


def test_buffer_reuse_inside_programs_never_touches_visible_buffers():
    f = ember.jit(lambda a, b: enp.exp(a) * 2 + b)
    a, b = enp.arange(3.0), enp.ones(3)
    va, vb = np.asarray(a).copy(), np.asarray(b).copy()
    for _ in range(3):
        f(a, b)
    np.testing.assert_array_equal(np.asarray(a), va)
    np.testing.assert_array_equal(np.asarray(b), vb)


# --- the property: every observed value stays what it was ----------------------------------

_STEPS = hst.lists(hst.tuples(
    hst.sampled_from(["new", "from_numpy", "from_numpy_shared", "copy", "setitem", "at_set",
                      "numpy_view", "numpy_write", "jit", "jit_donate", "reshape", "alias"]),
    hst.integers(0, 1000), hst.floats(-5, 5, allow_nan=False)), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(_STEPS)
def test_every_observed_value_stays_unchanged(steps):
    arrays: list = []          # live Ember arrays (donated ones are dropped)
    hosts: list = []           # NumPy arrays the user holds, and may write unless shared
    observed: list = []        # (thing, value it had when observed)

    def observe(x):
        observed.append((x, np.array(np.asarray(x), copy=True)))

    def pick(seq, i):
        return seq[i % len(seq)] if seq else None

    for op, i, v in steps:
        x = pick(arrays, i)
        if op == "new" or x is None:
            x = enp.arange(float(N)) + v
            arrays.append(x)
        elif op == "from_numpy":
            h = np.full(N, v)
            hosts.append(h)
            arrays.append(enp.asarray(h))
        elif op == "from_numpy_shared":  # the user promises not to write `h`: not in hosts
            arrays.append(enp.asarray(np.full(N, v), copy=False))
        elif op == "copy":
            arrays.append(x.copy())
        elif op == "setitem":  # rebinds x itself: only x's own value may change
            observed[:] = [(o, val) for o, val in observed if o is not x]
            x[i % N] = v
        elif op == "at_set":
            arrays.append(x.at[i % N].set(v))
        elif op == "numpy_view":
            view = np.asarray(x)
            assert not view.flags.writeable
            observed.append((view, view.copy()))
        elif op == "numpy_write":
            h = pick(hosts, i)
            if h is not None:
                observed[:] = [(o, val) for o, val in observed if o is not h]
                h[i % N] = v
                observed.append((h, h.copy()))
        elif op == "jit":
            arrays.append(write_front_kept(x, enp.full(2, v)))
        elif op == "jit_donate":
            arrays[:] = [a for a in arrays if a is not x]  # every name for it is dead
            observed[:] = [(o, val) for o, val in observed if o is not x]
            arrays.append(write_front(x, enp.full(2, v)))
        elif op == "reshape":
            arrays.append(x.reshape(2, N // 2).reshape(N))
        elif op == "alias":  # a second name for the same object is not a copy
            arrays.append(x)
        observe(arrays[-1])
        for thing, value in observed:
            np.testing.assert_array_equal(np.asarray(thing), value,
                                          err_msg=f"changed after {op}")
