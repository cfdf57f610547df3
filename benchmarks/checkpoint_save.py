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
digests. Writes ``checkpoint_save.json`` into ``results/local/`` (``--record``: into the tracked
``results/``).

Usage: python benchmarks/checkpoint_save.py [--megabytes 64] [--rounds 5] [--record]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import _harness
import _results

_harness.prepare()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import tpustrat as ts  # noqa: E402

CONFIGURATIONS = {
    "async": {"asynchronous": True, "digests": True},
    "async, no digests": {"asynchronous": True, "digests": False},
    "sync": {"asynchronous": False, "digests": True},
    "sync, no digests": {"asynchronous": False, "digests": False},
}


def make_state(strategy: ts.TPUStrategy, megabytes: float) -> dict:
    """Params and two moments (Adam-like), 8 layers each, ``megabytes`` MB in all."""
    floats = int(megabytes * 2**20 / 4 / 3 / 8)
    rng = np.random.default_rng(0)
    layers = {f"layer_{i}": rng.normal(size=floats).astype(np.float32) for i in range(8)}
    zeros = {name: np.zeros_like(x) for name, x in layers.items()}
    state = {"params": layers, "mu": zeros, "nu": zeros, "step": np.int32(0)}
    return strategy.replicate(state)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=64, help="size of the whole state")
    parser.add_argument("--rounds", type=int, default=5)
    _results.add_arguments(parser)
    args = parser.parse_args()
    strategy = ts.TPUStrategy()
    state = make_state(strategy, args.megabytes)
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    for options in CONFIGURATIONS.values():  # warm-up: orbax's first save sets up its threads
        time_save(strategy, state, 0, options)
    committed: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
    steps = iter(range(1, 10**9))

    def variant(name: str):
        def save() -> float:
            blocked, done = time_save(strategy, state, next(steps), CONFIGURATIONS[name])
            committed[name].append(done * 1e3)
            return blocked * 1e3

        return save

    blocked = _harness.alternate({name: variant(name) for name in CONFIGURATIONS}, args.rounds)
    tables = {}
    for what, samples in (("blocked", blocked), ("committed", committed)):
        rows = []
        for mode in ("async", "sync"):
            pair = {mode: samples[mode], f"{mode}, no digests": samples[f"{mode}, no digests"]}
            rows += _harness.summarize(pair, f"{mode}, no digests", per_second=False)
        tables[what] = rows
    sync_over_async = _harness.summarize(
        {"sync": blocked["sync"], "async": blocked["async"]}, "async", per_second=False
    )[0]
    title = (
        f"{size / 2**20:.1f} MB state on {strategy}, {args.rounds} rounds; ratios are with "
        "digests over without"
    )
    print(f"\n{title}")
    for what, rows in tables.items():
        print(f"\nloop {what}" if what == "blocked" else f"\n{what}")
        print(_harness.summary_table(rows, "median ms"))
    print(
        f"\na synchronous save blocks the loop {sync_over_async['ratio']:.1f}x as long as an "
        "asynchronous one"
    )
    _results.write(
        _results.record(
            "checkpoint_save",
            title,
            state_bytes=size,
            rounds=args.rounds,
            blocked=tables["blocked"],
            committed=tables["committed"],
            sync_over_async_blocked=sync_over_async["ratio"],
        ),
        args,
    )


if __name__ == "__main__":
    main()
