"""``shard_map``: per-device code over a mesh, and the collectives it calls by name.

``shard_map(f, mesh, in_specs, out_specs)`` is a function of global values. Each argument is
split into blocks as its ``PartitionSpec`` says (a mesh axis the spec leaves out copies the
block to every device along it); ``f`` runs once per device of the mesh on that device's blocks
and may communicate with ``psum``, ``all_gather``... over the mesh axes it names; each result is
assembled from the devices' blocks as its out spec says. An out spec that leaves a mesh axis out
declares the result equal on every device along it: checked where every block is at hand (the
virtual devices of one process), trusted across processes.

``f`` is traced once per call into a per-device graph (its *body*), as ``jit`` would trace it,
and the body is compiled once per distinct graph. The ``shard_map`` primitive holds it, like
``call`` (decision 0009), so every transformation sees one equation and produces a transformed
``shard_map``: ``jvp`` and ``vmap`` of the body, its transpose, and for ``linearize``/``grad``
its known and unknown halves. A residual that the known half hands the unknown half is a
per-device value; it travels as a global value with a new leading axis split over every mesh
axis (device ``d`` holds block ``d``).

Evaluating a ``shard_map`` equation runs the body on every device of the mesh: on virtual
devices (one thread each, ``ember.parallel.runtime.run_on_devices``) when this process runs the
whole mesh, or for this process's own device when the job runs one device per process (``ember
launch``) or the call is already on a virtual device. The body's collectives use the running
device's communicator, so the NumPy and compiled CPU backends run them as host steps.

Inside a program partitioned over the same mesh (``jit`` with shardings), the partitioner
lays the operands out as the in specs say, runs the body as a call on every device's blocks
and gives the results the out specs' layouts (``ember.parallel.partition``): no gathering.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import ember.numpy as enp
from ember import dtypes
from ember.backends import Backend, get_backend
from ember.backends.base import ANY_BACKEND
from ember.core.array import Array, Tracer
from ember.core.primitive import Primitive
from ember.core.trace import (
    GraphTrace,
    GraphTracer,
    UndefinedPrimal,
    Zero,
    aval_of,
    eval_graph,
    innermost_dynamic,
    make_graph,
    to_array,
)
from ember.errors import DTypeError, EmberValueError, ShapeError, op_error
from ember.ir.graph import ClosedGraph
from ember.ir.params import param_key
from ember.ir.passes import optimize
from ember.ir.sharding import Sharding, ShardingError
from ember.ir.types import ArrayType
from ember.ops import elementwise as ew
from ember.ops import structural as st
from ember.parallel import (
    collective_rules,  # noqa: F401  (the collectives' autodiff/vmap rules)
    runtime,
)
from ember.parallel import collectives as coll
from ember.parallel.array import ShardedArray, device_put
from ember.parallel.mesh import Mesh
from ember.parallel.sharding import NamedSharding, PartitionSpec
from ember.transforms.call import batched_body, derived
from ember.transforms.partial_eval import partial_eval_graph
from ember.transforms.subgraphs import (
    hoist_consts,
    jvp_graph,
    program,
    transpose_apply,
)
from ember.tree import tree_flatten, tree_map, tree_unflatten

__all__ = ["shard_map", "shard_map_p", "psum", "pmean", "pmax", "pmin", "all_gather",
           "psum_scatter", "all_to_all", "ppermute", "axis_index"]

AbstractMesh = tuple[tuple[str, int], ...]

shard_map_p = Primitive("shard_map", kind="control", multiple_results=True)


# --- the user's function -------------------------------------------------------------------------

def shard_map(f: Callable[..., Any], mesh: Mesh, in_specs: Any, out_specs: Any
              ) -> Callable[..., Any]:
    """``f`` run per device of ``mesh`` on blocks of its arguments (see the module docstring).

    ``in_specs`` is a ``PartitionSpec`` per argument (a prefix of the arguments' tree: one spec
    may stand for a whole tuple or dict), ``out_specs`` one per result likewise. Called
    eagerly it returns :class:`~ember.parallel.ShardedArray` values laid out by ``out_specs``;
    under ``jit``, ``grad``, ``vmap``... it is one ``shard_map`` equation.
    """
    if not isinstance(mesh, Mesh):
        raise op_error(EmberValueError, "shard_map",
                       f"expected an ember.parallel.Mesh, got {type(mesh).__name__}")
    name = getattr(f, "__name__", "f")

    @functools.wraps(f)
    def mapped(*args: Any) -> Any:
        if _meshes():
            raise op_error(EmberValueError, "shard_map", "called inside another shard_map's "
                           "function: per-device code does not nest")
        if runtime.launched_under_mpi() and \
                [d.process_index for d in mesh.devices.flat] != list(range(mesh.size)):
            raise op_error(EmberValueError, "shard_map", f"under ember launch the mesh must "
                           f"hold the device of every process, in process order; got {mesh}")
        leaves, in_tree = tree_flatten(args)
        leaves = [x if hasattr(x, "aval") else to_array(x) for x in leaves]
        specs = _prefix(in_specs, args, "in_specs")
        in_shardings = [_layout(mesh, s, aval_of(x), f"argument {i}")
                        for i, (x, s) in enumerate(zip(leaves, specs))]
        local = [_local_type(aval_of(x), s, f"argument {i}")
                 for i, (x, s) in enumerate(zip(leaves, in_shardings))]
        body, consts, out_tree = _trace(f, in_tree, local, mesh.abstract)
        outs = tree_unflatten(out_tree, list(range(len(body.out_avals))))
        out_shardings = [_layout(mesh, s, a, f"result {i}") for i, (s, a) in
                         enumerate(zip(_prefix(out_specs, outs, "out_specs"), body.out_avals))]
        captured = [Sharding.replicated(mesh.abstract, aval_of(c).ndim) for c in consts]
        params = dict(body=body, mesh=mesh.abstract, in_shardings=(*captured, *in_shardings),
                      out_shardings=tuple(out_shardings), name=name)
        operands = [*consts, *leaves]
        if innermost_dynamic().level == 0 and not any(isinstance(x, Tracer) for x in operands):
            results = _run_eagerly(mesh, operands, params)
        else:
            results = shard_map_p.bind(*operands, **params)
        return tree_unflatten(out_tree, results)

    return mapped


def _prefix(specs: Any, tree: Any, what: str) -> list[PartitionSpec]:
    """One spec per leaf of ``tree``: ``specs`` is a prefix of it whose leaves are specs."""
    if isinstance(specs, PartitionSpec):
        return [specs] * len(tree_flatten(tree)[0])
    if isinstance(specs, (tuple, list)) and isinstance(tree, (tuple, list)) \
            and len(specs) == len(tree):
        return [s for sub, t in zip(specs, tree) for s in _prefix(sub, t, what)]
    if isinstance(specs, dict) and isinstance(tree, dict) and specs.keys() == tree.keys():
        return [s for k in sorted(tree, key=repr) for s in _prefix(specs[k], tree[k], what)]
    shape = tree_map(lambda x: "*", tree)
    raise op_error(EmberValueError, "shard_map", f"{what}={specs!r} does not match the "
                   f"structure {shape!r}: give a PartitionSpec per value (one spec may stand for "
                   f"a whole tuple, list or dict)")


def _layout(mesh: Mesh, spec: PartitionSpec, aval: ArrayType, what: str) -> Sharding:
    try:
        return NamedSharding(mesh, spec).abstract(aval.ndim)
    except ShardingError as e:
        raise op_error(ShardingError, "shard_map", f"{what} ({aval.strong()}): "
                       f"{str(e).splitlines()[0]}") from None


def _local_type(aval: ArrayType, sharding: Sharding, what: str) -> ArrayType:
    try:
        return aval.update(shape=sharding.local_shape(aval.shape), sharding=None)
    except ShardingError as e:
        raise op_error(ShardingError, "shard_map", f"{what} ({aval.strong()}) cannot be split "
                       f"as {sharding}: {e}") from None


def _global_shape(local: tuple[int, ...], sharding: Sharding) -> tuple[int, ...]:
    return tuple(n * sharding.split_count(i) for i, n in enumerate(local))


# Bodies traced before, by their canonical key: a function traced again at each call (as eager
# code is) reuses the body object of an equal trace, and with it the programs compiled for it.
_BODIES: dict[Any, ClosedGraph] = {}
_BODIES_SIZE = 256  # emptied when full


def _trace(f: Callable[..., Any], in_tree: Any, local: list[ArrayType], mesh: AbstractMesh
           ) -> tuple[ClosedGraph, list[Any], Any]:
    """The body of ``f`` on blocks of types ``local``, its captured values (leading operands,
    replicated) and its output tree."""
    store: list = []

    def flat(*xs: Any) -> list[Any]:
        out = f(*tree_unflatten(in_tree, list(xs)))
        leaves, tree = tree_flatten(out)
        store.append(tree)
        return [x if hasattr(x, "aval") else to_array(x) for x in leaves]

    _context.meshes = [*_meshes(), mesh]
    try:
        body, consts = hoist_consts(make_graph(flat, local))
    finally:
        _context.meshes = _context.meshes[:-1]
    try:
        key = param_key(body)
    except TypeError:  # a param with no canonical key (a callable): this trace is unique
        return body, consts, store[-1]
    known = _BODIES.get(key)
    if known is None:
        if len(_BODIES) >= _BODIES_SIZE:
            _BODIES.clear()
        known = _BODIES[key] = body
    return known, consts, store[-1]


# --- the primitive -------------------------------------------------------------------------------

@shard_map_p.def_abstract_eval
def _shard_map_rule(*avals: ArrayType, body: ClosedGraph, mesh: AbstractMesh,
                    in_shardings: tuple[Sharding, ...], out_shardings: tuple[Sharding, ...],
                    name: str) -> list[ArrayType]:
    op = f"shard_map[name={name}]"
    if len(avals) != len(body.in_avals):
        raise op_error(ShapeError, op, f"got {len(avals)} operands, the per-device function "
                       f"takes {len(body.in_avals)}")
    for i, (got, want, s) in enumerate(zip(avals, body.in_avals, in_shardings)):
        local = _local_type(got, s, f"operand {i}")
        if local.shape != want.shape:
            raise op_error(ShapeError, op, f"operand {i} {got} has blocks of shape "
                           f"{local.shape} laid out as {s}; the per-device function takes {want}")
        if got.dtype != want.dtype:
            raise op_error(DTypeError, op, f"operand {i} has dtype {got.dtype}, the "
                           f"per-device function takes {want}")
    return [a.update(shape=_global_shape(a.shape, s))
            for a, s in zip(body.out_avals, out_shardings)]


def _shard_map_impl(backend: Backend, *args: Any, body: ClosedGraph, mesh: AbstractMesh,
                    in_shardings: tuple[Sharding, ...], out_shardings: tuple[Sharding, ...],
                    name: str) -> list[np.ndarray]:
    """Global results as buffers: every device's blocks, gathered from the other processes
    when the job runs one device per process."""
    positions, blocks = _run_body(backend, body, mesh, in_shardings,
                                  lambda i, d: _block(args[i], in_shardings[i], d))
    if len(positions) < _size(mesh):  # this device only: every process gets every block
        world = runtime.world()
        gathered = [list(world.all_gather(b[None], axis=0)) for b in blocks[0]]
        blocks = [list(per_device) for per_device in zip(*gathered)]
    return [_assemble([b[k] for b in blocks], s, _global_shape(a.shape, s), name, k)
            for k, (a, s) in enumerate(zip(body.out_avals, out_shardings))]


shard_map_p.def_impl(_shard_map_impl, ANY_BACKEND)


def _run_eagerly(mesh: Mesh, operands: Sequence[Any], params: dict[str, Any]
                 ) -> list[Any]:
    """Run the body on the mesh from the user's arrays; results are sharded arrays (each device
    keeps its blocks). Calls already on a virtual device take the primitive's path."""
    mine = _positions(params["mesh"])
    if len(mine) < mesh.size and not runtime.launched_under_mpi():  # on a virtual device
        return shard_map_p.bind(*operands, **params)
    layouts = [NamedSharding.from_abstract(mesh, s) for s in params["in_shardings"]]
    parts = [_parts(x, s, mine) for x, s in zip(operands, layouts)]
    body, name = params["body"], params["name"]
    positions, blocks = _run_body(get_backend("numpy"), body, params["mesh"],
                                  params["in_shardings"], lambda i, d: parts[i][d])
    outs = []
    for k, (aval, s) in enumerate(zip(body.out_avals, params["out_shardings"])):
        shape = _global_shape(aval.shape, s)
        per_device = [b[k] for b in blocks]
        if len(positions) == mesh.size:  # every block is here: check the replicated ones
            _assemble(per_device, s, shape, name, k)
        outs.append(ShardedArray.from_shards(per_device, NamedSharding.from_abstract(mesh, s),
                                             shape, aval.weak))
    return outs


