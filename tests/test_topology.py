"""Tests for Topology and DeviceAssignment: exact placements on fake TPU slices and CPU devices."""

import dataclasses
import itertools
import re

import jax
import numpy as np
import pytest
from conftest import FakeTpu

from tpustrat._topology import DeviceAssignment, Topology


def v4_8() -> list[FakeTpu]:
    """2x2x1 chips, 2 cores each, one host; ids run core, then x, then y."""
    return [
        FakeTpu(id=2 * (x + 2 * y) + core, process_index=0, coords=(x, y, 0), core_on_chip=core)
        for y, x, core in itertools.product(range(2), range(2), range(2))
    ]


def v5e_16() -> list[FakeTpu]:
    """4x4x1 chips, 1 core each; four hosts, each owning a 2x2 quarter; ids run x, then y."""
    return [
        FakeTpu(id=x + 4 * y, process_index=x // 2 + 2 * (y // 2), coords=(x, y, 0))
        for y, x in itertools.product(range(4), range(4))
    ]


def ids(assignment: DeviceAssignment) -> list[list[int]]:
    return [[device.id for device in replica] for replica in assignment.devices]


def cpu_devices() -> list[jax.Device]:
    devices = jax.devices("cpu")
    assert len(devices) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    return devices


# --- Topology ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "mesh_shape", "num_tasks", "per_task"),
    [(v4_8(), (2, 2, 1, 2), 1, 8), (v5e_16(), (4, 4, 1, 1), 4, 4)],
)
def test_mesh_shape_and_tasks(devices, mesh_shape, num_tasks, per_task):
    topology = Topology.from_devices(devices)
    assert topology.mesh_shape == mesh_shape
    assert topology.mesh_rank == 4
    assert (topology.num_tasks, topology.num_tpus_per_task) == (num_tasks, per_task)
    assert topology.device_coordinates.shape == (num_tasks, per_task, 4)
    assert topology.devices == tuple(devices)
    assert topology.has_chip_coordinates
    for device in devices:
        point = (*device.coords, device.core_on_chip)
        assert topology.device_at(point) is device
        assert topology.task_ordinal_at_coordinates(point) == device.process_index


def test_v4_8_device_coordinates():
    topology = Topology.from_devices(v4_8())
    expected = [[x, y, 0, core] for y in range(2) for x in range(2) for core in range(2)]
    np.testing.assert_array_equal(topology.device_coordinates, [expected])
    assert [topology.tpu_device_ordinal_at_coordinates(p) for p in expected] == list(range(8))


def test_v5e_16_device_coordinates_group_by_process():
    topology = Topology.from_devices(v5e_16())
    quarter = [[0, 0], [1, 0], [0, 1], [1, 1]]
    expected = [[[x + 2 * qx, y + 2 * qy, 0, 0] for x, y in quarter] for qx, qy in quarter]
    np.testing.assert_array_equal(topology.device_coordinates, expected)
    assert topology.task_ordinal_at_coordinates((3, 1, 0, 0)) == 1
    assert topology.tpu_device_ordinal_at_coordinates((3, 1, 0, 0)) == 3


def test_coordinates_are_moved_to_the_origin():
    bottom_half = [d for d in v5e_16() if d.coords[1] >= 2]
    topology = Topology.from_devices(bottom_half)
    assert topology.mesh_shape == (4, 2, 1, 1)
    assert topology.device_at((1, 0, 0, 0)).id == 9


def test_cpu_devices_form_a_line():
    devices = cpu_devices()
    topology = Topology.from_devices(devices)
    assert topology.mesh_shape == (8, 1, 1, 1)
    assert not topology.has_chip_coordinates
    np.testing.assert_array_equal(topology.device_coordinates, [[[i, 0, 0, 0] for i in range(8)]])
    assert topology.device_at((5, 0, 0, 0)) is devices[5]
    assert repr(topology) == (
        "Topology(mesh_shape=[8, 1, 1, 1], num_tasks=1, num_tpus_per_task=8, platform='cpu')"
    )


