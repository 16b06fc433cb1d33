"""Structured control flow: ``cond``/``switch``, ``while_loop``, ``fori_loop``, ``scan``, ``map``.

Python ``if`` and ``for`` work eagerly, but under ``jit`` (or on traced values) the program must
say what can happen: these functions trace their branch and body functions into graphs held by
three primitives, ``cond``, ``while`` and ``scan``, so the branch or loop survives in the IR.

Values a body closes over are hoisted into explicit operands of the primitive (they may be
tracers of enclosing transformations, which must see them), so the graphs in a primitive's
params close over no traced value. Every primitive has a jvp and a batch rule; ``cond`` and
``scan`` also have ``partial_eval`` and ``transpose`` rules, so ``grad`` works through them.
``while`` has no transpose (its trip count is unknown before it runs, so there is nowhere to keep
residuals): reverse mode raises and points to ``fori_loop`` with static bounds or ``scan``.

Their implementations are generic (registered for ``ANY_BACKEND``): they run their bodies on the
backend that runs them, compiled by it (:func:`ember.transforms.subgraphs.program`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ember import dtypes
from ember.backends.base import ANY_BACKEND
from ember.core.array import Array
from ember.core.primitive import Primitive
from ember.core.trace import (
    GraphTrace,
    GraphTracer,
    UndefinedPrimal,
    Zero,
    aval_of,
    eval_graph,
    make_graph,
    to_array,
)
from ember.errors import DTypeError, EmberError, ShapeError, UnsupportedError, op_error
from ember.ir.graph import ClosedGraph, Var
from ember.ir.types import ArrayType
from ember.ops import elementwise as ew
from ember.ops import structural as st
from ember.ops.reduce import reduce_max
from ember.transforms.autodiff import flatten_fun
from ember.transforms.partial_eval import partial_eval_graph
from ember.transforms.subgraphs import (
    add_unused_inputs,
    batch_graph,
    hoist_consts,
    hoist_shared_consts,
    jvp_graph,
    move_batch_axis,
    permute,
    program,
    select_outputs,
    transpose_apply,
    transpose_graph,
)
from ember.tree import TreeDef, tree_flatten, tree_unflatten

__all__ = ["cond", "switch", "while_loop", "fori_loop", "scan", "map",
           "cond_p", "while_p", "scan_p"]


# --- shared helpers --------------------------------------------------------------------------

def _as_value(x: Any) -> Any:
    return x if isinstance(x, Array) else to_array(x)


def _split(seq: Sequence[Any], *sizes: int) -> list[list[Any]]:
    out, start = [], 0
    for n in sizes:
        out.append(list(seq[start:start + n]))
        start += n
    out.append(list(seq[start:]))
    return out


def _check_operands(op: str, got: Sequence[ArrayType], expected: Sequence[ArrayType]) -> None:
    if len(got) != len(expected) or any((a.shape, a.dtype) != (b.shape, b.dtype)
                                        for a, b in zip(got, expected)):
        raise op_error(ShapeError, op, f"operands typed {list(got)} do not match the body's "
                       f"inputs {list(expected)}")


def _zeros(aval: ArrayType) -> Any:
    return st.broadcast_in_dim(to_array(np.zeros((), aval.dtype)), aval.shape, ())


def _nonzero(tangent: Any, aval: ArrayType) -> bool:
    return not isinstance(tangent, Zero) and dtypes.is_inexact(aval.dtype)


def _fixpoint(step: Callable[[list[bool]], list[bool]], flags: list[bool]) -> list[bool]:
    """Grow a loop carry's flags (nonzero tangent, unknown, batched) until the body keeps them."""
    while True:
        new = [a or b for a, b in zip(flags, step(flags))]
        if new == flags:
            return flags
        flags = new


def _batch_size(args: Sequence[Any], dims: Sequence[int | None]) -> int:
    return next(aval_of(a).shape[d] for a, d in zip(args, dims) if d is not None)


def _select_batched(pred: Any, on_true: Any, on_false: Any) -> Any:
    """Per batch element (``pred`` has shape ``(B,)``), pick ``on_true`` or ``on_false``."""
    shape = aval_of(on_true).shape
    return ew.select(st.broadcast_in_dim(pred, shape, (0,)), on_true, on_false)


# --- cond ------------------------------------------------------------------------------------

cond_p = Primitive("cond", kind="control", multiple_results=True)


@cond_p.def_abstract_eval
def _cond_rule(index: ArrayType, *ops: ArrayType, branches: tuple[ClosedGraph, ...]
               ) -> list[ArrayType]:
    if index.shape != () or not dtypes.is_int(index.dtype):
        raise op_error(DTypeError, "cond", f"the branch index must be an integer scalar, got "
                       f"{index}")
    for b in branches:
        _check_operands("cond", ops, b.in_avals)
    outs = branches[0].out_avals
    return [a.update(weak=all(b.out_avals[i].weak for b in branches))
            for i, a in enumerate(outs)]


