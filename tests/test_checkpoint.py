"""Checkpoints: async save, restore onto other meshes and processes, input position, errors.

The processes that need real signals or several JAX processes run ``_checkpoint_workers``;
each has a timeout.
"""

import contextlib
import gc
import importlib.metadata
import random
import resource
import shutil
import signal
import threading
import time

import _checkpoint_workers as workers
import grain
import jax
import ml_dtypes
import numpy as np
import optax
import pytest
from conftest import SEVERAL_REPLICAS
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpustrat as ts
from tpustrat import _checkpoint
from tpustrat.testing import run_in_local_processes

# A restore that fails on a damaged file leaves orbax's other read coroutines abandoned, with
# exceptions never retrieved; Python reports them whenever the garbage collector finds them.
# Every test here collects its garbage at teardown, where such reports are expected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_abandoned_reads():
    yield
    gc.collect()


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


@pytest.mark.parametrize("target", [*SEVERAL_REPLICAS, "4 devices"], ids=str)
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
    replicated = NamedSharding(strategy.mesh, P())
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


@pytest.mark.parametrize("target", [(4, 2), (2, 4)], ids=str)
def test_leaf_tiled_over_the_cores_restores_tiled_over_another_meshes_cores(tmp_path, target):
    """A target written for the 1x8 mesh (three core sub-axes) restores onto a mesh whose
    cores are factored otherwise: the dimension tiled over all the cores stays so."""
    source = ts.TPUStrategy(num_logical_cores=8)
    values = np.arange(64, dtype=np.float32).reshape(8, 8)

    def target_on_source(*spec):
        sharding = NamedSharding(source.mesh, P(*spec))
        return {"w": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=sharding)}

    tiled = target_on_source(None, source.logical_core_axes)
    with ts.CheckpointManager(tmp_path, source) as manager:
        manager.save(1, {"w": jax.device_put(values, tiled["w"].sharding)})
    strategy = _strategy(target)
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        restored = manager.restore(tiled)
        two_dims = target_on_source("logical_core.0", ("logical_core.1", "logical_core.2"))
        with pytest.raises(ValueError, match=r"target leaf 'w' cannot be laid out .* tiles 2 dim"):
            manager.restore(two_dims)
    want = NamedSharding(strategy.mesh, P(None, strategy.logical_core_axes))
    assert restored["w"].sharding == want
    np.testing.assert_array_equal(restored["w"], values)


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


