"""Checkpoints: async save, restore onto other meshes and processes, input position, errors.

The processes that need real signals or several JAX processes run ``_checkpoint_workers``;
each has a timeout.
"""

import contextlib
import gc
import resource
import shutil
import signal
import time

import _checkpoint_workers as workers
import grain
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpustrat as ts
from tpustrat.testing import run_in_local_processes


def expected_values(num_replicas):
    return {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.float32(0.5),
        "key": np.asarray(jax.random.key_data(jax.random.key(7))),
        "step": 11,
        "per_replica": [np.full(2, r, np.float32) for r in range(num_replicas)],
    }


def assert_restored(values, expected, per_replica=None):
    for name in ("w", "b", "key"):
        np.testing.assert_array_equal(values[name], expected[name])
    assert values["step"] == expected["step"]
    for got, want in zip(values["per_replica"], per_replica or expected["per_replica"]):
        np.testing.assert_array_equal(got, want)


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of ``mesh_state`` saved asynchronously on the 8x1 strategy."""
    strategy = ts.TPUStrategy()
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        assert manager.save(3, workers.mesh_state(strategy))
    return tmp_path


def _strategy(target):
    if target == "4 devices":
        return ts.TPUStrategy(jax.devices()[:4])
    return ts.TPUStrategy(num_logical_cores=target[1])


@pytest.mark.parametrize("target", [(8, 1), (4, 2), (2, 4), "4 devices"], ids=str)
def test_restore_onto_each_mesh_equals_saved_values(saved, target):
    strategy = _strategy(target)
    abstract = workers.abstract_mesh_state(strategy)
    del abstract["per_replica"]  # a PerReplica restores only onto 8 replicas (next test)
    with ts.CheckpointManager(saved, strategy) as manager:
        if strategy.num_replicas_in_sync == 8:
            abstract = workers.abstract_mesh_state(strategy)
        else:
            with pytest.raises(ValueError, match=r"leaves only in the checkpoint: per_replica"):
                manager.restore(abstract)
            return
        restored = manager.restore(abstract)
    values = workers.host_values(strategy, restored)
    assert_restored(values, expected_values(8))
    replicated = NamedSharding(strategy._mesh, P())
    for leaf in (restored["params"]["w"], restored["key"]):
        assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
    assert restored["per_replica"].stacked.sharding.spec == P("replica")
    assert restored["per_replica"].stacked.sharding.mesh.devices.size == strategy.mesh.size


@pytest.mark.parametrize("target", [(4, 2), "4 devices"], ids=str)
def test_restore_onto_other_meshes_without_per_replica_leaves(tmp_path, target):
    source = ts.TPUStrategy()
    state = workers.mesh_state(source)
    del state["per_replica"]
    with ts.CheckpointManager(tmp_path, source) as manager:
        manager.save(5, state)
    strategy = _strategy(target)
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        restored = manager.restore(jax.eval_shape(lambda: state))
    assert restored["params"]["w"].sharding.mesh.devices.size == strategy.mesh.size
    assert restored["params"]["w"].sharding.device_set == set(strategy.mesh.devices.flat)
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    np.testing.assert_array_equal(
        jax.random.key_data(restored["key"]), jax.random.key_data(state["key"])
    )
    assert int(restored["step"]) == 11


def test_per_replica_leaf_on_another_replica_count_names_the_leaf(saved):
    strategy = ts.TPUStrategy(num_logical_cores=2)  # 4 replicas; the checkpoint has 8
    with ts.CheckpointManager(saved, strategy) as manager:
        with pytest.raises(ValueError, match="'per_replica' is a PerReplica saved over 8 replicas"):
            manager.restore(workers.abstract_mesh_state(strategy))
        wrong = workers.abstract_mesh_state(strategy)
        wrong["per_replica"] = workers.abstract_per_replica(
            jax.ShapeDtypeStruct((8, 2), np.float32)
        )
        with pytest.raises(ValueError, match="target leaf 'per_replica' is a PerReplica over 8"):
            manager.restore(wrong)


def test_tree_mismatch_lists_the_leaves_that_differ(saved):
    strategy = ts.TPUStrategy()
    target = workers.mesh_state(strategy)
    target["params"]["extra"] = target["params"].pop("b")
    target["params"]["w"] = jax.numpy.zeros((4, 3))
    with ts.CheckpointManager(saved, strategy) as manager:
        with pytest.raises(ValueError) as error:
            manager.restore(target)
        assert "only in the target: params.extra" in str(error.value)
        assert "only in the checkpoint: params.b" in str(error.value)
        del target["params"]["extra"]
        target["params"]["b"] = np.float32(0)
        with pytest.raises(ValueError, match=r"params.w \(saved float32\[3, 4\], target "):
            manager.restore(target)


def test_unwritable_directory_is_a_clear_error_and_the_state_stays(tmp_path):
    strategy = ts.TPUStrategy()
    state = workers.mesh_state(strategy)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(
        ts.CheckpointError, match=r"cannot use .*a_file/checkpoints as a checkpoint"
    ):
        ts.CheckpointManager(blocker / "checkpoints", strategy)
    directory = tmp_path / "checkpoints"
    manager = ts.CheckpointManager(directory, strategy)
    manager.save(1, state)
    manager.wait_until_finished()
    shutil.rmtree(directory)
    directory.write_text("the disk was swapped for a file")  # no directory to write into
    with pytest.raises(ts.CheckpointError, match="the training state is still in memory"):
        manager.save(2, state)
    np.testing.assert_array_equal(state["params"]["w"], expected_values(8)["w"])
    directory.unlink()
    directory.mkdir()
    manager.save(3, state)  # the same state saves once the directory is back
    manager.close()
    assert sorted(p.name for p in directory.iterdir() if p.name.isdigit()) == ["3"]


@contextlib.contextmanager
def disk_full_after(limit_bytes):
    """Writes past ``limit_bytes`` in one file fail with EFBIG, as on a full disk."""
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail, do not kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, previous_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_handler)


# After the failed write, tensorstore completes a future on the event loop orbax has closed;
# Python reports that as an unraisable RuntimeError from tensorstore's thread.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_during_an_async_save_is_a_clear_error_and_the_state_stays(tmp_path):
    strategy = ts.TPUStrategy()
    values = np.random.default_rng(0).normal(size=1_000_000).astype(np.float32)  # 4 MB
    state = {"w": workers.replicated(strategy, values)}
    manager = ts.CheckpointManager(tmp_path, strategy)
    with disk_full_after(1 << 20), pytest.raises(ts.CheckpointError) as error:
        manager.save(1, state)  # returns: the write fails in the background
        manager.wait_until_finished()
    assert "File too large" in str(error.value)
    assert "the training state is still in memory" in str(error.value)
    assert manager.all_steps() == []  # nothing half-written counts as a checkpoint
    time.sleep(0.5)  # let tensorstore's late callback fail here, under this test's filter
    gc.collect()
    manager.save(2, state)  # with room again, the same state saves
    manager.close()
    assert manager.all_steps() == [2]
    np.testing.assert_array_equal(manager.restore(state)["w"], values)


@pytest.mark.parametrize("source", ["list", "generator"])
def test_input_position_resumes_at_the_next_batch(tmp_path, source):
    strategy = ts.TPUStrategy()
    data = workers.make_data()
    make = (lambda: data) if source == "list" else (lambda: (b for b in data))
    iterator = iter(strategy.experimental_distribute_dataset(make()))
    for _ in range(5):
        next(iterator)
    state = workers.initial_state(strategy)
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        manager.save(5, state, iterator=iterator)
    assert iterator.get_state() == {"batches": 5, "reads": 5}
    resumed = iter(strategy.experimental_distribute_dataset(make()))
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        manager.restore(state, iterator=resumed)
    assert [workers.batch_index(strategy, b) for b in resumed] == list(range(5, 24))


class StatefulLoader:
    """A loader whose iterator has get_state/set_state returning bytes, as grain's does."""

    def __init__(self, data):
        self._data = data

    def __iter__(self):
        return StatefulIterator(self._data)


