"""Distributed values: PerReplica (one component per replica) and the replicated-array model.

A value that is the same on every replica is a plain ``jax.Array`` replicated over the
strategy's mesh (``NamedSharding(mesh, P())``): it prints, serialises and checkpoints like any
array. A value with one component per replica is a ``PerReplica``: one global array whose
leading axis is the replica axis. ``Mirrored`` survives only as an input marker for code ported
from tf.distribute; ``run`` never returns one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, NoReturn, Self

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tpustrat import _mesh
from tpustrat._checks import check_int, check_leaf, check_tree, describe
from tpustrat._types import PyTree


@jax.tree_util.register_pytree_node_class
class PerReplica:
    """A value with one component per replica, as ``strategy.run`` returns a varying result.

    Stored as one global ``jax.Array`` whose leading axis is the replica axis (shape
    ``(num_replicas, *component_shape)``, sharded over ``"replica"``), so passing it back to
    ``run`` moves no data. A PerReplica holds one array, never a pytree: a structured value
    is a pytree with PerReplica leaves, as ``run`` and distributed datasets return it.

    Args:
      values: one array (or number) per replica, all of the same shape and dtype.

    Example:
      >>> v = PerReplica([np.float32(i) for i in range(4)])
      >>> v, v.num_replicas, float(v.values[3])
      (PerReplica(float32[4]), 4, 3.0)
    """

    __slots__ = ("stacked",)
    stacked: Any

    def __init__(self, values: Sequence[Any]) -> None:
        if isinstance(values, (PerReplica, Mirrored, str, bytes)) or not isinstance(
            values, Sequence
        ):
            raise TypeError(
                f"PerReplica values must be a sequence with one array per replica, got "
                f"{describe(values)}; e.g. ts.PerReplica([x0, x1, ...]), or "
                "ts.PerReplica.from_stacked(x) for an array whose leading axis is the replicas"
            )
        if not values:
            raise ValueError("PerReplica values is empty; pass one array per replica")
        for i, v in enumerate(values):
            if not _is_array_leaf(v):
                raise TypeError(
                    f"PerReplica values[{i}] is a {type(v).__name__}; a PerReplica holds one "
                    "array per replica. For a pytree, build one PerReplica per leaf, e.g. with "
                    "strategy.experimental_distribute_values_from_function"
                )
            check_leaf(f"PerReplica values[{i}]", v)
        shapes = {(np.shape(v), _dtype(v)) for v in values}
        if len(shapes) > 1:
            raise ValueError(
                f"PerReplica components differ in shape or dtype: {sorted(map(str, shapes))}; "
                "every replica's component must have the same shape and dtype"
            )
        object.__setattr__(self, "stacked", _stack(values))

    @classmethod
    def from_stacked(cls, stacked: Any) -> PerReplica:
        """Wraps an array whose leading axis is the replica axis, without copying."""
        if not _is_array_leaf(stacked):
            raise TypeError(
                f"PerReplica.from_stacked takes one array, got a {type(stacked).__name__}; for "
                "a pytree, wrap each leaf: jax.tree.map(ts.PerReplica.from_stacked, tree)"
            )
        value = object.__new__(cls)
        object.__setattr__(value, "stacked", stacked)
        return value

    @classmethod
    def from_blocks(cls, array: Any, num_replicas: int, axis: int = 0) -> PerReplica:
        """Views ``array`` as ``num_replicas`` blocks along ``axis``: component i is block i.

        This is how to give each replica its block of a global array in ``strategy.run``, the
        same plain and inside ``jax.jit`` (a plain array goes whole to every replica). For an
        array laid out over the replica axis (``NamedSharding(strategy.mesh, P("replica"))``)
        every device already holds its replica's block: no data moves between devices, and
        inside ``jax.jit`` the view compiles to nothing.

        Args:
          array: a ``jax.Array`` (or host array) whose ``axis`` divides into ``num_replicas``.
          num_replicas: ``strategy.num_replicas_in_sync``.
          axis: the dimension cut into blocks.

        Example:
          >>> strategy = ts.TPUStrategy()
          >>> x = jax.device_put(np.arange(16.0, dtype=np.float32), jax.sharding.NamedSharding(
          ...     strategy.mesh, jax.sharding.PartitionSpec("replica")))
          >>> blocks = PerReplica.from_blocks(x, strategy.num_replicas_in_sync)
          >>> blocks, blocks.values[1].tolist()
          (PerReplica(float32[8, 2]), [2.0, 3.0])
        """
        if not _is_array_leaf(array) or isinstance(array, (int, float, bool, complex)):
            raise TypeError(
                f"PerReplica.from_blocks takes one array, got a {type(array).__name__}; for a "
                "pytree, view each leaf: jax.tree.map(lambda x: ts.PerReplica.from_blocks(x, n), "
                "tree)"
            )
        check_leaf("array", array)
        num_replicas = check_int("num_replicas", num_replicas, minimum=1)
        axis = check_int("axis", axis, minimum=-len(np.shape(array)))
        shape = np.shape(array)
        if not -len(shape) <= axis < len(shape):
            raise ValueError(
                f"PerReplica.from_blocks: axis {axis} is out of range for an array of shape "
                f"{shape}; pass the axis that is split over the replicas"
            )
        axis %= len(shape)
        if shape[axis] % num_replicas:
            raise ValueError(
                f"PerReplica.from_blocks: dimension {axis} of shape {shape} does not divide into "
                f"{num_replicas} replicas; pass strategy.num_replicas_in_sync and an array whose "
                f"axis {axis} (the global batch) is a multiple of it"
            )
        split = (*shape[:axis], num_replicas, shape[axis] // num_replicas, *shape[axis + 1 :])
        if isinstance(array, (np.ndarray, np.generic)):
            return cls.from_stacked(np.moveaxis(np.reshape(array, split), axis, 0))
        return cls.from_stacked(jnp.moveaxis(jnp.reshape(array, split), axis, 0))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"PerReplica is immutable; build a new one instead of setting {name}")

    @property
    def num_replicas(self) -> int:
        """The number of components (the length of the leading axis)."""
        return int(np.shape(self.stacked)[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one replica's component."""
        return tuple(np.shape(self.stacked)[1:])

    @property
    def dtype(self) -> Any:
        """The dtype of every component."""
        return _dtype(self.stacked)

    @property
    def values(self) -> tuple[Any, ...]:
        """The components, in replica order, each on its replica's devices.

        Raises:
          ValueError: in a job of several processes, where some replicas live on devices this
            process cannot address.
        """
        components = replica_components(self.stacked)
        missing = [r for r in range(self.num_replicas) if r not in components]
        if missing:
            raise _non_local(missing[0])
        return tuple(components[r] for r in range(self.num_replicas))

    @property
    def value(self) -> NoReturn:
        raise AttributeError(
            f"{self!r} has one value per replica, so it has no single .value (that is a "
            "replicated result's property). Combine the replicas inside the step with "
            "ts.get_replica_context().all_reduce, or outside it with strategy.reduce / "
            "strategy.gather, or read each replica's value with "
            "strategy.experimental_local_results"
        )

    def tree_flatten(self) -> tuple[tuple[Any], None]:
        return (self.stacked,), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: Sequence[Any]) -> Self:
        del aux
        value = object.__new__(cls)  # JAX unflattens with any leaf (None, specs): no checks
        object.__setattr__(value, "stacked", children[0])
        return value

    def __repr__(self) -> str:
        return f"PerReplica({_describe(self.stacked)})"


