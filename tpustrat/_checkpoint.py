"""Checkpoints: the training state, the input position and random keys, written by orbax.

``ts.CheckpointManager(directory, strategy)`` wraps ``orbax.checkpoint.CheckpointManager``.
A save copies the state off the devices and returns; orbax writes the files in a background
thread and commits the step atomically (a step directory appears whole or not at all), so the
training loop goes on while the checkpoint is written. What is saved:

- every leaf of the state pytree (params, optimizer state, step counters, ``ts.PerReplica``
  leaves, typed random keys made by ``jax.random.key``), each under its pytree path;
- the position of a ``ts.DistributedIterator``, one small JSON file per process;
- a digest of every leaf's values (see ``_block_digest``), hashed in orbax's save thread from
  host copies, and checksums of the JSON records: a restore that reads anything other than
  what was saved raises ``CheckpointError``.

A restore takes a target: the state as the new strategy would build it, or its abstract form
(``jax.ShapeDtypeStruct`` leaves, from ``jax.eval_shape``). Every array lands with the target's
sharding on the new strategy's mesh, so restoring onto another mesh shape, fewer devices or
another number of processes reads only the shards each process holds. A ``PerReplica`` leaf
restores onto a strategy with the same number of replicas; a ``ts.ReplicaShard`` (the state of
``ts.shard_update``, an ``nnx.Optimizer``'s over it included) onto any number, moved by
``ts.reshard_update_state``.

Steps only increase: ``save`` refuses a step below the latest, so the latest step is the last
one saved in this process and after a restart. One manager per directory per process.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from tpustrat import _mesh, _metrics, _watchdog
from tpustrat._checks import check_bool, check_int, check_no_iterator, describe
from tpustrat._prefetch import DistributedIterator
from tpustrat._sharded_update import ReplicaShard, reshard_update_state, variable_shard
from tpustrat._strategy import TPUStrategy
from tpustrat._types import PyTree
from tpustrat._values import PerReplica, is_per_replica

_STATE = "state"
_LEAVES = "leaves"
_INPUT = "input"
_DIGESTS = "digests"
_LEAVES_FILE = "leaves.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the training state in memory is untouched."""


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One leaf of a state: its name in the checkpoint and how it is stored."""

    name: str
    kind: str  # "array" (a jax.Array), "per_replica" (a PerReplica's stacked array), "host"
    key_impl: str | None  # the PRNG implementation of a typed key, stored as its key data
    shape: tuple[int, ...]  # of the array stored (a key's key data, a PerReplica's stack)
    dtype: str
    # A ts.ReplicaShard's whole shape and cut axis, when the leaf is its blocks.
    shard: tuple[tuple[int, ...], int] | None = None

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> _Leaf:
        shard = record["shard"]
        return cls(
            name=record["name"],
            kind=record["kind"],
            key_impl=record["key_impl"],
            shape=tuple(record["shape"]),
            dtype=record["dtype"],
            shard=None if shard is None else (tuple(shard[0]), shard[1]),
        )


class _Named(NamedTuple):
    """A leaf as saved: its dotted name, kind, value (a PerReplica's stack) and ReplicaShard."""

    name: str
    kind: str
    value: Any
    shard: tuple[tuple[int, ...], int] | None


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError(
            "ts.CheckpointManager writes checkpoints with orbax-checkpoint, which is not "
            "installed; pip install 'tpustrat[checkpoint]' (or orbax-checkpoint)"
        ) from None
    return ocp


# ---------------------------------------------------------------------------------------------
# Digests. orbax and TensorStore keep no checksum of the data, so a damaged file can restore as
# wrong values. Each leaf's digest is a sum, modulo 2**64, of a mixed hash of every element's
# bytes and its position in the whole (logical) array: any partition of the array into blocks
# gives the same sum. Each process adds up the blocks it saves (the shards it holds with
# replica_id 0; process 0 for host leaves) and writes its partial sums; a restore adds up the
# shards it reads, on whatever mesh, and the processes' sums are added across the job.

_POSITION, _MIX_1, _MIX_2 = (
    np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
)
_DIGEST_CHUNK = 1 << 16  # elements hashed at a time: the temporaries stay in the CPU's cache


class _Block(NamedTuple):
    """A block of a leaf on the host: where it starts in the whole array, and its values."""

    start: tuple[int, ...]
    values: np.ndarray


def _words(values: np.ndarray) -> np.ndarray:
    """Each element's bytes as unsigned 64-bit words, one row per element."""
    flat = np.ascontiguousarray(values).reshape(-1)
    size = flat.dtype.itemsize
    if size in (1, 2, 4, 8):
        return flat.view(f"u{size}").astype(np.uint64)[:, None]
    raw = flat.view(np.uint8).reshape(flat.size, size)
    padded = np.zeros((flat.size, -(-size // 8) * 8), np.uint8)
    padded[:, :size] = raw
    return padded.view(np.uint64)


def _block_digest(shape: tuple[int, ...], block: _Block) -> int:
    """This block's part of the digest of a leaf of ``shape``.

    Each 64-bit word of an element's bytes is XORed with its position in the whole array
    (times an odd constant), mixed (multiply, xorshift, twice: a bijection, so any one changed
    word changes the sum) and summed modulo 2**64.
    """
    values = block.values
    if values.size == 0:
        return 0
    starts, dims = (block.start, shape) if shape else ((0,), (1,))
    if not shape:
        values = values.reshape(1)
    width = -(-values.dtype.itemsize // 8)  # 64-bit words per element
    strides = [width * int(np.prod(dims[d + 1 :], dtype=np.int64)) for d in range(len(dims))]
    steps = [np.uint64((stride * int(_POSITION)) % (1 << 64)) for stride in strides]
    word_offsets = np.arange(width, dtype=np.uint64) * _POSITION
    rows = max(1, _DIGEST_CHUNK // max(1, int(np.prod(values.shape[1:], dtype=np.int64))))
    total = 0
    for first in range(0, values.shape[0], rows):
        chunk = values[first : first + rows]
        position = np.zeros((), np.uint64)  # each element's position times _POSITION
        for d, length in enumerate(chunk.shape):
            start = starts[d] + (first if d == 0 else 0)
            offsets = np.arange(start, start + length, dtype=np.uint64) * steps[d]
            position = np.add.outer(position, offsets)
        mixed = _words(chunk)
        mixed ^= position.reshape(-1, 1) + word_offsets if width > 1 else position.reshape(-1, 1)
        for factor, shift in ((_MIX_1, 32), (_MIX_2, 29)):
            mixed *= factor
            mixed ^= mixed >> np.uint64(shift)
        total += int(mixed.sum(dtype=np.uint64))
    return total % (1 << 64)


def _partial_digest(shape: tuple[int, ...], blocks: list[_Block]) -> int:
    return sum(_block_digest(shape, block) for block in blocks) % (1 << 64)


def _host_blocks(
    arrays: Mapping[str, Any], *, copy: bool
) -> dict[str, tuple[tuple[int, ...], list[_Block]]]:
    """Each leaf's shape and the blocks of it this process adds to the digest, on the host.

    Every device-to-host copy is started before any is waited for, as orbax does for its own.
    On CPU the device arrays' blocks are views, which keep the buffers alive if the leaves are
    donated once ``save`` returns; ``copy`` copies numpy leaves, which the caller may change.
    """
    shards = {
        name: [s for s in value.addressable_shards if s.replica_id == 0]
        for name, value in arrays.items()
        if isinstance(value, jax.Array)
    }
    for shard in (s for owned in shards.values() for s in owned):
        shard.data.copy_to_host_async()
    blocks = {}
    for name, value in arrays.items():
        if name in shards:
            owned = [_Block(_starts(s.index), np.asarray(s.data)) for s in shards[name]]
        elif jax.process_index() == 0:  # a host leaf is the same in every process
            host = np.array(value) if copy else np.asarray(value)
            owned = [_Block((0,) * np.ndim(value), host)]
        else:
            owned = []
        blocks[name] = (np.shape(value), owned)
    return blocks


def _starts(index: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(0 if s.start is None else s.start for s in index)


def _job_sums(partials: list[int]) -> list[int]:
    """Every process's partial digests added up (a collective in a job of several processes)."""
    if jax.process_count() == 1:
        return partials
    halves = np.array([[p >> 32, p & 0xFFFFFFFF] for p in partials], np.uint32).reshape(-1, 2)
    gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(np.uint64)
    return [
        sum((int(hi) << 32) | int(lo) for hi, lo in gathered[:, i]) % (1 << 64)
        for i in range(len(partials))
    ]


def _sealed(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with the SHA-256 of its JSON, so that damage to the file is detected."""
    return {**record, "sha256": _sha256(record)}


def _sha256(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _unsealed(record: Any) -> dict[str, Any]:
    """The record a sealed file holds; a ValueError if it was changed since it was written."""
    if not isinstance(record, dict) or "sha256" not in record:
        raise ValueError("it holds no checksummed record")
    body = {k: v for k, v in record.items() if k != "sha256"}
    if _sha256(body) != record["sha256"]:
        raise ValueError("its contents do not match the checksum written with them")
    return body


def _digest_file(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"


@functools.cache
def _digest_handler_types() -> tuple[type, type]:
    """orbax's handler and arguments for the digests (built once orbax is imported)."""
    ocp = _orbax()

    @dataclasses.dataclass
    class DigestSave(ocp.args.CheckpointArgs):
        """The leaves' host blocks: ``{name: (whole shape, blocks)}``."""

        leaves: dict[str, tuple[tuple[int, ...], list[_Block]]]

    class DigestHandler(ocp.handlers.AsyncCheckpointHandler):
        """Writes this process's partial digests; orbax runs ``async_save``'s future in its
        save thread, so the hashing overlaps the training loop."""

        async def async_save(self, directory: Any, args: DigestSave) -> list[Any]:
            async def write() -> None:
                self.save(directory, args)

            return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="digests")]

        def save(self, directory: Any, args: DigestSave) -> None:
            sums = {
                name: format(_partial_digest(shape, blocks), "016x")
                for name, (shape, blocks) in args.leaves.items()
            }
            args.leaves.clear()  # the host blocks (on CPU, views that pin the device buffers)
            path = Path(directory) / _digest_file(jax.process_index(), jax.process_count())
            path.write_text(json.dumps(_sealed({"digests": sums})))

        def restore(self, directory: Any, processes: int = 1) -> dict[str, int]:
            """The digests the ``processes`` of the saving job wrote, added up; a
            FileNotFoundError or ValueError naming the file that is missing or damaged."""
            total: dict[str, int] = {}
            for index in range(processes):
                path = Path(directory) / _digest_file(index, processes)
                try:
                    sums = _unsealed(json.loads(path.read_text()))["digests"]
                except ValueError as error:  # broken JSON or UTF-8, or a changed record
                    raise ValueError(f"{path} is damaged: {error}") from error
                for name, value in sums.items():
                    total[name] = (total.get(name, 0) + int(value, 16)) % (1 << 64)
            return total

    return DigestHandler, DigestSave


# Directories a CheckpointManager of this process has open: a second manager on one directory
# would delete and overwrite the first's steps, and orbax's threads then wait for ever.
_OPEN_DIRECTORIES: weakref.WeakValueDictionary[Path, CheckpointManager] = (
    weakref.WeakValueDictionary()
)
_OPEN_LOCK = threading.Lock()


class CheckpointManager:
    """Saves and restores a strategy's training state asynchronously, with orbax.

    ``save`` returns once the state is copied off the devices; the files are written in the
    background and each step is committed atomically, so a process killed mid-save leaves the
    previous checkpoint as the latest. ``restore`` puts every leaf on this strategy's mesh with
    the target's sharding, so a checkpoint saved on one mesh (8x1, one process) restores onto
    another (4x2, four devices, two processes).

    Args:
      directory: where the step directories go; created if missing.
      strategy: the ``ts.TPUStrategy`` whose mesh restored arrays are placed on.
      max_to_keep: how many most recent checkpoints to keep; None keeps all.
      save_interval_steps: ``save`` writes only steps that are multiples of this (unless
        ``force=True``).
      asynchronous: False makes ``save`` wait until the checkpoint is committed.
      digests: False saves without the leaves' digests (no host copy to hash), so a restore
        of those steps cannot tell damaged values from saved ones.

    Raises:
      TypeError: ``directory`` is not a str or path.
      ValueError: another open manager of this process uses ``directory``.
      CheckpointError: if ``directory`` cannot be created or written.

    Example:
      >>> import tempfile
      >>> strategy = ts.TPUStrategy()
      >>> state = {"w": jax.numpy.ones(3), "step": np.int32(0)}
      >>> with ts.CheckpointManager(tempfile.mkdtemp(), strategy) as manager:
      ...     manager.save(1, state)
      ...     manager.wait_until_finished()
      ...     restored = manager.restore(state)  # replicated over the strategy's devices
      True
      >>> len(restored["w"].devices()), manager.latest_step()
      (8, 1)
    """

    def __init__(
        self,
        directory: str | Path,
        strategy: TPUStrategy,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        asynchronous: bool = True,
        digests: bool = True,
    ) -> None:
        ocp = _orbax()
        if not isinstance(strategy, TPUStrategy):
            raise TypeError(
                f"strategy must be a ts.TPUStrategy (whose mesh restored arrays go on), got "
                f"{type(strategy).__name__}"
            )
        if max_to_keep is not None:
            check_int("max_to_keep", max_to_keep, minimum=1)
        check_int("save_interval_steps", save_interval_steps, minimum=1)
        check_bool("asynchronous", asynchronous)
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(
                f"directory must be a str or pathlib.Path, got {type(directory).__name__} "
                f"{directory!r}; pass the folder the step directories go in"
            )
        self._directory = Path(directory).absolute()
        self._strategy = strategy
        self._save_interval_steps = save_interval_steps
        if not isinstance(digests, bool):
            raise TypeError(
                f"digests must be True or False, got {type(digests).__name__} {digests!r}"
            )
        self._with_digests = digests
        self._ocp = ocp
        handlers = ocp.handlers
        registry = handlers.DefaultCheckpointHandlerRegistry()
        state = handlers.StandardCheckpointHandler()
        leaves = handlers.JsonCheckpointHandler(filename=_LEAVES_FILE)
        # One file per process: a per-process input pipeline has its own position.
        position = handlers.JsonCheckpointHandler(
            filename=_input_file(jax.process_index(), jax.process_count()),
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None),
        )
        digest_handler, digest_save = _digest_handler_types()
        self._digests = digest_handler()
        for name, handler, save, restore in (
            (_STATE, state, ocp.args.StandardSave, ocp.args.StandardRestore),
            (_LEAVES, leaves, ocp.args.JsonSave, ocp.args.JsonRestore),
            (_INPUT, position, ocp.args.JsonSave, ocp.args.JsonRestore),
            (_DIGESTS, self._digests, digest_save, None),
        ):
            registry.add(name, save, handler)
            if restore is not None:
                registry.add(name, restore, handler)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,
        )
        with _OPEN_LOCK:
            other = _OPEN_DIRECTORIES.get(self._directory.resolve())
            if other is not None:
                raise ValueError(
                    f"{self._directory} is in use by another open ts.CheckpointManager of this "
                    f"process ({other!r}); two managers on one directory would overwrite each "
                    "other's steps: use that manager, or close() it before opening another"
                )
            try:
                self._manager = ocp.CheckpointManager(
                    self._directory, options=options, handler_registry=registry
                )
            except OSError as error:
                raise CheckpointError(
                    f"cannot use {self._directory} as a checkpoint directory ({error}); pass a "
                    "directory this process can create and write"
                ) from error
            _OPEN_DIRECTORIES[self._directory.resolve()] = self

    @property
    def directory(self) -> Path:
        """The directory holding one subdirectory per saved step."""
        return self._directory

    def latest_step(self) -> int | None:
        """The highest step saved (its write may still be running), or None if there is none.

        Steps are saved in increasing order (``save`` refuses a step below the latest), so
        the highest step is also the last one saved, in this process or after a restart.
        """
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Every saved step, oldest first (the last one's write may still be running)."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` would write: ``step`` is on the save interval and above
        the latest step saved."""
        step = check_int("step", step, minimum=0)
        latest = self.latest_step()
        return step % self._save_interval_steps == 0 and (latest is None or step > latest)

    def reached_preemption(self, step: int) -> bool:
        """Whether every process of a multi-process job has agreed to stop at ``step``.

        JAX's preemption service (on with ``jax.distributed``) notices SIGTERM on any process
        and picks the next step every process can reach; call this at every step, with
        increasing steps, on every process. Always False in a single process: there
        ``ts.PreemptionCheckpointHandler`` watches SIGTERM itself.
        """
        return self._manager.reached_preemption(check_int("step", step, minimum=0))

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        iterator: DistributedIterator | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving ``state`` (and ``iterator``'s input position) as ``step``.

        Returns once the arrays are copied off the devices; the files are written in the
        background (call ``wait_until_finished`` to wait). In a job of several processes every
        process calls it with the same step and state structure.

        Args:
          step: the checkpoint's step number, e.g. the number of training steps done.
          state: a pytree of ``jax.Array`` (replicated or sharded on this strategy's mesh),
            ``ts.PerReplica``, numpy and Python scalar leaves; typed keys allowed.
          iterator: a ``ts.DistributedIterator`` whose position (the batches it returned) is
            saved with the state.
          force: save even if ``step`` is not on the save interval.

        Returns:
          Whether a save was started (False off the interval, or if ``step`` is the latest
          step saved already).

        Raises:
          TypeError: a leaf of ``state`` cannot be saved (the message names it).
          ValueError: ``step`` is below the latest step saved (steps only increase); a leaf of
            ``state`` was deleted (donated to a jitted step).
          CheckpointError: the directory cannot be written (full, removed, no permission); the
            message says which step. ``state`` is untouched and can be saved again.
        """
        check_int("step", step, minimum=0)
        check_bool("force", force)
        check_no_iterator("state", state)
        state = _metrics.whole_values(state)  # a metric's value, whatever the replica count
        leaves, arrays = _saved_arrays(state)
        if not arrays:
            raise ValueError(
                f"state {describe(state)} holds no arrays to save; pass the training state, a "
                "pytree of arrays"
            )
        position = None
        if iterator is not None:
            position = _check_iterator(iterator).get_state()
        latest = self.latest_step()
        if latest is not None and step < latest:
            raise ValueError(
                f"cannot save step {step} in {self._directory}: its latest step is {latest} and "
                "steps only increase (the latest step is the one a restart resumes from); save "
                f"a step above {latest}, or use another directory for another run"
            )
        if step == latest or not (force or step % self._save_interval_steps == 0):
            return False
        if not (self._directory.is_dir() and os.access(self._directory, os.W_OK | os.X_OK)):
            # Checked first: orbax, failing to make the step directory, leaves threads waiting.
            raise self._write_error(
                FileNotFoundError(f"{self._directory} is not a writable directory"),
                f"saving step {step}",
            )
        ocp = self._ocp
        _, digest_save = _digest_handler_types()
        items = {
            _STATE: ocp.args.StandardSave(arrays),
            _LEAVES: ocp.args.JsonSave(
                _sealed(
                    {
                        "leaves": [dataclasses.asdict(leaf) for leaf in leaves],
                        "input_processes": None if position is None else jax.process_count(),
                        "processes": jax.process_count(),
                        "digests": self._with_digests,
                    }
                )
            ),
        }
        if self._with_digests:
            # Host copies now (a leaf may be donated once save returns); hashed in orbax's thread.
            items[_DIGESTS] = digest_save(_host_blocks(arrays, copy=True))
        if position is not None:
            items[_INPUT] = ocp.args.JsonSave(_sealed({"position": position}))
        try:
            # The interval is decided above; orbax's own policy would also save the first step.
            with _watchdog.calling("checkpoint save"):
                return self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:
            raise self._write_error(error, f"saving step {step}") from error

    def wait_until_finished(self) -> None:
        """Blocks until the last save is committed.

        Raises:
          CheckpointError: if writing it failed; the training state in memory is untouched.
        """
        try:
            with _watchdog.waiting("checkpoint save"):
                self._manager.wait_until_finished()
        except Exception as error:
            raise self._write_error(error, "finishing the last save") from error

    def restore(
        self,
        target: PyTree,
        *,
        step: int | None = None,
        iterator: DistributedIterator | None = None,
    ) -> PyTree:
        """The saved state of ``step`` (default the latest), laid out like ``target``.

        Each array leaf is read onto this strategy's mesh with the target leaf's sharding
        (replicated when the target leaf has none), each process reading only the shards its
        devices hold; numpy and Python leaves come back as host values of the target's type.

        Args:
          target: the state's structure: the state as built for this strategy, or abstract
            (``jax.ShapeDtypeStruct`` leaves, e.g. from ``jax.eval_shape``).
          step: which step; default the latest.
          iterator: a fresh ``ts.DistributedIterator`` (no element read yet) of the same
            dataset; it is moved to the saved input position, so ``next`` returns the first
            batch the saved run had not used.

        Returns:
          The restored state, with ``target``'s structure.

        Raises:
          TypeError: ``step`` is not an int.
          ValueError: no checkpoint exists; the saved tree differs from ``target`` (the
            message lists the leaves that differ); a PerReplica leaf was saved over another
            number of replicas than this strategy has.
          CheckpointError: a file of the step is missing or damaged, or a leaf's values differ
            from its saved digest; the message names the step and the file or leaf. Other
            steps stay restorable by number.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise ValueError(
                    f"no checkpoint to restore in {self._directory}; save one first, or start "
                    "from the initial state when latest_step() is None"
                )
        else:
            step = check_int("step", step, minimum=0)
            if step not in self._manager.all_steps():
                raise ValueError(
                    f"no checkpoint of step {step} in {self._directory}; it has steps "
                    f"{self.all_steps()}"
                )
        if iterator is not None:
            _check_iterator(iterator)
        check_no_iterator("target", target)
        target = _metrics.whole_values(target)
        self.wait_until_finished()  # the step may be the save still being written
        folder = self._directory / str(step)
        record = self._read_sealed(step, folder / _LEAVES / _LEAVES_FILE)
        try:
            saved_leaves = {leaf["name"]: _Leaf.from_json(leaf) for leaf in record["leaves"]}
            input_processes, processes = record["input_processes"], record["processes"]
            with_digests = record["digests"]
        except (KeyError, TypeError, ValueError) as error:
            raise self._read_error(step, folder / _LEAVES / _LEAVES_FILE, error) from error
        plan = _RestorePlan(target, self._strategy, step)
        plan.check(saved_leaves)
        position = None
        if iterator is not None:
            position = self._position(step, input_processes)
        digests = None
        if with_digests:
            try:
                digests = self._digests.restore(folder / _DIGESTS, processes)
            except (OSError, ValueError) as error:
                raise self._read_error(step, folder / _DIGESTS, error) from error
        ocp = self._ocp
        items = {_STATE: ocp.args.StandardRestore(plan.abstract)}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))[_STATE]
        except Exception as error:  # orbax and TensorStore raise many types for damaged files
            raise self._read_error(step, _failed_file(error, folder / _STATE), error) from error
        if digests is not None:
            self._verify(step, folder, restored, digests)
        state = plan.rebuild(restored)
        if iterator is not None and position is not None:
            iterator.set_state(position)
        return state

    def _verify(
        self,
        step: int,
        folder: Path,
        restored: Mapping[str, Any],
        digests: Mapping[str, int],
    ) -> None:
        """Raises a CheckpointError naming the first leaf whose values differ from the saved."""
        blocks = _host_blocks(restored, copy=False)
        names = list(blocks)
        partials = [_partial_digest(*blocks[name]) for name in names]
        for name, got in zip(names, _job_sums(partials)):
            if name not in digests:
                raise self._read_error(
                    step, folder / _DIGESTS, ValueError(f"it holds no digest of leaf {name!r}")
                )
            if got != digests[name]:
                raise CheckpointError(
                    f"checkpoint step {step} of {self._directory} is damaged: leaf {name!r} read "
                    f"from {folder / _STATE} differs from the value saved (digest {got:016x}, "
                    f"saved {digests[name]:016x}); restore another step by number "
                    f"(steps {self.all_steps()}), or start from the initial state"
                )

    def _read_sealed(self, step: int, path: Path) -> dict[str, Any]:
        try:
            return _unsealed(json.loads(path.read_text()))
        except (OSError, ValueError) as error:
            raise self._read_error(step, path, error) from error

    def _read_error(self, step: int, path: Path, error: Exception) -> CheckpointError:
        cause = str(error).split(" [", 1)[0].strip().splitlines()
        cause = cause[0][:300] if cause else ""
        return CheckpointError(
            f"cannot read checkpoint step {step} of {self._directory}: {path} is missing or "
            f"damaged ({type(error).__name__}: {cause}); restore another step by number "
            f"(steps {self.all_steps()}), or start from the initial state"
        )

    def _position(self, step: int, input_processes: int | None) -> dict[str, Any]:
        """This process's saved input position; any process's if they all saved the same."""
        if input_processes is None:
            raise ValueError(
                f"checkpoint step {step} in {self._directory} has no input position (it was "
                "saved without iterator=); restore without iterator= and start the input anew"
            )
        count, index = jax.process_count(), jax.process_index()
        folder = self._directory / str(step) / _INPUT

        def read(i: int, n: int) -> dict[str, Any]:
            path = folder / _input_file(i, n)
            record = self._read_sealed(step, path)
            if not isinstance(record.get("position"), dict):
                raise self._read_error(step, path, ValueError("it holds no input position"))
            return record["position"]

        if input_processes == count:
            return read(index, count)
        positions = [read(i, input_processes) for i in range(input_processes)]
        if any(p != positions[0] for p in positions):
            raise ValueError(
                f"checkpoint step {step} holds {input_processes} different input positions, "
                f"one per process, and this job has {count} processes; a per-process input "
                f"(distribute_datasets_from_function) restores only onto {input_processes} "
                "processes"
            )
        return positions[0]

    def _write_error(self, error: Exception, what: str) -> CheckpointError:
        return CheckpointError(
            f"{what} to {self._directory} failed ({type(error).__name__}: {error}); the "
            "training state is still in memory: free space or fix the directory, then save again"
        )

    def close(self) -> None:
        """Waits for the last save and releases orbax's threads and the directory."""
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()
            with _OPEN_LOCK:
                if _OPEN_DIRECTORIES.get(self._directory.resolve()) is self:
                    del _OPEN_DIRECTORIES[self._directory.resolve()]

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self._directory)!r}, latest_step={self.latest_step()})"


def _check_iterator(iterator: Any) -> DistributedIterator:
    if not isinstance(iterator, DistributedIterator):
        raise TypeError(
            f"iterator must be a ts.DistributedIterator (iter(dist)), got {type(iterator).__name__}"
        )
    return iterator


def _input_file(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"


def _failed_file(error: Exception, folder: Path) -> Path:
    """The file a TensorStore error names, the state's missing metadata, or else ``folder``."""
    named = re.search(r'local file "([^"]+)"', str(error))
    if named:
        return Path(named.group(1))
    if not (folder / "_METADATA").exists():
        return folder / "_METADATA"
    return folder


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _host_array(value: Any) -> np.ndarray:
    """A numpy or Python leaf as an array; Python numbers take JAX's dtype (int32 unless x64)."""
    array = np.asarray(value)
    if isinstance(value, (bool, int, float, complex)):
        return array.astype(jax.dtypes.canonicalize_dtype(array.dtype))
    return array


def _key_impl(key: Any) -> str:
    """The PRNG implementation's name (``threefry2x32``) of a typed key or its abstract value."""
    names = []
    abstract = jax.ShapeDtypeStruct(np.shape(key), key.dtype)
    jax.eval_shape(lambda k: names.append(str(jax.random.key_impl(k))), abstract)
    return names[0]


def _is_saved_node(x: Any) -> bool:
    """A PerReplica, a ReplicaShard over one, or an nnx Variable holding a ReplicaShard's
    PerReplica (an nnx.Optimizer's state): saved as one stacked array."""
    return (
        is_per_replica(x)
        or (isinstance(x, ReplicaShard) and isinstance(x.blocks, PerReplica))
        or variable_shard(x) is not None
    )


def _named_leaves(state: PyTree) -> list[_Named]:
    """Every leaf as saved; a PerReplica's leaf is its stacked array.

    Names are the pytree paths joined by dots (``params.Dense_0.kernel``); a ReplicaShard's
    blocks are named ``<path>.blocks``.
    """
    named, seen = [], {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_saved_node)[0]:
        shard = None
        if isinstance(leaf, ReplicaShard):
            path, shard = (*path, jax.tree_util.GetAttrKey("blocks")), (leaf.shape, leaf.axis)
            kind, value = "per_replica", leaf.blocks.stacked
        elif isinstance(leaf, PerReplica):
            kind, value = "per_replica", leaf.stacked
        elif (shard := variable_shard(leaf)) is not None:
            flat = jax.tree_util.tree_flatten_with_path(leaf, is_leaf=is_per_replica)[0]
            ((inner, blocks),) = flat
            path, kind, value = (*path, *inner), "per_replica", blocks.stacked
        else:
            is_array = isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct))
            kind, value = ("array" if is_array else "host"), leaf
        name = jax.tree_util.keystr(path, simple=True, separator=".") or "(root)"
        if name in seen:
            raise ValueError(
                f"state leaves {seen[name]} and {jax.tree_util.keystr(path)} would both "
                f"be saved as {name!r}; rename a key so that the dotted paths differ"
            )
        seen[name] = jax.tree_util.keystr(path)
        named.append(_Named(name, kind, value, shard))
    return named


def _saved_arrays(state: PyTree) -> tuple[list[_Leaf], dict[str, Any]]:
    """The leaf records and the flat ``{name: array}`` dict that orbax writes."""
    leaves, arrays = [], {}
    for name, kind, value, shard in _named_leaves(state):
        key_impl = None
        if isinstance(value, jax.Array) and value.is_deleted():
            raise ValueError(
                f"state leaf {name!r} is a deleted array (donated to a jitted step, or "
                "deleted); save the state the step returned, not the one passed in"
            )
        if _is_key(value):
            key_impl = _key_impl(value)
            value = jax.random.key_data(value)
        elif kind == "host":
            if isinstance(value, (str, bytes)) or not isinstance(
                value, (np.ndarray, np.generic, bool, int, float, complex)
            ):
                raise TypeError(
                    f"state leaf {name!r} is a {type(value).__name__}, which a checkpoint cannot "
                    "hold; keep arrays, numbers and ts.PerReplica values in the state"
                )
            value = _host_array(value)
        elif kind == "per_replica" and not isinstance(value, jax.Array):
            value = np.asarray(value)
        if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
            raise TypeError(
                f"state leaf {name!r} is an array of dtype {value.dtype}, which a checkpoint "
                "cannot hold; keep numeric and bool arrays in the state (map strings to ids)"
            )
        if np.size(value) == 0:
            raise ValueError(
                f"state leaf {name!r} has no elements (shape {np.shape(value)}), which orbax "
                "cannot save; drop it from the state"
            )
        leaves.append(_Leaf(name, kind, key_impl, np.shape(value), str(value.dtype), shard))
        arrays[name] = value
    return leaves, arrays


class _RestorePlan:
    """The abstract arrays orbax restores into, and how to rebuild the target's structure."""

    def __init__(self, target: PyTree, strategy: TPUStrategy, step: int):
        self._strategy = strategy
        self._step = step
        self._treedef = jax.tree.structure(target, is_leaf=_is_saved_node)
        self._target_leaves = jax.tree.leaves(target, is_leaf=_is_saved_node)
        self._named = _named_leaves(target)
        self.abstract = {leaf.name: self._abstract(leaf) for leaf in self._named}
        # ReplicaShards saved over another number of replicas: their saved (shape, axis).
        self._reshard: dict[str, tuple[tuple[int, ...], int]] = {}

    def _abstract(self, leaf: _Named) -> Any:
        name, kind, value = leaf.name, leaf.kind, leaf.value
        mesh = self._strategy.mesh
        if kind == "host":
            return _host_array(value)
        if kind == "per_replica":
            n = self._strategy.num_replicas_in_sync
            if np.shape(value)[0] != n:
                raise ValueError(
                    f"target leaf {name!r} is a PerReplica over {np.shape(value)[0]} replicas "
                    f"but the strategy has {n}; build the target with this strategy"
                )
            sharding = _mesh.per_replica_sharding(mesh)
        else:
            sharding = _target_sharding(name, getattr(value, "sharding", None), self._strategy)
        shape, dtype = np.shape(value), value.dtype
        if _is_key(value):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
            spec = PartitionSpec(*sharding.spec, *[None] * (len(data.shape) - len(shape)))
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding.update(spec=spec))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def check(self, saved: Mapping[str, _Leaf]) -> None:
        """Raises a ValueError naming every leaf that differs between checkpoint and target.

        A ReplicaShard saved over another number of replicas is read whole (replicated) and
        cut for this strategy's replicas by ``rebuild``.
        """
        wanted = {leaf.name for leaf in self._named}
        missing = sorted(wanted - set(saved))
        extra = sorted(set(saved) - wanted)
        if missing or extra:
            differences = []
            if missing:
                differences.append(f"leaves only in the target: {', '.join(missing)}")
            if extra:
                differences.append(f"leaves only in the checkpoint: {', '.join(extra)}")
            raise ValueError(
                f"checkpoint step {self._step} does not match the target's tree ("
                f"{'; '.join(differences)}); restore into a target with the saved structure"
            )
        problems = []
        for name, kind, value, shard in self._named:
            record, want = saved[name], self.abstract[name]
            stored = (record.shape, np.dtype(record.dtype))
            if record.kind == kind == "per_replica" and record.shape[0] != want.shape[0]:
                if record.shard is None or shard is None:
                    raise ValueError(
                        f"state leaf {name!r} is a PerReplica saved over {record.shape[0]} "
                        f"replicas but this strategy has {want.shape[0]}; restore it onto a "
                        f"strategy with {record.shape[0]} replicas (or drop the leaf and rebuild "
                        "it per replica)"
                    )
                if record.shard[0] != shard[0]:
                    problems.append(
                        f"{name} (a ReplicaShard of a whole {list(record.shard[0])}, target "
                        f"{list(shard[0])})"
                    )
                    continue
                if record.shard[1] != shard[1]:
                    raise ValueError(
                        f"state leaf {name!r} is a ReplicaShard saved over {record.shape[0]} "
                        f"replicas cut along axis {record.shard[1]}, and the target, over "
                        f"{want.shape[0]} replicas, cuts it along axis {shard[1]}; "
                        "ts.reshard_update_state keeps the saved axis: restore onto a strategy "
                        f"with {record.shape[0]} replicas"
                    )
                # Read the saved blocks whole on every device; rebuild re-cuts them.
                self._reshard[name] = record.shard
                want = jax.ShapeDtypeStruct(
                    record.shape,
                    want.dtype,
                    sharding=_mesh.replicated_sharding(self._strategy.mesh),
                )
                self.abstract[name] = want
            impl = _key_impl(value) if _is_key(value) else None
            if record.key_impl != impl:
                problems.append(
                    f"{name} (random key implementation saved {record.key_impl}, target {impl})"
                )
            elif stored != (tuple(want.shape), np.dtype(want.dtype)):
                problems.append(
                    f"{name} (saved {stored[1]}{list(stored[0])}, target "
                    f"{np.dtype(want.dtype)}{list(want.shape)})"
                )
        if problems:
            raise ValueError(
                f"checkpoint step {self._step} does not match the target: leaves "
                f"{', '.join(problems)}; restore into a target with the saved shapes and dtypes"
            )

    def rebuild(self, restored: Mapping[str, Any]) -> PyTree:
        """The target's structure with the restored arrays; ReplicaShards saved over another
        number of replicas are moved onto this strategy's by ``ts.reshard_update_state``."""
        leaves = []
        for leaf, named in zip(self._target_leaves, self._named):
            value = restored[named.name]
            if isinstance(leaf, ReplicaShard):
                blocks = PerReplica.from_stacked(value)
                if named.name not in self._reshard:
                    leaves.append(ReplicaShard(blocks, leaf.shape, leaf.axis))
                    continue
                shape, axis = self._reshard[named.name]
                leaves.append(
                    reshard_update_state(ReplicaShard(blocks, shape, axis), self._strategy)
                )
            elif isinstance(leaf, PerReplica) or variable_shard(leaf) is not None:
                if named.name in self._reshard:  # an nnx.Optimizer's blocks: re-cut them
                    shape, axis = self._reshard[named.name]
                    blocks = ReplicaShard(PerReplica.from_stacked(value), shape, axis)
                    value = reshard_update_state(blocks, self._strategy).blocks.stacked
                inner = jax.tree.structure(leaf)  # unflattening keeps abstract targets working
                leaves.append(inner.unflatten([value]))
            else:
                leaves.append(_like(leaf, value))
        return self._treedef.unflatten(leaves)


