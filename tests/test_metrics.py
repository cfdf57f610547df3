"""Metrics that aggregate on read: NNX metrics passed to run, summed over replicas when read.

Every value read on the host is compared with one device computing the same metric on the
whole data (the global batches, padded rows masked out). The proof that a step updates its
metrics additively is checked on seeded, generated steps: each accepted step must read equal
to one device, and each other one must raise.
"""

from __future__ import annotations

import functools
import random
import tempfile

import _metrics_workers as workers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MESH_SHAPES
from flax import nnx

import tpustrat as ts
from tpustrat import _metrics

CLASSES, GLOBAL_BATCH, ROWS = 5, 16, 40  # 40 rows: two full batches, then 8 padded to 16


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(ROWS, CLASSES)).astype(np.float32)
    labels = rng.integers(0, CLASSES, ROWS).astype(np.int32)
    losses = rng.normal(size=ROWS).astype(np.float32)
    return logits, labels, losses


def _batches(strategy: ts.TPUStrategy, data) -> list:
    """The global batches of ``data`` on the replicas, the last partial one padded and masked."""
    options = ts.InputOptions(mask=True, global_batch_size=GLOBAL_BATCH)
    rows = [tuple(a[i : i + GLOBAL_BATCH] for a in data) for i in range(0, ROWS, GLOBAL_BATCH)]
    return list(strategy.experimental_distribute_dataset(rows, options))


def _multi_metric() -> nnx.MultiMetric:
    return nnx.MultiMetric(loss=nnx.metrics.Average("loss"), accuracy=nnx.metrics.Accuracy())


def _update(metrics, batch, mask):
    logits, labels, losses = batch
    metrics.update(logits=logits, labels=labels, loss=losses, mask=mask)


def _one_device(data, epochs: int = 1) -> dict:
    """The metrics of one device over every row of ``data``: no padding to leave out."""
    reference = _multi_metric()
    for _ in range(epochs):
        reference.reset()
        logits, labels, losses = data
        reference.update(logits=logits, labels=labels, loss=losses)
    return {name: float(value) for name, value in reference.compute().items()}


def _assert_reads(metrics, expected: dict) -> None:
    for name, value in metrics.compute().items():
        np.testing.assert_allclose(float(value), expected[name], rtol=1e-6, err_msg=name)


def train_step(metrics, batch, mask):
    _update(metrics, batch, mask)


def test_run_accumulates_per_replica_and_reads_one_device_value(strategy, compile_count):
    data = _data()
    expected = _one_device(data)
    batches = _batches(strategy, data)
    metrics = _multi_metric()
    compiled = 0
    for _ in range(2):
        metrics.reset()
        before = compile_count()
        for batch, mask in batches:
            strategy.run(train_step, args=(metrics, batch, mask))
        compiled += compile_count() - before
        _assert_reads(metrics, expected)
        count = metrics.accuracy.count
        assert int(count[...]) == ROWS, "the masked rows of the last batch count once"
        assert count.get_raw_value().shape == (strategy.num_replicas_in_sync,)
    assert compiled == 1, "one program; placing a metric's blocks compiles nothing"
    assert strategy.compile_stats().num_compiles == 1
    assert isinstance(metrics.loss.total, nnx.metrics.MetricState)
    assert type(metrics.loss.total).__name__ == "MetricState"


def test_average_alone_and_assignment_on_the_host(strategy):
    average = nnx.metrics.Average("loss")
    data = _data()
    for batch, mask in _batches(strategy, data):
        strategy.run(lambda m, b, k: m.update(loss=b[2], mask=k), args=(average, batch, mask))
    np.testing.assert_allclose(float(average.compute()), data[2].mean(), rtol=1e-6)
    average.total[...] = 10.0  # a whole value again, set on the host
    average.count[...] = 4
    assert float(average.compute()) == 2.5
    batch, mask = _batches(strategy, data)[0]
    strategy.run(lambda m, b, k: m.update(loss=b[2], mask=k), args=(average, batch, mask))
    expected = (10.0 + data[2][:GLOBAL_BATCH].sum()) / (4 + GLOBAL_BATCH)
    np.testing.assert_allclose(float(average.compute()), expected, rtol=1e-6)