def _cond_impl(backend, index, *ops, branches):
    # Out-of-range indices are clamped, as in jax.lax.switch.
    i = int(np.clip(int(backend.to_host(index)), 0, len(branches) - 1))
    return program(branches[i], backend)(*ops)


cond_p.def_impl(_cond_impl, ANY_BACKEND)


@cond_p.def_jvp
def _cond_jvp(primals, tangents, *, branches):
    index, *ops = primals
    nz = [_nonzero(t, aval_of(p)) for p, t in zip(ops, tangents[1:])]
    out_nz = [any(col) for col in zip(*[jvp_graph(b, nz)[1] for b in branches])]
    jvps = tuple(jvp_graph(b, nz, instantiate=out_nz)[0] for b in branches)
    outs = cond_p.bind(index, *ops, *[t for t, z in zip(tangents[1:], nz) if z],
                       branches=jvps)
    n = len(out_nz)
    rest = iter(outs[n:])
    return outs[:n], [next(rest) if z else Zero(aval_of(o)) for o, z in zip(outs[:n], out_nz)]


def _cond_partial_eval(trace: GraphTrace, tracers: list[GraphTracer], params: dict[str, Any]
                       ) -> list[Any]:
    """Run the branch's known part now (it outputs residuals); stage the unknown part.

    Each branch needs its own residuals, but both staged branches take the same operands, so
    every branch's known part outputs the residuals of all branches (zeros for the others').
    """
    branches = params["branches"]
    index, *ops = tracers
    if not index.is_known or all(t.is_known for t in ops):
        return trace.stage(cond_p, tracers, params)
    unknowns = [not t.is_known for t in ops]
    out_uk = [any(col) for col in zip(*[partial_eval_graph(b, unknowns)[2] for b in branches])]
    splits = [partial_eval_graph(b, unknowns, instantiate=out_uk) for b in branches]
    res_avals = [known.out_avals[len(known.out_avals) - n:] for known, _, _, n in splits]
    all_res = [a for avals in res_avals for a in avals]
    known_branches, unknown_branches, offset = [], [], 0
    for (known, unknown, _, n), avals in zip(splits, res_avals):
        known_branches.append(_pad_residuals(known, n, all_res[:offset],
                                             all_res[offset + n:]))
        unknown = add_unused_inputs(unknown, all_res[:offset], 0)
        unknown_branches.append(add_unused_inputs(unknown, all_res[offset + n:], len(avals)
                                                  + offset))
        offset += n
    known_outs = cond_p.bind(index.const, *[t.const for t in ops if t.is_known],
                             branches=tuple(known_branches))
    n_known = out_uk.count(False)
    residuals = [trace.full_raise(r) for r in known_outs[n_known:]]
    staged = trace.stage(cond_p, [index, *residuals, *[t for t in ops if not t.is_known]],
                         {"branches": tuple(unknown_branches)})
    known_it, staged_it = iter(known_outs[:n_known]), iter(staged)
    return [next(staged_it) if u else next(known_it) for u in out_uk]


cond_p.partial_eval = _cond_partial_eval


def _pad_residuals(known: ClosedGraph, n_res: int, before: Sequence[ArrayType],
                   after: Sequence[ArrayType]) -> ClosedGraph:
    def fn(*args: Any) -> list[Any]:
        outs = eval_graph(known, *args)
        cut = len(outs) - n_res
        return [*outs[:cut], *[_zeros(a) for a in before], *outs[cut:],
                *[_zeros(a) for a in after]]

    return make_graph(fn, known.in_avals)


@cond_p.def_transpose
def _cond_transpose(cts, index, *ops, branches):
    if isinstance(index, UndefinedPrimal):
        raise op_error(UnsupportedError, "cond", "cannot transpose with respect to the index")
    linear = [isinstance(o, UndefinedPrimal) for o in ops]
    residuals = [o for o in ops if not isinstance(o, UndefinedPrimal)]
    transposed = tuple(transpose_graph(b, linear) for b in branches)
    outs = iter(cond_p.bind(index, *residuals, *[ew.instantiate(c) for c in cts],
                            branches=transposed))
    return [None, *[next(outs) if lin else None for lin in linear]]


@cond_p.def_batch
def _cond_batch(args, dims, *, branches):
    index, *ops = args
    index_dim, *op_dims = dims
    size = _batch_size(args, dims)
    batched = [d is not None for d in op_dims]
    ops = [move_batch_axis(x, d, size) if d is not None else x for x, d in zip(ops, op_dims)]
    if index_dim is None:
        out_b = [any(col) for col in zip(*[batch_graph(b, batched, size)[1] for b in branches])]
        new = tuple(batch_graph(b, batched, size, instantiate=out_b)[0] for b in branches)
        return cond_p.bind(index, *ops, branches=new), [0 if b else None for b in out_b]
    # A per-element index: run every branch on the whole batch, then pick per element. The
    # ``>=`` chain clamps out-of-range indices like the unbatched primitive does.
    index = st.moveaxis(index, index_dim, 0)
    results = [eval_graph(batch_graph(b, batched, size, instantiate=True)[0], *ops)
               for b in branches]
    outs = results[0]
    for i, res in enumerate(results[1:], start=1):
        pick = ew.ge(index, ew.full_like(index, i))
        outs = [_select_batched(pick, r, o) for r, o in zip(res, outs)]
    return outs, [0] * len(outs)


