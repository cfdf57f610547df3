"""ReplicaContext: replica ids and collectives inside run; clear errors outside it."""

import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TWO_MESH_SHAPES, mesh_id, per_replica_rows

import tpustrat as ts


def test_context_only_inside_run(strategy):
    assert ts.get_replica_context() is None
    seen = {}

    def step():
        ctx = ts.get_replica_context()
        seen["ctx"] = ctx
        seen["n"] = ctx.num_replicas_in_sync
        return ctx.replica_id_in_sync_group

    ids = strategy.run(step)
    n = strategy.num_replicas_in_sync
    assert seen["n"] == n
    assert [int(i) for i in strategy.experimental_local_results(ids)] == list(range(n))
    assert ts.get_replica_context() is None
    with pytest.raises(RuntimeError, match=r"all_reduce was used outside strategy\.run"):
        seen["ctx"].all_reduce("sum", 1.0)
    with pytest.raises(RuntimeError, match=r"all_gather was used outside strategy\.run"):
        seen["ctx"].all_gather(jnp.ones(2), 0)


@pytest.mark.parametrize("op", ["sum", "mean", "max", "min"])
def test_all_reduce_matches_numpy(strategy, op):
    n = strategy.num_replicas_in_sync
    data = np.random.default_rng(1).normal(size=(n, 5)).astype(np.float32)
    values = per_replica_rows(strategy, data)
    out = strategy.run(lambda x: ts.get_replica_context().all_reduce(op, {"x": x}), args=(values,))
    reducer = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min}[op]
    assert isinstance(out["x"], jax.Array)
    np.testing.assert_allclose(np.asarray(out["x"]), reducer(data, 0), rtol=1e-5, atol=1e-6)


def test_all_reduce_sum_of_identical_values_counts_replicas(strategy):
    out = strategy.run(lambda: ts.get_replica_context().all_reduce(ts.ReduceOp.SUM, 1.0))
    assert float(out) == strategy.num_replicas_in_sync
    mean = strategy.run(lambda w: ts.get_replica_context().all_reduce("mean", w), args=(3.0,))
    assert float(mean) == 3.0


def test_all_reduce_rejects_unknown_op(strategy):
    with pytest.raises(ValueError, match=r"reduce_op must be .*; got 'avg'"):
        strategy.run(lambda: ts.get_replica_context().all_reduce("avg", 1.0))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_all_gather_in_replica_order(strategy, axis):
    n = strategy.num_replicas_in_sync
    data = np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3)
    values = per_replica_rows(strategy, data)
    out = strategy.run(lambda x: ts.get_replica_context().all_gather(x, axis), args=(values,))
    assert isinstance(out, jax.Array)
    np.testing.assert_array_equal(np.asarray(out), np.concatenate(list(data), axis=axis))


def test_all_gather_errors(strategy):
    with pytest.raises(ValueError, match=r"axis 2 is out of range for a value of shape \(3,\)"):
        strategy.run(lambda: ts.get_replica_context().all_gather(jnp.ones(3), 2))
    with pytest.raises(ValueError, match="a scalar has no axis"):
        strategy.run(lambda: ts.get_replica_context().all_gather(jnp.ones(()), 0))


@pytest.mark.parametrize("shape", TWO_MESH_SHAPES, ids=mesh_id)
def test_all_gather_compiles_to_all_gather(shape):
    """The compiled program holds a real all-gather, not a psum of a one-hot mask."""
    strategy = ts.TPUStrategy(num_logical_cores=shape[1])
    values = per_replica_rows(strategy, np.ones((shape[0], 16), np.float32))

    def step(x):
        return ts.get_replica_context().all_gather(x, 0)

    text = jax.jit(lambda v: strategy.run(step, args=(v,))).lower(values).compile().as_text()
    assert "all-gather" in text
    assert "all-reduce" not in text


def test_all_reduce_compiles_to_one_all_reduce():
    strategy = ts.TPUStrategy()
    values = per_replica_rows(strategy, np.ones((8, 4), np.float32))
    lowered = jax.jit(
        lambda v: strategy.run(lambda x: ts.get_replica_context().all_reduce("sum", x), args=(v,))
    ).lower(values)
    assert lowered.compile().as_text().count("all-reduce(") == 1


def test_replica_context_reports_strategy(strategy):
    seen = []
    strategy.run(lambda: seen.append(ts.get_replica_context().strategy) or 0)
    assert seen[0] is strategy


def _cross_replica_calls(strategy):
    """Each host-side strategy call a step might make, and the fix its error must name."""
    return {
        "reduce": (
            lambda x: strategy.reduce("sum", x),
            r"ts\.get_replica_context\(\)\.all_reduce\('sum', value\)",
        ),
        "gather": (
            lambda x: strategy.gather(x, axis=0),
            r"ts\.get_replica_context\(\)\.all_gather\(value, axis\)",
        ),
        "experimental_local_results": (
            lambda x: strategy.experimental_local_results(x)[0],
            r"already this replica's own",
        ),
        "replicate": (lambda x: strategy.replicate(x), r"replicate the state before run"),
        "experimental_distribute_values_from_function": (
            lambda x: strategy.experimental_distribute_values_from_function(lambda ctx: x),
            r"replica_id_in_sync_group",
        ),
        "experimental_distribute_dataset": (
            lambda x: strategy.experimental_distribute_dataset([np.zeros(8)]) and x,
            r"distribute the dataset before the loop",
        ),
        "distribute_datasets_from_function": (
            lambda x: strategy.distribute_datasets_from_function(lambda ctx: [np.zeros(1)]) and x,
            r"distribute the dataset before the loop",
        ),
    }


