"""TPUStrategy: construction, run semantics, reduce, gather, compile reuse, bounded dispatch."""

import json
import os
import pathlib
import random
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpustrat as ts
from tpustrat import _placement


def _replica_ids(strategy, dtype=np.float32):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: np.asarray(ctx.replica_id_in_sync_group, dtype)
    )


_CORE_AXES = {  # a composite core count is factored into prime sub-axes, major first
    1: {"logical_core": 1},
    2: {"logical_core": 2},
    4: {"logical_core.0": 2, "logical_core.1": 2},
    8: {"logical_core.0": 2, "logical_core.1": 2, "logical_core.2": 2},
}


def test_mesh_layout(strategy):
    r, c = strategy.num_replicas_in_sync, strategy.num_logical_cores
    cores = _CORE_AXES[c]
    assert strategy.logical_core_axes == tuple(cores)
    assert strategy.mesh.axis_names == ("replica", *cores)
    assert strategy.mesh.shape == {"replica": r, **cores}
    assert r * c == 8
    assert [d.id for d in strategy.mesh.devices.flat] == list(range(8))


@pytest.mark.parametrize("cores", [3, 5])
def test_indivisible_logical_cores(cores):
    with pytest.raises(ValueError, match=f"num_logical_cores={cores}"):
        ts.TPUStrategy(num_logical_cores=cores)


def test_non_positive_logical_cores():
    with pytest.raises(ValueError, match="num_logical_cores must be an int >= 1, got 0"):
        ts.TPUStrategy(num_logical_cores=0)


def test_explicit_devices():
    strategy = ts.TPUStrategy(devices=jax.devices()[:4], num_logical_cores=2)
    assert strategy.num_replicas_in_sync == 2
    with pytest.raises(ValueError, match="more than once"):
        ts.TPUStrategy(devices=[jax.devices()[0]] * 2)


def test_run_per_replica_and_replicated_args(strategy):
    n = strategy.num_replicas_in_sync
    ids = _replica_ids(strategy)
    out = strategy.run(lambda i, w, b: i * w + b, args=(ids, np.float32(3.0)), kwargs={"b": 1.0})
    assert isinstance(out, ts.PerReplica)
    np.testing.assert_allclose(
        [float(v) for v in strategy.experimental_local_results(out)], 3.0 * np.arange(n) + 1.0
    )


def test_outputs_mirrored_only_when_provably_identical(strategy):
    ids = _replica_ids(strategy)

    def step(i, w):
        ctx = ts.get_replica_context()
        total = ctx.all_reduce("sum", i)
        return {
            "local": i * w,
            "total": total,
            "derived": jnp.sqrt(total) + w,  # from collectives and replicated inputs only
            "replica_id": ctx.replica_id_in_sync_group,
            "replicated_input": w * 2,
        }

    out = strategy.run(step, args=(ids, 2.0))
    assert isinstance(out["local"], ts.PerReplica)
    assert isinstance(out["replica_id"], ts.PerReplica)
    assert isinstance(out["total"], jax.Array)
    assert isinstance(out["derived"], jax.Array)
    assert isinstance(out["replicated_input"], jax.Array)
    n = strategy.num_replicas_in_sync
    assert float(out["total"]) == n * (n - 1) / 2
    assert out["total"].sharding.is_fully_replicated


def test_outputs_feed_back_into_run(strategy):
    n = strategy.num_replicas_in_sync
    ids = _replica_ids(strategy)

    def step(state, i):
        ctx = ts.get_replica_context()
        return {"w": state["w"] + ctx.all_reduce("mean", i), "seen": state["seen"] + i}

    state = {"w": strategy.replicate(np.zeros(3, np.float32)), "seen": ids}
    for _ in range(5):
        state = strategy.run(step, args=(state, ids))
    assert isinstance(state["w"], jax.Array)
    assert isinstance(state["seen"], ts.PerReplica)
    np.testing.assert_allclose(np.asarray(state["w"]), np.full(3, 5 * (n - 1) / 2))
    seen = [float(v) for v in strategy.experimental_local_results(state["seen"])]
    np.testing.assert_allclose(seen, 6 * np.arange(n))


def test_run_inside_jit(strategy):
    ids = _replica_ids(strategy)

    @jax.jit
    def twice(x):
        y = strategy.run(lambda v: v + 1.0, args=(x,))
        return strategy.run(lambda v: ts.get_replica_context().all_reduce("sum", v), args=(y,))

    out = twice(ids)
    n = strategy.num_replicas_in_sync
    assert isinstance(out, jax.Array)
    assert float(out) == n * (n - 1) / 2 + n


