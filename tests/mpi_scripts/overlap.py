"""Run under ``ember launch -n 2``: the overlap schedule gives the same bits over MPI.

A data-parallel MLP step and the tiny Llama's ZeRO-3 fine-tuning step run three steps each,
jitted with the overlap schedule (``EMBER_OVERLAP=1``: collectives started early, finished
where used) and without it; losses and parameters, gathered from both processes, must be
bitwise equal. Prints one line per process when all holds.
"""

import os
import pathlib
import sys

import numpy as np

import ember
import ember.numpy as enp
from ember import parallel as P
from ember.models import finetune
from ember.models.finetune import _make_step

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from tiny_models import tiny_model  # noqa: E402


def _mlp_step(params, x, y):
    def loss_fn(p):
        h = enp.tanh(x @ p["w1"] + p["b1"])
        return enp.mean((h @ p["w2"] - y) ** 2)
    loss, grads = ember.value_and_grad(loss_fn)(params)
    return {k: params[k] - 0.1 * grads[k] for k in params}, loss


def mlp(mesh):
    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((8, 16)).astype(np.float32) / 3,
              "b1": np.zeros(16, np.float32),
              "w2": rng.standard_normal((16, 4)).astype(np.float32) / 4}
    rep, batch = P.NamedSharding(mesh), P.NamedSharding(mesh, P.PartitionSpec("dp"))
    step = ember.jit(_mlp_step, in_shardings=(rep, batch, batch), out_shardings=(rep, rep))
    losses = []
    for _ in range(3):
        x = rng.standard_normal((16, 8)).astype(np.float32)
        params, loss = step(params, x, np.sin(x[:, :4]))
        losses.append(P.process_allgather(loss))
    text = step.lower(params, x, x[:, :4]).as_text()
    return [*losses, *(P.process_allgather(v) for v in params.values())], text


def zero3(mesh):
    plan = P.plans.llama(dp="dp", zero=3)
    model, opt = tiny_model(64), ember.optim.AdamW(lr=1e-2)
    state, layouts, place_batch = finetune.place(model, opt, mesh, plan)
    step = ember.jit(_make_step(opt, 1.0).fun, donate_argnums=1, backend="numpy",
                     out_shardings=layouts)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(3):
        loss, _, params, state = step(model, state,
                                      place_batch(rng.integers(0, 64, (1, 8, 8)).astype(np.int32)))
        model.update(params)
        losses.append(P.process_allgather(loss))
    params = model.trainable_parameters()
    return [*losses, *(P.process_allgather(params[k]) for k in sorted(params))]


def main() -> None:
    mesh = P.Mesh(P.devices(), ("dp",), (2,))
    results = {}
    for on in ("1", "0"):
        os.environ["EMBER_OVERLAP"] = on
        values, text = mlp(mesh)
        assert ("all_reduce_start[" in text) == (on == "1"), text
        results[on] = values + zero3(mesh)
    for a, b in zip(results["1"], results["0"], strict=True):
        np.testing.assert_array_equal(a, b)
    print(f"process {P.process_index()}: overlap ok", flush=True)


if __name__ == "__main__":
    main()
