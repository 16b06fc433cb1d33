"""C kernels of fused equations (ember.backends.cpu.kernels) against the NumPy reference.

Every kernel of every case is compiled in one translation unit (one compiler start for the
module; the hypothesis tests build one per batch of graphs), then each kernel runs on the inputs
the NumPy reference gave its fused equation and its outputs are compared with the reference's:

- ``exact``: bitwise (``+ - * /``, max/min, select, comparisons, casts, movement, sqrt, and
  bfloat16/float16 rounded after every operation as the reference rounds);
- ``ulp``: C library functions (tanh, sin...) and ember's exp against NumPy's own: a few ulps
  (8 allowed; measured against NumPy on float32: exp 2 (NumPy's own is 2.3 from the true
  value, ember's 0.90), log 6, sin/cos 2, tanh 1);
- ``sum``: sums in another order than NumPy's pairwise summation: the rounding of the sum.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import subprocess
import tempfile

import numpy as np
import pytest
from helpers import jit_batched
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fusion import random_programs

import ember
import ember.nn.functional as F
import ember.numpy as enp
from ember import dtypes
from ember.backends import get_backend
from ember.backends.cpu import kernels, toolchain
from ember.compiler import loops
from ember.compiler.fusion import fuse, fused_equations
from ember.ir.graph import Literal
from ember.ops import reduce, structural
from ember.optim import AdamW
from ember.tree import tree_leaves

# Rendering needs no compiler; compiling and running kernels does.
needs_cc = pytest.mark.skipif(not toolchain.available(), reason="no C compiler found")


def rand(*shape, dtype=np.float32, seed=0, scale=1.0):
    x = np.random.default_rng(seed).standard_normal(shape) * scale
    return enp.asarray(x.astype(dtype))


# --- running kernels -------------------------------------------------------------------------

class Program:
    """A function's fused graph, the NumPy reference's value of every var, and the kernels of
    its fused equations (None where ``render`` declined)."""

    def __init__(self, fn, args):
        self.lowered = ember.jit(fn).lower(*args)
        self.graph = fuse(self.lowered.graph)
        self.leaves = [np.asarray(x) for x in tree_leaves((args, {}))]
        self.env = _interpret(self.graph, self.leaves)
        self.eqns = fused_equations(self.graph)
        self.kernels = [kernels.render(e) for e in self.eqns]

    def check(self, lib, how: str) -> int:
        """Run every rendered kernel on the reference inputs; compare; count the kernels."""
        for eqn, kernel in zip(self.eqns, self.kernels):
            if kernel is None:
                continue
            ins = [np.asarray(a.value if isinstance(a, Literal) else self.env[a.id])
                   for a in eqn.inputs]
            # Also with each output the plan may store over an input in that input's buffer.
            eps = _least_precise(eqn)
            for in_place in {(), kernel.in_place}:
                got = call(lib, kernel, eqn, ins, in_place)
                for v, g in zip(eqn.outputs, got):
                    compare(self.env[v.id], g, how,
                            f"{eqn.params['name']} in place {in_place}\n{kernel.source}", eps)
        return sum(k is not None for k in self.kernels)


    def run(self, lib) -> list[np.ndarray]:
        """The graph's outputs with every fused equation run by its kernel."""
        by_eqn = {id(e): k for e, k in zip(self.eqns, self.kernels)}
        env = _interpret(self.graph, self.leaves, lambda e, ins: call(lib, by_eqn[id(e)], e, ins)
                         if by_eqn.get(id(e)) else None)
        return [np.asarray(a.value if isinstance(a, Literal) else env[a.id])
                for a in self.graph.graph.outvars]