def test_python_scalar_outputs_and_none(strategy):
    out = strategy.run(lambda: (1.0, None, {"k": 2}))
    assert isinstance(out[0], jax.Array) and float(out[0]) == 1.0
    assert out[1] is None
    assert int(out[2]["k"]) == 2


def test_non_array_output_is_a_clear_error(strategy):
    with pytest.raises(TypeError, match=r"returned a str at output\['name'\]"):
        strategy.run(lambda: {"name": "loss"})


def test_bad_arguments(strategy):
    with pytest.raises(TypeError, match="args must be a tuple"):
        strategy.run(lambda x: x, args=np.ones(3))
    with pytest.raises(TypeError, match=r"args\[0\]\['tag'\] is a str"):
        strategy.run(lambda x: x, args=({"tag": "a"},))
    with pytest.raises(TypeError, match="needs a callable"):
        strategy.run(3)
    with pytest.raises(TypeError, match=r"options must be a ts\.RunOptions, got dict"):
        strategy.run(lambda x: x, args=(1.0,), options={"donate_argnums": (0,)})
    wrong = ts.PerReplica([np.float32(0)] * (strategy.num_replicas_in_sync + 1))
    with pytest.raises(ValueError, match=r"args\[0\] is a PerReplica with \d+ components but"):
        strategy.run(lambda x: x, args=(wrong,))


@pytest.mark.parametrize("op", ["sum", "mean", "max", "min", ts.ReduceOp.SUM, "MEAN"])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_reduce_per_replica_matches_numpy(strategy, op, axis):
    n = strategy.num_replicas_in_sync
    data = np.random.default_rng(0).normal(size=(n, 4, 3)).astype(np.float32)
    value = strategy.experimental_distribute_values_from_function(
        lambda ctx: data[ctx.replica_id_in_sync_group]
    )
    name = ts.ReduceOp.parse(op).value
    reducer = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min}[name]
    axes = 0 if axis is None else (0, 1 + axis % 2)
    np.testing.assert_allclose(
        np.asarray(strategy.reduce(op, value, axis=axis)),
        reducer(data, axis=axes),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("op", "axis", "expected"),
    [
        ("sum", None, "n*x"),
        ("mean", None, "x"),
        ("max", None, "x"),
        ("min", None, "x"),
        ("sum", 0, "n*x.sum(0)"),
        ("mean", 0, "x.mean(0)"),
    ],
)
def test_reduce_mirrored_follows_tf(strategy, op, axis, expected):
    n = strategy.num_replicas_in_sync
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    want = eval(expected, {"n": n, "x": x})
    for value in (strategy.replicate(x), x):  # a plain array counts as the same on every replica
        np.testing.assert_allclose(np.asarray(strategy.reduce(op, value, axis=axis)), want)


def test_reduce_errors(strategy):
    value = _replica_ids(strategy)
    with pytest.raises(ValueError, match=r"reduce_op must be .*; got 'prod'"):
        strategy.reduce("prod", value)
    with pytest.raises(ValueError, match="axis 0 is out of range for per-replica values of rank 0"):
        strategy.reduce("sum", value, axis=0)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        strategy.gather(strategy.replicate(np.ones((2, 2))), axis=2)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_concatenates_in_replica_order(strategy, axis):
    n = strategy.num_replicas_in_sync
    data = np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3)
    value = strategy.experimental_distribute_values_from_function(
        lambda ctx: data[ctx.replica_id_in_sync_group]
    )
    want = np.concatenate(list(data), axis=axis)
    np.testing.assert_array_equal(np.asarray(strategy.gather(value, axis)), want)
    mirrored = strategy.replicate(data[0])
    np.testing.assert_array_equal(
        np.asarray(strategy.gather(mirrored, axis)), np.concatenate([data[0]] * n, axis=axis)
    )


def test_local_results_of_pytrees(strategy):
    n = strategy.num_replicas_in_sync
    ids = _replica_ids(strategy)
    tree = {"p": ids, "m": strategy.replicate(np.float32(7)), "plain": 3}
    results = strategy.experimental_local_results(tree)
    assert len(results) == n
    for r, result in enumerate(results):
        assert float(result["p"]) == r
        assert float(result["m"]) == 7.0
        assert result["plain"] == 3


