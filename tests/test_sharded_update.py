"""Weight-update sharding: reduce_scatter, and ts.shard_update against plain data parallelism."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SEVERAL_REPLICAS, TWO_MESH_SHAPES, mesh_id, per_replica_rows

import tpustrat as ts

GLOBAL_BATCH = 32
STEPS = 20


def _strategy(shape):
    return ts.TPUStrategy(num_logical_cores=shape[1])


def _plain(tree):
    """run's replicated outputs as plain arrays, whether or not they come wrapped in Mirrored."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, ts.Mirrored) else x,
        tree,
        is_leaf=lambda x: isinstance(x, ts.Mirrored),
    )


# reduce_scatter --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SEVERAL_REPLICAS, ids=mesh_id)
@pytest.mark.parametrize("op", ["sum", "mean"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_reduce_scatter_matches_numpy(shape, op, axis):
    strategy = _strategy(shape)
    n = strategy.num_replicas_in_sync
    data = np.random.default_rng(0).normal(size=(n, 8, 2 * n)).astype(np.float32)
    out = strategy.run(
        lambda x: ts.get_replica_context().reduce_scatter(op, {"x": x}, axis),
        args=(per_replica_rows(strategy, data),),
    )
    total = data.sum(0) if op == "sum" else data.mean(0)
    blocks = np.split(total, n, axis=axis)
    for got, want in zip(strategy.experimental_local_results(out["x"]), blocks):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_reduce_scatter_inverts_all_gather():
    strategy = ts.TPUStrategy()
    data = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)

    def step(x):
        ctx = ts.get_replica_context()
        return ctx.reduce_scatter("sum", ctx.all_gather(x, 0), 0)

    out = strategy.run(step, args=(per_replica_rows(strategy, data),))
    got = np.stack([np.asarray(v) for v in strategy.experimental_local_results(out)])
    np.testing.assert_allclose(got, 8 * data)


def test_reduce_scatter_errors():
    strategy = ts.TPUStrategy()
    ctx = ts.get_replica_context

    with pytest.raises(ValueError, match=r"axis 2 is out of range for a value of shape \(8,\)"):
        strategy.run(lambda: ctx().reduce_scatter("sum", jnp.ones(8), 2))
    with pytest.raises(ValueError, match="a scalar has no axis"):
        strategy.run(lambda: ctx().reduce_scatter("sum", jnp.ones(()), 0))
    with pytest.raises(ValueError, match=r"length 6, which is not divisible by 8 replicas"):
        strategy.run(lambda: ctx().reduce_scatter("mean", jnp.ones((2, 6)), 1))
    with pytest.raises(ValueError, match="supports the reduce ops 'sum' and 'mean', got 'max'"):
        strategy.run(lambda: ctx().reduce_scatter("max", jnp.ones(8), 0))
    seen = {}
    strategy.run(lambda: seen.setdefault("ctx", ctx()).num_replicas_in_sync)
    with pytest.raises(RuntimeError, match=r"reduce_scatter was used outside strategy\.run"):
        seen["ctx"].reduce_scatter("sum", jnp.ones(8), 0)


# shard_update ----------------------------------------------------------------------------------


def _no_decay_on_vectors(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(0.01),
    "adamw": lambda: optax.adamw(0.01, weight_decay=0.1),
    "adamw_mask": lambda: optax.adamw(0.01, weight_decay=0.1, mask=_no_decay_on_vectors),
    "clip_adam": lambda: optax.chain(optax.clip_by_global_norm(0.05), optax.adam(0.01)),
    "multisteps": lambda: optax.MultiSteps(optax.adam(0.01), every_k_schedule=3),
}


def _params():
    rng = np.random.default_rng(1)
    return {  # shapes that divide the replicas along different axes, or not at all
        "w1": rng.normal(size=(6, 16)).astype(np.float32),
        "b1": np.zeros(16, np.float32),
        "w2": rng.normal(size=(16, 3)).astype(np.float32) / 4,
        "b2": np.zeros(3, np.float32),
        "scale": np.float32(1.0),
    }


def _batches(steps):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(steps, GLOBAL_BATCH, 6)).astype(np.float32)
    y = rng.normal(size=(steps, GLOBAL_BATCH, 3)).astype(np.float32)
    return x, y


def _loss(params, x, y):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean(((hidden @ params["w2"] + params["b2"]) * params["scale"] - y) ** 2)


