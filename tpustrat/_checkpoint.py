"""Checkpoints: the training state, the input position and random keys, written by orbax.

``ts.CheckpointManager(directory, strategy)`` wraps ``orbax.checkpoint.CheckpointManager``.
A save copies the state off the devices and returns; orbax writes the files in a background
thread and commits the step atomically (a step directory appears whole or not at all), so the
training loop goes on while the checkpoint is written. What is saved:

- every leaf of the state pytree (params, optimizer state, step counters, ``ts.PerReplica``
  leaves, typed random keys made by ``jax.random.key``), each under its pytree path;
- the position of a ``ts.DistributedIterator``, one small JSON file per process.

A restore takes a target: the state as the new strategy would build it, or its abstract form
(``jax.ShapeDtypeStruct`` leaves, from ``jax.eval_shape``). Every array lands with the target's
sharding on the new strategy's mesh, so restoring onto another mesh shape, fewer devices or
another number of processes reads only the shards each process holds. A ``PerReplica`` leaf
restores onto a strategy with the same number of replicas.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tpustrat import _mesh
from tpustrat._checks import check_int
from tpustrat._prefetch import DistributedIterator
from tpustrat._strategy import TPUStrategy
from tpustrat._values import PerReplica, is_per_replica

PyTree = Any

_STATE = "state"
_LEAVES = "leaves"
_INPUT = "input"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the training state in memory is untouched."""


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One leaf of a state: its name in the checkpoint and how it is stored."""

    name: str
    kind: str  # "array" (a jax.Array), "per_replica" (a PerReplica's stacked array), "host"
    key_impl: str | None  # the PRNG implementation of a typed key, stored as its key data


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise ImportError(
            "ts.CheckpointManager writes checkpoints with orbax-checkpoint, which is not "
            "installed; pip install 'tpustrat[checkpoint]' (or orbax-checkpoint)"
        ) from None
    return ocp


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

    Raises:
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
    ):
        ocp = _orbax()
        if not isinstance(strategy, TPUStrategy):
            raise TypeError(
                f"strategy must be a ts.TPUStrategy (whose mesh restored arrays go on), got "
                f"{type(strategy).__name__}"
            )
        if max_to_keep is not None:
            check_int("max_to_keep", max_to_keep, minimum=1)
        check_int("save_interval_steps", save_interval_steps, minimum=1)
        self._directory = Path(directory).absolute()
        self._strategy = strategy
        self._save_interval_steps = save_interval_steps
        self._ocp = ocp
        handlers = ocp.handlers
        registry = handlers.DefaultCheckpointHandlerRegistry()
        state = handlers.StandardCheckpointHandler()
        leaves = handlers.JsonCheckpointHandler(filename="leaves.json")
        # One file per process: a per-process input pipeline has its own position.
        position = handlers.JsonCheckpointHandler(
            filename=_input_file(jax.process_index(), jax.process_count()),
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None),
        )
        for name, handler, save, restore in (
            (_STATE, state, ocp.args.StandardSave, ocp.args.StandardRestore),
            (_LEAVES, leaves, ocp.args.JsonSave, ocp.args.JsonRestore),
            (_INPUT, position, ocp.args.JsonSave, ocp.args.JsonRestore),
        ):
            registry.add(name, save, handler)
            registry.add(name, restore, handler)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,
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

    @property
    def directory(self) -> Path:
        """The directory holding one subdirectory per saved step."""
        return self._directory

    def latest_step(self) -> int | None:
        """The newest step saved (its write may still be running), or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, oldest first (the last one's write may still be running)."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` would write (``step`` is on the save interval)."""
        return step % self._save_interval_steps == 0 and step not in self._manager.all_steps()

    def reached_preemption(self, step: int) -> bool:
        """Whether every process of a multi-process job has agreed to stop at ``step``.

        JAX's preemption service (on with ``jax.distributed``) notices SIGTERM on any process
        and picks the next step every process can reach; call this at every step, with
        increasing steps, on every process. Always False in a single process: there
        ``ts.PreemptionCheckpointHandler`` watches SIGTERM itself.
        """
        return self._manager.reached_preemption(step)

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
          Whether a save was started (False off the interval, or if ``step`` is saved already).

        Raises:
          TypeError: a leaf of ``state`` cannot be saved (the message names it).
          CheckpointError: the directory cannot be written (full, removed, no permission); the
            message says which step. ``state`` is untouched and can be saved again.
        """
        check_int("step", step, minimum=0)
        leaves, arrays = _saved_arrays(state)
        position = None
        if iterator is not None:
            position = _check_iterator(iterator).get_state()
        if step in self._manager.all_steps() or not (
            force or step % self._save_interval_steps == 0
        ):
            return False
        if not (self._directory.is_dir() and os.access(self._directory, os.W_OK | os.X_OK)):
            # Checked first: orbax, failing to make the step directory, leaves threads waiting.
            raise self._write_error(
                FileNotFoundError(f"{self._directory} is not a writable directory"),
                f"saving step {step}",
            )
        ocp = self._ocp
        items = {
            _STATE: ocp.args.StandardSave(arrays),
            _LEAVES: ocp.args.JsonSave(
                {
                    "leaves": [dataclasses.asdict(leaf) for leaf in leaves],
                    "input_processes": None if position is None else jax.process_count(),
                }
            ),
        }
        if position is not None:
            items[_INPUT] = ocp.args.JsonSave(position)
        try:
            # The interval is decided above; orbax's own policy would also save the first step.
            return self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:
            raise self._write_error(error, f"saving step {step}") from error

    def wait_until_finished(self) -> None:
        """Blocks until the last save is committed.

        Raises:
          CheckpointError: if writing it failed; the training state in memory is untouched.
        """
        try:
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
          ValueError: no checkpoint exists; the saved tree differs from ``target`` (the
            message lists the leaves that differ); a PerReplica leaf was saved over another
            number of replicas than this strategy has.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise ValueError(
                    f"no checkpoint to restore in {self._directory}; save one first, or start "
                    "from the initial state when latest_step() is None"
                )
        elif step not in self._manager.all_steps():
            raise ValueError(
                f"no checkpoint of step {step} in {self._directory}; it has steps "
                f"{self.all_steps()}"
            )
        ocp = self._ocp
        saved = self._manager.restore(
            step, args=ocp.args.Composite(**{_LEAVES: ocp.args.JsonRestore()})
        )
        saved_leaves = {leaf["name"]: _Leaf(**leaf) for leaf in saved[_LEAVES]["leaves"]}
        metadata = self._manager.item_metadata(step)[_STATE]
        saved_arrays = dict(getattr(metadata, "tree", metadata))
        plan = _RestorePlan(target, self._strategy, step)
        plan.check(saved_leaves, saved_arrays)
        if iterator is not None:
            _check_iterator(iterator)
            iterator.set_state(self._position(step, saved[_LEAVES]["input_processes"]))
        items = {_STATE: ocp.args.StandardRestore(plan.abstract)}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except OSError as error:
            raise CheckpointError(
                f"reading checkpoint step {step} from {self._directory} failed ({error})"
            ) from error
        return plan.rebuild(restored[_STATE])

    def _position(self, step: int, input_processes: int | None) -> dict[str, Any]:
        """This process's saved input position; any process's if they all saved the same."""
        if input_processes is None:
            raise ValueError(
                f"checkpoint step {step} in {self._directory} has no input position (it was "
                "saved without iterator=); restore without iterator= and start the input anew"
            )
        count, index = jax.process_count(), jax.process_index()
        folder = self._directory / str(step) / _INPUT
        if input_processes == count:
            return _read_json(folder / _input_file(index, count))
        positions = [
            _read_json(folder / _input_file(i, input_processes)) for i in range(input_processes)
        ]
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
        """Waits for the last save and releases orbax's threads."""
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()

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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise CheckpointError(
            f"cannot read the input position {path} ({error}); the checkpoint is incomplete"
        ) from error


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


def _named_leaves(state: PyTree) -> list[tuple[str, str, Any]]:
    """(name, kind, value) for every leaf; a PerReplica's leaf is its stacked array.

    Names are the pytree paths joined by dots (``params.Dense_0.kernel``).
    """
    named, seen = [], {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_per_replica)[0]:
        if isinstance(leaf, PerReplica):
            entries = [(path, "per_replica", leaf.stacked)]
        else:
            is_array = isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct))
            entries = [(path, "array" if is_array else "host", leaf)]
        for full_path, kind, value in entries:
            name = jax.tree_util.keystr(full_path, simple=True, separator=".") or "(root)"
            if name in seen:
                raise ValueError(
                    f"state leaves {seen[name]} and {jax.tree_util.keystr(full_path)} would both "
                    f"be saved as {name!r}; rename a key so that the dotted paths differ"
                )
            seen[name] = jax.tree_util.keystr(full_path)
            named.append((name, kind, value))
    return named