def test_local_results_live_on_their_replica_and_compile_nothing(strategy, compile_count):
    n = strategy.num_replicas_in_sync
    out = strategy.run(lambda x: {"twice": 2 * x}, args=(_replica_ids(strategy),))["twice"]
    jax.block_until_ready(out)
    compiled = compile_count()
    results = strategy.experimental_local_results(out)
    values = out.values
    assert compile_count() == compiled  # read from the shards, no program per replica
    for r in range(n):
        replica_devices = set(strategy.mesh.devices[r].flat)
        for component in (results[r], values[r]):
            assert component.devices() == replica_devices
            assert float(component) == 2.0 * r


def test_scope_and_get_strategy(strategy):
    default = ts.get_strategy()  # one replica, outside any scope
    with strategy.scope():
        assert ts.get_strategy() is strategy
        seen = []
        strategy.run(lambda: seen.append(ts.get_strategy()) or 0.0)
        assert seen[-1] is strategy
    assert ts.get_strategy() is default


def test_identical_calls_compile_once(strategy, compile_count):
    ids = _replica_ids(strategy)

    def step(w, i):
        return w + ts.get_replica_context().all_reduce("sum", i)

    w = strategy.replicate(np.zeros(4, np.float32))
    w = strategy.run(step, args=(w, ids))  # compiles
    before = compile_count()
    for _ in range(20):
        w = strategy.run(step, args=(w, ids))
    assert compile_count() == before
    n = strategy.num_replicas_in_sync
    np.testing.assert_allclose(np.asarray(w), np.full(4, 21 * n * (n - 1) / 2))


def test_tight_loop_of_collectives_never_hangs():
    """1000 plain calls: the dispatch window keeps XLA:CPU from a rendezvous abort."""
    strategy = ts.TPUStrategy()
    ids = _replica_ids(strategy)
    total = strategy.replicate(np.float32(0))
    step = lambda t, i: t + ts.get_replica_context().all_reduce("sum", i)
    result = {}

    def loop():
        t = total
        for _ in range(1000):
            t = strategy.run(step, args=(t, ids))
        result["total"] = float(t)

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    worker.join(timeout=240)
    assert not worker.is_alive(), "1000 run calls did not finish in 240 s"
    assert result["total"] == 1000 * 28.0


def test_max_steps_in_flight_is_validated():
    with pytest.raises(ValueError, match="max_steps_in_flight must be an int >= 1, got 0"):
        ts.TPUStrategy(max_steps_in_flight=0)
    with pytest.raises(TypeError, match="max_steps_in_flight must be an int, got str '2'"):
        ts.TPUStrategy(max_steps_in_flight="2")


def test_donation_deletes_the_donated_state():
    strategy = ts.TPUStrategy()
    state = strategy.replicate(np.ones(16, np.float32))
    leaf = state
    new = strategy.run(lambda s: s * 2, args=(state,), options=ts.RunOptions(donate_argnums=(0,)))
    np.testing.assert_allclose(np.asarray(new), 2 * np.ones(16))
    assert leaf.is_deleted()


def test_step_is_traced_once_per_signature(strategy):
    traces = []

    def step(x):
        traces.append(x.shape)
        return ts.get_replica_context().all_reduce("sum", x)

    ids = _replica_ids(strategy)
    for _ in range(3):
        strategy.run(step, args=(ids,))
    assert traces == [()]


