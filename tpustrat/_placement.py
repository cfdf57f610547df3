"""Checking ``run``'s arguments and placing them on the mesh."""

from __future__ import annotations

import collections
import operator
import weakref
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tpustrat._checks import check_tree
from tpustrat._mesh import REPLICA_AXIS, spec_axes
from tpustrat._types import PyTree
from tpustrat._values import Mirrored, PerReplica, is_distributed, put, unwrap_mirrored

ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, int, float, bool, complex)


class DonationRecord:
    """The arrays a strategy has donated, so that passing one again is a clear error.

    JAX marks a donated array deleted, but only once the program that consumes it has been
    dispatched, and on CPU a live ``np.asarray`` view can keep the buffer alive so that
    ``is_deleted()`` says False while the array is no longer safe to pass. The strategy knows
    what it donated: each entry holds a weak reference, so recording costs no memory.
    """

    def __init__(self):
        self._donated: dict[int, tuple[weakref.ref, str]] = {}

    def add(self, array: jax.Array, where: str) -> None:
        key = id(array)
        self._donated[key] = (weakref.ref(array, lambda _: self._donated.pop(key, None)), where)

    def add_survivors(self, args: tuple, donate_argnums: tuple[int, ...]) -> None:
        """Records the arrays of ``args[i]`` for each donated ``i`` that JAX did not delete.

        A deleted array needs no entry (``is_deleted`` tells); the survivors are the unsafe
        ones: buffers a host view kept alive, or that no output could reuse.
        """
        for i in donate_argnums:
            leaves = jax.tree.leaves(args[i])
            survivors = {id(x) for x in leaves if isinstance(x, jax.Array) and not x.is_deleted()}
            if not survivors:
                continue
            for path, leaf in jax.tree_util.tree_flatten_with_path(args[i])[0]:
                if id(leaf) in survivors:
                    self.add(leaf, f"args[{i}]{_path_name(path)}")

    def donated_as(self, array: Any) -> str | None:
        """Where ``array`` was donated (e.g. ``"args[0]['w']"``), or None if it never was."""
        entry = self._donated.get(id(array))
        if entry is not None and entry[0]() is array:
            return entry[1]
        return None

    def may_hold(self, leaves: list[Any]) -> bool:
        """Whether any of ``leaves`` may have been donated (cheap; ``donated_as`` decides)."""
        return bool(self._donated) and not self._donated.keys().isdisjoint(map(id, leaves))


class PlacedLayouts:
    """Input layouts that ``prepare`` found entirely in place, for a fast path on later calls.

    A training loop passes the same structure on every call, its leaves the arrays the last
    step returned, already where ``run`` wants them. Per pytree structure this remembers the
    sharding of every leaf and the block specs ``prepare`` derived; a later call whose leaves
    are concrete arrays with the very same shardings skips ``prepare``'s per-leaf checks and
    goes straight to ``jax.jit``, whose own C++ path checks shapes and dtypes (and ``run``
    reports what it refuses through ``prepare``). The number of remembered structures is
    bounded.
    """

    def __init__(self, maxsize: int = 64):
        self._maxsize = maxsize
        self._layouts: collections.OrderedDict[Any, tuple[tuple, Any]] = collections.OrderedDict()
        self._array_types: set[type] = set()

    def match(
        self, leaves: list[Any], structure: Any
    ) -> tuple[NamedSharding | None, ...] | bool | None:
        """The block specs remembered for this call's layout, or False when it is not known."""
        entry = self._layouts.get(structure)
        if entry is None or not self._array_types.issuperset(map(type, leaves)):
            return False
        shardings, block_specs = entry
        if not laid_out_as(leaves, shardings):
            return False
        return block_specs

    def remember(
        self,
        leaves: list[Any],
        structure: Any,
        block_specs: tuple[NamedSharding | None, ...] | None,
    ) -> None:
        """Records that ``leaves`` (concrete arrays, in place) needed nothing from ``prepare``."""
        types = set(map(type, leaves))
        if not all(issubclass(t, jax.Array) and not issubclass(t, jax.core.Tracer) for t in types):
            return
        self._array_types |= types
        self._layouts[structure] = (shardings_of(leaves), block_specs)
        self._layouts.move_to_end(structure)
        while len(self._layouts) > self._maxsize:
            self._layouts.popitem(last=False)


_SHARDING = operator.attrgetter("sharding")
_IS_DELETED = operator.methodcaller("is_deleted")


def shardings_of(leaves: list[Any]) -> tuple[Any, ...]:
    """The sharding of every leaf (concrete ``jax.Array`` s)."""
    return tuple(map(_SHARDING, leaves))