def _train(strategy, tx, params, opt_state, batches, sharded):
    """Trains on ``batches`` (global arrays split evenly over the replicas); returns the state."""

    def step(params, opt_state, x, y):
        grads = jax.grad(_loss)(params, x, y)
        if not sharded:  # plain data parallelism: all-reduce, then the same update everywhere
            grads = ts.get_replica_context().all_reduce("mean", grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    n = strategy.num_replicas_in_sync
    for x, y in zip(*batches):
        x, y = (per_replica_rows(strategy, np.split(a, n)) for a in (x, y))
        params, opt_state = strategy.run(step, args=(_plain(params), opt_state, x, y))
    return _plain(params), opt_state


def _reference(shape, name, steps=STEPS):
    strategy = _strategy(shape)
    tx = OPTIMIZERS[name]()
    params = strategy.replicate(_params())
    state = strategy.run(tx.init, args=(params,))
    return _train(strategy, tx, params, state, _batches(steps), sharded=False)[0]


@pytest.mark.parametrize("shape", SEVERAL_REPLICAS, ids=mesh_id)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sharded_training_equals_data_parallel(shape, name):
    strategy = _strategy(shape)
    tx = ts.shard_update(OPTIMIZERS[name]())
    params = strategy.replicate(_params())
    state = strategy.run(tx.init, args=(params,))
    params, state = _train(strategy, tx, params, state, _batches(STEPS), sharded=True)
    want = _reference(shape, name)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(params["w1"]), _params()["w1"])  # it trained


def test_clip_by_global_norm_sees_the_global_norm():
    """One step of clip + sgd moves the parameters by exactly max_norm in global L2 norm."""
    strategy = ts.TPUStrategy()
    tx = ts.shard_update(optax.chain(optax.clip_by_global_norm(0.01), optax.sgd(1.0)))
    params = strategy.replicate(_params())
    state = strategy.run(tx.init, args=(params,))
    new, _ = _train(strategy, tx, params, state, _batches(1), sharded=True)
    moved = jax.tree.map(lambda a, b: np.asarray(a) - b, new, _params())
    norm = np.sqrt(sum(np.sum(np.square(d)) for d in jax.tree.leaves(moved)))
    np.testing.assert_allclose(norm, 0.01, rtol=1e-5)


def test_state_is_split_over_replicas():
    strategy = ts.TPUStrategy()
    tx = ts.shard_update(optax.adam(0.01))
    state = strategy.run(tx.init, args=(strategy.replicate(_params()),))
    mu = state[0].mu
    assert repr(mu["w1"]) == "ReplicaShard(PerReplica(float32[8, 6, 2]), shape=(6, 16), axis=1)"
    assert repr(mu["b2"]) == "ReplicaShard(PerReplica(float32[8, 1]), shape=(3,), axis=0)"
    assert not isinstance(mu["scale"], ts.ReplicaShard)  # a scalar stays whole
    stacked = mu["w1"].blocks.stacked
    assert stacked.sharding.spec[0] == "replica"
    assert {s.data.shape for s in stacked.addressable_shards} == {(1, 6, 2)}


def test_state_moves_to_another_replica_count():
    """10 steps on 8 replicas, reshard, 10 on 4: the same as 20 steps of data parallelism."""
    name = "adamw_mask"
    x, y = _batches(STEPS)
    eight, four = ts.TPUStrategy(), ts.TPUStrategy(jax.devices()[:4])
    tx = ts.shard_update(OPTIMIZERS[name]())
    params = eight.replicate(_params())
    state = eight.run(tx.init, args=(params,))
    params, state = _train(eight, tx, params, state, (x[:10], y[:10]), sharded=True)
    moved = ts.reshard_update_state(state, four)
    mu, before = moved[0].mu["w1"], state[0].mu["w1"]
    assert repr(mu) == "ReplicaShard(PerReplica(float32[4, 6, 4]), shape=(6, 16), axis=1)"
    np.testing.assert_array_equal(
        np.concatenate(list(np.asarray(mu.blocks.stacked)), axis=1),
        np.concatenate(list(np.asarray(before.blocks.stacked)), axis=1),
    )
    params, _ = _train(four, tx, four.replicate(params), moved, (x[10:], y[10:]), sharded=True)
    want = _reference((8, 1), name)
    for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-7)


