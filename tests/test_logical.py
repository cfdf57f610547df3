"""Logical-core annotations: tiling checked in the compiled program, identity numerics, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import io_callback
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpustrat as ts


def _per_device_shapes(strategy, step, *args):
    lowered = jax.jit(lambda *a: strategy.run(step, args=a)).lower(*args)
    return set(re.findall(r"f32\[([0-9,]*)\]", lowered.compile().as_text()))


@pytest.mark.parametrize(
    ("cores", "dims", "tile"),
    [
        (2, [1, 2], "8,8"),
        (4, [2, 2], "4,8"),
        (4, [1, 4], "8,4"),
        (8, [2, 4], "4,4"),
        (8, [8, 1], "1,16"),
    ],
)
def test_split_tiles_the_compiled_program(cores, dims, tile):
    strategy = ts.TPUStrategy(num_logical_cores=cores)

    def step(x):
        y = strategy.experimental_split_to_logical_devices(jnp.sin(x), dims)
        return jnp.cos(y) * 2

    x = jnp.ones((8, 16), jnp.float32)
    assert tile in _per_device_shapes(strategy, step, x)


def test_split_of_rank_four_tiles_two_by_four_in_tf_order():
    """[1, 2, 4, 1] on 8 cores: tile (i, j) lives on logical core 4 * i + j, as in TF."""
    strategy = ts.TPUStrategy(num_logical_cores=8)
    x = np.arange(2 * 4 * 8 * 3, dtype=np.float32).reshape(2, 4, 8, 3)

    def step(x):
        return strategy.experimental_split_to_logical_devices(x + 0.0, [1, 2, 4, 1])

    assert "2,2,2,3" in _per_device_shapes(strategy, step, x)
    out = strategy.run(step, args=(x,))
    np.testing.assert_array_equal(np.asarray(out), x)
    devices = list(strategy.mesh.devices.flat)  # one replica
    placed = {}
    for shard in out.addressable_shards:  # the result keeps the tiling
        rows, cols = shard.index[1], shard.index[2]
        placed[devices.index(shard.device)] = (rows.start // 2, cols.start // 2)
    assert placed == {core: tuple(map(int, np.unravel_index(core, (2, 4)))) for core in range(8)}


@pytest.mark.parametrize("annotate", ["split", "replicate", "assign"])
def test_annotations_are_the_identity_gradients_included(annotate):
    strategy = ts.TPUStrategy(num_logical_cores=4)

    def mark(x):
        if annotate == "split":
            return strategy.experimental_split_to_logical_devices(x, [1, 4])
        if annotate == "replicate":
            return strategy.experimental_replicate_to_logical_devices(x)
        return strategy.experimental_assign_to_logical_device(x, 3)

    def f(w, x):
        return jnp.sum(jnp.tanh(mark(x @ w)) ** 2)

    def step(w, x):
        return f(w, x), jax.grad(f)(w, x)

    w = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    x = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    value, grad = strategy.run(step, args=(w, x))
    np.testing.assert_allclose(float(value), float(_plain(w, x)), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(grad), np.asarray(jax.grad(_plain)(w, x)), rtol=1e-5, atol=1e-6
    )


def _plain(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda s, x: s.experimental_split_to_logical_devices(x, [1, 2, 2]),
            ValueError,
            r"partition_dimensions \[1, 2, 2\] has 3 entries but the tensor has rank 2",
        ),
        (
            lambda s, x: s.experimental_split_to_logical_devices(x, [1, 2]),
            ValueError,
            r"multiply to 2 but each replica has 4 logical cores",
        ),
        (
            lambda s, x: s.experimental_split_to_logical_devices(x, [4, 1]),
            ValueError,
            r"dimension 0 of the tensor has size 6, which is not divisible by "
            r"partition_dimensions\[0\]=4",
        ),
        (
            lambda s, x: s.experimental_split_to_logical_devices(x, [0, 4]),
            ValueError,
            r"partition_dimensions\[0\] must be an int >= 1, got 0",
        ),
        (
            lambda s, x: s.experimental_split_to_logical_devices(x, [1, 2.7]),
            TypeError,
            r"partition_dimensions\[1\] must be an int, got float 2\.7; pass a whole number",
        ),
        (
            lambda s, x: s.experimental_split_to_logical_devices(x, "14"),
            TypeError,
            r"partition_dimensions must be a list of ints, got str '14'; pass one int per",
        ),
        (
            lambda s, x: s.experimental_assign_to_logical_device(x, 4),
            ValueError,
            r"logical_device_id 4 is out of range: each replica has 4 logical cores",
        ),
        (
            lambda s, x: s.experimental_assign_to_logical_device(x, "1"),
            TypeError,
            r"logical_device_id must be an int, got str '1'",
        ),
    ],
)
def test_validation(call, error, message):
    strategy = ts.TPUStrategy(num_logical_cores=4)
    with pytest.raises(error, match=message):
        strategy.run(lambda x: call(strategy, x), args=(np.ones((6, 8), np.float32),))


def test_assign_is_refused_in_spmd_mode():
    strategy = ts.TPUStrategy(num_logical_cores=2, spmd=True)
    with pytest.raises(ValueError, match="not available with spmd=True"):
        strategy.run(lambda x: strategy.experimental_assign_to_logical_device(x, 0), args=(1.0,))


def test_annotations_outside_run_are_refused():
    strategy = ts.TPUStrategy(num_logical_cores=2)
    with pytest.raises(
        RuntimeError, match=r"call it inside the function you pass to strategy\.run"
    ):
        strategy.experimental_split_to_logical_devices(jnp.ones((2, 2)), [1, 2])


def test_split_that_does_not_fit_the_core_factors():
    strategy = ts.TPUStrategy(devices=jax.devices()[:6], num_logical_cores=6)  # factored 2 x 3
    with pytest.raises(
        ValueError, match=r"cannot be laid out on logical cores factored as \[2, 3\]"
    ):
        strategy.run(
            lambda x: strategy.experimental_split_to_logical_devices(x, [3, 2]),
            args=(np.ones((6, 6), np.float32),),
        )


@pytest.mark.parametrize("shape", [[1, 1, 1, 2], [1, 1, 1, 4]])
def test_strategy_from_device_assignment(shape):
    topology = ts.Topology.from_devices(jax.devices())
    cores = int(np.prod(shape))
    assignment = ts.DeviceAssignment.build(
        topology, computation_shape=shape, num_replicas=8 // cores
    )
    strategy = ts.TPUStrategy(device_assignment=assignment, spmd=True)
    assert strategy.num_replicas_in_sync == 8 // cores
    assert strategy.num_logical_cores == cores
    assert strategy.experimental_device_assignment is assignment
    grid = strategy.mesh.devices.reshape(strategy.num_replicas_in_sync, cores)
    assert [[d.id for d in row] for row in grid] == [
        [d.id for d in row] for row in assignment.devices
    ]
    with pytest.raises(ValueError, match="either device_assignment or devices"):
        ts.TPUStrategy(devices=jax.devices(), device_assignment=assignment)


OPTIMIZER = optax.sgd(0.2, momentum=0.9)
WIDE = 64


def _mlp(params, x):
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def _loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(_mlp(params, x), y)


@pytest.mark.parametrize("mesh_shape", [(4, 2), (2, 4)], ids=["4x2", "2x4"])
def test_model_parallel_training_equals_one_device(mesh_shape):
    """A wide Dense layer split across each replica's cores, data parallel across replicas."""
    replicas, cores = mesh_shape
    strategy = ts.TPUStrategy(num_logical_cores=cores)
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(5, WIDE)).astype(np.float32) * 0.3,
        "b1": np.zeros(WIDE, np.float32),
        "w2": rng.normal(size=(WIDE, 3)).astype(np.float32) * 0.3,
        "b2": np.zeros(3, np.float32),
    }
    x = rng.normal(size=(10, 16, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=(10, 16)).astype(np.int32)

    @jax.jit
    def reference_step(params, opt_state, xb, yb):
        grads = jax.grad(lambda p: _loss(p, xb, yb).mean())(params)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    want, opt_state = params, OPTIMIZER.init(params)
    for t in range(10):
        want, opt_state = reference_step(want, opt_state, x[t], y[t])

    def split_params(p):
        return dict(
            p,
            w1=strategy.experimental_split_to_logical_devices(p["w1"], [1, cores]),
            b1=strategy.experimental_split_to_logical_devices(p["b1"], [cores]),
            w2=strategy.experimental_split_to_logical_devices(p["w2"], [cores, 1]),
        )

    def train_step(state, batch):
        (p, opt_state), (xb, yb) = state, batch
        loss = lambda p: _loss(split_params(p), xb, yb).sum() / 16
        grads = ts.get_replica_context().all_reduce("sum", jax.grad(loss)(p))
        updates, opt_state = OPTIMIZER.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    state = strategy.replicate((params, OPTIMIZER.init(params)))
    per_replica = 16 // replicas
    for t in range(10):
        batch = (
            ts.PerReplica.from_stacked(x[t].reshape(replicas, per_replica, 5)),
            ts.PerReplica.from_stacked(y[t].reshape(replicas, per_replica)),
        )
        state = strategy.run(train_step, args=(state, batch))
    got = {k: np.asarray(v) for k, v in state[0].items()}
    stats = strategy.compile_stats()  # the updated state keeps its layout: no second program
    assert (stats.num_compiles, stats.num_cache_hits) == (1, 9)
    for k in params:
        np.testing.assert_allclose(got[k], np.asarray(want[k]), rtol=2e-5, atol=1e-6)
    text = (
        jax.jit(lambda s, b: strategy.run(train_step, args=(s, b)))
        .lower(state, batch)
        .compile()
        .as_text()
    )
    assert f"f32[5,{WIDE // cores}]" in text  # the wide layer really is split across the cores


def test_annotating_with_another_strategy_is_refused():
    runner, other = ts.TPUStrategy(), ts.TPUStrategy(num_logical_cores=4)
    with pytest.raises(ValueError, match="annotate with the strategy that runs the step"):
        runner.run(
            lambda v: other.experimental_split_to_logical_devices(v, [1, 4]),
            args=(np.ones((4, 4), np.float32),),
        )


def test_datasets_and_values_share_one_program_on_factored_cores():
    """Batches from a dataset and from values_from_function live on the same mesh."""
    strategy = ts.TPUStrategy(num_logical_cores=4)
    rows = np.arange(8, dtype=np.float32).reshape(2, 4)
    from_values = strategy.experimental_distribute_values_from_function(
        lambda ctx: rows[ctx.replica_id_in_sync_group]
    )
    (from_dataset,) = strategy.experimental_distribute_dataset([rows.reshape(8)])
    step = lambda x: ts.get_replica_context().all_reduce("sum", x)
    for batch in (from_values, from_dataset, from_values, from_dataset):
        np.testing.assert_array_equal(np.asarray(strategy.run(step, args=(batch,))), rows.sum(0))
    stats = strategy.compile_stats()
    assert (stats.num_compiles, stats.num_cache_hits) == (1, 3)


def test_host_callbacks_run_with_logical_cores(strategy, capfd):
    """TF's test_spmd_with_outside_comp: a host computation inside the step, on any mesh."""
    seen = []

    def host_inc(x):
        seen.append(int(x))
        return x + 1

    def fn(x):
        y = x + 1
        z = jax.pure_callback(host_inc, jax.ShapeDtypeStruct((), jnp.int32), y)
        z = io_callback(lambda v: v, jax.ShapeDtypeStruct((), jnp.int32), z)
        jax.debug.print("host sees {z}", z=z)
        return z + 1

    out = strategy.run(fn, args=(np.int32(0),))
    n = strategy.num_replicas_in_sync
    assert int(strategy.reduce("sum", out)) == 3 * n
    jax.effects_barrier()
    assert seen == [1] * 8  # once per device: every core of a replica computes the whole step
    assert capfd.readouterr().out.count("host sees 2") == 8


def test_host_callback_with_logical_core_annotations_is_refused():
    strategy = ts.TPUStrategy(num_logical_cores=2)

    def fn(x):
        x = strategy.experimental_split_to_logical_devices(x, [2])
        return jax.pure_callback(lambda v: v + 1, jax.ShapeDtypeStruct((4,), jnp.float32), x)

    with pytest.raises(ValueError, match="JAX runs host callbacks only where every mesh axis"):
        strategy.run(fn, args=(np.zeros(4, np.float32),))


@pytest.mark.parametrize("cores", [2, 4])
@pytest.mark.parametrize("placement", ["whole", "split"])
def test_gradients_through_annotations_with_parameters_whole_or_split(cores, placement):
    """jax.grad through split and replicate annotations, parameters placed whole or split."""
    strategy = ts.TPUStrategy(num_logical_cores=cores)
    rng = np.random.default_rng(0)
    params = {
        "w": rng.normal(size=(3, 8 * cores)).astype(np.float32),
        "v": rng.normal(size=(8 * cores, 1)).astype(np.float32),
    }
    x = rng.normal(size=(16, 3)).astype(np.float32)

    def forward(p, xb):
        w = strategy.experimental_split_to_logical_devices(p["w"], [1, cores])
        hidden = strategy.experimental_replicate_to_logical_devices(jnp.tanh(xb @ w))
        return hidden @ p["v"]

    def train_step(p, xb):
        grads = jax.grad(lambda p: forward(p, xb).sum() / 16)(p)
        grads = ts.get_replica_context().all_reduce("sum", grads)
        return jax.tree.map(lambda a, g: a - 0.1 * g, p, grads)

    want = params
    for _ in range(3):
        grads = jax.grad(lambda p: (jnp.tanh(x @ p["w"]) @ p["v"]).sum() / 16)(want)
        want = jax.tree.map(lambda a, g: a - 0.1 * g, want, grads)
    state = strategy.replicate(params)
    if placement == "split":
        tiled = NamedSharding(strategy.mesh, P(None, strategy.logical_core_axes))
        state = dict(state, w=jax.device_put(params["w"], tiled))
    batch = next(iter(strategy.experimental_distribute_dataset([x])))
    for _ in range(3):
        state = strategy.run(train_step, args=(state, batch))
    assert strategy.compile_stats().num_compiles == 1
    per_device = {s.data.shape for s in state["w"].addressable_shards}
    assert per_device == ({(3, 8)} if placement == "split" else {(3, 8 * cores)})
    for k in params:
        np.testing.assert_allclose(np.asarray(state[k]), np.asarray(want[k]), rtol=2e-5, atol=1e-6)
