"""Eager per-operation overhead and a jit-compiled MLP training step, ember beside its peers.

Run it from the repository root (ember importable, torch installed; threadpoolctl optional):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/overhead.py

Some machines here set ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` so that old OpenBLAS builds stay
correct; they make a current NumPy pick a slower GEMM kernel, which would understate the peak and
ember's NumPy backend alike. Unset both for benchmarking only (never in tests or CI); the script
prints which kernel NumPy's BLAS uses when threadpoolctl is installed.

Four parts, each measured in one process so the ratios compare like with like (targets.md):

1. Eager overhead: microseconds per call of small operations on 8x8 float32 arrays, for ember,
   NumPy and PyTorch, with the ratios ember/numpy and ember/torch. At this size the time is all
   dispatch, so this measures the cost of ember's Python layers (``bind`` -> ``eval_primitive``
   -> ``backend.run_primitive``) on top of the NumPy call they end in.
2. Peak: float32 GEMM 2048x2048 with NumPy (the hardware reference) and with PyTorch.
3. MLP: a training step (2 hidden layers of 256, tanh, softmax cross-entropy, batch 64, float32,
   plain SGD written functionally over a dict of parameters) compiled with ``ember.jit`` against
   the same step in PyTorch eager (``torch.set_num_threads(2)``): steps/s, the ratio, and the
   fraction of the measured GEMM peak reached, counting the exact matmul FLOPs of a step. Also
   the forward pass, ember jit against ember eager.
4. Exact GELU (``erf``) of a 256x1024 float32 array: ember jit against PyTorch eager.

Timings are the minimum over repeats (``timeit``), the least noisy statistic on a shared machine.
The whole run takes well under two minutes.
"""

from __future__ import annotations

import os
import platform
import sys
import timeit

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ember  # noqa: E402
import ember.numpy as enp  # noqa: E402

try:
    import torch
except ImportError:  # the benchmark still reports ember against NumPy
    torch = None
else:
    torch.set_num_threads(2)  # the machines this project is measured on have 2 cores

REPEATS = 5
TARGET_S = 0.05  # each timed repeat runs about this long


def per_call_s(fn, repeats: int = REPEATS, target_s: float = TARGET_S) -> float:
    """Seconds per call of ``fn()``: min over repeats of a loop sized to about ``target_s``."""
    timer = timeit.Timer(fn)
    number = 1
    while True:
        t = timer.timeit(number)
        if t >= target_s / 5 or number >= 1 << 20:
            break
        number *= 4
    number = max(1, int(number * target_s / max(t, 1e-9)))
    return min(timer.repeat(repeat=repeats, number=number)) / number


# --- environment -------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment() -> None:
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores visible")
    versions = (f"python {platform.python_version()}, numpy {np.__version__}, "
                f"ember {ember.__version__}")
    if torch is not None:
        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(versions)
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        print("numpy BLAS: unknown (pip install threadpoolctl to show the kernel in use)")
    else:
        for lib in threadpool_info():
            if lib.get("user_api") == "blas":
                print(f"numpy BLAS: {lib.get('internal_api')} {lib.get('version')}, kernel "
                      f"{lib.get('architecture')}, {lib.get('num_threads')} threads")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"warning: {var}={os.environ[var]} is set; NumPy's GEMM may use a slower "
                  f"kernel. Run with: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python "
                  f"benchmarks/overhead.py")


# --- 1. eager overhead ---------------------------------------------------------------------

def eager_overhead() -> None:
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((8, 8)).astype(np.float32)
    b_np = rng.standard_normal((8, 8)).astype(np.float32)
    a_em, b_em = enp.asarray(a_np), enp.asarray(b_np)
    libs = {"ember": (a_em, b_em, enp.tanh), "numpy": (a_np, b_np, np.tanh)}
    if torch is not None:
        libs["torch"] = (torch.from_numpy(a_np.copy()), torch.from_numpy(b_np.copy()), torch.tanh)

    ops = {
        "add a+b": lambda a, b, tanh: a + b,
        "multiply a*b": lambda a, b, tanh: a * b,
        "tanh(a)": lambda a, b, tanh: tanh(a),
        "a.sum()": lambda a, b, tanh: a.sum(),
        "matmul 8x8 a@b": lambda a, b, tanh: a @ b,
        "index a[1:3]": lambda a, b, tanh: a[1:3],
        "reshape(4, 16)": lambda a, b, tanh: a.reshape(4, 16),
    }
    names = list(libs)
    header = f"{'operation (8x8 float32)':<26}" + "".join(f"{n + ' us':>11}" for n in names)
    header += f"{'ember/numpy':>13}" + (f"{'ember/torch':>13}" if "torch" in libs else "")
    print("\n== 1. eager per-operation overhead (microseconds per call, min of "
          f"{REPEATS} repeats) ==")
    print(header)
    for label, op in ops.items():
        us = {}
        for name, (a, b, tanh) in libs.items():
            op(a, b, tanh)  # warm up
            us[name] = per_call_s(lambda a=a, b=b, tanh=tanh, op=op: op(a, b, tanh)) * 1e6
        row = f"{label:<26}" + "".join(f"{us[n]:>11.2f}" for n in names)
        row += f"{us['ember'] / us['numpy']:>12.1f}x"
        if "torch" in us:
            row += f"{us['ember'] / us['torch']:>12.1f}x"
        print(row)


