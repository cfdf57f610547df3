"""The hierarchical all-reduce of multi-slice jobs, on slices declared over 8 CPU devices."""

import re

import jax
import numpy as np
import optax
import pytest
from jax import lax

import tpustrat as ts
from tpustrat import _mesh

LAYOUTS = [(1, 2), (1, 4), (2, 2)]  # (logical cores, slices)


def _values(strategy):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: (
            np.arange(10, dtype=np.float32).reshape(2, 5) * (ctx.replica_id_in_sync_group + 1)
        )
    )


@pytest.mark.parametrize(("cores", "slices"), LAYOUTS)
@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_equals_the_flat_all_reduce(cores, slices, op):
    flat = ts.TPUStrategy(num_logical_cores=cores)
    sliced = ts.TPUStrategy(num_logical_cores=cores, num_slices=slices)
    assert (flat.num_slices, sliced.num_slices) == (1, slices)
    step = lambda x: ts.get_replica_context().all_reduce(op, {"x": x, "scalar": x.sum()})
    want = flat.run(step, args=(_values(flat),))
    got = sliced.run(step, args=(_values(sliced),))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert isinstance(g, jax.Array) and g.sharding.is_fully_replicated
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)


def _collectives(strategy, fn, *args):
    text = jax.jit(lambda *a: strategy.run(fn, args=a)).lower(*args).compile().as_text()
    found = []
    for line in text.splitlines():
        match = re.search(r"= f32\[(\d*)\]\S* (reduce-scatter|all-reduce|all-gather)\(", line)
        if match:
            groups = re.search(r"replica_groups=(\{[^ ]*\}),", line).group(1)
            found.append((match.group(2), int(match.group(1) or 1), groups))
    return found


def test_compiled_program_reduces_inside_slices_then_across():
    strategy = ts.TPUStrategy(num_slices=2)
    x = strategy.experimental_distribute_values_from_function(lambda ctx: np.ones(1024, np.float32))
    found = _collectives(strategy, lambda v: ts.get_replica_context().all_reduce("sum", v), x)
    inside, across = "{{0,1,2,3},{4,5,6,7}}", "{{0,4},{1,5},{2,6},{3,7}}"
    assert found == [
        ("reduce-scatter", 256, inside),
        ("all-reduce", 256, across),  # a quarter of the bytes crosses the slices
        ("all-gather", 1024, inside),
    ]
    flat = ts.TPUStrategy()
    found = _collectives(flat, lambda v: ts.get_replica_context().all_reduce("sum", v), x)
    assert found == [("all-reduce", 1024, "{{0,1,2,3,4,5,6,7}}")]


def _train(strategy, steps=5):
    optimizer = optax.sgd(0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
    state = strategy.replicate((params, optimizer.init(params)))

    def step(state, x):
        params, opt_state = state
        loss = lambda p: ((x @ p["w"] + p["b"]) ** 2).mean()
        grads = ts.get_replica_context().all_reduce("mean", jax.grad(loss)(params))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for t in range(steps):
        x = strategy.experimental_distribute_values_from_function(
            lambda ctx, t=t: np.full((4, 3), t + ctx.replica_id_in_sync_group, np.float32)
        )
        state = strategy.run(step, args=(state, x))
    return state[0]


def test_training_equals_the_flat_all_reduce():
    want = _train(ts.TPUStrategy())
    got = _train(ts.TPUStrategy(num_slices=2))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert isinstance(g, jax.Array), "updated parameters stay replicated"
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)


def test_grouped_collectives_written_by_hand_count_as_varying():
    strategy = ts.TPUStrategy()
    step = lambda x: lax.psum(x, ts.REPLICA_AXIS, axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]])
    out = strategy.run(step, args=(_values(strategy),))
    assert isinstance(out, ts.PerReplica), "a sum over part of the replicas differs between groups"


def test_bad_slice_counts():
    with pytest.raises(ValueError, match="num_slices=3 does not divide the 8 replicas"):
        ts.TPUStrategy(num_slices=3)
    with pytest.raises(TypeError, match=r"num_slices must be an int, got float 2\.0"):
        ts.TPUStrategy(num_slices=2.0)
    with pytest.raises(ValueError, match="num_slices must be an int >= 1, got 0"):
        ts.TPUStrategy(num_slices=0)
    mesh = _mesh.build_mesh(jax.devices())
    assert _mesh.count_slices(mesh) == 1
