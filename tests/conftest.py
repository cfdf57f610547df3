"""Eight CPU devices for every test: XLA_FLAGS must be set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

import tpustrat as ts
from tpustrat._accounting import backend_compiles

MESH_SHAPES = [(8, 1), (4, 2), (2, 4), (1, 8)]


def _mesh_id(shape):
    return f"{shape[0]}x{shape[1]}"


@pytest.fixture(params=MESH_SHAPES, ids=_mesh_id)
def strategy(request) -> ts.TPUStrategy:
    """A strategy on each mesh shape (replicas x logical cores) over the 8 CPU devices."""
    assert jax.device_count() == 8, "conftest must run before jax is imported"
    return ts.TPUStrategy(num_logical_cores=request.param[1])


@pytest.fixture
def compile_count():
    """A function returning how many XLA programs were compiled since the fixture started."""
    start = backend_compiles()
    return lambda: backend_compiles() - start