def _interpret(closed, leaves, kernel=lambda eqn, ins: None):
    """Every var's value, running the equations in order on the NumPy backend (or through
    ``kernel(eqn, inputs)`` where that returns the outputs)."""
    backend = get_backend("numpy")
    env = {v.id: np.asarray(c) for v, c in zip(closed.graph.constvars, closed.consts)}
    env.update((v.id, x) for v, x in zip(closed.graph.invars, leaves))
    for eqn in closed.graph.eqns:
        args = [a.value if isinstance(a, Literal) else env[a.id] for a in eqn.inputs]
        out = kernel(eqn, args)
        if out is None:
            out = backend.run_primitive(eqn.prim, args, eqn.params)
        for v, o in zip(eqn.outputs, out if eqn.prim.multiple_results else [out]):
            env[v.id] = np.asarray(o, dtype=v.aval.dtype)
    return env


def call(lib, kernel, eqn, inputs, in_place=()):
    """Call a kernel: ``args`` are the outputs, then the inputs, as contiguous buffers (private
    copies); each ``(output, input)`` pair of ``in_place`` shares the input's buffer."""
    ins = [np.array(x, dtype=v.aval.dtype, order="C") for x, v in zip(inputs, eqn.inputs)]
    outs = [np.full(v.aval.shape, 7, dtype=v.aval.dtype) for v in eqn.outputs]
    for k, j in in_place:
        outs[k] = ins[j]
    pointers = (ctypes.c_void_p * (len(outs) + len(ins)))(
        *[a.ctypes.data for a in [*outs, *ins]])
    getattr(lib, kernel.name)(pointers)
    return outs


def _eps(dtype) -> float:
    return float(np.finfo(dtype).eps) if dtype != dtypes.bfloat16 else 2.0 ** -7


def _least_precise(eqn) -> float | None:
    """The unit roundoff of the least precise float type a fused equation's values pass
    through (a float32 logistic converted to float64 carries float32's rounding)."""
    body = eqn.params["body"].graph
    values = [*eqn.inputs, *eqn.outputs, *(o for e in body.eqns for o in e.outputs)]
    floats = [_eps(v.aval.dtype) for v in values if dtypes.is_float(v.aval.dtype)]
    return max(floats, default=None)


def compare(want, got, how: str, what: str, eps: float | None = None) -> None:
    """``eps``: the unit roundoff of the least precise type the values passed through (by
    default the result's)."""
    want, got = np.asarray(want), np.asarray(got)
    assert want.shape == got.shape and want.dtype == got.dtype, what
    if how == "exact" or not dtypes.is_float(want.dtype):
        assert want.tobytes() == got.tobytes(), f"not bitwise equal: {what}"
        return
    w, g = want.astype(np.float64), got.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(w), np.isnan(g), err_msg=what)
    eps = eps or _eps(want.dtype)
    if how == "ulp":  # a few ulps of each value (glibc's vector maths against NumPy's)
        tol = 8 * eps * np.abs(w) + np.finfo(np.float32).tiny
    else:  # a reordered sum: its rounding, relative to the values' magnitude
        tol = 64 * eps * max(1.0, float(np.max(np.abs(w[~np.isnan(w)]), initial=0)))
    ok = np.isnan(w) | (np.abs(w - g) <= tol) | (w == g)
    assert ok.all(), f"max error {np.nanmax(np.abs(w - g))}: {what}"


# --- cases -----------------------------------------------------------------------------------

def _pad_mix(x):
    return enp.pad(enp.flip(x, 1), [(1, 0), (2, 3)], constant_values=-1.5)


def _softmax_of_computed(x):  # a computed value read by two row loops: kept in scratch
    return F.softmax(x * 2.0 + 1.0)


