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