def _trace_branches(op: str, funs: Sequence[Callable[..., Any]], names: Sequence[str],
                    operands: tuple) -> tuple[list[Any], list[Any], tuple[ClosedGraph, ...],
                                              TreeDef]:
    """Trace each branch on the operands; hoist captured values; check outputs agree."""
    leaves, in_tree = tree_flatten((tuple(operands), {}))
    leaves = [_as_value(x) for x in leaves]
    avals = [aval_of(x) for x in leaves]
    traced, trees = [], []
    for fun in funs:
        store: list = []
        traced.append(make_graph(flatten_fun(fun, in_tree, store), avals))
        trees.append(store[-1])
    for i, tree in enumerate(trees[1:], start=1):
        if tree != trees[0]:
            raise op_error(EmberError, op, f"{names[i]} returns a value of structure {tree}, "
                           f"{names[0]} returns {trees[0]}; branches must return the same "
                           "structure")
    graphs, consts = hoist_shared_consts(_unify_branch_outputs(op, traced, names))
    return consts, leaves, tuple(graphs), trees[0]


def _unify_branch_outputs(op: str, traced: list[ClosedGraph], names: Sequence[str]
                          ) -> list[ClosedGraph]:
    """Check that branch outputs have one type; weakly typed scalars adopt the other's dtype."""
    targets = []
    for k, first in enumerate(traced[0].out_avals):
        avals = [c.out_avals[k] for c in traced]
        for i, a in enumerate(avals):
            if a.shape != first.shape:
                raise op_error(ShapeError, op, f"output {k} has shape {a.shape} in {names[i]} "
                               f"but {first.shape} in {names[0]}; branches must return the "
                               "same shapes")
        strong = {a.dtype for a in avals if not a.weak}
        if len({a.dtype for a in avals}) == 1:
            targets.append(None)
        elif len(strong) == 1:
            targets.append(strong.pop())
        else:
            found = ", ".join(f"{n}: {a}" for n, a in zip(names, avals))
            raise op_error(DTypeError, op, f"output {k} has different dtypes ({found}); cast "
                           "the branches to one dtype")
    if all(t is None for t in targets):
        return traced
    return [_cast_outputs(c, targets) for c in traced]


def _cast_outputs(closed: ClosedGraph, targets: Sequence[np.dtype | None]) -> ClosedGraph:
    def fn(*args: Any) -> list[Any]:
        return [o if t is None else ew.convert(o, t)
                for o, t in zip(eval_graph(closed, *args), targets)]

    return make_graph(fn, closed.in_avals)


def switch(index: Any, branches: Sequence[Callable[..., Any]], *operands: Any) -> Any:
    """``branches[index](*operands)``, with ``index`` clamped to ``[0, len(branches) - 1]``.

    Every branch is traced (so each must accept the operands and all must return the same
    structure, shapes and dtypes); only the selected one runs.
    """
    branches = list(branches)
    if not branches:
        raise op_error(EmberError, "switch", "needs at least one branch")
    index = _as_value(index)
    aval = aval_of(index)
    if aval.shape != () or not (dtypes.is_int(aval.dtype) or aval.dtype == dtypes.bool_):
        raise op_error(DTypeError, "switch", f"the index must be an integer scalar, got {aval}")
    names = [f"branches[{i}]" for i in range(len(branches))]
    return _switch("switch", ew.convert(index, dtypes.int32), branches, names, operands)


def cond(pred: Any, true_fun: Callable[..., Any], false_fun: Callable[..., Any],
         *operands: Any) -> Any:
    """``true_fun(*operands) if pred else false_fun(*operands)``, traceable (as jax.lax.cond).

    ``pred`` is a bool or integer scalar (nonzero is true). Both branches are traced and must
    return the same structure, shapes and dtypes.
    """
    pred = _as_value(pred)
    aval = aval_of(pred)
    if aval.shape != ():
        raise op_error(ShapeError, "cond", f"the predicate must be a scalar, got shape "
                       f"{aval.shape}")
    if aval.dtype != dtypes.bool_:
        if not dtypes.is_int(aval.dtype):
            raise op_error(DTypeError, "cond", f"the predicate must be bool or integer, got "
                           f"{aval.dtype}")
        pred = ew.ne(pred, ew.full_like(pred, 0))
    return _switch("cond", ew.convert(pred, dtypes.int32), [false_fun, true_fun],
                   ["false_fun", "true_fun"], operands)


def _switch(op: str, index: Any, branches: list[Callable[..., Any]], names: list[str],
            operands: tuple) -> Any:
    consts, leaves, graphs, out_tree = _trace_branches(op, branches, names, operands)
    outs = cond_p.bind(index, *consts, *leaves, branches=graphs)
    return tree_unflatten(out_tree, outs)


# --- loops: tracing a body whose carry must keep its type ------------------------------------

