"""The device mesh: replicas by logical cores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from tpustrat._checks import check_int, describe

REPLICA_AXIS = "replica"
"""The name of the replica axis inside ``strategy.run``, for collectives written by hand.

Use it wherever ``jax.pmap`` code named its axis: ``lax.pmean(x, ts.REPLICA_AXIS)``,
``nn.BatchNorm(axis_name=ts.REPLICA_AXIS)``, ``nnx.BatchNorm(..., axis_name=ts.REPLICA_AXIS)``.
"""
LOGICAL_CORE_AXIS = "logical_core"
"""The name of all of a replica's logical cores in a spec (``ts.LayoutRules``, checkpoint targets).

It is the mesh axis itself when the core count is 1 or prime; a composite count is factored
into the sub-axes ``logical_core.0``, ``logical_core.1``, ..., and ``spell_cores`` writes the
name as those.
"""


def build_mesh(devices: Sequence[jax.Device] | np.ndarray, num_logical_cores: int = 1) -> Mesh:
    """Arranges ``devices`` into the mesh a strategy runs on.

    Replica ``r`` owns ``devices[r * C:(r + 1) * C]`` for ``C = num_logical_cores``. The logical
    cores are factored into prime-sized sub-axes in row-major order (8 cores become
    ``logical_core.0`` x ``logical_core.1`` x ``logical_core.2``, each of size 2; 4 cores
    become two sub-axes of 2; one core or a prime count stays one ``logical_core`` axis), so
    that one tensor can be tiled over several of its dimensions at once, as TF's
    ``partition_dimensions`` do. This is the one mesh of the strategy (``strategy.mesh``):
    every array it places lives on it. Every axis is ``Auto``: ``run`` makes ``replica``
    manual and leaves the cores to the partitioner.

    Args:
      devices: the devices, in replica-major order; a 2-D array is taken as (replica, core).
      num_logical_cores: how many devices each replica spans.

    Returns:
      A ``jax.sharding.Mesh`` over the devices with the replica axis first, then the core axes.

    Example:
      >>> build_mesh(jax.devices(), num_logical_cores=2).axis_names
      ('replica', 'logical_core')
      >>> build_mesh(jax.devices(), num_logical_cores=4).axis_names
      ('replica', 'logical_core.0', 'logical_core.1')
    """
    array = device_array(devices)
    if array.ndim == 2:
        if num_logical_cores not in (1, array.shape[1]):
            raise ValueError(
                f"devices has shape {array.shape} but num_logical_cores={num_logical_cores}; "
                f"pass num_logical_cores={array.shape[1]} or a flat device list"
            )
        num_logical_cores = array.shape[1]
    array = array.reshape(-1)
    _check_split(array.size, num_logical_cores)
    if len({d.id for d in array}) != array.size:
        raise ValueError("devices lists a device more than once; pass each device once")
    sizes = _prime_factors(num_logical_cores)
    names = _logical_core_axes(num_logical_cores)
    grid = array.reshape(array.size // num_logical_cores, *sizes)
    return Mesh(grid, (REPLICA_AXIS, *names), axis_types=(AxisType.Auto,) * (1 + len(names)))


def device_array(devices: Any) -> np.ndarray:
    """``devices`` (a list, tuple or array of ``jax.Device``) as a 1-D or 2-D object array.

    Raises a TypeError for anything but devices and a ValueError for an array of another rank,
    each naming the value seen, before any device attribute is read.

    Example:
      >>> device_array(jax.devices()[:2]).shape
      (2,)
    """
    if isinstance(devices, jax.Device):
        raise TypeError(
            f"devices must be a list of jax.Device, got the single device {devices!r}; pass a "
            f"list, e.g. devices=[{devices!r}]"
        )
    if not isinstance(devices, (list, tuple, np.ndarray)):
        raise TypeError(
            f"devices must be a list of jax.Device, got {describe(devices)}; pass jax.devices() "
            "or part of it, e.g. jax.devices('cpu')[:4]"
        )
    array = np.asarray(devices, dtype=object)
    if array.ndim not in (1, 2):
        raise ValueError(
            f"devices has {array.ndim} dimensions (shape {array.shape}); pass a flat list in "
            "replica-major order, or a 2-D array of shape (replicas, logical cores)"
        )
    for index, device in np.ndenumerate(array):
        if not isinstance(device, jax.Device):
            where = ", ".join(map(str, index))
            raise TypeError(
                f"devices[{where}] is {describe(device)}, not a jax.Device; "
                "pass devices from jax.devices(), e.g. [jax.devices()[i] for i in (0, 1)]"
            )
    return array


def default_device_grid(devices: Sequence[jax.Device], num_logical_cores: int = 1) -> np.ndarray:
    """``devices`` as a ``(replicas, logical cores)`` grid in JAX's topology-aware order.

    On TPU this is the order of ``jax.make_mesh`` (``mesh_utils.create_device_mesh``): replicas
    that follow each other are interconnect neighbours where the topology allows, so a ring
    all-reduce over the replica axis takes short hops. Devices of several slices
    (``slice_index``) are grouped slice by slice (``create_hybrid_device_mesh``), so the
    replica axis spans the slices and crosses the data-centre network as few times as
    possible. Other platforms keep the order given.

    Args:
      devices: every device the strategy uses, e.g. ``jax.devices()``.
      num_logical_cores: how many devices each replica spans.

    Returns:
      An object array of shape ``(len(devices) // num_logical_cores, num_logical_cores)``.

    Example:
      >>> default_device_grid(jax.devices(), 2).shape
      (4, 2)
    """
    devices = list(devices)
    _check_split(len(devices), num_logical_cores)
    shape = (len(devices) // num_logical_cores, num_logical_cores)
    if devices[0].platform != "tpu":
        return np.asarray(devices, dtype=object).reshape(shape)
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(slices) > 1:
        per_slice = (shape[0] // len(slices), num_logical_cores)
        return mesh_utils.create_hybrid_device_mesh(per_slice, (len(slices), 1), devices)
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def count_slices(mesh: Mesh, num_slices: int | None = None) -> int:
    """How many slices ``mesh``'s replicas form, checking that each slice's replicas are adjacent.

    Devices with distinct ``slice_index`` values (TPU slices joined over the data-centre
    network) give their count. ``num_slices`` declares the slices instead, e.g. on CPU to try
    a multi-slice job: replicas ``[s * P, (s + 1) * P)`` then form slice ``s``.

    Example:
      >>> count_slices(build_mesh(jax.devices()), num_slices=2)
      2
    """
    num_replicas = mesh.shape[REPLICA_AXIS]
    replicas = mesh.devices.reshape(num_replicas, -1)
    found = [sorted({getattr(d, "slice_index", 0) or 0 for d in row}) for row in replicas]
    distinct = sorted({s for row in found for s in row})
    if num_slices is None:
        num_slices = len(distinct)
    else:
        check_int("num_slices", num_slices, minimum=1)
    if num_replicas % num_slices:
        raise ValueError(
            f"num_slices={num_slices} does not divide the {num_replicas} replicas; declare a "
            f"number of slices that divides {num_replicas}"
        )
    if len(distinct) > 1:
        per_slice = num_replicas // num_slices
        expected = [[distinct[r // per_slice]] for r in range(num_replicas)]
        if num_slices != len(distinct) or found != expected:
            raise ValueError(
                f"the devices come from {len(distinct)} slices, but the replicas are not "
                f"grouped slice by slice into num_slices={num_slices} blocks (replica slices: "
                f"{[row[0] if len(row) == 1 else row for row in found]}); leave devices and "
                "num_slices at their defaults, which order the devices slice by slice"
            )
    return num_slices


def _check_split(num_devices: int, num_logical_cores: Any) -> None:
    """Raises unless ``num_devices`` devices split into replicas of ``num_logical_cores``."""
    check_int("num_logical_cores", num_logical_cores, minimum=1)
    if num_devices == 0:
        raise ValueError("devices is empty; pass jax.devices() or a non-empty list of devices")
    if num_devices % num_logical_cores:
        raise ValueError(
            f"{num_devices} devices cannot be split into replicas of "
            f"num_logical_cores={num_logical_cores}; use a num_logical_cores that divides "
            f"{num_devices}"
        )


def _logical_core_axes(num_logical_cores: int) -> tuple[str, ...]:
    """The mesh axes that number a replica's logical cores, major to minor."""
    count = len(_prime_factors(num_logical_cores))
    if count <= 1:
        return (LOGICAL_CORE_AXIS,)
    return tuple(f"{LOGICAL_CORE_AXIS}.{i}" for i in range(count))


def core_axes(mesh: Mesh | AbstractMesh) -> tuple[str, ...]:
    """The axes of ``mesh`` that number a replica's logical cores, major to minor.

    Example:
      >>> core_axes(build_mesh(jax.devices(), num_logical_cores=8))
      ('logical_core.0', 'logical_core.1', 'logical_core.2')
    """
    return tuple(name for name in mesh.axis_names if name != REPLICA_AXIS)


def num_cores(mesh: Mesh | AbstractMesh) -> int:
    """How many logical cores each replica of ``mesh`` spans: the product of its core axes.

    Example:
      >>> num_cores(build_mesh(jax.devices(), num_logical_cores=4))
      4
    """
    return int(np.prod([mesh.shape[name] for name in core_axes(mesh)], dtype=int))


def spell_cores(spec: PartitionSpec, mesh: Mesh | AbstractMesh) -> PartitionSpec:
    """``spec`` with its logical cores named by ``mesh``'s core axes.

    ``"logical_core"`` stands for all of a replica's cores, and so does a run of another
    mesh's core sub-axes that ``mesh`` lacks (a spec written for a strategy whose cores are
    factored otherwise): either becomes ``mesh``'s core axes, in place. Names ``mesh`` has are
    kept. Such a respelling tiles one dimension only, so a spec that needs it and names cores
    on several dimensions is refused.

    Args:
      spec: a ``PartitionSpec``; each entry None, an axis name or a tuple of them.
      mesh: the mesh the spec is for.

    Returns:
      A ``PartitionSpec`` over ``mesh``'s axes.

    Example:
      >>> tuple(spell_cores(PartitionSpec(None, "logical_core"), build_mesh(jax.devices(), 4)))
      (None, ('logical_core.0', 'logical_core.1'))
    """
    axes, cores = set(mesh.axis_names), core_axes(mesh)

    def foreign(name: Any) -> bool:
        return _is_core_name(name) and (name == LOGICAL_CORE_AXIS or name not in axes)

    entries = [() if e is None else e if isinstance(e, tuple) else (e,) for e in spec]
    spelled = [i for i, names in enumerate(entries) if any(map(foreign, names))]
    over_cores = [i for i, names in enumerate(entries) if any(map(_is_core_name, names))]
    if spelled and len(over_cores) > 1:
        raise ValueError(
            f"spec {spec} tiles {len(over_cores)} dimensions over logical cores named as the "
            f"mesh (axes {mesh.axis_names}) does not name them; tile one dimension over "
            f"{LOGICAL_CORE_AXIS!r} (all of a replica's cores), or write the spec over the "
            "mesh's own axes"
        )
    out = []
    for names in entries:
        if any(map(foreign, names)):
            first = next(k for k, name in enumerate(names) if _is_core_name(name))
            rest = [name for name in names if not _is_core_name(name)]
            names = (*rest[:first], *cores, *rest[first:])
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def _is_core_name(name: Any) -> bool:
    """Whether ``name`` is ``"logical_core"`` or one of its sub-axes ``"logical_core.<i>"``."""
    if not isinstance(name, str):
        return False
    head, dot, index = name.partition(".")
    return head == LOGICAL_CORE_AXIS and (not dot or index.isdigit())


def per_replica_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a stacked per-replica array: leading axis over replicas."""
    return NamedSharding(mesh, PartitionSpec(REPLICA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a value held whole by every device."""
    return NamedSharding(mesh, PartitionSpec())


def spec_axes(spec: PartitionSpec) -> set[str]:
    """The mesh axes a PartitionSpec mentions."""
    axes = set()
    for entry in spec:
        if entry is not None:
            axes.update(entry if isinstance(entry, tuple) else (entry,))
    return axes


def _prime_factors(n: int) -> tuple[int, ...]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return tuple(factors) or (1,)
