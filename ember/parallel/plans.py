"""Ready-made parallel plans: where every parameter, optimizer slot, gradient, batch and named
activation of a model lives on a mesh.

A :class:`Plan` is data: layouts by parameter-name pattern (the ``state_dict()`` names, so a
LoRA adapter's ``lora_A``/``lora_B`` get their own), the ZeRO stage, the batch's layout and
the layouts of activations at the points the model names (``ember.models.llama.constrain``).
It says *where values live*; the SPMD partitioner (``ember.parallel.partition``) derives the
collectives from that, so a plan never writes communication itself::

    model = P.shard(model, mesh, P.plans.llama(dp="dp", tp="tp", zero=1))

:func:`llama` builds the standard plans for the built-in Llama (data parallel, ZeRO-1/2/3,
Megatron tensor parallel, sequence parallel, and their combinations on a 2-D mesh);
``docs/parallel.md`` ("Plans for the built-in Llama") says what each communicates.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ember.errors import EmberValueError
from ember.parallel.array import device_put, with_sharding_constraint
from ember.parallel.mesh import Mesh
from ember.parallel.sharding import NamedSharding, PartitionSpec
from ember.transforms.checkpoint import checkpoint
from ember.transforms.custom_vjp import custom_vjp
from ember.tree import tree_flatten, tree_leaves, tree_map, tree_unflatten

__all__ = ["Plan", "PlanError", "fit", "llama", "parse", "shard"]

Entry = str | tuple[str, ...] | None
Layout = tuple[Entry, ...]


class PlanError(EmberValueError):
    """A plan does not fit a model or a mesh (a dimension that does not divide, an axis the
    mesh lacks)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where a model's values live on a mesh, by name.

    ``params``: ``(pattern, layout)`` pairs, the first whose ``fnmatch`` pattern matches a
    parameter's ``state_dict()`` name gives its layout (one entry per dimension, from the left,
    as in :class:`PartitionSpec`); a parameter no pattern matches is replicated. ``zero`` is the
    ZeRO stage over mesh axis ``zero_axis``: from 1 the optimizer slots, from 2 the gradients,
    at 3 the parameters themselves are also split over it, on their first dimension (after
    any split the pattern gives it). On a mesh, a split that does not divide its dimension is
    left out (:func:`fit`; :meth:`describe` lists where). ``batch`` lays out
    ``ids [batch, length]``;
    ``activations`` maps the model's named points to layouts of ``[batch, length, hidden]``;
    ``cotangents`` gives some of those points the layout of their gradient in the backward
    pass (without one it is the activation's: a constraint's transpose asks for its own
    layout), so a point may gather going forward and scatter going back (Megatron's
    conjugate pairs under sequence parallelism).
    ``requires``: ``(config field, mesh axis)`` pairs that must divide (attention heads over
    the tensor axis: a projection's rows may divide when its heads do not).
    """

    name: str
    params: tuple[tuple[str, Layout], ...] = ()
    zero: int = 0
    zero_axis: str | None = None
    batch: Layout = ()
    activations: tuple[tuple[str, Layout], ...] = ()
    cotangents: tuple[tuple[str, Layout], ...] = ()
    requires: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.zero not in (0, 1, 2, 3):
            raise PlanError(f"{self.name}: zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.zero and self.zero_axis is None:
            raise PlanError(f"{self.name}: ZeRO stage {self.zero} needs a data-parallel mesh "
                            f"axis to split over")

    # --- layouts by name (no mesh) ----------------------------------------------------------
    def param_spec(self, name: str, ndim: int) -> PartitionSpec:
        """The layout of parameter ``name`` (ZeRO-3 splits it over the data axis too)."""
        return self._spec(name, ndim, zero_from=3)

    def state_spec(self, name: str, ndim: int) -> PartitionSpec:
        """The layout of an optimizer slot (AdamW's moments) of parameter ``name``."""
        return self._spec(name, ndim, zero_from=1)

    def grad_spec(self, name: str, ndim: int) -> PartitionSpec:
        """The layout of the gradient of parameter ``name``."""
        return self._spec(name, ndim, zero_from=2)

    def gathered_spec(self, name: str, ndim: int) -> PartitionSpec:
        """The layout a ZeRO-3 parameter is gathered to where it is used: without the data
        axis, keeping any tensor-parallel split."""
        return self._spec(name, ndim, zero_from=4)

    def activation_spec(self, point: str) -> PartitionSpec | None:
        """The layout of the activation at the named point, or None (propagation decides)."""
        layout = dict(self.activations).get(point)
        return None if layout is None else PartitionSpec(*layout)

    def cotangent_spec(self, point: str) -> PartitionSpec | None:
        """The layout of the gradient at the named point in the backward pass, or None (the
        activation's own layout)."""
        layout = dict(self.cotangents).get(point)
        return None if layout is None else PartitionSpec(*layout)

    def _spec(self, name: str, ndim: int, zero_from: int) -> PartitionSpec:
        layout = next((lay for pattern, lay in self.params if fnmatch.fnmatchcase(name, pattern)),
                      ())
        if len(layout) > ndim:
            raise PlanError(f"{self.name}: parameter {name} has {ndim} dimensions, but the plan "
                            f"lays it out as {PartitionSpec(*layout)}")
        entries = list(layout) + [None] * (ndim - len(layout))
        if self.zero >= zero_from and ndim:
            # The data axis joins the first dimension as its minor split: a tensor-parallel
            # block is then cut further by ZeRO, and gathering over dp restores that block.
            first = entries[0]
            axes = () if first is None else (first,) if isinstance(first, str) else first
            entries[0] = (*axes, self.zero_axis) if axes else self.zero_axis
        return PartitionSpec(*entries)

    # --- on a mesh ----------------------------------------------------------------------------
    def param_shardings(self, model: Any, mesh: Mesh, trainable: bool = False
                        ) -> dict[str, NamedSharding]:
        """``{name: NamedSharding}`` for every entry of ``model.state_dict()``, or with
        ``trainable`` of ``model.trainable_parameters()`` (the parameters a step returns)."""
        self.check(model, mesh)
        values = model.trainable_parameters() if trainable else model.state_dict()
        return {name: _named(mesh, self.param_spec(name, np.ndim(v)), np.shape(v), self.zero_axis)
                for name, v in values.items()}

    def model_shardings(self, model: Any, mesh: Mesh) -> list[NamedSharding]:
        """One sharding per leaf of ``model`` (``tree_leaves`` order): parameters by the plan,
        buffers that are not in the state dict (rotary frequencies) replicated. This is the
        model's part of a partitioned program's input layouts."""
        by_id = {id(v): s for v, s in zip(model.state_dict().values(),
                                          self.param_shardings(model, mesh).values())}
        return [by_id.get(id(leaf), NamedSharding(mesh)) for leaf in tree_leaves(model)]

    def state_shardings(self, state: Any, mesh: Mesh) -> Any:
        """Shardings shaped like the optimizer state ``state`` (a NamedTuple such as
        ``AdamState`` whose slot fields are ``{name: array}`` dicts): each slot by
        :meth:`state_spec`, everything else (the step count) replicated."""
        def field(value: Any) -> Any:
            if isinstance(value, Mapping):
                return {name: _named(mesh, self.state_spec(name, np.ndim(v)), np.shape(v),
                                     self.zero_axis)
                        for name, v in value.items()}
            return tree_map(lambda _: NamedSharding(mesh), value)
        leaves, treedef = tree_flatten(state, is_leaf=lambda v: isinstance(v, Mapping))
        return tree_unflatten(treedef, [field(v) for v in leaves])

    def grad_shardings(self, grads: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
        """``{name: NamedSharding}`` for gradients keyed like ``trainable_parameters()``."""
        return {name: _named(mesh, self.grad_spec(name, np.ndim(g)), np.shape(g), self.zero_axis)
                for name, g in grads.items()}

    def constrain_grads(self, grads: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
        """Inside a traced step: ask for the plan's gradient layouts (ZeRO-2 and 3: each
        gradient summed straight into its shard, a reduce-scatter; below: summed whole, an
        all-reduce)."""
        shardings = self.grad_shardings(grads, mesh)
        return {name: with_sharding_constraint(g, shardings[name]) for name, g in grads.items()}

    def batch_sharding(self, mesh: Mesh, ndim: int = 2) -> NamedSharding:
        """The layout of token ids ``[..., batch, length]``: ``ndim=3`` for micro-batches
        ``[accumulation steps, batch, length]`` (the step dimension whole)."""
        return NamedSharding(mesh, PartitionSpec(*(None,) * (ndim - 2), *self.batch))

    def annotator(self, mesh: Mesh) -> Annotator:
        """The hook the model calls at its named points (see :func:`shard`)."""
        return Annotator(self, mesh)

    def check(self, model: Any, mesh: Mesh) -> None:
        """Errors naming the plan, the value and the mesh axis for what does not fit."""
        axes = {a for _, lay in (*self.params, *self.activations, *self.cotangents,
                                 ("batch", self.batch))
                for e in lay for a in ((e,) if isinstance(e, str) else e or ())}
        axes |= {self.zero_axis} if self.zero else set()
        missing = sorted(a for a in axes if a not in mesh.axis_names)
        if missing:
            raise PlanError(f"{self.name}: mesh axis {missing[0]!r} is not in {mesh} (axes "
                            f"{mesh.axis_names})")
        config = getattr(model, "config", None)
        for field_name, axis in self.requires if config is not None else ():
            count, size = getattr(config, field_name), mesh.shape[axis]
            if count % size:
                what = field_name.removeprefix("num_").replace("_", " ")
                raise PlanError(f"{self.name}: the model's {count} {what} ({field_name}) do "
                                f"not divide over mesh axis {axis!r} (size {size}); choose a "
                                f"{axis} size that divides {count}")

    def describe(self, model: Any, mesh: Mesh) -> str:
        """What the plan does with ``model`` on ``mesh`` where it cannot do what it says: one
        line per parameter whose layout (or whose gradient's or optimizer state's) differs
        from the plan's because a size does not divide (:func:`fit`)."""
        self.check(model, mesh)
        lines = [f"{self.name} on {mesh}:"]
        kinds = (("parameter", self.param_spec), ("gradient", self.grad_spec),
                 ("optimizer state", self.state_spec))
        for name, value in model.state_dict().items():
            notes: dict[str, list[str]] = {}
            for what, spec in kinds:
                for note in fit(mesh, spec(name, np.ndim(value)), np.shape(value),
                                self.zero_axis)[1]:
                    notes.setdefault(note, []).append(what)
            for note, whats in notes.items():
                scope = "" if len(whats) == len(kinds) else f" ({', '.join(whats)})"
                lines.append(f"  {name} {tuple(np.shape(value))}: {note}{scope}")
        if len(lines) == 1:
            lines.append("  every parameter is laid out as planned")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Annotator:
    """A plan's activation layouts on a mesh: ``annotator(point, x)`` constrains ``x`` to the
    layout the plan gives ``point``. A point the plan does not name, or a value the layout
    does not fit (a one-token decode step under sequence parallelism), is left to
    propagation. Hashable: the model holds it as a static attribute (part of jit's key)."""

    plan: Plan
    mesh: Mesh

    def __call__(self, point: str, x: Any) -> Any:
        if point == "layer":
            return self._gather_layer(x)
        if point == "layer_call":
            # ZeRO-3 without checkpointed layers: the layer keeps its activations for the
            # backward pass but gathers its parameters again there, so that one layer's
            # gathered parameters are alive at a time, not every layer's.
            return checkpoint(x, policy=_gathers_recomputed) if self.plan.zero == 3 else x
        spec = self.plan.activation_spec(point)
        if spec is None or len(spec) > np.ndim(x) or _misfit(self.mesh, spec, np.shape(x)):
            return x
        back = self.plan.cotangent_spec(point)
        if back is None or _misfit(self.mesh, back, np.shape(x)):
            return with_sharding_constraint(x, NamedSharding(self.mesh, spec))
        return _conjugate(NamedSharding(self.mesh, spec), NamedSharding(self.mesh, back))(x)

    def _gather_layer(self, layer: Any) -> Any:
        """Under ZeRO-3, ``layer`` with its parameters constrained to their layouts without
        the data axis: one all-gather each where the layer starts (inside a checkpointed
        layer, again where the backward pass recomputes it), and, transposed, one
        reduce-scatter of each gradient into its shard."""
        if self.plan.zero < 3:
            return layer
        params = dict(layer.named_parameters())
        zero = self.plan.zero_axis
        whole = {n: _named(self.mesh, self.plan.gathered_spec(n, np.ndim(p)), np.shape(p), zero)
                 for n, p in params.items()}
        split = {n: _named(self.mesh, self.plan.grad_spec(n, np.ndim(p)), np.shape(p), zero)
                 for n, p in params.items()}

        def constrain(values: dict[str, Any], shardings: dict[str, NamedSharding]
                      ) -> dict[str, Any]:
            return {n: with_sharding_constraint(v, shardings[n]) for n, v in values.items()}

        # Gathered going forward, but the cotangent goes back to the shard (a reduce-scatter):
        # the constraint's own transpose would ask for the whole gradient (an all-reduce).
        @custom_vjp
        def gather(values: dict[str, Any]) -> dict[str, Any]:
            return constrain(values, whole)
        gather.defvjp(lambda values: (constrain(values, whole), None),
                      lambda _, cts: (constrain(cts, split),))
        return layer.replace(gather(params))


def _gathers_recomputed(prim: Any, *avals: Any, **params: Any) -> bool:
    """The checkpoint policy of a ZeRO-3 layer: everything is saved but what gathers its
    parameters (the custom derivative around their layout constraints)."""
    return prim.name not in ("custom_vjp_call", "sharding_constraint")


@functools.lru_cache(maxsize=64)
def _conjugate(forward: NamedSharding, backward: NamedSharding) -> Any:
    """The identity laying its value out as ``forward`` and its gradient as ``backward``.
    Under sequence parallelism a norm's output is gathered (``forward`` whole, ``backward``
    split by sequence: the partial sums of the column-split projections' input gradients are
    reduce-scattered, not all-reduced) and a block's output is reduce-scattered (``backward``
    whole: its gradient is gathered once before the row-split projection's backward, which
    otherwise, with a sequence-split gradient meeting a column-split weight, gathers the
    weight and moves the intermediate activations' gradients with all-to-alls). Cached, so a
    point traced again reuses one function (and jit's cache key)."""
    @custom_vjp
    def conjugate(x: Any) -> Any:
        return with_sharding_constraint(x, forward)
    conjugate.defvjp(lambda x: (with_sharding_constraint(x, forward), None),
                     lambda _, ct: (with_sharding_constraint(ct, backward),))
    return conjugate


def fit(mesh: Mesh, spec: PartitionSpec, shape: tuple[int, ...], zero_axis: str | None = None
        ) -> tuple[PartitionSpec, list[str]]:
    """``spec`` made to fit ``shape`` on ``mesh``, and notes saying what changed: the plans'
    one policy for sizes that do not divide.

    An axis whose split does not divide its dimension is left out of it: the dimension stays
    whole over that axis (a vocabulary of 259 over ``tp=2`` keeps the embedding and the head
    replicated over ``tp``; its lookup and cross-entropy are then computed whole). The ZeRO
    axis ``zero_axis`` moves instead to the first dimension, from the left, that it divides
    (after the splits kept there), else that value is replicated over it: ZeRO still saves
    memory on every parameter it can split. Megatron pads the vocabulary to a multiple of
    ``tp`` instead; that changes the model's shapes (the logits' width, checkpoints), and
    the partitioner keeps every per-device shape unpadded (decision 0023).
    """
    entries = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec]
    entries += [()] * (len(shape) - len(entries))
    notes, moving = [], []
    for dim, axes in enumerate(entries):
        kept: list[str] = []
        for a in axes:
            if shape[dim] % _size(mesh, (*kept, a)) == 0:
                kept.append(a)
            elif a == zero_axis:
                moving.append(dim)
            else:
                notes.append(f"dimension {dim} of size {shape[dim]} stays whole over mesh axis "
                             f"{a!r} (size {mesh.shape[a]}): it does not divide")
        entries[dim] = tuple(kept)
    for first in moving:
        dim = next((d for d, n in enumerate(shape)
                    if n % _size(mesh, (*entries[d], zero_axis)) == 0), None)
        size = mesh.shape[zero_axis]
        if dim is None:
            notes.append(f"ZeRO leaves it replicated over mesh axis {zero_axis!r} (size {size}): "
                         f"no dimension divides")
        else:
            entries[dim] = (*entries[dim], zero_axis)
            notes.append(f"ZeRO splits dimension {dim} over mesh axis {zero_axis!r} (size "
                         f"{size}): dimension {first} of size {shape[first]} does not divide")
    return PartitionSpec(*(None if not e else e[0] if len(e) == 1 else e for e in entries)), notes


def _size(mesh: Mesh, axes: Sequence[str]) -> int:
    return int(np.prod([mesh.shape[a] for a in axes]))


def _named(mesh: Mesh, spec: PartitionSpec, shape: tuple[int, ...], zero_axis: str | None
           ) -> NamedSharding:
    return NamedSharding(mesh, fit(mesh, spec, shape, zero_axis)[0])


def _misfit(mesh: Mesh, spec: PartitionSpec, shape: tuple[int, ...]
            ) -> tuple[int, tuple[str, ...], int] | None:
    """The first dimension of ``shape`` that ``spec`` cannot split evenly over ``mesh``: the
    dimension, its mesh axes and their size; None when every dimension divides."""
    for dim, entry in enumerate(spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        size = int(np.prod([mesh.shape[a] for a in axes]))
        if shape[dim] % size:
            return dim, axes, size
    return None


def shard(model: Any, mesh: Mesh, plan: Plan) -> Any:
    """Place ``model``'s parameters on ``mesh`` as ``plan`` says (``device_put``), and let its
    named activation points follow the plan. In place; returns the model."""
    shardings = plan.param_shardings(model, mesh)
    placed: dict[int, tuple[str, Any]] = {}
    for name, value in model.state_dict().items():  # a tied array once, by its first name
        if id(value) not in placed:
            placed[id(value)] = (name, device_put(value, shardings[name]))
    model.update(dict(placed.values()))
    model.activation_sharding = plan.annotator(mesh)
    return model


def llama(dp: str | None = None, tp: str | None = None, zero: int = 0, sp: bool = False
          ) -> Plan:
    """The standard plans for the built-in Llama (``ember.models.llama``).

    - ``dp``: the batch is split over this mesh axis, parameters replicated; gradients are
      summed over it. ``zero=1``: AdamW's moments split over it; ``zero=2``: gradients too
      (reduce-scattered); ``zero=3``: parameters too (gathered where used, per layer).
    - ``tp`` (Megatron's layout; weights are ``[out, in]``): q/k/v and gate/up split by output
      rows, o_proj and down_proj by input columns, so each block's forward has one all-reduce
      after attention and one after the MLP. LoRA adapters follow their base layer (the
      ``B`` of a column-split layer is split by rows, the ``A`` of a row-split one by
      columns). The embedding table and the head (one parameter when tied) are split by
      vocabulary rows (Megatron's vocabulary-parallel embedding and cross-entropy): the
      lookup is a masked partial sum, all-reduced once (reduce-scattered under ``sp``), and
      the loss all-reduces three ``[batch, length]`` statistics (the maximum, the sum of
      exponentials, the target's logit), never the logits. A vocabulary that does not
      divide keeps them replicated over ``tp`` (:func:`fit`; :meth:`Plan.describe` says so).
    - ``sp=True`` (with ``tp``): the residual stream and the norms split by sequence over
      ``tp``; the all-reduces become a reduce-scatter after each block half and an
      all-gather before the next column-split projection.
    """
    if sp and tp is None:
        raise PlanError("plans.llama: sequence parallelism (sp=True) splits the sequence over "
                        "the tensor-parallel axis; give tp")
    if zero and dp is None:
        raise PlanError(f"plans.llama: ZeRO stage {zero} splits over the data-parallel axis; "
                        f"give dp")
    name = "plans.llama(" + ", ".join(
        f"{k}={v!r}" for k, v in (("dp", dp), ("tp", tp), ("zero", zero), ("sp", sp)) if v) + ")"
    params: tuple[tuple[str, Layout], ...] = ()
    requires: tuple[tuple[str, str], ...] = ()
    if tp is not None:
        column = "*self_attn.[qkv]_proj.", "*mlp.gate_proj.", "*mlp.up_proj."
        row = "*self_attn.o_proj.", "*mlp.down_proj."
        by_rows = ("weight", (tp, None)), ("bias", (tp,)), ("lora_B", (tp, None))
        by_columns = ("weight", (None, tp)), ("lora_A", (None, tp))
        vocabulary = ("model.embed_tokens.weight", (tp, None)), ("lm_head.weight", (tp, None))
        params = (*((p + s, lay) for p in column for s, lay in by_rows),
                  *((p + s, lay) for p in row for s, lay in by_columns), *vocabulary)
        requires = (("num_attention_heads", tp), ("num_key_value_heads", tp))
    residual: Layout = (dp, tp if sp else None, None)
    whole: Layout = (dp, None, None)
    activations = (("residual", residual), ("embed_out", residual), ("attn_out", residual),
                   ("mlp_out", residual), ("norm_out", whole))
    # Megatron-SP's conjugate pairs: an all-gather forward is a reduce-scatter backward and
    # the reverse, so sequence parallelism moves tp's bytes.
    cotangents = (("embed_out", whole), ("attn_out", whole), ("mlp_out", whole),
                  ("norm_out", residual)) if sp else ()
    return Plan(name, params, zero, dp, (dp, None), activations, cotangents, requires)


_PLAN_KEYS = {"dp": "data-parallel size", "tp": "tensor-parallel size", "zero": "ZeRO stage 0-3",
              "sp": "sequence parallelism 0/1"}


def parse(text: str, devices: Sequence[Any]) -> tuple[Mesh, Plan] | None:
    """A Llama plan written as ``"dp=2,tp=2,zero=1,sp=1"`` (the ``ember train --plan`` syntax)
    over ``devices``: the mesh (axes ``dp`` and ``tp``, those of size 1 left out) and the
    plan, or None when both sizes are 1 (one device, nothing to shard). Unnamed sizes are 1;
    ``dp x tp`` must be the number of devices, so a plan never silently leaves devices idle.
    Errors name the part of ``text`` at fault."""
    values: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, eq, value = (s.strip() for s in part.partition("="))
        if key not in _PLAN_KEYS:
            raise PlanError(f"plan {text!r}: unknown key {key!r} in {part!r}; the keys are "
                            + ", ".join(f"{k} ({what})" for k, what in _PLAN_KEYS.items()))
        if not eq or not value.isdigit() or (key in ("dp", "tp") and int(value) < 1):
            raise PlanError(f"plan {text!r}: {part!r} needs a whole number"
                            + (" of at least 1" if key in ("dp", "tp") else ""))
        if key in values:
            raise PlanError(f"plan {text!r}: {key} is given twice")
        values[key] = int(value)
    for key, top in (("zero", 3), ("sp", 1)):
        if values.get(key, 0) > top:
            raise PlanError(f"plan {text!r}: {key} is 0 to {top}, got {values[key]}")
    sizes = {axis: values.get(axis, 1) for axis in ("dp", "tp")}
    if sizes["dp"] * sizes["tp"] != len(devices):
        raise PlanError(f"plan {text!r}: dp x tp = {sizes['dp']} x {sizes['tp']} = "
                        f"{sizes['dp'] * sizes['tp']} devices, but the job has {len(devices)} "
                        f"(--devices / EMBER_CPU_DEVICES); the sizes must multiply to the "
                        f"device count")
    axes = {axis: size for axis, size in sizes.items() if size > 1}
    if not axes:
        return None
    mesh = Mesh(list(devices), tuple(axes), shape=tuple(axes.values()))
    plan = llama(dp="dp" if "dp" in axes else None, tp="tp" if "tp" in axes else None,
                 zero=values.get("zero", 0), sp=bool(values.get("sp", 0)))
    return mesh, plan