def laid_out_as(leaves: list[Any], shardings: tuple[Any, ...]) -> bool:
    """Whether ``leaves`` have exactly ``shardings`` (as from ``shardings_of``) and none is deleted.

    ``jax.jit``'s C++ path does not check for deleted buffers itself. Raises AttributeError
    for a leaf that is not a concrete ``jax.Array`` (a number, a tracer).
    """
    return tuple(map(_SHARDING, leaves)) == shardings and not any(map(_IS_DELETED, leaves))


def prepare(
    inputs: PyTree,
    num_replicas: int,
    per_replica: NamedSharding,
    replicated: NamedSharding,
    donated: DonationRecord,
    layouts: PlacedLayouts | None = None,
) -> tuple[PyTree, tuple[NamedSharding | None, ...] | None, bool]:
    """Checks ``run``'s ``(args, kwargs)`` and places them on the mesh.

    PerReplica leaves go to ``per_replica``; every other leaf is given whole to every replica
    and goes to ``replicated``, unless it is already on the strategy's mesh tiled over the
    logical cores, where it stays. A plain array split over the replica axis is refused: a
    plain array means the whole array, which ``jax.jit`` would give every replica, since the
    layout is not visible there (``PerReplica.from_blocks`` gives each replica its block).
    Host int64 leaves that do not fit the 32-bit integers of a job without x64 are refused.
    ``Mirrored`` markers are unwrapped. Leaves already in place are not copied; the tree is
    rebuilt only when something moved. When nothing moved, the layout is added to
    ``layouts`` for ``PlacedLayouts.match``.

    Returns:
      The placed inputs; for each of their leaves (PerReplica counting as one), on a mesh
      with several logical cores, the layout of a whole-array leaf (a NamedSharding, which
      outputs of the same place in the state keep: see ``_run.Step``), or None; None instead
      of that tuple when every entry would be None; and whether any leaf is traced (``run``
      inside the user's ``jax.jit``).
    """
    nodes, tree = jax.tree.flatten(inputs, is_leaf=is_distributed)
    moved = any(isinstance(node, Mirrored) for node in nodes)
    if moved:
        inputs = unwrap_mirrored(inputs)
        nodes, tree = jax.tree.flatten(inputs, is_leaf=is_distributed)
    traced = False
    model_parallel = replicated.mesh.devices.size > num_replicas
    placed_nodes, block_specs = [], []
    for index, node in enumerate(nodes):
        is_per_replica = isinstance(node, PerReplica)
        x = node.stacked if is_per_replica else node
        if is_per_replica and (np.ndim(x) == 0 or np.shape(x)[0] != num_replicas):
            raise ValueError(_count_mismatch(inputs, index, node.num_replicas, num_replicas))
        if isinstance(x, jax.core.Tracer):
            traced = True
            placed_nodes.append(node)
            continue
        if (where := donated.donated_as(x)) is not None or (
            isinstance(x, jax.Array) and x.is_deleted()
        ):
            name = _where(inputs, index)
            raise ValueError(
                f"{name} was donated to an earlier run call"
                + (f" (as {where})" if where and where != name else "")
                + " and its buffer is gone; pass the value that call returned instead"
            )
        elif not _is_placed(x, per_replica if is_per_replica else replicated, is_per_replica):
            if not isinstance(x, ARRAY_TYPES):
                raise TypeError(
                    f"{_where(inputs, index)} is a {type(x).__name__}; strategy.run passes only "
                    "arrays, numbers and pytrees of them (close over other values in the step "
                    "function instead)"
                )
            try:
                check_tree("", x)  # a Python int beyond int32, an array of strings
            except (TypeError, ValueError) as error:
                raise type(error)(f"{_where(inputs, index)}{error}") from None
            if isinstance(x, (np.ndarray, np.generic)) and x.dtype in _WIDE_INTEGERS:
                _check_fits_32_bits(inputs, index, x)
            x = put(x, per_replica if is_per_replica else replicated)  # typed keys too
            moved = True
            if model_parallel and not is_per_replica:
                block_specs.append((index, replicated))
        elif not is_per_replica and isinstance(x, jax.Array) and x.sharding != replicated:
            if split_over_replicas(x, replicated.mesh):
                raise ValueError(_split_message(inputs, index, x, num_replicas))
            if model_parallel and isinstance(x.sharding, NamedSharding):
                if x.sharding.mesh != replicated.mesh:  # held whole on another mesh's devices
                    x, moved = jax.device_put(x, replicated), True
                block_specs.append((index, x.sharding))
        elif model_parallel and not is_per_replica:
            block_specs.append((index, replicated))
        placed_nodes.append(PerReplica.from_stacked(x) if is_per_replica else x)
    specs = None
    if any(spec is not None for _, spec in block_specs):
        specs = [None] * len(nodes)
        for index, spec in block_specs:
            specs[index] = spec
        specs = tuple(specs)
    if traced or not moved:
        if not traced and layouts is not None:
            layouts.remember(*jax.tree.flatten(inputs), specs)
        return inputs, specs, traced
    return tree.unflatten(placed_nodes), specs, traced


