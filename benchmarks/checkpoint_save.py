"""How long a checkpoint save blocks the training loop: asynchronous against synchronous,
with and without the leaves' digests.

A training state of ``--megabytes`` MB of float32 parameters (plus as much Adam-like state),
replicated over 8 replicas, is saved with ``ts.CheckpointManager``:
  async  ``save`` returns once the arrays are copied off the devices; orbax writes them in a
         background thread. "blocked" is the time ``save`` took, what the loop waits;
         "committed" is the time until ``wait_until_finished`` returned.
  sync   ``CheckpointManager(asynchronous=False)``: ``save`` returns when the step is
         committed, so the loop is blocked for the whole write.
Each is run with digests (the default: ``save`` also copies each leaf to the host, and the
save thread hashes the copies) and without (``digests=False``). Rounds alternate the order of
the four; the table shows the median and range over rounds, and the ratios with/without
digests. Writes ``checkpoint_save.json`` (see ``_results.py`` for where; ``--record`` for
``results/``).

Usage: python benchmarks/checkpoint_save.py [--megabytes 64] [--rounds 5] [--record]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import _results

PARSER = argparse.ArgumentParser(description=__doc__.splitlines()[0])
PARSER.add_argument("--megabytes", type=float, default=64, help="size of the whole state")
PARSER.add_argument("--rounds", type=int, default=5)
_results.add_arguments(PARSER)
ARGS = PARSER.parse_args()
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import jax  # noqa: E402
import numpy as np  # noqa: E402

import tpustrat as ts  # noqa: E402


def make_state(strategy: ts.TPUStrategy, megabytes: float) -> dict:
    """Params and two moments (Adam-like), 8 layers each, ``megabytes`` MB in all."""
    floats = int(megabytes * 2**20 / 4 / 3 / 8)
    rng = np.random.default_rng(0)
    layers = {f"layer_{i}": rng.normal(size=floats).astype(np.float32) for i in range(8)}
    zeros = {name: np.zeros_like(x) for name, x in layers.items()}
    state = {"params": layers, "mu": zeros, "nu": zeros, "step": np.int32(0)}
    return strategy.replicate(state)


def state_bytes(state: dict) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state))


CONFIGURATIONS = {
    "async": {"asynchronous": True, "digests": True},
    "async, no digests": {"asynchronous": True, "digests": False},
    "sync": {"asynchronous": False, "digests": True},
    "sync, no digests": {"asynchronous": False, "digests": False},
}


def time_save(strategy, state, step: int, options: dict) -> tuple[float, float]:
    """(seconds ``save`` blocked, seconds until the step was committed)."""
    with tempfile.TemporaryDirectory() as directory:
        manager = ts.CheckpointManager(directory, strategy, **options)
        jax.block_until_ready(state)
        start = time.perf_counter()
        manager.save(step, state)
        blocked = time.perf_counter() - start
        manager.wait_until_finished()
        committed = time.perf_counter() - start
        manager.close()
    return blocked, committed


def summary(values: list[float]) -> dict:
    return {
        "median_s": statistics.median(values),
        "min_s": min(values),
        "max_s": max(values),
        "rounds_s": values,
    }


def main() -> None:
    strategy = ts.TPUStrategy()
    state = make_state(strategy, ARGS.megabytes)
    size = state_bytes(state)
    for options in CONFIGURATIONS.values():  # warm-up: orbax's first save sets up its threads
        time_save(strategy, state, 0, options)
    runs = {name: ([], []) for name in CONFIGURATIONS}
    for round_index in range(ARGS.rounds):
        order = list(CONFIGURATIONS)
        order = order[round_index % len(order) :] + order[: round_index % len(order)]
        for name in order:
            blocked, committed = time_save(strategy, state, round_index + 1, CONFIGURATIONS[name])
            runs[name][0].append(blocked)
            runs[name][1].append(committed)
    rows = {
        name: {"blocked": summary(blocked), "committed": summary(committed)}
        for name, (blocked, committed) in runs.items()
    }

    def median(name: str, what: str) -> float:
        return rows[name][what]["median_s"]

    ratio = median("sync", "blocked") / median("async", "blocked")
    digest_ratios = {
        f"{mode} {what}": median(mode, what) / median(f"{mode}, no digests", what)
        for mode in ("async", "sync")
        for what in ("blocked", "committed")
    }
    print(f"state: {size / 2**20:.1f} MB on {strategy}; {ARGS.rounds} rounds")
    print(f"{'save':<19}{'loop blocked (median, range)':>34}{'committed (median)':>22}")
    for name, row in rows.items():
        b, c = row["blocked"], row["committed"]
        blocked = f"{b['median_s'] * 1e3:.0f} ms ({b['min_s'] * 1e3:.0f}-{b['max_s'] * 1e3:.0f})"
        print(f"{name:<19}{blocked:>34}{c['median_s'] * 1e3:>19.0f} ms")
    print(f"a synchronous save blocks the loop {ratio:.1f}x as long as an asynchronous one")
    for name, value in digest_ratios.items():
        print(f"with digests / without, {name}: {value:.2f}x")
    record = {
        "benchmark": "checkpoint_save",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "jax": jax.__version__,
            "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        },
        "state_bytes": size,
        "rounds": ARGS.rounds,
        "results": rows,
        "sync_over_async_blocked": ratio,
        "digests_over_none": digest_ratios,
    }
    out = _results.folder(ARGS)
    (out / "checkpoint_save.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out / 'checkpoint_save.json'}")


if __name__ == "__main__":
    main()
