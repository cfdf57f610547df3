"""Sharded parameters (ts.shard_params, ts.gather_params) against plain data parallelism."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import tpustrat as ts

MESHES = [(8, 1), (4, 2)]
MESH_IDS = ["8x1", "4x2"]
STEPS = 20
GLOBAL_BATCH = 32
# Flax 0.12.6 names nnx.as_pure nnx.pure (a deprecated alias in later versions).
_as_pure = getattr(nnx, "as_pure", None) or nnx.pure
WIDTH, LAYERS, OUT = 12, 3, 5  # 12 divides by 4 but not 8: the 8-replica blocks are padded
RTOL, ATOL = 1e-6, 1e-7


def _strategy(shape):
    return ts.TPUStrategy(num_logical_cores=shape[1])


def _tx():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))


def _batches(strategy, steps=STEPS):
    rng = np.random.default_rng(0)
    data = [
        (
            rng.normal(size=(GLOBAL_BATCH, WIDTH)).astype(np.float32),
            rng.normal(size=(GLOBAL_BATCH, OUT)).astype(np.float32),
        )
        for _ in range(steps)
    ]
    return list(strategy.experimental_distribute_dataset(data))


def _close(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL)


# A plain pytree model: scanned layers, each gathered where it runs ------------------------------


def _pytree_params():
    rng = np.random.default_rng(1)
    return {
        "layers": {
            "w": rng.normal(size=(LAYERS, WIDTH, WIDTH)).astype(np.float32) / np.sqrt(WIDTH),
            "b": np.zeros((LAYERS, WIDTH), np.float32),
        },
        "head": rng.normal(size=(WIDTH, OUT)).astype(np.float32),
    }


def _pytree_loss(params, batch, gather):
    x, y = batch

    def layer(h, p):
        p = gather(p)  # one layer whole at a time
        return jnp.tanh(h @ p["w"] + p["b"]), None

    h, _ = jax.lax.scan(jax.checkpoint(layer), x, params["layers"])
    return jnp.mean((h @ gather(params["head"]) - y) ** 2)


@pytest.mark.parametrize("shape", MESHES, ids=MESH_IDS)
def test_pytree_model_equals_data_parallelism(shape):
    strategy = _strategy(shape)
    tx, sharded_tx = _tx(), ts.shard_update(_tx())

    def plain_step(params, opt_state, batch):
        grads = jax.grad(_pytree_loss)(params, batch, lambda p: p)
        grads = ts.get_replica_context().all_reduce("mean", grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def sharded_step(params, opt_state, batch):
        grads = jax.grad(_pytree_loss)(params, batch, ts.gather_params)
        updates, opt_state = sharded_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = strategy.replicate(_pytree_params())
    opt_state = strategy.replicate(tx.init(params))
    sharded = ts.shard_params(_pytree_params(), strategy)
    assert isinstance(sharded["layers"]["w"], ts.ReplicaShard)
    assert sharded["layers"]["w"].axis != 0  # never the layer axis
    sharded_state = strategy.run(sharded_tx.init, args=(sharded,))
    for batch in _batches(strategy):
        params, opt_state = strategy.run(plain_step, args=(params, opt_state, batch))
        sharded, sharded_state = strategy.run(sharded_step, args=(sharded, sharded_state, batch))
    assert isinstance(sharded["layers"]["w"].blocks, ts.PerReplica)
    _close(ts.gather_params(sharded), params)


def test_layout_cuts_the_last_axis_and_keeps_small_leaves_whole():
    strategy = ts.TPUStrategy()  # 8 replicas
    tree = {
        "stacked": np.zeros((3, 16, 24), np.float32),  # 24 divides by 8
        "padded": np.zeros((4, 10, 6), np.float32),  # 6 is padded to 8: blocks of 1
        "column": np.zeros((64, 1), np.float32),  # padded to 8: every block holds 64 or 0s
        "bias": np.arange(64, dtype=np.float32),  # rank 1: whole
        "count": np.zeros((), np.int32),
    }
    out = ts.shard_params(tree, strategy)
    assert (out["stacked"].axis, out["stacked"].blocks.stacked.shape) == (2, (8, 3, 16, 3))
    assert (out["padded"].axis, out["padded"].blocks.stacked.shape) == (2, (8, 4, 10, 1))
    assert (out["column"].axis, out["column"].blocks.stacked.shape) == (1, (8, 64, 1))
    for name in ("bias", "count"):
        assert out[name].sharding.is_fully_replicated
    _close(ts.gather_params(out), tree)


def test_gather_params_inside_run_is_whole_on_every_replica(strategy):
    params = np.arange(3 * 4 * 10, dtype=np.float32).reshape(3, 4, 10)
    sharded = ts.shard_params({"w": params}, strategy)
    out = strategy.run(lambda p: ts.gather_params(p)["w"], args=(sharded,))
    np.testing.assert_array_equal(np.asarray(out), params)


# Flax NNX: nnx.scan over layers, nnx.Optimizer -------------------------------------------------


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.linear(x))


class _Stack(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _Block(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(WIDTH, OUT, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def layer(x, block):
            return block(x)

        return self.head(layer(x, self.blocks))


def _nnx_loss(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


@pytest.mark.parametrize("shape", MESHES, ids=MESH_IDS)
def test_nnx_model_equals_data_parallelism(shape):
    strategy = _strategy(shape)
    model = strategy.replicate(_Stack(nnx.Rngs(0)))
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    sharded = ts.shard_params(_Stack(nnx.Rngs(0)), strategy)
    sharded_optimizer = nnx.Optimizer(sharded, ts.shard_update(_tx()), wrt=nnx.Param)

    def plain_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(_nnx_loss)(model, batch)
        optimizer.update(model, ts.get_replica_context().all_reduce("mean", grads))
        return loss

    def sharded_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(_nnx_loss)(model, batch)
        optimizer.update(model, grads)  # the blocks' gradients, summed by the reduce-scatter
        return loss

    for batch in _batches(strategy):
        want = strategy.run(plain_step, args=(model, optimizer, batch))
        got = strategy.run(sharded_step, args=(sharded, sharded_optimizer, batch))
        _close(got, want)
    kernel = sharded.blocks.linear.kernel.get_raw_value()
    assert isinstance(kernel, ts.ReplicaShard) and kernel.shape == (LAYERS, WIDTH, WIDTH)
    mu = sharded_optimizer.opt_state[1][0].mu["blocks"]["linear"]["kernel"]
    assert isinstance(mu, ts.ReplicaShard) and isinstance(mu.blocks.get_raw_value(), ts.PerReplica)
    ts.gather_params(sharded)
    assert type(sharded.blocks.linear.kernel) is nnx.Param
    _close(nnx.state(sharded, nnx.Param), nnx.state(model, nnx.Param))


# Flax Linen: nn.scan over layers wrapped in ts.gather_on_use, TrainState ----------------------


class _LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(WIDTH)(x)), None


class _LinenStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(
            nn.remat(ts.gather_on_use(_LinenBlock)),  # each layer gathered inside the scan
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=LAYERS,
        )
        x, _ = layers()(x, None)
        return ts.gather_on_use(nn.Dense)(OUT)(x)


def _linen_params():
    return _LinenStack().init(jax.random.key(0), jnp.ones((1, WIDTH)))["params"]


def _linen_loss(params, apply_fn, batch):
    x, y = batch
    return jnp.mean((apply_fn({"params": params}, x) - y) ** 2)


def _linen_plain_step(state, batch):
    grads = jax.grad(_linen_loss)(state.params, state.apply_fn, batch)
    return state.apply_gradients(grads=ts.get_replica_context().all_reduce("mean", grads))


def _linen_sharded_step(state, batch):
    grads = jax.grad(_linen_loss)(state.params, state.apply_fn, batch)
    return state.apply_gradients(grads=grads)


def _linen_states(strategy):
    apply_fn = _LinenStack().apply
    plain = strategy.replicate(
        train_state.TrainState.create(apply_fn=apply_fn, params=_linen_params(), tx=_tx())
    )
    sharded = train_state.TrainState.create(
        apply_fn=apply_fn,
        params=ts.shard_params(_linen_params(), strategy),
        tx=ts.shard_update(_tx()),
    )
    return plain, sharded


@pytest.mark.parametrize("shape", MESHES, ids=MESH_IDS)
def test_linen_model_equals_data_parallelism(shape):
    strategy = _strategy(shape)
    plain, sharded = _linen_states(strategy)
    kernel = sharded.params["ScanCheckpointMap_variables_LinenBlock_0"]["Dense_0"]["kernel"]
    assert isinstance(kernel, ts.ReplicaShard) and kernel.axis != 0
    for batch in _batches(strategy):
        plain = strategy.run(_linen_plain_step, args=(plain, batch))
        sharded = strategy.run(_linen_sharded_step, args=(sharded, batch))
    mu = sharded.opt_state[1][0].mu["ScanCheckpointMap_variables_LinenBlock_0"]["Dense_0"]
    assert isinstance(mu["kernel"].blocks, ts.PerReplica)
    assert int(sharded.step) == STEPS
    _close(ts.gather_params(sharded.params), plain.params)


# 2-D: parameters sharded over the replicas, each block tiled over its replica's logical cores ----

CORE_MESHES = [(4, 2), (2, 4)]
CORE_MESH_IDS = ["4x2", "2x4"]
PYTREE_RULES = ts.LayoutRules(
    [(r"layers/w$", (None, "logical_core", None)), (r"head$", ("logical_core", None))]
)
NNX_RULES = ts.LayoutRules(
    [
        (r"blocks/linear/kernel$", (None, "logical_core", None)),
        (r"head/kernel$", ("logical_core", None)),
    ]
)


def _tiled(tree):
    """Whether some leaf of ``tree`` is blocks, one per replica, tiled over the logical cores:
    each device holds one replica's block's share, 1/devices of the leaf."""
    return any(
        all(
            s.data.shape[0] == 1 and s.data.size * jax.device_count() == leaf.size
            for s in leaf.addressable_shards
        )
        for leaf in jax.tree.leaves(tree)
        if leaf.ndim > 1
    )


def _pytree_2d(strategy, reference, compile_count):
    tx, sharded_tx = _tx(), ts.shard_update(_tx())

    def plain_step(params, opt_state, batch):
        grads = jax.grad(_pytree_loss)(params, batch, lambda p: p)
        grads = ts.get_replica_context().all_reduce("mean", grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def sharded_step(params, opt_state, batch):
        grads = jax.grad(_pytree_loss)(params, batch, ts.gather_params)
        updates, opt_state = sharded_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    want = (reference.replicate(_pytree_params()), reference.replicate(tx.init(_pytree_params())))
    for batch in _batches(reference, steps=10):
        want = reference.run(plain_step, args=(*want, batch))
    sharded = ts.shard_params(_pytree_params(), strategy)
    state = strategy.place_params(
        (sharded, strategy.run(sharded_tx.init, args=(sharded,))), PYTREE_RULES
    )
    shardings = [leaf.sharding for leaf in jax.tree.leaves(state)]
    assert _tiled(state[0]["layers"]["w"]) and _tiled(state[1])  # the moments are tiled too
    compiled = compile_count()
    for batch in _batches(strategy, steps=10):
        state = strategy.run(sharded_step, args=(*state, batch))
    assert compile_count() - compiled == 1
    assert [leaf.sharding for leaf in jax.tree.leaves(state)] == shardings  # the layout is kept
    return ts.gather_params(state[0]), want[0]


def _nnx_2d(strategy, reference, compile_count):
    def plain_step(model, optimizer, batch):
        grads = nnx.grad(_nnx_loss)(model, batch)
        optimizer.update(model, ts.get_replica_context().all_reduce("mean", grads))

    def sharded_step(model, optimizer, batch):
        optimizer.update(model, nnx.grad(_nnx_loss)(model, batch))

    model = reference.replicate(_Stack(nnx.Rngs(0)))
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    for batch in _batches(reference, steps=10):
        reference.run(plain_step, args=(model, optimizer, batch))
    sharded = ts.shard_params(_Stack(nnx.Rngs(0)), strategy)
    sharded_optimizer = nnx.Optimizer(sharded, ts.shard_update(_tx()), wrt=nnx.Param)
    strategy.place_params((sharded, sharded_optimizer), NNX_RULES)
    state = nnx.state((sharded, sharded_optimizer))
    shardings = [leaf.sharding for leaf in jax.tree.leaves(state)]
    assert _tiled(nnx.state(sharded)) and _tiled(nnx.state(sharded_optimizer))
    compiled = compile_count()
    for batch in _batches(strategy, steps=10):
        strategy.run(sharded_step, args=(sharded, sharded_optimizer, batch))
    assert compile_count() - compiled == 1
    after = [leaf.sharding for leaf in jax.tree.leaves(nnx.state((sharded, sharded_optimizer)))]
    assert after == shardings  # the layout is kept
    return nnx.state(ts.gather_params(sharded), nnx.Param), nnx.state(model, nnx.Param)


@pytest.mark.parametrize("shape", CORE_MESHES, ids=CORE_MESH_IDS)
@pytest.mark.parametrize("case", [_pytree_2d, _nnx_2d], ids=["pytree", "nnx"])
def test_placed_sharded_params_equal_the_unplaced_unsharded_model(shape, case, compile_count):
    """shard_params, then place_params: replicas x cores, equal to plain data parallelism."""
    reference = ts.TPUStrategy(num_logical_cores=shape[1])
    got, want = case(_strategy(shape), reference, compile_count)
    _close(got, want)


def test_placing_before_sharding_is_refused():
    strategy = ts.TPUStrategy(num_logical_cores=2)
    placed = strategy.place_params(_pytree_params(), PYTREE_RULES)
    with pytest.raises(ValueError, match=r"shard first.*place_params\(ts\.shard_params\("):
        ts.shard_params(placed, strategy)
    model = strategy.place_params(_Stack(nnx.Rngs(0)), NNX_RULES)
    with pytest.raises(ValueError, match="laid out over the strategy's devices"):
        ts.shard_params(model, strategy)


# Checkpoints: sharded parameters and state restore onto another replica count -----------------


def test_checkpoint_restores_sharded_params_onto_four_replicas(tmp_path):
    eight, four = ts.TPUStrategy(), ts.TPUStrategy(num_logical_cores=2)
    _, saved = _linen_states(eight)
    for batch in _batches(eight, steps=2):
        saved = strategy_run = eight.run(_linen_sharded_step, args=(saved, batch))
    with ts.CheckpointManager(tmp_path, eight) as manager:
        manager.save(2, {"state": strategy_run})
    _, target = _linen_states(four)
    with ts.CheckpointManager(tmp_path, four) as manager:
        restored = manager.restore({"state": target})["state"]
    kernel = restored.params["ScanCheckpointMap_variables_LinenBlock_0"]["Dense_0"]["kernel"]
    assert kernel.blocks.stacked.shape[0] == 4
    _close(ts.gather_params(restored.params), ts.gather_params(saved.params))
    _close(ts.gather_params(restored.opt_state), ts.gather_params(saved.opt_state))
    # training goes on over 4 replicas as data parallelism from the same whole state would
    plain = four.replicate(
        saved.replace(params=ts.gather_params(saved.params), tx=_tx(),
                      opt_state=ts.gather_params(saved.opt_state))
    )  # fmt: skip
    batch = _batches(four, steps=1)[0]
    _close(
        ts.gather_params(four.run(_linen_sharded_step, args=(restored, batch)).params),
        four.run(_linen_plain_step, args=(plain, batch)).params,
    )


def _nnx_pytree_state_step(model, opt_state, batch):
    """An NNX step whose optimizer state is a pytree beside the model, not an nnx.Optimizer."""
    grads = nnx.grad(_nnx_loss)(model, batch)
    params = _as_pure(nnx.state(model, nnx.Param))
    updates, opt_state = ts.shard_update(_tx()).update(_as_pure(grads), opt_state, params)
    nnx.update(model, optax.apply_updates(params, updates))
    return opt_state


def _nnx_pytree_state(strategy):
    model = ts.shard_params(_Stack(nnx.Rngs(0)), strategy)
    init = ts.shard_update(_tx()).init
    opt_state = strategy.run(lambda m: init(_as_pure(nnx.state(m, nnx.Param))), args=(model,))
    return model, opt_state


def test_nnx_checkpoint_restores_onto_four_replicas(tmp_path):
    eight, four = ts.TPUStrategy(), ts.TPUStrategy(num_logical_cores=2)
    model, opt_state = _nnx_pytree_state(eight)
    for batch in _batches(eight, steps=2):
        opt_state = eight.run(_nnx_pytree_state_step, args=(model, opt_state, batch))
    with ts.CheckpointManager(tmp_path, eight) as manager:
        manager.save(2, {"model": nnx.state(model), "opt": opt_state})
    fresh_model, fresh_state = _nnx_pytree_state(four)
    with ts.CheckpointManager(tmp_path, four) as manager:
        restored = manager.restore({"model": nnx.state(fresh_model), "opt": fresh_state})
    nnx.update(fresh_model, restored["model"])
    kernel = fresh_model.blocks.linear.kernel.get_raw_value()
    assert kernel.blocks.stacked.shape[0] == 4
    _close(ts.gather_params(restored["opt"]), ts.gather_params(opt_state))
    batch = _batches(four, steps=1)[0]
    four.run(_nnx_pytree_state_step, args=(fresh_model, restored["opt"], batch))
    # the same step from the same whole state, as plain data parallelism
    plain_state = four.replicate(ts.gather_params(opt_state))
    plain = four.replicate(ts.gather_params(model))  # whole Params again, in place

    def plain_step(model, opt_state, batch):
        grads = ts.get_replica_context().all_reduce("mean", nnx.grad(_nnx_loss)(model, batch))
        params = _as_pure(nnx.state(model, nnx.Param))
        updates, opt_state = _tx().update(_as_pure(grads), opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        return opt_state

    four.run(plain_step, args=(plain, plain_state, batch))
    _close(nnx.state(ts.gather_params(fresh_model), nnx.Param), nnx.state(plain, nnx.Param))


def test_nnx_optimizer_restores_onto_four_replicas(tmp_path):
    """An nnx.Optimizer over ts.shard_update, saved on 8 replicas and restored onto 4, trains
    on as the run that stayed on 8 replicas."""
    eight = ts.TPUStrategy()
    four = ts.TPUStrategy(devices=jax.devices()[:4])

    def sharded(strategy):
        model = ts.shard_params(_Stack(nnx.Rngs(0)), strategy)
        return model, nnx.Optimizer(model, ts.shard_update(_tx()), wrt=nnx.Param)

    def step(model, optimizer, batch):
        optimizer.update(model, nnx.grad(_nnx_loss)(model, batch))

    batches = _batches(eight, steps=6)
    model, optimizer = sharded(eight)
    for batch in batches[:3]:
        eight.run(step, args=(model, optimizer, batch))
    with ts.CheckpointManager(tmp_path, eight) as manager:
        manager.save(3, nnx.state((model, optimizer)))
    for batch in batches[3:]:  # the run that never changes its replica count
        eight.run(step, args=(model, optimizer, batch))
    fewer = sharded(four)
    with ts.CheckpointManager(tmp_path, four) as manager:
        nnx.update(fewer, manager.restore(nnx.state(fewer)))
    mu = fewer[1].opt_state[1][0].mu["blocks"]["linear"]["kernel"].blocks.get_raw_value()
    assert mu.stacked.shape == (4, LAYERS, WIDTH, WIDTH // 4)
    for batch in _batches(four, steps=6)[3:]:
        four.run(step, args=(*fewer, batch))
    _close(
        nnx.state(ts.gather_params(fewer[0]), nnx.Param),
        nnx.state(ts.gather_params(model), nnx.Param),
    )


def test_gather_for_export_gives_whole_arrays_on_one_device():
    strategy = ts.TPUStrategy()
    model = ts.shard_params(_Stack(nnx.Rngs(0)), strategy)
    params = ts.gather_params(nnx.state(model, nnx.Param))
    kernel = params["blocks"]["linear"]["kernel"].get_value()
    assert kernel.shape == (LAYERS, WIDTH, WIDTH) and len(kernel.devices()) == 1
    _close(params, nnx.state(_Stack(nnx.Rngs(0)), nnx.Param))


class _Custom(nnx.Param):
    pass


def test_a_param_subclass_is_sharded_and_gathered_back_as_itself():
    strategy = ts.TPUStrategy()
    model = nnx.Linear(4, 16, rngs=nnx.Rngs(0))
    model.kernel = _Custom(model.kernel.get_value())
    ts.shard_params(model, strategy)
    assert isinstance(model.kernel, _Custom) and type(model.kernel).__name__ == "Sharded_Custom"
    x = np.ones((2, 4), np.float32)
    out = strategy.run(lambda model, x: model(x), args=(model, x))
    ts.gather_params(model)
    assert type(model.kernel) is _Custom
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(x)), rtol=RTOL, atol=ATOL)


# Misuse -----------------------------------------------------------------------------------------


def test_sharding_twice_is_refused():
    strategy = ts.TPUStrategy()
    params = ts.shard_params({"w": np.ones((2, 16), np.float32)}, strategy)
    with pytest.raises(ValueError, match=r"tree\['w'\], which is sharded already"):
        ts.shard_params(params, strategy)
    model = ts.shard_params(_Stack(nnx.Rngs(0)), strategy)
    with pytest.raises(ValueError, match="sharded already"):
        ts.shard_params(model, strategy)


def test_non_array_leaves_are_refused():
    with pytest.raises(TypeError, match=r"tree\['name'\] is .*str"):
        ts.shard_params({"w": np.ones((2, 16)), "name": "dense"}, ts.TPUStrategy())
    with pytest.raises(TypeError, match=r"strategy must be a ts\.TPUStrategy"):
        ts.shard_params({"w": np.ones((2, 16))}, "strategy")
    with pytest.raises(TypeError, match="Linen module class or instance"):
        ts.gather_on_use(nnx.Linear)


def test_params_sharded_for_another_replica_count_are_refused():
    params = ts.shard_params({"w": np.ones((2, 16), np.float32)}, ts.TPUStrategy())
    four = ts.TPUStrategy(num_logical_cores=2)
    fix = r"ts\.shard_params\(ts\.gather_params\(params\), strategy\), or save them with ts\.Ch"
    where = r"\['w'\]\.blocks is a PerReplica with 8 components.*"
    with pytest.raises(ValueError, match=where + fix):
        four.run(lambda p: ts.gather_params(p)["w"].sum(), args=(params,))
    moved = ts.shard_params(ts.gather_params(params), four)
    assert float(four.run(lambda p: ts.gather_params(p)["w"].sum(), args=(moved,))) == 32.0
    model = ts.shard_params(nnx.Linear(4, 16, rngs=nnx.Rngs(0)), ts.TPUStrategy())
    with pytest.raises(ValueError, match="sharded over 8 replicas.*" + fix):
        four.run(lambda model: model.kernel.get_value().sum(), args=(model,))
    ts.shard_params(ts.gather_params(model), four)  # the fix the error gives, for a module
    kernel = four.run(lambda model: model.kernel.get_value().sum(), args=(model,))
    whole = ts.gather_params(model).kernel.get_value().sum()
    np.testing.assert_allclose(float(kernel), float(whole), rtol=RTOL)
