"""Contractions read their operands through strides, so a transpose feeding one is folded away.

``x @ w.T`` traces to ``dot_general(x, transpose(w))``: run as written, the transpose copies
the whole weight matrix before the product reads it. A contraction can name any axes of its
operands as contracted or batch axes, so the rewrite moves the permutation into the
contraction's dimension numbers and reads ``w`` itself; BLAS then gets a transposed operand
(a flag, not a copy). The transpose, if nothing else reads it, is dropped by DCE.
"""

from __future__ import annotations

from ember.ir.graph import ClosedGraph, Eqn, Var
from ember.ir.passes import dce
from ember.ops.linalg import dot_general_p
from ember.ops.structural import transpose_p


def fold_transposes(closed: ClosedGraph) -> ClosedGraph:
    """``closed`` with transposes that feed ``dot_general`` folded into its dimensions."""
    producer = {eqn.outputs[0].id: eqn for eqn in closed.graph.eqns if eqn.prim is transpose_p}
    eqns = [_folded(eqn, producer) if eqn.prim is dot_general_p else eqn
            for eqn in closed.graph.eqns]
    if all(a is b for a, b in zip(eqns, closed.graph.eqns)):
        return closed
    g = closed.graph
    return dce(ClosedGraph(type(g)(g.constvars, g.invars, eqns, g.outvars), closed.consts))


def _folded(eqn: Eqn, producer: dict[int, Eqn]) -> Eqn:
    (lc, rc), (lb, rb) = eqn.params["dims"]
    inputs, axes = list(eqn.inputs), [[lc, lb], [rc, rb]]
    for side in (0, 1):
        t = producer.get(inputs[side].id) if isinstance(inputs[side], Var) else None
        if t is None:
            continue
        perm = t.params["perm"]
        contract, batch = axes[side]
        free = [i for i in range(len(perm)) if i not in contract and i not in batch]
        # The result lists free axes in the operand's order: the permutation must keep theirs.
        if [perm[i] for i in free] != sorted(perm[i] for i in free):
            continue
        axes[side] = [tuple(perm[i] for i in contract), tuple(perm[i] for i in batch)]
        inputs[side] = t.inputs[0]
    if inputs == eqn.inputs:
        return eqn
    (lc, lb), (rc, rb) = axes
    return Eqn(eqn.prim, inputs, eqn.outputs, {**eqn.params, "dims": ((lc, rc), (lb, rb))})