CASES = {
    # name: (function, arguments, how)
    "arith_broadcast": (lambda x, y: (x + y) * (x - y) / (y * y + 1.0),
                        (rand(4, 1, 8), rand(3, 8, seed=1)), "exact"),
    "max_min_select_compare": (lambda x, y: enp.where(x > y, enp.maximum(x, y * 0.5),
                                                      enp.minimum(x, -y)),
                               (rand(5, 7), rand(5, 7, seed=1)), "exact"),
    "nan_propagation": (lambda x, y: enp.maximum(x, y) + enp.minimum(y, x),
                        (enp.asarray(np.array([np.nan, 1, -2, np.nan], np.float32)),
                         enp.asarray(np.array([0, np.nan, 3, np.nan], np.float32))), "exact"),
    "casts": (lambda x: (x.astype(enp.int32) + 3, (x * 5).astype(enp.int8),
                         x.astype(enp.bfloat16).astype(enp.float32) + x,
                         x.astype(enp.float16), (x > 0).astype(enp.float32),
                         x.astype(enp.float64) * 3.0),
              (rand(6, 9, scale=4.0),), "exact"),
    "int_wraparound": (lambda a, b: (a * b + a, a - b, -a, a.sum(axis=-1), enp.abs(b)),
                       (enp.asarray(np.array([[2**30, -2**31, 7], [5, 2**31 - 1, -3]],
                                              np.int32)),
                        enp.asarray(np.array([[4, 3, -2**31], [2**30, 9, 11]], np.int32))),
                       "exact"),
    "bool_logic": (lambda a, b: ((a & b) | ~a ^ (a == b), a.any(axis=-1), b.all(axis=0)),
                   (enp.asarray(np.arange(12).reshape(3, 4) % 3 == 0),
                    enp.asarray(np.arange(12).reshape(3, 4) % 2 == 0)), "exact"),
    "bfloat16_rounds_per_op": (lambda x, y: (x * y + x) / (y - 0.75) * x,
                               (rand(8, 33, dtype=dtypes.bfloat16),
                                rand(8, 33, dtype=dtypes.bfloat16, seed=1)), "exact"),
    "float16_rounds_per_op": (lambda x, y: enp.sqrt(enp.abs(x * y + x)) - y / (x * x + 1.0),
                              (rand(8, 33, dtype=np.float16),
                               rand(8, 33, dtype=np.float16, seed=1)), "exact"),
    "float64": (lambda x, y: (x * y - x / (y * y + 1.0), enp.sqrt(enp.abs(x))),
                (rand(7, 5, dtype=np.float64), rand(7, 5, dtype=np.float64, seed=1)),
                "exact"),
    "transpose_reshape_slice": (lambda x: (x.T[1:7:2] * 2.0).reshape(3, 2, 5) + 1.0,
                                (rand(10, 8),), "exact"),
    "pad_flip_concatenate": (lambda x, y: enp.concatenate([_pad_mix(x), y * 3.0], axis=0),
                             (rand(4, 5), rand(2, 10, seed=1)), "exact"),
    "interior_pad": (lambda x: structural.pad(x, enp.asarray(np.float32(0.5)), (2, -1),
                                              (-1, 2), (1, 2)) * 2.0,
                     (rand(4, 5),), "exact"),
    "iota": (lambda x: x * enp.arange(9, dtype=enp.float32) + enp.arange(9)[:, None],
             (rand(9, 9),), "exact"),
    "rotate_half": (F.apply_rotary, (rand(2, 4, 8, 16), rand(8, 8, seed=1),
                                     rand(8, 8, seed=2)), "exact"),
    "max_over_rows": (lambda x: (x.max(axis=-1), x.min(axis=(1, 2)), x.max(axis=0)),
                      (rand(4, 6, 35),), "exact"),
    "nan_wins_a_max": (lambda x: (x.max(axis=-1), x.min(axis=-1)),
                       (enp.asarray(np.where(np.arange(40).reshape(4, 10) % 7 == 3, np.nan,
                                             np.arange(40.0).reshape(4, 10))
                                    .astype(np.float32)),), "sum"),
    "big_parallel_map": (lambda x, y: x * y + y, (rand(256, 300), rand(300, seed=1)),
                         "exact"),
    "reduce_over_no_axes": (lambda x: (reduce.reduce_sum_p.bind(x * 2.0, axes=()),
                                       reduce.reduce_max.prim.bind(x.T, axes=()) - x.T),
                            (rand(3, 4),), "exact"),
    "zero_size": (lambda x: (x * 2.0, x.sum(axis=0), enp.concatenate([x, x], axis=1)),
                  (rand(0, 5),), "exact"),
    "scalars": (lambda x, y: (x * y + 1.0, enp.maximum(x, y)),
                (rand(), rand(seed=1)), "exact"),
    "transcendental": (lambda x: (enp.exp(x), enp.tanh(x), enp.sin(x), enp.log(enp.abs(x)),
                                  F.sigmoid(x), enp.log1p(enp.abs(x)), x ** 1.5),
                       (rand(7, 31, scale=3.0),), "ulp"),
    "erf_without_exp": (lambda x: enp.special.erf(enp.clip(x, -1.0, 1.0) * 0.9),
                        (rand(9, 33, scale=2.0),), "exact"),
    "erf": (lambda x: enp.special.erf(x) * 1.0, (rand(9, 33, scale=2.0),), "ulp"),
    # 1 + erf(x) cancels for negative x: an ulp of erf near -1 is many of the result's.
    "exact_gelu": (lambda x: F.gelu(x), (rand(9, 33, scale=2.0),), "sum"),
    "erf_bfloat16_and_float64": (lambda x, y: (enp.special.erf(x), enp.special.erf(y)),
                                 (rand(9, 33, dtype=dtypes.bfloat16, scale=2.0),
                                  rand(64, dtype=np.float64, scale=3.0)), "ulp"),
    "transcendental_bfloat16": (lambda x: (enp.exp(x), F.sigmoid(x), enp.tanh(x)),
                                (rand(7, 31, dtype=dtypes.bfloat16, scale=3.0),), "ulp"),
    "sums": (lambda x: (x.sum(axis=-1), x.sum(axis=0), x.mean(axis=(1, 2)),
                        (x * x).sum(axis=-1, keepdims=True) * x),
             (rand(5, 6, 70),), "sum"),
    "norm_weight_grad": (lambda x, g: ((x * g).sum(axis=(0, 1)), x * g + 1.0),
                         (rand(4, 64, 96), rand(4, 64, 96, seed=1)), "sum"),
    # Big enough to run in parallel: column blocks times chunks of rows, combined after.
    "column_sums_in_chunks": (lambda x, g: ((x * g).sum(axis=(0, 1)), x.max(axis=(0, 1)),
                                            (x * g).astype(enp.bfloat16).sum(axis=(0, 1)),
                                            x * g + 1.0),
                              (enp.asarray(np.where(np.arange(300) == 5, np.nan,
                                                    np.asarray(rand(8, 128, 300)))),
                               rand(8, 128, 300, seed=1)), "sum"),
    # A gradient's sum of squares for clipping, a max with a NaN: chunks of rows, combined.
    "whole_reductions_in_chunks": (lambda t, x, y: (t + (x * x).sum(), y.max(), x.min(),
                                                    x.astype(enp.bfloat16).sum()),
                                   (rand(), rand(300, 400, seed=1),
                                    enp.asarray(np.where(np.arange(400) == 7, np.nan,
                                                         np.asarray(rand(300, 400))))),
                                   "sum"),
    "rms_norm": (lambda x, w: F.rms_norm(x, w), (rand(4, 16, 64), rand(64, seed=1)), "sum"),
    "rms_norm_bfloat16": (lambda x, w: F.rms_norm(x, w),
                          (rand(4, 16, 64, dtype=dtypes.bfloat16),
                           rand(64, dtype=dtypes.bfloat16, seed=1)), "sum"),
    "softmax": (lambda x: F.softmax(x), (rand(3, 5, 37, scale=3.0),), "sum"),
    "softmax_big_rows": (lambda x: F.softmax(x), (rand(128, 512, scale=3.0),), "sum"),
    "softmax_of_computed": (_softmax_of_computed, (rand(6, 40),), "sum"),
    "log_softmax": (lambda x: F.log_softmax(x), (rand(6, 50, scale=3.0),), "sum"),
    "cross_entropy": (lambda x, t: F.cross_entropy(x, t),
                      (rand(8, 50, scale=3.0), enp.asarray(np.arange(8) * 7 % 50)), "sum"),
    # One row loop stores p, then reads c for q: p may not be stored over c (the sum of p's
    # rows keeps the two in one loop).
    "row_loop_reads_after_a_store": (lambda a, b, c: (p := a * (a + b), p.sum(axis=-1),
                                                      (a + b) * c),
                                     (rand(6, 7), rand(6, 7, seed=1), rand(6, 7, seed=2)),
                                     "sum"),
    "swiglu": (lambda g, u: F.silu(g) * u, (rand(4, 64, scale=2.0), rand(4, 64, seed=1)),
               "ulp"),
}


