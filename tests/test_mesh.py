"""The mesh: JAX's topology-aware replica order on (fake) TPU slices, the given order elsewhere."""

import itertools

import jax
import numpy as np
import pytest
from conftest import FakeTpu
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpustrat as ts
from tpustrat import _mesh, _placement


def _slice(shape, kind, slice_index=0, per_host=4):
    """One slice of single-core chips, ids in raster order (x fastest), 4 chips per host."""
    chips = itertools.product(*[range(n) for n in shape[::-1]])
    offset = slice_index * int(np.prod(shape))
    return [
        FakeTpu(
            id=offset + i,
            process_index=(offset + i) // per_host,
            coords=(x, y, z),
            device_kind=kind,
            slice_index=slice_index,
        )
        for i, (z, y, x) in enumerate(chips)
    ]


SLICES = {
    "v4-32": ((2, 2, 4), "TPU v4"),
    "v5e-16": ((4, 4, 1), "TPU v5 lite"),
    "v5p-64": ((2, 4, 4), "TPU v5"),
}


def _non_neighbours(devices):
    """Consecutive pairs that are not interconnect neighbours (chips one hop apart)."""
    hops = [
        sum(abs(a - b) for a, b in zip(first.coords, second.coords))
        for first, second in itertools.pairwise(devices)
    ]
    return sum(hop != 1 for hop in hops)


@pytest.mark.parametrize("name", SLICES)
def test_replica_order_follows_jax_topology_aware_mesh(name):
    devices = _slice(*SLICES[name])
    grid = _mesh.default_device_grid(devices)
    want = mesh_utils.create_device_mesh((len(devices), 1), devices, allow_split_physical_axes=True)
    assert [d.id for d in grid.flat] == [d.id for d in want.flat]
    ordered = list(grid.flat)
    assert _non_neighbours(ordered) <= _non_neighbours(devices)
    assert sorted(d.id for d in ordered) == list(range(len(devices)))


def test_v5p_64_has_fewer_far_hops_than_raster_order():
    devices = _slice(*SLICES["v5p-64"])
    assert (
        _non_neighbours(devices),
        _non_neighbours(list(_mesh.default_device_grid(devices).flat)),
    ) == (15, 7)


def test_several_slices_are_grouped_slice_by_slice():
    shape, kind = SLICES["v5e-16"]
    devices = _slice(shape, kind, 0) + _slice(shape, kind, 1)
    grid = _mesh.default_device_grid(devices)
    slices = [d.slice_index for d in grid.flat]
    assert slices == [0] * 16 + [1] * 16, "the replica axis crosses slices once"
    first = list(grid.flat)[:16]
    assert _non_neighbours(first) == _non_neighbours(
        list(_mesh.default_device_grid(devices[:16]).flat)
    )


def test_logical_cores_group_neighbouring_chips():
    devices = _slice(*SLICES["v5e-16"])
    grid = _mesh.default_device_grid(devices, num_logical_cores=2)
    assert grid.shape == (8, 2)
    for first, second in grid:
        assert sum(abs(a - b) for a, b in zip(first.coords, second.coords)) == 1


def test_other_platforms_keep_the_given_order():
    devices = jax.devices()
    assert list(_mesh.default_device_grid(devices).flat) == devices
    assert list(ts.TPUStrategy().mesh.devices.flat) == devices


def test_a_bad_core_count_is_refused_before_any_ordering():
    with pytest.raises(ValueError, match="cannot be split into replicas of num_logical_cores=3"):
        ts.TPUStrategy(num_logical_cores=3)
    with pytest.raises(TypeError, match="num_logical_cores must be an int"):
        ts.TPUStrategy(num_logical_cores=2.0)