def test_save_on_two_processes_writes_a_digest_file_per_process(tmp_path):
    run_in_local_processes(
        workers.save_in_cluster, 2, devices_per_process=4, args=(str(tmp_path),), timeout=120
    )
    files = sorted(p.name for p in (tmp_path / "3" / "digests").glob("process_*"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"]


# Digests: generated arrays cut into generated blocks, checked against the whole array's digest.


def _random_array(rng, dtype):
    shape = tuple(int(d) for d in rng.integers(1, 6, size=rng.integers(0, 4)))
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if np.issubdtype(dtype, np.complexfloating):
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
    return (rng.normal(size=shape) * 100).astype(dtype)


def _random_blocks(rng, array):
    """``array`` cut into a grid of blocks, each with its start in the whole array."""
    cuts = [
        sorted({0, length, *rng.integers(0, length + 1, size=2).tolist()}) for length in array.shape
    ]
    blocks = []
    for corner in np.ndindex(*[len(c) - 1 for c in cuts]):
        index = tuple(slice(c[i], c[i + 1]) for c, i in zip(cuts, corner))
        blocks.append(_checkpoint._Block(tuple(s.start for s in index), array[index]))
    return blocks


def _digest(array):
    return _checkpoint._partial_digest(array.shape, [_checkpoint._Block((0,) * array.ndim, array)])


@pytest.mark.parametrize(
    "dtype",
    [np.float32, np.int8, np.bool_, np.complex128, np.uint64, ml_dtypes.bfloat16],
    ids=lambda d: np.dtype(d).name,
)
def test_digest_is_the_same_for_any_blocks_and_changes_with_any_element(dtype):
    rng = np.random.default_rng(0)
    for _ in range(20):
        array = _random_array(rng, dtype)
        whole = _digest(array)
        assert _checkpoint._partial_digest(array.shape, _random_blocks(rng, array)) == whole
        damaged = array.copy().reshape(-1)
        raw = damaged.view(np.uint8).reshape(damaged.size, -1)
        raw[int(rng.integers(damaged.size)), int(rng.integers(raw.shape[1]))] ^= 1 << int(
            rng.integers(8)
        )
        assert _digest(damaged.reshape(array.shape)) != whole
        moved = np.roll(array.reshape(-1), 1).reshape(array.shape)  # same values, other places
        if moved.tobytes() != array.tobytes():
            assert _digest(moved) != whole


def _data_file(step_folder):
    """The largest file of the step: where the values of its biggest array are."""
    return max((p for p in step_folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("target", [(4, 2), "4 devices", (1, 8)], ids=str)
def test_digest_of_a_sharded_leaf_holds_when_restored_cut_otherwise(tmp_path, target):
    eight = ts.TPUStrategy()
    values = np.arange(64, dtype=np.float32).reshape(8, 8)
    w = jax.device_put(values, NamedSharding(eight.mesh, P("replica")))  # one row per device
    with ts.CheckpointManager(tmp_path, eight) as manager:
        manager.save(1, {"w": w})
    strategy = _strategy(target)
    spec = (
        P("replica") if strategy.num_replicas_in_sync > 1 else P(None, strategy.logical_core_axes)
    )
    sharding = NamedSharding(strategy.mesh, spec)
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        restored = manager.restore(
            {"w": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=sharding)}
        )
    assert restored["w"].sharding.spec == spec
    np.testing.assert_array_equal(restored["w"], values)


def test_flipped_byte_in_the_data_is_a_checkpoint_error_naming_the_step_and_leaf(tmp_path):
    strategy = ts.TPUStrategy()
    values = np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32)
    state = {
        "w": workers.replicated(strategy, values),
        "b": workers.replicated(strategy, values[0]),
    }
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        manager.save(1, state)
        manager.save(2, state)
    data = _data_file(tmp_path / "2")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of one element: TensorStore reads it back as it is
    data.write_bytes(bytes(raw))
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        with pytest.raises(ts.CheckpointError, match=r"step 2 .* leaf 'w' .* differs"):
            manager.restore(state)
        np.testing.assert_array_equal(manager.restore(state, step=1)["w"], values)


def test_without_digests_a_step_saves_no_digest_and_restores(tmp_path):
    strategy = ts.TPUStrategy()
    state = {"w": workers.replicated(strategy, np.arange(4, dtype=np.float32))}
    with pytest.raises(TypeError, match="digests must be True or False, got str 'no'"):
        ts.CheckpointManager(tmp_path, strategy, digests="no")
    with ts.CheckpointManager(tmp_path, strategy, digests=False) as manager:
        manager.save(1, state)
    assert not (tmp_path / "1" / "digests").exists()
    with ts.CheckpointManager(tmp_path, strategy) as manager:  # a step says if it has digests
        np.testing.assert_array_equal(manager.restore(state)["w"], [0, 1, 2, 3])
        manager.save(2, state)
        manager.wait_until_finished()
        shutil.rmtree(tmp_path / "2" / "digests")
        with pytest.raises(ts.CheckpointError, match=r"step 2 of .*2/digests is missing"):
            manager.restore(state)


def test_damaged_data_is_found_by_two_processes_restoring_one_process_save(tmp_path):
    strategy = ts.TPUStrategy()
    values = np.random.default_rng(2).normal(size=(64, 64)).astype(np.float32)
    state = {
        "w": workers.replicated(strategy, values),
        "b": workers.replicated(strategy, values[0]),
    }
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        manager.save(1, state)
    restore = workers.restore_wb_in_cluster
    results = run_in_local_processes(restore, 2, devices_per_process=4, args=(str(tmp_path),))
    for result in results:
        np.testing.assert_array_equal(result["w"], values)
    data = _data_file(tmp_path / "1")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    results = run_in_local_processes(restore, 2, devices_per_process=4, args=(str(tmp_path),))
    for error in results:  # each process adds its shards' digests; both see the sum differ
        assert "checkpoint step 1 " in error and "leaf 'w'" in error, error


def test_digests_are_hashed_in_the_save_thread_from_host_copies(tmp_path, monkeypatch):
    threads = []
    hashed = _checkpoint._partial_digest

    def record_thread(shape, blocks):
        threads.append(threading.current_thread())
        return hashed(shape, blocks)

    monkeypatch.setattr(_checkpoint, "_partial_digest", record_thread)
    strategy = ts.TPUStrategy()
    step = jax.jit(lambda w: w + 1, donate_argnums=0)
    w = workers.replicated(strategy, np.arange(8, dtype=np.float32))
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        manager.save(1, {"w": w})
        step(w)  # donated as soon as save returns: the digest reads the host copy
        manager.wait_until_finished()
        assert threads and threading.main_thread() not in threads
        restored = manager.restore({"w": jax.ShapeDtypeStruct((8,), np.float32)})
    np.testing.assert_array_equal(restored["w"], np.arange(8, dtype=np.float32))


# Damage: every file of a saved step truncated, flipped or deleted (seeded).


def _damage(path, how, rng):
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[: int(rng.integers(len(data)))] if data else b"")
    else:
        raw = bytearray(data or b"\0")
        raw[int(rng.integers(len(raw)))] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(raw))


