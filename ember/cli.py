"""The ``ember`` command line: ``ember demo`` and ``ember info`` (models come in a later layer).

``demo`` is the main job of the quick start until the built-in Llama model lands: it shows the
framework end to end (eager NumPy, the IR jit makes, grad, vmap) and checks itself against NumPy.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time


def _demo() -> int:
    import numpy as np

    import ember
    import ember.numpy as enp

    print(f"ember {ember.__version__} — NumPy as the language, compiled to a static graph\n")
    x = enp.linspace(0, 1, 12, dtype=enp.float32).reshape(3, 4)
    y = enp.tanh(x @ x.T).sum(axis=-1)
    print("eager: tanh(x @ x.T).sum(-1) =", y)
    ref = np.tanh(np.asarray(x) @ np.asarray(x).T).sum(-1)
    assert np.allclose(np.asarray(y), ref, rtol=1e-5), "eager result differs from NumPy"

    def loss(w, x):
        return enp.mean((enp.tanh(x @ w) - 1) ** 2)

    w = enp.ones((4, 2), dtype=enp.float32)
    print("\nthe graph jit makes of loss(w, x):")
    print(ember.jit(loss).lower(w, x).as_text())
    step = ember.jit(ember.value_and_grad(loss))
    value, grad = step(w, x)
    start = time.perf_counter()
    for _ in range(100):
        value, grad = step(w, x)
    per_call = (time.perf_counter() - start) / 100 * 1e6
    print(f"\njit(value_and_grad(loss)): loss={float(value):.6f}, |grad|="
          f"{float(enp.linalg.norm(grad)):.6f} ({per_call:.0f} us per call, "
          f"{step.trace_count} trace)")
    batched = ember.vmap(loss, in_axes=(None, 0))(w, x)
    print("vmap(loss) over the rows of x:", batched)
    return 0


def _info() -> int:
    import ml_dtypes
    import numpy as np

    import ember
    from ember.backends import default_backend

    backend = default_backend()
    print(f"ember      {ember.__version__}")
    print(f"python     {platform.python_version()} ({sys.executable})")
    print(f"numpy      {np.__version__}")
    print(f"ml_dtypes  {ml_dtypes.__version__}")
    print(f"backend    {backend.name} (default); devices: "
          + ", ".join(str(d) for d in backend.devices))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ember", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("demo", help="run the framework end to end and check it against NumPy")
    sub.add_parser("info", help="versions, backends and devices")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    return _demo()


if __name__ == "__main__":
    raise SystemExit(main())
