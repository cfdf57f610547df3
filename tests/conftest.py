"""Eight CPU devices for every test (XLA_FLAGS must be set before jax is imported), the mesh
shapes tests parametrize over, and the helpers several test files share.

Test files import the shapes and helpers by name (``from conftest import MESH_SHAPES, mesh_id``).
"""

import dataclasses
import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import pytest

import tpustrat as ts
from tpustrat._accounting import backend_compiles

SOURCE_TREE = pathlib.Path(__file__).resolve().parent.parent / "tpustrat"

if (
    os.environ.get("TPUSTRAT_TEST_INSTALLED") == "1"
    and pathlib.Path(ts.__file__).resolve().parent == SOURCE_TREE
):
    raise RuntimeError(
        f"TPUSTRAT_TEST_INSTALLED=1 asks to test the installed wheel, but tpustrat was imported "
        f"from the source tree ({ts.__file__}); run the venv's pytest script rather than "
        "`python -m pytest`, which puts the working directory on sys.path"
    )


def pytest_report_header(config):
    return f"tpustrat from {pathlib.Path(ts.__file__).parent}; jax {jax.__version__}"


MESH_SHAPES = [(8, 1), (4, 2), (2, 4), (1, 8)]
"""Every mesh of the 8 devices: (replicas, logical cores per replica)."""

SEVERAL_REPLICAS = [shape for shape in MESH_SHAPES if shape[0] > 1]
"""The meshes with more than one replica (8x1, 4x2, 2x4): where replicas can disagree."""

TWO_MESH_SHAPES = [(8, 1), (4, 2)]
"""One mesh without logical cores and one with, for tests too slow to run on every mesh."""


def mesh_id(shape: tuple[int, int]) -> str:
    """The test id of a mesh shape: ``"4x2"`` for 4 replicas of 2 logical cores."""
    return f"{shape[0]}x{shape[1]}"


def per_replica_rows(strategy: ts.TPUStrategy, data) -> ts.PerReplica:
    """Row ``i`` of ``data`` given to replica ``i``, through the strategy's value function."""
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: data[ctx.replica_id_in_sync_group]
    )


def deleted_array() -> jax.Array:
    """An array whose buffer is deleted: what a donated argument leaves behind."""
    x = jnp.ones(3)
    x.delete()
    return x


@dataclasses.dataclass(frozen=True)
class FakeTpu:
    """The attributes of a jax TPU device that the mesh and the topology read."""

    id: int
    process_index: int
    coords: tuple[int, int, int]
    device_kind: str = "TPU v4"
    core_on_chip: int = 0
    slice_index: int = 0
    platform: str = "tpu"


@pytest.fixture(params=MESH_SHAPES, ids=mesh_id)
def strategy(request) -> ts.TPUStrategy:
    """A strategy on each mesh shape (replicas x logical cores) over the 8 CPU devices."""
    assert jax.device_count() == 8, "conftest must run before jax is imported"
    return ts.TPUStrategy(num_logical_cores=request.param[1])


@pytest.fixture
def compile_count():
    """A function returning how many XLA programs were compiled since the fixture started."""
    start = backend_compiles()
    return lambda: backend_compiles() - start
