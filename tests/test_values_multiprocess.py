"""Typed PRNG keys and process-local arrays placed by a job of 2 processes x 4 CPU devices.

In a job of several processes ``jax.device_put`` cannot move a typed key, or an array on one
process's devices, to devices of other processes; ``replicate`` and ``run`` place them through
the host. One launch runs the whole workload of ``_values_workers``; the reference is the same
workload in this process, on 8 devices.
"""

import importlib
import pathlib

import _values_workers as workers
import jax
import numpy as np
import pytest

from tpustrat.testing import run_in_local_processes

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


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
    split = [jax.random.key_data(jax.random.split(jax.random.key(i), 2)) for i in range(n)]
    np.testing.assert_array_equal(want["gathered_keys"], np.concatenate(split))
    for process in processes:
        got = process[cores]
        assert sorted(got) == sorted(want)
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.slow  # a reference and 2 processes, each training and evaluating: 45-75 s on 2 cores
def test_preemptible_example_trains_in_two_processes(monkeypatch, tmp_path):
    """It replicates its dropout key, a typed key, onto devices of both processes."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    example = importlib.import_module("preemptible_digits")
    flags = ["--steps", "4", "--save-every", "2", "--batch-size", "64"]
    want = example.main(["--checkpoint-dir", str(tmp_path / "one"), *flags])
    processes = run_in_local_processes(
        example.main,
        2,
        devices_per_process=4,
        args=(["--checkpoint-dir", str(tmp_path / "two"), *flags],),
        timeout=180,
    )
    for got in processes:
        assert (got.first_step, got.last_step) == (0, 4)
        assert got.test_accuracy == want.test_accuracy
        for g, w in zip(got.params, want.params, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