def test_state_runs_in_experimental_run_steps():
    """Four steps in one program, state donated, equal four separate run calls."""
    strategy = ts.TPUStrategy()
    tx = ts.shard_update(optax.adam(0.01))
    x, y = _batches(4)

    def step(state, batch):
        params, opt_state = state
        updates, opt_state = tx.update(jax.grad(_loss)(params, *batch), opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), 0.0

    batches = [
        tuple(per_replica_rows(strategy, np.split(a, 8)) for a in pair) for pair in zip(x, y)
    ]
    params = strategy.replicate(_params())
    state = (params, strategy.run(tx.init, args=(params,)))
    result = strategy.run_steps(
        step, state, iter(batches), 4, options=ts.RunOptions(donate_argnums=(0,))
    )
    params = strategy.replicate(_params())
    want, _ = _train(strategy, tx, params, strategy.run(tx.init, args=(params,)), (x, y), True)
    assert result.num_steps == 4
    for got, ref in zip(jax.tree.leaves(_plain(result.state[0])), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-7)


def test_state_round_trips_through_orbax(tmp_path):
    import orbax.checkpoint as ocp

    strategy = ts.TPUStrategy(num_logical_cores=2)
    tx = ts.shard_update(optax.adam(0.01))
    params = strategy.replicate(_params())
    state = strategy.run(tx.init, args=(params,))
    params, state = _train(strategy, tx, params, state, _batches(2), sharded=True)
    state = _plain(state)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = checkpointer.restore(tmp_path / "state", abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert got.sharding == want.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    more, _ = _train(strategy, tx, params, restored, _batches(1), sharded=True)
    same, _ = _train(strategy, tx, params, state, _batches(1), sharded=True)
    for got, want in zip(jax.tree.leaves(more), jax.tree.leaves(same)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_checkpoint_from_8_replicas_restores_onto_4(tmp_path):
    """Save on 8 replicas, restore the arrays onto a 4-replica mesh, reshard, train on."""
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding

    name = "clip_adam"
    x, y = _batches(STEPS)
    eight, four = ts.TPUStrategy(), ts.TPUStrategy(jax.devices()[4:])
    tx = ts.shard_update(OPTIMIZERS[name]())
    params = eight.replicate(_params())
    state = eight.run(tx.init, args=(params,))
    params, state = _train(eight, tx, params, state, (x[:10], y[:10]), sharded=True)
    state = _plain(state)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(
                a.shape, a.dtype, sharding=NamedSharding(four.mesh, a.sharding.spec)
            ),
            state,
        )
        restored = checkpointer.restore(tmp_path / "state", target)
    moved = ts.reshard_update_state(restored, four)
    params, _ = _train(four, tx, four.replicate(params), moved, (x[10:], y[10:]), sharded=True)
    want = _reference((8, 1), name)
    for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-7)


def test_outside_run_init_is_the_plain_state_and_update_is_an_error():
    tx = ts.shard_update(optax.adam(0.01))
    state = tx.init(_params())  # what nnx.Optimizer does
    want = optax.adam(0.01).init(_params())
    assert jax.tree.structure(state) == jax.tree.structure(want)
    assert state[0].mu["w1"].shape == (6, 16)
    with pytest.raises(RuntimeError, match=r"update was called outside strategy\.run"):
        tx.update(_params(), state)


def test_refuses_what_is_not_a_transformation():
    with pytest.raises(TypeError, match="shard_update takes an optax GradientTransformation"):
        ts.shard_update(lambda g: g)


def _custom(update):
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def _one_device(tx, params, grads_per_step):
    """Plain optax on one device: the parameters and each step's updates for the global grads."""
    state, out = tx.init(params), []
    for grads in grads_per_step:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return params, out


def _sharded(strategy, tx, params, local_grads_per_step):
    """``ts.shard_update(tx)`` in ``strategy.run``; each step's gradients differ per replica."""
    sharded = ts.shard_update(tx)
    placed = strategy.replicate(params)
    state = strategy.run(sharded.init, args=(placed,))

    def step(params, state, grads):
        updates, state = sharded.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    out = []
    for local in local_grads_per_step:
        grads = per_replica_rows(strategy, local)
        placed, state, updates = strategy.run(step, args=(placed, state, grads))
        placed = _plain(placed)
        out.append(_plain(updates))
    return placed, out


ODD_PARAMS = {  # a leaf cut without padding, a padded one, one cut on its second axis, a scalar
    "a": np.linspace(-1.0, 2.0, 32, dtype=np.float32).reshape(2, 16),
    "b": np.linspace(0.5, -0.5, 7, dtype=np.float32),
    "c": np.linspace(-2.0, 1.0, 15, dtype=np.float32).reshape(3, 5),
    "s": np.float32(0.5),
}