def _trace_with_carry(op: str, trace: Callable[[list[Any]], ClosedGraph], init: list[Any]
                      ) -> tuple[ClosedGraph, list[Any]]:
    """Trace a loop body; a weakly typed initial carry (a Python scalar) takes the dtype the
    body gives it, any other mismatch between the carry in and out is an error."""
    closed = trace(init)
    outs = closed.out_avals[:len(init)]
    fixed = [ew.convert(x, o.dtype) if aval_of(x).weak and aval_of(x).shape == o.shape
             and aval_of(x).dtype != o.dtype else x for x, o in zip(init, outs)]
    if any(f is not x for f, x in zip(fixed, init)):
        closed = trace(fixed)
        outs = closed.out_avals[:len(init)]
    for i, (x, o) in enumerate(zip(fixed, outs)):
        a = aval_of(x)
        if a.shape != o.shape:
            raise op_error(ShapeError, op, f"carry leaf {i} has shape {a.shape} on entry but "
                           f"the body returns shape {o.shape}; the carry must keep its shape")
        if a.dtype != o.dtype:
            raise op_error(DTypeError, op, f"carry leaf {i} has dtype {a.dtype} on entry but "
                           f"the body returns {o.dtype}; the carry must keep its dtype")
    return closed, fixed


def _check_tree(op: str, what: str, got: TreeDef, expected: TreeDef) -> None:
    if got != expected:
        raise op_error(EmberError, op, f"{what} returns a carry of structure {got}, but the "
                       f"initial carry has structure {expected}")


# --- while -----------------------------------------------------------------------------------

while_p = Primitive("while", kind="control", multiple_results=True)


@while_p.def_abstract_eval
def _while_rule(*avals: ArrayType, cond: ClosedGraph, body: ClosedGraph, cond_nconsts: int,
                body_nconsts: int) -> list[ArrayType]:
    cc, bc, carry = _split(avals, cond_nconsts, body_nconsts)
    _check_operands("while_loop", [*cc, *carry], cond.in_avals)
    _check_operands("while_loop", [*bc, *carry], body.in_avals)
    return body.out_avals


def _while_impl(backend, *args, cond, body, cond_nconsts, body_nconsts):
    cc, bc, carry = _split(args, cond_nconsts, body_nconsts)
    test, step = program(cond, backend), program(body, backend)
    while bool(backend.to_host(test(*cc, *carry)[0])):
        carry = step(*bc, *carry)
    return carry


while_p.def_impl(_while_impl, ANY_BACKEND)


@while_p.def_jvp
def _while_jvp(primals, tangents, *, cond, body, cond_nconsts, body_nconsts):
    cc, bc, init = _split(primals, cond_nconsts, body_nconsts)
    _, bct, initt = _split(tangents, cond_nconsts, body_nconsts)
    bc_nz = [_nonzero(t, aval_of(p)) for p, t in zip(bc, bct)]
    k_nz = _fixpoint(lambda k: jvp_graph(body, bc_nz + k, instantiate=k)[1],
                     [_nonzero(t, aval_of(p)) for p, t in zip(init, initt)])
    jbody, _ = jvp_graph(body, bc_nz + k_nz, instantiate=k_nz)
    nb, nk, mb, mk = len(bc), len(init), sum(bc_nz), sum(k_nz)
    jbody = permute(jbody, [*range(nb), *range(nb + nk, nb + nk + mb), *range(nb, nb + nk),
                            *range(nb + nk + mb, nb + nk + mb + mk)])
    t_avals = [aval_of(p).strong() for p, z in zip(init, k_nz) if z]
    jcond = add_unused_inputs(cond, t_avals, len(cond.in_avals))
    outs = while_p.bind(*cc, *bc, *[t for t, z in zip(bct, bc_nz) if z], *init,
                        *[ew.instantiate(t) for t, z in zip(initt, k_nz) if z],
                        cond=jcond, body=jbody, cond_nconsts=cond_nconsts,
                        body_nconsts=nb + mb)
    rest = iter(outs[nk:])
    return outs[:nk], [next(rest) if z else Zero(aval_of(o)) for o, z in zip(outs[:nk], k_nz)]


@while_p.def_transpose
def _while_transpose(cts, *args, **params):
    raise op_error(UnsupportedError, "while_loop",
                   "reverse-mode differentiation (grad/vjp) of a while_loop is not supported: "
                   "its trip count is only known at run time, so there is no bound on the "
                   "values to keep for the backward pass. Use fori_loop with static (Python "
                   "int) bounds or scan, which are reverse-differentiable; forward mode "
                   "(jvp) works")