def test_objects_are_read_only():
    topology = Topology.from_devices(v4_8())
    assignment = DeviceAssignment.build(topology)
    with pytest.raises(AttributeError):
        topology.mesh_shape = (1, 1, 1, 1)
    with pytest.raises(AttributeError):
        assignment.extra = 1
    for array in (topology.device_coordinates, assignment.core_assignment, assignment.devices):
        with pytest.raises(ValueError, match="read-only"):
            array[0, 0] = 0


# --- DeviceAssignment on TPU slices -----------------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "shape", "stride", "num_replicas", "expected_ids"),
    [
        # Both cores of each chip; chips in x-then-y order.
        (v4_8, [1, 1, 1, 2], None, 4, [[0, 1], [2, 3], [4, 5], [6, 7]]),
        # Single cores: the two cores of a chip are neighbouring replicas.
        (v4_8, None, None, 8, [[i] for i in range(8)]),
        # Two replicas prefer the two cores of one chip over two chips.
        (v4_8, None, None, 2, [[0], [1]]),
        # Two chips along x: replicas take core 0, then core 1, of the pair before moving in y.
        (v4_8, [2, 1, 1, 1], None, 4, [[0, 2], [1, 3], [4, 6], [5, 7]]),
        # Neighbouring chips along x.
        (v5e_16, [2, 1, 1, 1], None, 8, [[2 * r, 2 * r + 1] for r in range(8)]),
        # 2x2 blocks; logical cores run row-major over (x, y): (0,0), (0,1), (1,0), (1,1).
        (
            v5e_16,
            [2, 2, 1, 1],
            None,
            4,
            [[0, 4, 1, 5], [2, 6, 3, 7], [8, 12, 9, 13], [10, 14, 11, 15]],
        ),
        # Fewer replicas than fit: a compact 2x2 box of chips, not a row.
        (v5e_16, None, None, 4, [[0], [1], [4], [5]]),
        # Eight of sixteen: TF's near-cube box is 3x3, filled in x-then-y order.
        (v5e_16, None, None, 8, [[0], [1], [2], [4], [5], [6], [8], [9]]),
        # Stride 2 along x: each replica takes every other chip of a row.
        (
            v5e_16,
            [2, 1, 1, 1],
            [2, 1, 1, 1],
            8,
            [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
        ),
    ],
)
def test_tpu_placement(devices, shape, stride, num_replicas, expected_ids):
    topology = Topology.from_devices(devices())
    assignment = DeviceAssignment.build(topology, shape, stride, num_replicas=num_replicas)
    assert ids(assignment) == expected_ids
    by_id = {device.id: device for device in topology.devices}
    expected_points = [
        [[*by_id[i].coords, by_id[i].core_on_chip] for i in replica] for replica in expected_ids
    ]
    np.testing.assert_array_equal(assignment.core_assignment, expected_points)
    assert (assignment.num_replicas, assignment.num_cores_per_replica) == np.shape(expected_ids)
    assert assignment.computation_shape == tuple(shape or [1, 1, 1, 1])


def test_v4_8_both_cores_per_replica_exactly():
    assignment = DeviceAssignment.build(Topology.from_devices(v4_8()), [1, 1, 1, 2], num_replicas=4)
    np.testing.assert_array_equal(
        assignment.core_assignment,
        [[[x, y, 0, 0], [x, y, 0, 1]] for y in range(2) for x in range(2)],
    )
    assert assignment.coordinates(2, 1) == (0, 1, 0, 1)
    assert assignment.tpu_ordinal(2, 1) == 5
    assert repr(assignment) == (
        "DeviceAssignment(num_replicas=4, num_cores_per_replica=2, computation_shape=[1, 1, 1, 2], "
        "device_ids=[[0, 1], [2, 3], [4, 5], [6, 7]], topology=Topology(mesh_shape=[2, 2, 1, 2], "
        "num_tasks=1, num_tpus_per_task=8, platform='tpu'))"
    )


