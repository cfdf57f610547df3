"""Host APIs at pod scale: 256 and 1,024 simulated devices, each count in its own process.

The conftest's 8 devices are fixed once JAX starts, so each count runs the worker below
in a subprocess with its own ``XLA_FLAGS``. Each API must finish, give exact values, place
local results on their own replica's devices, and compile nothing per replica.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    import tpustrat as ts
    from tpustrat._accounting import backend_compiles

    strategy = ts.TPUStrategy()
    n = strategy.num_replicas_in_sync
    host = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    value = strategy.experimental_distribute_values_from_function(
        lambda ctx: host[ctx.replica_id_in_sync_group])
    jax.block_until_ready(value.stacked)
    before = backend_compiles()
    local = strategy.experimental_local_results(value)
    components = value.values
    on_own_devices = all(
        c.sharding.device_set == set(strategy.mesh.devices[r].flat)
        for r, c in enumerate(local))
    total = strategy.reduce("sum", value)
    gathered = strategy.gather(value, axis=0)
    element = next(iter(strategy.experimental_distribute_dataset(
        [host.reshape(-1)], ts.InputOptions(experimental_per_replica_buffer_size=0))))
    print(json.dumps({
        "replicas": n,
        "compiles": backend_compiles() - before,
        "local_equal": all(np.array_equal(np.asarray(c), host[r]) for r, c in enumerate(local)),
        "values_equal": all(
            np.array_equal(np.asarray(c), host[r]) for r, c in enumerate(components)),
        "on_own_devices": on_own_devices,
        "sum": np.asarray(total).tolist(),
        "gathered_equal": bool(np.array_equal(np.asarray(gathered), host.reshape(-1))),
        "element": list(element.stacked.shape),
    }))
    """
)


@pytest.mark.parametrize("devices", [256, 1024])
def test_host_apis_finish_exactly_and_compile_nothing_per_replica(devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.setdefault("JAX_PLATFORMS", "cpu")
    done = subprocess.run(
        [sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replicas"] == devices
    assert result["local_equal"] and result["values_equal"] and result["gathered_equal"]
    assert result["on_own_devices"], "replica i's local result lives on replica i's devices"
    column = [float(sum(4 * r + c for r in range(devices))) for c in range(4)]
    assert result["sum"] == column
    assert result["element"] == [devices, 4]
    # A few programs compiled once for all replicas (merging the replica axis for the local
    # results, say), never one per replica: hundreds of those would take seconds and can abort.
    assert result["compiles"] <= 4, "host APIs must not compile a program per replica"
