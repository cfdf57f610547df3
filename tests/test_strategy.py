"""TPUStrategy: construction, run semantics, reduce, gather, compile reuse, bounded dispatch."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tpustrat as ts


def _replica_ids(strategy, dtype=np.float32):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: np.asarray(ctx.replica_id_in_sync_group, dtype)
    )


def test_mesh_layout(strategy):
    r, c = strategy.num_replicas_in_sync, strategy.num_logical_cores
    assert strategy.mesh.axis_names == ("replica", "logical_core")
    assert strategy.mesh.shape == {"replica": r, "logical_core": c}
    assert r * c == 8
    ids = [[d.id for d in row] for row in strategy.mesh.devices]
    assert ids == np.arange(8).reshape(r, c).tolist()


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
    with pytest.raises(ValueError, match="unknown reduce op 'prod'"):
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

    # Call 1 places, call 2 records the layout, call 3 finds it, and calls 4-6 repeat call 3.
    for _ in range(6):
        state = strategy.run(step, args=(state, ids))
    for k in range(12):
        np.testing.assert_allclose(np.asarray(state[f"w{k}"]), k + 6 * (n - 1) / 2)
    stats = strategy.compile_stats()
    assert (stats.num_compiles, stats.num_cache_hits) == (1, 5)


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