def _in_thread(fn, timeout):
    """Runs ``fn`` in a daemon thread; fails the test if it has not finished in ``timeout`` s."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(value=fn()), daemon=True)
    worker.start()
    worker.join(timeout=timeout)
    assert not worker.is_alive(), f"did not finish in {timeout} s"
    return result["value"]


def _sgd_step(state, x):
    ctx = ts.get_replica_context()
    grad = jax.grad(lambda w: ((x @ w) ** 2).mean())(state["w"])
    return {"w": state["w"] - 0.01 * ctx.all_reduce("mean", grad), "n": state["n"] + 1}


def test_a_thousand_donated_steps_finish_and_equal_the_undonated_loop():
    strategy = ts.TPUStrategy()
    x = strategy.experimental_distribute_values_from_function(
        lambda ctx: np.full((2, 3), ctx.replica_id_in_sync_group / 8, np.float32)
    )
    start = {"w": np.ones(3, np.float32), "n": np.int32(0)}

    def loop(options):
        state = strategy.replicate(start)
        for _ in range(1000):
            state = strategy.run(_sgd_step, args=(state, x), options=options)
        return jax.tree.map(np.asarray, state)

    donated = _in_thread(lambda: loop(ts.RunOptions(donate_argnums=(0,))), timeout=240)
    plain = _in_thread(lambda: loop(None), timeout=240)
    assert int(donated["n"]) == 1000
    np.testing.assert_array_equal(donated["w"], plain["w"])


def test_donated_loop_with_host_views_and_a_reused_value():
    strategy = ts.TPUStrategy()
    state = strategy.replicate({"w": np.ones(3, np.float32), "n": np.int32(0)})
    donate = ts.RunOptions(donate_argnums=(0,))
    history, first = [], state
    for _ in range(5):
        history.append(np.asarray(state["w"]))  # a live host view of each step's state
        state = strategy.run(
            lambda s: {"w": s["w"] * 2, "n": s["n"] + 1}, args=(state,), options=donate
        )
    np.testing.assert_array_equal(np.asarray(state["w"]), 32 * np.ones(3))
    with pytest.raises(ValueError, match=r"args\[0\]\['n'\] was donated to an earlier run call"):
        strategy.run(lambda s: s["w"], args=(first,))


def test_strategy_calls_inside_jit_leave_plain_calls_working():
    strategy = ts.TPUStrategy()
    x = _replica_ids(strategy)
    rows = strategy.experimental_distribute_values_from_function(lambda ctx: np.ones(1))
    for fn in (
        lambda: strategy.reduce("sum", x),
        lambda: strategy.gather(rows, axis=0),
        lambda: strategy.run(lambda: ts.get_replica_context().all_reduce("sum", 1.0)),
    ):
        jax.jit(fn)()
    for _ in range(4):  # more plain calls than the window holds
        assert float(strategy.reduce("sum", x)) == 28.0
        assert float(strategy.run(lambda: ts.get_replica_context().all_reduce("sum", 1.0))) == 8


def test_calls_with_placed_inputs_match_the_checked_path(strategy):
    """The fast path (inputs laid out as on the last call) computes what the checked path does."""
    ids = _replica_ids(strategy)
    n = strategy.num_replicas_in_sync
    state = {f"w{k}": np.full(2, k, np.float32) for k in range(12)}  # host arrays: placed first

    def step(state, i):
        mean = ts.get_replica_context().all_reduce("mean", i)
        return jax.tree.map(lambda w: w + mean, state)

    # Call 1 places, call 2 records the layout in the placement cache, calls 3-6 find it there.
    for _ in range(6):
        state = strategy.run(step, args=(state, ids))
    for k in range(12):
        np.testing.assert_allclose(np.asarray(state[f"w{k}"]), k + 6 * (n - 1) / 2)
    stats = strategy.compile_stats()
    assert (stats.num_compiles, stats.num_cache_hits) == (1, 5)


def test_the_placement_cache_is_keyed_by_structure_and_shardings_and_refuses_gone_arrays():
    """A lookup finds a call whose leaves have the remembered structure and shardings; a
    deleted or donated leaf, a leaf moved elsewhere, a number or a tracer is never in place."""
    strategy = ts.TPUStrategy()
    cache = _placement.PlacementCache()
    state = strategy.replicate({"a": np.zeros(3, np.float32), "b": np.ones(2, np.float32)})
    leaves, structure = jax.tree.flatten(((state,), {}))
    assert cache.lookup(leaves, structure) is _placement.MISS
    cache.remember(leaves, structure, None)
    assert cache.lookup(leaves, structure) is None  # in place; None: no layouts over cores
    again, _ = jax.tree.flatten(((strategy.replicate(state),), {}))
    assert cache.lookup(again, structure) is None  # other arrays, the same shardings
    moved = [jax.device_put(leaves[0], jax.devices()[0]), leaves[1]]
    other_structure = jax.tree.flatten(((state, state), {}))[1]
    assert cache.lookup(moved, structure) is _placement.MISS
    assert cache.lookup(leaves * 2, other_structure) is _placement.MISS
    assert cache.lookup([1.0, leaves[1]], structure) is _placement.MISS
    traced = []
    jax.make_jaxpr(lambda x: traced.append(cache.lookup([x, leaves[1]], structure)) or x)(leaves[0])
    assert traced == [_placement.MISS]
    cache.donated.add(leaves[1], "args[0]['b']")
    assert cache.lookup(leaves, structure) is _placement.MISS
    again[0].delete()
    assert cache.lookup(again, structure) is _placement.MISS


def _plus_one(state):
    return {"w": state["w"] + 1}


def _times_ten(state):
    return {"w": state["w"] * 10}


def test_a_repeated_call_is_told_apart_by_step_options_and_inputs():
    """After a loop's repeated calls, another step, options, shape or kind of input runs as
    asked."""
    strategy = ts.TPUStrategy()
    state = strategy.replicate({"w": np.zeros(3, np.float32)})
    for _ in range(4):
        state = strategy.run(_plus_one, args=(state,))
    state = strategy.run(_times_ten, args=(state,))
    np.testing.assert_allclose(np.asarray(state["w"]), np.full(3, 40.0))
    for _ in range(3):
        state = strategy.run(_plus_one, args=(state,))
    donate = ts.RunOptions(donate_argnums=(0,))
    new = strategy.run(_plus_one, args=(state,), options=donate)
    assert state["w"].is_deleted()  # the donating options were used, not the last call's
    np.testing.assert_allclose(np.asarray(new["w"]), np.full(3, 44.0))
    for _ in range(3):
        new = strategy.run(_plus_one, args=(new,))
    grown = strategy.run(_plus_one, args=(strategy.replicate({"w": np.zeros(5, np.float32)}),))
    assert grown["w"].shape == (5,)
    for host in (np.full(3, 2, np.float32), 2.0):  # not jax.Arrays: placed, as on any call
        for _ in range(3):
            new = strategy.run(_plus_one, args=(new,))
        out = strategy.run(_plus_one, args=({"w": host},))
        np.testing.assert_allclose(np.asarray(out["w"]), 3.0)
    stats = strategy.compile_stats()
    assert stats.num_compiles == 5  # plus_one, times_ten, donating plus_one, (5,), weak scalar


class _Scaler:
    def __init__(self, factor):
        self.factor = factor

    def step(self, s):
        return {"w": s["w"] * self.factor}


def test_a_repeated_bound_method_call_uses_its_own_object():
    strategy = ts.TPUStrategy()
    state = strategy.replicate({"w": np.ones(2, np.float32)})
    two, three = _Scaler(2.0), _Scaler(3.0)
    for _ in range(4):
        state = strategy.run(two.step, args=(state,))
    state = strategy.run(three.step, args=(state,))
    np.testing.assert_allclose(np.asarray(state["w"]), np.full(2, 16.0 * 3))


def _add_sum(state, i):
    return {"w": state["w"] + ts.get_replica_context().all_reduce("sum", i)}


def test_fast_path_still_refuses_deleted_and_miscounted_inputs():
    strategy = ts.TPUStrategy()
    donate = ts.RunOptions(donate_argnums=(0,))
    ids = _replica_ids(strategy)
    state = strategy.replicate({"w": np.ones(3, np.float32)})
    for _ in range(3):
        state = strategy.run(_add_sum, args=(state, ids))
    old = state
    state = strategy.run(lambda s, i: s, args=(old, ids), options=donate)
    with pytest.raises(ValueError, match=r"args\[0\]\['w'\] was donated to an earlier run call"):
        strategy.run(_add_sum, args=(old, ids))
    # A PerReplica of 16 components laid out exactly as the 8-component one was.
    wrong = ts.PerReplica.from_stacked(
        jax.device_put(np.zeros(16, np.float32), ids.stacked.sharding)
    )
    with pytest.raises(ValueError, match=r"args\[1\] is a PerReplica with 16 components but"):
        strategy.run(_add_sum, args=(state, wrong))
    np.testing.assert_allclose(np.asarray(state["w"]), np.full(3, 1 + 3 * 28.0))


def test_window_passes_over_outputs_a_later_step_donated():
    """A plain step's window marker is one of its outputs; donating it later must not break."""
    strategy = ts.TPUStrategy(max_steps_in_flight=1)
    donate = ts.RunOptions(donate_argnums=(0,))
    state = strategy.replicate({"w": np.zeros(3, np.float32)})
    for k in range(6):  # plain and donating calls alternate: each donates the last one's output
        state = strategy.run(
            lambda s: {"w": s["w"] + 1}, args=(state,), options=donate if k % 2 else None
        )
    np.testing.assert_allclose(np.asarray(state["w"]), np.full(3, 6.0))