def _adamw_case():
    params = {"w": rand(16, 8), "b": rand(8, seed=1)}
    grads = {"w": rand(16, 8, seed=2), "b": rand(8, seed=3)}
    opt = AdamW(1e-2)
    state = opt.update(params, grads, opt.init(params))[1]
    return opt.update, (params, grads, state), "ulp"


def _llama_cases():
    from tiny_models import tiny_model

    model = tiny_model(64)
    ids = enp.asarray(np.arange(16).reshape(2, 8) * 5 % 64)

    def loss(m, ids):
        return F.cross_entropy(m(ids)[:, :-1], ids[:, 1:])

    half = tiny_model(64).astype(enp.bfloat16)  # astype casts in place: a model of its own
    return {"llama_forward": (lambda m, ids: m(ids), (model, ids), "sum"),
            "llama_forward_bfloat16": (lambda m, ids: m(ids), (half, ids), "sum"),
            "llama_value_and_grad": (ember.value_and_grad(loss), (model, ids), "sum")}


@pytest.fixture(scope="module")
def programs():
    cases = {**CASES, "adamw": _adamw_case(), **_llama_cases()}
    return {name: (Program(fn, args), how) for name, (fn, args, how) in cases.items()}


@pytest.fixture(scope="module")
def compiled(programs):
    """Every case's kernels, built as one translation unit."""
    source = kernels.translation_unit(k for p, _ in programs.values() for k in p.kernels if k)
    return programs, toolchain.build(source)


