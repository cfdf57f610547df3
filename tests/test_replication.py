"""The proof that an output is the same on every replica, on programs with control flow."""

import importlib
import itertools
import pkgutil
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src.lax import parallel  # the asynchronous collectives have no public name
from jax.experimental import io_callback
from jax.extend.core import Primitive
from jax.sharding import PartitionSpec as P

import tpustrat as ts
from tpustrat._mesh import REPLICA_AXIS
from tpustrat._replication import is_classified, varying_outputs


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


def test_host_callbacks_vary(strategy):
    def step():
        value = jax.pure_callback(lambda: np.float32(1.0), jax.ShapeDtypeStruct((), jnp.float32))
        return {"callback": value}

    # A callback runs once per device and may answer differently on each: never Mirrored.
    assert _kinds(strategy.run(step)) == {"callback": "PerReplica"}


def test_stateful_random_numbers_vary(strategy):
    """rng_uniform draws different numbers on every device: never replicated."""
    out = strategy.run(lambda: {"uniform": lax.rng_uniform(0.0, 1.0, (3,))})
    assert _kinds(out) == {"uniform": "PerReplica"}


# Hand-built jaxprs: collectives over the replica axis come from make_jaxpr's axis_env.
AXIS_ENV = [(REPLICA_AXIS, 8)]


def _varying(fn, *varying_inputs, args=None):
    args = args if args is not None else [np.float32(1.0)] * len(varying_inputs)
    jaxpr = jax.make_jaxpr(fn, axis_env=AXIS_ENV)(*args)
    return varying_outputs(jaxpr, varying_inputs)


def test_cond_on_hand_built_jaxprs():
    def branches(pred, x, w):
        return lax.cond(pred > 0, lambda: (w + 1, x), lambda: (w - 1, w))

    assert _varying(branches, False, True, False) == [False, True]
    assert _varying(branches, True, False, False) == [True, True]
    switch = lambda i, w: lax.switch(i, [lambda: w, lambda: 2 * w, lambda: lax.psum(w, "replica")])
    assert _varying(switch, False, True, args=[np.int32(0), np.float32(1)]) == [True]
    assert _varying(switch, True, False, args=[np.int32(0), np.float32(1)]) == [True]


def test_scan_and_while_on_hand_built_jaxprs():
    def scan(x, w):
        def body(carry, _):
            a, b = carry
            return (a * w, b + x), lax.psum(b, REPLICA_AXIS)

        (a, b), summed = lax.scan(body, (w, w), None, length=2)
        return a, b, summed

    assert _varying(scan, True, False) == [False, True, False]

    def loops(x, w):
        fixed = lax.fori_loop(0, 3, lambda i, v: v * w, w)
        local_count = lax.while_loop(lambda v: v < x, lambda v: v + 1.0, w)
        return fixed, local_count

    assert _varying(loops, True, False) == [False, True]


def test_custom_vjp_and_custom_jvp_are_followed():
    @jax.custom_vjp
    def double(x):
        return 2 * x

    double.defvjp(lambda x: (2 * x, None), lambda _, g: (2 * g,))

    @jax.custom_jvp
    def total(x):
        return lax.psum(x, REPLICA_AXIS)

    total.defjvp(lambda primals, tangents: (total(primals[0]), total(tangents[0])))
    step = lambda x, w: (double(x), double(w), total(x))
    assert _varying(step, True, False) == [True, False, False]


def test_nested_shard_map_is_followed():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), (REPLICA_AXIS,))

    def step(x, w):
        inner = jax.shard_map(
            lambda a, b: (lax.psum(a, REPLICA_AXIS), a * b),
            mesh=mesh,
            in_specs=(P(REPLICA_AXIS), P()),
            out_specs=(P(), P(REPLICA_AXIS)),
            check_vma=False,
        )
        return inner(x, w)

    ones = np.ones(8, np.float32)
    assert _varying(step, True, False, args=[ones, ones]) == [False, True]
    assert _varying(step, False, False, args=[ones, ones]) == [False, False]