def test_run_steps_accumulates_as_run_does(strategy):
    data = _data()
    metrics = _multi_metric()

    def steps_step(state, batch):
        (metrics,) = state
        _update(metrics, *batch)
        return state, metrics.loss.compute()  # the replica's own value, read in the step

    # run_steps stacks batches of one shape: the two full batches, then the last.
    batches = iter(_batches(strategy, data))
    result = strategy.run_steps(steps_step, (metrics,), batches, 2)
    assert result.num_steps == 2
    assert result.state[0] is metrics
    assert isinstance(result.outputs, ts.PerReplica), "a read in the step is per replica"
    strategy.run_steps(steps_step, (metrics,), batches, 2)
    _assert_reads(metrics, _one_device(data))


def test_a_read_inside_the_step_is_the_replicas_own_value(strategy):
    data = _data()
    metrics = _multi_metric()

    def step(metrics, batch, mask):
        _update(metrics, batch, mask)
        return metrics.loss.total[...], metrics.compute()["accuracy"]

    batch, mask = _batches(strategy, data)[0]
    total, accuracy = strategy.run(step, args=(metrics, batch, mask))
    assert isinstance(total, ts.PerReplica) and isinstance(accuracy, ts.PerReplica)
    losses = np.asarray(batch[2].stacked)  # (replicas, rows per replica)
    correct = np.asarray(batch[0].stacked).argmax(-1) == np.asarray(batch[1].stacked)
    np.testing.assert_allclose(np.asarray(total.stacked), losses.sum(1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(accuracy.stacked), correct.mean(1), rtol=1e-6)
    np.testing.assert_allclose(float(metrics.loss.total[...]), losses.sum(), rtol=1e-6)


class Holder(nnx.Module):
    """Metrics held by a module, with a step counter held either as a variable or as a plain
    array (``nnx.data``): a leaf that is no variable makes run pass the objects' leaves whole
    and take their new state back through ``nnx.update``."""

    def __init__(self, plain: bool):
        zero = jnp.zeros((), jnp.int32)
        self.steps = nnx.data(zero) if plain else nnx.BatchStat(zero)
        self.metrics = _multi_metric()


# How the step hands back the objects' new values: one per leaf, the graph unchanged; the whole
# new state, because a leaf is a plain array; the whole new state, because the step adds a
# variable on its first call (and one per leaf after).
FORMS = ("leaf values", "a plain array leaf", "the graph grows")


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.replace(" ", "-"))
def test_metrics_read_one_device_value_whichever_form_the_step_returns(strategy, form):
    data = _data()
    holder = Holder(plain=form == "a plain array leaf")

    def step(h, batch, mask):
        if form == "the graph grows" and not hasattr(h, "seen"):
            h.seen = nnx.BatchStat(jnp.ones(()))
        if form == "a plain array leaf":
            h.steps = h.steps + 1
        else:
            h.steps[...] = h.steps[...] + 1
        _update(h.metrics, batch, mask)

    for _ in range(2):
        holder.metrics.reset()
        for batch, mask in _batches(strategy, data):
            strategy.run(step, args=(holder, batch, mask))
        _assert_reads(holder.metrics, _one_device(data))
        assert holder.metrics.loss.total.get_raw_value().shape == (strategy.num_replicas_in_sync,)
    assert int(holder.steps[...] if form != "a plain array leaf" else holder.steps) == 6
    assert hasattr(holder, "seen") == (form == "the graph grows")