@needs_cc
@pytest.mark.parametrize("name", [*CASES, "adamw", "llama_forward", "llama_forward_bfloat16",
                                  "llama_value_and_grad"])
def test_kernels_match_the_numpy_reference(compiled, name):
    programs, lib = compiled
    program, how = programs[name]
    assert program.check(lib, how) == len(program.eqns)  # every group was rendered


@needs_cc
def test_llama_step_with_every_group_compiled_matches_the_reference(compiled):
    programs, lib = compiled
    program, _ = programs["llama_value_and_grad"]
    want = [program.env[a.id] for a in program.graph.graph.outvars]
    got = program.run(lib)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(w).max()))


@needs_cc
def test_adamw_update_runs_in_place_over_its_operands(compiled):
    programs, lib = compiled
    program, _ = programs["adamw"]
    for eqn, kernel in zip(program.eqns, program.kernels):
        if eqn.outputs[0].aval.shape == ():
            continue  # the step's scalars
        assert len(kernel.in_place) == 3  # parameter, exp_avg, exp_avg_sq over their old values
        got = call(lib, kernel, eqn, [program.env[a.id] for a in eqn.inputs], kernel.in_place)
        for v, g in zip(eqn.outputs, got):
            compare(program.env[v.id], g, "ulp", kernel.source)
        assert all(f"*restrict out{k} =" not in kernel.source for k, _ in kernel.in_place)


def test_row_kernels_and_readers_of_other_points_are_not_in_place(programs):
    softmax, _ = programs["softmax_of_computed"]
    assert softmax.kernels[0].in_place == ((0, 0),)  # the output written in the last loop
    transposed, _ = programs["transpose_reshape_slice"]
    assert transposed.kernels[0].in_place == ()


def test_identical_groups_share_one_kernel(programs):
    program, _ = programs["llama_forward"]
    names = [k.name for k in program.kernels]
    assert len(set(names)) < len(names)  # the two layers' groups are the same functions
    rms = {k.name for e, k in zip(program.eqns, program.kernels)
           if e.outputs[0].aval.shape == (2, 8, 32) and "reduce_sum" in k.source}
    assert len(rms) <= 2  # the first norm reads the embedding, the others a residual sum