def _parts(x: Any, layout: NamedSharding, positions: list[int]) -> dict[int, np.ndarray]:
    """The blocks of ``x`` the devices at ``positions`` read: a sharded array's own buffers
    when it is laid out so already (else it is resharded first), slices of a whole value."""
    if isinstance(x, ShardedArray):
        buffers = device_put(x, layout).local_buffers()
        return dict(zip(positions, buffers))
    host = np.asarray(x.to_numpy())
    return {d: _block(host, layout.abstract(host.ndim), d) for d in positions}


def _block(x: Any, sharding: Sharding, device: int) -> np.ndarray:
    host = np.asarray(x)
    where = sharding.block_slices(host.shape, coll.mesh_coords(sharding.mesh, device))
    return np.ascontiguousarray(host[where])


def _size(mesh: AbstractMesh) -> int:
    return math.prod(s for _, s in mesh)


def _positions(mesh: AbstractMesh) -> list[int]:
    """The mesh positions this call runs: all of them (on virtual devices) when the job is this
    one process, else the calling device's (its rank in a job of one device per mesh position).
    """
    n, world = _size(mesh), runtime.world()
    if world.size == 1 and not runtime.launched_under_mpi():
        return list(range(n))
    if world.size == n:
        return [world.rank]
    raise op_error(EmberValueError, "shard_map",
                   f"a mesh of {n} devices ({_mesh_text(mesh)}) but this "
                   f"{'process' if runtime.launched_under_mpi() else 'virtual device'} is one of "
                   f"{world.size}: per-device code runs on a mesh of every device of the job")