# --- What an argument means: the same in plain run and inside jax.jit --------------------------


def _split_over_replicas(strategy, x):
    return jax.device_put(x, NamedSharding(strategy.mesh, P(ts.REPLICA_AXIS)))


def _argument_kinds(strategy):
    """One argument of each kind run takes, keyed by name."""
    n, cores = strategy.num_replicas_in_sync, strategy.num_logical_cores
    blocks = _split_over_replicas(strategy, np.arange(3.0 * n, dtype=np.float32))
    tiled = jax.device_put(
        np.arange(8.0 * cores, dtype=np.float32).reshape(8, cores),
        NamedSharding(strategy.mesh, P(None, strategy.logical_core_axes)),
    )
    return {
        "replicated": strategy.replicate(np.arange(4.0, dtype=np.float32)),
        "per_replica": _replica_ids(strategy),
        "blocks": ts.PerReplica.from_blocks(blocks, n),
        "number": 2.5,
        "key": strategy.replicate(jax.random.key(7)),
        "tiled": tiled,
    }


def _uses_every_kind(replicated, per_replica, blocks, number, key, tiled):
    ctx = ts.get_replica_context()
    replica = ctx.replica_id_in_sync_group
    return {
        "replicated": replicated * (replica + 1),
        "per_replica": per_replica * 10,
        "blocks": ctx.all_gather(blocks * (replica + 1), axis=0),
        "number": number * replica,
        "key": jax.random.uniform(key, (3,)),
        "tiled": tiled * (replica + 1),
    }