def _local_grads(num_replicas, steps, seed=3):
    """Per-replica gradients for each step, and their means (the one-device gradients)."""
    rng = np.random.default_rng(seed)
    local, mean = [], []
    for _ in range(steps):
        per = [
            jax.tree.map(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), ODD_PARAMS)
            for _ in range(num_replicas)
        ]
        local.append(per)
        mean.append(jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *per))
    return local, mean


def _assert_trees_close(got, want, rtol=1e-6, atol=1e-6):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


def _each_leaf(fn):
    return _custom(lambda g, s, p=None: (jax.tree.map(fn, g), s))


PER_LEAF_STATISTICS = {
    "centralize": optax.centralize,
    "std": lambda: _each_leaf(lambda x: x / (jnp.std(x) + 1.0)),
    "var": lambda: _each_leaf(lambda x: x - jnp.var(x)),
    "mean_keepdims": lambda: _each_leaf(lambda x: x - jnp.mean(x, keepdims=True)),
    "mean_first_axis": lambda: _each_leaf(
        lambda x: x - jnp.mean(x, axis=0 if x.ndim else None, keepdims=True)
    ),
    "mean_last_axis": lambda: _each_leaf(
        lambda x: x - jnp.mean(x, axis=-1 if x.ndim else None, keepdims=True)
    ),
    "inverse_size": lambda: _each_leaf(lambda x: x * (1 / x.size)),
    "mask_from_size": lambda: _each_leaf(lambda x: x * 3.0 if x.size > 8 else x),
    "mask_from_shape": lambda: _each_leaf(
        lambda x: x * (jnp.arange(x.shape[-1]) < 3) if x.ndim else x
    ),
    "positions": lambda: _each_leaf(lambda x: x * jnp.arange(x.size).reshape(x.shape)),
    "noise": lambda: optax.add_noise(0.1, 0.5, 0),
    "vdot": lambda: _each_leaf(lambda x: x / (1.0 + jnp.vdot(x, x))),
    "tree_vdot": lambda: _custom(
        lambda g, s, p=None: (jax.tree.map(lambda x: x / (1 + optax.tree.vdot(g, p)), g), s)
    ),
}


@pytest.mark.parametrize("shape", TWO_MESH_SHAPES, ids=mesh_id)
@pytest.mark.parametrize("name", sorted(PER_LEAF_STATISTICS))
def test_per_leaf_statistics_are_the_whole_leafs(shape, name):
    """Counts, shapes and positions a transformation reads are the whole leaf's, not a block's."""
    strategy = _strategy(shape)
    tx = optax.chain(PER_LEAF_STATISTICS[name](), optax.sgd(0.1))
    local, mean = _local_grads(strategy.num_replicas_in_sync, steps=2)
    got_params, got = _sharded(strategy, tx, ODD_PARAMS, local)
    want_params, want = _one_device(tx, ODD_PARAMS, mean)
    _assert_trees_close(got, want)
    _assert_trees_close(got_params, want_params)


def test_centralize_subtracts_the_whole_leafs_mean():
    """optax.centralize on a (2, 16) leaf: the update is the gradient minus its row's mean."""
    strategy = ts.TPUStrategy()
    grads = {"w": np.arange(32, dtype=np.float32).reshape(2, 16)}
    _, (updates,) = _sharded(strategy, optax.centralize(), grads, [[grads] * 8])
    want = grads["w"] - grads["w"].mean(axis=1, keepdims=True)  # each row: -7.5 ... 7.5
    np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-6)
    assert float(updates["w"][0, 0]) == -7.5