@pytest.mark.parametrize("cores", [2, 4])
@pytest.mark.parametrize("start", ["replicated", "split"])
def test_state_keeps_its_layout_over_the_cores_and_compiles_once(cores, start):
    """Parameters split over the cores stay split, uncopied; replicated ones stay replicated."""
    strategy = ts.TPUStrategy(num_logical_cores=cores)
    w = np.ones((4, 8), np.float32)
    if start == "split":
        w = jax.device_put(w, NamedSharding(strategy.mesh, P(None, strategy.logical_core_axes)))
        buffers = {s.data.unsafe_buffer_pointer() for s in w.addressable_shards}
        placed, _, _ = _placement.prepare(
            ((w,), {}),
            strategy.num_replicas_in_sync,
            _mesh.per_replica_sharding(strategy.mesh),
            _mesh.replicated_sharding(strategy.mesh),
            _placement.DonationRecord(),
        )
        assert {s.data.unsafe_buffer_pointer() for s in placed[0][0].addressable_shards} == (
            buffers
        ), "no copy to full size"
    state = {"w": w if start == "split" else strategy.replicate(w), "n": strategy.replicate(0)}
    x = ts.PerReplica([np.ones((2, 4), np.float32)] * strategy.num_replicas_in_sync)

    def step(state, x):
        w = strategy.experimental_split_to_logical_devices(state["w"], [1, cores])
        total = ts.get_replica_context().all_reduce("sum", (x @ w).sum())
        return {"w": state["w"] - 0.001 * total, "n": state["n"] + 1}, total

    for _ in range(4):
        state, _ = strategy.run(step, args=(state, x))
    assert strategy.compile_stats().num_compiles == 1
    spec = tuple(state["w"].sharding.spec)
    assert (spec == () or spec == (None,) * len(spec)) == (start == "replicated")
    per_device = {s.data.shape for s in state["w"].addressable_shards}
    assert per_device == ({(4, 8)} if start == "replicated" else {(4, 8 // cores)})
    assert int(state["n"]) == 4


def test_every_array_the_strategy_places_lives_on_its_mesh(strategy, tmp_path):
    """One mesh: what ``replicate``, values from a function, ``place_params``, ``run`` and a
    restored checkpoint give back lives on ``strategy.mesh``; tiles over two dimensions too."""
    n, cores = strategy.num_replicas_in_sync, strategy.num_logical_cores
    axes = strategy.logical_core_axes
    w = np.arange(32.0, dtype=np.float32).reshape(4, 8)
    state = {
        "replicated": strategy.replicate(w),
        "tiled": jax.device_put(w, NamedSharding(strategy.mesh, P(None, axes))),
        "placed": strategy.place_params(w, ts.LayoutRules([("", (None, "logical_core"))])),
        # 2x4 and 1x8: rows over the major core sub-axis, columns over the others
        "two_dims": jax.device_put(w, NamedSharding(strategy.mesh, P(axes[0], axes[1:] or None))),
    }
    ids = strategy.experimental_distribute_values_from_function(
        lambda ctx: np.float32(ctx.replica_id_in_sync_group)
    )

    dims = [strategy.mesh.shape[axes[0]], cores // strategy.mesh.shape[axes[0]]]

    def step(state, i):
        split = strategy.experimental_split_to_logical_devices(state["replicated"], dims)
        return jax.tree.map(lambda x: x + 1, state), split * i

    out, split = strategy.run(step, args=(state, ids))
    arrays = [*state.values(), ids.stacked, *out.values(), split.stacked]
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        manager.save(1, {"state": out, "ids": ids})
        restored = manager.restore({"state": out, "ids": ids})
    arrays += [*restored["state"].values(), restored["ids"].stacked]
    assert all(x.sharding.mesh == strategy.mesh for x in arrays)
    for name in state:
        np.testing.assert_array_equal(restored["state"][name], w + 1)
        assert restored["state"][name].sharding == out[name].sharding
    np.testing.assert_array_equal(split.stacked, np.arange(n)[:, None, None] * w)
    tile = {(4 // dims[0], 8 // dims[1])}
    assert {s.data.shape for s in out["two_dims"].addressable_shards} == tile
    assert {s.data.shape for s in split.stacked.addressable_shards} == {(1, *t) for t in tile}


def test_logical_core_in_a_spec_is_spelled_as_the_mesh_core_axes():
    two, four = _mesh.build_mesh(jax.devices(), 2), _mesh.build_mesh(jax.devices(), 4)
    eight = _mesh.build_mesh(jax.devices(), 8)
    assert _mesh.spell_cores(P(None, "logical_core"), two) == P(None, "logical_core")
    assert _mesh.spell_cores(P(("replica", "logical_core")), four) == P(
        ("replica", "logical_core.0", "logical_core.1")
    )
    # another factorisation's sub-axes for all of the cores: this mesh's in their place
    whole = P(None, ("logical_core.0", "logical_core.1", "logical_core.2"))
    assert _mesh.spell_cores(whole, four) == P(None, ("logical_core.0", "logical_core.1"))
    assert _mesh.spell_cores(P(None, ("logical_core.0", "logical_core.1")), two) == P(
        None, "logical_core"
    )
    tiles = P("logical_core.0", "logical_core.1")
    assert _mesh.spell_cores(tiles, eight) == tiles  # names the mesh has are kept
    with pytest.raises(ValueError, match=r"tiles 2 dimensions over logical cores named as the"):
        _mesh.spell_cores(tiles, two)


def _assignment():
    topology = ts.Topology.from_devices(jax.devices())
    return ts.DeviceAssignment.build(topology, [1, 1, 1, 2], num_replicas=4)


WRONG_CONSTRUCTOR_ARGUMENTS = {
    "devices str": (
        lambda: {"devices": "cpu"},
        TypeError,
        r"devices must be a list of jax\.Device, got str 'cpu'; pass jax\.devices\(\) or part",
    ),
    "devices ints": (
        lambda: {"devices": [0, 1]},
        TypeError,
        r"devices\[0\] is int 0, not a jax\.Device; pass devices from jax\.devices\(\)",
    ),
    "devices None": (
        lambda: {"devices": [None]},
        TypeError,
        r"devices\[0\] is NoneType None, not a jax\.Device",
    ),
    "devices one device": (
        lambda: {"devices": jax.devices()[0]},
        TypeError,
        r"got the single device CpuDevice\(id=0\); pass a list, e\.g\. devices=\[CpuDevice",
    ),
    "devices generator": (
        lambda: {"devices": (d for d in jax.devices())},
        TypeError,
        r"devices must be a list of jax\.Device, got generator",
    ),
    "devices mixed rows": (
        lambda: {"devices": [jax.devices()[:2], [jax.devices()[2], "x"]]},
        TypeError,
        r"devices\[1, 1\] is str 'x', not a jax\.Device",
    ),
    "devices 3-D": (
        lambda: {"devices": np.array(jax.devices(), dtype=object).reshape(2, 2, 2)},
        ValueError,
        r"devices has 3 dimensions \(shape \(2, 2, 2\)\); pass a flat list .* or a 2-D array",
    ),
    "devices empty": (lambda: {"devices": []}, ValueError, r"devices is empty; pass jax\.devices"),
    "devices duplicated": (
        lambda: {"devices": [jax.devices()[0]] * 2},
        ValueError,
        r"devices lists a device more than once; pass each device once",
    ),
    "cores 0": (
        lambda: {"num_logical_cores": 0},
        ValueError,
        r"num_logical_cores must be an int >= 1, got 0",
    ),
    "cores -1": (
        lambda: {"num_logical_cores": -1},
        ValueError,
        r"num_logical_cores must be an int >= 1, got -1",
    ),
    "cores 3": (
        lambda: {"num_logical_cores": 3},
        ValueError,
        r"8 devices cannot be split into replicas of num_logical_cores=3; use a num_logical_cores",
    ),
    "cores True": (
        lambda: {"num_logical_cores": True},
        TypeError,
        r"num_logical_cores must be an int, got the bool True; pass a whole number",
    ),
    "cores '2'": (
        lambda: {"num_logical_cores": "2"},
        TypeError,
        r"num_logical_cores must be an int, got str '2'; pass a whole number such as 2",
    ),
    "cores '2' with assignment": (
        lambda: {"num_logical_cores": "2", "device_assignment": _assignment()},
        TypeError,
        r"num_logical_cores must be an int, got str '2'",
    ),
    "cores 2.0": (
        lambda: {"num_logical_cores": 2.0},
        TypeError,
        r"num_logical_cores must be an int, got float 2\.0",
    ),
    "cores rows mismatch": (
        lambda: {"devices": np.array(jax.devices()).reshape(4, 2), "num_logical_cores": 4},
        ValueError,
        r"devices has shape \(4, 2\) but num_logical_cores=4; pass num_logical_cores=2",
    ),
    "in flight 0": (
        lambda: {"max_steps_in_flight": 0},
        ValueError,
        r"max_steps_in_flight must be an int >= 1, got 0",
    ),
    "in flight '2'": (
        lambda: {"max_steps_in_flight": "2"},
        TypeError,
        r"max_steps_in_flight must be an int, got str '2'; pass a whole number such as 2",
    ),
    "in flight 1.5": (
        lambda: {"max_steps_in_flight": 1.5},
        TypeError,
        r"max_steps_in_flight must be an int, got float 1\.5",
    ),
    "slices 0": (lambda: {"num_slices": 0}, ValueError, r"num_slices must be an int >= 1, got 0"),
    "slices 3": (
        lambda: {"num_slices": 3},
        ValueError,
        r"num_slices=3 does not divide the 8 replicas; declare a number of slices that divides 8",
    ),
    "slices True": (
        lambda: {"num_slices": True},
        TypeError,
        r"num_slices must be an int, got the bool True",
    ),
    "slices '2'": (
        lambda: {"num_slices": "2"},
        TypeError,
        r"num_slices must be an int, got str '2'",
    ),
    "assignment str": (
        lambda: {"device_assignment": "v4-8"},
        TypeError,
        r"device_assignment must be a ts\.DeviceAssignment, got str 'v4-8'; build one with "
        r"ts\.DeviceAssignment\.build",
    ),
    "assignment topology": (
        lambda: {"device_assignment": ts.Topology.from_devices(jax.devices())},
        TypeError,
        r"device_assignment must be a ts\.DeviceAssignment, got Topology",
    ),
    "assignment and devices": (
        lambda: {"device_assignment": _assignment(), "devices": jax.devices()},
        ValueError,
        r"pass either device_assignment or devices/num_logical_cores, not both",
    ),
    "spmd str": (
        lambda: {"spmd": "yes"},
        TypeError,
        r"spmd must be a bool, got str 'yes'; pass True or False",
    ),
    "spmd None": (
        lambda: {"spmd": None},
        TypeError,
        r"spmd must be a bool, got NoneType None",
    ),
}


@pytest.mark.parametrize("case", WRONG_CONSTRUCTOR_ARGUMENTS)
def test_every_constructor_argument_names_a_wrong_value(case):
    kwargs, error, message = WRONG_CONSTRUCTOR_ARGUMENTS[case]
    with pytest.raises(error, match=message):
        ts.TPUStrategy(**kwargs())


@pytest.mark.parametrize(
    "devices",
    [
        lambda: jax.devices(),
        lambda: tuple(jax.devices()),
        lambda: np.array(jax.devices()),
        lambda: np.array(jax.devices(), dtype=object).reshape(4, 2),
        lambda: [jax.devices()[i : i + 2] for i in range(0, 8, 2)],
    ],
    ids=["list", "tuple", "array", "2-D array", "2-D list"],
)
def test_devices_as_list_tuple_or_grid(devices):
    strategy = ts.TPUStrategy(devices=devices())
    grid = np.array(jax.devices(), dtype=object)
    assert strategy.num_replicas_in_sync == (4 if np.ndim(devices()) == 2 else 8)
    assert list(strategy.mesh.devices.flat) == list(grid)
    assert ts.TPUStrategy(spmd=np.bool_(True)).num_replicas_in_sync == 8
