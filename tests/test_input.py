"""Distributed input: rows to replicas, masks for partial batches, prefetch threads, errors."""

import dataclasses
import gc
import itertools
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import tpustrat as ts
from tpustrat._batching import Layout
from tpustrat._dataset_options import InputContext, InputOptions

MASKED = InputOptions(mask=True)


@pytest.fixture
def eight():
    """A strategy of 8 replicas, for tests that do not depend on the mesh shape."""
    return ts.TPUStrategy()


def _batches(sizes, features=3):
    """Batches of the given sizes; row k of the whole dataset has id k and x = 10 * k + [0..)."""
    out, start = [], 0
    for size in sizes:
        ids = np.arange(start, start + size, dtype=np.int32)
        x = (10 * ids[:, None] + np.arange(features)).astype(np.float32)
        out.append({"id": ids, "x": x})
        start += size
    return out


def _prefetch_threads():
    return {t for t in threading.enumerate() if t.name.startswith("tpustrat-prefetch")}


def _per_replica(value):
    """The host copy of a PerReplica's stacked array, shape (replicas, *component)."""
    return np.asarray(value.stacked)


def test_rows_go_to_their_replica(strategy):
    n = strategy.num_replicas_in_sync
    batches = _batches([16, 16])
    dist = strategy.experimental_distribute_dataset(batches)

    def step(batch):
        assert batch["x"].shape == (16 // n, 3)  # the replica's slice, inside the step
        return ts.get_replica_context().replica_id_in_sync_group, batch["x"]

    for expected, batch in zip(batches, dist):
        assert isinstance(batch["x"], ts.PerReplica)
        assert batch["x"].stacked.sharding.spec == P("replica")
        rows = np.split(expected["x"], n)
        for i, local in enumerate(strategy.experimental_local_results(batch["x"])):
            np.testing.assert_array_equal(local, rows[i])
        replica_ids, seen = strategy.run(step, args=(batch,))
        np.testing.assert_array_equal(_per_replica(replica_ids), np.arange(n))
        for i, local in enumerate(strategy.experimental_local_results(seen)):
            np.testing.assert_array_equal(local, rows[i])


def test_host_batches_without_fetch_to_device(strategy):
    n = strategy.num_replicas_in_sync
    options = InputOptions(experimental_fetch_to_device=False)
    (batch,) = strategy.experimental_distribute_dataset(_batches([16]), options)
    assert type(batch["x"].stacked) is np.ndarray
    np.testing.assert_array_equal(batch["x"].stacked, _batches([16])[0]["x"].reshape(n, -1, 3))
    doubled = strategy.run(lambda b: 2 * b["x"], args=(batch,))
    np.testing.assert_array_equal(_per_replica(doubled), 2 * batch["x"].stacked)


def _linear_problem(num_examples, features=4, classes=3):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_examples, features)).astype(np.float32)
    y = rng.integers(0, classes, size=num_examples).astype(np.int32)
    params = {
        "w": rng.normal(size=(features, classes)).astype(np.float32),
        "b": rng.normal(size=classes).astype(np.float32),
    }
    return x, y, params


def _numpy_reference(x, y, params):
    """Mean cross-entropy, accuracy and the gradient of the mean loss, in float64."""
    logits = x.astype(np.float64) @ params["w"] + params["b"]
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    one_hot = np.eye(logits.shape[1])[y]
    error = (np.exp(log_probs) - one_hot) / len(y)
    return {
        "loss": -np.mean(log_probs[np.arange(len(y)), y]),
        "accuracy": np.mean(np.argmax(logits, axis=1) == y),
        "w": x.T.astype(np.float64) @ error,
        "b": error.sum(axis=0),
    }


def _masked_step(params, batch, mask):
    """The documented recipe: weight by the mask, all-reduce sums, divide by the real count."""
    weight = mask.astype(jnp.float32)

    def loss_sum(p):
        logits = batch["x"] @ p["w"] + p["b"]
        log_probs = jax.nn.log_softmax(logits)
        per_example = -jnp.take_along_axis(log_probs, batch["y"][:, None], axis=1)[:, 0]
        return jnp.sum(per_example * weight), logits

    (loss, logits), grads = jax.value_and_grad(loss_sum, has_aux=True)(params)
    correct = jnp.sum((jnp.argmax(logits, axis=1) == batch["y"]) * weight)
    sums = {"loss": loss, "correct": correct, "count": jnp.sum(weight), "grads": grads}
    return ts.get_replica_context().all_reduce("sum", sums)


