"""Where devices sit (``Topology``) and which of them run each replica (``DeviceAssignment``)."""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections import Counter
from collections.abc import Sequence

import jax
import numpy as np
from numpy.typing import ArrayLike

from tpustrat._checks import check_int, describe

_RANK = 4  # Mesh axes: x, y, z (chip coordinates) and the core on the chip.


def _as_list(values: ArrayLike) -> list[int]:
    """Plain ints, for messages and reprs."""
    return [int(v) for v in np.ravel(values)]


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class Topology:
    """Devices laid out on an ``[x, y, z, cores_per_chip]`` mesh; build one with ``from_devices``.

    TF's ``tf.tpu.experimental.Topology``, part of ``tpustrat.compat``.

    Args:
      devices: the devices, each at exactly one mesh point.
      coordinates: integers ``[len(devices), 4]``, each device's ``(x, y, z, core)`` point, filling
        the mesh from the origin; ``None`` lays the devices out in a line, in the order given.

    Example (8 CPU devices, as with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``):
      >>> import jax
      >>> import tpustrat as ts
      >>> topology = ts.Topology.from_devices(jax.devices("cpu"))
      >>> topology
      Topology(mesh_shape=[8, 1, 1, 1], num_tasks=1, num_tpus_per_task=8, platform='cpu')
      >>> topology.device_at((3, 0, 0, 0))
      CpuDevice(id=3)
    """

    __slots__ = ("_coordinates", "_device_coordinates", "_devices", "_grid", "_located", "_task")

    def __init__(self, devices: Sequence[jax.Device], coordinates: ArrayLike | None = None) -> None:
        devices = _devices(devices)
        num_devices = len(devices)
        if not num_devices:
            raise ValueError("the device list is empty; pass jax.devices() or a non-empty subset")
        line = np.pad(np.arange(num_devices)[:, np.newaxis], [(0, 0), (0, _RANK - 1)])
        points = line if coordinates is None else _integers("coordinates", coordinates)
        integers = points.shape == (num_devices, _RANK) and points.dtype.kind in "iu"
        if not integers or points.min() < 0:
            raise ValueError(
                f"coordinates of shape {points.shape} and dtype {points.dtype} do not place "
                f"{num_devices} devices; pass non-negative integers, one (x, y, z, core) row each"
            )
        grid = np.full(tuple(points.max(axis=0) + 1), -1)
        for index, point in enumerate(map(tuple, points)):
            if grid[point] >= 0:
                raise ValueError(
                    f"devices {devices[grid[point]]!r} and {devices[index]!r} both sit at "
                    f"coordinates {_as_list(point)}; pass each device once, all from one slice"
                )
            grid[point] = index
        if (grid < 0).any():
            raise ValueError(
                f"{num_devices} devices do not fill a rectangular mesh of shape "
                f"{_as_list(grid.shape)}: nothing sits at {_as_list(np.argwhere(grid < 0)[0])}; "
                "pass a full block of devices, such as all of jax.devices()"
            )
        processes, task, counts = np.unique(
            [d.process_index for d in devices], return_inverse=True, return_counts=True
        )
        if (counts != counts[0]).any():
            per_process = dict(zip(_as_list(processes), _as_list(counts), strict=True))
            raise ValueError(
                f"processes hold unequal numbers of devices {per_process}; pass the same number "
                "from every process"
            )
        self._devices = devices
        self._located = coordinates is not None
        self._coordinates = _read_only(points)
        self._grid = _read_only(grid)
        self._task = _read_only(task.reshape(-1))
        by_task = points[np.argsort(self._task, kind="stable")]
        self._device_coordinates = _read_only(by_task.reshape(len(counts), -1, _RANK))

    @classmethod
    def from_devices(cls, devices: Sequence[jax.Device]) -> Topology:
        """Reads the topology of ``devices`` from their TPU coordinates, if they have any.

        TPU devices carry ``coords`` (their chip's ``(x, y, z)``) and ``core_on_chip``; the mesh is
        the smallest box holding them, its corner moved to the origin. Devices without coordinates
        (CPU, GPU) form a ``[len(devices), 1, 1, 1]`` line, in the order given.

        Args:
          devices: the devices of one slice, for example ``jax.devices()``.

        Returns:
          A ``Topology`` over ``devices``.
        """
        devices = _devices(devices)
        located = [getattr(d, "coords", None) is not None for d in devices]
        if not any(located):
            return cls(devices)
        if not all(located):
            raise ValueError(
                f"device {devices[located.index(False)]!r} has no TPU coordinates but others do; "
                "pass devices of one platform"
            )
        points = np.array([(*d.coords, getattr(d, "core_on_chip", 0)) for d in devices])
        return cls(devices, points - points.min(axis=0))

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        """The mesh size along ``(x, y, z, core)``."""
        return tuple(_as_list(self._grid.shape))

    @property
    def mesh_rank(self) -> int:
        """The number of mesh axes: always 4."""
        return _RANK

    @property
    def devices(self) -> tuple[jax.Device, ...]:
        """The devices, in the order given."""
        return self._devices

    @property
    def has_chip_coordinates(self) -> bool:
        """Whether the devices have a physical layout, rather than being laid out in a line."""
        return self._located

    @property
    def device_coordinates(self) -> np.ndarray:
        """Every device's ``(x, y, z, core)``: ``[num_tasks, num_tpus_per_task, 4]``.

        Tasks are processes by increasing ``process_index``; a task's devices keep the given order.
        """
        return self._device_coordinates

    @property
    def num_tasks(self) -> int:
        """The number of processes that own devices."""
        return self._device_coordinates.shape[0]

    @property
    def num_tpus_per_task(self) -> int:
        """The number of devices each process owns."""
        return self._device_coordinates.shape[1]

    def _index_at(self, coordinates: Sequence[int] | np.ndarray) -> int:
        point = tuple(operator.index(c) for c in coordinates)
        if len(point) != _RANK or min(point) < 0 or (np.array(point) >= self._grid.shape).any():
            raise ValueError(
                f"coordinates {list(point)} are not a point of topology shape "
                f"{list(self.mesh_shape)}; pass 4 entries (x, y, z, core), each below its mesh size"
            )
        return int(self._grid[point])

    def device_at(self, coordinates: Sequence[int]) -> jax.Device:
        """Returns the device at ``(x, y, z, core)``."""
        return self._devices[self._index_at(coordinates)]

    def task_ordinal_at_coordinates(self, coordinates: Sequence[int]) -> int:
        """Returns the task (index into ``device_coordinates``) owning the device at a point."""
        return int(self._task[self._index_at(coordinates)])

    def tpu_device_ordinal_at_coordinates(self, coordinates: Sequence[int]) -> int:
        """Returns the position, within its task, of the device at a point."""
        index = self._index_at(coordinates)
        return int(np.count_nonzero(self._task[:index] == self._task[index]))

    def __repr__(self) -> str:
        return (
            f"Topology(mesh_shape={list(self.mesh_shape)}, num_tasks={self.num_tasks}, "
            f"num_tpus_per_task={self.num_tpus_per_task}, platform={self._devices[0].platform!r})"
        )


