"""Ready-made plans for the built-in Llama (issue 9, part 6): every plan trains the tiny Llama
to one device's losses and parameters, and communicates what an expert expects.

A fine-tuning step (``ember.models.finetune._make_step``: forward, backward, clipping, AdamW,
optional accumulation in a scan) is traced once, partitioned by the plan's layouts and run on
every device of the mesh by the lockstep simulator; some plans also run as ``jit`` with the
plan's layouts, on virtual devices and on MPI processes (``mpi_scripts/plans.py``)."""

import re
import warnings

import numpy as np
import pytest
from tiny_models import tiny_model

import ember
import ember.numpy as enp
from ember import parallel as P
from ember.models import finetune
from ember.models.finetune import _make_step
from ember.models.llama import LlamaConfig, LlamaForCausalLM
from ember.parallel.plans import PlanError
from ember.parallel.reshard import collective_bytes
from ember.tree import tree_flatten, tree_leaves, tree_unflatten

VOCAB, BATCH, LENGTH, HIDDEN, LAYERS = 64, 8, 8, 32, 2


def mesh_of(**axes):
    sizes = tuple(axes.values())
    return P.Mesh(P.devices()[:int(np.prod(sizes))], tuple(axes), shape=sizes)


def model_for(lora=False, checkpointing=False, vocab=VOCAB):
    model = tiny_model(vocab)
    if lora:
        ember.nn.apply_lora(model, rank=4, targets=("q_proj", "v_proj", "o_proj", "down_proj"),
                            key=ember.random.key(1))
    model.gradient_checkpointing = checkpointing
    return model


def batches(steps, accum):
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, (accum, BATCH, LENGTH)).astype(np.int32) for _ in range(steps)]


class Run:
    """A fine-tuning step partitioned by ``plan`` over ``mesh`` (None: one device, jitted)."""

    def __init__(self, plan, mesh, lora=False, checkpointing=False, accum=1, vocab=VOCAB,
                 opt=None):
        self.model = model_for(lora, checkpointing, vocab)
        self.opt = opt or ember.optim.AdamW(lr=1e-2)
        self.state = self.opt.init(self.model.trainable_parameters())
        self.step = _make_step(self.opt, 1.0)
        self.plan, self.mesh = plan, mesh
        if mesh is None:
            return
        self.model.activation_sharding = plan.annotator(mesh)
        closed = self.step.lower(self.model, self.state, batches(1, accum)[0]).graph
        ins = (plan.model_shardings(self.model, mesh)
               + tree_leaves(plan.state_shardings(self.state, mesh))
               + [plan.batch_sharding(mesh, ndim=3)])
        trained = plan.param_shardings(self.model, mesh, trainable=True)
        replicated = P.NamedSharding(mesh)
        outs = tree_leaves((replicated, replicated, trained,
                            plan.state_shardings(self.state, mesh)))
        self.partitioned = P.partition(closed, ins, outs, mesh)

    def train(self, data):
        """The losses of one step per batch; the model and state are updated."""
        losses = []
        for batch in data:
            if self.mesh is None:
                loss, _, params, self.state = self.step(self.model, self.state, batch)
            else:
                leaves = [np.asarray(x) for x in tree_leaves((self.model, self.state, batch))]
                outs = P.simulate(self.partitioned, *leaves)
                _, tree = tree_flatten((0.0, 0.0, self.model.trainable_parameters(),
                                        self.state))
                loss, _, params, self.state = tree_unflatten(
                    tree, [enp.asarray(o) for o in outs])
            self.model.update(params)
            losses.append(float(np.asarray(loss)))
        return losses

    def explain(self):
        return self.partitioned.explanation


def assert_same_training(plan, mesh, steps=3, **kw):
    data = batches(steps, kw.get("accum", 1))
    one, many = Run(None, None, **kw), Run(plan, mesh, **kw)
    np.testing.assert_allclose(many.train(data), one.train(data), rtol=2e-5)
    want = one.model.trainable_parameters()
    for name, value in many.model.trainable_parameters().items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(want[name]), rtol=1e-4,
                                   atol=2e-5, err_msg=name)
    return many


