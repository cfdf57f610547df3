"""Distributed values: PerReplica (one component per replica) and Mirrored (one value for all)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from tpustrat import _mesh

PyTree = Any


@jax.tree_util.register_pytree_node_class
class PerReplica:
    """A value with one component per replica, as returned by ``strategy.run``.

    Stored as one global ``jax.Array`` per leaf whose leading axis is the replica axis (shape
    ``(num_replicas, *component_shape)``, sharded over ``"replica"``), so passing it back to
    ``run`` moves no data. ``values`` gives the components one by one.

    Args:
      values: a sequence of pytrees, one per replica, all of the same structure, shapes and dtypes.

    Example:
      >>> v = PerReplica([np.float32(i) for i in range(4)])
      >>> v.num_replicas, float(v.values[3])
      (4, 3.0)
    """

    __slots__ = ("stacked",)

    def __init__(self, values: Sequence[PyTree]):
        if isinstance(values, (PerReplica, Mirrored)) or not isinstance(values, Sequence):
            raise TypeError(
                f"PerReplica takes a sequence with one pytree per replica, got "
                f"{type(values).__name__}"
            )
        if not values:
            raise ValueError("PerReplica got no components; pass one pytree per replica")
        structures = [jax.tree.structure(v) for v in values]
        for i, structure in enumerate(structures):
            if structure != structures[0]:
                raise ValueError(
                    f"PerReplica component {i} has structure {structure}, component 0 has "
                    f"{structures[0]}; every replica's component must have the same structure"
                )
        self.stacked = jax.tree.map(lambda *xs: _stack(xs), *values)

    @classmethod
    def from_stacked(cls, stacked: PyTree) -> PerReplica:
        """Wraps a pytree whose leaves have a leading replica axis, without copying."""
        value = object.__new__(cls)
        value.stacked = stacked
        return value

    @property
    def num_replicas(self) -> int:
        """The number of components (the length of the leading axis)."""
        leaves = jax.tree.leaves(self.stacked)
        return int(np.shape(leaves[0])[0]) if leaves else 0

    @property
    def values(self) -> tuple[PyTree, ...]:
        """The components, in replica order, each on its replica's devices."""
        return tuple(
            jax.tree.map(lambda x, i=i: replica_component(x, i), self.stacked)
            for i in range(self.num_replicas)
        )

    def tree_flatten(self):
        return (self.stacked,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls.from_stacked(children[0])

    def __repr__(self) -> str:
        return f"PerReplica({_describe(self.stacked)})"


@jax.tree_util.register_pytree_node_class
class Mirrored:
    """A value that is the same on every replica.

    ``strategy.run`` returns a leaf as Mirrored when it is provably identical on every replica (it
    came from an all-reduce, say); ``strategy.replicate`` makes one from host values.

    Example:
      >>> float(Mirrored(np.float32(2.0)).value)
      2.0
    """

    __slots__ = ("value",)

    def __init__(self, value: PyTree):
        if isinstance(value, (PerReplica, Mirrored)):
            raise TypeError(f"Mirrored cannot wrap a {type(value).__name__}")
        self.value = value

    def tree_flatten(self):
        return (self.value,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        value = object.__new__(cls)
        value.value = children[0]
        return value

    def __repr__(self) -> str:
        return f"Mirrored({_describe(self.value)})"


class ValueContext(NamedTuple):
    """What ``experimental_distribute_values_from_function`` tells ``value_fn`` about a replica.

    Example:
      >>> ValueContext(3, 8).replica_id_in_sync_group
      3
    """

    replica_id_in_sync_group: int = 0
    num_replicas_in_sync: int = 1


def is_distributed(x: Any) -> bool:
    """True for PerReplica and Mirrored; use as ``is_leaf`` to stop at them in a pytree."""
    return isinstance(x, (PerReplica, Mirrored))


def place_per_replica(components: Mapping[int, PyTree], mesh: Mesh) -> PerReplica:
    """Builds a PerReplica on ``mesh`` from host components, one per replica.

    Each device receives only its own replica's component, so in a job of several processes a
    process passes just the replicas whose devices it can address.

    Args:
      components: replica index to that replica's pytree, for every addressable replica.
      mesh: the strategy's mesh.

    Returns:
      A PerReplica whose leaves are global arrays of shape ``(num_replicas, *component_shape)``.
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
        # A copy: on CPU, device_put may alias a numpy buffer the caller goes on to change.
        leaves_by_replica[r] = [np.array(leaf) for leaf in leaves]
    sharding = _mesh.per_replica_sharding(mesh)
    stacked = []
    for k, leaf in enumerate(leaves_by_replica[local[0]]):
        for r in local:
            other = leaves_by_replica[r][k]
            if other.shape != leaf.shape or other.dtype != leaf.dtype:
                raise ValueError(
                    f"replica {r}'s leaf {k} is {other.dtype}{list(other.shape)} but replica "
                    f"{local[0]}'s is {leaf.dtype}{list(leaf.shape)}; every replica's value "
                    "must have the same shapes and dtypes"
                )
        shards = [
            jax.device_put(leaves_by_replica[r][k][None], device)
            for r, device in _addressable_devices(mesh)
        ]
        stacked.append(
            jax.make_array_from_single_device_arrays((num_replicas, *leaf.shape), sharding, shards)
        )
    return PerReplica.from_stacked(structure.unflatten(stacked))


def place_mirrored(tree: PyTree, mesh: Mesh) -> Mirrored:
    """Copies every leaf of ``tree`` to every device of ``mesh``."""
    if isinstance(tree, Mirrored):
        tree = tree.value
    sharding = _mesh.replicated_sharding(mesh)
    return Mirrored(jax.tree.map(lambda x: jax.device_put(x, sharding), tree))


def local_replicas(mesh: Mesh) -> list[int]:
    """The replicas of ``mesh`` whose devices this process addresses, in order."""
    return sorted({r for r, _ in _addressable_devices(mesh)})


def map_distributed(
    tree: PyTree,
    per_replica: Callable[[jax.Array], Any],
    mirrored: Callable[[Any], Any],
) -> PyTree:
    """Applies ``per_replica`` to stacked leaves and ``mirrored`` to every other leaf.

    Leaves that are not inside a PerReplica (Mirrored values and plain arrays) count as the same
    on every replica. The result holds plain values, without PerReplica or Mirrored nodes.
    """

    def visit(node):
        if isinstance(node, PerReplica):
            return jax.tree.map(per_replica, node.stacked)
        if isinstance(node, Mirrored):
            return jax.tree.map(mirrored, node.value)
        return mirrored(node)

    return jax.tree.map(visit, tree, is_leaf=is_distributed)


def replica_component(stacked: Any, replica: int) -> Any:
    """Component ``replica`` of a leaf stacked over replicas, on that replica's devices.

    Built on the host from the shards this process holds and copied to the replica's devices
    (replicated over its logical cores), so no program is compiled for it: indexing the global
    array would compile one per replica.
    """
    if not isinstance(stacked, jax.Array) or isinstance(stacked, jax.core.Tracer):
        return stacked[replica]
    num_replicas = stacked.shape[0]
    component = np.empty(stacked.shape[1:], stacked.dtype)
    devices, copied = [], set()
    for shard in stacked.addressable_shards:
        start, stop, _ = shard.index[0].indices(num_replicas)
        if not start <= replica < stop:
            continue
        devices.append(shard.device)
        where = tuple(s.indices(n) for s, n in zip(shard.index[1:], stacked.shape[1:]))
        if where not in copied:
            copied.add(where)
            component[shard.index[1:]] = np.asarray(shard.data)[replica - start]
    if not devices:
        raise ValueError(
            f"replica {replica} lives on devices of another process, so this process cannot "
            "read its component; use strategy.experimental_local_results for this process's "
            "replicas, or strategy.gather for every replica's"
        )
    mesh = Mesh(np.array(devices), ("replica_devices",))
    return jax.device_put(component, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _addressable_devices(mesh: Mesh) -> list[tuple[int, jax.Device]]:
    """(replica index, device) for each device of ``mesh`` this process addresses."""
    pid = jax.process_index()
    return [
        (index[0], device)
        for index, device in np.ndenumerate(mesh.devices)
        if device.process_index == pid
    ]


def _stack(xs: Sequence[Any]) -> Any:
    if any(isinstance(x, jax.core.Tracer) for x in xs):
        return jax.numpy.stack(xs)
    return np.stack([np.asarray(x) for x in xs])


def _describe(tree: PyTree) -> str:
    def short(x):
        shape = np.shape(x)
        dtype = getattr(x, "dtype", type(x).__name__)
        return f"{dtype}{list(shape)}"

    return str(jax.tree.map(short, tree))
