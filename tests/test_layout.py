"""Layout rules: parameters placed over the logical cores by name pattern, kept by run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from flax.training import train_state
from jax.sharding import PartitionSpec as P

import tpustrat as ts

CORE_MESHES = [(4, 2), (2, 4), (1, 8)]
CORE_MESH_IDS = ["4x2", "2x4", "1x8"]
GLOBAL_BATCH, STEPS = 16, 10
OPTIMIZER = optax.adam(0.01)


class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = jax.nn.relu(linen.Dense(32, name="dense_0")(x))
        return linen.Dense(4, name="dense_1")(x)


MLP_RULES = ts.LayoutRules(
    [(r"dense_0/kernel", (None, "logical_core")), (r"dense_1/kernel", ("logical_core", None))]
)
ATTENTION_RULES = ts.LayoutRules(
    [
        (r"attention/(query|key|value)", (None, "logical_core", None)),
        (r"attention/out", ("logical_core", None, None)),
        (r"mlp/wi", (None, "logical_core")),
        (r"mlp/wo", ("logical_core", None)),
    ]
)


def _attention_params(rng, d=16, heads=8, head_dim=4):
    normal = lambda *shape: (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)
    return {
        "attention": {
            "query": normal(d, heads, head_dim),
            "key": normal(d, heads, head_dim),
            "value": normal(d, heads, head_dim),
            "out": normal(heads, head_dim, d),
        },
        "mlp": {"wi": normal(d, 4 * d), "wo": normal(4 * d, d)},
        "scale": np.ones(d, np.float32),
    }


def _attention(params, x):
    """One pre-norm attention block and MLP over ``x`` of shape (batch, time, d)."""
    a = params["attention"]
    h = x * params["scale"] / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    q, k, v = (jnp.einsum("btd,dhk->bthk", h, a[name]) for name in ("query", "key", "value"))
    weights = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k) / 2.0, axis=-1)
    x = x + jnp.einsum("bhts,bshk,hkd->btd", weights, v, a["out"])
    return x + jax.nn.gelu(x @ params["mlp"]["wi"]) @ params["mlp"]["wo"]


def _mlp_case(rng):
    model = LinenMLP()
    params = model.init(jax.random.key(0), np.zeros((1, 8), np.float32))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=OPTIMIZER)
    x = rng.normal(size=(STEPS, GLOBAL_BATCH, 8)).astype(np.float32)
    y = rng.normal(size=(STEPS, GLOBAL_BATCH, 4)).astype(np.float32)

    def step(state, batch):
        xb, yb = batch
        loss = lambda p: jnp.sum((state.apply_fn(p, xb) - yb) ** 2) / GLOBAL_BATCH
        grads = ts.get_replica_context().all_reduce("sum", jax.grad(loss)(state.params))
        return state.apply_gradients(grads=grads)

    return state, step, list(zip(x, y)), MLP_RULES


def _attention_case(rng):
    params = _attention_params(rng)
    x = rng.normal(size=(STEPS, GLOBAL_BATCH, 4, 16)).astype(np.float32)
    y = rng.normal(size=(STEPS, GLOBAL_BATCH, 4, 16)).astype(np.float32)

    def step(state, batch):
        (params, opt_state), (xb, yb) = state, batch
        assert params["attention"]["query"].shape == (16, 8, 4)  # the step sees whole weights
        loss = lambda p: jnp.sum((_attention(p, xb) - yb) ** 2) / GLOBAL_BATCH
        grads = ts.get_replica_context().all_reduce("sum", jax.grad(loss)(params))
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return (params, OPTIMIZER.init(params)), step, list(zip(x, y)), ATTENTION_RULES


def _train(strategy, state, step, data):
    """``STEPS`` steps on ``data``: global batches, or batches the strategy distributed."""
    if not isinstance(data[0][0], ts.PerReplica):
        data = strategy.experimental_distribute_dataset(data)
    for batch in data:
        state = strategy.run(step, args=(state, batch))
    return state


def _tiles(tree):
    return [{s.data.shape for s in leaf.addressable_shards} for leaf in jax.tree.leaves(tree)]


@pytest.mark.parametrize("mesh_shape", CORE_MESHES, ids=CORE_MESH_IDS)
@pytest.mark.parametrize("case", [_mlp_case, _attention_case], ids=["linen_mlp", "attention"])
def test_adam_training_with_placed_params_equals_the_unplaced_model(
    mesh_shape, case, compile_count
):
    cores = mesh_shape[1]
    reference = ts.TPUStrategy(num_logical_cores=cores)
    state, step, data, rules = case(np.random.default_rng(0))
    want = _train(reference, reference.replicate(state), step, data)

    strategy = ts.TPUStrategy(num_logical_cores=cores)
    placed = strategy.place_params(state, rules)
    shardings = [leaf.sharding for leaf in jax.tree.leaves(placed)]
    tiles = _tiles(placed)
    batches = list(strategy.experimental_distribute_dataset(data))
    compiled = compile_count()
    got = _train(strategy, placed, step, batches)
    assert compile_count() - compiled == 1  # one XLA program for the ten steps

    assert [leaf.sharding for leaf in jax.tree.leaves(got)] == shardings  # the layout is kept
    assert _tiles(got) == tiles
    assert any(
        len(shapes) == 1 and shapes != {np.shape(leaf)}
        for shapes, leaf in zip(tiles, jax.tree.leaves(state))
    )  # some leaves really are tiled
    stats = strategy.compile_stats()
    assert (stats.num_compiles, stats.num_cache_hits) == (1, STEPS - 1)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if case is _mlp_case:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
        else:
            # XLA sums the tiled contractions in another order (a few ulps in the gradients),
            # and Adam's normalisation magnifies that in the few gradient entries that cancel
            # to near zero: equal to rtol 1e-6 in norm, leaf by leaf.
            assert np.linalg.norm(g - w) <= 1e-6 * np.linalg.norm(w)


def test_placed_kernel_is_tiled_in_the_compiled_program():
    strategy = ts.TPUStrategy(num_logical_cores=4)
    state, step, data, rules = _mlp_case(np.random.default_rng(0))
    placed = strategy.place_params(state, rules)
    batch = next(iter(strategy.experimental_distribute_dataset(data)))
    text = (
        jax.jit(lambda s, b: strategy.run(step, args=(s, b)))
        .lower(placed, batch)
        .compile()
        .as_text()
    )
    assert "f32[8,8]" in text  # dense_0's (8, 32) kernel, one column tile per core
    assert {
        s.data.shape for s in placed.params["params"]["dense_0"]["kernel"].addressable_shards
    } == {(8, 8)}


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.dense_0 = nnx.Linear(8, 32, rngs=rngs)
        self.dense_1 = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.dense_1(jax.nn.relu(self.dense_0(x)))


def _nnx_step(model, optimizer, batch):
    xb, yb = batch
    loss = lambda m: jnp.sum((m(xb) - yb) ** 2) / GLOBAL_BATCH
    grads = ts.get_replica_context().all_reduce("sum", nnx.grad(loss)(model))
    optimizer.update(model, grads)


@pytest.mark.parametrize("mesh_shape", CORE_MESHES, ids=CORE_MESH_IDS)
def test_nnx_module_and_optimizer_placed_in_place(mesh_shape):
    cores = mesh_shape[1]
    rng = np.random.default_rng(1)
    data = list(
        zip(
            rng.normal(size=(STEPS, GLOBAL_BATCH, 8)).astype(np.float32),
            rng.normal(size=(STEPS, GLOBAL_BATCH, 4)).astype(np.float32),
        )
    )

    def train(strategy, place):
        model = NNXMLP(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, OPTIMIZER, wrt=nnx.Param)
        if place:
            assert strategy.place_params((model, optimizer), MLP_RULES)[0] is model
        else:
            strategy.replicate((model, optimizer))
        before = [x.sharding for x in jax.tree.leaves(nnx.state((model, optimizer)))]
        for batch in strategy.experimental_distribute_dataset(data):
            strategy.run(_nnx_step, args=(model, optimizer, batch))
        after = [x.sharding for x in jax.tree.leaves(nnx.state((model, optimizer)))]
        assert after == before
        return model, optimizer

    reference = ts.TPUStrategy(num_logical_cores=cores)
    want_model, want_optimizer = train(reference, place=False)
    strategy = ts.TPUStrategy(num_logical_cores=cores)
    model, optimizer = train(strategy, place=True)
    kernel = model.dense_0.kernel[...]
    assert {s.data.shape for s in kernel.addressable_shards} == {(8, 32 // cores)}
    mu = optimizer.opt_state[0].mu["dense_1"]["kernel"][...]
    assert {s.data.shape for s in mu.addressable_shards} == {(32 // cores, 4)}
    assert strategy.compile_stats().num_compiles == 1
    got = jax.tree.leaves(nnx.state((model, optimizer)))
    want = jax.tree.leaves(nnx.state((want_model, want_optimizer)))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)


def test_one_core_per_replica_places_everything_whole():
    strategy = ts.TPUStrategy()
    state, step, data, rules = _attention_case(np.random.default_rng(0))
    placed = strategy.place_params(state, rules)
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(placed))
    _train(strategy, placed, step, data[:3])
    assert strategy.compile_stats().num_compiles == 1


def test_describe_names_the_rule_of_every_leaf():
    rules = ts.LayoutRules(
        [
            (r"dense_\d+/kernel", (None, "logical_core")),
            (r"embedding", ("logical_core", None)),
        ]
    )
    params = {"dense_0": {"kernel": np.ones((8, 4)), "bias": np.ones(4)}, "head": np.ones(3)}
    assert rules.describe(params).splitlines() == [
        "dense_0/bias    (4,)    default  P()",
        "dense_0/kernel  (8, 4)  rule 0   P(None, 'logical_core')  'dense_\\\\d+/kernel'",
        "head            (3,)    default  P()",
        "rule 1 'embedding' matches no leaf",
    ]
    wrong = ts.LayoutRules([(r"bias", ("logical_core",))])
    assert "! layout rule 0 ('bias') cuts dimension 0 of dense_0/bias (shape (4,)) over 8" in (
        wrong.describe(params, num_logical_cores=8)
    )


def test_first_matching_rule_wins_and_paths_are_slash_joined():
    rules = ts.LayoutRules(
        [(r"^layers/0/", (None, None)), (r"kernel", (None, "logical_core")), (r"kernel", (None,))]
    )
    params = {"layers": [{"kernel": np.ones((2, 4))}, {"kernel": np.ones((2, 4))}]}
    specs = ts.LayoutRules(rules.rules[:2]).partition_specs(params)
    assert specs == {"layers": [{"kernel": P(None, None)}, {"kernel": P(None, "logical_core")}]}
    assert "rule 2 'kernel' matches no leaf" in rules.describe(params)  # shadowed by rule 1


@pytest.mark.parametrize(
    ("rules", "tree", "error", "message"),
    [
        (
            [(r"kernel", ("logical_core",))],
            {"kernel": np.ones((8, 4), np.float32)},
            ValueError,
            r"layout rule 0 \('kernel'\) gives kernel \(shape \(8, 4\), rank 2\) the spec "
            r"\('logical_core',\) of rank 1",
        ),
        (
            [(r"kernel", (None, "logical_core"))],
            {"kernel": np.ones((8, 6), np.float32)},
            ValueError,
            r"cuts dimension 1 of kernel \(shape \(8, 6\)\) over 4 logical cores, but 6 is not "
            r"divisible by 4; pad that dimension",
        ),
        (
            [(r"kernel", (None, "logical_core")), (r"embed", (None,))],
            {"kernel": np.ones((8, 4), np.float32)},
            ValueError,
            r"layout rule\(s\) 1 'embed' match no leaf of the tree, whose paths are: kernel",
        ),
    ],
)
def test_placement_errors(rules, tree, error, message):
    strategy = ts.TPUStrategy(num_logical_cores=4)
    with pytest.raises(error, match=message):
        strategy.place_params(tree, ts.LayoutRules(rules))


@pytest.mark.parametrize(
    ("rules", "error", "message"),
    [
        (
            [(r"kernel", (None, "model"))],
            ValueError,
            r"rule 0 \('kernel'\) has spec \(None, 'model'\) naming axis 'model': it is not an "
            r"axis of the mesh; name only \"logical_core\"",
        ),
        (
            [(r"kernel", ("replica", None))],
            ValueError,
            r"naming axis 'replica': the replica axis is data parallelism's",
        ),
        (
            [(r"kernel", ("logical_core", "logical_core"))],
            ValueError,
            r"cuts 2 dimensions over \"logical_core\"",
        ),
        ([(r"kernel(", (None,))], ValueError, r"rule 0's pattern 'kernel\(' is not a regular"),
        ([(3, (None,))], TypeError, r"rule 0's pattern must be a regular expression string"),
        ([(r"kernel", "logical_core")], TypeError, r"rule 0 \('kernel'\) has spec str"),
        ([r"kernel"], TypeError, r"rule 0 must be a \(pattern, spec\) pair, got str"),
        ({"kernel": (None,)}, TypeError, r"LayoutRules takes a list of \(pattern, spec\) pairs"),
    ],
)
def test_rule_errors(rules, error, message):
    with pytest.raises(error, match=message):
        ts.LayoutRules(rules)


def test_place_params_wants_layout_rules_and_arrays():
    strategy = ts.TPUStrategy(num_logical_cores=2)
    rules = ts.LayoutRules([(r"w", ("logical_core",))])
    with pytest.raises(TypeError, match=r"place_params takes a ts.LayoutRules, got list"):
        strategy.place_params({"w": np.ones(2)}, [("w", (None,))])
    with pytest.raises(TypeError, match=r"strategy.place_params got tree\['name'\] = 'w'"):
        strategy.place_params({"w": np.ones(2), "name": "w"}, rules)


def test_partition_specs_of_nnx_objects_next_to_arrays():
    model = NNXMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, OPTIMIZER, wrt=nnx.Param)
    specs = MLP_RULES.partition_specs({"model": model, "optimizer": optimizer, "lr": 1.0})
    assert specs["lr"] == P()
    assert specs["model"]["dense_0"]["kernel"].get_value() == P(None, "logical_core")
    assert specs["model"]["dense_0"]["bias"].get_value() == P()
    moment = specs["optimizer"]["opt_state"][0]["mu"]["dense_1"]["kernel"]
    assert moment.get_value() == P("logical_core", None)
    assert "model/dense_1/kernel  (32, 4)  rule 1" in MLP_RULES.describe({"model": model})


@pytest.mark.parametrize("mesh_shape", [(4, 2), (2, 4)], ids=["4x2", "2x4"])
def test_per_replica_blocks_are_tiled_over_the_cores_behind_the_replica_axis(mesh_shape):
    """A parameter sharded over the replicas too: each replica's rows, tiled over its cores."""
    replicas, cores = mesh_shape
    strategy = ts.TPUStrategy(num_logical_cores=cores)
    rng = np.random.default_rng(2)
    w = rng.normal(size=(32, 16)).astype(np.float32) / 4
    x = rng.normal(size=(8, 32)).astype(np.float32)
    rules = ts.LayoutRules([(r"kernel", (None, "logical_core"))])  # columns over the cores
    blocks = ts.PerReplica.from_stacked(w.reshape(replicas, 32 // replicas, 16))
    state = strategy.place_params({"kernel": blocks}, rules)
    stacked = state["kernel"].stacked
    assert {s.data.shape for s in stacked.addressable_shards} == {(1, 32 // replicas, 16 // cores)}

    def loss(whole):
        return jnp.sum(jnp.tanh(x @ whole) ** 2)

    def step(state):  # every replica sees all of x: the gathered gradient sums replicas' shares
        gather = lambda block: ts.get_replica_context().all_gather(block, axis=0)
        grad = jax.grad(lambda block: loss(gather(block)) / replicas)(state["kernel"])
        return {"kernel": state["kernel"] - 0.1 * grad}

    reference = ts.TPUStrategy(num_logical_cores=cores)
    want = {"kernel": blocks}  # blocks over the replicas only, whole on each replica's cores
    for _ in range(3):
        state = strategy.run(step, args=(state,))
        want = reference.run(step, args=(want,))
    assert state["kernel"].stacked.sharding == stacked.sharding
    assert strategy.compile_stats().num_compiles == 1
    got, want = np.asarray(state["kernel"].stacked), np.asarray(want["kernel"].stacked)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