def test_masked_epoch_matches_numpy_and_compiles_once(strategy, compile_count):
    x, y, params = _linear_problem(45)  # batches of 16, 16 and a partial 13
    dataset = [{"x": x[i : i + 16], "y": y[i : i + 16]} for i in range(0, 45, 16)]
    replicated = strategy.replicate(params)
    totals, compiles_after_first = None, None
    for batch, mask in strategy.experimental_distribute_dataset(dataset, MASKED):
        out = strategy.run(_masked_step, args=(replicated, batch, mask))
        sums = jax.tree.map(lambda v: np.asarray(v, np.float64), out)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
        if compiles_after_first is None:
            compiles_after_first = compile_count()
    assert compiles_after_first > 0, "the first step should have compiled"
    assert compile_count() == compiles_after_first, "the partial batch recompiled the step"
    expected = _numpy_reference(x, y, params)
    count = totals["count"]
    assert count == 45
    np.testing.assert_allclose(totals["loss"] / count, expected["loss"], rtol=1e-5)
    np.testing.assert_allclose(totals["correct"] / count, expected["accuracy"], rtol=1e-5)
    for name in ("w", "b"):
        np.testing.assert_allclose(
            totals["grads"][name] / count, expected[name], rtol=1e-5, atol=1e-7
        )