@jax.tree_util.register_pytree_node_class
class Mirrored:
    """Marks a value as the same on every replica, for code ported from tf.distribute.

    Part of ``tpustrat.compat``. Replicated values are plain ``jax.Array`` s in tpustrat:
    ``run`` and ``strategy.replicate`` return them unwrapped, and ``run`` gives every replica
    the whole of a bare pytree. ``run`` accepts ``Mirrored(tree)`` exactly as it would the bare
    ``tree``. A ``Mirrored`` is immutable: make a new one to mark another value.

    Example:
      >>> strategy = ts.TPUStrategy()
      >>> float(strategy.run(lambda x: x * 2, args=(Mirrored(np.float32(2.0)),)))
      4.0
    """

    __slots__ = ("value",)
    value: PyTree

    def __init__(self, value: PyTree) -> None:
        if isinstance(value, (PerReplica, Mirrored)):
            raise TypeError(
                f"Mirrored value cannot be a {type(value).__name__}: it marks a value that is "
                "the same on every replica; pass the plain pytree of arrays"
            )
        check_tree("Mirrored value", value)
        object.__setattr__(self, "value", value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(
            f"Mirrored is immutable; make a new one (ts.Mirrored(new_value)) instead of setting "
            f"{name}"
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Mirrored is immutable; make a new one instead of deleting {name}")

    def tree_flatten(self) -> tuple[tuple[PyTree], None]:
        return (self.value,), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: Sequence[PyTree]) -> Self:
        del aux
        value = object.__new__(cls)
        object.__setattr__(value, "value", children[0])
        return value

    def __repr__(self) -> str:
        return f"Mirrored({_describe(self.value)})"


class _ValueContextFields(NamedTuple):
    replica_id_in_sync_group: int
    num_replicas_in_sync: int


class ValueContext(_ValueContextFields):
    """What ``experimental_distribute_values_from_function`` tells ``value_fn`` about a replica.

    Example:
      >>> ValueContext(3, 8).replica_id_in_sync_group
      3
    """

    __slots__ = ()

    def __new__(cls, replica_id_in_sync_group: int = 0, num_replicas_in_sync: int = 1) -> Self:
        replicas = check_int("num_replicas_in_sync", num_replicas_in_sync, minimum=1)
        replica = check_int("replica_id_in_sync_group", replica_id_in_sync_group, minimum=0)
        if replica >= replicas:
            raise ValueError(
                f"replica_id_in_sync_group {replica} is out of range for {replicas} replicas; "
                f"pass a replica in [0, {replicas})"
            )
        return super().__new__(cls, replica, replicas)


def is_per_replica(x: Any) -> bool:
    """True for a PerReplica; use as ``is_leaf`` to stop at PerReplica nodes in a pytree."""
    return isinstance(x, PerReplica)


def is_distributed(x: Any) -> bool:
    """True for PerReplica and Mirrored; use as ``is_leaf`` to stop at them in a pytree."""
    return isinstance(x, (PerReplica, Mirrored))


def unwrap_mirrored(tree: PyTree) -> PyTree:
    """``tree`` with every ``Mirrored`` marker replaced by the value it marks (``tree`` if none)."""
    if not any(isinstance(x, Mirrored) for x in jax.tree.leaves(tree, is_leaf=is_distributed)):
        return tree
    return jax.tree.map(
        lambda x: x.value if isinstance(x, Mirrored) else x, tree, is_leaf=is_distributed
    )


def place_per_replica(components: Mapping[int, PyTree], mesh: Mesh) -> PyTree:
    """Builds a pytree of PerReplica on ``mesh`` from host components, one per replica.

    Each device receives only its own replica's component, so in a job of several processes a
    process passes just the replicas whose devices it can address.

    Args:
      components: replica index to that replica's pytree, for every addressable replica.
      mesh: the strategy's mesh.

    Returns:
      The components' structure with PerReplica leaves, each a global array of shape
      ``(num_replicas, *component_shape)``.
    """
    num_replicas = mesh.shape[_mesh.REPLICA_AXIS]
    local = local_replicas(mesh)
    missing = sorted(set(local) - set(components))
    if missing:
        raise ValueError(f"no component was given for local replicas {missing}")
    first = components[local[0]]
    structure = jax.tree.structure(first)
    leaves_by_replica = {}
    for r in local:
        leaves, tree = jax.tree.flatten(components[r])
        if tree != structure:
            raise ValueError(
                f"replica {r}'s value has structure {tree} but replica {local[0]}'s has "
                f"{structure}; every replica must produce the same structure"
            )
        leaves_by_replica[r] = [_host_copy(leaf) for leaf in leaves]
    sharding = _mesh.per_replica_sharding(mesh)
    stacked = []
    for k, leaf in enumerate(leaves_by_replica[local[0]]):
        for r in local:
            other = leaves_by_replica[r][k]
            if np.shape(other) != np.shape(leaf) or _dtype(other) != _dtype(leaf):
                raise ValueError(
                    f"replica {r}'s leaf {k} is {_dtype(other)}{list(np.shape(other))} but "
                    f"replica {local[0]}'s is {_dtype(leaf)}{list(np.shape(leaf))}; every "
                    "replica's value must have the same shapes and dtypes"
                )
        rows = [leaves_by_replica[r][k] for r in local]
        global_shape = (num_replicas, *np.shape(leaf))
        if is_key(leaf):  # one transfer of the key data, wrapped back into keys
            data = np.stack([np.asarray(jax.random.key_data(x)) for x in rows])
            placed = jax.make_array_from_process_local_data(
                sharding, data, (*global_shape, *data.shape[1 + leaf.ndim :])
            )
            placed = jax.random.wrap_key_data(placed, impl=jax.random.key_impl(leaf))
        else:  # one transfer: each device receives its replica's row
            placed = jax.make_array_from_process_local_data(sharding, np.stack(rows), global_shape)
        stacked.append(PerReplica.from_stacked(placed))
    return structure.unflatten(stacked)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """``tree`` with every leaf a ``jax.Array`` held whole by every device of ``mesh``.

    The structure is ``tree``'s own (a dict stays a dict, a flax ``TrainState`` a
    ``TrainState``); ``Mirrored`` markers are unwrapped, and leaves already replicated on
    ``mesh`` are not copied.
    """
    sharding = _mesh.replicated_sharding(mesh)

    def place(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        return put(_host_copy(x) if isinstance(x, np.ndarray) else x, sharding)

    return jax.tree.map(place, unwrap_mirrored(tree))


def put(x: Any, sharding: jax.sharding.Sharding) -> Any:
    """``jax.device_put(x, sharding)``, also from one process to a sharding over several.

    In a job of several processes, ``jax.device_put`` cannot move a typed key, or an array on
    this process's devices, to devices of other processes. Such a value (the same in every
    process, as ``replicate`` and ``run``'s replicated arguments require) goes through the
    host instead: each process places its own devices' part.
    """
    if (
        sharding.is_fully_addressable
        or not isinstance(x, jax.Array)
        or isinstance(x, jax.core.Tracer)
        or not x.is_fully_addressable
    ):
        return jax.device_put(x, sharding)
    if is_key(x):
        data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)


def check_array_leaves(call: str, tree: PyTree, argument: str = "value") -> None:
    """Raises a TypeError naming ``call``, ``argument`` and the leaf unless every leaf of
    ``tree`` is an array, a number or a PerReplica (``Mirrored`` markers are looked into).

    An iterator, a deleted array or a Python int beyond int32 is refused first, by
    ``_checks.check_leaf``, with the leaf's path under ``argument``.
    """
    raw = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: is_distributed(x) or isinstance(x, Iterator)
    )
    for path, leaf in raw[0]:
        if not is_distributed(leaf):
            check_leaf(argument + jax.tree_util.keystr(path), leaf)
    leaves = jax.tree_util.tree_flatten_with_path(unwrap_mirrored(tree), is_leaf=is_per_replica)
    for path, leaf in leaves[0]:
        if not isinstance(leaf, PerReplica) and not _is_numeric(leaf):
            raise TypeError(
                f"strategy.{call} got {argument}{jax.tree_util.keystr(path)} = {leaf!r:.60}, "
                f"of type {type(leaf).__name__}, which JAX cannot hold; pass arrays and "
                "numbers, or pytrees of them (a dict, a list, a flax TrainState)"
            )