# A failed read leaves tensorstore callbacks for the event loop orbax has closed, and orbax
# coroutines never awaited; Python reports them as unraisable exceptions.
def test_damaged_files_restore_the_saved_values_or_raise_checkpoint_error(tmp_path):
    seed = random.randrange(1 << 30)
    rng = np.random.default_rng(seed)
    strategy = ts.TPUStrategy()
    state = workers.mesh_state(strategy)
    w = rng.normal(size=(16, 16)).astype(np.float32)
    state["params"]["w"] = workers.replicated(strategy, w)
    data = workers.make_data()
    iterator = iter(strategy.experimental_distribute_dataset(data))
    for _ in range(2):
        next(iterator)
    source = tmp_path / "source"
    with ts.CheckpointManager(source, strategy) as manager:
        manager.save(1, state)
        manager.save(2, state, iterator=iterator)
    want = {**expected_values(8), "w": w}
    files = sorted(p.relative_to(source / "2") for p in (source / "2").rglob("*") if p.is_file())
    assert len(files) >= 10, files
    outcomes = set()
    for number, name in enumerate(files):
        for how in ("truncate", "flip", "delete"):
            directory = tmp_path / f"{number}-{how}"
            shutil.copytree(source, directory)
            _damage(directory / "2" / name, how, rng)
            case = f"{name} {how} (seed {seed})"
            resumed = iter(strategy.experimental_distribute_dataset(data))
            with ts.CheckpointManager(directory, strategy) as manager:
                try:
                    restored = manager.restore(state, step=2, iterator=resumed)
                except ts.CheckpointError as error:
                    assert "checkpoint step 2 " in str(error), case
                    assert str(directory / "2") in str(error), case
                    outcomes.add("error")
                else:
                    assert_restored(workers.host_values(strategy, restored), want)
                    assert workers.batch_index(strategy, next(resumed)) == 2, case
                    outcomes.add("values")
                older = manager.restore(state, step=1)  # the earlier step is untouched
                assert_restored(workers.host_values(strategy, older), want)
            shutil.rmtree(directory)
    assert outcomes == {"error", "values"}
    time.sleep(0.5)  # let the failed reads' late callbacks and coroutines end under this filter
    gc.collect()


# orbax-checkpoint before 0.12.8 reads the tree's structure from _METADATA only (its
# PyTreeCheckpointHandler raises "No structure could be identified"); from 0.12.8 it falls back
# to the target's structure, which restore always passes.
_ORBAX_NEEDS_METADATA = tuple(
    int(part) for part in importlib.metadata.version("orbax-checkpoint").split(".")[:3]
) < (0, 12, 8)