def test_repr_summarises_large_assignments():
    chips = itertools.product(range(8), range(8), range(2))
    devices = [
        FakeTpu(id=i, process_index=0, coords=(x, y, 0), core_on_chip=core)
        for i, (y, x, core) in enumerate(chips)
    ]
    assignment = DeviceAssignment.build(Topology.from_devices(devices), num_replicas=128)
    assert "device_ids=[[  0], [  1], [  2], ..., [125], [126], [127]]" in repr(assignment)


def test_lookup_replicas_by_task():
    topology = Topology.from_devices(v5e_16())
    assignment = DeviceAssignment.build(topology, [2, 1, 1, 1], num_replicas=8)
    # Replica r = px + 2 * py sits at x = 2 * px, y = py; hosts own 2x2 quarters.
    assert [assignment.lookup_replicas(task, 0) for task in range(4)] == [
        [0, 2],
        [1, 3],
        [4, 6],
        [5, 7],
    ]
    assert assignment.lookup_replicas(3, 1) == [5, 7]
    assert assignment.tpu_ordinal(2, 1) == 3  # chip (1, 1): last of host 0's four.


@pytest.mark.parametrize(
    ("devices", "mesh_shape"),
    [(v4_8, (2, 2, 1, 2)), (v5e_16, (4, 4, 1, 1))],
)
def test_every_fitting_request_tiles_without_overlap(devices, mesh_shape):
    topology = Topology.from_devices(devices())
    for shape in itertools.product(*(range(1, s + 1) for s in mesh_shape)):
        max_replicas = int(np.prod(np.array(mesh_shape) // shape))
        for num_replicas in range(1, max_replicas + 1):
            assignment = DeviceAssignment.build(topology, shape, num_replicas=num_replicas)
            points = assignment.core_assignment
            # Each replica is a solid block of `shape`, cores row-major; no point is used twice.
            np.testing.assert_array_equal(
                points - points[:, :1],
                np.broadcast_to(np.indices(shape).reshape(4, -1).T, points.shape),
            )
            assert (
                len({tuple(p) for p in points.reshape(-1, 4)}) == points.shape[0] * points.shape[1]
            )


# --- DeviceAssignment on CPU devices ----------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "num_replicas", "expected_ids"),
    [
        ([1, 1, 1, 2], 4, [[0, 1], [2, 3], [4, 5], [6, 7]]),
        ([1, 1, 1, 4], 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ([2, 1, 1, 1], 3, [[0, 1], [2, 3], [4, 5]]),
        ([1, 1, 1, 4], 1, [[0, 1, 2, 3]]),
        (None, 8, [[i] for i in range(8)]),
    ],
)
def test_cpu_devices_are_assigned_contiguously(shape, num_replicas, expected_ids):
    topology = Topology.from_devices(cpu_devices())
    assignment = DeviceAssignment.build(topology, shape, num_replicas=num_replicas)
    assert ids(assignment) == expected_ids
    np.testing.assert_array_equal(
        assignment.core_assignment, [[[i, 0, 0, 0] for i in replica] for replica in expected_ids]
    )
    assert assignment.devices.shape == np.shape(expected_ids)


def test_cpu_defaults_to_one_single_core_replica():
    devices = cpu_devices()
    assignment = DeviceAssignment.build(Topology.from_devices(devices))
    assert assignment.num_replicas == 1
    assert assignment.num_cores_per_replica == 1
    assert assignment.computation_shape == (1, 1, 1, 1)
    assert assignment.devices[0, 0] is devices[0]
    assert assignment.lookup_replicas(0, 0) == [0]


def test_hand_made_assignment():
    topology = Topology.from_devices(cpu_devices())
    assignment = DeviceAssignment(topology, [[[7, 0, 0, 0], [3, 0, 0, 0]]])
    assert ids(assignment) == [[7, 3]]
    assert assignment.computation_shape is None
    assert assignment.tpu_ordinal(0, 1) == 3


# --- Errors -----------------------------------------------------------------------------------


def _raises(message, error=ValueError):
    return pytest.raises(error, match=re.escape(message))


def _with(devices, **changes):
    return [dataclasses.replace(device, **changes) for device in devices]


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ([], "the device list is empty"),
        ([*v4_8()[:-1], v4_8()[0]], "both sit at coordinates [0, 0, 0, 0]"),
        (v4_8()[:4] + _with(v4_8()[:4], slice_index=1), "[0, 0, 0, 0]; pass each device once, all"),
        (v5e_16()[:-1], "shape [4, 4, 1, 1]: nothing sits at [3, 3, 0, 0]"),
        ([d for d in v5e_16() if d.id != 5], "nothing sits at [1, 1, 0, 0]"),
        ([d for d in v5e_16() if d.id not in (0, 1, 4, 5)], "shape [4, 4, 1, 1]: nothing sits at"),
        (
            v4_8()[:7] + _with(v4_8()[7:], process_index=1),
            "unequal numbers of devices {0: 7, 1: 1}",
        ),
        ([*v4_8()[:2], jax.devices("cpu")[0]], "CpuDevice(id=0) has no TPU coordinates"),
    ],
)
def test_bad_device_sets(devices, message):
    with _raises(message):
        Topology.from_devices(devices)