@while_p.def_batch
def _while_batch(args, dims, *, cond, body, cond_nconsts, body_nconsts):
    size = _batch_size(args, dims)
    cc, bc, init = _split(args, cond_nconsts, body_nconsts)
    cc_b, bc_b, k_b = (
        [d is not None for d in part] for part in _split(dims, cond_nconsts, body_nconsts))
    k_b = _fixpoint(lambda k: batch_graph(body, bc_b + k, size, instantiate=k)[1], k_b)
    pred_batched = batch_graph(cond, cc_b + k_b, size)[1][0]
    if pred_batched:
        k_b = [True] * len(k_b)  # each element stops on its own step: every carry differs
    bcond, _ = batch_graph(cond, cc_b + k_b, size)
    bbody, _ = batch_graph(body, bc_b + k_b, size, instantiate=k_b)

    def lead(values, flags, parts_dims):
        return [move_batch_axis(x, d, size) if f else x
                for x, f, d in zip(values, flags, parts_dims)]

    cc_dims, bc_dims, k_dims = _split(dims, cond_nconsts, body_nconsts)
    cc, bc, init = lead(cc, cc_b, cc_dims), lead(bc, bc_b, bc_dims), lead(init, k_b, k_dims)
    out_dims = [0 if b else None for b in k_b]
    if not pred_batched:
        return while_p.bind(*cc, *bc, *init, cond=bcond, body=bbody, cond_nconsts=len(cc),
                            body_nconsts=len(bc)), out_dims
    # Run while any element is still going; finished elements keep their carry.
    nc = len(cc)

    def any_cond(*a):
        return [reduce_max(eval_graph(bcond, *a)[0], (0,))]

    def masked_body(*a):
        cca, bca, carry = _split(a, nc, len(bc))
        going = eval_graph(bcond, *cca, *carry)[0]
        new = eval_graph(bbody, *bca, *carry)
        return [_select_batched(going, n, c) for n, c in zip(new, carry)]

    carry_avals = bbody.in_avals[len(bc):]
    new_cond = make_graph(any_cond, bcond.in_avals)
    new_body = make_graph(masked_body, [*bcond.in_avals[:nc], *bbody.in_avals[:len(bc)],
                                        *carry_avals])
    return while_p.bind(*cc, *cc, *bc, *init, cond=new_cond, body=new_body, cond_nconsts=nc,
                        body_nconsts=nc + len(bc)), out_dims


def while_loop(cond_fun: Callable[[Any], Any], body_fun: Callable[[Any], Any],
               init_val: Any) -> Any:
    """``while cond_fun(val): val = body_fun(val)``, traceable (as jax.lax.while_loop).

    Differentiable in forward mode only; for ``grad`` use :func:`fori_loop` with static bounds
    or :func:`scan`.
    """
    leaves, tree = tree_flatten(init_val)
    leaves = [_as_value(x) for x in leaves]

    def trace_body(init: list[Any]) -> ClosedGraph:
        def flat(*carry: Any) -> list[Any]:
            out_leaves, out_tree = tree_flatten(body_fun(tree_unflatten(tree, list(carry))))
            _check_tree("while_loop", "body_fun", out_tree, tree)
            return [_as_value(o) for o in out_leaves]
        return make_graph(flat, [aval_of(x) for x in init])

    body, leaves = _trace_with_carry("while_loop", trace_body, leaves)

    def flat_cond(*carry: Any) -> list[Any]:
        return [_as_value(cond_fun(tree_unflatten(tree, list(carry))))]

    cond = make_graph(flat_cond, [aval_of(x) for x in leaves])
    pred = cond.out_avals[0]
    if pred.shape != () or pred.dtype != dtypes.bool_:
        raise op_error(DTypeError, "while_loop", f"cond_fun must return a bool scalar, got "
                       f"{pred}")
    cond, cc = hoist_consts(cond)
    body, bc = hoist_consts(body)
    outs = while_p.bind(*cc, *bc, *leaves, cond=cond, body=body, cond_nconsts=len(cc),
                        body_nconsts=len(bc))
    return tree_unflatten(tree, outs)


# --- scan ------------------------------------------------------------------------------------

scan_p = Primitive("scan", kind="control", multiple_results=True)


@scan_p.def_abstract_eval
def _scan_rule(*avals: ArrayType, body: ClosedGraph, num_consts: int, num_carry: int,
               length: int, reverse: bool) -> list[ArrayType]:
    consts, carry, xs = _split(avals, num_consts, num_carry)
    for x in xs:
        if x.shape[:1] != (length,):
            raise op_error(ShapeError, "scan", f"scanned operand of shape {x.shape} does not "
                           f"have leading dimension {length}")
    _check_operands("scan", [*consts, *carry, *[x.update(shape=x.shape[1:]) for x in xs]],
                    body.in_avals)
    outs = body.out_avals
    return [*outs[:num_carry], *[a.update(shape=(length, *a.shape)) for a in outs[num_carry:]]]


def _scan_impl(backend, *args, body, num_consts, num_carry, length, reverse):
    """Run the body once per step. Slices of ``xs`` and ``ys`` are taken and assembled on the
    host, through the backend's copies: cheap on a CPU backend (views), correct on any; a
    backend that can do better lowers ``scan`` itself."""
    consts, carry, xs = _split(args, num_consts, num_carry)
    step = program(body, backend)
    xs = [backend.to_host(x) for x in xs]
    ys = [np.empty((length, *a.shape), a.dtype) for a in body.out_avals[num_carry:]]
    for i in (range(length - 1, -1, -1) if reverse else range(length)):
        outs = step(*consts, *carry, *[backend.from_host(x[i, ...]) for x in xs])
        carry = outs[:num_carry]
        for y, o in zip(ys, outs[num_carry:]):
            y[i] = backend.to_host(o)
    return [*carry, *[backend.from_host(y) for y in ys]]