@pytest.mark.parametrize(
    ("update", "primitive"),
    [
        (lambda g, s, p=None: (jax.tree.map(jnp.cumsum, g), s), "'cumsum'"),
        (lambda g, s, p=None: (jax.tree.map(lambda x: x[::-1], g), s), "'rev'"),
        (lambda g, s, p=None: (jax.tree.map(lambda x: x * jnp.argmax(x), g), s), "'argmax'"),
        (lambda g, s, p=None: (jax.tree.map(lambda x: jnp.outer(x, x)[0], g), s), "'mul'"),
        (
            lambda g, s, p=None: (jax.tree.map(lambda x: jnp.einsum("i,j->ij", x, x)[0], g), s),
            "'dot_general'",
        ),
        (lambda g, s, p=None: (jax.tree.map(jnp.sort, g), s), "'sort'"),
        (  # a strided slice, which jax 0.7 makes a gather
            lambda g, s, p=None: (jax.tree.map(lambda x: x.ravel()[::2].sum() + x, g), s),
            "'(slice|gather)'",
        ),
    ],
    ids=["cumsum", "reverse", "argmax", "outer", "einsum", "sort", "flattened"],
)
def test_fails_closed_on_updates_that_mix_blocks(update, primitive):
    """A refusal names the primitive, where the transformation made it, the leaf and the fix."""
    strategy = ts.TPUStrategy()
    tx = ts.shard_update(_custom(update))
    params = strategy.replicate({"w": np.ones(16, np.float32)})
    state = strategy.run(tx.init, args=(params,))
    x = per_replica_rows(strategy, np.ones((8, 16), np.float32))
    message = (
        rf"cannot run this transformation block by block: its {primitive} in <lambda>\S* "
        r"\(tests/test_sharded_update\.py:\d+\) on updates\['w'\] .* Use plain optax"
    )
    with pytest.raises(ValueError, match=message):
        strategy.run(
            lambda p, s, x: tx.update(jax.grad(lambda p: jnp.sum(p["w"] * x))(p), s, p),
            args=(params, state, x),
        )


def test_full_reductions_are_exact_with_padding():
    """max, min, any, sum of a 3-element leaf cut into padded blocks equal numpy's."""
    strategy = ts.TPUStrategy()
    values = np.array([-3.0, -1.0, -2.0], np.float32)  # all negative: padding zeros would win max

    def stats(g, s, p=None):
        x = g["w"]
        out = jnp.stack([jnp.max(x), jnp.min(x), jnp.sum(x), jnp.any(x > -1.5).astype(x.dtype)])
        return {"w": jnp.zeros_like(x) + jnp.sum(out * jnp.array([1000.0, 100.0, 10.0, 1.0]))}, s

    tx = ts.shard_update(_custom(stats))
    params = strategy.replicate({"w": values})
    state = strategy.run(tx.init, args=(params,))
    grads = per_replica_rows(strategy, [{"w": values}] * 8)
    out = strategy.run(lambda g, s: tx.update(g, s)[0], args=(grads, state))
    want = 1000 * -1.0 + 100 * -3.0 + 10 * -6.0 + 1.0
    np.testing.assert_allclose(np.asarray(_plain(out)["w"]), np.full(3, want), rtol=1e-6)


def test_contractions_over_the_cut_axis_are_exact():
    """A transformation that scales each leaf by its norm from a full dot_general contraction."""
    strategy = ts.TPUStrategy(num_logical_cores=2)

    def normalize(g, s, p=None):
        return jax.tree.map(lambda x: x / jnp.sqrt(jnp.tensordot(x, x, x.ndim) + 1.0), g), s

    tx = ts.shard_update(_custom(normalize))
    grads = {"w": np.arange(1.0, 19.0, dtype=np.float32).reshape(3, 6), "b": np.ones(3, np.float32)}
    state = strategy.run(tx.init, args=(strategy.replicate(grads),))
    local = per_replica_rows(strategy, [grads] * 4)
    out = _plain(strategy.run(lambda g, s: tx.update(g, s)[0], args=(local, state)))
    for key, value in grads.items():
        want = value / np.sqrt(np.sum(value**2) + 1.0)
        np.testing.assert_allclose(np.asarray(out[key]), want, rtol=1e-6)


def test_whole_state_updated_from_blocks_stays_whole():
    """A whole state leaf that an update fills from gradient blocks is all-gathered, exactly."""
    strategy = ts.TPUStrategy()
    tx = ts.shard_update(
        optax.GradientTransformation(
            lambda p: jnp.zeros((), np.float32), lambda g, s, p=None: (g, s + 2 * g["w"])
        )
    )
    params = strategy.replicate({"w": np.ones(7, np.float32)})
    state = strategy.run(tx.init, args=(params,))
    grads = np.arange(8 * 7, dtype=np.float32).reshape(8, 7)
    _, state = strategy.run(
        lambda g, s: tx.update({"w": g}, s), args=(per_replica_rows(strategy, grads), state)
    )
    assert not isinstance(state, ts.PerReplica)
    np.testing.assert_allclose(np.asarray(_plain(state)), 2 * grads.mean(0), rtol=1e-6)