@pytest.mark.parametrize(
    "coordinates", [np.zeros((8, 3), int), np.zeros((8, 4)), np.full((8, 4), -1)]
)
def test_bad_explicit_coordinates(coordinates):
    with _raises(f"coordinates of shape {coordinates.shape} and dtype {coordinates.dtype}"):
        Topology(cpu_devices(), coordinates)


BUILD_ERRORS = [
    (v4_8, {"computation_shape": [1, 1, 2]}, "computation_shape [1, 1, 2] has 3 entries; pass 4"),
    (v4_8, {"computation_shape": [1, 0, 1, 1]}, "computation_shape [1, 0, 1, 1] has entries below"),
    (v4_8, {"computation_stride": [1, 1, 1, -1]}, "computation_stride [1, 1, 1, -1] has entries"),
    (
        v4_8,
        {"computation_shape": [1, 1, 1, 3]},
        "computation_shape [1, 1, 1, 3] with computation_stride [1, 1, 1, 1] spans [1, 1, 1, 3], "
        "which does not fit in topology shape [2, 2, 1, 2]",
    ),
    (v4_8, {"computation_shape": [2, 1, 1, 1], "computation_stride": [2, 1, 1, 1]}, "spans [4, 1"),
    (
        v4_8,
        {"computation_shape": [1, 1, 1, 2], "num_replicas": 8},
        "num_replicas 8 of computation_shape [1, 1, 1, 2] needs 16 cores, but the topology has 8",
    ),
    (
        v5e_16,
        {"computation_shape": [3, 1, 1, 1], "num_replicas": 5},
        "num_replicas 5 does not fit: topology shape [4, 4, 1, 1] holds at most 4 blocks of "
        "computation_shape [3, 1, 1, 1]",
    ),
    (v4_8, {"num_replicas": 0}, "num_replicas must be an int >= 1, got 0"),
    (
        cpu_devices,
        {"computation_shape": [1, 1, 1, 4], "num_replicas": 3},
        "num_replicas 3 of computation_shape [1, 1, 1, 4] needs 12 cores, but the topology has 8",
    ),
    (cpu_devices, {"computation_shape": [1, 1, 1, 16]}, "needs 16 cores, but the topology has 8"),
    (
        cpu_devices,
        {"computation_stride": [2, 1, 1, 1]},
        "computation_stride [2, 1, 1, 1] needs TPU",
    ),
]


@pytest.mark.parametrize(("devices", "kwargs", "message"), BUILD_ERRORS)
def test_bad_build_requests(devices, kwargs, message):
    topology = Topology.from_devices(devices())
    with _raises(message):
        DeviceAssignment.build(topology, **kwargs)