def test_collectives_that_do_not_combine_every_replica_vary():
    permutation = [(i, (i + 1) % 8) for i in range(8)]

    def step(x, w):
        return (
            lax.psum_scatter(w, REPLICA_AXIS),
            lax.ppermute(w, REPLICA_AXIS, permutation),
            lax.all_to_all(w, REPLICA_AXIS, 0, 0),
            lax.axis_index(REPLICA_AXIS),
            lax.psum(x, REPLICA_AXIS),
            lax.all_gather(x, REPLICA_AXIS),
            lax.pmax(x, REPLICA_AXIS),
        )

    ones = np.ones(8, np.float32)
    flags = _varying(step, True, False, args=[ones, ones])
    assert flags == [True, True, True, True, False, False, False]


@pytest.mark.skipif(
    not hasattr(parallel, "psum_start"),
    reason="this JAX has no asynchronous collectives (no psum_start), so no jaxpr can hold one",
)
def test_async_collectives():
    permutation = [(i, (i + 1) % 8) for i in range(8)]

    def step(x):
        return (
            parallel.psum_start(x, REPLICA_AXIS).done(),
            parallel.all_gather_start(x, REPLICA_AXIS).done(),
            parallel.ppermute_start(x, REPLICA_AXIS, perm=permutation).done(),
        )

    assert _varying(step, True) == [False, False, True]


def test_computation_applied_by_an_allowed_primitive_is_checked():
    """lax.reduce and lax.reduce_window apply the step's own computation, which must vary when
    it reads the replica index or calls the host, though the reduction itself preserves."""
    index = lambda: lax.axis_index(REPLICA_AXIS).astype(jnp.float32)
    host = lambda: jax.pure_callback(lambda: np.float32(1), jax.ShapeDtypeStruct((), jnp.float32))

    def reductions(w):
        zero = np.float32(0)
        return (
            lax.reduce(w, zero, lambda a, b: a + b + index(), (0,)),
            lax.reduce(w, zero, lambda a, b: a * b + host(), (0,)),
            lax.reduce_window(w, zero, lambda a, b: a + b * index(), (2,), (1,), "VALID"),
            lax.reduce(w, zero, lambda a, b: a * b + a, (0,)),  # reduce_p, a pure computation
            lax.reduce_window(w, zero, lambda a, b: a * b - a, (2,), (1,), "VALID"),
        )

    flags = _varying(reductions, False, args=[np.ones(4, np.float32)])
    assert flags == [True, True, True, False, False]


def test_hierarchical_all_reduce_of_a_value_that_differs_between_logical_cores_varies():
    """Found by tests/test_replication_generated.py. A host callback makes every mesh axis
    manual, and a number the host gives each device differs between a replica's logical cores;
    an all-reduce over replicas, slice by slice, leaves it different between them."""
    strategy = ts.TPUStrategy(num_logical_cores=2, num_slices=2)
    calls = itertools.count()

    def step(w, i):
        # Powers of two: the sums of any two different sets of answers differ.
        answer = lambda: np.float32(2.0 ** next(calls))
        host = io_callback(answer, jax.ShapeDtypeStruct((), jnp.float32))
        ctx = ts.get_replica_context()
        return {
            "host_sum": ctx.all_reduce("sum", host),
            "sum": ctx.all_reduce("sum", w),
            "replica_sum": ctx.all_reduce("sum", i),
        }

    ids = ts.PerReplica([np.float32(i) for i in range(4)])
    out = strategy.run(step, args=(np.float32(1.0), ids))
    assert _kinds(out) == {"host_sum": "PerReplica", "sum": "Mirrored", "replica_sum": "Mirrored"}
    assert [float(s.data) for s in out["sum"].addressable_shards] == [4.0] * 8
    assert [float(s.data) for s in out["replica_sum"].addressable_shards] == [6.0] * 8
    # The two logical cores of each replica hold different sums.
    assert len({float(s.data[0]) for s in out["host_sum"].stacked.addressable_shards}) == 2


