"""Eight CPU devices for every test: XLA_FLAGS must be set before jax is imported."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
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