class StatefulIterator:
    def __init__(self, data):
        self._data, self._next = data, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._next == len(self._data):
            raise StopIteration
        self._next += 1
        return self._data[self._next - 1]

    def get_state(self):
        return f"next={self._next}".encode()

    def set_state(self, state):
        self._next = int(state.decode().split("=")[1])


def test_source_iterator_state_is_saved_and_restored(tmp_path):
    strategy = ts.TPUStrategy()
    loader = StatefulLoader(workers.make_data())
    iterator = iter(strategy.experimental_distribute_dataset(loader))
    for _ in range(7):
        next(iterator)
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        manager.save(7, {"x": np.float32(1)}, iterator=iterator)
        resumed = iter(strategy.experimental_distribute_dataset(loader))
        manager.restore({"x": np.float32(0)}, iterator=resumed)
    assert resumed.get_state()["source_bytes"]  # the loader's own state was saved
    assert workers.batch_index(strategy, next(resumed)) == 7


def _grain_dataset(rows):
    return grain.MapDataset.source(rows).batch(8).to_iter_dataset()


def _grain_loader(rows):
    sampler = grain.samplers.IndexSampler(num_records=len(rows), shuffle=True, seed=3, num_epochs=1)
    return grain.DataLoader(
        data_source=rows,
        sampler=sampler,
        operations=[grain.transforms.Batch(8)],
        worker_count=0,
    )