def test_collectives_remove_the_axes_they_combine():
    """With the logical cores manual too (a step that calls the host), a value varies along some
    of the mesh axes; a collective over an axis makes it the same along that axis only."""
    axis_env = [(REPLICA_AXIS, 4), ("logical_core", 2)]
    every = (REPLICA_AXIS, "logical_core")

    def step(x):
        core = lax.axis_index("logical_core").astype(jnp.float32)
        replica = lax.axis_index(REPLICA_AXIS).astype(jnp.float32)
        return (
            lax.psum(x, REPLICA_AXIS),
            lax.psum(x * core, REPLICA_AXIS),
            lax.psum(x * core, every),
            lax.pmax(replica, REPLICA_AXIS),
            lax.psum(replica, "logical_core"),
            lax.all_gather(x + replica, REPLICA_AXIS),
            lax.ppermute(lax.psum(x, REPLICA_AXIS), REPLICA_AXIS, [(0, 1), (1, 0)]),
        )

    jaxpr = jax.make_jaxpr(step, axis_env=axis_env)(np.float32(1))
    flags = varying_outputs(jaxpr, [{REPLICA_AXIS}], combined_axes=every)
    assert flags == [False, True, False, False, True, False, True]
    # An input known only as varying varies along every axis: no sum over replicas undoes it.
    assert varying_outputs(jaxpr, [True], combined_axes=every)[0]


def test_all_reduce_in_a_step_that_calls_the_host_on_several_logical_cores():
    """jax.debug.print makes every mesh axis manual; an all-reduce is still replicated."""
    strategy = ts.TPUStrategy(num_logical_cores=2)
    ids = strategy.experimental_distribute_values_from_function(
        lambda ctx: np.float32(ctx.replica_id_in_sync_group)
    )

    def step(i):
        jax.debug.print("replica value {}", i)
        ctx = ts.get_replica_context()
        return {
            "sum": ctx.all_reduce("sum", i),
            "local": i * 2,
            "id": ctx.all_reduce("max", 0 * i + ctx.replica_id_in_sync_group),
        }

    out = strategy.run(step, args=(ids,))
    assert _kinds(out) == {"sum": "Mirrored", "local": "PerReplica", "id": "Mirrored"}
    assert [float(s.data) for s in out["sum"].addressable_shards] == [6.0] * 8
    assert [float(s.data) for s in out["id"].addressable_shards] == [3.0] * 8


def test_unknown_primitive_varies_even_on_replicated_inputs():
    mystery = Primitive("tpustrat_test_mystery")
    mystery.def_abstract_eval(lambda x: x)
    assert not is_classified(mystery)
    assert _varying(lambda w: (mystery.bind(w), w + 1), False) == [True, False]


def _registered_primitives():
    """Every Primitive defined in the installed JAX, found by importing each of its modules.

    Left out: kernel languages (Pallas, Mosaic, Triton), whose primitives appear only inside a
    kernel's own jaxpr (the step sees pallas_call, which varies), and JAX's test utilities.
    """
    skipped = ("pallas", "mosaic", "triton", "tpu_custom_call", "internal_test_util", "jax2tf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in pkgutil.walk_packages(jax.__path__, "jax.", onerror=lambda name: None):
            if any(part in module.name for part in skipped):
                continue
            try:
                importlib.import_module(module.name)
            except Exception:  # an optional dependency (TensorFlow, CUDA, ...) is missing
                continue
    found = {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != "jax" or any(part in name for part in skipped):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Primitive):
                found[id(value)] = value
    return list(found.values())


def test_census_every_primitive_of_the_installed_jax_is_classified():
    primitives = _registered_primitives()
    assert len(primitives) > 250  # the walk really found JAX's primitives
    unclassified = sorted(p.name for p in primitives if not is_classified(p))
    assert not unclassified, (
        f"JAX {jax.__version__} has primitives the replication proof has never classified: "
        f"{unclassified}. Add each to PRESERVING or COMBINING in tpustrat/_replication.py (or "
        "HIGHER_ORDER in tpustrat/_jaxpr.py) "
        "if it provably keeps a value the same on every replica, else to REVIEWED_AS_VARYING"
    )