def test_kernel_text_shows_the_loop_structure(programs):
    softmax, _ = programs["softmax_big_rows"]
    (k,) = softmax.kernels
    assert k.source.startswith(f"void {k.name}(void **args)")
    assert "#pragma omp parallel" in k.source and "#pragma omp for" in k.source
    assert k.source.count("for (long r0") == 3  # max, sum of exponentials, normalise
    assert "reduction(+:" in k.source and "double" not in k.source
    small, _ = programs["softmax"]
    assert "#pragma omp parallel" not in small.kernels[0].source
    scratch, _ = programs["softmax_of_computed"]
    assert "malloc" in scratch.kernels[0].source
    sums, _ = programs["sums"]  # the sum over the leading axis runs down columns, in order
    (columns,) = [k for k in sums.kernels if "col_v" in k.source]
    assert "for (long of = lo; of < hi; of++)" in columns.source
    grad, _ = programs["norm_weight_grad"]  # the product and its column sums: one kernel
    assert len(grad.kernels) == 1 and "col_v" in grad.kernels[0].source


@needs_cc
@pytest.mark.parametrize("case", ["column_sums_in_chunks", "whole_reductions_in_chunks"])
def test_reductions_in_chunks_give_the_same_bits_on_any_thread_count(programs, case):
    """A big reduction is cut into chunks fixed by the shape (rows of a column kernel, the
    first row axis of a reduction to one value): partial results per chunk, combined in chunk
    order, whatever the number of threads."""
    program, _ = programs[case]
    chunked = [(e, k) for e, k in zip(program.eqns, program.kernels)
               if int(re.search(r"chunk < (\d+)", k.source + "chunk < 1")[1]) > 1]
    sources = "".join(k.source for _, k in chunked)
    assert len(chunked) >= 2 and "schedule(dynamic, 1)" in sources
    assert "_nan |= part_v" in sources and "ember_round_bf16(" in sources
    lib = toolchain.build(kernels.translation_unit(k for _, k in chunked) + "\n#include <omp.h>"
                          "\nvoid ember_test_threads(int n) { omp_set_num_threads(n); }\n")
    for eqn, kernel in chunked:
        ins = [program.env[a.id] for a in eqn.inputs]
        runs = []
        for threads in (1, 2, 3):
            lib.ember_test_threads(threads)
            runs.append([o.tobytes() for o in call(lib, kernel, eqn, ins)])
        assert runs[0] == runs[1] == runs[2]


def _vectorised_functions(source: str) -> set[str]:
    """The C functions of ``source`` in which gcc vectorised a loop (its -fopt-info report)."""
    cc = toolchain.compiler()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernels.c")
        with open(path, "w") as f:
            f.write(source)
        flags = [f for f in toolchain.FLAGS if f != "-shared"]
        done = subprocess.run([cc.path, *flags, "-S", "-o", os.devnull,
                               "-fopt-info-vec-optimized", path],
                              capture_output=True, text=True, check=True)
    lines = source.splitlines()
    at_line, current = {}, None
    for n, line in enumerate(lines, 1):
        if line.startswith("void "):
            current = line[5:].split("(")[0]
        at_line[n] = current
    return {at_line[int(m)] for m in re.findall(r"kernels\.c:(\d+):\d+: optimized: loop "
                                                 r"vectorized", done.stderr)}


def _is_gcc() -> bool:
    cc = toolchain.compiler()
    return cc is not None and "Free Software Foundation" in subprocess.run(
        [cc.path, "--version"], capture_output=True, text=True).stdout