def local_replicas(mesh: Mesh) -> list[int]:
    """The replicas of ``mesh`` whose devices this process addresses, in order."""
    return sorted({r for r, _ in _addressable_devices(mesh)})


def map_distributed(
    tree: PyTree,
    per_replica: Callable[[jax.Array], Any],
    replicated: Callable[[Any], Any],
) -> PyTree:
    """Applies ``per_replica`` to stacked PerReplica arrays and ``replicated`` to other leaves.

    Leaves that are not PerReplica (plain arrays, ``Mirrored`` markers) count as the same on
    every replica. The result holds plain values, without PerReplica or Mirrored nodes.
    """

    def visit(node):
        if isinstance(node, PerReplica):
            return per_replica(node.stacked)
        return replicated(node)

    return jax.tree.map(visit, unwrap_mirrored(tree), is_leaf=is_per_replica)


def local_components(stacked: Any) -> dict[int, np.ndarray]:
    """Each addressable replica's component of a stacked array, as host arrays.

    Reads the shards this process holds in one batched transfer and compiles nothing: indexing
    the global array instead would compile a program per replica, which at hundreds of devices
    costs seconds.

    Args:
      stacked: a PerReplica's array (leading axis over replicas), or a host array.

    Returns:
      Replica index to its component, for every replica whose devices this process addresses.
    """
    if not isinstance(stacked, jax.Array):
        return dict(enumerate(np.asarray(stacked)))
    key = is_key(stacked)
    if stacked.is_fully_addressable:  # one process: one fetch of the whole array
        return dict(enumerate(np.asarray(jax.random.key_data(stacked) if key else stacked)))
    num_replicas = stacked.shape[0]
    shards = stacked.addressable_shards
    arrays = [jax.random.key_data(s.data) if key else s.data for s in shards]
    components: dict[int, np.ndarray] = {}
    for shard, data in zip(shards, jax.device_get(arrays)):
        start, stop, _ = shard.index[0].indices(num_replicas)
        for replica in range(start, stop):
            if replica not in components:
                components[replica] = np.empty(
                    (*stacked.shape[1:], *data.shape[stacked.ndim :]), data.dtype
                )
            components[replica][shard.index[1:]] = data[replica - start]
    return components


