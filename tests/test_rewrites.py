"""Rewrites before fusion (ember.compiler.rewrites): transposed products and scatter-adds into
zeros, checked on the graph (what is left of each pattern) and by value (the rewritten graph
on the NumPy backend, and the cpu backend's program, against the original graph)."""

from __future__ import annotations

import numpy as np
import pytest

import ember
import ember.nn.functional as F
import ember.numpy as enp
from ember.backends import get_backend
from ember.backends.cpu import toolchain
from ember.compiler.rewrites import rewrite
from ember.ops.indexing import scatter_p
from ember.ops.linalg import dot_general_p
from ember.ops.structural import broadcast_in_dim_p, concatenate_p, pad_p, transpose_p
from ember.transforms.subgraphs import program
from ember.tree import tree_leaves


def rand(*shape, seed=0):
    return enp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def prims(closed):
    return [e.prim for e in closed.graph.eqns]


def run(closed, args):
    leaves = [np.asarray(x) for x in tree_leaves(args)]
    return [np.asarray(o) for o in program(closed, get_backend("numpy"))(*leaves)]


def rewritten(fn, *args):
    """(original graph, rewritten graph), after checking they compute the same values."""
    closed = ember.jit(fn).lower(*args).graph
    new = rewrite(closed)
    for want, got in zip(run(closed, args), run(new, args), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    return closed, new


def mlp_step(params, x, y):
    def loss(p):
        h = enp.tanh(x @ p["w1"])
        return ((h @ p["w2"] - y) ** 2).mean()
    grads = ember.grad(loss)(params)
    return {k: params[k] - 0.1 * grads[k] for k in params}


MLP = ({"w1": rand(16, 32), "w2": rand(32, 8, seed=1)}, rand(4, 16, seed=2), rand(4, 8, seed=3))


def test_weight_gradients_are_products_in_the_weights_layout():
    """``w`` stored [in, out]: its gradient ``transpose(dy^T x)`` becomes ``x^T dy``."""
    closed, new = rewritten(mlp_step, *MLP)
    assert transpose_p in prims(closed)
    assert transpose_p not in prims(new)
    assert prims(new).count(dot_general_p) == prims(closed).count(dot_general_p)


def test_a_transposed_product_read_elsewhere_too_is_kept():
    def fn(a, b):
        p = a @ b
        return p.T * 2.0, p + 1.0
    closed, new = rewritten(fn, rand(3, 5), rand(5, 4, seed=1))
    assert new is closed


def test_batched_product_swaps_only_the_free_axes():
    def fn(a, b):  # [2, 3, 5] @ [2, 5, 4] -> [2, 3, 4], transposed to [2, 4, 3]
        return enp.swapaxes(a @ b, 1, 2) * 1.0, enp.transpose(a @ (b * 2.0), (1, 0, 2))
    closed, new = rewritten(fn, rand(2, 3, 5), rand(2, 5, 4, seed=1))
    # The first swaps the free blocks: a product; the second moves the batch axis: kept.
    assert prims(new).count(transpose_p) == prims(closed).count(transpose_p) - 1


def _zeros_scattered(closed):
    producer = {v.id: e for e in closed.graph.eqns for v in e.outputs}
    return [e for e in closed.graph.eqns if e.prim is scatter_p
            and producer.get(getattr(e.inputs[0], "id", None), e).prim is broadcast_in_dim_p]


def test_cross_entropy_gradient_scatters_into_the_softmax_term():
    def loss(w, x, t):
        return F.cross_entropy(x @ w, t)
    args = (rand(16, 50), rand(4, 8, 16, seed=1), enp.asarray(np.arange(32).reshape(4, 8) % 50))
    closed, new = rewritten(ember.grad(loss), *args)
    assert len(_zeros_scattered(closed)) == 1
    assert _zeros_scattered(new) == [] and prims(new).count(scatter_p) == 1


def test_embedding_gradient_scatters_into_the_tied_products_gradient():
    ids = enp.asarray(np.array([[1, 3, 3, 0], [2, 3, 1, 1]]))  # repeated rows add up

    def loss(emb, ids):
        h = emb[ids]  # [2, 4, 8]
        return ((h @ emb.T) ** 2).sum()
    closed, new = rewritten(ember.grad(loss), rand(5, 8), ids)
    assert len(_zeros_scattered(closed)) == 1 and _zeros_scattered(new) == []


def test_a_scatter_into_zeros_with_no_addend_is_kept():
    def loss(emb, ids):
        return (emb[ids] ** 2).sum()
    ids = enp.asarray(np.array([0, 2, 2]))
    closed, new = rewritten(ember.grad(loss), rand(4, 3), ids)
    assert new is closed


def test_rotary_gradient_concatenates_its_halves():
    """The halves' cotangents padded with zeros and added: their concatenation."""
    def loss(x, c, s):
        return (F.apply_rotary(x, c, s) ** 2).sum()
    closed, new = rewritten(ember.grad(loss), rand(2, 4, 8, 16), rand(8, 8, seed=1),
                            rand(8, 8, seed=2))
    assert prims(closed).count(pad_p) == 2 and pad_p not in prims(new)
    assert prims(new).count(concatenate_p) == prims(closed).count(concatenate_p) + 1


def test_pads_that_overlap_or_leave_a_gap_are_kept():
    def fn(a, b):
        return (enp.pad(a, [(0, 0), (0, 2)]) + enp.pad(b, [(0, 0), (2, 0)]),  # overlap
                enp.pad(a, [(0, 0), (0, 4)]) + enp.pad(b, [(0, 0), (4, 0)]),  # a gap
                enp.pad(a, [(1, 0), (0, 3)]) + enp.pad(b, [(0, 1), (3, 0)]))  # two axes
    closed, new = rewritten(fn, rand(3, 3), rand(3, 3, seed=1))
    assert new is closed


@pytest.mark.skipif(not toolchain.available(), reason="no C compiler found")
@pytest.mark.parametrize("case", ["mlp", "rotary", "cross_entropy"])
def test_compiled_programs_match_the_numpy_backend(case):
    if case == "mlp":
        fn, args = mlp_step, MLP
    elif case == "rotary":
        fn = ember.grad(lambda x, c, s: (F.apply_rotary(x, c, s) ** 2).sum())
        args = (rand(2, 4, 8, 16), rand(8, 8, seed=1), rand(8, 8, seed=2))
    else:
        def fn(w, x, t):
            return ember.value_and_grad(lambda w: F.cross_entropy(x @ w, t))(w)
        args = (rand(16, 50), rand(4, 8, 16, seed=1),
                enp.asarray(np.arange(32).reshape(4, 8) % 50))
    got = ember.jit(fn, backend="cpu")(*args)
    want = ember.jit(fn, backend="numpy")(*args)
    for g, w in zip(tree_leaves(got), tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