@pytest.mark.skipif(not _is_gcc(), reason="reads gcc's vectoriser report")
def test_float32_elementwise_kernels_vectorise():
    """Each rule's C lets gcc vectorise the loop (one fminf kept the exact GELU scalar: 4x)."""
    cases = {"gelu": F.gelu, "erf": enp.special.erf, "exp_log": lambda x: enp.log(enp.exp(x)),
             "tanh": enp.tanh, "sigmoid": F.sigmoid, "silu": F.silu,
             "sqrt_abs": lambda x: enp.sqrt(enp.abs(x)),
             "max_min_where": lambda x: enp.where(x > 0, enp.maximum(x, 0.5), enp.minimum(x, -1))}
    rendered = {}
    for name, fn in cases.items():
        (kernel,) = Program(lambda x, fn=fn: fn(x) * 2.0, (rand(64, 256),)).kernels
        rendered[name] = kernel
    vectorised = _vectorised_functions(kernels.translation_unit(rendered.values()))
    assert {n for n, k in rendered.items() if k.name not in vectorised} == set()


def _float32_sweep(lo: float, hi: float, step: int) -> np.ndarray:
    """Every ``step``-th float32 of ``[lo, hi]`` (in bit order, so dense near 0 as floats
    are), with the specials."""
    top = np.arange(0, np.float32(max(abs(lo), hi)).view(np.int32), step, dtype=np.int32)
    x = np.concatenate([top.view(np.float32), -top.view(np.float32)])
    x = x[(x >= lo) & (x <= hi)]
    return np.concatenate([x, np.float32([np.inf, -np.inf, np.nan, 88.7228, 88.7229])])


@needs_cc
def test_exp_is_within_an_ulp_or_so_over_the_whole_float32_range():
    """The polynomial exponential (``ember_expf``, also the attention kernels') against float64
    exp: max ulp error over a dense sweep (measured 0.90; 1.19 without FMA), 0 below 2^-125
    (no subnormals), inf above FLT_MAX, NaN kept; as the vectorised kernel computes it."""
    x = _float32_sweep(-110.0, 90.0, 4099)
    program = Program(enp.exp, (enp.asarray(x),))
    (eqn,), (kernel,) = program.eqns, program.kernels
    assert "ember_expf(" in kernel.source and "simdlen(16)" in kernel.source
    (got,) = call(toolchain.build(kernels.translation_unit([kernel])), kernel, eqn, [x])
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64))
        rounded = want.astype(np.float32)
    normal = np.isfinite(rounded) & (want >= 2.0 ** -125)
    ulps = np.abs(got[normal] - want[normal]) / np.spacing(rounded[normal]).astype(np.float64)
    assert ulps.max() <= 1.25, x[normal][np.argmax(ulps)]
    tiny = want < 2.0 ** -125
    assert np.all((got[tiny] == 0) | (np.abs(got[tiny] - want[tiny]) <= 2.0 ** -149))
    assert np.all(got[np.isinf(rounded) & (want > 1)] == np.inf)
    assert np.isnan(got[np.isnan(x)]).all() and got[x == -np.inf].tolist() == [0.0]
    assert normal.sum() > 100_000 and tiny.any()


def test_render_declines_what_it_has_no_c_for():
    x = rand(3, 4)
    for fn in (lambda x: (x % 2.0) * 2.0,
               lambda x: (x + 1j).real * 2.0,
               lambda x: enp.argmax(x * 2.0, axis=-1)):
        graph = fuse(ember.jit(fn).lower(x).graph)
        rendered = [kernels.render(e) for e in fused_equations(graph)]
        assert None in rendered


def test_c_type_of_each_dtype():
    assert kernels.c_type(np.dtype(np.float32)) == "float"
    assert kernels.c_type(dtypes.bfloat16) == "uint16_t"
    assert kernels.c_type(np.dtype(np.float16)) == "_Float16"
    assert kernels.c_type(np.dtype(np.int64)) == "int64_t"
    assert kernels.c_type(np.dtype(np.bool_)) == "bool"
    assert kernels.c_type(np.dtype(np.complex64)) is None


# --- random graphs ----------------------------------------------------------------------------