def replica_components(stacked: Any) -> dict[int, Any]:
    """Each addressable replica's component, on that replica's devices (see local_components).

    The components go back to their replicas' devices (replicated over the replica's logical
    cores) in one batched ``device_put``; a typed key component stays a typed key.
    """
    if not isinstance(stacked, jax.Array) or isinstance(stacked, jax.core.Tracer):
        return {r: stacked[r] for r in range(np.shape(stacked)[0])}
    if (
        stacked.is_fully_addressable
        and stacked.ndim >= 2
        and stacked.shape[1]
        and not is_key(stacked)
        and isinstance(stacked.sharding, jax.sharding.NamedSharding)
    ):
        return _components_from_one_transfer(stacked)
    devices: dict[int, list[jax.Device]] = {}
    for shard in stacked.addressable_shards:
        start, stop, _ = shard.index[0].indices(stacked.shape[0])
        for replica in range(start, stop):
            devices.setdefault(replica, []).append(shard.device)
    host = local_components(stacked)
    replicas = sorted(host)
    placed = jax.device_put(
        [host[r] for r in replicas], [_replica_sharding(tuple(devices[r])) for r in replicas]
    )
    if is_key(stacked):
        impl = jax.random.key_impl(stacked)
        placed = [jax.random.wrap_key_data(x, impl=impl) for x in placed]
    return dict(zip(replicas, placed))


