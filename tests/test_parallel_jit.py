"""``ember.jit`` with shardings: the partitioned program runs on every virtual device.

A training step (``value_and_grad`` + AdamW) of an MLP, data parallel, tensor parallel
(column then row) and both, on 1 to 8 devices and 2x2 / 4x2 meshes, with the NumPy and the
compiled CPU backends, gives over 10 steps the losses and parameters of the same step on one
device; the tiny Llama's loss and gradients with tp+dp match one device; ``explain()`` lists
the collectives an expert expects; donation gives each device's buffer to its program; bad
shardings are errors naming the value, the mesh axis and the user's line; and the same jit runs
under ``ember launch -n 2``.
"""

import os

import numpy as np
import pytest
from tiny_models import tiny_model

import ember
import ember.numpy as enp
from ember import nn
from ember import parallel as P
from ember.errors import EmberError
from ember.ir.sharding import ShardingError
from ember.optim import AdamState, AdamW

HERE = os.path.basename(__file__)
BACKENDS = ("numpy", "cpu")
D_IN, HIDDEN, D_OUT, BATCH = 8, 16, 4, 16


def _mesh(dp: int, tp: int) -> P.Mesh:
    return P.Mesh(P.devices()[:dp * tp], ("dp", "tp"), (dp, tp))


def _spec(mesh: P.Mesh, *entries) -> P.NamedSharding:
    return P.NamedSharding(mesh, P.PartitionSpec(*entries))


# --- an MLP training step ------------------------------------------------------------------------

def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w1": (rng.standard_normal((D_IN, HIDDEN)) / np.sqrt(D_IN)).astype(np.float32),
            "b1": (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
            "w2": (rng.standard_normal((HIDDEN, D_OUT)) / np.sqrt(HIDDEN)).astype(np.float32),
            "b2": (0.1 * rng.standard_normal(D_OUT)).astype(np.float32)}