def _check_batch(batch, how: str) -> None:
    programs = [Program(fn, inputs) for fn, inputs in batch]
    for p in programs:
        assert all(k is not None for k in p.kernels), "a group was not rendered"
    lib = toolchain.build(kernels.translation_unit(k for p in programs for k in p.kernels))
    for p in programs:
        p.check(lib, how)


@needs_cc
@settings(max_examples=3, deadline=None)
@given(st.lists(random_programs(exact=True), min_size=15, max_size=15))
def test_random_graphs_compile_and_match_bitwise(batch):
    _check_batch(batch, "exact")


@needs_cc
@settings(max_examples=2, deadline=None)
@given(st.lists(random_programs(), min_size=15, max_size=15))
def test_random_graphs_with_libm_and_sums_compile_and_match(batch):
    _check_batch(batch, "sum")


@needs_cc
@pytest.mark.parametrize("how", ["exact", "sum"])
@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_random_graphs_as_one_program_match_the_numpy_backend(how, data):
    """Whole programs (memory plan, in-place kernels, segments), not kernel by kernel: a batch
    of graphs as one cpu program against the same batch jitted on the NumPy backend."""
    batch = data.draw(st.lists(random_programs(exact=how == "exact"), min_size=15,
                               max_size=15))
    got, want = jit_batched(batch), jit_batched(batch, backend="numpy")
    for (fn, inputs), g, w in zip(batch, got, want, strict=True):
        graph = ember.jit(fn).lower(*inputs).graph.graph
        # A sum rounded in float16, then cast to float32, differs in float16's last bits.
        eps = max(_eps(v.aval.dtype) for v in [*graph.invars, *graph.outvars,
                                               *(o for e in graph.eqns for o in e.outputs)]
                  if dtypes.is_float(v.aval.dtype))
        for a, b in zip(tree_leaves(g), tree_leaves(w), strict=True):
            compare(np.asarray(b), np.asarray(a), how, str(graph), eps)


# --- merged axes: loops without division ------------------------------------------------------

@st.composite
def merged_views(draw):
    """An array transposed and some neighbouring axes of the result merged (as attention's
    output goes back to [batch, seq, heads*dim]), scaled, and maybe reduced along the first or
    last merged axis: ``(function, inputs)``."""
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4, 6]), min_size=rank,
                                max_size=rank)))
    perm = tuple(draw(st.permutations(range(rank))))
    moved = [shape[p] for p in perm]
    cuts = sorted(draw(st.sets(st.integers(1, rank - 1))))  # where merged runs end
    merged = tuple(math.prod(moved[a:b]) for a, b in zip((0, *cuts), (*cuts, rank)))
    axis = draw(st.sampled_from([None, 0, -1]))

    def fn(x):
        y = enp.transpose(x, perm).reshape(merged) * 2.0
        return y if axis is None else (y, y.max(axis=axis))

    return fn, (rand(*shape, seed=draw(st.integers(0, 2**16))),)


@needs_cc
@settings(max_examples=3, deadline=None)
@given(st.lists(merged_views(), min_size=15, max_size=15))
def test_merged_axes_run_as_loops_without_division(batch):
    """Every loop over merged axes is split back into the axes it merged: no index divides,
    and the results stay bitwise those of the reference."""
    for fn, inputs in batch:
        for eqn in fused_equations(Program(fn, inputs).graph):
            assert loops.describe(eqn).divisions() == []
    _check_batch(batch, "exact")


def test_attention_output_moves_in_contiguous_runs():
    """[1, 9, 512, 64] -> [1, 512, 576]: a loop of 9 heads around a vectorised loop of 64."""
    program = Program(lambda x: enp.transpose(x, (0, 2, 1, 3)).reshape(1, 512, 576),
                      (rand(1, 9, 512, 64),))
    (eqn,) = program.eqns
    nest = loops.describe(eqn)
    assert nest.outer == (1, 512, 9, 64) and nest.divisions() == []
    (kernel,) = program.kernels
    assert "in0[o2*32768 + o1*64 + o3]" in kernel.source
    assert "#pragma omp simd\n    for (long o3 = 0; o3 < 64; o3++)" in kernel.source