CROSS_REPLICA_CALLS = list(_cross_replica_calls(None))


@pytest.mark.parametrize("call", CROSS_REPLICA_CALLS)
def test_cross_replica_calls_inside_a_step_are_refused(strategy, call):
    """Inside the step each value is one replica's: strategy.reduce there would sum one value."""
    n = strategy.num_replicas_in_sync
    values = per_replica_rows(strategy, np.arange(n, dtype=np.float32).reshape(n, 1))
    fn, fix = _cross_replica_calls(strategy)[call]
    message = rf"strategy\.{call} was called inside a step .* cross-replica call.*{fix}"
    with pytest.raises(RuntimeError, match=message):
        strategy.run(fn, args=(values,))
    with pytest.raises(RuntimeError, match=message):  # inside the user's jit too
        jax.jit(lambda v: strategy.run(fn, args=(v,)))(values)
    assert ts.get_replica_context() is None
    # The same call from the host, on run's output, gives every replica's value.
    if call in ("reduce", "gather"):
        np.testing.assert_array_equal(
            np.asarray(fn(strategy.run(lambda x: x * 2, args=(values,)))).ravel()[:1],
            [n * (n - 1)] if call == "reduce" else [0.0],
        )


def test_reduce_inside_a_step_is_refused_even_for_another_strategy():
    eight, four = ts.TPUStrategy(), ts.TPUStrategy(num_logical_cores=2)
    total = ts.PerReplica([np.float32(i) for i in range(4)])
    with pytest.raises(RuntimeError, match=r"strategy\.reduce was called inside a step"):
        eight.run(lambda: four.reduce("sum", total))
    assert float(four.reduce("sum", total)) == 6.0


def test_compile_stats_inside_a_step_reads_the_host_ledger(strategy):
    """compile_stats is a host read of counters, right anywhere: allowed inside the step."""
    seen = []
    strategy.run(lambda x: x + 1, args=(np.float32(0),))
    strategy.run(lambda x: (seen.append(strategy.compile_stats()), x)[1], args=(np.float32(0),))
    assert seen[0].num_compiles == 1  # the step being traced is not compiled yet
    assert strategy.compile_stats().num_compiles == 2


def test_typed_keys_cannot_be_all_reduced(strategy):
    keys = strategy.experimental_distribute_values_from_function(
        lambda ctx: jax.random.key(ctx.replica_id_in_sync_group)
    )
    for op in ("sum", "mean", "max", "min"):
        with pytest.raises(TypeError, match=rf"all_reduce cannot {op} typed PRNG keys.*key_data"):
            strategy.run(lambda k, op=op: ts.get_replica_context().all_reduce(op, k), args=(keys,))
    with pytest.raises(TypeError, match=r"reduce_scatter cannot sum typed PRNG keys"):
        strategy.run(
            lambda k: ts.get_replica_context().reduce_scatter("sum", k[None].repeat(8, 0), 0),
            args=(keys,),
        )
    gathered = strategy.run(lambda k: ts.get_replica_context().all_gather(k[None], 0), args=(keys,))
    np.testing.assert_array_equal(
        jax.random.key_data(gathered),
        jax.random.key_data(jax.vmap(jax.random.key)(np.arange(strategy.num_replicas_in_sync))),
    )


@pytest.mark.parametrize(
    ("reduce_op", "error", "message"),
    [
        (
            "avg",
            ValueError,
            r"reduce_op must be ts\.ReduceOp\.SUM/MEAN/MAX/MIN or one of .*; got 'avg'",
        ),
        (None, TypeError, r"reduce_op must be a ts\.ReduceOp or a string, got NoneType None; use"),
        (1, TypeError, r"reduce_op must be a ts\.ReduceOp or a string, got int 1; use"),
        (
            ("sum",),
            TypeError,
            r"reduce_op must be a ts\.ReduceOp or a string, got tuple \('sum',\)",
        ),
    ],
)
def test_a_wrong_reduce_op_names_the_value_and_the_choices(reduce_op, error, message):
    strategy = ts.TPUStrategy()
    with pytest.raises(error, match=message):
        strategy.reduce(reduce_op, np.float32(1))
    with pytest.raises(error, match=message):
        strategy.run(lambda: ts.get_replica_context().all_reduce(reduce_op, 1.0))


def test_get_strategy_outside_any_scope_is_one_default_replica_on_the_first_device():
    default = ts.get_strategy()
    assert isinstance(default, ts.TPUStrategy)
    assert default.num_replicas_in_sync == 1
    assert list(default.mesh.devices.flat) == [jax.local_devices()[0]]
    assert ts.get_strategy() is default  # made once
    assert not ts.has_strategy()
    total = default.run(
        lambda x: ts.get_replica_context().all_reduce("sum", 2 * x), args=(np.float32(3),)
    )
    assert float(total) == 6.0