scan_p.def_impl(_scan_impl, ANY_BACKEND)


@scan_p.def_jvp
def _scan_jvp(primals, tangents, *, body, num_consts, num_carry, length, reverse):
    nz = [_nonzero(t, aval_of(p)) for p, t in zip(primals, tangents)]
    c_nz, k_nz, x_nz = _split(nz, num_consts, num_carry)
    ny = len(body.out_avals) - num_carry
    k_nz = _fixpoint(
        lambda k: jvp_graph(body, c_nz + k + x_nz, instantiate=k + [False] * ny)[1][:num_carry],
        k_nz)
    jbody, out_nz = jvp_graph(body, c_nz + k_nz + x_nz, instantiate=k_nz + [False] * ny)
    nc, nk, nx = num_consts, num_carry, len(primals) - num_consts - num_carry
    mc, mk, mx, my = sum(c_nz), sum(k_nz), sum(x_nz), sum(out_nz[nk:])
    n = nc + nk + nx
    jbody = permute(
        jbody,
        [*range(nc), *range(n, n + mc), *range(nc, nc + nk), *range(n + mc, n + mc + mk),
         *range(nc + nk, n), *range(n + mc + mk, n + mc + mk + mx)],
        [*range(nk), *range(nk + ny, nk + ny + mk), *range(nk, nk + ny),
         *range(nk + ny + mk, nk + ny + mk + my)])
    consts, init, xs = _split(primals, nc, nk)
    ct, kt, xt = _split(tangents, nc, nk)
    outs = scan_p.bind(*consts, *[t for t, z in zip(ct, c_nz) if z],
                       *init, *[ew.instantiate(t) for t, z in zip(kt, k_nz) if z],
                       *xs, *[t for t, z in zip(xt, x_nz) if z],
                       body=jbody, num_consts=nc + mc, num_carry=nk + mk, length=length,
                       reverse=reverse)
    carry, carry_t, ys, ys_t = _split(outs, nk, mk, ny)
    carry_t_it, ys_t_it = iter(carry_t), iter(ys_t)
    t_out = [next(carry_t_it) if z else Zero(aval_of(o)) for o, z in zip(carry, k_nz)]
    t_out += [next(ys_t_it) if z else Zero(aval_of(o)) for o, z in zip(ys, out_nz[nk:])]
    return [*carry, *ys], t_out


def _scan_partial_eval(trace: GraphTrace, tracers: list[GraphTracer], params: dict[str, Any]
                       ) -> list[Any]:
    """Run a scan of the body's known part now and stage a scan of its unknown part.

    The known scan outputs the residuals of each iteration stacked like ``ys``; the unknown scan
    reads them as extra scanned operands. A residual that depends only on loop-invariant operands
    (a weight the body closes over, a zero) is computed once, outside the loop, and passed as a
    constant instead of being stacked.
    """
    body, nc, nk = params["body"], params["num_consts"], params["num_carry"]
    length, reverse = params["length"], params["reverse"]
    if all(t.is_known for t in tracers):
        return trace.stage(scan_p, tracers, params)
    c_uk, k_uk, x_uk = _split([not t.is_known for t in tracers], nc, nk)
    ny = len(body.out_avals) - nk
    k_uk = _fixpoint(lambda k: partial_eval_graph(body, c_uk + k + x_uk,
                                                  instantiate=k + [False] * ny)[2][:nk], k_uk)
    unknowns = c_uk + k_uk + x_uk
    known, unknown, out_uk, n_res = partial_eval_graph(body, unknowns,
                                                       instantiate=k_uk + [False] * ny)
    n_kc, n_kk = c_uk.count(False), k_uk.count(False)
    n_kout = len(known.out_avals) - n_res
    invariant = _loop_invariant(known, n_kc)[n_kout:]
    known_vals = [t.const for t, u in zip(tracers, unknowns) if not u]
    # Loop-invariant residuals are computed once, outside the loop, from the known constants.
    hoisted = eval_graph(select_outputs(known, [False] * n_kout + invariant),
                         *known_vals[:n_kc], *[None] * (len(known_vals) - n_kc))
    known_body = select_outputs(known, [True] * n_kout + [not v for v in invariant])
    known_outs = scan_p.bind(*known_vals, body=known_body, num_consts=n_kc, num_carry=n_kk,
                             length=length, reverse=reverse)
    n_kys = out_uk[nk:].count(False)
    k_carry, k_ys, stacked = _split(known_outs, n_kk, n_kys)
    consts_res = [trace.full_raise(r) for r in hoisted]
    stacked_res = [trace.full_raise(r) for r in stacked]
    n_uc, n_uk = c_uk.count(True), k_uk.count(True)
    inv_idx = [j for j in range(n_res) if invariant[j]]
    var_idx = [j for j in range(n_res) if not invariant[j]]
    base = n_res + n_uc + n_uk
    unknown_body = permute(unknown, [*inv_idx, *range(n_res, base), *var_idx,
                                     *range(base, len(unknown.in_avals))])
    consts, init, xs = _split(tracers, nc, nk)
    staged = trace.stage(scan_p, [
        *consts_res, *[t for t, u in zip(consts, c_uk) if u],
        *[t for t, u in zip(init, k_uk) if u],
        *stacked_res, *[t for t, u in zip(xs, x_uk) if u],
    ], {"body": unknown_body, "num_consts": len(consts_res) + n_uc, "num_carry": n_uk,
        "length": length, "reverse": reverse})
    s_carry, s_ys = iter(staged[:n_uk]), iter(staged[n_uk:])
    k_carry_it, k_ys_it = iter(k_carry), iter(k_ys)
    return ([next(s_carry) if u else next(k_carry_it) for u in k_uk] +
            [next(s_ys) if u else next(k_ys_it) for u in out_uk[nk:]])


