"""ReplicaContext: replica ids and collectives inside run; clear errors outside it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tpustrat as ts


def _per_replica(strategy, data):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: data[ctx.replica_id_in_sync_group]
    )


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
    values = _per_replica(strategy, data)
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
    with pytest.raises(ValueError, match="unknown reduce op 'avg'"):
        strategy.run(lambda: ts.get_replica_context().all_reduce("avg", 1.0))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_all_gather_in_replica_order(strategy, axis):
    n = strategy.num_replicas_in_sync
    data = np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3)
    values = _per_replica(strategy, data)
    out = strategy.run(lambda x: ts.get_replica_context().all_gather(x, axis), args=(values,))
    assert isinstance(out, jax.Array)
    np.testing.assert_array_equal(np.asarray(out), np.concatenate(list(data), axis=axis))


def test_all_gather_errors(strategy):
    with pytest.raises(ValueError, match=r"axis 2 is out of range for a value of shape \(3,\)"):
        strategy.run(lambda: ts.get_replica_context().all_gather(jnp.ones(3), 2))
    with pytest.raises(ValueError, match="a scalar has no axis"):
        strategy.run(lambda: ts.get_replica_context().all_gather(jnp.ones(()), 0))


@pytest.mark.parametrize("shape", [(8, 1), (4, 2)], ids=["8x1", "4x2"])
def test_all_gather_compiles_to_all_gather(shape):
    """The compiled program holds a real all-gather, not a psum of a one-hot mask."""
    strategy = ts.TPUStrategy(num_logical_cores=shape[1])
    values = _per_replica(strategy, np.ones((shape[0], 16), np.float32))

    def step(x):
        return ts.get_replica_context().all_gather(x, 0)

    text = jax.jit(lambda v: strategy.run(step, args=(v,))).lower(values).compile().as_text()
    assert "all-gather" in text
    assert "all-reduce" not in text


def test_all_reduce_compiles_to_one_all_reduce():
    strategy = ts.TPUStrategy()
    values = _per_replica(strategy, np.ones((8, 4), np.float32))
    lowered = jax.jit(
        lambda v: strategy.run(lambda x: ts.get_replica_context().all_reduce("sum", x), args=(v,))
    ).lower(values)
    assert lowered.compile().as_text().count("all-reduce(") == 1


def test_replica_context_reports_strategy(strategy):
    seen = []
    strategy.run(lambda: seen.append(ts.get_replica_context().strategy) or 0)
    assert seen[0] is strategy