def test_metrics_keep_their_objects_split_between_calls(monkeypatch):
    """Metrics are laid out from the split kept between calls: after the first call, which
    splits the objects (once more after making their metrics summed on read) and traces the
    step, a call splits nothing."""
    strategy = ts.TPUStrategy(num_logical_cores=2)
    data = _data()
    metrics = _multi_metric()
    flatten, splits = nnx.flatten, []
    monkeypatch.setattr(nnx, "flatten", lambda *a, **k: splits.append(1) or flatten(*a, **k))
    batches = _batches(strategy, data)[:2]  # the full batches: one program
    strategy.run(train_step, args=(metrics, *batches[0]))
    first = len(splits)
    assert first >= 2, "split, then split again with the metrics summed on read"
    for _ in range(3):
        strategy.run(train_step, args=(metrics, *batches[1]))
    assert len(splits) == first
    rows = tuple(
        np.concatenate([a[:GLOBAL_BATCH]] + [a[GLOBAL_BATCH : 2 * GLOBAL_BATCH]] * 3) for a in data
    )
    _assert_reads(metrics, _one_device(rows))


class Confusion(nnx.Metric):
    """A confusion matrix: counts of (label, prediction) pairs, additive."""

    def __init__(self, classes: int):
        self.counts = nnx.metrics.MetricState(jnp.zeros((classes, classes), jnp.int32))

    def update(self, *, labels, predictions, mask):
        pairs = (
            jax.nn.one_hot(labels, self.counts.shape[0], dtype=jnp.int32)[:, :, None]
            * (jax.nn.one_hot(predictions, self.counts.shape[0], dtype=jnp.int32)[:, None, :])
        )
        self.counts[...] += (pairs * mask[:, None, None]).sum(0)

    def compute(self):
        return self.counts[...]


def test_a_matrix_shaped_like_the_replica_axis_is_read_whole():
    """An (8, 8) metric on 8 replicas: blocks are told by identity, never by shape."""
    strategy = ts.TPUStrategy()
    confusion = Confusion(8)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 8, 64).astype(np.int32)
    predictions = rng.integers(0, 8, 64).astype(np.int32)
    ((rows, mask),) = strategy.experimental_distribute_dataset(
        [(labels, predictions)], ts.InputOptions(mask=True)
    )
    step = lambda c, r, m: c.update(labels=r[0], predictions=r[1], mask=m)
    expected = np.zeros((8, 8), np.int32)
    np.add.at(expected, (labels, predictions), 1)
    confusion.counts[...] = expected  # a whole (8, 8) value, laid out as blocks by run
    strategy.run(step, args=(confusion, rows, mask))
    np.add.at(expected, (labels, predictions), 1)
    np.testing.assert_array_equal(np.asarray(confusion.compute()), expected)
    assert confusion.counts.get_raw_value().shape == (8, 8, 8)
    confusion.reset = lambda: confusion.counts.set_value(jnp.zeros((8, 8), jnp.int32))
    confusion.reset()
    assert np.asarray(confusion.compute()).shape == (8, 8)
    assert int(np.asarray(confusion.compute()).sum()) == 0


def test_checkpoint_saves_the_whole_value_and_restores_on_other_replica_counts():
    data = _data()
    eight = ts.TPUStrategy()
    metrics = _multi_metric()
    for batch, mask in _batches(eight, data):
        eight.run(train_step, args=(metrics, batch, mask))
    directory = tempfile.mkdtemp()
    with ts.CheckpointManager(directory, eight) as manager:
        manager.save(1, nnx.state(metrics))
        manager.wait_until_finished()
    two = ts.TPUStrategy(num_logical_cores=4)
    fresh = _multi_metric()
    with ts.CheckpointManager(directory, two) as manager:
        nnx.update(fresh, manager.restore(nnx.state(fresh)))
    _assert_reads(fresh, _one_device(data))
    # Restored, then accumulated further on two replicas: the saved value plus the new rows.
    for batch, mask in _batches(two, data):
        two.run(train_step, args=(fresh, batch, mask))
    doubled = tuple(np.concatenate([a, a]) for a in data)
    _assert_reads(fresh, _one_device(doubled))
    with ts.CheckpointManager(directory, eight) as manager:  # a target that holds blocks
        nnx.update(metrics, manager.restore(nnx.state(metrics)))
    _assert_reads(metrics, _one_device(data))


