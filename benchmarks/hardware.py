"""The machine's limits, measured the same way by every benchmark that reports a "% of limit".

- read bandwidth: a matrix-vector product and one sum per thread streaming a 512 MB matrix
  (decode reads every weight once per token);
- float32 GEMM rate: 2048x2048 products in NumPy and, where it is installed, PyTorch (MKL), on a
  given number of threads (prefill and training are GEMM-bound).

Each is the best of the ways at hand, so a limit is never read low by one library's weak
kernel.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def best(fn: Callable[[], float], repeats: int) -> float:
    """The smallest of ``repeats`` measurements; ``fn`` returns seconds."""
    return min(fn() for _ in range(repeats))


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """``fn`` as a function that runs it once and returns the seconds it took."""
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def read_bandwidth(threads: int = 2) -> float:
    """Bytes per second read from memory, the best of a NumPy matrix-vector product and one sum
    per thread (NumPy's sums release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    big = np.ones((16384, 8192), dtype=np.float32)
    x = np.ones(8192, dtype=np.float32)
    parts = np.split(big, threads)
    with ThreadPoolExecutor(threads) as pool:
        reads = [lambda: big @ x, lambda: list(pool.map(np.sum, parts))]
        return max(big.nbytes / best(timed(read), 4) for read in reads)


def gemm_rate(threads: int = 2, n: int = 2048) -> float:
    """float32 FLOP/s of an ``n`` x ``n`` product: the best of NumPy's BLAS and PyTorch's on
    ``threads`` threads (NumPy's BLAS uses its own count, every core by default). Smaller
    products read the rate lower; 2048 is the size every reported limit uses."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    products = [lambda: a @ a]
    try:
        import torch

        torch.set_num_threads(threads)
        t = torch.from_numpy(a)
        products.append(lambda: t @ t)
    except ImportError:
        pass
    return max(2 * n**3 / best(timed(p), 4) for p in products)


def blas_kernel() -> str:
    """Which kernel NumPy's BLAS runs (``OPENBLAS_CORETYPE`` can force a slower one), as far as
    threadpoolctl, when installed, can tell."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "NumPy BLAS: unknown (pip install threadpoolctl to show its kernel)"
    found = [f"{lib.get('internal_api')} {lib.get('version')}, kernel {lib.get('architecture')}"
             for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return "NumPy BLAS: " + ("; ".join(found) or "none found")


def hardware(threads: int = 2) -> tuple[float, float]:
    """(read bandwidth in bytes/s, float32 GEMM FLOP/s) on ``threads`` threads."""
    return read_bandwidth(threads), gemm_rate(threads)
