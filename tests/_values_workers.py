"""What the processes of tests/test_values_multiprocess.py run; each child imports this by name.

``place_keys_and_arrays`` places typed PRNG keys and process-local arrays every way the value
model does (``replicate``, ``run``'s replicated and PerReplica arguments) and returns host
values, which the test compares between 1 process of 8 devices and 2 processes of 4.
"""

import jax
import numpy as np

import tpustrat as ts

CORE_COUNTS = (1, 2)


def _on_one_device(x):
    """``x`` committed to this process's first device, as a user's own array would be."""
    return jax.device_put(x, jax.local_devices()[0])


def _keys_and_arrays(strategy):
    n = strategy.num_replicas_in_sync
    key = strategy.replicate(jax.random.key(7))
    state = strategy.replicate(
        {"key": jax.random.key(1), "w": _on_one_device(np.arange(3, dtype=np.float32))}
    )

    def draw(key, state):
        ctx = ts.get_replica_context()
        return jax.random.uniform(ctx.replica_key(key), (2,)) + state["w"].sum()

    draws = strategy.run(draw, args=(key, state))
    split = strategy.run(
        lambda k, w: (jax.random.key_data(jax.random.split(k)[0]), w * 2),
        args=(jax.random.key(3), _on_one_device(np.ones(2, np.float32))),
    )
    keys = ts.PerReplica([jax.random.key(i) for i in range(n)])  # typed keys built on the host
    key_bits = strategy.run(lambda k: jax.random.key_data(k)[None], args=(keys,))
    split_keys = strategy.experimental_distribute_values_from_function(
        lambda ctx: jax.random.split(jax.random.key(ctx.replica_id_in_sync_group), 2)
    )
    return {
        "key": np.asarray(jax.random.key_data(key)),
        "state_key": np.asarray(jax.random.key_data(state["key"])),
        "w": np.asarray(state["w"]),
        "draws": np.asarray(strategy.gather(draws, axis=0)),
        "split": np.asarray(split[0]),
        "doubled": np.asarray(split[1]),
        "key_bits": np.asarray(strategy.gather(key_bits, axis=0)),
        "gathered_keys": np.asarray(jax.random.key_data(strategy.gather(split_keys, axis=0))),
    }


def place_keys_and_arrays():
    """The workload for each core count; in a child process, after joining the job."""
    return {
        cores: _keys_and_arrays(ts.TPUStrategy(num_logical_cores=cores)) for cores in CORE_COUNTS
    }