def _like(target: Any, value: Any) -> Any:
    """``value`` with the target leaf's type: a typed key, a numpy or Python scalar."""
    if _is_key(target):
        return jax.random.wrap_key_data(value, impl=_key_impl(target))
    if isinstance(target, (jax.Array, jax.ShapeDtypeStruct)):
        return value
    if isinstance(target, (bool, int, float, complex)):
        return type(target)(np.asarray(value).item())
    if isinstance(target, np.generic):
        return np.asarray(value)[()]
    return np.asarray(value)


def _target_sharding(name: str, sharding: Any, strategy: TPUStrategy) -> NamedSharding:
    """The target's sharding on the strategy's mesh, its spec's logical cores spelled as that
    mesh's core axes (``_mesh.spell_cores``); replicated if it has none."""
    mesh = strategy.mesh
    if not isinstance(sharding, NamedSharding):
        return _mesh.replicated_sharding(mesh)
    try:
        spec = _mesh.spell_cores(sharding.spec, mesh)
    except ValueError as error:
        raise ValueError(
            f"target leaf {name!r} cannot be laid out on the strategy's mesh: {error}"
        ) from None
    if not _mesh.spec_axes(spec) <= set(mesh.axis_names):
        raise ValueError(
            f"target leaf {name!r} is sharded as {sharding.spec} over axes the strategy's mesh "
            f"{dict(mesh.shape)} does not have; give it a sharding over this strategy's mesh"
        )
    return NamedSharding(mesh, spec)