def nbytes(*shape):
    return int(np.prod(shape)) * 4


def local_shape(c):
    """The local shape of a collective's result, from ``f32[2,8,32]{dp,_,_}``."""
    return tuple(int(d) for d in re.match(r"\w+\[([\d,]*)\]", c.result).group(1).split(",") if d)


# --- every plan trains like one device -----------------------------------------------------------

PLANS = [
    ("dp2", dict(dp="dp"), dict(dp=2)),
    ("dp4", dict(dp="dp"), dict(dp=4)),
    ("dp8", dict(dp="dp"), dict(dp=8)),
    ("zero1-dp4", dict(dp="dp", zero=1), dict(dp=4)),
    ("zero2-dp4", dict(dp="dp", zero=2), dict(dp=4)),
    ("zero3-dp2", dict(dp="dp", zero=3), dict(dp=2)),
    ("zero3-dp4", dict(dp="dp", zero=3), dict(dp=4)),
    ("tp2", dict(tp="tp"), dict(tp=2)),
    ("tp2-sp", dict(tp="tp", sp=True), dict(tp=2)),
    ("dp2xtp2", dict(dp="dp", tp="tp"), dict(dp=2, tp=2)),
    ("dp4xtp2", dict(dp="dp", tp="tp"), dict(dp=4, tp=2)),
    ("dp2xtp2-sp-zero1", dict(dp="dp", tp="tp", sp=True, zero=1), dict(dp=2, tp=2)),
    ("dp2xtp2-zero3", dict(dp="dp", tp="tp", zero=3), dict(dp=2, tp=2)),
]