def _devices(devices: Sequence[jax.Device]) -> tuple[jax.Device, ...]:
    """``devices`` as a tuple; a TypeError naming it unless a list of devices."""
    if not isinstance(devices, (list, tuple, np.ndarray)) or (
        isinstance(devices, np.ndarray) and devices.ndim == 0
    ):
        raise TypeError(
            f"devices must be a list of devices, got {describe(devices)}; pass jax.devices() "
            "or part of it"
        )
    for i, device in enumerate(devices):
        if not hasattr(device, "process_index"):
            raise TypeError(
                f"devices[{i}] is {describe(device)}, not a device; pass devices from jax.devices()"
            )
    return tuple(devices)


def _integers(name: str, value: ArrayLike) -> np.ndarray:
    """``value`` as a numpy array; a TypeError naming ``name`` if it cannot be one."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an array of integers, got {describe(value)}")
    try:
        return np.array(value)
    except Exception:  # ragged lists, deleted arrays: whatever numpy raises, no integers
        raise TypeError(f"{name} must be an array of integers, got {describe(value)}") from None


def _check_topology(topology: object) -> None:
    if not isinstance(topology, Topology):
        raise TypeError(
            f"topology must be a ts.Topology, got {describe(topology)}; use Topology.from_devices"
        )


def _as_shape(name: str, value: Sequence[int] | None) -> tuple[int, ...]:
    """Checks a per-axis ``(x, y, z, core)`` shape; ``None`` means one of everything."""
    if value is None:
        return (1,) * _RANK
    try:
        shape = tuple(operator.index(v) for v in value)
    except Exception:  # whatever iterating or index() raises, the value is no 4 integers
        raise TypeError(
            f"{name} must be 4 integers (x, y, z, core), got {describe(value)}"
        ) from None
    if len(shape) != _RANK:
        raise ValueError(
            f"{name} {list(shape)} has {len(shape)} entries; pass 4, one per topology axis "
            "(x, y, z, core), e.g. [1, 1, 1, 2] for both cores of one chip"
        )
    if min(shape) < 1:
        raise ValueError(f"{name} {list(shape)} has entries below 1; make every entry at least 1")
    return shape


def _replica_grid(replica_counts: np.ndarray, num_replicas: int) -> list[int]:
    """How many replicas to line up along each axis: a box holding ``num_replicas``, near a cube.

    Axes with the fewest replica slots are sized first; ties go to core, x, y, z, in that order.
    """
    grid = [1] * _RANK
    remaining = num_replicas
    order = sorted(range(_RANK), key=lambda axis: (replica_counts[axis], (axis + 1) % _RANK))
    for done, axis in enumerate(order):
        # The integer root, ceil(remaining ** (1 / axes left)), without float rounding.
        root = next(r for r in itertools.count(1) if r ** (_RANK - done) >= remaining)
        grid[axis] = min(root, int(replica_counts[axis]))
        remaining = -(-remaining // grid[axis])
    return grid


def _tile(
    mesh_shape: Sequence[int], shape: Sequence[int], stride: Sequence[int], num_replicas: int
) -> np.ndarray:
    """Places ``num_replicas`` blocks of ``shape`` (cores ``stride`` apart) on the mesh."""
    mesh = np.array(mesh_shape)
    footprint = np.multiply(shape, stride)
    if footprint[-1] > mesh[-1] == 1:
        fits = [
            [*shape[:axis], shape[axis] * shape[-1], *shape[axis + 1 : -1], 1]
            for axis in range(len(shape) - 1)
            if shape[axis] * shape[-1] * stride[axis] <= mesh[axis]
        ]
        raise ValueError(
            f"computation_shape {list(shape)} asks for {shape[-1]} cores on one chip, but this "
            f"topology ({_as_list(mesh)}) has one core per chip: TPU v4 and v5p chips are one "
            "device each (their two cores work as one megacore). Ask for chips instead of "
            "cores"
            + (f", e.g. computation_shape={fits[0]}" if fits else ", along the x, y or z axis")
        )
    if (footprint > mesh).any():
        raise ValueError(
            f"computation_shape {list(shape)} with computation_stride {list(stride)} spans "
            f"{_as_list(footprint)}, which does not fit in topology shape {_as_list(mesh)}; "
            "choose a shape (times stride) no larger than the topology along any axis"
        )
    replica_counts = mesh // footprint * stride
    max_replicas = int(np.prod(replica_counts))
    if num_replicas > max_replicas:
        raise ValueError(
            f"num_replicas {num_replicas} does not fit: topology shape {_as_list(mesh)} holds at "
            f"most {max_replicas} blocks of computation_shape {list(shape)}; ask for at most "
            f"{max_replicas} replicas, or a computation_shape whose entries divide the topology's"
        )
    grid = _replica_grid(replica_counts, num_replicas)
    # Replica numbers run fastest along the core axis, then x, y and z.
    z, y, x, core = np.unravel_index(np.arange(num_replicas), (grid[2], grid[1], grid[0], grid[3]))
    position = np.stack([x, y, z, core], axis=-1)
    corners = position // stride * footprint + position % stride
    # Logical cores run row-major over the block: core fastest, then z, y, x.
    block = np.indices(shape).reshape(_RANK, -1).T * stride
    return corners[:, np.newaxis, :] + block[np.newaxis, :, :]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class DeviceAssignment:
    """Which device runs each logical core of each replica; build one with ``build``.

    TF's ``tf.tpu.experimental.DeviceAssignment``, part of ``tpustrat.compat``, for
    ``ts.TPUStrategy(device_assignment=...)``.

    Attributes:
      topology: the ``Topology`` the cores live on.
      core_assignment: integers ``[num_replicas, num_cores_per_replica, 4]``: the
        ``(x, y, z, core)`` point of each replica's logical cores, no point used twice.
      computation_shape: the block shape given to ``build``; ``None`` for a hand-made assignment.
      devices: the device of every logical core, an object array ``[replicas, cores]``: the grid
        ``TPUStrategy`` builds its mesh from.
      num_replicas: the number of replicas.
      num_cores_per_replica: the number of logical cores in each replica.

    Example (8 CPU devices):
      >>> import jax
      >>> import tpustrat as ts
      >>> topology = ts.Topology.from_devices(jax.devices("cpu"))
      >>> assignment = ts.DeviceAssignment.build(topology, [1, 1, 1, 2], num_replicas=4)
      >>> [[device.id for device in replica] for replica in assignment.devices]
      [[0, 1], [2, 3], [4, 5], [6, 7]]
    """

    topology: Topology
    core_assignment: np.ndarray
    computation_shape: tuple[int, ...] | None = None
    devices: np.ndarray = dataclasses.field(init=False)
    num_replicas: int = dataclasses.field(init=False)
    num_cores_per_replica: int = dataclasses.field(init=False)

    def __post_init__(self):
        topology, shape = self.topology, self.computation_shape
        _check_topology(topology)
        if shape is not None:
            shape = _as_shape("computation_shape", shape)
            object.__setattr__(self, "computation_shape", shape)
        points = _integers("core_assignment", self.core_assignment)
        shaped = points.ndim == 3 and points.shape[-1] == _RANK and points.size
        if not shaped or points.dtype.kind not in "iu":
            raise ValueError(
                f"core_assignment of shape {points.shape} and dtype {points.dtype} is not a "
                f"placement; pass integers of shape [num_replicas, num_cores_per_replica, {_RANK}]"
            )
        indices = [topology._index_at(point) for point in points.reshape(-1, _RANK)]
        again = [index for index, uses in Counter(indices).items() if uses > 1]
        if again:
            raise ValueError(
                f"core_assignment uses coordinates {_as_list(topology._coordinates[again[0]])} "
                "more than once; give every (replica, logical core) its own point"
            )
        if shape is not None and np.prod(shape) != points.shape[1]:
            raise ValueError(
                f"computation_shape {list(shape)} does not hold the {points.shape[1]} cores "
                "core_assignment gives each replica; pass a matching shape or None"
            )
        devices = np.empty(len(indices), dtype=object)
        devices[:] = [topology.devices[index] for index in indices]
        object.__setattr__(self, "core_assignment", _read_only(points))
        object.__setattr__(self, "devices", _read_only(devices.reshape(points.shape[:2])))
        object.__setattr__(self, "computation_shape", None if shape is None else tuple(shape))
        object.__setattr__(self, "num_replicas", points.shape[0])
        object.__setattr__(self, "num_cores_per_replica", points.shape[1])

    @classmethod
    def build(
        cls,
        topology: Topology,
        computation_shape: Sequence[int] | None = None,
        computation_stride: Sequence[int] | None = None,
        num_replicas: int = 1,
    ) -> DeviceAssignment:
        """Tiles the topology with one block of ``computation_shape`` cores per replica.

        With TPU coordinates, replicas fill a box of block positions near a cube, numbered fastest
        along the core axis, then x, y and z; a replica's logical cores run row-major over its
        block ``(x, y, z, core)``, the core fastest. Devices without coordinates are handed out in
        order, ``prod(computation_shape)`` consecutive devices per replica.

        Args:
          topology: the ``Topology`` to place replicas on.
          computation_shape: cores per replica along ``(x, y, z, core)``; default ``[1, 1, 1, 1]``.
          computation_stride: spacing of a replica's cores along each axis; default all ones.
          num_replicas: how many replicas to place.

        Returns:
          The ``DeviceAssignment``.
        """
        shape = _as_shape("computation_shape", computation_shape)
        stride = _as_shape("computation_stride", computation_stride)
        _check_topology(topology)
        check_int("num_replicas", num_replicas, minimum=1)
        cores, total = int(np.prod(shape)), len(topology.devices)
        if num_replicas * cores > total:
            raise ValueError(
                f"num_replicas {num_replicas} of computation_shape {list(shape)} needs "
                f"{num_replicas * cores} cores, but the topology has {total}; ask for fewer "
                "replicas or a smaller computation_shape"
            )
        block = shape
        if not topology.has_chip_coordinates:
            if stride != (1,) * _RANK:
                raise ValueError(
                    f"computation_stride {list(stride)} needs TPU chip coordinates, which these "
                    f"{topology.devices[0].platform} devices lack; leave computation_stride None"
                )
            block = (cores, 1, 1, 1)  # A run of consecutive devices along the line.
        return cls(topology, _tile(topology.mesh_shape, block, stride, num_replicas), shape)

    def coordinates(self, replica: int, logical_core: int) -> tuple[int, ...]:
        """Returns the ``(x, y, z, core)`` point of one replica's logical core."""
        replicas, cores = self.num_replicas, self.num_cores_per_replica
        if not (0 <= replica < replicas and 0 <= logical_core < cores):
            raise ValueError(
                f"(replica {replica}, logical_core {logical_core}) is out of range; pass a replica "
                f"below {replicas} and a logical_core below {cores}"
            )
        return tuple(_as_list(self.core_assignment[replica, logical_core]))

    def lookup_replicas(self, task_id: int, logical_core: int) -> list[int]:
        """Returns, in order, the replicas whose ``logical_core`` runs on task ``task_id``."""
        self.coordinates(0, logical_core)  # Checks that the logical core exists.
        column = self.core_assignment[:, logical_core]
        tasks = [self.topology.task_ordinal_at_coordinates(point) for point in column]
        replicas = [replica for replica, task in enumerate(tasks) if task == task_id]
        if not replicas:
            raise ValueError(
                f"no replica runs logical_core {logical_core} on task {task_id}; that core runs "
                f"on tasks {sorted(set(tasks))}"
            )
        return replicas

    def tpu_ordinal(self, replica: int = 0, logical_core: int = 0) -> int:
        """Returns the position, within its task, of the device running a logical core."""
        point = self.coordinates(replica, logical_core)
        return self.topology.tpu_device_ordinal_at_coordinates(point)

    def __repr__(self) -> str:
        ids = np.vectorize(lambda device: device.id, otypes=[int])(self.devices)
        ids = np.array2string(ids, separator=", ", threshold=64).replace("\n", "")
        shape = None if self.computation_shape is None else list(self.computation_shape)
        return (
            f"DeviceAssignment(num_replicas={self.num_replicas}, "
            f"num_cores_per_replica={self.num_cores_per_replica}, computation_shape={shape}, "
            f"device_ids={ids}, topology={self.topology!r})"
        )
