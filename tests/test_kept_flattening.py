"""What a jit call keeps between calls on a decode path: a module's flattening, the last cache
key, a compiled program's input addresses. Each must be reused only while recomputing it would
give the same answer, so every test changes something and compares with a fresh computation."""

import dataclasses
import gc
import weakref

import numpy as np
import pytest

import ember
import ember.numpy as enp
from ember import nn
from ember.errors import EmberError
from ember.nn.module import _KEPT, _walk_module
from ember.tree import tree_flatten, tree_unflatten


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2))


def _fresh(module: nn.Module) -> tuple[list, object]:
    leaves, spec, _, _ = _walk_module(module)
    return leaves, spec


def _same_flattening(module: nn.Module) -> None:
    leaves, tree = tree_flatten(module)
    want_leaves, want_spec = _fresh(module)
    assert len(leaves) == len(want_leaves) and all(a is b for a, b in zip(leaves, want_leaves))
    assert tree.aux == want_spec


def test_a_flattening_is_kept_and_reused_while_nothing_changes():
    net = _net()
    first, tree = tree_flatten(net)
    again, tree2 = tree_flatten(net)
    assert tree2.aux is tree.aux  # the kept spec, not an equal new one
    assert all(a is b for a, b in zip(first, again))
    again.append("not the module's")  # callers get their own list
    assert len(tree_flatten(net)[0]) == len(first)


@pytest.mark.parametrize("change", [
    lambda n: setattr(n.items[0], "weight", enp.zeros((4, 3))),  # an array replaced
    lambda n: setattr(n.items[0], "bias", None),  # an array becomes static
    lambda n: setattr(n.items[1], "extra", enp.ones(2)),  # a new array
    lambda n: delattr(n.items[0], "bias"),
    lambda n: n.items[0].eval(),  # a static flag
    lambda n: n.items[0].freeze(),
    lambda n: n.append(nn.Linear(2, 2)),  # the list grows in place
    lambda n: n.items.__setitem__(1, nn.Linear(4, 4)),  # an item replaced in place
    lambda n: n.items.pop(),
    lambda n: n.update({"0.weight": enp.full((4, 3), 2.0, enp.float32)}),
    lambda n: n.load_state_dict({k: enp.zeros(v.shape) for k, v in n.state_dict().items()}),
    lambda n: n.astype(enp.float16),
])
def test_every_change_is_seen(change):
    net = _net()
    tree_flatten(net)
    change(net)
    _same_flattening(net)


def test_dict_attributes_changed_in_place_are_seen():
    class Heads(nn.Module):
        def __init__(self):
            self.heads = {"a": nn.Linear(2, 2), "b": [enp.ones(2), enp.zeros(3)]}

    m = Heads()
    tree_flatten(m)
    m.heads["c"] = nn.Linear(2, 3)
    _same_flattening(m)
    m.heads["b"][0] = enp.full(2, 5.0)
    _same_flattening(m)
    del m.heads["a"]
    _same_flattening(m)


def test_containers_of_other_kinds_are_walked_every_time():
    @dataclasses.dataclass
    class Pair:
        w: object

    ember.tree.register_dataclass(Pair)

    class Holder(nn.Module):
        def __init__(self):
            self.pairs = [enp.ones(1), Pair(enp.ones(2))]

    m = Holder()
    tree_flatten(m)
    m.pairs[1].w = enp.zeros(3)  # no assignment to a module, no list change: walked anew
    leaves = tree_flatten(m)[0]
    assert leaves[1] is m.pairs[1].w


def test_a_kept_flattening_does_not_keep_the_model_alive():
    net = _net()
    tree_flatten(net)
    assert id(net) in _KEPT
    ref, key = weakref.ref(net), id(net)
    del net
    gc.collect()
    assert ref() is None and key not in _KEPT


def test_unflatten_and_jit_follow_changes_of_a_kept_model():
    net = _net()
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    f = ember.jit(lambda m, x: m(x))
    np.testing.assert_allclose(np.asarray(f(net, x)), np.asarray(net(enp.asarray(x))), rtol=1e-6)
    net.update({"2.bias": enp.full(2, 3.0, enp.float32)})
    np.testing.assert_allclose(np.asarray(f(net, x)), np.asarray(net(enp.asarray(x))), rtol=1e-6)
    net.items[1] = nn.Tanh()
    np.testing.assert_allclose(np.asarray(f(net, x)), np.asarray(net(enp.asarray(x))), rtol=1e-6)
    assert f.trace_count == 2
    leaves, tree = tree_flatten(net)
    copy = tree_unflatten(tree, leaves)
    assert isinstance(copy.items[1], nn.Tanh) and copy.items[2].bias is net.items[2].bias


def test_the_last_key_is_reused_only_for_equal_calls():
    f = ember.jit(lambda p, x: p["w"] * x)
    p = {"w": enp.ones(3)}
    f(p, np.arange(3.0))
    key = f._last_key
    np.testing.assert_array_equal(np.asarray(f(p, np.arange(3.0) + 1)), np.arange(3.0) + 1)
    assert f._last_key is key  # NumPy leaves of the same type: the same key
    f(p, np.arange(3, dtype=np.float32))
    assert f._last_key is not key and f.trace_count == 2
    np.testing.assert_array_equal(np.asarray(f(p, np.arange(3.0))), np.arange(3.0))
    assert f.trace_count == 2


def test_mixed_numpy_and_donated_leaves_are_still_checked():
    f = ember.jit(lambda a, b: a + b, donate_argnums=0)
    x = enp.ones(3)
    f(x, np.ones(3))
    with pytest.raises(EmberError, match="donated"):
        f(x, np.ones(3))
    with pytest.raises(EmberError, match="not an array|not supported"):
        f(enp.ones(3), object())


def test_a_program_rebinds_inputs_that_are_new_arrays():
    f = ember.jit(lambda w, x: w @ x, backend="cpu")
    rng = np.random.default_rng(1)
    w = enp.asarray(rng.standard_normal((4, 4)).astype(np.float32))
    for _ in range(3):  # the same w every call, a new x each time
        x = rng.standard_normal((4, 2)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(f(w, x)), np.asarray(w) @ x, rtol=1e-5)
    w2 = enp.asarray(rng.standard_normal((4, 4)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(f(w2, x)), np.asarray(w2) @ x, rtol=1e-5)


def test_a_program_converts_buffers_that_c_cannot_read_as_they_are():
    closed = ember.jit(lambda x: x * 2.0).lower(enp.ones((3, 4), enp.float32)).graph
    program = ember.backends.get_backend("cpu").compile(closed)
    base = np.arange(24, dtype=np.float32).reshape(3, 8)
    strided = base[:, ::2]  # not contiguous: copied each call, never recognised
    for _ in range(2):
        np.testing.assert_array_equal(program(strided)[0], strided * 2)
    base[:] += 1
    np.testing.assert_array_equal(program(strided)[0], strided * 2)
    wide = np.ones((3, 4), np.float64)  # another dtype: converted
    np.testing.assert_array_equal(program(wide)[0], np.full((3, 4), 2, np.float32))
    with pytest.raises(TypeError, match="internal error"):
        program(wide, wide)