def split_over_replicas(x: Any, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> bool:
    """Whether ``x`` is laid out over ``mesh``'s replica axis (of more than one replica).

    ``run`` refuses such a plain array, whose blocks differ between replicas: see ``prepare``.
    """
    sharding = getattr(x, "sharding", None)
    return (
        isinstance(sharding, NamedSharding)
        and mesh.shape[REPLICA_AXIS] > 1
        and sharding.mesh == mesh
        and REPLICA_AXIS in spec_axes(sharding.spec)
    )


def _split_message(inputs: PyTree, index: int, x: jax.Array, num_replicas: int) -> str:
    name = _where(inputs, index)
    spec = getattr(x.sharding, "spec", None)  # a NamedSharding's: split_over_replicas said so
    return (
        f"{name} is a plain array laid out over the replica axis ({spec}); run gives "
        "a plain array whole to every replica, as it must inside jax.jit, where the layout is "
        "not visible. To give each replica its block, pass ts.PerReplica.from_blocks(x, "
        f"{num_replicas}) (no data moves); to give every replica the whole array, pass "
        "strategy.replicate(x) or a host array"
    )


_WIDE_INTEGERS = frozenset({np.dtype(np.int64), np.dtype(np.uint64)})


def _check_fits_32_bits(inputs: PyTree, index: int, x: np.ndarray | np.generic) -> None:
    """Refuses a host int64 or uint64 leaf that JAX without x64 would wrap to 32 bits."""
    if x.size == 0 or jax.config.read("jax_enable_x64"):
        return
    narrow = np.iinfo(np.int32 if x.dtype.kind == "i" else np.uint32)
    low, high = x.min(), x.max()
    if low < narrow.min or high > narrow.max:
        seen = int(high if high > narrow.max else low)
        raise ValueError(
            f"{_where(inputs, index)} ({x.dtype}) holds {seen}, outside the "
            f"{narrow.dtype} range [{narrow.min}, {narrow.max}] that JAX uses while 64-bit "
            f"types are off, so its value would wrap; cast it to a type that holds it (e.g. "
            "float32 or an offset into int32), or enable them with "
            "jax.config.update('jax_enable_x64', True)"
        )


def _is_placed(x: Any, sharding: NamedSharding, per_replica: bool) -> bool:
    """Whether ``x`` can go into the program as it is.

    Besides the canonical layouts, an array on the strategy's own mesh may be tiled over the
    logical cores (a model-parallel parameter that ``run`` returned, say): the program takes
    it as it is, rather than gathering it first. (A plain array split over the replica axis
    counts as placed too, for ``prepare`` to refuse.)
    """
    if not isinstance(x, jax.Array):
        return False
    current = x.sharding
    if current == sharding:
        return True
    if isinstance(current, NamedSharding) and current.mesh == sharding.mesh:
        spec = tuple(current.spec)
        if not per_replica:
            return True
        if spec[:1] not in ((REPLICA_AXIS,), ((REPLICA_AXIS,),)):
            return False
        return REPLICA_AXIS not in spec_axes(PartitionSpec(*spec[1:]))
    return current.is_equivalent_to(sharding, x.ndim)


def _path_name(path: tuple) -> str:
    """``keystr`` of ``path`` without the step through a PerReplica or Mirrored to its value."""
    return jax.tree_util.keystr(tuple(k for k in path if not isinstance(k, _FLAT_INDEX)))


_FLAT_INDEX = jax.tree_util.FlattenedIndexKey


def _count_mismatch(inputs: PyTree, index: int, components: int, num_replicas: int) -> str:
    """Why leaf ``index``, a PerReplica of ``components``, cannot go to ``num_replicas``."""
    path = jax.tree_util.tree_flatten_with_path(inputs, is_leaf=is_distributed)[0][index][0]
    said = (
        f"{_where(inputs, index)} is a PerReplica with {components} components but the "
        f"strategy has {num_replicas} replicas"
    )
    if path and path[-1] == jax.tree_util.GetAttrKey("blocks"):  # a ts.ReplicaShard's blocks
        return (
            f"{said}: parameters or optimizer state sharded over {components} replicas (the "
            "blocks of a ts.ReplicaShard). Shard them for this strategy with "
            "ts.shard_params(ts.gather_params(params), strategy), or save them with "
            "ts.CheckpointManager and restore them with this strategy, which reshards"
        )
    return (
        f"{said}; build it with one component per replica, e.g. with "
        "strategy.experimental_distribute_values_from_function"
    )


def _where(inputs: PyTree, index: int) -> str:
    """The user's name for leaf ``index`` of ``(args, kwargs)``, e.g. ``args[0]['w']``."""
    path = jax.tree_util.tree_flatten_with_path(inputs, is_leaf=is_distributed)[0][index][0]
    return ("kwargs" if path[0].idx == 1 else "args") + jax.tree_util.keystr(path[1:])