@pytest.mark.parametrize("make", [_grain_dataset, _grain_loader], ids=["dataset", "loader"])
def test_grain_input_resumes_from_its_own_state(tmp_path, make):
    strategy = ts.TPUStrategy()
    rows = np.arange(64, dtype=np.float32).reshape(64, 1)
    expected = [np.asarray(batch) for batch in make(rows)]
    iterator = iter(strategy.experimental_distribute_dataset(make(rows)))
    for _ in range(3):
        next(iterator)
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        manager.save(3, {"x": np.float32(1)}, iterator=iterator)
        resumed = iter(strategy.experimental_distribute_dataset(make(rows)))
        manager.restore({"x": np.float32(0)}, iterator=resumed)
    assert {"source", "source_bytes"} & set(resumed.get_state())  # grain's own state
    rest = [np.concatenate(strategy.experimental_local_results(batch)) for batch in resumed]
    assert len(rest) == len(expected) - 3
    for got, want in zip(rest, expected[3:]):
        np.testing.assert_array_equal(got, want)


def test_set_state_after_reading_is_refused():
    strategy = ts.TPUStrategy()
    iterator = iter(strategy.experimental_distribute_dataset(workers.make_data()))
    next(iterator)
    with pytest.raises(ValueError, match="set_state moves a fresh iterator"):
        iterator.set_state({"batches": 1, "reads": 1})


def test_save_is_asynchronous(tmp_path):
    strategy = ts.TPUStrategy()
    state = workers.initial_state(strategy, big_floats=4_000_000)
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        manager.save(1, state)
        assert not (tmp_path / "1").exists()  # returned before the step was committed
        manager.wait_until_finished()
        assert (tmp_path / "1").is_dir()


def test_sigkill_during_an_async_save_resumes_from_the_last_complete_checkpoint(tmp_path):
    reference = workers.run(tmp_path / "reference", tmp_path / "reference", 12)
    assert reference.returncode == 0, reference.stderr[-3000:]
    directory = tmp_path / "checkpoints"
    killed = workers.run(directory, tmp_path / "run", 12, "--big", "--kill-during-save-at", "8")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert any("tmp" in p.name for p in directory.iterdir()), "the save of step 8 had finished"
    resumed = workers.run(directory, tmp_path / "run", 12, "--big")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "start 4" in resumed.stdout  # step 8 was never committed; step 4 was
    want = np.load(tmp_path / "reference.npz")
    got = np.load(tmp_path / "run.npz")
    for name in want.files:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-7)


def test_save_on_one_process_restore_on_two(saved):
    results = run_in_local_processes(
        workers.restore_in_cluster, 2, devices_per_process=4, args=(str(saved), 1), timeout=120
    )
    expected = expected_values(8)
    for process_id, values in enumerate(results):
        local = expected["per_replica"][process_id * 4 : (process_id + 1) * 4]
        assert_restored(values, expected, local)
        assert values["devices"] == 8
        assert values["shardings"] == [(), ("replica",)]


def test_save_on_two_processes_restore_on_one(tmp_path):
    run_in_local_processes(
        workers.save_in_cluster, 2, devices_per_process=4, args=(str(tmp_path),), timeout=120
    )
    strategy = ts.TPUStrategy()
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        restored = manager.restore(workers.abstract_mesh_state(strategy))
    assert_restored(workers.host_values(strategy, restored), expected_values(8))
