"""The device mesh: replicas by logical cores."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

REPLICA_AXIS = "replica"
LOGICAL_CORE_AXIS = "logical_core"


def build_mesh(devices: Sequence[jax.Device] | np.ndarray, num_logical_cores: int = 1) -> Mesh:
    """Arranges ``devices`` into a ``("replica", "logical_core")`` mesh.

    Replica ``r`` owns ``devices[r * C:(r + 1) * C]`` for ``C = num_logical_cores``. Both axes are
    ``Auto``: ``run`` makes ``replica`` manual and leaves ``logical_core`` to the partitioner, so
    sharding annotations can split a tensor across the cores of one replica.

    Args:
      devices: the devices, in replica-major order; a 2-D array is taken as (replica, core).
      num_logical_cores: how many devices each replica spans.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(len(devices) // num_logical_cores, num_logical_cores)``.

    Example:
      >>> mesh = build_mesh(jax.devices(), num_logical_cores=2)
      >>> mesh.axis_names
      ('replica', 'logical_core')
    """
    array = np.asarray(devices, dtype=object)
    if array.ndim == 2:
        if num_logical_cores not in (1, array.shape[1]):
            raise ValueError(
                f"devices has shape {array.shape} but num_logical_cores={num_logical_cores}; "
                f"pass num_logical_cores={array.shape[1]} or a flat device list"
            )
        num_logical_cores = array.shape[1]
    array = array.reshape(-1)
    if array.size == 0:
        raise ValueError("devices is empty; pass jax.devices() or a non-empty list of devices")
    if isinstance(num_logical_cores, bool) or not isinstance(num_logical_cores, int):
        raise TypeError(f"num_logical_cores must be an int, got {num_logical_cores!r}")
    if num_logical_cores < 1 or array.size % num_logical_cores:
        raise ValueError(
            f"{array.size} devices cannot be split into replicas of "
            f"num_logical_cores={num_logical_cores}; use a num_logical_cores that divides "
            f"{array.size}"
        )
    if len({d.id for d in array}) != array.size:
        raise ValueError("devices lists a device more than once; pass each device once")
    grid = array.reshape(array.size // num_logical_cores, num_logical_cores)
    return Mesh(grid, (REPLICA_AXIS, LOGICAL_CORE_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def per_replica_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a stacked per-replica array: leading axis over replicas."""
    return NamedSharding(mesh, PartitionSpec(REPLICA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a value held whole by every device."""
    return NamedSharding(mesh, PartitionSpec())