def test_mask_marks_real_rows_and_padding_copies_a_real_row(strategy):
    n = strategy.num_replicas_in_sync
    batches = _batches([16, 13])
    full, partial = list(strategy.experimental_distribute_dataset(batches, MASKED))
    np.testing.assert_array_equal(_per_replica(full[1]), np.ones((n, 16 // n), bool))
    batch, mask = partial
    np.testing.assert_array_equal(_per_replica(mask), (np.arange(16) < 13).reshape(n, -1))
    rows = _per_replica(batch["x"]).reshape(16, 3)
    np.testing.assert_array_equal(rows[:13], batches[1]["x"])
    np.testing.assert_array_equal(rows[13:], np.repeat(batches[1]["x"][:1], 3, axis=0))


def test_global_batch_size_option_sets_the_static_shape(eight):
    options = InputOptions(mask=True, global_batch_size=24)
    (batch, mask), (_, full_mask) = eight.experimental_distribute_dataset(
        _batches([10, 24]), options
    )
    assert batch["x"].stacked.shape == (8, 3, 3)
    assert _per_replica(mask).sum() == 10
    assert _per_replica(full_mask).all()


def test_partial_batch_without_mask_raises_after_the_full_batches(eight):
    iterator = iter(eight.experimental_distribute_dataset(_batches([16, 16, 5])))
    next(iterator), next(iterator)
    with pytest.raises(
        ValueError, match="batch 2 has 5 rows, fewer than the static global batch of 16"
    ) as error:
        next(iterator)
    assert "mask=True" in str(error.value)
    assert "drop_remainder=True" in str(error.value)


@pytest.mark.parametrize("sizes", [[16, 16, 13], [16, 16]])
def test_drop_remainder_drops_exactly_the_remainder(sizes):
    strategy = ts.TPUStrategy(num_logical_cores=2)
    options = InputOptions(drop_remainder=True)
    seen = [
        _per_replica(b["id"]).ravel()
        for b in strategy.experimental_distribute_dataset(_batches(sizes), options)
    ]
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(32))


def test_distribute_datasets_from_function(strategy):
    n = strategy.num_replicas_in_sync
    contexts = []

    def dataset_fn(ctx):  # TF's recipe: per-replica batches, one per replica and step
        contexts.append(ctx)
        return _batches([ctx.get_per_replica_batch_size(2 * n)] * (2 * n))

    dist = strategy.distribute_datasets_from_function(dataset_fn)
    assert contexts == [
        InputContext(num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=n)
    ]
    assert len(dist) == 2
    ids = [_per_replica(batch["id"]) for batch in dist]
    np.testing.assert_array_equal(np.stack(ids), np.arange(4 * n).reshape(2, n, 2))
    assert len(contexts) == 1  # called once, not once per epoch


def test_datasets_from_function_train_on_the_global_batch(strategy):
    """A TF port's global batch is num_replicas x the per-replica batch, not one of them."""
    n = strategy.num_replicas_in_sync
    dist = strategy.distribute_datasets_from_function(
        lambda ctx: _batches([ctx.get_per_replica_batch_size(4 * n)] * n)
    )
    (batch,) = list(dist)
    rows = strategy.run(lambda b: jnp.float32(b["id"].shape[0]), args=(batch,))
    assert float(strategy.reduce("sum", rows)) == 4 * n


def test_per_replica_partial_batch_is_masked(eight):
    options = InputOptions(mask=True, global_batch_size=32)
    batches = _batches([4] * 8 + [4, 1])  # a full step, then replica 1's batch is partial
    dist = eight.distribute_datasets_from_function(lambda ctx: batches, options)
    assert len(dist) == 2
    (_, full), (partial_batch, partial) = dist
    assert _per_replica(full).all()
    expected = np.zeros((8, 4), bool)
    expected[0], expected[1, 0] = True, True
    np.testing.assert_array_equal(_per_replica(partial), expected)
    np.testing.assert_array_equal(_per_replica(partial_batch["id"])[:2, 0], [32, 36])


def test_per_replica_batch_partial_before_the_end_is_refused(eight):
    dist = eight.distribute_datasets_from_function(lambda ctx: _batches([4, 3, 4, 4]), MASKED)
    with pytest.raises(ValueError, match="per-replica batch 1 has 3 rows but a per-replica"):
        list(dist)


def test_input_context():
    ctx = InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=8)
    assert ctx.get_per_replica_batch_size(64) == 8
    with pytest.raises(ValueError, match="global_batch_size 250 is not divisible by 8 replicas"):
        ctx.get_per_replica_batch_size(250)
    with pytest.raises(ValueError, match="input_pipeline_id 2 is out of range for 2"):
        InputContext(num_input_pipelines=2, input_pipeline_id=2, num_replicas_in_sync=8)


def test_new_iter_starts_a_new_epoch(eight):
    dist = eight.experimental_distribute_dataset(_batches([16, 16, 16]))
    epochs = [[_per_replica(b["id"]).ravel() for b in dist] for _ in range(2)]
    np.testing.assert_array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(np.concatenate(epochs[0]), np.arange(48))


def test_one_shot_dataset_iterates_once(eight):
    dist = eight.experimental_distribute_dataset(iter(_batches([16, 16])))
    assert len(list(dist)) == 2
    with pytest.raises(ValueError, match="one-shot list_iterator that an earlier iter"):
        iter(dist)


@pytest.mark.parametrize("buffer_size", [0, 2])
def test_end_of_data_keeps_raising_stop_iteration(eight, buffer_size):
    before = _prefetch_threads()
    options = InputOptions(experimental_per_replica_buffer_size=buffer_size)
    iterator = iter(eight.experimental_distribute_dataset(_batches([16, 16]), options))
    assert len([next(iterator), next(iterator)]) == 2
    for _ in range(3):
        with pytest.raises(StopIteration):
            next(iterator)
    assert not _prefetch_threads() - before


class LoaderError(Exception):
    pass


def failing_loader():
    yield _batches([16])[0]
    raise LoaderError("disk on fire at batch 1")


@pytest.mark.parametrize("buffer_size", [0, 2])
def test_loader_error_surfaces_with_type_message_and_traceback(eight, buffer_size):
    options = InputOptions(experimental_per_replica_buffer_size=buffer_size)
    iterator = iter(eight.experimental_distribute_dataset(failing_loader(), options))
    next(iterator)
    with pytest.raises(LoaderError, match="disk on fire at batch 1") as error:
        next(iterator)
    assert "failing_loader" in [entry.name for entry in error.traceback]
    with pytest.raises(StopIteration):
        next(iterator)


class CountingLoader:
    """Batches without end, counting how many were read."""

    def __init__(self):
        self.reads = 0

    def __iter__(self):
        while True:
            self.reads += 1
            yield _batches([16])[0]


@pytest.mark.parametrize("buffer_size", [0, 1, 2])
def test_prefetch_reads_buffer_size_batches_ahead(eight, buffer_size):
    loader, before = CountingLoader(), _prefetch_threads()
    options = InputOptions(experimental_per_replica_buffer_size=buffer_size)
    with iter(eight.experimental_distribute_dataset(loader, options)) as iterator:
        next(iterator)
        deadline = time.monotonic() + 10
        while loader.reads < 1 + buffer_size and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # time enough to run further ahead, if it would
        assert loader.reads == 1 + buffer_size
        assert len(_prefetch_threads() - before) == (1 if buffer_size else 0)


def test_close_and_with_block_stop_the_thread(eight):
    dist, before = eight.experimental_distribute_dataset(CountingLoader()), _prefetch_threads()
    iterator = iter(dist)
    next(iterator)
    (thread,) = _prefetch_threads() - before
    iterator.close()
    assert not thread.is_alive()
    with pytest.raises(ValueError, match=r"was closed .* start a new pass with iter\(dist\)"):
        next(iterator)
    with iter(dist) as iterator:
        next(iterator)
        (thread,) = _prefetch_threads() - before
    assert not thread.is_alive()


def test_dropped_iterator_stops_its_thread(eight):
    before = _prefetch_threads()
    iterator = iter(eight.experimental_distribute_dataset(CountingLoader()))
    next(iterator)
    (thread,) = _prefetch_threads() - before
    alive = weakref.ref(iterator)
    del iterator
    gc.collect()
    assert alive() is None, "something (the thread?) keeps the iterator alive"
    assert not thread.is_alive()
    assert not _prefetch_threads() - before


def test_element_spec_and_len(strategy):
    n = strategy.num_replicas_in_sync
    dist = strategy.experimental_distribute_dataset(_batches([16, 16, 5]), MASKED)
    assert len(dist) == 3
    batch_spec, mask_spec = dist.element_spec
    assert batch_spec == {
        "id": jax.ShapeDtypeStruct((16 // n,), jnp.int32),
        "x": jax.ShapeDtypeStruct((16 // n, 3), jnp.float32),
    }
    assert mask_spec == jax.ShapeDtypeStruct((16 // n,), jnp.bool_)
    iterator = iter(dist)
    assert iterator.element_spec == dist.element_spec
    assert len(list(iterator)) == 3  # reading the spec consumed nothing


def test_len_unknown(eight):
    with pytest.raises(TypeError, match="has no len"):
        len(eight.experimental_distribute_dataset(CountingLoader()))
    dropping = eight.experimental_distribute_dataset(
        SizedLoader([16]), InputOptions(drop_remainder=True)
    )
    with pytest.raises(TypeError, match="drop_remainder=True needs the size of every batch"):
        len(dropping)


@pytest.mark.parametrize(
    ("sizes", "global_batch_size", "expected"),
    [([16, 16, 5], None, 2), ([16, 16], None, 2), ([8, 16, 16], 16, 2), ([16, 8, 16], None, 2)],
)
def test_len_with_drop_remainder_counts_the_full_batches(eight, sizes, global_batch_size, expected):
    options = InputOptions(drop_remainder=True, global_batch_size=global_batch_size)
    dist = eight.experimental_distribute_dataset(_batches(sizes), options)
    assert len(dist) == expected == len(list(dist))


class SizedLoader:
    """A dataset with a length but no indexing, as many loaders are."""

    def __init__(self, sizes):
        self.batches = _batches(sizes)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class FakeTFDataset:
    """Quacks like a tf.data.Dataset: numpy batches only through as_numpy_iterator."""

    __module__ = "tensorflow.python.data.ops.dataset_ops"

    def __init__(self, batches):
        self.batches = batches

    def as_numpy_iterator(self):
        return iter(self.batches)

    def __iter__(self):
        raise AssertionError("tf.data yields tf.Tensors from __iter__; use as_numpy_iterator")

    def __len__(self):
        return len(self.batches)


def test_tf_data_is_read_through_as_numpy_iterator(eight):
    dist = eight.experimental_distribute_dataset(FakeTFDataset(_batches([16, 16])))
    assert len(dist) == 2
    ids = [_per_replica(b["id"]).ravel() for b in dist]
    np.testing.assert_array_equal(np.concatenate(ids), np.arange(32))


def _x(size, **others):
    return {"x": np.zeros((size, 2), np.float32), **others}


@pytest.mark.parametrize(
    "batches, match",
    [
        (
            [_x(250)],
            r"global batch 250 \(batch 0\) is not divisible by 8 replicas; use a batch "
            "size that is a multiple of 8",
        ),
        (
            [_x(16, y=np.zeros(15))],
            r"batch 0 has leaves with different leading sizes \(\['x'\] 16, \['y'\] 15\)",
        ),
        ([_x(16, name=np.array(["a"] * 16))], r"batch 0 leaf \['name'\] has dtype <U1"),
        (
            [_x(16, tokens=np.array([np.zeros(2), np.zeros(3)] * 8, dtype=object))],
            r"leaf \['tokens'\] has dtype object; .* pad ragged rows",
        ),
        ([_x(16, lr=0.1)], r"batch 0 leaf \['lr'\] is a scalar \(float64\) with no batch axis"),
        ([np.float32(1.0)], r"leaf \(the whole batch\) is a scalar"),
        ([_x(16), _x(24)], "batch 1 has 24 rows, more than the static global batch of 16"),
        ([_x(16), _x(16, y=np.zeros(16))], "batch 1 has structure .* but batch 0 had"),
        (
            [_x(16), {"x": np.zeros((16, 2), np.int32)}],
            r"batch 1 leaf \['x'\] is int32\[B, 2\] but in batch 0 it is float32\[B, 2\]",
        ),
        ([_x(0)], "batch 0 is empty"),
        ([{}], "batch 0 has no arrays"),
    ],
)
def test_bad_batches_raise_clear_errors(eight, batches, match):
    with pytest.raises(ValueError, match=match):
        list(eight.experimental_distribute_dataset(batches))


@pytest.mark.parametrize(
    "dataset, options, error, match",
    [
        (np.zeros((16, 2)), None, TypeError, r"single array of shape \(16, 2\)"),
        ({"x": np.zeros((16, 2))}, None, TypeError, "got a dict, not a dataset"),
        (5, None, TypeError, "needs an iterable of batches .* got int"),
        ([], {"global_batch_size": 250}, ValueError, "global_batch_size 250 is not divisible by 8"),
        ([], "fast", TypeError, "options must be a ts.InputOptions, got str"),
    ],
)
def test_bad_arguments_raise_at_distribute_time(eight, dataset, options, error, match):
    if isinstance(options, dict):
        options = InputOptions(**options)
    with pytest.raises(error, match=match):
        eight.experimental_distribute_dataset(dataset, options)


def test_bad_options_and_dataset_fn(eight):
    with pytest.raises(
        ValueError, match="experimental_per_replica_buffer_size must be an int >= 0, got -1"
    ):
        InputOptions(experimental_per_replica_buffer_size=-1)
    with pytest.raises(ValueError, match="global_batch_size must be an int >= 1, got 0"):
        InputOptions(global_batch_size=0)
    with pytest.raises(TypeError, match="needs a callable dataset_fn, got list"):
        eight.distribute_datasets_from_function([])


def test_a_process_keeps_only_its_replicas_rows(eight):
    # As process 1 of 2 would: 4 replica slices per batch, this process addresses the last two.
    layout = Layout(
        eight.mesh,
        positions=(2, 3),
        num_slices=4,
        static_size=None,
        batch_name="global batch",
        slices_name="replicas",
    )
    rows = layout.local_rows(np.arange(16).reshape(8, 2), slice_size=2)
    np.testing.assert_array_equal(rows, np.arange(8, 16).reshape(2, 2, 2))


def test_mask_and_drop_remainder_together_are_refused():
    with pytest.raises(ValueError, match="either padded and masked or dropped; choose one"):
        InputOptions(mask=True, drop_remainder=True)


# --- Per-replica batches stay whole on their replica --------------------------------------------


def _per_replica_dataset(num_elements, rows, last_rows):
    """Per-replica batches of ``rows`` rows (the last of ``last_rows``); ids count the rows."""
    sizes = [rows] * (num_elements - 1) + [last_rows]
    return _batches(sizes, features=2)


def _expected_steps(elements, num_replicas, rows):
    """Each step's ids and mask from first principles: element e goes whole to replica e % R of
    step e // R; a short element repeats its first row, a missing one the step's first row."""
    steps = []
    for start in range(0, len(elements), num_replicas):
        group = elements[start : start + num_replicas]
        ids = np.empty((num_replicas, rows), np.int32)
        mask = np.zeros((num_replicas, rows), bool)
        for replica in range(num_replicas):
            element = group[replica] if replica < len(group) else group[0]
            real = len(element["id"]) if replica < len(group) else 0
            ids[replica] = element["id"][0]
            ids[replica, :real] = element["id"][:real]
            mask[replica, :real] = True
        steps.append((ids, mask))
    return steps


def _partial_step_cases(num_replicas, rows):
    """(full steps, elements in the last step, rows of the last element) for every partial last
    step: short by 1..R-1 elements, its last element full or short, after 0 or 1 full steps."""
    return [
        (full, present, last_rows)
        for full in (0, 1)
        for present in range(1, num_replicas + 1)
        for last_rows in (rows, rows - 1, 1)
        if present < num_replicas or last_rows < rows
    ]


@pytest.mark.parametrize("global_batch_size", [None, "set"])
def test_partial_steps_of_per_replica_batches(strategy, global_batch_size):
    n, rows = strategy.num_replicas_in_sync, 4
    size = rows * n if global_batch_size else None
    for full, present, last_rows in _partial_step_cases(n, rows):
        case = (full, present, last_rows)
        elements = _per_replica_dataset(full * n + present, rows, last_rows)
        # Without global_batch_size, the first per-replica batch sets the rows of all.
        static_rows = rows if size or len(elements) > 1 else last_rows
        if len(elements) % n == 0 and last_rows == static_rows:
            continue  # a whole step, not a partial one
        expected = _expected_steps(elements, n, static_rows)
        masked = strategy.distribute_datasets_from_function(
            lambda ctx, e=elements: e, InputOptions(mask=True, global_batch_size=size)
        )
        steps = [(_per_replica(b["id"]), _per_replica(m)) for b, m in masked]
        assert len(steps) == len(expected) == len(masked), case
        for (ids, mask), (want_ids, want_mask) in zip(steps, expected):
            np.testing.assert_array_equal(mask, want_mask, err_msg=str(case))
            np.testing.assert_array_equal(ids, want_ids, err_msg=str(case))
        dropping = strategy.distribute_datasets_from_function(
            lambda ctx, e=elements: e, InputOptions(drop_remainder=True, global_batch_size=size)
        )
        kept = [_per_replica(b["id"]) for b in dropping]
        assert len(kept) == full == len(dropping), case
        for ids, (want_ids, _) in zip(kept, expected):
            np.testing.assert_array_equal(ids, want_ids, err_msg=str(case))
        refusing = iter(
            strategy.distribute_datasets_from_function(
                lambda ctx, e=elements: e, InputOptions(global_batch_size=size)
            )
        )
        for want_ids, _ in expected[:full]:
            np.testing.assert_array_equal(_per_replica(next(refusing)["id"]), want_ids)
        if present < n:
            short = f"has only {present} of them for the {n} replicas"
        elif n > 1:
            short = f"per-replica batch {len(elements) - 1} has {last_rows} of {rows} rows"
        else:  # one replica: each per-replica batch is a step
            short = f"batch {full} has {last_rows} rows, fewer than the static step"
        with pytest.raises(ValueError, match=f"{short}.*mask=True") as error:
            next(refusing)
        assert "drop_remainder=True" in str(error.value), case


def test_a_short_first_step_keeps_each_per_replica_batch_whole(eight):
    """Two per-replica batches of 64 rows for 8 replicas: replicas 0 and 1 get 64 rows each."""
    elements = _per_replica_dataset(2, 64, 64)
    ((batch, mask),) = eight.distribute_datasets_from_function(lambda ctx: elements, MASKED)
    ids = _per_replica(batch["id"])
    assert ids.shape == (8, 64)
    np.testing.assert_array_equal(ids[:2], np.arange(128).reshape(2, 64))
    np.testing.assert_array_equal(_per_replica(mask), np.arange(8)[:, None] < [2] * 64)
    with pytest.raises(ValueError, match="per-replica batches 0 to 1 has only 2 of them for the 8"):
        list(eight.distribute_datasets_from_function(lambda ctx: elements))
    dropping = eight.distribute_datasets_from_function(
        lambda ctx: elements, InputOptions(drop_remainder=True)
    )
    assert len(dropping) == 0 == len(list(dropping))


def test_per_replica_batches_of_another_shape_or_dtype_are_refused(eight):
    def elements(last):
        return [{"x": np.zeros((2, 3), np.float32)}] * 7 + [last]

    cases = [
        (
            {"x": np.zeros((2, 4), np.float32)},
            r"float32\[B, 4\] but in per-replica batch 0 it is "
            r"float32\[B, 3\]",
        ),
        (
            {"x": np.zeros((2, 3), np.float64)},
            r"float64\[B, 3\] but in per-replica batch 0 it is "
            r"float32\[B, 3\]",
        ),
    ]
    for last, shapes in cases:
        dist = eight.distribute_datasets_from_function(lambda ctx, last=last: elements(last))
        with pytest.raises(ValueError, match=rf"per-replica batch 7 leaf \['x'\] is {shapes}"):
            list(dist)


def test_a_batch_that_changes_shape_is_refused_before_run_steps_stacks_it(eight):
    batches = [_x(16), _x(16), {"x": np.zeros((16, 3), np.float32)}]
    iterator = iter(eight.experimental_distribute_dataset(batches))
    with pytest.raises(
        ValueError,
        match=r"batch 2 leaf \['x'\] is float32\[B, 3\] but in batch 0 it is "
        r"float32\[B, 2\]",
    ):
        eight.run_steps(lambda state, batch: (state, batch["x"].sum()), np.float32(0), iterator, 3)


# --- Interpreter exit with prefetch threads still running ---------------------------------------

_EXIT_WITH_STALLED_SOURCES = """
    import atexit, sys, threading, time
    import jax
    import numpy as np
    import tpustrat as ts
    import tpustrat._prefetch

    tpustrat._prefetch._JOIN_TIMEOUT_S = 0.2  # how long close() waits for a stalled source
    wake, placing = threading.Event(), threading.Event()
    device_put = jax.device_put

    def watched_device_put(*args, **kwargs):
        if wake.is_set():
            placing.set()
        return device_put(*args, **kwargs)

    jax.device_put = watched_device_put

    def resume_at_exit():  # registered last, so it runs first of the exit hooks
        wake.set()
        placing.wait(10)  # a prefetch thread is now inside device_put

    atexit.register(resume_at_exit)

    def source(stall, first=1):  # first elements, then it stalls
        for _ in range(first):
            yield {"x": np.zeros((16, 2), np.float32)}
        stall()
        while True:
            yield {"x": np.zeros((16, 2), np.float32)}

    strategy = ts.TPUStrategy()
    if sys.argv[1] == "global batches":
        waking = iter(strategy.experimental_distribute_dataset(source(wake.wait)))
    else:  # per-replica batches, one per replica and step
        n = strategy.num_replicas_in_sync
        waking = iter(
            strategy.distribute_datasets_from_function(lambda ctx: source(wake.wait, n))
        )
    closed = iter(strategy.experimental_distribute_dataset(source(lambda: time.sleep(3600))))
    kept = iter(strategy.experimental_distribute_dataset(source(lambda: time.sleep(3600))))
    for iterator in (waking, closed, kept):
        next(iterator)
    closed.close()
    print("done", flush=True)
"""


@pytest.mark.slow  # three fresh Pythons, each importing JAX: ~20 s on 2 cores
def test_interpreter_exits_cleanly_with_stalled_and_waking_sources():
    """A source that wakes as the program exits (of global or of per-replica batches), one
    stalled past close() and one stalled and still referenced: the exit code is 0, with no
    abort from a thread inside JAX."""
    environment = {
        **os.environ,
        "PYTHONPATH": str(pathlib.Path(ts.__file__).resolve().parent.parent),
        "PYTHONWARNINGS": "ignore",  # close() warns about the stalled source
    }
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_EXIT_WITH_STALLED_SOURCES), batches],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        for batches in ("global batches", "per-replica batches", "global batches")
    ]
    for run in runs:
        try:
            stdout, stderr = run.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            run.kill()
            stdout, stderr = run.communicate()
        assert "terminate called" not in stderr, stderr[-2000:]
        assert (run.returncode, stdout) == (0, "done\n"), stderr[-2000:]


# --- Values JAX's dtypes cannot hold ------------------------------------------------------------

_LOST = [  # (dtype, a value JAX's default dtype cannot hold, the range the message shows)
    (np.int64, 2**40, r"\[0, 1099511627776\]"),
    (np.int64, -(2**31) - 1, r"\[-2147483649, 0\]"),
    (np.uint64, 2**32, r"\[0, 4294967296\]"),
    (np.float64, 1e39, r"\[0.0, 1e\+39\]"),
    (np.float64, -(2.0**128 - 2.0**103), r"\[-3.40282\d*e\+38, 0.0\]"),  # rounds to -inf
    (np.complex128, 1e39j, r"values with real and imaginary parts in \[0.0, 1e\+39\]"),
]
_KEPT = [  # (dtype, values JAX's default dtype holds, the dtype the replicas get)
    (np.int64, [-(2**31), 2**31 - 1], np.int32),
    (np.uint64, [0, 2**32 - 1], np.uint32),
    (np.float64, [-3.4028235e38, 2.0**128 - 2.0**104, np.inf, -np.inf], np.float32),
    (np.float64, [np.nan, 1.5], np.float32),
    (np.complex128, [3e38 + 1j, -3e38j], np.complex64),
]


@pytest.mark.parametrize("fetch_to_device", [True, False])
@pytest.mark.parametrize(("dtype", "value", "shown"), _LOST)
def test_values_beyond_the_32_bit_dtype_are_refused(eight, dtype, value, shown, fetch_to_device):
    batch = {"x": np.zeros(16, np.float32), "ids": np.zeros(16, dtype)}
    batch["ids"][5] = value
    options = InputOptions(experimental_fetch_to_device=fetch_to_device)
    dist = eight.experimental_distribute_dataset([_x(16), batch], options)
    with pytest.raises(
        ValueError, match=rf"batch 1 leaf \['ids'\] has {np.dtype(dtype)} .*{shown}"
    ) as error:
        list(dist)
    assert "jax.config.update('jax_enable_x64', True)" in str(error.value)
    assert ("cast the leaf" if np.dtype(dtype).kind in "iu" else "scale the leaf") in str(
        error.value
    )


@pytest.mark.parametrize(("dtype", "values", "device_dtype"), _KEPT)
def test_values_the_32_bit_dtype_holds_pass_unchanged(eight, dtype, values, device_dtype):
    column = np.resize(np.asarray(values, dtype), 16)
    (batch,) = eight.experimental_distribute_dataset([{"ids": column}])
    placed = _per_replica(batch["ids"])
    assert placed.dtype == device_dtype
    np.testing.assert_array_equal(placed.ravel(), column.astype(device_dtype))


def test_values_beyond_int32_are_refused_per_replica_batch(eight):
    elements = [{"ids": np.full(2, i, np.int64)} for i in range(7)]
    elements.append({"ids": np.array([7, 2**40], np.int64)})
    dist = eight.distribute_datasets_from_function(lambda ctx: elements)
    with pytest.raises(ValueError, match=r"per-replica batch 7 leaf \['ids'\] has int64 values"):
        list(dist)


def test_x64_keeps_64_bit_values(eight):
    column = np.full(16, 2**40, np.int64)
    options = InputOptions(experimental_per_replica_buffer_size=0)  # read in this thread
    # jax.enable_x64 is JAX >= 0.8's name of jax.experimental.enable_x64
    enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64
    with enable_x64(True):
        (batch,) = eight.experimental_distribute_dataset([{"ids": column}], options)
        placed = _per_replica(batch["ids"])
    assert placed.dtype == np.int64
    np.testing.assert_array_equal(placed.ravel(), column)


# --- Options are checked field by field ---------------------------------------------------------

_NOT_BOOLS = ["no", "", 1, 0, None, 1.0, np.int64(1), [True]]
_NOT_INTS = [("2", TypeError), (2.0, TypeError), (True, TypeError), (None, TypeError)]


def _options_cases():
    """Every field of InputOptions and InputContext with each wrong value for its type."""
    cases = []
    for record in (InputOptions, InputContext):
        for field in dataclasses.fields(record):
            if field.type == "bool":
                cases += [(record, field.name, v, TypeError, "must be a bool") for v in _NOT_BOOLS]
            elif field.type in ("int", "int | None"):
                wrong = [(v, e) for v, e in _NOT_INTS if v is not None or field.type == "int"]
                cases += [(record, field.name, v, e, "must be an int") for v, e in wrong]
                cases.append((record, field.name, -1, ValueError, "must be an int >= "))
            else:
                raise AssertionError(f"{record.__name__}.{field.name} has no cases: add them")
    return cases


@pytest.mark.parametrize(("record", "name", "value", "error", "match"), _options_cases())
def test_options_refuse_wrong_types_and_values(record, name, value, error, match):
    with pytest.raises(error, match=rf"{name} {match}.*got") as raised:
        record(**{name: value})
    if error is TypeError and value is not None:
        assert repr(value) in str(raised.value)


def test_options_take_numpy_scalars_and_store_python_ones():
    options = InputOptions(
        mask=np.bool_(True),
        experimental_fetch_to_device=np.False_,
        experimental_per_replica_buffer_size=np.int64(3),
        global_batch_size=np.int32(16),
    )
    assert options == InputOptions(
        mask=True,
        experimental_fetch_to_device=False,
        experimental_per_replica_buffer_size=3,
        global_batch_size=16,
    )
    assert type(options.mask) is bool
    assert type(options.global_batch_size) is int


# --- Misuse of the input API --------------------------------------------------------------------


def test_none_leaves_are_empty_subtrees_as_in_jax(eight):
    (batch,) = eight.experimental_distribute_dataset([{"x": np.zeros((16, 2)), "aux": None}])
    assert batch["aux"] is None
    assert batch["x"].stacked.shape == (8, 2, 2)


def test_a_list_of_rows_is_refused_with_the_fix(eight):
    with pytest.raises(ValueError, match=r"leaf \['x'\]\[0\]\[0\] is a scalar .* np.asarray"):
        list(eight.experimental_distribute_dataset([{"x": [[1, 2], [3]] * 8}]))


def test_len_of_an_endless_dataset_says_what_to_do(eight):
    with pytest.raises(TypeError, match=r"has no len.* count the steps of one epoch yourself"):
        len(eight.experimental_distribute_dataset(itertools.repeat(_x(16))))


def test_bfloat16_batches_go_to_the_replicas():
    """ml_dtypes' bfloat16 has numpy kind "V", as raw bytes do; it is a number all the same."""
    strategy = ts.TPUStrategy()
    x = np.arange(16, dtype=jnp.bfloat16).reshape(8, 2)
    (batch,) = list(strategy.experimental_distribute_dataset([x]))
    assert batch.stacked.dtype == jnp.bfloat16
    np.testing.assert_array_equal(strategy.gather(batch, axis=0), x)