def test_replicate_places_the_whole_value(strategy):
    data = _data()
    metrics = _multi_metric()
    for batch, mask in _batches(strategy, data):
        strategy.run(train_step, args=(metrics, batch, mask))
    strategy.replicate(metrics)
    assert metrics.loss.total.get_raw_value().shape == ()
    _assert_reads(metrics, _one_device(data))


def test_functional_accumulators_are_per_replica_and_reduced_with_sum(strategy):
    """Plain-JAX metrics: a PerReplica pytree of sums, read with strategy.reduce(SUM)."""
    data = _data()
    sums = strategy.experimental_distribute_values_from_function(
        lambda ctx: {"loss": np.float32(0), "correct": np.int32(0), "count": np.int32(0)}
    )

    def step(sums, batch, mask):
        logits, labels, losses = batch
        correct = (logits.argmax(-1) == labels) & mask
        return {
            "loss": sums["loss"] + jnp.sum(losses * mask),
            "correct": sums["correct"] + correct.sum(dtype=jnp.int32),
            "count": sums["count"] + mask.sum(dtype=jnp.int32),
        }

    for batch, mask in _batches(strategy, data):
        sums = strategy.run(step, args=(sums, batch, mask))
    assert isinstance(sums["loss"], ts.PerReplica)
    total = strategy.reduce(ts.ReduceOp.SUM, sums, axis=None)
    expected = _one_device(data)
    assert int(total["count"]) == ROWS
    np.testing.assert_allclose(float(total["loss"] / total["count"]), expected["loss"], rtol=1e-6)
    np.testing.assert_allclose(
        float(total["correct"] / total["count"]), expected["accuracy"], rtol=1e-6
    )


def _raises(step, metric, batch, match: str) -> str:
    strategy = ts.TPUStrategy(num_logical_cores=2)
    with pytest.raises(ValueError, match=match) as error:
        strategy.run(step, args=(metric, *batch))
    return str(error.value)


def test_non_additive_updates_are_refused_naming_the_variable_and_primitive():
    strategy = ts.TPUStrategy(num_logical_cores=2)
    batch = _batches(strategy, _data())[0]
    welford = nnx.metrics.Welford()
    message = _raises(
        lambda m, b, k: m.update(values=b[2]), welford, batch, "metric variable Welford"
    )
    assert "additively" in message and "`" in message

    def reset_in_step(m, b, k):
        m.reset()
        m.update(loss=b[2], mask=k)

    message = _raises(reset_in_step, nnx.metrics.Average("loss"), batch, r"Average\.(total|count)")
    assert "assign" in message

    def maximum(m, b, k):
        m.total[...] = jnp.maximum(m.total[...], b[2].max())

    assert "`max`" in _raises(maximum, nnx.metrics.Average("loss"), batch, "Average.total")


def test_an_all_reduced_update_is_refused_with_the_fix():
    strategy = ts.TPUStrategy(num_logical_cores=2)
    batch = _batches(strategy, _data())[0]

    def all_reduced(m, b, k):
        ctx = ts.get_replica_context()
        m.update(loss=ctx.all_reduce("sum", jnp.sum(b[2] * k)), mask=None)

    message = _raises(all_reduced, nnx.metrics.Average("loss"), batch, "Average.total")
    assert "Drop the all-reduce" in message and "once per replica" in message


# Generated steps: each of three accumulators gets a chain of updates from a grammar; a step
# whose updates are all additive must read as one device does, any other must raise.
ADDITIVE = ("sum", "squares", "rows", "masked", "keep")
REFUSED = ("scale", "max", "assign", "select", "other", "all_reduced", "double")
SHAPES = {"a": (), "b": (2,), "c": (3, 2)}


