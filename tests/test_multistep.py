"""run_steps: N steps in one program, equal to N separate run calls."""

import jax
import numpy as np
import optax
import pytest

import tpustrat as ts

OPTIMIZER = optax.adam(0.05)


def _loss(params, x, y):
    return ((x @ params["w"] + params["b"] - y) ** 2).sum()


def _train_step(state, batch):
    params, opt_state = state
    x, y = batch
    ctx = ts.get_replica_context()
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    grads = ctx.all_reduce("sum", grads)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), ctx.all_reduce("sum", loss)


def _batches(strategy, count, rows=4):
    rng = np.random.default_rng(0)
    n = strategy.num_replicas_in_sync
    out = []
    for _ in range(count):
        x = rng.normal(size=(n, rows, 3)).astype(np.float32)
        y = rng.normal(size=(n, rows, 2)).astype(np.float32)
        out.append((ts.PerReplica.from_stacked(x), ts.PerReplica.from_stacked(y)))
    return out


def _initial_state(strategy):
    params = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    return strategy.replicate((params, OPTIMIZER.init(params)))


def _values(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize("unroll", [1, 2, True])
@pytest.mark.parametrize("steps_per_run", [1, 4, 8])
def test_equals_separate_runs(strategy, steps_per_run, unroll):
    batches = _batches(strategy, 8)
    state = _initial_state(strategy)
    losses = []
    for batch in batches:
        state, loss = strategy.run(_train_step, args=(state, batch))
        losses.append(float(loss))

    fused = _initial_state(strategy)
    iterator = iter(batches)
    fused_losses = []
    for _ in range(8 // steps_per_run):
        fused, stacked, num = strategy.run_steps(
            _train_step, fused, iterator, steps_per_run, stack_outputs=True, unroll=unroll
        )
        assert num == steps_per_run
        assert isinstance(stacked, jax.Array)
        fused_losses += list(np.asarray(stacked))
    np.testing.assert_allclose(fused_losses, losses, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(_values(fused)), jax.tree.leaves(_values(state))):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_end_of_data_runs_the_remainder_then_stops_and_counts_every_program(compile_count):
    strategy = ts.TPUStrategy()
    batches = _batches(strategy, 5)
    iterator = iter(batches)
    state = _initial_state(strategy)
    jax.block_until_ready(state)
    before = compile_count()
    counts, losses = [], []
    while True:
        try:
            state, stacked, num = strategy.run_steps(
                _train_step, state, iterator, 4, stack_outputs=True
            )
        except StopIteration:
            break
        counts.append(num)
        losses += list(np.asarray(stacked))
    assert counts == [4, 1] and len(losses) == 5
    stats = strategy.compile_stats()
    assert stats.num_compiles == compile_count() - before == 2  # 4 steps, then 1
    assert stats.recompiles == ()  # a shorter group is a program of its own, not a recompile
    with pytest.raises(StopIteration):  # and stays ended
        strategy.run_steps(_train_step, state, iterator, 4)

    separate, separate_losses = _initial_state(strategy), []
    for batch in batches:
        separate, loss = strategy.run(_train_step, args=(separate, batch))
        separate_losses.append(float(loss))
    np.testing.assert_allclose(losses, separate_losses, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(_values(state)), jax.tree.leaves(_values(separate))):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_per_replica_outputs_stack_after_the_replica_axis():
    strategy = ts.TPUStrategy()
    batches = _batches(strategy, 3)

    def step(total, batch):
        x, _ = batch
        return total + ts.get_replica_context().all_reduce("sum", x.sum()), x.sum()

    total, local, num_steps = strategy.run_steps(
        step, np.float32(0), iter(batches), 3, stack_outputs=True
    )
    assert num_steps == 3
    assert isinstance(local, ts.PerReplica)
    assert local.stacked.shape == (8, 3)
    want = np.stack([b[0].stacked.sum(axis=(1, 2)) for b in batches], axis=1)
    np.testing.assert_allclose(np.asarray(local.stacked), want, rtol=1e-5)
    np.testing.assert_allclose(float(total), want.sum(), rtol=1e-5)


def test_repeated_calls_compile_once(compile_count):
    strategy = ts.TPUStrategy()
    iterator = iter(_batches(strategy, 12))
    state = _initial_state(strategy)
    state, _, _ = strategy.run_steps(_train_step, state, iterator, 4)
    before = compile_count()
    for _ in range(2):
        state, _, _ = strategy.run_steps(_train_step, state, iterator, 4)
    assert compile_count() == before


def test_unroll_true_writes_the_steps_out_without_a_loop():
    strategy = ts.TPUStrategy()  # one strategy: the programs for each unroll are told apart
    batches = _batches(strategy, 4)
    for unroll, loops in [(1, True), (True, False), (2, True), (False, True)]:

        def program(state, *batches, unroll=unroll):
            return strategy.run_steps(_train_step, state, iter(batches), 4, unroll=unroll).state

        hlo = jax.jit(program).lower(_initial_state(strategy), *batches).as_text()
        assert (" while(" in hlo or "stablehlo.while" in hlo) == loops, unroll


def test_errors():
    strategy = ts.TPUStrategy()
    with pytest.raises(ValueError, match="steps_per_run must be an int >= 1, got 0"):
        strategy.run_steps(_train_step, None, iter([]), 0)
    with pytest.raises(ValueError, match="unroll must be an int >= 1, got 0"):
        strategy.run_steps(_train_step, None, iter([]), 2, unroll=0)
    with pytest.raises(TypeError, match="unroll must be an int, got str '2'"):
        strategy.run_steps(_train_step, None, iter([]), 2, unroll="2")
    batches = iter(_batches(strategy, 2))
    with pytest.raises(TypeError, match=r"needs fn\(state, batch\) -> \(state, outputs\)"):
        strategy.run_steps(lambda s, b: s, np.float32(0), batches, 2)


def test_a_step_that_changes_the_state_dtype_is_refused():
    strategy = ts.TPUStrategy()
    batches = iter(_batches(strategy, 2))

    def step(total, batch):  # int32 state + float32 sum: float32
        return total + ts.get_replica_context().all_reduce("sum", batch[0].sum()), 0.0

    with pytest.raises(
        TypeError, match=r"returned a state leaf of float32\[\] for one of int32\[\]"
    ):
        strategy.run_steps(step, np.int32(0), batches, 2)


def test_a_dataset_or_list_instead_of_an_iterator_is_refused():
    strategy = ts.TPUStrategy()
    batches = _batches(strategy, 3)
    dataset = strategy.experimental_distribute_dataset([np.zeros((8, 3), np.float32)] * 3)
    for source in (batches, dataset):
        with pytest.raises(TypeError, match=r"takes an iterator, got a .*pass iter\(dataset\)"):
            strategy.run_steps(_train_step, _initial_state(strategy), source, 2)
    result = strategy.run_steps(
        lambda total, x: (total + x.sum(), x.sum()), np.float32(0), iter(dataset), 2
    )
    assert result.num_steps == 2


def test_batches_of_another_shape_name_the_leaf_and_both_shapes():
    strategy = ts.TPUStrategy()
    (x, y), (short_x, _) = _batches(strategy, 1)[0], _batches(strategy, 1, rows=3)[0]
    with pytest.raises(
        ValueError,
        match=r"batch\[0\] is a PerReplica of float32\[4, 3\] in batch 0 but a PerReplica of "
        r"float32\[3, 3\] in batch 1; .*pad the last partial batch",
    ):
        strategy.run_steps(_train_step, _initial_state(strategy), iter([(x, y), (short_x, y)]), 2)
    with pytest.raises(ValueError, match=r"batch 1 has structure .* but batch 0 has"):
        strategy.run_steps(_train_step, _initial_state(strategy), iter([(x, y), (x, y, y)]), 2)
    with pytest.raises(TypeError, match="needs a callable step fn"):
        strategy.run_steps(None, np.float32(0), iter([(x, y)]), 1)