BUILD_TYPE_ERRORS = [
    (
        {"computation_shape": "abcd"},
        "computation_shape must be 4 integers (x, y, z, core), got str 'abcd'",
    ),
    ({"num_replicas": 2.0}, "num_replicas must be an int, got float 2.0"),
    ({"num_replicas": True}, "num_replicas must be an int, got the bool True"),
]


@pytest.mark.parametrize(("kwargs", "message"), BUILD_TYPE_ERRORS)
def test_build_requests_of_the_wrong_type(kwargs, message):
    with _raises(message, TypeError):
        DeviceAssignment.build(Topology.from_devices(v4_8()), **kwargs)


def test_build_needs_a_topology():
    with _raises("topology must be a ts.Topology, got list [0, 1]", TypeError):
        DeviceAssignment.build([0, 1])


@pytest.mark.parametrize(
    ("core_assignment", "computation_shape", "message"),
    [
        ([[0, 0, 0, 0]], None, "core_assignment of shape (1, 4) and dtype int64 is not"),
        ([[[0.0, 0, 0, 0]]], None, "core_assignment of shape (1, 1, 4) and dtype float64"),
        ([[[0, 0, 0, 0]], [[0, 0, 0, 0]]], None, "uses coordinates [0, 0, 0, 0] more than once"),
        ([[[8, 0, 0, 0]]], None, "coordinates [8, 0, 0, 0] are not a point of topology shape [8,"),
        (
            [[[0, 0, 0, 0]]],
            [1, 1, 1, 2],
            "computation_shape [1, 1, 1, 2] does not hold the 1 cores",
        ),
    ],
)
def test_bad_hand_made_assignment(core_assignment, computation_shape, message):
    topology = Topology.from_devices(cpu_devices())
    with _raises(message):
        DeviceAssignment(topology, core_assignment, computation_shape)


def test_hand_made_assignment_needs_a_topology():
    with _raises("topology must be a ts.Topology, got str 'v4-8'", TypeError):
        DeviceAssignment("v4-8", [[[0, 0, 0, 0]]])


def test_bad_lookups():
    topology = Topology.from_devices(v4_8())
    assignment = DeviceAssignment.build(topology, [1, 1, 1, 2], num_replicas=4)
    with _raises("coordinates [2, 0, 0, 0] are not a point of topology shape [2, 2, 1, 2]"):
        topology.device_at((2, 0, 0, 0))
    with _raises("coordinates [0, 0, -1, 0] are not a point"):
        topology.task_ordinal_at_coordinates((0, 0, -1, 0))
    with _raises("coordinates [0, 0, 0] are not a point"):
        topology.tpu_device_ordinal_at_coordinates((0, 0, 0))
    with _raises("(replica 4, logical_core 0) is out of range; pass a replica below 4"):
        assignment.coordinates(4, 0)
    with _raises("(replica 0, logical_core 2) is out of range"):
        assignment.tpu_ordinal(0, 2)
    with _raises("(replica 0, logical_core -1) is out of range"):
        assignment.lookup_replicas(0, -1)
    with _raises("no replica runs logical_core 1 on task 3; that core runs on tasks [0]"):
        assignment.lookup_replicas(3, 1)


def test_two_cores_per_chip_on_one_core_chips_explains_megacore():
    """TF's computation_shape=[1, 1, 1, 2] on v4/v5p chips, which JAX sees as one device each."""
    chips = [
        FakeTpu(id=x + 2 * y + 4 * z, process_index=0, coords=(x, y, z))
        for z, y, x in itertools.product(range(4), range(2), range(2))
    ]
    topology = Topology.from_devices(chips)
    with pytest.raises(ValueError, match=re.escape("computation_shape=[2, 1, 1, 1]")) as error:
        DeviceAssignment.build(topology, computation_shape=[1, 1, 1, 2], num_replicas=8)
    assert "one core per chip" in str(error.value) and "megacore" in str(error.value)
    assignment = DeviceAssignment.build(topology, computation_shape=[2, 1, 1, 1], num_replicas=8)
    assert assignment.num_cores_per_replica == 2