scan_p.partial_eval = _scan_partial_eval


def _loop_invariant(closed: ClosedGraph, num_consts: int) -> list[bool]:
    """Which outputs of a loop body depend on no input but its first ``num_consts``."""
    graph = closed.graph
    varying = {v.id for v in graph.invars[num_consts:]}
    for eqn in graph.eqns:
        if any(isinstance(a, Var) and a.id in varying for a in eqn.inputs):
            varying.update(v.id for v in eqn.outputs)
    return [not (isinstance(v, Var) and v.id in varying) for v in graph.outvars]


@scan_p.def_transpose
def _scan_transpose(cts, *args, body, num_consts, num_carry, length, reverse):
    """A reverse scan of the transposed body; constants' cotangents are summed in its carry."""
    consts, init, xs = _split(args, num_consts, num_carry)
    c_lin = [isinstance(c, UndefinedPrimal) for c in consts]
    x_lin = [isinstance(x, UndefinedPrimal) for x in xs]
    res_c = [c for c in consts if not isinstance(c, UndefinedPrimal)]
    res_x = [x for x in xs if not isinstance(x, UndefinedPrimal)]
    ct_carry = [ew.instantiate(c) for c in cts[:num_carry]]
    ct_ys = [ew.instantiate(c) for c in cts[num_carry:]]
    linear = c_lin + [True] * num_carry + x_lin
    in_c, in_k, in_x = _split(body.in_avals, num_consts, num_carry)
    lin_c_avals = [a.strong() for a, lin in zip(in_c, c_lin) if lin]
    n_rc, n_lc, n_rx = len(res_c), len(lin_c_avals), len(res_x)

    def body_t(*a: Any) -> list[Any]:
        rc, acc, ctk, rx, cty = _split(a, n_rc, n_lc, num_carry, n_rx)
        ct_in = transpose_apply(body, linear, [*rc, *rx], [*ctk, *cty])
        ct_lc, ct_k, ct_x = _split(ct_in, n_lc, num_carry)
        return [*[ew.add(s, c) for s, c in zip(acc, ct_lc)], *ct_k, *ct_x]

    avals = [*[a for a, lin in zip(in_c, c_lin) if not lin], *lin_c_avals,
             *[a.strong() for a in in_k], *[a for a, lin in zip(in_x, x_lin) if not lin],
             *[a.strong() for a in body.out_avals[num_carry:]]]
    transposed = make_graph(body_t, avals)
    outs = scan_p.bind(*res_c, *[_zeros(a) for a in lin_c_avals], *ct_carry, *res_x, *ct_ys,
                       body=transposed, num_consts=n_rc, num_carry=n_lc + num_carry,
                       length=length, reverse=not reverse)
    ct_c, ct_init, ct_xs = _split(outs, n_lc, num_carry)
    ct_c_it, ct_xs_it = iter(ct_c), iter(ct_xs)
    return ([next(ct_c_it) if lin else None for lin in c_lin] +
            [c if isinstance(a, UndefinedPrimal) else None for a, c in zip(init, ct_init)] +
            [next(ct_xs_it) if lin else None for lin in x_lin])


@scan_p.def_batch
def _scan_batch(args, dims, *, body, num_consts, num_carry, length, reverse):
    size = _batch_size(args, dims)
    c_b, k_b, x_b = ([d is not None for d in part] for part in _split(dims, num_consts,
                                                                      num_carry))
    ny = len(body.out_avals) - num_carry
    k_b = _fixpoint(lambda k: batch_graph(body, c_b + k + x_b, size,
                                          instantiate=k + [False] * ny)[1][:num_carry], k_b)
    bbody, out_b = batch_graph(body, c_b + k_b + x_b, size, instantiate=k_b + [False] * ny)
    consts, init, xs = _split(args, num_consts, num_carry)
    c_d, k_d, x_d = _split(dims, num_consts, num_carry)
    consts = [x if d is None else st.moveaxis(x, d, 0) for x, d in zip(consts, c_d)]
    init = [move_batch_axis(x, d, size) if b else x for x, d, b in zip(init, k_d, k_b)]
    xs = [x if d is None else st.moveaxis(x, d, 1) for x, d in zip(xs, x_d)]
    outs = scan_p.bind(*consts, *init, *xs, body=bbody, num_consts=num_consts,
                       num_carry=num_carry, length=length, reverse=reverse)
    return outs, [0 if b else None for b in k_b] + [1 if b else None for b in out_b[num_carry:]]


