"""Typed PRNG keys and process-local arrays placed by a job of 2 processes x 4 CPU devices.

In a job of several processes ``jax.device_put`` cannot move a typed key, or an array on one
process's devices, to devices of other processes; ``replicate`` and ``run`` place them through
the host. One launch runs the whole workload of ``_values_workers``; the reference is the same
workload in this process, on 8 devices.
"""

import _values_workers as workers
import jax
import numpy as np
import pytest

from tpustrat.testing import run_in_local_processes


@pytest.fixture(scope="module")
def results():
    reference = workers.place_keys_and_arrays()
    processes = run_in_local_processes(
        workers.place_keys_and_arrays, 2, devices_per_process=4, timeout=120
    )
    return reference, processes


@pytest.mark.parametrize("cores", workers.CORE_COUNTS)
def test_keys_and_local_arrays_place_as_in_one_process(results, cores):
    reference, processes = results
    want = reference[cores]
    np.testing.assert_array_equal(want["key"], jax.random.key_data(jax.random.key(7)))
    np.testing.assert_array_equal(want["w"], [0.0, 1.0, 2.0])
    n = 8 // cores
    assert want["draws"].shape == (2 * n,) and len(set(want["draws"].tolist())) == 2 * n
    bits = np.stack([jax.random.key_data(jax.random.key(i)) for i in range(n)])
    np.testing.assert_array_equal(want["key_bits"], bits)
    for process in processes:
        got = process[cores]
        assert sorted(got) == sorted(want)
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)
