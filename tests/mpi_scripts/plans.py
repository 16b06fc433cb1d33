"""Run under ``ember launch -n N``: a Llama plan trains the tiny Llama, one device per process.

``python plans.py dp=2 tp=2 zero=1 sp=0`` builds the mesh and plan ``P.plans.parse`` makes of
those sizes over every process, places the model and state with ``finetune.place``, runs
three fine-tuning steps jitted with the plan's layouts (collectives over MPI) and compares the
losses and the parameters, gathered from every process, with one device's run in this
process. Prints one line per process when all holds.
"""

import pathlib
import sys

import numpy as np

import ember
from ember import parallel as P
from ember.models import finetune
from ember.models.finetune import _make_step

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from tiny_models import tiny_model  # noqa: E402


def train(model, state, opt, step, data, place_batch=None):
    losses = []
    for batch in data:
        if place_batch is not None:
            batch = place_batch(batch)
        loss, _, params, state = step(model, state, batch)
        model.update(params)
        losses.append(float(P.process_allgather(loss)) if place_batch else float(np.asarray(loss)))
    return losses


def main() -> None:
    mesh, plan = P.plans.parse(",".join(sys.argv[1:]), P.devices())
    rng = np.random.default_rng(0)  # the same batches in every process
    data = [rng.integers(0, 64, (1, 8, 8)).astype(np.int32) for _ in range(3)]

    opt = ember.optim.AdamW(lr=1e-2)
    one = tiny_model(64)
    want = train(one, opt.init(one.trainable_parameters()), opt, _make_step(opt, 1.0), data)

    model = tiny_model(64)
    state, layouts, place_batch = finetune.place(model, opt, mesh, plan)
    trained = layouts[2]
    step = ember.jit(_make_step(opt, 1.0).fun, donate_argnums=1, backend="numpy",
                     out_shardings=layouts)
    got = train(model, state, opt, step, data, place_batch)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    reference = one.trainable_parameters()
    for name, value in model.trainable_parameters().items():
        assert value.sharding == trained[name], name
        np.testing.assert_allclose(P.process_allgather(value), np.asarray(reference[name]),
                                   rtol=1e-4, atol=2e-5, err_msg=name)
    print(f"process {P.process_index()}: {plan.name} ok", flush=True)


if __name__ == "__main__":
    main()