@pytest.mark.parametrize("plan, axes", [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
def test_plan_trains_like_one_device(plan, axes):
    assert_same_training(P.plans.llama(**plan), mesh_of(**axes))


@pytest.mark.parametrize("plan, axes", [(dict(dp="dp"), dict(dp=2)),
                                        (dict(dp="dp", tp="tp", zero=1), dict(dp=2, tp=2))],
                         ids=["dp2", "dp2xtp2-zero1"])
def test_lora_trains_like_one_device(plan, axes):
    run = assert_same_training(P.plans.llama(**plan), mesh_of(**axes), lora=True)
    assert all("lora_" in k for k in run.model.trainable_parameters())


@pytest.mark.parametrize("plan, axes", [(dict(dp="dp"), dict(dp=2)),
                                        (dict(dp="dp", zero=3), dict(dp=2))],
                         ids=["dp2", "zero3-dp2"])
def test_gradient_accumulation_trains_like_one_device(plan, axes):
    assert_same_training(P.plans.llama(**plan), mesh_of(**axes), accum=2)


def test_checkpointed_layers_train_like_one_device_under_zero3():
    assert_same_training(P.plans.llama(dp="dp", zero=3), mesh_of(dp=4), checkpointing=True)


@pytest.mark.parametrize("plan, axes", [p[1:] for p in PLANS if "dp8" not in p[0]],
                         ids=[p[0] for p in PLANS if "dp8" not in p[0]])
def test_lora_accumulation_and_checkpointing_together_train_like_one_device(plan, axes):
    assert_same_training(P.plans.llama(**plan), mesh_of(**axes), steps=2, lora=True, accum=2,
                         checkpointing=True)


@pytest.mark.parametrize("plan, axes", [(dict(dp="dp", tp="tp", zero=1), dict(dp=2, tp=2)),
                                        (dict(dp="dp", zero=3), dict(dp=2))],
                         ids=["dp2xtp2-zero1", "zero3-dp2"])
def test_a_sharded_model_trains_under_jit_like_one_device(plan, axes):
    """The jit path: ``P.shard`` places the model, the state and the batches are placed by the
    plan, and the fine-tuning step jitted with the plan's result layouts keeps every value
    where the plan says, step after step, with one trace."""
    mesh, plan = mesh_of(**axes), P.plans.llama(**plan)
    data = batches(3, 1)
    one = Run(None, None)
    want = one.train(data)
    model, opt = model_for(), ember.optim.AdamW(lr=1e-2)
    state, layouts, place_batch = finetune.place(model, opt, mesh, plan)
    _, _, trained, state_layout = layouts
    step = ember.jit(_make_step(opt, 1.0).fun, donate_argnums=1, backend="numpy",
                     out_shardings=layouts)
    losses = []
    for batch in data:
        loss, _, new, state = step(model, state, place_batch(batch))
        model.update(new)
        losses.append(float(np.asarray(loss)))
    assert step.trace_count == 1
    np.testing.assert_allclose(losses, want, rtol=2e-5)
    for name, value in model.trainable_parameters().items():
        assert value.sharding == trained[name], name
        np.testing.assert_allclose(np.asarray(value), np.asarray(one.model.trainable_parameters()[
            name]), rtol=1e-4, atol=2e-5, err_msg=name)
    for name, moment in state.exp_avg.items():
        assert moment.sharding == state_layout.exp_avg[name], name


@pytest.mark.parametrize("n, sizes", [(2, ["dp=2", "zero=1"]), (2, ["tp=2", "sp=1"]),
                                     (4, ["dp=2", "tp=2", "zero=3"])],
                         ids=["zero1-dp2", "tp2-sp", "dp2xtp2-zero3"])
def test_a_plan_trains_like_one_device_on_mpi_processes(n, sizes, ember_launch):
    status, out, _ = ember_launch(n, "plans.py", *sizes, timeout=30.0, limit=200)
    assert status == 0, out
    for rank in range(n):
        assert re.search(rf"process {rank}: plans\.llama\(.*\) ok", out), out


# --- what each plan communicates -----------------------------------------------------------------

def forward_program(plan, mesh):
    """The loss alone (no backward pass), partitioned by ``plan``."""
    model = model_for()
    model.activation_sharding = plan.annotator(mesh)
    ids = batches(1, 1)[0][0]
    closed = ember.jit(lambda m, b: m.loss(b)).lower(model, ids).graph
    ins = plan.model_shardings(model, mesh) + [plan.batch_sharding(mesh)]
    return P.partition(closed, ins, [P.NamedSharding(mesh)], mesh)


def hidden_collectives(explanation, axis):
    """The collectives over ``axis`` that move the residual stream ``[batch, length, hidden]``."""
    return [c for c in explanation.collectives
            if c.axes == (axis,) and len(local_shape(c)) == 3 and local_shape(c)[2] == HIDDEN]


@pytest.mark.parametrize("dp", [1, 2])
def test_tensor_parallel_forward_has_one_all_reduce_after_attention_and_one_after_the_mlp(dp):
    p = forward_program(P.plans.llama(dp="dp", tp="tp"), mesh_of(dp=dp, tp=2))
    block = nbytes(BATCH // dp, LENGTH, HIDDEN)  # a device's block of the residual stream
    # The first sums the vocabulary-parallel embedding's partial lookups.
    assert [(c.kind, c.nbytes) for c in hidden_collectives(p.explanation, "tp")] == \
        [("all_reduce", collective_bytes("all_reduce", block, 2))] * (2 * LAYERS + 1)


def test_sequence_parallel_forward_reduce_scatters_and_all_gathers_instead():
    p = forward_program(P.plans.llama(tp="tp", sp=True), mesh_of(tp=2))
    whole, part = nbytes(BATCH, LENGTH, HIDDEN), nbytes(BATCH, LENGTH // 2, HIDDEN)
    scatter = ("reduce_scatter", collective_bytes("reduce_scatter", whole, 2))
    gather = ("all_gather", collective_bytes("all_gather", part, 2))
    # The vocabulary-parallel embedding's partial lookups are scattered by sequence; each
    # block: gather before attention's and the MLP's column-split projections, scatter after
    # their row-split ones; the final norm's output is gathered for the head.
    assert [(c.kind, c.nbytes) for c in hidden_collectives(p.explanation, "tp")] == \
        [scatter] + [gather, scatter] * (2 * LAYERS) + [gather]
    assert not [c for c in p.explanation.collectives if c.kind == "all_reduce"
                and c.axes == ("tp",) and len(local_shape(c)) == 3]


def layer_parameter_shapes():
    model = model_for()
    return sorted(tuple(v.shape) for k, v in model.trainable_parameters().items()
                  if k.startswith("model.layers."))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "recomputed"])
def test_zero3_gathers_each_layers_parameters_and_reduce_scatters_their_gradients(
        checkpointing):
    dp = 4
    run = Run(P.plans.llama(dp="dp", zero=3), mesh_of(dp=dp), checkpointing=checkpointing)
    shapes = layer_parameter_shapes()
    layer = [c for c in run.explain().collectives if c.reason == "with_sharding_constraint"]
    gathers = sorted(local_shape(c) for c in layer if c.kind == "all_gather")
    scatters = sorted(local_shape(c) for c in layer if c.kind == "reduce_scatter")
    # Every layer parameter gathered whole going forward, and each matrix again in the
    # backward pass (which recomputes the layer, or only its gathers: a norm's vector may be
    # kept broadcast instead); every gradient summed straight into its shard.
    assert set(gathers) == set(shapes)
    assert [g for g in gathers if len(g) == 2] == sorted(s for s in shapes * 2 if len(s) == 2)
    assert scatters == sorted((s[0] // dp, *s[1:]) for s in shapes)
    for c in layer:
        whole = nbytes(*local_shape(c)) * (dp if c.kind == "reduce_scatter" else 1)
        shard = whole // dp if c.kind == "all_gather" else whole
        assert c.nbytes == collective_bytes(c.kind, shard, dp)
    assert {c.within for c in layer if c.kind == "all_gather"} == {"remat body"}
    assert not [c for c in layer if c.kind == "all_reduce"]


def test_zero_under_the_finetuning_step_shards_the_update_for_data_parallel_bytes():
    """``finetune``'s step does not ask for gradient layouts: with the moments split (ZeRO-1),
    the partitioner sums each gradient straight into their shard (a reduce-scatter), updates
    the shard and all-gathers the new parameters, which sends what data parallelism's
    all-reduce sends."""
    dp = 4
    plain, zero = (Run(P.plans.llama(dp="dp", zero=z), mesh_of(dp=dp)) for z in (0, 1))
    shapes = sorted(tuple(v.shape) for v in model_for().trainable_parameters().values())

    def arrays(run, kind):
        return sorted(local_shape(c) for c in run.explain().collectives
                      if c.kind == kind and local_shape(c))
    assert arrays(plain, "all_reduce") == shapes
    assert arrays(zero, "reduce_scatter") == sorted((s[0] // dp, *s[1:]) for s in shapes)
    assert arrays(zero, "all_gather") == shapes
    assert not arrays(zero, "all_reduce")
    sent = [sum(c.nbytes for c in run.explain().collectives if local_shape(c))
            for run in (plain, zero)]
    assert sent[0] == sent[1]


def test_zero3_with_checkpointed_layers_holds_one_layers_gathered_parameters_at_a_time():
    """Every gathered parameter lives inside one layer's recomputable body: each body gathers
    exactly one layer's parameters (the forward's and the backward's recomputation alike),
    and outside them only the embedding table is gathered, for the lookup."""
    dp = 4
    run = Run(P.plans.llama(dp="dp", zero=3), mesh_of(dp=dp), checkpointing=True)
    layer_bytes = sum(nbytes(*s) for s in layer_parameter_shapes()) // LAYERS

    def gathered(graph):
        return sum(nbytes(*e.outputs[0].aval.shape) for e in graph.eqns
                   if e.prim.name == "all_gather")
    program = run.partitioned.graph.graph
    bodies = [e.params["body"].graph for e in program.eqns if e.prim.name == "remat"]
    assert len(bodies) == 2 * LAYERS  # each layer's forward, and its backward's recomputation
    assert [gathered(b) for b in bodies] == [layer_bytes] * len(bodies)
    assert gathered(program) == nbytes(VOCAB, HIDDEN)


def zero_step(opt, plan, mesh):
    """A step that asks for the plan's gradient layouts (what ZeRO-1 and 2 differ in)."""
    grad = ember.nn.value_and_grad(lambda m, b: m.loss(b))

    def step(model, state, batch):
        loss, grads = grad(model, batch)
        grads = plan.constrain_grads(grads, mesh)
        params, state = opt.update(model.trainable_parameters(), grads, state)
        return loss, params, state
    return step


@pytest.mark.parametrize("zero, kind", [(1, "all_reduce"), (2, "reduce_scatter")])
def test_zero1_sums_gradients_whole_and_zero2_into_shards(zero, kind):
    dp = 4
    mesh, plan = mesh_of(dp=dp), P.plans.llama(dp="dp", zero=zero)
    model = model_for()
    opt = ember.optim.AdamW(lr=1e-2)
    state = opt.init(model.trainable_parameters())
    ids = batches(1, 1)[0][0]
    step = zero_step(opt, plan, mesh)
    closed = ember.jit(step).lower(model, state, ids).graph
    params = plan.param_shardings(model, mesh, trainable=True)
    ins = (plan.model_shardings(model, mesh) + tree_leaves(plan.state_shardings(state, mesh))
           + [plan.batch_sharding(mesh)])
    outs = tree_leaves((P.NamedSharding(mesh), params, plan.state_shardings(state, mesh)))
    p = P.partition(closed, ins, outs, mesh)
    got = P.simulate(p, *[np.asarray(x) for x in tree_leaves((model, state, ids))])
    want = tree_leaves(step(model, state, enp.asarray(ids)))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-4, atol=2e-5)
    grads = [c for c in p.explanation.collectives if c.reason == "with_sharding_constraint"]
    shapes = sorted(tuple(v.shape) for v in model.trainable_parameters().values())
    assert sorted(c.kind for c in grads) == [kind] * len(shapes)
    for c, shape in zip(sorted(grads, key=lambda c: c.nbytes), sorted(shapes, key=np.prod)):
        assert c.nbytes == collective_bytes(kind, nbytes(*shape), dp)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_stores_a_share_of_parameters_and_optimizer_state_per_device(zero):
    dp = 4
    mesh, plan = mesh_of(dp=dp), P.plans.llama(dp="dp", zero=zero)
    model = model_for()
    state = ember.optim.AdamW().init(model.trainable_parameters())

    def per_device(values, shardings):
        return sum(nbytes(*s.shard_shape(np.shape(v)))
                   for v, s in zip(tree_leaves(values), tree_leaves(shardings)))
    total_params = sum(nbytes(*v.shape) for v in model.trainable_parameters().values())
    params = per_device(model.trainable_parameters(),
                        plan.param_shardings(model, mesh, trainable=True))
    moments = per_device((state.exp_avg, state.exp_avg_sq),
                         tree_leaves((plan.state_shardings(state, mesh).exp_avg,
                                      plan.state_shardings(state, mesh).exp_avg_sq)))
    assert params == (total_params // dp if zero == 3 else total_params)
    assert moments == (2 * total_params // dp if zero else 2 * total_params)


# --- placing a model -----------------------------------------------------------------------------

def test_shard_places_every_parameter_as_the_plan_says():
    mesh = mesh_of(dp=2, tp=2)
    plan = P.plans.llama(dp="dp", tp="tp", zero=3)
    model = model_for()
    before = {k: np.array(v) for k, v in model.state_dict().items()}
    assert P.shard(model, mesh, plan) is model
    for name, value in model.state_dict().items():
        assert isinstance(value, P.ShardedArray), name
        assert value.sharding == P.NamedSharding(mesh, plan.param_spec(name, value.ndim)), name
        np.testing.assert_array_equal(np.asarray(value), before[name])
    q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert q.sharding.spec == P.PartitionSpec(("tp", "dp"), None)
    assert q.addressable_shards[0].data.shape == (32 // 4, 32)
    assert model.state_dict()["model.layers.1.mlp.down_proj.weight"].sharding.spec == \
        P.PartitionSpec("dp", "tp")
    assert model.activation_sharding == plan.annotator(mesh)


@pytest.mark.parametrize("plan", [dict(dp="dp", tp="tp", zero=3), dict(tp="tp", sp=True)],
                         ids=["dp2xtp2-zero3", "tp2-sp"])
def test_a_sharded_model_gives_one_devices_loss_eagerly_and_jitted(plan):
    ids = batches(1, 1)[0][0]
    want = np.asarray(model_for().loss(ids))
    model = P.shard(model_for(), mesh_of(dp=2, tp=2), P.plans.llama(**plan))
    np.testing.assert_allclose(np.asarray(ember.jit(lambda m, b: m.loss(b))(model, ids)), want,
                               rtol=1e-5)
    with warnings.catch_warnings():  # eager operations may gather, and say so
        warnings.simplefilter("ignore", P.ShardingGatherWarning)
        eager = model.loss(ids)
    np.testing.assert_allclose(np.asarray(eager), want, rtol=1e-5)


def test_plan_layouts_by_name():
    plan = P.plans.llama(dp="dp", tp="tp", zero=1)
    assert plan.param_spec("model.layers.3.self_attn.k_proj.weight", 2) == \
        P.PartitionSpec("tp", None)
    assert plan.state_spec("model.layers.3.self_attn.k_proj.weight", 2) == \
        P.PartitionSpec(("tp", "dp"), None)
    assert plan.grad_spec("model.layers.3.self_attn.k_proj.weight", 2) == \
        P.PartitionSpec("tp", None)
    assert plan.param_spec("model.layers.0.mlp.down_proj.lora_A", 2) == \
        P.PartitionSpec(None, "tp")
    assert plan.param_spec("model.layers.0.mlp.up_proj.lora_B", 2) == P.PartitionSpec("tp", None)
    assert plan.param_spec("model.norm.weight", 1) == P.PartitionSpec(None)
    zero3 = P.plans.llama(dp="dp", tp="tp", zero=3)
    assert zero3.param_spec("model.layers.0.mlp.down_proj.weight", 2) == \
        P.PartitionSpec("dp", "tp")
    assert zero3.gathered_spec("model.layers.0.mlp.down_proj.weight", 2) == \
        P.PartitionSpec(None, "tp")
    assert plan.activation_spec("residual") == P.PartitionSpec("dp", None, None)
    assert P.plans.llama(tp="tp", sp=True).activation_spec("residual") == \
        P.PartitionSpec(None, "tp", None)
    assert plan.batch_sharding(mesh_of(dp=2, tp=2), ndim=3).spec == \
        P.PartitionSpec(None, "dp", None)


# --- errors --------------------------------------------------------------------------------------

def test_heads_that_do_not_divide_over_tp_are_an_error_naming_plan_heads_and_axis():
    config = LlamaConfig(vocab_size=64, hidden_size=36, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3)
    model = LlamaForCausalLM(config)
    with pytest.raises(PlanError, match=r"plans\.llama\(tp='tp'\): the model's 9 attention "
                       r"heads .* do not divide over mesh axis 'tp' \(size 2\)"):
        P.shard(model, mesh_of(tp=2), P.plans.llama(tp="tp"))


def test_a_dimension_that_does_not_divide_stays_whole_and_the_plan_says_so():
    """ZeRO on dp=3 moves to a dimension that divides, else leaves the value replicated; the
    plan describes each such parameter (tests/test_parallel_vocab.py trains such plans)."""
    model = model_for()
    mesh, plan = mesh_of(dp=3), P.plans.llama(dp="dp", zero=3)
    shardings = plan.param_shardings(model, mesh)
    assert shardings["model.embed_tokens.weight"].spec == P.PartitionSpec(None, None)
    assert shardings["model.layers.0.self_attn.k_proj.weight"].spec == \
        P.PartitionSpec(None, None)  # [16, 32]
    described = plan.describe(model, mesh)
    assert re.search(r"model\.embed_tokens\.weight \(64, 32\): ZeRO leaves it replicated "
                     r"over mesh axis 'dp' \(size 3\)", described), described
    state = plan.state_shardings(ember.optim.AdamW().init(model.trainable_parameters()), mesh)
    assert state.exp_avg["model.embed_tokens.weight"].spec == P.PartitionSpec(None, None)


def test_bad_plans_are_errors():
    with pytest.raises(PlanError, match="sp=True.*give tp"):
        P.plans.llama(dp="dp", sp=True)
    with pytest.raises(PlanError, match="ZeRO stage 2 .* give dp"):
        P.plans.llama(tp="tp", zero=2)
    with pytest.raises(PlanError, match="zero must be 0, 1, 2 or 3"):
        P.plans.llama(dp="dp", zero=4)
    with pytest.raises(PlanError, match=r"mesh axis 'tp' is not in"):
        P.shard(model_for(), mesh_of(dp=2), P.plans.llama(dp="dp", tp="tp"))


def test_without_a_plan_the_named_points_change_nothing():
    model = model_for()
    ids = batches(1, 1)[0][0]
    graph = str(ember.jit(lambda m, b: m.loss(b)).lower(model, ids).graph)
    assert "sharding_constraint" not in graph


@pytest.mark.parametrize("dp", [1, 2])
def test_sequence_parallel_step_moves_tensor_parallels_bytes_without_all_to_alls(dp):
    """Megatron-SP: each all-reduce of tp's training step becomes a reduce-scatter and an
    all-gather of half its bytes each, so the step moves what tp's does. The plan's conjugate
    points make the backward pass gather where the forward scatters (and the reverse):
    without them a sequence-split gradient met the column-split weights, which were gathered,
    and the MLP's and attention's gradients were moved by all-to-alls."""
    mesh = mesh_of(dp=dp, tp=2)
    sp = assert_same_training(P.plans.llama(dp="dp", tp="tp", sp=True), mesh, steps=2).explain()
    tp = Run(P.plans.llama(dp="dp", tp="tp"), mesh).explain()
    assert "all_to_all" not in sp.counts()
    assert not [c for c in sp.collectives if c.kind == "all_gather" and len(local_shape(c)) < 3]
    assert abs(sp.total_bytes - tp.total_bytes) <= 0.1 * tp.total_bytes
    # Forward: the embedding's scatter, a gather and a scatter per block half, the final
    # norm's gather; backward, each the other way round.
    hidden = [c.kind for c in hidden_collectives(sp, "tp")]
    assert hidden.count("reduce_scatter") == hidden.count("all_gather") == 2 * (2 * LAYERS + 1)


@pytest.mark.parametrize("plan, axes", [(dict(dp="dp", zero=3), dict(dp=2)),
                                        (dict(tp="tp", sp=True), dict(tp=2))],
                         ids=["zero3-dp2", "tp2-sp"])
def test_a_forward_only_program_partitions_the_plans_custom_derivative_points(plan, axes):
    """Outside differentiation (an evaluation loss) the plan's ``custom_vjp`` points (ZeRO-3's
    gathered layer, sequence parallelism's conjugate pairs) are calls of their functions:
    partitioned, not replicated with every operand gathered, and the loss is one device's."""
    plan, mesh = P.plans.llama(**plan), mesh_of(**axes)
    p = forward_program(plan, mesh)
    assert not p.explanation.replicated
    model, ids = model_for(), batches(1, 1)[0][0]
    loss, = P.simulate(p, *[np.asarray(x) for x in tree_leaves((model, ids))])
    np.testing.assert_allclose(loss, np.asarray(model.loss(ids)), rtol=1e-5)