def test_missing_metadata_needs_only_new_orbax_and_broken_json_names_its_file(tmp_path):
    strategy = ts.TPUStrategy()
    state = {"w": workers.replicated(strategy, np.arange(3, dtype=np.float32)), "n": np.int32(4)}
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        manager.save(4, state)
        manager.wait_until_finished()
        (tmp_path / "4" / "state" / "_METADATA").unlink()  # the target says what to read
        if _ORBAX_NEEDS_METADATA:
            with pytest.raises(
                ts.CheckpointError, match=r"step 4 of .*: .*4/state/_METADATA is missing or damaged"
            ):
                manager.restore(state)
        else:
            restored = manager.restore(state)
            np.testing.assert_array_equal(restored["w"], [0, 1, 2])
            assert restored["n"] == 4
        leaves = tmp_path / "4" / "leaves" / "leaves.json"
        leaves.write_text(leaves.read_text()[:-5])
        with pytest.raises(
            ts.CheckpointError,
            match=r"step 4 of .*: .*4/leaves/leaves\.json is missing or damaged \(JSONDecodeError",
        ):
            manager.restore(state)


# A ts.shard_update optimizer state restored onto another number of replicas.


def _whole(shard):
    """The whole leaf of a ReplicaShard, from its stacked blocks (padding dropped)."""
    stacked = np.asarray(shard.blocks.stacked)
    joined = np.concatenate(list(stacked), axis=shard.axis)
    return np.take(joined, np.arange(shard.shape[shard.axis]), axis=shard.axis)


def _adam_state(strategy, params):
    """A sharded Adam state after one step with replica-dependent gradients."""
    tx = ts.shard_update(optax.adam(0.1))
    params = strategy.replicate(params)
    opt_state = strategy.run(tx.init, args=(params,))

    def step(params, opt_state, x):
        grads = jax.grad(lambda p: sum(jax.numpy.sum((v * x) ** 2) for v in p.values()))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    x = strategy.experimental_distribute_values_from_function(
        lambda ctx: np.float32(ctx.replica_id_in_sync_group + 1)
    )
    return strategy.run(step, args=(params, opt_state, x))[1]