def _batches(steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches of a learnable target (a fixed random map of the inputs)."""
    rng = np.random.default_rng(1)
    target = rng.standard_normal((D_IN, D_OUT)).astype(np.float32)
    xs = [rng.standard_normal((BATCH, D_IN)).astype(np.float32) for _ in range(steps)]
    return [(x, np.sin(x @ target)) for x in xs]


def _loss(params, x, y):
    h = enp.tanh(x @ params["w1"] + params["b1"])
    return enp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


OPT = AdamW(lr=0.05, weight_decay=0.01)


def train_step(params, state, x, y):
    loss, grads = ember.value_and_grad(_loss)(params, x, y)
    params, state = OPT.update(params, grads, state)
    return params, state, loss


def _layouts(mesh: P.Mesh, dp: bool, tp: bool):
    """Parameter and batch shardings: the batch split over dp; w1 split by columns and w2 by
    rows over tp (Megatron's MLP: one all-reduce of the output, none of the hidden layer)."""
    rep = _spec(mesh)
    col, row = (_spec(mesh, None, "tp"), _spec(mesh, "tp")) if tp else (rep, rep)
    params = {"w1": col, "b1": _spec(mesh, "tp") if tp else rep, "w2": row, "b2": rep}
    state = AdamState(step=rep, exp_avg=params, exp_avg_sq=params)
    batch = _spec(mesh, "dp") if dp else rep
    return params, state, batch


def _run(step, params, steps: int):
    state = OPT.init(params)
    losses = []
    for x, y in _batches(steps):
        params, state, loss = step(params, state, x, y)
        losses.append(float(np.asarray(loss)))
    return losses, {k: np.asarray(v) for k, v in params.items()}


@pytest.fixture(scope="module")
def one_device():
    """The single-device reference, per backend: 10 steps' losses and final parameters."""
    cache = {}

    def get(backend):
        if backend not in cache:
            params = {k: enp.asarray(v) for k, v in _params().items()}
            cache[backend] = _run(ember.jit(train_step, backend=backend), params, 10)
        return cache[backend]
    return get


CONFIGS = [(1, 1, True, False), (2, 1, True, False), (4, 1, True, False), (8, 1, True, False),
           (1, 2, False, True), (1, 4, False, True), (1, 8, False, True),
           (2, 2, True, True), (4, 2, True, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dp,tp,split_batch,split_model", CONFIGS,
                         ids=[f"dp{d}xtp{t}" for d, t, _, _ in CONFIGS])
def test_mlp_training_matches_one_device(one_device, backend, dp, tp, split_batch, split_model):
    mesh = _mesh(dp, tp)
    params_sh, state_sh, batch_sh = _layouts(mesh, split_batch, split_model)
    step = ember.jit(train_step, backend=backend, donate_argnums=(0, 1),
                     in_shardings=(params_sh, state_sh, batch_sh, batch_sh),
                     out_shardings=(params_sh, state_sh, _spec(mesh)))
    params = {k: enp.asarray(v) for k, v in _params().items()}
    losses, final = _run(step, params, 10)
    want_losses, want_params = one_device(backend)
    np.testing.assert_allclose(losses, want_losses, rtol=2e-5, atol=1e-6)
    assert losses[-1] < losses[0]  # it trains
    for k in want_params:
        np.testing.assert_allclose(final[k], want_params[k], rtol=2e-4, atol=2e-5)
    # the first call's plain arrays took the in_shardings layouts, so the sharded results
    # fed back hit the same program: one trace for the ten steps
    assert step.trace_count == 1


def test_results_are_sharded_arrays_laid_out_as_asked():
    mesh = _mesh(2, 2)
    params_sh, state_sh, batch_sh = _layouts(mesh, True, True)
    step = ember.jit(train_step, in_shardings=(params_sh, state_sh, batch_sh, batch_sh),
                     out_shardings=(params_sh, state_sh, _spec(mesh)))
    params = {k: enp.asarray(v) for k, v in _params().items()}
    x, y = _batches(1)[0]
    new, state, loss = step(params, OPT.init(params), x, y)
    assert isinstance(new["w1"], P.ShardedArray) and new["w1"].sharding == params_sh["w1"]
    assert new["w2"].sharding == params_sh["w2"]
    assert state.exp_avg["w1"].sharding == params_sh["w1"]
    shards = new["w1"].addressable_shards
    assert len(shards) == 4 and shards[0].data.shape == (D_IN, HIDDEN // 2)
    # a replicated result is whole on every device
    assert all(s.data.shape == () for s in loss.addressable_shards)


def test_partitioner_layouts_when_out_shardings_are_left_open():
    mesh = _mesh(4, 1)
    f = ember.jit(lambda x, w: enp.tanh(x @ w), in_shardings=(_spec(mesh, "dp"), None))
    x, w = _batches(1)[0][0], _params()["w1"]
    out = f(x, w)
    assert out.sharding == _spec(mesh, "dp")  # rows stay split: no collective
    np.testing.assert_allclose(np.asarray(out), np.tanh(x @ w), rtol=1e-6, atol=1e-6)
    assert f.lower(x, w).explain().collectives == []


def test_sharded_arguments_bring_their_own_layouts():
    mesh = _mesh(2, 2)
    x = P.device_put(_batches(1)[0][0], _spec(mesh, "dp"))
    w = P.device_put(_params()["w1"], _spec(mesh, None, "tp"))
    f = ember.jit(lambda x, w: enp.sum(x @ w, axis=1))
    out = f(x, w)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x).dot(np.asarray(w)).sum(1),
                               rtol=1e-5, atol=1e-5)
    assert out.sharding.mesh == mesh
    assert [c.axes for c in f.lower(x, w).explain().collectives] == [("tp",)]
    # another layout is another signature
    f(P.device_put(x, _spec(mesh, None, "tp")), w)
    assert f.trace_count == 2
    assert "argument leaf 0 changed type" in f.cache_info()["last_retrace_reason"]


# --- the tiny Llama -----------------------------------------------------------------------------

def _llama_layout(mesh: P.Mesh, name: str, ndim: int) -> P.NamedSharding:
    """Megatron's tensor parallel plan: q/k/v and gate/up split by output features (rows of
    the HF weight), o and down by input features; the rest replicated."""
    if ndim == 2 and any(p in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj",
                                             "up_proj")):
        return _spec(mesh, "tp")
    if ndim == 2 and any(p in name for p in ("o_proj", "down_proj")):
        return _spec(mesh, None, "tp")
    return _spec(mesh)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_llama_loss_and_gradients_with_tp_and_dp_match_one_device(backend):
    model = tiny_model(vocab_size=64)
    ids = np.random.default_rng(3).integers(0, 64, size=(4, 8)).astype(np.int32)
    grad = ember.jit(nn.value_and_grad(lambda m, x: m.loss(x)), backend=backend)
    want_loss, want_grads = grad(model, ids)
    mesh = _mesh(2, 2)
    sharded = model.replace({k: P.device_put(v, _llama_layout(mesh, k, v.ndim))
                             for k, v in model.trainable_parameters().items()})
    loss, grads = grad(sharded, P.device_put(ids, _spec(mesh, "dp")))
    assert isinstance(loss, P.ShardedArray)
    np.testing.assert_allclose(float(np.asarray(loss)), float(want_loss), rtol=1e-5)
    assert set(grads) == set(want_grads)
    for k, g in want_grads.items():
        g = np.asarray(g)
        np.testing.assert_allclose(np.asarray(grads[k]), g, rtol=2e-4,
                                   atol=2e-5 * float(np.abs(g).max()))
    # Megatron's communication: per layer one all-reduce over tp after attention and one after
    # the MLP, forward and backward; each gradient (and the loss) summed over dp once; nothing
    # gathered
    collectives = grad.lower(sharded, P.device_put(ids, _spec(mesh, "dp"))).explain().collectives
    assert {c.kind for c in collectives} == {"all_reduce"}
    layers = model.config.num_hidden_layers
    assert sum(c.axes == ("tp",) for c in collectives) == 4 * layers
    assert sum(c.axes == ("dp",) and c.reason.startswith("output") for c in collectives) == \
        len(want_grads) + 1


# --- explain and as_text ----------------------------------------------------------------------

def _explained(dp: int, tp: int):
    mesh = _mesh(dp, tp)
    params_sh, state_sh, batch_sh = _layouts(mesh, dp > 1, tp > 1)
    step = ember.jit(train_step, in_shardings=(params_sh, state_sh, batch_sh, batch_sh),
                     out_shardings=(params_sh, state_sh, _spec(mesh)))
    params = {k: enp.asarray(v) for k, v in _params().items()}
    x, y = _batches(1)[0]
    return step.lower(params, OPT.init(params), x, y)


def test_explain_lists_data_parallel_gradient_sums():
    explanation = _explained(4, 1).explain()
    kinds = {(c.kind, c.axes) for c in explanation.collectives}
    # each parameter's gradient (and the loss) summed over the batch's devices, nothing else
    assert kinds == {("all_reduce", ("dp",))}
    assert len(explanation.collectives) >= len(_params())
    text = str(explanation)
    assert text.startswith("mesh (dp=4, tp=1)") and HERE in text


def test_explain_lists_tensor_parallel_output_sum_only():
    explanation = _explained(1, 4).explain()
    # Megatron's MLP: the row-parallel product's output summed over tp (forward), the
    # input's gradient for the column-parallel product needs none (x is not differentiated);
    # no parameter is gathered
    assert {c.kind for c in explanation.collectives} == {"all_reduce"}
    assert all(c.axes == ("tp",) for c in explanation.collectives)


def test_as_text_shows_the_per_device_graph_with_shardings():
    text = _explained(2, 2).as_text()
    assert text.startswith("# per-device program, mesh (dp=2, tp=2)")
    assert f"f32[{BATCH // 2},{D_IN}]{{dp,_}}" in text  # the batch's local block
    assert f"f32[{D_IN},{HIDDEN // 2}]{{_,tp}}" in text  # w1's column block
    # the gradient sums start early and finish where used (ember.parallel.schedule)
    assert "all_reduce_start[axes=('dp',)" in text and "collective_done[" in text


def test_explain_without_shardings_is_an_error_naming_the_function():
    def plain_step(x):
        return x * 2.0

    with pytest.raises(EmberError, match=f"explain: jit of plain_step was lowered without "
                                         f"shardings.*\n  at .*{HERE}"):
        ember.jit(plain_step).lower(np.ones(3, np.float32)).explain()


# --- donation -----------------------------------------------------------------------------------

def test_donated_sharded_arguments_are_written_in_place_and_unusable():
    mesh = _mesh(4, 1)
    rows = _spec(mesh, "dp")
    step = ember.jit(lambda w, g: enp.exp(w) - 0.5 * g, in_shardings=rows,
                     out_shardings=rows, donate_argnums=0, backend="cpu")
    w0 = np.arange(32.0, dtype=np.float32).reshape(8, 4) / 32
    w = P.device_put(w0, rows)
    g = P.device_put(np.ones((8, 4), np.float32), rows)
    addresses = [b.__array_interface__["data"][0] for b in w.local_buffers()]
    out = step(w, g)
    np.testing.assert_allclose(np.asarray(out), np.exp(w0) - 0.5, rtol=1e-6)
    # each device's buffer was its program's to write: the result lives where w lived
    assert [b.__array_interface__["data"][0] for b in out.local_buffers()] == addresses
    with pytest.raises(EmberError, match=f"donated to a jitted function.*\n  at .*{HERE}"):
        np.asarray(w)
    with pytest.raises(EmberError, match="donated to a jitted function"):
        step(w, g)
    with pytest.raises(EmberError, match="donated to a jitted function"):
        w + 1.0
    np.testing.assert_array_equal(np.asarray(g), 1.0)  # not donated: untouched


def test_a_call_that_fails_on_one_device_consumes_donated_arguments(monkeypatch):
    """The other devices may have written their buffers: the argument is not given back
    half-updated, it stays donated."""
    from ember.parallel import jit as pjit

    mesh = _mesh(4, 1)
    rows = _spec(mesh, "dp")
    step = ember.jit(lambda w: enp.exp(w), in_shardings=rows, donate_argnums=0, backend="cpu")
    w0 = np.arange(8.0, dtype=np.float32).reshape(4, 2)
    w = P.device_put(w0, rows)

    def fail_on_device_2(program, threads):
        if P.runtime.local_device() == 2:
            raise RuntimeError("device 2 lost")

    monkeypatch.setattr(pjit, "_limit_threads", fail_on_device_2)
    with pytest.raises(RuntimeError, match="device 2 lost"):
        step(w)
    with pytest.raises(EmberError, match="donated to a jitted function"):
        np.asarray(w)
    monkeypatch.undo()
    np.testing.assert_allclose(np.asarray(step(P.device_put(w0, rows))), np.exp(w0), rtol=1e-6)


def test_a_donated_plain_array_is_copied_per_device_and_unusable():
    mesh = _mesh(2, 1)
    step = ember.jit(lambda w: w * 2.0, in_shardings=_spec(mesh), donate_argnums=0)
    w = enp.asarray(np.ones((2, 2), np.float32))
    out = step(w)
    np.testing.assert_array_equal(np.asarray(out), 2.0)
    with pytest.raises(EmberError, match="donated to a jitted function"):
        np.asarray(w)


# --- errors -------------------------------------------------------------------------------------

def test_uneven_split_names_the_argument_the_mesh_axis_and_the_line():
    mesh = _mesh(4, 1)
    f = ember.jit(lambda x: x + 1.0, in_shardings=_spec(mesh, "dp"))
    with pytest.raises(ShardingError, match=r"jit: argument 0 \(f32\[6,2\]\) cannot be laid "
                                            rf"out .*'dp'.*\n  at .*{HERE}"):
        f(np.ones((6, 2), np.float32))


def test_uneven_output_split_names_the_output_the_mesh_axis_and_the_line():
    mesh = _mesh(4, 1)
    f = ember.jit(lambda x: x[:6], out_shardings=_spec(mesh, "dp"))
    with pytest.raises(ShardingError, match=rf"output 0 \(f32\[6\]\).*dp.*\n  at .*{HERE}"):
        f(np.ones(8, np.float32))


def test_a_sharded_argument_laid_out_otherwise_than_in_shardings_is_an_error():
    mesh = _mesh(2, 2)
    f = ember.jit(lambda a, b: a + b, in_shardings=(None, _spec(mesh, "dp")))
    x = P.device_put(np.ones((4, 4), np.float32), _spec(mesh, None, "tp"))
    with pytest.raises(ShardingError, match=r"argument 1 is a sharded array laid out by .*'tp'"
                                            rf".*in_shardings asks for .*'dp'.*\n  at .*{HERE}"):
        f(x, x)


def test_shardings_that_do_not_fit_the_arguments_are_errors():
    mesh = _mesh(2, 1)
    f = ember.jit(lambda a: a["x"], in_shardings=({"y": _spec(mesh)},))
    with pytest.raises(ShardingError, match="in_shardings has structure .* not a prefix"):
        f({"x": np.ones(2, np.float32)})
    g = ember.jit(lambda a: a, in_shardings=P.PartitionSpec("dp"))
    with pytest.raises(ShardingError, match="expected ember.parallel.NamedSharding or None"):
        g(np.ones(2, np.float32))
    other = P.Mesh(P.devices()[2:4], ("dp",))
    h = ember.jit(lambda a, b: a + b, in_shardings=(_spec(mesh, "dp"),
                                                    P.NamedSharding(other, P.PartitionSpec())))
    with pytest.raises(ShardingError, match="name two meshes"):
        h(np.ones(2, np.float32), np.ones(2, np.float32))


def test_shardings_that_name_no_mesh_are_an_error():
    f = ember.jit(lambda a: a * 2.0, in_shardings=(None,))
    with pytest.raises(ShardingError, match=f"every in_shardings and out_shardings entry is "
                                            f"None.*\n  at .*{HERE}"):
        f(np.ones(2, np.float32))


def test_ember_random_inside_a_sharded_jit_draws_what_one_device_draws():
    """The ``ember.random`` key is a hidden input and output, replicated: the bits drawn and
    the key left behind are those of the program on one device."""
    mesh = _mesh(4, 1)
    fn = lambda x: x + ember.random.rand(*x.shape)  # noqa: E731
    x = np.zeros((8, 3), np.float32)
    ember.random.seed(7)
    want = [np.asarray(ember.jit(fn)(x)) for _ in range(2)]
    ember.random.seed(7)
    f = ember.jit(fn, in_shardings=_spec(mesh, "dp"))
    got = [np.asarray(f(x)) for _ in range(2)]
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got[0], got[1])  # the key moved on


# --- threads ------------------------------------------------------------------------------------

def test_each_virtual_device_runs_its_share_of_the_threads(monkeypatch):
    """OpenMP's thread count is per calling thread: each device thread's is set to the
    process's count over the devices, as the compiled program sees it."""
    from ember.parallel import jit as pjit

    monkeypatch.setenv("EMBER_NUM_THREADS", "4")
    seen = []
    limit = pjit._limit_threads

    def spy(program, threads):
        limit(program, threads)
        seen.append(program._library.omp_get_max_threads())

    monkeypatch.setattr(pjit, "_limit_threads", spy)
    for n, want in ((8, 1), (2, 2)):
        seen.clear()
        mesh = _mesh(n, 1)
        f = ember.jit(lambda x: enp.exp(x) * 2.0, in_shardings=_spec(mesh, "dp"),
                      backend="cpu")
        f(np.ones((n * 4, 64), np.float32))
        assert seen == [want] * n


# --- ember launch -------------------------------------------------------------------------------

def test_jit_with_shardings_under_ember_launch(ember_launch):
    status, out, _ = ember_launch(2, "parallel_jit.py")
    assert status == 0, out
    for rank in range(2):
        assert f"process {rank}: jit with shardings ok" in out, out