def scan(f: Callable[[Any, Any], tuple[Any, Any]], init: Any, xs: Any = None,
         length: int | None = None, reverse: bool = False, unroll: int = 1
         ) -> tuple[Any, Any]:
    """Loop ``carry, y = f(carry, x)`` over the leading axis of ``xs``; return
    ``(final carry, stacked ys)`` (as jax.lax.scan). ``reverse`` walks ``xs`` from the end
    (``ys`` stay aligned with ``xs``). ``unroll`` is accepted for JAX compatibility; the
    loop is not unrolled.
    """
    del unroll
    init_leaves, init_tree = tree_flatten(init)
    init_leaves = [_as_value(x) for x in init_leaves]
    xs_leaves, xs_tree = tree_flatten(xs)
    xs_leaves = [_as_value(x) for x in xs_leaves]
    lengths = set()
    for x in xs_leaves:
        if aval_of(x).ndim == 0:
            raise op_error(ShapeError, "scan", "scanned values (xs) must have a leading axis, "
                           "got a scalar")
        lengths.add(aval_of(x).shape[0])
    if length is not None:
        lengths.add(int(length))
    if len(lengths) > 1:
        found = sorted(lengths)
        raise op_error(ShapeError, "scan", f"xs leaves and length disagree on the number of "
                       f"steps: {found}")
    if not lengths:
        raise op_error(EmberError, "scan", "pass length= when xs is None")
    n = lengths.pop()
    nk = len(init_leaves)
    x_avals = [aval_of(x).update(shape=aval_of(x).shape[1:]) for x in xs_leaves]
    y_trees: list[TreeDef] = []

    def trace_body(init_: list[Any]) -> ClosedGraph:
        def flat(*args: Any) -> list[Any]:
            out = f(tree_unflatten(init_tree, list(args[:nk])),
                    tree_unflatten(xs_tree, list(args[nk:])))
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise op_error(EmberError, "scan", "the body must return a pair (carry, y)")
            c_leaves, c_tree = tree_flatten(out[0])
            _check_tree("scan", "the body", c_tree, init_tree)
            y_leaves, y_tree = tree_flatten(out[1])
            y_trees.append(y_tree)
            return [_as_value(o) for o in [*c_leaves, *y_leaves]]
        return make_graph(flat, [*[aval_of(x) for x in init_], *x_avals])

    closed, init_leaves = _trace_with_carry("scan", trace_body, init_leaves)
    body, consts = hoist_consts(closed)
    outs = scan_p.bind(*consts, *init_leaves, *xs_leaves, body=body, num_consts=len(consts),
                       num_carry=nk, length=n, reverse=bool(reverse))
    return tree_unflatten(init_tree, outs[:nk]), tree_unflatten(y_trees[-1], outs[nk:])


def map(f: Callable[[Any], Any], xs: Any) -> Any:  # noqa: A001
    """``stack([f(x) for x in xs])`` over the leading axis, as one traced loop."""
    return scan(lambda carry, x: (carry, f(x)), None, xs)[1]


def fori_loop(lower: Any, upper: Any, body_fun: Callable[[Any, Any], Any],
              init_val: Any) -> Any:
    """``for i in range(lower, upper): val = body_fun(i, val)``, traceable.

    With concrete bounds this is a :func:`scan` (so ``grad`` works through it); with traced
    bounds it is a :func:`while_loop` (forward-mode differentiable only), as in JAX.
    """
    if _is_concrete(lower) and _is_concrete(upper):
        lo, hi = int(lower), int(upper)

        def step(carry: Any, _: Any) -> tuple[Any, None]:
            i, val = carry
            return (ew.add(i, ew.full_like(i, 1)), body_fun(i, val)), None

        start = _as_value(lower) if isinstance(lower, Array) else to_array(lo)
        (_, out), _ = scan(step, (start, init_val), None, length=max(hi - lo, 0))
        return out
    lower, upper = _as_value(lower), _as_value(upper)
    dt = dtypes.result_type(lower, upper)
    lower, upper = ew.convert(lower, dt), ew.convert(upper, dt)

    def keep_going(carry: Any) -> Any:
        return ew.lt(carry[0], carry[1])

    def step_(carry: Any) -> Any:
        i, hi_, val = carry
        return ew.add(i, ew.full_like(i, 1)), hi_, body_fun(i, val)

    return while_loop(keep_going, step_, (lower, upper, init_val))[2]


def _is_concrete(x: Any) -> bool:
    from ember.core.array import Tracer

    return isinstance(x, (int, np.integer)) or (isinstance(x, Array) and
                                                not isinstance(x, Tracer) and x.ndim == 0)
