"""The hierarchical all-reduce of multi-slice jobs, on slices declared over 8 CPU devices."""

import re

import jax
import jax.numpy as jnp
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


# One rule for every reduction across replicas: the value and dtype of jnp.sum / mean / max /
# min over the stacked components (ts.ReduceOp), whether strategy.reduce combines run's output
# or ReplicaContext.all_reduce combines inside the step.
OPS = ("sum", "mean", "max", "min")
INT32 = np.iinfo(np.int32)


def _components(dtype, num_replicas, seed):
    """Seeded per-replica values of ``dtype``, shape (4,), with the dtype's extremes in them."""
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.random((num_replicas, 4)) < 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, (num_replicas, 4), dtype=dtype, endpoint=True)
        data[:, 0] = info.max  # the sum of these overflows the dtype: the mean must not
        data[0, 1] = info.min
        return data
    data = rng.normal(scale=100.0, size=(num_replicas, 4)).astype(dtype)
    data[:, 0] = 30000.0  # float16 holds it, but not 8 replicas' sum: the mean must not overflow
    return data


def _numpy_reduction(op, data):
    """The reference, from first principles: exact in float64 or Python ints, then the dtype."""
    dtype = getattr(jnp, op)(jnp.asarray(data), axis=0).dtype  # the documented rule: jnp's
    exact = data.astype(np.float64) if data.dtype.kind in "fV" else data.astype(object)
    value = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min}[op](exact, axis=0)
    if op == "sum" and data.dtype.kind in "iub":  # integer sums wrap around, as in numpy
        bits = np.iinfo(dtype).bits
        value = np.array([int(v) % 2**bits for v in value], dtype=np.uint64).astype(dtype)
    with np.errstate(over="ignore"):  # a float16 sum past 65504 is inf, on the devices too
        return np.asarray(np.asarray(value, np.float64) if op == "mean" else value).astype(dtype)


DTYPES = {
    "int32": np.int32,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint32": np.uint32,
    "bool": np.bool_,
    "float16": np.float16,
    "bfloat16": jnp.bfloat16,
    "float32": np.float32,
}
TOLERANCE = {np.float16: 2e-3, jnp.bfloat16: 1e-2, np.float32: 1e-6}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_reduce_and_all_reduce_agree_with_numpy(strategy, dtype):
    n = strategy.num_replicas_in_sync
    data = _components(np.dtype(dtype), n, seed=n)
    values = ts.PerReplica(list(data))
    inside = strategy.run(
        lambda x: {op: ts.get_replica_context().all_reduce(op, x) for op in OPS}, args=(values,)
    )
    in_jit = jax.jit(lambda v: {op: strategy.reduce(op, v) for op in OPS})(values)
    for op in OPS:
        want = _numpy_reduction(op, data)
        rtol = 0 if op in ("max", "min") else TOLERANCE.get(dtype, 1e-6)
        # Rounding error scales with the terms, not with a sum that cancels: bound it by them.
        atol = rtol * np.abs(data.astype(np.float64)).sum(axis=0) / (n if op == "mean" else 1)
        for name, got in (
            ("strategy.reduce", strategy.reduce(op, values)),
            ("all_reduce", inside[op]),
            ("strategy.reduce in jit", in_jit[op]),
        ):
            assert got.dtype == want.dtype, (name, op, got.dtype, want.dtype)
            got, expected = np.asarray(got, np.float64), np.asarray(want, np.float64)
            same = got == expected  # inf == inf included
            error = np.abs(np.where(same, 0.0, got) - np.where(same, 0.0, expected))
            assert (error <= atol + rtol * np.abs(expected)).all(), (name, op, got, expected)


def test_int32_mean_does_not_overflow(strategy):
    big = strategy.experimental_distribute_values_from_function(lambda ctx: np.int32(2**30))
    inside = strategy.run(lambda x: ts.get_replica_context().all_reduce("mean", x), args=(big,))
    assert float(inside) == float(strategy.reduce("mean", big)) == 2.0**30
    assert inside.dtype == np.float32
    extreme = ts.PerReplica([np.int32(INT32.max)] * strategy.num_replicas_in_sync)
    np.testing.assert_allclose(float(strategy.reduce("mean", extreme)), INT32.max, rtol=1e-7)


@pytest.mark.parametrize(("cores", "slices"), LAYOUTS)
def test_hierarchical_and_scattered_means_of_integers(cores, slices):
    strategy = ts.TPUStrategy(num_logical_cores=cores, num_slices=slices)
    n = strategy.num_replicas_in_sync
    data = np.full((n, 2 * n), INT32.max, np.int32)
    data[:, 1] = np.arange(n)

    def step(x):
        ctx = ts.get_replica_context()
        return ctx.all_reduce("mean", x), ctx.all_gather(ctx.reduce_scatter("mean", x, 0), 0)

    mean, scattered = strategy.run(step, args=(ts.PerReplica(list(data)),))
    want = data.astype(np.float64).mean(axis=0)
    for got in (mean, scattered):
        assert got.dtype == np.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_half_precision_mean_stays_in_its_dtype_and_does_not_overflow():
    strategy = ts.TPUStrategy(num_slices=2)
    x = ts.PerReplica([np.full(3, 60000, np.float16)] * 8)  # the sum, 480000, overflows float16
    mean = strategy.run(lambda v: ts.get_replica_context().all_reduce("mean", v), args=(x,))
    assert mean.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(mean), np.full(3, 60000, np.float16))
    assert np.asarray(strategy.reduce("mean", x)).tolist() == [60000.0] * 3


@pytest.mark.parametrize("cores", [2, 4, 8])
def test_bfloat16_reductions_compile_when_replicas_span_several_devices(cores):
    """XLA:CPU aborts compiling these in bfloat16 (see _context._compilable_on_cpu)."""
    strategy = ts.TPUStrategy(num_logical_cores=cores)
    n = strategy.num_replicas_in_sync
    data = np.arange(n * 2 * n, dtype=np.float32).reshape(n, 2 * n)
    x = ts.PerReplica(list(data.astype(jnp.bfloat16)))

    def step(x):
        ctx = ts.get_replica_context()
        scattered = ctx.all_gather(ctx.reduce_scatter("sum", x, 0), 0)
        return ctx.all_reduce("max", x), ctx.all_reduce("mean", x), scattered

    for got, want in zip(
        strategy.run(step, args=(x,)), (data.max(0), data.mean(0), data.sum(0)), strict=True
    ):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2)


@pytest.mark.parametrize("op", ["sum", "mean", "max", "min"])
def test_complex_constants_reduce_like_numpy(strategy, op):
    """XLA:CPU aborts on a psum of a complex constant; the collectives must not reach it."""
    n = strategy.num_replicas_in_sync
    values = ts.PerReplica([np.float32(i) for i in range(n)])
    constant = np.array([1 + 2j, 0 + 5j], np.complex64)

    def step(x):
        ctx = ts.get_replica_context()
        varying = (x + 1j * (x - 1)).astype(jnp.complex64)
        return (
            ctx.all_reduce(op, constant),
            ctx.all_reduce(op, varying),
            ctx.all_gather(constant[None], axis=0),
        )

    reduced_constant, reduced_varying, gathered = strategy.run(step, args=(values,))
    components = np.arange(n, dtype=np.float32)
    components = (components + 1j * (components - 1)).astype(np.complex64)
    reducer = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min}[op]
    np.testing.assert_allclose(reduced_constant, reducer(np.stack([constant] * n), axis=0))
    np.testing.assert_allclose(reduced_varying, reducer(components))
    np.testing.assert_array_equal(gathered, np.stack([constant] * n))