def _saved_arrays(state: PyTree) -> tuple[list[_Leaf], dict[str, Any]]:
    """The leaf records and the flat ``{name: array}`` dict that orbax writes."""
    leaves, arrays = [], {}
    for name, kind, value in _named_leaves(state):
        key_impl = None
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
        leaves.append(_Leaf(name, kind, key_impl))
        arrays[name] = value
    return leaves, arrays


class _RestorePlan:
    """The abstract arrays orbax restores into, and how to rebuild the target's structure."""

    def __init__(self, target: PyTree, strategy: TPUStrategy, step: int):
        self._strategy = strategy
        self._step = step
        self._treedef = jax.tree.structure(target, is_leaf=is_per_replica)
        self._target_leaves = jax.tree.leaves(target, is_leaf=is_per_replica)
        self._named = _named_leaves(target)
        self.abstract = {name: self._abstract(name, kind, x) for name, kind, x in self._named}

    def _abstract(self, name: str, kind: str, leaf: Any) -> Any:
        mesh = _placement_mesh(self._strategy)
        if kind == "host":
            return _host_array(leaf)
        if kind == "per_replica":
            n = self._strategy.num_replicas_in_sync
            if np.shape(leaf)[0] != n:
                raise ValueError(
                    f"target leaf {name!r} is a PerReplica over {np.shape(leaf)[0]} replicas but "
                    f"the strategy has {n}; build the target with this strategy"
                )
            sharding = _mesh.per_replica_sharding(mesh)
        else:
            sharding = _target_sharding(name, getattr(leaf, "sharding", None), self._strategy)
        shape, dtype = np.shape(leaf), leaf.dtype
        if _is_key(leaf):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
            spec = PartitionSpec(*sharding.spec, *[None] * (len(data.shape) - len(shape)))
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding.update(spec=spec))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def check(self, saved: Mapping[str, _Leaf], arrays: Mapping[str, Any]) -> None:
        """Raises a ValueError naming every leaf that differs between checkpoint and target."""
        wanted = {name: kind for name, kind, _ in self._named}
        missing = sorted(set(wanted) - set(saved))
        extra = sorted(set(saved) - set(wanted))
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
        for name, kind, leaf in self._named:
            record, stored = saved[name], arrays[name]
            want = self.abstract[name]
            if record.kind == kind == "per_replica" and stored.shape[0] != want.shape[0]:
                raise ValueError(
                    f"state leaf {name!r} is a PerReplica saved over {stored.shape[0]} "
                    f"replicas but this strategy has {want.shape[0]}; restore it onto a "
                    f"strategy with {stored.shape[0]} replicas (or drop the leaf and rebuild "
                    "it per replica)"
                )
            impl = _key_impl(leaf) if _is_key(leaf) else None
            if record.key_impl != impl:
                problems.append(
                    f"{name} (random key implementation saved {record.key_impl}, target {impl})"
                )
            elif tuple(stored.shape) != tuple(want.shape) or np.dtype(stored.dtype) != np.dtype(
                want.dtype
            ):
                problems.append(
                    f"{name} (saved {np.dtype(stored.dtype)}{list(stored.shape)}, target "
                    f"{np.dtype(want.dtype)}{list(want.shape)})"
                )
        if problems:
            raise ValueError(
                f"checkpoint step {self._step} does not match the target: leaves "
                f"{', '.join(problems)}; restore into a target with the saved shapes and dtypes"
            )

    def rebuild(self, restored: Mapping[str, Any]) -> PyTree:
        """The target's structure with the restored arrays."""
        names = iter(name for name, _, _ in self._named)
        leaves = []
        for leaf in self._target_leaves:
            if isinstance(leaf, PerReplica):
                inner = jax.tree.structure(leaf)  # unflattening keeps abstract targets working
                leaves.append(
                    inner.unflatten([restored[next(names)] for _ in range(inner.num_leaves)])
                )
            else:
                leaves.append(_like(leaf, restored[next(names)]))
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


def _placement_mesh(strategy: TPUStrategy) -> Mesh:
    """The mesh the strategy places arrays on (``replicate``, ``run``): ``strategy.mesh`` with
    its logical cores factored into sub-axes, the same devices."""
    return strategy._mesh


def _target_sharding(name: str, sharding: Any, strategy: TPUStrategy) -> NamedSharding:
    """The target's sharding moved onto the strategy's mesh; replicated if it has none."""
    mesh = _placement_mesh(strategy)
    if not isinstance(sharding, NamedSharding):
        return _mesh.replicated_sharding(mesh)
    axes = _mesh.spec_axes(sharding.spec)
    for candidate in (mesh, strategy.mesh):
        if axes <= set(candidate.axis_names):
            return NamedSharding(candidate, sharding.spec)
    raise ValueError(
        f"target leaf {name!r} is sharded as {sharding.spec} over axes the strategy's mesh "
        f"{dict(strategy.mesh.shape)} does not have; give it a sharding over this strategy's "
        "mesh"
    )