# --- 2. GEMM peak --------------------------------------------------------------------------

def gemm_peak() -> float:
    n = 2048
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    flops = 2 * n ** 3
    a @ b
    t_np = min(timeit.repeat(lambda: a @ b, number=1, repeat=3))
    peak = flops / t_np / 1e9
    print(f"\n== 2. float32 GEMM {n}x{n} (the hardware reference) ==")
    print(f"numpy: {peak:.1f} GFLOP/s")
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        ta @ tb
        t_t = min(timeit.repeat(lambda: ta @ tb, number=1, repeat=3))
        print(f"torch: {flops / t_t / 1e9:.1f} GFLOP/s (for reference; the peak used below is "
              "numpy's)")
    return peak


# --- 3. MLP training step ------------------------------------------------------------------

BATCH, D_IN, HIDDEN, D_OUT, LR = 64, 256, 256, 10, 0.05
LAYERS = [(D_IN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, D_OUT)]


def init_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    params = {}
    for i, (fan_in, fan_out) in enumerate(LAYERS, 1):
        params[f"w{i}"] = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
                           ).astype(np.float32)
        params[f"b{i}"] = np.zeros(fan_out, np.float32)
    return params


def ember_forward(params, x):
    h = enp.tanh(x @ params["w1"] + params["b1"])
    h = enp.tanh(h @ params["w2"] + params["b2"])
    return h @ params["w3"] + params["b3"]


def ember_loss(params, x, y_onehot):
    logits = ember_forward(params, x)
    logp = logits - enp.special.logsumexp(logits, axis=-1, keepdims=True)
    return -enp.mean(enp.sum(y_onehot * logp, axis=-1))


def ember_step(params, x, y_onehot):
    loss, grads = ember.value_and_grad(ember_loss)(params, x, y_onehot)
    new = ember.tree.tree_map(lambda p, g: p - LR * g, params, grads)
    return new, loss


def step_flops() -> int:
    """Exact matmul FLOPs of one step: forward, weight gradients, input gradients except x's."""
    forward = sum(2 * BATCH * i * o for i, o in LAYERS)
    return 3 * forward - 2 * BATCH * D_IN * HIDDEN


