"""The value model: replicated values are plain jax.Arrays; PerReplica marks per-replica ones."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import deleted_array
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpustrat as ts


def _train_state(strategy=None):
    params = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    state = train_state.TrainState.create(
        apply_fn=lambda p, x: x @ p["w"] + p["b"], params=params, tx=optax.adam(0.1)
    )
    return state if strategy is None else strategy.replicate(state)


def _fit_step(state, x):
    ctx = ts.get_replica_context()
    grads = jax.grad(lambda p: (state.apply_fn(p, x) ** 2).mean())(state.params)
    return state.apply_gradients(grads=ctx.all_reduce("mean", grads))


def _batch(strategy, seed=0):
    rng = np.random.default_rng(seed)
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: rng.normal(size=(4, 3)).astype(np.float32)
    )


def _assert_replicated(tree, strategy):
    for leaf in jax.tree.leaves(tree):
        assert type(leaf).__name__ == "ArrayImpl", type(leaf)
        assert leaf.sharding.is_fully_replicated
        assert leaf.sharding.device_set == set(strategy.mesh.devices.flat)


def test_replicate_keeps_the_structure(strategy):
    state = _train_state(strategy)
    assert isinstance(state, train_state.TrainState)
    assert int(state.step) == 0  # attribute access works on the replicated state
    _assert_replicated(state, strategy)
    nested = strategy.replicate({"a": [1.0, np.arange(3)], "b": (np.int32(2),)})
    assert jax.tree.structure(nested) == jax.tree.structure({"a": [0, 0], "b": (0,)})
    _assert_replicated(nested, strategy)


def test_run_returns_the_state_type_with_replicated_leaves(strategy):
    state = _train_state(strategy)
    batch = _batch(strategy)
    for _ in range(3):
        state = strategy.run(_fit_step, args=(state, batch))
    assert isinstance(state, train_state.TrainState)
    assert int(state.step) == 3
    _assert_replicated(state, strategy)


def test_flax_serialization_round_trip():
    strategy = ts.TPUStrategy()
    state = strategy.run(_fit_step, args=(_train_state(strategy), _batch(strategy)))
    restored = flax.serialization.from_bytes(_train_state(), flax.serialization.to_bytes(state))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert int(restored.step) == 1


def test_orbax_restores_into_a_fresh_replicated_state(tmp_path):
    strategy = ts.TPUStrategy(num_logical_cores=2)
    state = strategy.run(_fit_step, args=(_train_state(strategy), _batch(strategy)))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt", strategy.replicate(_train_state()))
    assert isinstance(restored, train_state.TrainState)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    _assert_replicated(restored, strategy)
    restored = strategy.run(_fit_step, args=(restored, _batch(strategy)))  # trains on
    assert int(restored.step) == 2


def test_typed_keys_go_everywhere(strategy):
    n = strategy.num_replicas_in_sync
    keys = ts.PerReplica([jax.random.key(i) for i in range(n)])
    from_fn = strategy.experimental_distribute_values_from_function(
        lambda ctx: {"key": jax.random.key(ctx.replica_id_in_sync_group)}
    )
    replicated = strategy.replicate(jax.random.key(7))
    assert jnp.issubdtype(replicated.dtype, jax.dtypes.prng_key)

    def step(a, b, c):
        split = jax.random.split(c)[0]
        return jax.random.key_data(a), jax.random.key_data(b["key"]), split

    a, b, split = strategy.run(step, args=(keys, from_fn, replicated))
    want = np.stack([jax.random.key_data(jax.random.key(i)) for i in range(n)])
    np.testing.assert_array_equal(np.asarray(a.stacked), want)
    np.testing.assert_array_equal(np.asarray(b.stacked), want)
    assert jnp.issubdtype(split.dtype, jax.dtypes.prng_key)  # a key output, replicated
    np.testing.assert_array_equal(
        jax.random.key_data(split), jax.random.key_data(jax.random.split(jax.random.key(7))[0])
    )


def test_typed_keys_in_dataset_elements():
    strategy = ts.TPUStrategy()
    keys = jax.random.split(jax.random.key(0), 16)
    batches = [{"key": keys, "x": np.arange(16.0)}]
    (element,) = list(strategy.experimental_distribute_dataset(batches))
    assert jnp.issubdtype(element["key"].dtype, jax.dtypes.prng_key)
    got = strategy.run(lambda b: jax.random.key_data(b["key"]), args=(element,))
    np.testing.assert_array_equal(
        np.asarray(got.stacked).reshape(16, -1), np.asarray(jax.random.key_data(keys))
    )


def test_replica_key_differs_per_replica_and_repeats():
    strategy = ts.TPUStrategy()

    def step(key):
        return jax.random.normal(ts.get_replica_context().replica_key(key), (4,))

    first = np.asarray(strategy.run(step, args=(jax.random.key(0),)).stacked)
    again = np.asarray(strategy.run(step, args=(jax.random.key(0),)).stacked)
    other_step = np.asarray(
        strategy.run(step, args=(jax.random.fold_in(jax.random.key(0), 1),)).stacked
    )
    assert len({row.tobytes() for row in first}) == 8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_step)


def test_per_replica_is_one_immutable_leaf():
    value = ts.PerReplica([np.float32(1), np.float32(2)])
    assert (value.num_replicas, value.shape, value.dtype) == (2, (), np.float32)
    with pytest.raises(AttributeError, match="immutable"):
        value.stacked = np.zeros(2)
    with pytest.raises(TypeError, match="one array per replica"):
        ts.PerReplica([{"a": 1.0}, {"a": 2.0}])
    with pytest.raises(TypeError, match="wrap each leaf"):
        ts.PerReplica.from_stacked({"a": np.zeros(2)})
    with pytest.raises(ValueError, match="differ in shape or dtype"):
        ts.PerReplica([np.zeros(2), np.zeros(3)])


def test_value_on_a_per_replica_names_the_fix():
    strategy = ts.TPUStrategy()
    loss = strategy.run(lambda x: x * 2, args=(_batch(strategy),))
    with pytest.raises(AttributeError, match=r"one value per replica.*all_reduce.*reduce"):
        _ = loss.value
    assert not hasattr(loss, "value")


def test_mirrored_is_still_accepted_as_input():
    strategy = ts.TPUStrategy()
    out = strategy.run(lambda t: t["w"] * 2, args=(ts.Mirrored({"w": np.ones(2, np.float32)}),))
    assert isinstance(out, jax.Array)
    np.testing.assert_array_equal(np.asarray(out), [2.0, 2.0])


def test_mirrored_is_immutable_and_says_to_make_a_new_one():
    value = ts.Mirrored({"w": np.ones(2, np.float32)})
    with pytest.raises(AttributeError, match=r"Mirrored is immutable; make a new one.*value"):
        value.value = {"w": np.zeros(2, np.float32)}
    with pytest.raises(AttributeError, match=r"Mirrored is immutable; make a new one.*value"):
        del value.value
    leaves, treedef = jax.tree.flatten(value)
    rebuilt = jax.tree.unflatten(treedef, [leaf * 3 for leaf in leaves])
    np.testing.assert_array_equal(rebuilt.value["w"], [3.0, 3.0])
    np.testing.assert_array_equal(value.value["w"], [1.0, 1.0])


@pytest.mark.parametrize("cores", [1, 2, 4])  # 8, 4 and 2 replicas
def test_an_array_split_over_replicas_viewed_as_blocks_arrives_as_its_block(cores, compile_count):
    strategy = ts.TPUStrategy(num_logical_cores=cores)
    n = strategy.num_replicas_in_sync
    x = jax.device_put(
        np.arange(4.0 * n, dtype=np.float32), NamedSharding(strategy.mesh, P(ts.REPLICA_AXIS))
    )
    shapes = []

    def step(block):
        shapes.append(block.shape)
        return ts.get_replica_context().all_gather(block * 2, axis=0)

    out = strategy.run(step, args=(ts.PerReplica.from_blocks(x, n),))
    assert shapes == [(4,)], "each replica sees its block, not the whole array"
    np.testing.assert_array_equal(np.asarray(out), 2 * np.arange(4.0 * n))
    before = compile_count()
    strategy.run(step, args=(ts.PerReplica.from_blocks(x, n),))
    assert compile_count() == before


def test_unbound_axis_name_names_the_replica_axis():
    strategy = ts.TPUStrategy()
    with pytest.raises(NameError, match=r"replica axis is called 'replica' \(ts.REPLICA_AXIS\)"):
        strategy.run(lambda x: jax.lax.pmean(x, "batch"), args=(_batch(strategy),))
    assert strategy.mesh.axis_names[0] == ts.REPLICA_AXIS


COUNT_MISMATCH = r"value is a PerReplica with 4 components, but the strategy has 8 replicas; pass"


@pytest.mark.parametrize("made_by", ["host", "a 4-replica strategy"])
def test_a_per_replica_of_another_replica_count_is_refused(made_by):
    eight = ts.TPUStrategy()
    if made_by == "host":
        value = ts.PerReplica([np.full(2, i, np.float32) for i in range(4)])
    else:
        four = ts.TPUStrategy(num_logical_cores=2)
        value = four.experimental_distribute_values_from_function(
            lambda ctx: np.full(2, ctx.replica_id_in_sync_group, np.float32)
        )
        assert float(four.reduce("sum", value)[0]) == 6.0  # right where it was made
    for call in (
        lambda: eight.reduce("sum", value),
        lambda: eight.reduce("mean", {"x": value}, axis=0),
        lambda: eight.gather(value, axis=0),
        lambda: eight.experimental_local_results(value),
    ):
        with pytest.raises(ValueError, match=COUNT_MISMATCH):
            call()
    with pytest.raises(ValueError, match=r"PerReplica with 4 components but the strategy has 8"):
        eight.run(lambda x: x, args=(value,))


def test_typed_keys_are_gathered_and_split_but_never_reduced(strategy):
    n = strategy.num_replicas_in_sync
    keys = strategy.experimental_distribute_values_from_function(
        lambda ctx: jax.random.split(jax.random.key(ctx.replica_id_in_sync_group), 2)
    )
    for op in ("sum", "mean", "max", "min"):
        with pytest.raises(TypeError, match=rf"strategy\.reduce cannot {op} typed PRNG keys"):
            strategy.reduce(op, keys)
    with pytest.raises(TypeError, match=r"keys have no arithmetic or order.*strategy\.gather"):
        strategy.reduce("sum", {"key": keys}, axis=0)
    with pytest.raises(TypeError, match=r"cannot sum typed PRNG keys"):
        strategy.reduce("sum", jax.random.key(0))  # a replicated key
    want = np.stack([jax.random.key_data(jax.random.split(jax.random.key(i), 2)) for i in range(n)])
    gathered = strategy.gather(keys, axis=0)
    assert jnp.issubdtype(gathered.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(gathered), want.reshape(2 * n, -1))
    local = strategy.experimental_local_results(keys)
    np.testing.assert_array_equal(np.stack([jax.random.key_data(k) for k in local]), want)
    summed = strategy.reduce("sum", jax.tree.map(jax.random.key_data, keys))  # the bits reduce
    np.testing.assert_array_equal(np.asarray(summed), want.sum(axis=0, dtype=np.uint32))


def _calls(strategy):
    """Every public method the value model owns, with a wrong argument, the error, the message.

    Each message must name the argument, the value seen, and the fix.
    """
    x = strategy.experimental_distribute_values_from_function(
        lambda ctx: np.full((2, 3), ctx.replica_id_in_sync_group, np.float32)
    )
    leaf = r"pass arrays and numbers, or pytrees of them"
    axis = r"use an axis in \[-2, 2\)"
    return [
        (
            lambda: strategy.reduce("avg", x),
            ValueError,
            r"reduce_op must be ts.ReduceOp.*; got 'avg'",
        ),
        (lambda: strategy.reduce(None, x), TypeError, r"reduce_op must be .*got NoneType None"),
        (
            lambda: strategy.reduce("sum", x, axis=1.5),
            TypeError,
            r"reduce axis must be an int, got float 1\.5; pass a whole number such as 2",
        ),
        (
            lambda: strategy.reduce("sum", x, axis="0"),
            TypeError,
            r"reduce axis must be an int, got str '0'",
        ),
        (
            lambda: strategy.reduce("sum", x, axis=2),
            ValueError,
            rf"reduce axis 2 is out of range for per-replica values of rank 2; {axis}",
        ),
        (
            lambda: strategy.reduce("sum", {"w": x, "name": "w"}),
            TypeError,
            rf"strategy\.reduce got value\['name'\] = 'w', of type str.*{leaf}",
        ),
        (
            lambda: strategy.reduce("sum", object()),
            TypeError,
            rf"strategy\.reduce got value = <object object.*{leaf}",
        ),
        (
            lambda: strategy.gather(x, axis=None),
            TypeError,
            r"gather axis must be an int, got NoneType None; pass a whole number",
        ),
        (
            lambda: strategy.gather(x, axis=1.5),
            TypeError,
            r"gather axis must be an int, got float 1\.5",
        ),
        (
            lambda: strategy.gather(x, axis=-3),
            ValueError,
            rf"gather axis -3 is out of range for per-replica values of rank 2; {axis}",
        ),
        (
            lambda: strategy.gather({"a": [x, "b"]}, axis=0),
            TypeError,
            rf"strategy\.gather got value\['a'\]\[1\] = 'b', of type str.*{leaf}",
        ),
        (
            lambda: strategy.experimental_local_results({"a": None, "b": "x"}),
            TypeError,
            rf"strategy\.experimental_local_results got value\['b'\] = 'x'.*{leaf}",
        ),
        (
            lambda: strategy.replicate({"w": np.ones(2), "f": print}),
            TypeError,
            rf"strategy\.replicate got tree\['f'\] = <built-in function print>.*{leaf}",
        ),
        (
            lambda: strategy.replicate(np.array(["a"])),
            TypeError,
            rf"strategy\.replicate got tree = array\(\['a'\].*{leaf}",
        ),
        (
            lambda: strategy.replicate(x),
            TypeError,
            r"replicate got a PerReplica in tree; reduce it first",
        ),
        (
            lambda: strategy.experimental_distribute_values_from_function(3),
            TypeError,
            r"value_fn must be a callable taking a ts\.ValueContext, got int 3; e\.g\. lambda",
        ),
        (
            lambda: strategy.experimental_distribute_values_from_function(lambda ctx: {"a": "s"}),
            TypeError,
            rf"got value_fn's value for replica 0\['a'\] = 's', of type str.*{leaf}",
        ),
    ]


def test_every_public_value_method_names_a_wrong_argument(strategy):
    calls = _calls(strategy)
    for call, error, message in calls:
        with pytest.raises(error, match=message):
            call()
    assert len(calls) == 17


def test_a_key_argument_next_to_arrays_runs_on_every_mesh(strategy):
    """run matches outputs to the arguments they update without comparing arrays with ==."""
    key, w = jax.random.key(3), np.ones(2, np.float32)
    bits, doubled = strategy.run(
        lambda k, w: (jax.random.key_data(jax.random.split(k)[0]), w * 2), args=(key, w)
    )
    np.testing.assert_array_equal(bits, jax.random.key_data(jax.random.split(key)[0]))
    np.testing.assert_array_equal(doubled, [2.0, 2.0])


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: ts.PerReplica("ab"), TypeError, r"PerReplica values must be a sequence"),
        (lambda: ts.PerReplica(()), ValueError, r"PerReplica values is empty"),
        (
            lambda: ts.PerReplica([deleted_array()]),
            ValueError,
            r"PerReplica values\[0\] is a deleted jax\.Array float32\[3\] \(donated",
        ),
        (
            lambda: ts.PerReplica.from_blocks(np.ones(8), "8"),
            TypeError,
            r"num_replicas must be an int, got str '8'",
        ),
        (lambda: ts.PerReplica.from_blocks(np.ones(8), 8, 0.5), TypeError, r"axis must be an int"),
        (lambda: ts.Mirrored(iter([1.0])), TypeError, r"Mirrored value is an iterator"),
        (lambda: ts.Mirrored({"w": "x"}), TypeError, r"Mirrored value\['w'\] is str 'x'"),
        (lambda: ts.Mirrored(ts.Mirrored(1.0)), TypeError, r"Mirrored value cannot be a Mirrored"),
        (lambda: ts.ValueContext(8, 8), ValueError, r"replica_id_in_sync_group 8 is out of range"),
        (lambda: ts.ValueContext(0, "8"), TypeError, r"num_replicas_in_sync must be an int"),
    ],
)
def test_value_constructors_name_a_wrong_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_cross_replica_calls_refuse_iterators_deleted_arrays_and_wide_ints():
    strategy = ts.TPUStrategy()
    with pytest.raises(TypeError, match=r"value\['w'\] is an iterator \(list_iterator\)"):
        strategy.reduce("sum", {"w": iter([1.0])})
    with pytest.raises(ValueError, match=r"value\[0\] is a deleted jax\.Array float32\[3\]"):
        strategy.gather([deleted_array()], axis=0)
    with pytest.raises(ValueError, match=r"tree is the Python int 1099511627776, outside"):
        strategy.replicate(2**40)
    with pytest.raises(TypeError, match=r"tree is an iterator"):
        strategy.replicate(iter([1.0]))
    assert ts.ValueContext(7, 8) == (7, 8)