class Sums(nnx.Metric):
    def __init__(self):
        for name, shape in SHAPES.items():
            setattr(self, name, nnx.metrics.MetricState(jnp.zeros(shape, jnp.float32)))


def _rows_to(value: jax.Array, shape: tuple) -> jax.Array:
    """Per-row values ``(rows, 2)`` summed over rows into an accumulator of ``shape``."""
    total = value.sum(0)  # (2,)
    return {(): total.sum(), (2,): total, (3, 2): jnp.outer(jnp.arange(1.0, 4.0), total)}[shape]


def _apply(op: str, sums: Sums, name: str, x, mask, local: bool) -> None:
    variable = getattr(sums, name)
    shape = SHAPES[name]
    rows = functools.partial(_rows_to, shape=shape)
    if op == "sum":
        variable[...] += rows(x)
    elif op == "squares":
        variable[...] += rows(x * x)
    elif op == "rows":
        variable[...] += x.shape[0]
    elif op == "masked":
        variable[...] += rows(x * mask[:, None])
    elif op == "scale":
        variable[...] *= 0.5
    elif op == "max":
        variable[...] = jnp.maximum(variable[...], rows(x))
    elif op == "assign":
        variable[...] = rows(x)
    elif op == "select":
        variable[...] = jnp.where(rows(x) > 0, variable[...] + 1, variable[...])
    elif op == "other":
        other = sums.a if name != "a" else sums.b
        variable[...] += other[...].sum()
    elif op == "all_reduced":
        d = rows(x)
        variable[...] += ts.get_replica_context().all_reduce("sum", d) if local else d
    elif op == "double":
        variable[...] = variable[...] + variable[...]


def _program(rng: random.Random) -> dict[str, tuple[str, ...]]:
    refuse = rng.random() < 0.5
    chains = {n: tuple(rng.choice(ADDITIVE) for _ in range(rng.randint(1, 2))) for n in SHAPES}
    if refuse:
        name = rng.choice(sorted(SHAPES))
        chain = list(chains[name])
        chain.insert(rng.randint(0, len(chain)), rng.choice(REFUSED))
        chains[name] = tuple(chain)
    return chains


def _step(chains, local: bool):
    def step(sums, x, mask):
        for name, chain in chains.items():
            for op in chain:
                _apply(op, sums, name, x, mask, local)

    return step


@functools.cache
def _strategy(shape: tuple[int, int]) -> ts.TPUStrategy:
    return ts.TPUStrategy(num_logical_cores=shape[1])


@pytest.mark.parametrize("seed", range(100))
def test_generated_steps_read_as_one_device_or_raise(seed):
    rng = random.Random(seed)
    chains = _program(rng)
    strategy = _strategy(MESH_SHAPES[seed % len(MESH_SHAPES)])
    x = np.random.default_rng(seed).normal(size=(24, 2)).astype(np.float32)
    options = ts.InputOptions(mask=True, global_batch_size=GLOBAL_BATCH)
    batches = list(strategy.experimental_distribute_dataset([x[:16], x[16:]], options))
    sums = Sums()
    refused = any(op in REFUSED for chain in chains.values() for op in chain)
    if refused:
        with pytest.raises(ValueError, match=r"metric variable|all-reduce"):
            for rows, mask in batches:
                strategy.run(_step(chains, local=True), args=(sums, rows, mask))
        return
    reference = Sums()
    for rows, mask in batches:
        strategy.run(_step(chains, local=True), args=(sums, rows, mask))
        # One device on the global batch, padded rows as the replicas hold them.
        global_rows = np.asarray(rows.stacked).reshape(-1, 2)
        _step(chains, local=False)(reference, global_rows, np.asarray(mask.stacked).reshape(-1))
    for name in SHAPES:
        np.testing.assert_allclose(
            np.asarray(getattr(sums, name)[...]),
            np.asarray(getattr(reference, name)[...]),
            rtol=1e-5,
            atol=1e-5,
            err_msg=f"{chains}: {name}",
        )