def mlp(peak_gflops: float) -> None:
    params_np = init_params()
    rng = np.random.default_rng(2)
    x_np = rng.standard_normal((BATCH, D_IN)).astype(np.float32)
    y_np = np.eye(D_OUT, dtype=np.float32)[rng.integers(0, D_OUT, BATCH)]
    n_params = sum(p.size for p in params_np.values())
    flops = step_flops()
    print(f"\n== 3. MLP {D_IN}-{HIDDEN}-{HIDDEN}-{D_OUT}, tanh, batch {BATCH}, float32, SGD "
          f"({n_params} parameters, {flops / 1e6:.1f} MFLOP of matmuls per step) ==")

    params_em = {k: enp.asarray(v) for k, v in params_np.items()}
    x_em, y_em = enp.asarray(x_np), enp.asarray(y_np)
    step_jit = ember.jit(ember_step)

    def ember_train(steps: int) -> None:
        p = params_em
        for _ in range(steps):
            p, _ = step_jit(p, x_em, y_em)

    loss_em = float(step_jit(params_em, x_em, y_em)[1])  # compiles
    s = per_call_s(lambda: ember_train(10), repeats=3, target_s=0.5) / 10
    print(f"ember jit train step:   {1 / s:8.1f} steps/s  ({flops / s / 1e9:6.1f} GFLOP/s, "
          f"{flops / s / 1e9 / peak_gflops:5.1%} of the GEMM peak)")

    if torch is not None:
        tp = {k: torch.from_numpy(v.copy()).requires_grad_() for k, v in params_np.items()}
        tx, ty = torch.from_numpy(x_np), torch.from_numpy(y_np)

        def torch_forward(p, x):
            h = torch.tanh(x @ p["w1"] + p["b1"])
            h = torch.tanh(h @ p["w2"] + p["b2"])
            return h @ p["w3"] + p["b3"]

        def torch_step() -> torch.Tensor:
            logits = torch_forward(tp, tx)
            loss = -(ty * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
            loss.backward()
            with torch.no_grad():
                for p in tp.values():
                    p.add_(p.grad, alpha=-LR)
                    p.grad = None
            return loss.detach()

        loss_t = float(torch_step())  # warm-up, from the same initial parameters as ember's
        s_t = per_call_s(lambda: [torch_step() for _ in range(10)], repeats=3, target_s=0.5) / 10
        print(f"torch eager train step: {1 / s_t:8.1f} steps/s  "
              f"({flops / s_t / 1e9:6.1f} GFLOP/s, "
              f"{flops / s_t / 1e9 / peak_gflops:5.1%} of the GEMM peak)")
        print(f"ratio ember jit / torch eager: {s_t / s:.2f}x steps/s   "
              f"(first-step loss: ember {loss_em:.6f}, torch {loss_t:.6f})")
        with torch.no_grad():
            torch_forward(tp, tx)
            s_ft = per_call_s(lambda: torch_forward(tp, tx), repeats=3, target_s=0.3)

    fwd_jit = ember.jit(ember_forward)
    fwd_jit(params_em, x_em)
    s_fj = per_call_s(lambda: fwd_jit(params_em, x_em), repeats=3, target_s=0.3)
    s_fe = per_call_s(lambda: ember_forward(params_em, x_em), repeats=3, target_s=0.3)
    fwd_flops = sum(2 * BATCH * i * o for i, o in LAYERS)
    print(f"\nforward pass: ember jit {s_fj * 1e6:8.1f} us, ember eager {s_fe * 1e6:8.1f} us, "
          f"jit speed-up {s_fe / s_fj:.2f}x  (jit: {fwd_flops / s_fj / 1e9 / peak_gflops:5.1%} "
          "of the GEMM peak)")
    if torch is not None:
        print(f"forward pass: torch eager (no_grad) {s_ft * 1e6:8.1f} us, ratio ember jit / "
              f"torch {s_ft / s_fj:.2f}x")
    graph = fwd_jit.lower(params_em, x_em).graph.graph
    step_graph = step_jit.lower(params_em, x_em, y_em).graph.graph
    print(f"graph sizes: forward {len(graph.eqns)} equations, train step "
          f"{len(step_graph.eqns)} equations")


GELU_SHAPE = (256, 1024)


def gelu() -> None:
    """Exact GELU (``x * (1 + erf(x / sqrt 2)) / 2``) of a float32 activation, jitted, against
    ``torch.nn.functional.gelu``: ``erf`` used to dominate a small GPT's training step."""
    from ember.nn.functional import gelu as ember_gelu

    x = np.random.default_rng(0).standard_normal(GELU_SHAPE).astype(np.float32)
    x_em = enp.asarray(x)
    fn = ember.jit(ember_gelu)
    fn(x_em)
    s = per_call_s(lambda: fn(x_em), repeats=5, target_s=0.2)
    moved = 2 * x.nbytes  # read once, write once: the least any implementation moves
    print(f"\n== 4. exact GELU of a {GELU_SHAPE[0]}x{GELU_SHAPE[1]} float32 array ==")
    print(f"ember jit:   {s * 1e3:8.3f} ms  ({moved / s / 1e9:5.2f} GB/s moved)")
    if torch is not None:
        t = torch.from_numpy(x)
        s_t = per_call_s(lambda: torch.nn.functional.gelu(t), repeats=5, target_s=0.2)
        print(f"torch eager: {s_t * 1e3:8.3f} ms  ({moved / s_t / 1e9:5.2f} GB/s moved)")
        print(f"ratio ember jit / torch eager: {s_t / s:.2f}x speed")


def main() -> None:
    describe_environment()
    eager_overhead()
    peak = gemm_peak()
    mlp(peak)
    gelu()


if __name__ == "__main__":
    main()