def _run_body(backend: Backend, body: ClosedGraph, mesh: AbstractMesh,
              in_shardings: Sequence[Sharding], block: Callable[[int, int], np.ndarray]
              ) -> tuple[list[int], list[list[np.ndarray]]]:
    """Run ``body`` for each mesh position this call runs (``block(i, d)``: operand ``i``'s
    block on device ``d``); the positions and each one's results."""
    positions = _positions(mesh)
    prog = program(body, backend)  # compiled once here, not by every device at once

    def device(d: int) -> list[np.ndarray]:
        return [np.asarray(o) for o in prog(*[block(i, d) for i in range(len(in_shardings))])]

    if len(positions) > 1:
        return positions, runtime.run_on_devices(device, len(positions))
    return positions, [device(positions[0])]


def _assemble(blocks: Sequence[np.ndarray], sharding: Sharding, shape: tuple[int, ...],
              name: str, k: int) -> np.ndarray:
    """The global value of result ``k`` from every device's block; devices that the out spec
    says hold the same block must agree."""
    out = np.empty(shape, blocks[0].dtype)
    seen: dict[tuple, int] = {}
    for d, block in enumerate(blocks):
        where = sharding.block_slices(shape, coll.mesh_coords(sharding.mesh, d))
        key = tuple((s.start, s.stop) for s in where)
        if key in seen:
            if not np.array_equal(out[where], block, equal_nan=True):
                unnamed = [a for a in _unnamed(sharding) if dict(sharding.mesh)[a] > 1]
                raise op_error(EmberValueError, f"shard_map[name={name}]",
                               f"result {k} is declared replicated over mesh axes {unnamed} "
                               f"(its out spec leaves them out), but devices {seen[key]} and "
                               f"{d} computed different values: reduce it over those axes "
                               f"(psum, pmean...) or name them in its out spec")
            continue
        seen[key] = d
        out[where] = block
    return out