def test_get_strategy_and_has_strategy_inside_scope_and_run(strategy):
    default = ts.get_strategy()
    seen = []
    with strategy.scope():
        assert ts.get_strategy() is strategy and ts.has_strategy()
        with default.scope():  # the default's own scope still counts as no strategy
            assert ts.get_strategy() is default and not ts.has_strategy()
    strategy.run(lambda: seen.append((ts.get_strategy(), ts.has_strategy())) or 0.0)
    assert seen == [(strategy, True)]
    assert ts.get_strategy() is default and not ts.has_strategy()


def test_code_written_for_a_strategy_runs_on_the_default_and_in_a_scope(strategy):
    """tf.distribute's library pattern: take ts.get_strategy(), whichever it is."""
    x = np.arange(16, dtype=np.float32).reshape(8, 2)

    def mean_square():
        current = ts.get_strategy()
        (batch,) = current.experimental_distribute_dataset([x])
        per_replica = current.run(lambda b: (b**2).sum(), args=(batch,))
        return float(current.reduce("sum", per_replica)) / x.size

    expected = float((x**2).mean())
    assert mean_square() == expected  # the default strategy: one replica
    with strategy.scope():
        assert mean_square() == expected


def test_another_thread_outside_any_scope_gets_the_same_default(strategy):
    with strategy.scope(), concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: ts.get_strategy(), range(8)))
    assert all(result is ts.get_strategy() for result in results)
    assert ts.get_strategy() is not strategy


def test_collectives_of_zero_size_values_and_wrong_values():
    strategy = ts.TPUStrategy()

    def step():
        ctx = ts.get_replica_context()
        return (
            ctx.all_gather(jnp.zeros((0, 2)), axis=1),
            ctx.reduce_scatter("sum", jnp.zeros((8, 0)), axis=0),
        )

    gathered, scattered = strategy.run(step)
    assert gathered.shape == (0, 16) and scattered.shape == (1, 0)

    def bad(value):
        return strategy.run(lambda: ts.get_replica_context().all_reduce("sum", value))

    with pytest.raises(TypeError, match=r"value is str 'x', not an array or a number"):
        bad("x")
    with pytest.raises(TypeError, match=r"value\['a'\] is an iterator"):
        bad({"a": iter([1])})
    with pytest.raises(ValueError, match=r"value is the Python int 1099511627776"):
        bad(2**40)


def test_replica_id_and_key_inside_loops(strategy):
    """The context's replica index inside a fori_loop and run_steps' scan: small
    loops that read the device's index, which XLA:CPU of jaxlib 0.7.0 to 0.8.0 aborts the
    process compiling unless the index is read outside them."""
    n = strategy.num_replicas_in_sync
    key = jax.random.key(3)

    def step(total):
        ctx = ts.get_replica_context()
        counted = jax.lax.fori_loop(0, 3, lambda i, t: t + ctx.replica_id_in_sync_group, total)
        draws = jax.lax.fori_loop(
            0, 2, lambda i, d: d + jax.random.uniform(ctx.replica_key(key)), np.float32(0)
        )
        return counted, draws

    counted, draws = strategy.run(step, args=(np.int32(1),))
    expected = [jax.random.uniform(jax.random.fold_in(key, r)) * 2 for r in range(n)]
    assert [int(c) for c in strategy.experimental_local_results(counted)] == [
        1 + 3 * r for r in range(n)
    ]
    np.testing.assert_allclose(strategy.experimental_local_results(draws), expected, rtol=1e-6)

    def run_step(total, batch):
        total = total + batch * ts.get_replica_context().replica_id_in_sync_group
        return total, total

    batches = iter([ts.PerReplica([np.int32(s + 1)] * n) for s in range(4)])
    total, _, num_steps = strategy.run_steps(run_step, np.int32(0), batches, 4)
    assert num_steps == 4
    assert [int(t) for t in strategy.experimental_local_results(total)] == [
        (1 + 2 + 3 + 4) * r for r in range(n)
    ]


def test_axis_index_inside_a_loop(strategy):
    """lax.axis_index read inside a loop: where XLA:CPU aborts compiling it (jaxlib 0.7.0 to 0.8.0),
    run refuses the step with a ValueError naming the fix; elsewhere it computes the index."""
    from tpustrat import _compile

    def step():
        index = lambda i, t: t + jax.lax.axis_index(ts.REPLICA_AXIS)
        return jax.lax.fori_loop(0, 3, index, np.int32(0))

    if _compile.XLA_CPU_ABORTS_ON_INDEX_IN_LOOP and jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match=r"reads lax\.axis_index inside a loop .* jaxlib"):
            strategy.run(step)
    else:
        counted = strategy.run(step)
        n = strategy.num_replicas_in_sync
        assert [int(c) for c in strategy.experimental_local_results(counted)] == [
            3 * r for r in range(n)
        ]