@pytest.mark.parametrize("replicas", [4, 2])
def test_sharded_optimizer_state_restores_onto_fewer_replicas(tmp_path, replicas):
    params = {"w": np.arange(16, dtype=np.float32), "v": np.ones((3, 5), np.float32)}
    eight = ts.TPUStrategy()
    saved = _adam_state(eight, params)
    with ts.CheckpointManager(tmp_path, eight) as manager:
        manager.save(1, {"opt": saved})
    fewer = ts.TPUStrategy(num_logical_cores=8 // replicas)
    target = jax.eval_shape(lambda: _adam_state(fewer, params))
    with ts.CheckpointManager(tmp_path, fewer) as manager:
        restored = manager.restore({"opt": target})["opt"]
    for name in ("mu", "nu"):
        for leaf in params:
            got, want = getattr(restored[0], name)[leaf], getattr(saved[0], name)[leaf]
            assert got.blocks.stacked.shape[0] == replicas
            assert got.blocks.stacked.sharding.spec == P("replica")
            assert np.abs(_whole(want)).sum() > 0
            np.testing.assert_array_equal(_whole(got), _whole(want))
    assert int(restored[0].count) == 1


def test_sharded_state_cut_along_another_axis_is_a_clear_error(tmp_path):
    params = {"k": np.ones((12, 8), np.float32)}  # 8 replicas cut axis 1, 4 replicas axis 0
    eight = ts.TPUStrategy()
    with ts.CheckpointManager(tmp_path, eight) as manager:
        manager.save(1, _adam_state(eight, params))
    four = ts.TPUStrategy(num_logical_cores=2)
    target = jax.eval_shape(lambda: _adam_state(four, params))
    with (
        ts.CheckpointManager(tmp_path, four) as manager,
        pytest.raises(ValueError, match=r"'0.mu.k.blocks' is a ReplicaShard saved over 8 "),
    ):
        manager.restore(target)


# Step order, one manager per directory, argument checks, Ctrl-C.


def test_steps_only_increase_in_one_process_and_after_a_restart(tmp_path):
    strategy = ts.TPUStrategy()
    state = {"w": np.float32(5)}
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        assert manager.save(5, state)
        with pytest.raises(ValueError, match=r"cannot save step 3 .* latest step is 5"):
            manager.save(3, {"w": np.float32(3)})
        assert not manager.should_save(3)
        assert not manager.save(5, state)  # saved already
        assert manager.latest_step() == 5
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        assert manager.latest_step() == 5
        with pytest.raises(ValueError, match="latest step is 5"):
            manager.save(3, {"w": np.float32(3)})
        assert float(manager.restore(state)["w"]) == 5.0


def test_second_manager_on_a_directory_is_refused_and_the_process_exits(tmp_path):
    done = workers.run_function(f"two_managers({str(tmp_path)!r})", timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused:" in done.stdout and "is in use by another open" in done.stdout
    strategy = ts.TPUStrategy()
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        assert manager.all_steps() == [1, 3]
        with pytest.raises(ValueError, match=r"in use by another open ts\.CheckpointManager"):
            ts.CheckpointManager(tmp_path / "sub" / "..", strategy)
    with ts.CheckpointManager(tmp_path, strategy) as manager:  # closed: the directory is free
        assert manager.latest_step() == 3


def test_bad_arguments_name_the_argument_and_value(tmp_path):
    strategy = ts.TPUStrategy()
    with pytest.raises(TypeError, match=r"directory must be a str or pathlib.Path, got NoneType"):
        ts.CheckpointManager(None, strategy)
    w = workers.replicated(strategy, np.ones(3, np.float32))
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        manager.save(1, {"w": w})
        with pytest.raises(TypeError, match=r"step must be an int, got float 1\.0"):
            manager.restore({"w": w}, step=1.0)
        with pytest.raises(TypeError, match=r"step must be an int, got the bool True"):
            manager.restore({"w": w}, step=True)
        manager.wait_until_finished()
        gc.collect()  # nothing holds w's buffer any more: donation deletes it
        jax.jit(lambda x: x + 1, donate_argnums=0)(w)
        assert w.is_deleted()
        with pytest.raises(ValueError, match=r"state leaf 'w' is a deleted array \(donated"):
            manager.save(2, {"w": w})
        with pytest.raises(TypeError, match=r"state leaf 'ids' is an array of dtype <U1"):
            manager.save(2, {"ids": np.array(["a", "b"])})
        with pytest.raises(ValueError, match=r"state leaf 'e' has no elements \(shape \(0, 2\)\)"):
            manager.save(2, {"e": np.zeros((0, 2), np.float32)})
        with pytest.raises(ValueError, match=r"state dict \{\} holds no arrays to save"):
            manager.save(2, {})
        with pytest.raises(TypeError, match=r"state\['w'\] is an iterator"):
            manager.save(2, {"w": iter([w])})
        with pytest.raises(TypeError, match=r"force must be a bool, got str 'yes'"):
            manager.save(2, {"x": np.float32(1)}, force="yes")
        with pytest.raises(TypeError, match=r"step must be an int, got str '2'"):
            manager.should_save("2")
    with pytest.raises(TypeError, match=r"asynchronous must be a bool, got NoneType None"):
        ts.CheckpointManager(tmp_path, strategy, asynchronous=None)


def test_ctrl_c_during_saves_leaves_the_latest_step_whole(tmp_path):
    done = workers.run_function(f"interrupt_saves({str(tmp_path)!r}, 0.5)", timeout=90)
    assert done.returncode != 0 and "KeyboardInterrupt" in done.stderr, done.stderr[-3000:]
    assert "saving 1" in done.stdout  # step 1 was committed before the interrupt
    strategy = ts.TPUStrategy()
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        latest = manager.latest_step()
        assert latest is not None
        restored = manager.restore({"w": jax.ShapeDtypeStruct((4_000_000,), np.float32)})
    np.testing.assert_array_equal(restored["w"], np.full(4_000_000, latest, np.float32))