def _reads_as_one_device(chains, strategy, seed) -> bool:
    x = np.random.default_rng(seed).normal(size=(24, 2)).astype(np.float32)
    options = ts.InputOptions(mask=True, global_batch_size=GLOBAL_BATCH)
    sums, reference = Sums(), Sums()
    for rows, mask in strategy.experimental_distribute_dataset([x[:16], x[16:]], options):
        strategy.run(_step(chains, local=True), args=(sums, rows, mask))
        global_rows = np.asarray(rows.stacked).reshape(-1, 2)
        _step(chains, local=False)(reference, global_rows, np.asarray(mask.stacked).reshape(-1))
    return all(
        np.allclose(getattr(sums, n)[...], getattr(reference, n)[...], rtol=1e-5, atol=1e-5)
        for n in SHAPES
    )


def test_generated_steps_catch_a_check_that_accepts_everything(monkeypatch):
    """With the check turned off, refused steps that are truly wrong read wrong values."""
    monkeypatch.setattr(_metrics, "check_step", lambda *args, **kwargs: None)
    strategy = _strategy((8, 1))
    wrong = ("max", "select", "all_reduced")  # an assignment of a row sum can read right
    seeds = [
        seed
        for seed in range(100)
        if any(op in wrong for chain in _program(random.Random(seed)).values() for op in chain)
    ][:6]
    misread = [
        s for s in seeds if not _reads_as_one_device(_program(random.Random(s)), strategy, s)
    ]
    assert len(seeds) == 6 and len(misread) >= 4, (seeds, misread)  # 6 of 6 at these seeds


def test_generated_steps_cover_the_grammar():
    drawn = [_program(random.Random(seed)) for seed in range(100)]
    ops = {op for chains in drawn for chain in chains.values() for op in chain}
    assert ops == set(ADDITIVE) | set(REFUSED)
    refused = sum(any(op in REFUSED for c in chains.values() for op in c) for chains in drawn)
    assert 30 <= refused <= 70


def test_every_process_reads_the_same_global_value():
    """2 processes x 4 devices read the same values, those of 1 x 8 and of one device."""
    processes = ts.testing.run_in_local_processes(
        workers.accumulate_and_read, 2, devices_per_process=4, timeout=180
    )
    reference = workers.accumulate_and_read()
    logits, labels, losses = workers.data()
    accuracy = float((logits.argmax(-1) == labels).mean())
    one_device = {"loss": float(losses.mean()), "accuracy": accuracy}
    assert processes[0] == processes[1], "every process reads the same value"
    for cores in workers.CORE_COUNTS:
        for reads in (reference[cores], processes[0][cores]):
            for epoch in reads[:2]:
                for name, value in epoch.items():
                    np.testing.assert_allclose(value, one_device[name], rtol=1e-6, err_msg=name)
            assert reads[2] == {"count": workers.ROWS}


def test_copies_of_a_metric_read_the_whole_value():
    """nnx.clone, split and merge on the host share the blocks; pickle writes the sum."""
    import pickle

    strategy = ts.TPUStrategy(num_logical_cores=2)
    average = nnx.metrics.Average()
    x = strategy.experimental_distribute_values_from_function(
        lambda ctx: np.full(2, ctx.replica_id_in_sync_group, np.float32)
    )
    strategy.run(lambda m, x: m.update(values=x), args=(average, x))
    expected = np.mean(np.repeat(np.arange(4), 2))
    graphdef, state = nnx.split(average)
    pickled = pickle.loads(pickle.dumps(average))
    for copy in (nnx.clone(average), nnx.merge(graphdef, state), pickled):
        np.testing.assert_allclose(float(copy.compute()), expected, rtol=1e-6)
    assert pickled.total.get_raw_value().shape == ()