def test_every_argument_kind_means_the_same_plain_and_inside_jit(strategy):
    kinds = _argument_kinds(strategy)
    plain = strategy.run(_uses_every_kind, kwargs=kinds)
    jitted = jax.jit(lambda kw: strategy.run(_uses_every_kind, kwargs=kw))(kinds)
    n = strategy.num_replicas_in_sync
    replica = np.arange(n, dtype=np.float32)
    expected = {
        "replicated": (replica[:, None] + 1) * np.arange(4.0),
        "per_replica": 10 * replica,
        "blocks": np.repeat(replica + 1, 3) * np.arange(3.0 * n),
        "number": 2.5 * replica,
        "key": np.asarray(jax.random.uniform(jax.random.key(7), (3,))),
        "tiled": (replica[:, None, None] + 1)
        * np.arange(8.0 * strategy.num_logical_cores).reshape(8, -1),
    }
    for name, want in expected.items():
        for out in (plain[name], jitted[name]):
            got = out.stacked if isinstance(out, ts.PerReplica) else out
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, err_msg=name)


def _tf_gradient(w, x, y, global_batch):
    """tf.distribute's recipe: the loss summed over the replica's rows over the global batch."""
    grad = jax.grad(lambda w: ((x @ w - y) ** 2).sum() / global_batch)(w)
    return ts.get_replica_context().all_reduce("sum", grad)


@pytest.mark.parametrize("cores", [1, 2])
def test_a_gradient_over_batch_blocks_is_the_same_plain_and_inside_jit(cores):
    strategy = ts.TPUStrategy(num_logical_cores=cores)
    n = strategy.num_replicas_in_sync
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4 * n, 3)).astype(np.float32), rng.normal(size=4 * n).astype(np.float32)
    w = strategy.replicate(np.ones(3, np.float32))
    reference = jax.grad(lambda w: ((x @ w - y) ** 2).mean())(np.ones(3, np.float32))
    xs, ys = _split_over_replicas(strategy, x), _split_over_replicas(strategy, y)

    def with_blocks(w, x, y):
        view = ts.PerReplica.from_blocks
        return strategy.run(_tf_gradient, args=(w, view(x, n), view(y, n), 4 * n))

    np.testing.assert_allclose(np.asarray(with_blocks(w, xs, ys)), reference, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(with_blocks)(w, xs, ys)), reference, rtol=1e-5)
    # A plain array is the whole batch everywhere, inside jax.jit as in tf.distribute ...
    whole = jax.jit(lambda w, x, y: strategy.run(_tf_gradient, args=(w, x, y, 4 * n)))(w, xs, ys)
    np.testing.assert_allclose(np.asarray(whole), n * reference, rtol=1e-5)
    # ... so plain run refuses it laid out over the replicas, rather than give each its block.
    with pytest.raises(
        ValueError,
        match=rf"args\[1\] is a plain array laid out over the replica axis .*"
        rf"ts.PerReplica.from_blocks\(x, {n}\) .*strategy.replicate\(x\) or a host array",
    ):
        strategy.run(_tf_gradient, args=(w, xs, ys, 4 * n))
    whole = strategy.run(_tf_gradient, args=(w, strategy.replicate(x), y, 4 * n))
    np.testing.assert_allclose(np.asarray(whole), n * reference, rtol=1e-5)


