"""Pytrees: flatten/unflatten round trips, structure equality, user-registered nodes."""

import dataclasses
from collections import namedtuple

import numpy as np
import pytest

import ember
from ember.tree import register_pytree_node, tree_flatten, tree_map, tree_structure, tree_unflatten

Point = namedtuple("Point", ["x", "y"])


@dataclasses.dataclass
class Params:
    w: object
    b: object


class Box:
    def __init__(self, value, label):
        self.value, self.label = value, label


register_pytree_node(Box, lambda b: ([b.value], b.label), lambda label, c: Box(c[0], label))


def test_round_trip_of_nested_containers():
    tree = {"a": [1, (2, None)], "b": Point(3, {"c": 4}), "d": Params(5, 6)}
    leaves, treedef = tree_flatten(tree)
    assert leaves == [1, 2, 3, 4, 5, 6]
    rebuilt = tree_unflatten(treedef, leaves)
    assert rebuilt["b"] == Point(3, {"c": 4}) and isinstance(rebuilt["b"], Point)
    assert rebuilt["d"] == Params(5, 6)
    assert rebuilt["a"] == [1, (2, None)]


def test_structure_equality_and_hash():
    assert tree_structure({"a": 1, "b": [2]}) == tree_structure({"b": [9], "a": 8})
    assert tree_structure((1, 2)) != tree_structure([1, 2])
    assert hash(tree_structure(Point(1, 2))) == hash(tree_structure(Point(3, 4)))


def test_registered_node_aux_is_part_of_structure():
    assert tree_structure(Box(1, "x")) != tree_structure(Box(1, "y"))
    out = tree_map(lambda v: v * 10, Box(2, "x"))
    assert out.value == 20 and out.label == "x"


def test_tree_map_structure_mismatch():
    with pytest.raises(ember.EmberError, match="differ"):
        tree_map(lambda a, b: a + b, [1, 2], (1, 2))


def test_transformations_over_custom_nodes():
    g = ember.grad(lambda b: (b.value ** 2).sum())(Box(np.array([1.0, 2.0]), "w"))
    assert isinstance(g, Box) and g.label == "w"
    np.testing.assert_allclose(np.asarray(g.value), [2.0, 4.0])
    out = ember.jit(lambda p: Params(p.w * 2, p.b + 1))(Params(np.ones(2), np.zeros(2)))
    np.testing.assert_array_equal(np.asarray(out.w), [2, 2])


def test_a_class_flattened_as_a_leaf_becomes_a_node_once_registered():
    class Pair:
        def __init__(self, a, b):
            self.a, self.b = a, b

    p = Pair(1, 2)
    assert tree_flatten([p, p])[0] == [p, p]  # a leaf, and remembered as one
    register_pytree_node(Pair, lambda x: ([x.a, x.b], None), lambda _, c: Pair(*c))
    leaves, treedef = tree_flatten([p, p])
    assert leaves == [1, 2, 1, 2]
    rebuilt = tree_unflatten(treedef, [5, 6, 7, 8])
    assert (rebuilt[0].a, rebuilt[1].b) == (5, 8)


def test_plain_structures_are_shared_and_keep_their_own_keys():
    first = tree_structure(([1, 2], {"a": 3, "b": (4,)}))
    again = tree_structure(([9, 8], {"b": (7,), "a": 6}))
    assert first is again  # kept: a jit cache hit compares structures by identity
    assert tree_structure([1, 2, 3]) is not tree_structure([1, 2])
    assert tree_structure([1, 2]) != tree_structure((1, 2))
    # Equal keys of other types are not conflated: each tree gets its own keys back.
    ints, floats = {1: "x"}, {1.0: "y"}
    for tree in (ints, floats, {0.0: 1}, {-0.0: 2}):
        leaves, treedef = tree_flatten(tree)
        back = tree_unflatten(treedef, leaves)
        assert back == tree and [type(k) for k in back] == [type(k) for k in tree]
    leaves, treedef = tree_flatten({-0.0: 2})
    assert repr(next(iter(tree_unflatten(treedef, leaves)))) == "-0.0"


def test_flatten_of_many_leaves_and_nested_custom_nodes():
    xs = [np.float32(i) for i in range(300)]
    leaves, treedef = tree_flatten({"xs": xs, "box": [Box(xs[0], "b")]})
    assert leaves[:3] == [xs[0], xs[0], xs[1]] and len(leaves) == 301
    assert treedef.num_leaves == 301
    assert treedef == tree_structure({"box": [Box(0, "b")], "xs": list(range(300))})
    assert treedef != tree_structure({"box": [Box(0, "c")], "xs": list(range(300))})
    rebuilt = tree_unflatten(treedef, list(range(301)))
    assert rebuilt["box"][0].value == 0 and rebuilt["xs"][-1] == 300


def test_is_leaf_sees_every_node():
    seen = []
    leaves, _ = tree_flatten([[1, 2], (3,)], is_leaf=lambda x: seen.append(x) or
                             isinstance(x, tuple))
    assert leaves == [1, 2, (3,)] and [1, 2] in seen and 1 in seen


def test_empty_nodes_round_trip_with_and_without_is_leaf():
    tree = {"a": [], "b": (), "c": {}, "d": [1, []]}
    for is_leaf in (None, lambda x: False):
        leaves, treedef = tree_flatten(tree, is_leaf=is_leaf)
        assert leaves == [1] and tree_unflatten(treedef, leaves) == tree


def test_a_structure_is_one_object_whichever_way_it_was_reached():
    class Fresh:  # a leaf class not seen before: the first walk examines it
        pass

    first = tree_structure([Fresh(), Fresh()])
    assert tree_structure([Fresh(), Fresh()]) is first
    assert tree_flatten([1, 2], is_leaf=lambda x: False)[1] is tree_structure([3, 4])