def _components_from_one_transfer(stacked: jax.Array) -> dict[int, jax.Array]:
    """``replica_components`` of a one-process array whose components have rank >= 1.

    The host copy ``(R, n, ...)`` goes back as one array ``(R * n, ...)`` split over the
    replicas (a single transfer), whose shard on each device is exactly that replica's
    component: the components are those shards, assembled without a copy.
    """
    sharding = stacked.sharding
    assert isinstance(sharding, jax.sharding.NamedSharding)  # replica_components checked it
    rows = stacked.shape[1]
    merged = jax.device_put(
        np.asarray(stacked).reshape(-1, *stacked.shape[2:]),
        jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(_mesh.REPLICA_AXIS)),
    )
    shards: dict[int, list[jax.Array]] = {}
    for shard in merged.addressable_shards:
        shards.setdefault((shard.index[0].start or 0) // rows, []).append(shard.data)
    return {
        r: data[0]
        if len(data) == 1
        else jax.make_array_from_single_device_arrays(
            data[0].shape, _replica_sharding(tuple(d.device for d in data)), data
        )
        for r, data in shards.items()
    }


@functools.lru_cache(maxsize=4096)
def _replica_sharding(devices: tuple[jax.Device, ...]) -> jax.sharding.Sharding:
    """A value held whole by each of one replica's devices."""
    if len(devices) == 1:
        return jax.sharding.SingleDeviceSharding(devices[0])
    mesh = Mesh(np.array(devices), ("replica_devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _non_local(replica: int) -> ValueError:
    return ValueError(
        f"replica {replica} lives on devices of another process, so this process cannot read "
        "its component; use strategy.experimental_local_results for this process's replicas, "
        "or strategy.gather for every replica's"
    )


def _addressable_devices(mesh: Mesh) -> list[tuple[int, jax.Device]]:
    """(replica index, device) for each device of ``mesh`` this process addresses."""
    pid = jax.process_index()
    return [
        (index[0], device)
        for index, device in np.ndenumerate(mesh.devices)
        if device.process_index == pid
    ]


def _is_numeric(x: Any) -> bool:
    """Whether JAX can hold ``x``: a ``jax.Array``, a number, or a numeric or bool numpy value."""
    if isinstance(x, (np.ndarray, np.generic)):
        return x.dtype == np.bool_ or jnp.issubdtype(x.dtype, np.number)
    return isinstance(x, (jax.Array, int, float, complex))


def _is_array_leaf(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, bool, complex))


def is_key(x: Any) -> bool:
    """Whether ``x`` is a typed PRNG key array (``jax.random.key``), which numpy cannot hold."""
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host_copy(x: Any) -> Any:
    """A private copy of ``x`` (typed keys stay jax arrays; numpy cannot hold them).

    A copy because on CPU ``device_put`` may alias a numpy buffer the caller goes on to change.
    """
    return x if is_key(x) or isinstance(x, jax.core.Tracer) else np.array(x)


def _dtype(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _stack(xs: Sequence[Any]) -> Any:
    if any(isinstance(x, jax.core.Tracer) or is_key(x) for x in xs):
        return jnp.stack(xs)
    return np.stack([np.asarray(x) for x in xs])


def _describe(tree: PyTree) -> str:
    def short(x):
        shape = np.shape(x) if not is_key(x) else x.shape
        return f"{_dtype(x)}{list(shape)}"

    if isinstance(tree, (jax.Array, np.ndarray, np.generic)):
        return short(tree)
    return str(jax.tree.map(short, tree))