def test_blocks_view_checks_its_arguments():
    strategy = ts.TPUStrategy()
    with pytest.raises(ValueError, match=r"dimension 0 of shape \(12,\) does not divide into 8"):
        ts.PerReplica.from_blocks(np.zeros(12, np.float32), 8)
    with pytest.raises(TypeError, match="takes one array, got a dict"):
        ts.PerReplica.from_blocks({"x": np.zeros(8)}, 8)
    view = ts.PerReplica.from_blocks(np.arange(16.0).reshape(2, 8), 8, axis=1)
    assert view.shape == (2, 1)
    np.testing.assert_array_equal(np.asarray(view.stacked)[3], [[3.0], [11.0]])
    out = strategy.run(lambda b: b.sum(), args=(view,))
    np.testing.assert_array_equal(np.asarray(out.stacked), np.arange(8.0) * 2 + 8)


# --- Donating one array twice -------------------------------------------------------------------


def _in_subprocess(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter with this tpustrat and 8 CPU devices."""
    package_root = pathlib.Path(ts.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(package_root), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=package_root,  # not the working directory, which may hold another tpustrat
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_an_array_donated_twice_or_also_read_gives_correct_values():
    done = _in_subprocess(
        """
        import json
        import numpy as np
        import tpustrat as ts

        strategy = ts.TPUStrategy()
        donate = ts.RunOptions(donate_argnums=(0,))
        w = strategy.replicate(np.ones(3, np.float32))
        tied = strategy.replicate({"a": w, "b": w})
        assert tied["a"] is tied["b"]
        step = lambda s: {"a": s["a"] + 1, "b": s["b"] * 3}
        tied = strategy.run(step, args=(tied,), options=donate)
        tied = strategy.run(step, args=(tied,), options=donate)  # the outputs are two arrays
        x = strategy.replicate(np.arange(3, dtype=np.float32))
        read = strategy.run(lambda a, b: a * 2 + b, args=(x, x), options=donate)
        y = strategy.replicate(np.full(3, 5, np.float32))
        keyword = strategy.run(lambda a, k: a + k, args=(y,), kwargs={"k": y}, options=donate)
        z = strategy.replicate(np.ones(3, np.float32))
        both = strategy.run(
            lambda a, b: (a + 1, b + 2), args=(z, z), options=ts.RunOptions(donate_argnums=(0, 1))
        )
        from flax import nnx

        class Tied(nnx.Module):
            def __init__(self, w):
                self.a, self.b = nnx.Param(w), nnx.Param(w)

        def nnx_step(model):
            model.a[...] = model.a[...] + 1
            model.b[...] = model.b[...] * 3

        model = Tied(strategy.replicate(np.ones(3, np.float32)))
        strategy.run(nnx_step, args=(model,), options=donate)
        print(json.dumps({
            "tied": [np.asarray(tied["a"]).tolist(), np.asarray(tied["b"]).tolist()],
            "nnx": [np.asarray(model.a[...]).tolist(), np.asarray(model.b[...]).tolist()],
            "read": np.asarray(read).tolist(),
            "keyword": np.asarray(keyword).tolist(),
            "both": [np.asarray(v).tolist() for v in both],
            "deleted": [w.is_deleted(), x.is_deleted(), y.is_deleted(), z.is_deleted()],
        }))
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    values = json.loads(done.stdout.splitlines()[-1])
    assert values == {
        "tied": [[3.0] * 3, [9.0] * 3],
        "nnx": [[2.0] * 3, [3.0] * 3],
        "read": [0.0, 3.0, 6.0],
        "keyword": [10.0] * 3,
        "both": [[2.0] * 3, [3.0] * 3],
        "deleted": [True] * 4,
    }


# --- Ctrl-C in a donated loop -------------------------------------------------------------------

_INTERRUPTED_LOOP = """
    import os, random, signal, threading
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import tpustrat as ts

    strategy = ts.TPUStrategy()
    donate = ts.RunOptions(donate_argnums=(0,))
    rng = random.Random(SEED)

    def step(state):
        count, work = state
        return count + 1, jnp.tanh(work @ work)

    class Counter(nnx.Module):
        def __init__(self):
            self.count = nnx.Variable(jnp.int32(0))
            self.work = nnx.Variable(jnp.eye(256, dtype=jnp.float32))

    def nnx_step(model):
        model.count[...] += 1
        model.work[...] = jnp.tanh(model.work[...] @ model.work[...])

    timers = []

    def interrupt_soon():  # inside the try: the SIGINT may come before start() returns
        timers.append(threading.Timer(rng.uniform(0.0, 0.1), os.kill, (os.getpid(), signal.SIGINT)))
        timers[-1].start()

    state = strategy.replicate((np.int32(0), np.eye(256, dtype=np.float32)))
    model = strategy.replicate(Counter())
    state = strategy.run(step, args=(state,), options=donate)  # compiled before any interrupt
    strategy.run(nnx_step, args=(model,), options=donate)
    done = nnx_done = 1
    for trial in range(TRIALS):
        try:
            interrupt_soon()
            while True:
                state, done = strategy.run(step, args=(state,), options=donate), done + 1
        except KeyboardInterrupt:
            pass
        timers[-1].join()
        assert not any(leaf.is_deleted() for leaf in state), ("deleted", trial)
        assert int(state[0]) == done, ("count", trial, int(state[0]), done)
        try:
            interrupt_soon()
            while True:
                _, nnx_done = strategy.run(nnx_step, args=(model,), options=donate), nnx_done + 1
        except KeyboardInterrupt:
            pass
        timers[-1].join()
        count = model.count[...]
        assert not count.is_deleted() and not model.work[...].is_deleted(), ("nnx", trial)
        assert int(count) == nnx_done, ("nnx count", trial, int(count), nnx_done)
    print("ok", done, nnx_done)
"""


def test_ctrl_c_in_a_donated_loop_leaves_a_valid_state():
    """SIGINT at random times: the state the loop holds is never a deleted, donated one."""
    seed = random.randrange(1 << 30)
    code = _INTERRUPTED_LOOP.replace("SEED", str(seed)).replace("TRIALS", "12")
    done = _in_subprocess(code, timeout=240)
    assert done.returncode == 0, (seed, done.stdout[-500:], done.stderr[-3000:])
    assert done.stdout.startswith("ok"), (seed, done.stdout)


# --- Host int64 values --------------------------------------------------------------------------


def test_host_int64_beyond_int32_is_refused_and_in_range_passes():
    strategy = ts.TPUStrategy()
    big = np.array([5, 2**40], np.int64)
    with pytest.raises(
        ValueError,
        match=r"args\[0\]\['ids'\] \(int64\) holds 1099511627776, outside the int32 range .*"
        r"jax_enable_x64",
    ):
        strategy.run(lambda b: b["ids"], args=({"ids": big},))
    with pytest.raises(ValueError, match=r"kwargs\['n'\] \(int64\) holds -3000000000"):
        strategy.run(lambda n: n, kwargs={"n": np.int64(-3_000_000_000)})
    with pytest.raises(ValueError, match=r"args\[0\] \(uint64\) holds 4294967296, outside"):
        strategy.run(lambda b: b, args=(ts.PerReplica([np.uint64(2**32)] * 8),))
    fits = np.array([-(2**31), 2**31 - 1], np.int64)
    out = strategy.run(lambda b: b, args=(fits,))
    np.testing.assert_array_equal(np.asarray(out), fits)


# --- Errors that name the fix -------------------------------------------------------------------


def test_misused_run_calls_say_what_to_pass():
    strategy = ts.TPUStrategy()
    x = np.float32(1)
    with pytest.raises(TypeError, match=r"kwargs must be a dict of keyword arguments.*got str 'a'"):
        strategy.run(lambda: 1, kwargs="a")
    with pytest.raises(TypeError, match=r"kwargs must be a dict of keyword arguments.*got dict"):
        strategy.run(lambda **kw: 1, kwargs={1: x})
    with pytest.raises(TypeError, match=r"args must be a tuple, got a dict.*kwargs=\{\.\.\.\}"):
        strategy.run(lambda x: x, args={"x": x})
    with pytest.raises(TypeError, match=r"needs a callable step, got str 'step'"):
        strategy.run("step", args=(x,))
    with pytest.raises(RuntimeError, match=r"inside a step that strategy.run is running.*directly"):
        strategy.run(lambda v: strategy.run(lambda u: u + 1, args=(v,)), args=(x,))
    np.testing.assert_allclose(np.asarray(strategy.run(lambda v: v + 1, args=(x,))), 2.0)


def test_a_per_replica_of_another_replica_count_names_both_counts():
    four = ts.TPUStrategy(num_logical_cores=2)
    eight = ts.TPUStrategy()
    value = four.experimental_distribute_values_from_function(lambda ctx: np.float32(1))
    for call in (
        lambda: eight.run(lambda v: v, args=(value,)),
        lambda: jax.jit(lambda v: eight.run(lambda u: u, args=(v,)))(value),
        lambda: eight.run_steps(lambda s, b: (s, b), np.float32(0), iter([value]), 1),
    ):
        with pytest.raises(ValueError, match="PerReplica with 4 components but the strategy has 8"):
            call()
    with pytest.raises(ValueError, match="PerReplica with 4 components, but the strategy has 8"):
        eight.experimental_local_results(value)  # where a KeyError: 4 came from
