"""The proof that an output is the same on every replica, on programs with control flow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import tpustrat as ts


@pytest.fixture(scope="module")
def strategy():
    return ts.TPUStrategy(num_logical_cores=2)


@pytest.fixture(scope="module")
def ids(strategy):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: np.float32(ctx.replica_id_in_sync_group)
    )


def _kinds(out):
    """ "PerReplica" or "Mirrored" (a replicated jax.Array) for each leaf of ``run``'s output."""
    return jax.tree.map(
        lambda v: "PerReplica" if isinstance(v, ts.PerReplica) else "Mirrored",
        out,
        is_leaf=lambda v: isinstance(v, ts.PerReplica),
    )


def test_nested_jit_and_remat(strategy, ids):
    def step(i, w):
        total = jax.jit(lambda v: ts.get_replica_context().all_reduce("sum", v))(i)
        return {
            "jit_of_collective": total,
            "jit_of_local": jax.jit(lambda v: v * 2)(i),
            "remat_replicated": jax.checkpoint(jnp.sin)(w),
            "remat_local": jax.checkpoint(jnp.sin)(i),
        }

    assert _kinds(strategy.run(step, args=(ids, 1.0))) == {
        "jit_of_collective": "Mirrored",
        "jit_of_local": "PerReplica",
        "remat_replicated": "Mirrored",
        "remat_local": "PerReplica",
    }


def test_cond(strategy, ids):
    def step(i, w):
        total = ts.get_replica_context().all_reduce("sum", i)
        return {
            "replicated_predicate": lax.cond(total > 0, lambda: w + 1, lambda: w - 1),
            "local_predicate": lax.cond(i > 0, lambda: w + 1, lambda: w - 1),
            "local_branch_value": lax.cond(total > 0, lambda: i, lambda: w),
        }

    out = strategy.run(step, args=(ids, 1.0))
    assert _kinds(out) == {
        "replicated_predicate": "Mirrored",
        "local_predicate": "PerReplica",
        "local_branch_value": "PerReplica",
    }
    values = [float(v) for v in strategy.experimental_local_results(out["local_predicate"])]
    assert values == [0.0] + [2.0] * (strategy.num_replicas_in_sync - 1)


def test_scan_carry_reaches_fixed_point(strategy, ids):
    def step(i, w):
        # The carry (a, b) starts replicated; b picks up the local value on the second step.
        def body(carry, _):
            a, b, _ = carry
            return (a + w, a + i, b), None

        (a, b, c), _ = lax.scan(body, (w, w, w), None, length=3)
        psummed, _ = lax.scan(
            lambda s, x: (s + ts.get_replica_context().all_reduce("sum", x), None), w, jnp.ones(2)
        )
        return {"a": a, "b": b, "c": c, "psummed": psummed}

    assert _kinds(strategy.run(step, args=(ids, 1.0))) == {
        "a": "Mirrored",
        "b": "PerReplica",
        "c": "PerReplica",
        "psummed": "Mirrored",
    }


def test_while_loop(strategy, ids):
    def step(i, w):
        replicated = lax.while_loop(lambda x: x < 10.0, lambda x: x + w, w)
        local_trip_count = lax.while_loop(lambda x: x < i, lambda x: x + 1.0, w)
        return {"replicated": replicated, "local_trip_count": local_trip_count}

    assert _kinds(strategy.run(step, args=(ids, 1.0))) == {
        "replicated": "Mirrored",
        "local_trip_count": "PerReplica",
    }


def test_gradients_stay_local_until_reduced(strategy, ids):
    def step(i, w):
        grad = jax.grad(lambda w: (w * i) ** 2)(w)
        return {"grad": grad, "reduced": ts.get_replica_context().all_reduce("sum", grad)}

    out = strategy.run(step, args=(ids, 1.0))
    assert _kinds(out) == {"grad": "PerReplica", "reduced": "Mirrored"}
    n = strategy.num_replicas_in_sync
    local = [float(g) for g in strategy.experimental_local_results(out["grad"])]
    np.testing.assert_allclose(local, 2 * np.arange(n) ** 2)  # d/dw (w i)^2 = 2 w i^2, w = 1
    assert float(out["reduced"]) == sum(local)


def test_random_key_folded_with_replica_id_varies(strategy):
    def step(key):
        ctx = ts.get_replica_context()
        shared = jax.random.normal(key, ())
        local = jax.random.normal(jax.random.fold_in(key, ctx.replica_id_in_sync_group), ())
        return {"shared": shared, "local": local}

    out = strategy.run(step, args=(jax.random.key_data(jax.random.key(0)),))
    assert _kinds(out) == {"shared": "Mirrored", "local": "PerReplica"}


def test_host_callbacks_vary():
    def step():
        value = jax.pure_callback(lambda: np.float32(1.0), jax.ShapeDtypeStruct((), jnp.float32))
        return {"callback": value}

    # A callback runs once per device and may answer differently on each: never Mirrored.
    one_core = ts.TPUStrategy()  # host callbacks need every mesh axis manual
    assert _kinds(one_core.run(step)) == {"callback": "PerReplica"}