# --- transformation rules ------------------------------------------------------------------------

def _derived(body: ClosedGraph, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, memoised on ``body`` apart from the ``call`` primitive's derivations."""
    return derived(body, ("shard_map", *key), make)


@shard_map_p.def_jvp
def _shard_map_jvp(primals: Sequence[Any], tangents: Sequence[Any], *, body: ClosedGraph,
                   mesh: AbstractMesh, in_shardings: tuple[Sharding, ...],
                   out_shardings: tuple[Sharding, ...], name: str
                   ) -> tuple[list[Any], list[Any]]:
    nz = tuple(not isinstance(t, Zero) and dtypes.is_inexact(aval_of(p).dtype)
               for p, t in zip(primals, tangents))

    def make() -> tuple[ClosedGraph, list[bool]]:
        graph, out_nz = jvp_graph(body, nz)
        return optimize(graph), out_nz

    jbody, out_nz = _derived(body, ("jvp", nz), make)
    outs = shard_map_p.bind(
        *primals, *[t for t, z in zip(tangents, nz) if z], body=jbody, mesh=mesh,
        in_shardings=(*in_shardings, *_kept(in_shardings, nz)),
        out_shardings=(*out_shardings, *_kept(out_shardings, out_nz)), name=f"jvp({name})")
    n = len(out_nz)
    rest = iter(outs[n:])
    return outs[:n], [next(rest) if z else Zero(aval_of(o)) for o, z in zip(outs[:n], out_nz)]


def _kept(items: Sequence[Any], keep: Sequence[bool]) -> tuple[Any, ...]:
    return tuple(x for x, k in zip(items, keep) if k)


def _residual_layout(mesh: AbstractMesh, aval: ArrayType) -> Sharding:
    """A per-device value as a global one: a new leading axis split over every mesh axis."""
    return Sharding(mesh, (tuple(n for n, _ in mesh), *[()] * aval.ndim))


def _shard_map_partial_eval(trace: GraphTrace, tracers: list[GraphTracer],
                            params: dict[str, Any]) -> list[Any]:
    """The known half runs now as one ``shard_map`` that also returns the residuals; the
    unknown half is staged as one ``shard_map`` of (residuals, unknown operands)."""
    if all(t.is_known for t in tracers):
        return shard_map_p.bind(*[t.const for t in tracers], **params)
    body, mesh, name = params["body"], params["mesh"], params["name"]
    in_sh, out_sh = params["in_shardings"], params["out_shardings"]
    unknowns = tuple(not t.is_known for t in tracers)
    known, unknown, out_uk, res_avals = _derived(body, ("partial_eval", unknowns),
                                                 lambda: _split(body, unknowns))
    known_in = tuple(not u for u in unknowns)
    res_sh = tuple(_residual_layout(mesh, a) for a in res_avals)
    known_outs = shard_map_p.bind(
        *[t.const for t in tracers if t.is_known], body=known, mesh=mesh,
        in_shardings=_kept(in_sh, known_in),
        out_shardings=(*_kept(out_sh, [not u for u in out_uk]), *res_sh), name=name)
    n_kout = len(known_outs) - len(res_avals)
    staged = []
    if any(out_uk):
        residuals = [trace.full_raise(r) for r in known_outs[n_kout:]]
        staged = trace.stage(shard_map_p, [*residuals, *[t for t in tracers if not t.is_known]],
                             dict(body=unknown, mesh=mesh,
                                  in_shardings=(*res_sh, *_kept(in_sh, unknowns)),
                                  out_shardings=_kept(out_sh, out_uk), name=name))
    known_it, staged_it = iter(known_outs[:n_kout]), iter(staged)
    return [next(staged_it) if u else next(known_it) for u in out_uk]


shard_map_p.partial_eval = _shard_map_partial_eval


def _split(body: ClosedGraph, unknowns: tuple[bool, ...]
           ) -> tuple[ClosedGraph, ClosedGraph, list[bool], list[ArrayType]]:
    """The body's known and unknown halves, the residuals carried with a leading axis of one
    (so that the known ``shard_map`` can return them as blocks of a global value)."""
    known, unknown, out_uk, n_res = partial_eval_graph(body, unknowns)
    n_out = len(known.out_avals) - n_res
    res_avals = known.out_avals[n_out:]

    def known_fn(*xs: Any) -> list[Any]:
        outs = eval_graph(known, *xs)
        return [*outs[:n_out], *[st.expand_dims(r, 0) for r in outs[n_out:]]]

    def unknown_fn(*xs: Any) -> list[Any]:
        residuals = [st.squeeze(r, (0,)) for r in xs[:n_res]]
        return eval_graph(unknown, *residuals, *xs[n_res:])

    wide = [a.update(shape=(1, *a.shape)) for a in res_avals]
    return (optimize(make_graph(known_fn, known.in_avals)),
            optimize(make_graph(unknown_fn, [*wide, *unknown.in_avals[n_res:]])),
            out_uk, res_avals)


@shard_map_p.def_transpose
def _shard_map_transpose(cts: Sequence[Any], *args: Any, body: ClosedGraph,
                         mesh: AbstractMesh, in_shardings: tuple[Sharding, ...],
                         out_shardings: tuple[Sharding, ...], name: str) -> list[Any]:
    """Cotangents of the linear operands from one ``shard_map`` of the transposed body.

    The body's collectives transpose as if every value varied by device (``psum`` to
    ``psum``), so at the boundary a result's cotangent is divided by the size of the mesh axes
    its out spec replicates over, and an operand's cotangent is summed over the mesh axes its
    in spec replicates over: together they give the derivative of the global function.
    """
    linear = tuple(isinstance(a, UndefinedPrimal) for a in args)

    def make() -> ClosedGraph:
        res_avals = [a for a, lin in zip(body.in_avals, linear) if not lin]
        n_res = len(res_avals)

        def fn(*xs: Any) -> list[Any]:
            cts = [enp.divide(c, _replicas(s)) if _replicas(s) > 1 else c
                   for c, s in zip(xs[n_res:], out_shardings)]
            in_cts = transpose_apply(body, linear, xs[:n_res], cts)
            lin_sh = _kept(in_shardings, linear)
            return [_sum_replicas(c, s) for c, s in zip(in_cts, lin_sh)]

        return optimize(make_graph(fn, [*res_avals, *[a.strong() for a in body.out_avals]]))

    # The boundary's scaling depends on the layouts: one body may serve several shard_maps.
    tbody = _derived(body, ("transpose", linear, in_shardings, out_shardings), make)
    residuals = [a for a in args if not isinstance(a, UndefinedPrimal)]
    outs = iter(shard_map_p.bind(
        *residuals, *[ew.instantiate(c) for c in cts], body=tbody, mesh=mesh,
        in_shardings=(*_kept(in_shardings, [not lin for lin in linear]), *out_shardings),
        out_shardings=_kept(in_shardings, linear), name=f"transpose({name})"))
    return [next(outs) if lin else None for lin in linear]


def _unnamed(sharding: Sharding) -> tuple[str, ...]:
    """The mesh axes a layout replicates over (no dimension is split by them)."""
    used = {a for dim in sharding.dims for a in dim}
    return tuple(n for n, _ in sharding.mesh if n not in used)


def _replicas(sharding: Sharding) -> int:
    return coll.group_size(sharding.mesh, _unnamed(sharding)) if _unnamed(sharding) else 1


def _sum_replicas(ct: Any, sharding: Sharding) -> Any:
    axes = _unnamed(sharding)
    return coll.all_reduce(ct, axes, sharding.mesh) if axes else ct


@shard_map_p.def_batch
def _shard_map_batch(args: Sequence[Any], dims: Sequence[int | None], *, body: ClosedGraph,
                     mesh: AbstractMesh, in_shardings: tuple[Sharding, ...],
                     out_shardings: tuple[Sharding, ...], name: str
                     ) -> tuple[list[Any], list[int | None]]:
    """The batch axis is moved first and never split: each device computes its blocks of
    every example."""
    bbody, out_b, args, batched = batched_body(body, args, dims, _derived)
    outs = shard_map_p.bind(
        *args, body=bbody, mesh=mesh,
        in_shardings=tuple(_unsplit_first(s) if b else s for s, b in zip(in_shardings, batched)),
        out_shardings=tuple(_unsplit_first(s) if b else s for s, b in zip(out_shardings, out_b)),
        name=f"vmap({name})")
    return outs, [0 if b else None for b in out_b]


def _unsplit_first(sharding: Sharding) -> Sharding:
    return Sharding(sharding.mesh, ((), *sharding.dims), sharding.partial)


# --- the collectives users call ------------------------------------------------------------------

class _Context(threading.local):
    def __init__(self) -> None:
        self.meshes: list[AbstractMesh] = []  # the meshes of the shard_maps being traced


_context = _Context()


def _meshes() -> list[AbstractMesh]:
    return _context.meshes


def _mesh_text(mesh: AbstractMesh) -> str:
    return ", ".join(f"{n}={s}" for n, s in mesh)


def _resolve(op: str, axis_name: str | Sequence[str]) -> tuple[AbstractMesh, tuple[str, ...]]:
    """The enclosing shard_map's mesh and the axes ``axis_name`` names in it."""
    if not _meshes():
        raise op_error(EmberValueError, op, "called outside shard_map: collectives name mesh "
                       "axes of the shard_map whose function calls them")
    mesh = _meshes()[-1]
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    names = [n for n, _ in mesh]
    for a in axes:
        if a not in names:
            raise op_error(EmberValueError, op, f"mesh axis {a!r} is not an axis of the "
                           f"enclosing shard_map's mesh ({_mesh_text(mesh)})")
    if not axes or len(set(axes)) != len(axes):
        raise op_error(EmberValueError, op, f"axis_name={axis_name!r}: name one or more "
                       f"distinct mesh axes")
    return mesh, axes


def _reduce(op: str, reduction: str, x: Any, axis_name: str | Sequence[str]) -> Any:
    mesh, axes = _resolve(op, axis_name)
    n = coll.group_size(mesh, axes)

    def one(v: Any) -> Any:
        if not isinstance(v, Tracer):  # a constant: the same on every device
            v = to_array(v)
            return enp.multiply(v, n) if reduction == "sum" else v
        return coll.all_reduce(v, axes, mesh, reduction)

    return tree_map(one, x)


def psum(x: Any, axis_name: str | Sequence[str]) -> Any:
    """The sum of ``x`` (each leaf of a pytree) over the devices of the named mesh axes; every
    one of them gets it. ``psum(1, "dp")`` is the axis size."""
    return _reduce("psum", "sum", x, axis_name)


def pmean(x: Any, axis_name: str | Sequence[str]) -> Any:
    """The mean of ``x`` (each leaf of a pytree) over the devices of the named mesh axes."""
    mesh, axes = _resolve("pmean", axis_name)
    n = coll.group_size(mesh, axes)
    return tree_map(lambda s: enp.divide(s, n), _reduce("pmean", "sum", x, axis_name))


def pmax(x: Any, axis_name: str | Sequence[str]) -> Any:
    """The elementwise maximum of ``x`` over the devices of the named mesh axes."""
    return _reduce("pmax", "max", x, axis_name)


def pmin(x: Any, axis_name: str | Sequence[str]) -> Any:
    """The elementwise minimum of ``x`` over the devices of the named mesh axes."""
    return _reduce("pmin", "min", x, axis_name)


def _operand(op: str, x: Any, axis: int, what: str = "axis", extra: int = 0) -> tuple[Any, int]:
    """``x`` as an array and ``axis`` normalised (``extra``: one more valid position, for an
    axis that is inserted)."""
    x = x if isinstance(x, Array) else to_array(x)
    nd = aval_of(x).ndim + extra
    if not isinstance(axis, (int, np.integer)) or not -nd <= axis < nd:
        raise op_error(ShapeError, op, f"{what}={axis!r} is out of range for a value of shape "
                       f"{aval_of(x).shape}")
    return x, int(axis) % nd


def all_gather(x: Any, axis_name: str | Sequence[str], axis: int = 0, tiled: bool = False
               ) -> Any:
    """Every device's ``x`` over the named mesh axes, in device order: stacked along a new
    axis ``axis``, or concatenated along ``axis`` with ``tiled=True``."""
    mesh, axes = _resolve("all_gather", axis_name)
    x, axis = _operand("all_gather", x, axis, extra=0 if tiled else 1)
    if not tiled:
        x = st.expand_dims(x, axis)
    return coll.all_gather(x, axes, mesh, axis)


def psum_scatter(x: Any, axis_name: str | Sequence[str], scatter_dimension: int = 0,
                 tiled: bool = False) -> Any:
    """The sum of ``x`` over the named mesh axes, each device keeping its block of dimension
    ``scatter_dimension`` (its size divided by the device count with ``tiled=True``; without,
    the dimension must equal the device count and is dropped)."""
    mesh, axes = _resolve("psum_scatter", axis_name)
    x, dim = _operand("psum_scatter", x, scatter_dimension, "scatter_dimension")
    n = coll.group_size(mesh, axes)
    if not tiled and aval_of(x).shape[dim] != n:
        raise op_error(ShapeError, "psum_scatter", f"dimension {dim} of a value of shape "
                       f"{aval_of(x).shape} must equal the {n} devices of mesh axes {axes} "
                       f"(or pass tiled=True to split it into {n} blocks)")
    out = coll.reduce_scatter(x, axes, mesh, dim)
    return out if tiled else st.squeeze(out, (dim,))


def all_to_all(x: Any, axis_name: str | Sequence[str], split_axis: int, concat_axis: int,
               tiled: bool = False) -> Any:
    """Block ``j`` of ``split_axis`` goes to device ``j`` of the named mesh axes, and what
    arrives is joined along ``concat_axis`` in device order. With ``tiled=True`` the blocks
    are ``1/n`` of the split axis and are concatenated; without, the split axis must equal the
    device count ``n`` and is removed, and the arrivals are stacked along a new axis at
    ``concat_axis`` (a position in the result)."""
    mesh, axes = _resolve("all_to_all", axis_name)
    n = coll.group_size(mesh, axes)
    x, split = _operand("all_to_all", x, split_axis, "split_axis")
    _, concat = _operand("all_to_all", x, concat_axis, "concat_axis")
    if tiled:
        return coll.all_to_all(x, axes, mesh, split, concat)
    if aval_of(x).shape[split] != n:
        raise op_error(ShapeError, "all_to_all", f"split_axis {split} of a value of shape "
                       f"{aval_of(x).shape} must equal the {n} devices of mesh axes {axes} "
                       f"(or pass tiled=True to split it into {n} blocks)")
    if split == concat:
        return coll.all_to_all(x, axes, mesh, split, concat)
    # A new axis of one at concat_axis receives the blocks; the emptied split axis goes.
    if split < concat:
        concat += 1
    else:
        split += 1
    out = coll.all_to_all(st.expand_dims(x, concat), axes, mesh, split, concat)
    return st.squeeze(out, (split,))


def ppermute(x: Any, axis_name: str | Sequence[str], perm: Sequence[tuple[int, int]]) -> Any:
    """Send ``x`` from device ``src`` to device ``dst`` (indices along the named mesh axes) for
    each ``(src, dst)`` of ``perm``; a device nobody sends to gets zeros."""
    mesh, axes = _resolve("ppermute", axis_name)
    x = x if isinstance(x, Array) else to_array(x)
    try:
        pairs = [(int(s), int(d)) for s, d in perm]
    except (TypeError, ValueError):
        raise op_error(EmberValueError, "ppermute", f"perm={perm!r}: expected (source, "
                       f"destination) pairs of device indices") from None
    return coll.collective_permute(x, axes, mesh, pairs)


def axis_index(axis_name: str | Sequence[str]) -> Any:
    """This device's index along the named mesh axis (several axes: along them together,
    the first major), an int32 scalar."""
    mesh, axes = _resolve("axis_index", axis_name)
    sizes = dict(mesh)
    index = coll.axis_index(axes[0], mesh)
    for a in axes[1:]:
        index = index * np.int32(sizes[a]) + coll.axis_index(a, mesh)
    return index