def test_compiled_step_reduce_scatters_and_all_gathers():
    """The sharded Adam step sends a reduce-scatter and an all-gather, and no all-reduce."""
    strategy = ts.TPUStrategy()
    tx = ts.shard_update(optax.adam(0.01))
    params = strategy.replicate({"w": np.ones((8, 16), np.float32)})
    state = strategy.run(tx.init, args=(params,))
    x = per_replica_rows(strategy, np.ones((8, 16), np.float32))

    def step(params, state, x):
        grads = jax.grad(lambda p: jnp.sum((p["w"] * x) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    run = jax.jit(lambda p, s, x: strategy.run(step, args=(p, s, x)))
    hlo = run.lower(params, state, x).compile().as_text()
    assert "reduce-scatter(" in hlo
    assert "all-gather(" in hlo
    assert "all-reduce(" not in hlo


# Flax NNX ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", TWO_MESH_SHAPES, ids=mesh_id)
def test_nnx_optimizer_with_shard_update_trains_like_plain_adam(shape):
    """nnx.Optimizer(model, ts.shard_update(adam)) in strategy.run equals nnx.Optimizer(adam)."""
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.linear1 = nnx.Linear(6, 16, rngs=rngs)
            self.linear2 = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.linear2(jnp.tanh(self.linear1(x)))

    def loss(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    strategy = _strategy(shape)
    n = strategy.num_replicas_in_sync
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, ts.shard_update(optax.adam(0.01)), wrt=nnx.Param)
    reference = MLP(nnx.Rngs(0))
    plain = nnx.Optimizer(reference, optax.adam(0.01), wrt=nnx.Param)

    def step(model, optimizer, x, y):  # each replica's own gradients: update reduce-scatters
        optimizer.update(model, nnx.grad(loss)(model, x, y))

    @nnx.jit
    def reference_step(model, optimizer, x, y):
        optimizer.update(model, nnx.grad(loss)(model, x, y))

    x, y = _batches(4)
    for xb, yb in zip(x, y):
        local = (per_replica_rows(strategy, np.split(a, n)) for a in (xb, yb))
        strategy.run(step, args=(model, optimizer, *local))
        reference_step(reference, plain, xb, yb)
    mu = optimizer.opt_state[0].mu["linear1"]["kernel"][...]
    assert mu.shape == (6, 16) and mu.sharding.is_fully_replicated  # whole, as nnx holds it
    np.testing.assert_allclose(
        np.asarray(mu),
        np.asarray(plain.opt_state[0].mu["linear1"]["kernel"][...]),
        rtol=1e-5,
        atol=1e-7,
    )
    for got, want in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(reference))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert int(optimizer.step[...]) == 4


@pytest.mark.parametrize("reduce_op", ["mean", "sum"])
def test_reduce_op_matches_the_loss_the_replicas_compute(reduce_op):
    """MEAN for each replica's mean loss, SUM for its share from ts.compute_average_loss: both
    equal plain SGD on the global batch (SGD shows a gradient off by the replica count)."""
    strategy = ts.TPUStrategy()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(32, 7)).astype(np.float32)
    y = rng.normal(size=(32,)).astype(np.float32)
    w = rng.normal(size=(7,)).astype(np.float32)
    tx = ts.shard_update(optax.sgd(0.5), reduce_op=reduce_op)

    def step(params, state, batch):
        xb, yb = batch
        per_example = lambda p: (xb @ p["w"] - yb) ** 2
        if reduce_op == "mean":
            loss = lambda p: jnp.mean(per_example(p))
        else:
            loss = lambda p: ts.compute_average_loss(per_example(p))
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params = strategy.replicate({"w": w})
    state = strategy.run(tx.init, args=(params,))
    batch = next(iter(strategy.experimental_distribute_dataset([(x, y)])))
    params, state = strategy.run(step, args=(params, state, batch))
    grad = jax.grad(lambda w: jnp.mean((x @ w - y) ** 2))(w)
    np.testing.assert_allclose(params["w"], w - 0.5 * grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("reduce_op", "error"), [("max", ValueError), (3, TypeError)])
def test_reduce_op_is_mean_or_sum(reduce_op, error):
    with pytest.raises(error, match=r"reduce_op|reduce op"):
        ts.shard_update(optax.sgd(0.1), reduce_op=reduce_op)
