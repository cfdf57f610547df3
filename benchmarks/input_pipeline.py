"""Does prefetch hide the input pipeline? Step time with and without a background thread.

A loader sleeps X ms per global batch (standing in for reading and decoding); the step runs a
matmul loop calibrated to about Y ms on the devices (8 simulated ones on a CPU-only host). The
loop reads the loss after every step, as a loop that logs it does, so without prefetch each step
costs about X + Y; with ``experimental_per_replica_buffer_size=2`` the next batches load while
the step runs and a step costs about max(X, Y). Runs with and without prefetch, and of the step
alone, alternate (their order rotating), so drift in the machine's load touches all three; each
number is the median over repeats of the steady-state time per step (the first step of each
epoch, which also fills the buffer, is left out).

Prints a table and writes ``input_pipeline.json`` and ``input_pipeline.png`` into
``results/local/`` (``--record``: into the tracked ``results/``).

Usage: python benchmarks/input_pipeline.py [--batches 20] [--repeats 3]  (about 20 s on 2 cores)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import _harness
import _results

_harness.prepare()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import tpustrat as ts  # noqa: E402

GLOBAL_BATCH = 256
FEATURES = 128
CONFIGS_MS = [(10, 30), (20, 20), (30, 10)]  # (loader X, step Y)


class SleepyLoader:
    """A re-iterable dataset whose every batch takes ``sleep_ms`` to 'load'."""

    def __init__(self, sleep_ms: float, num_batches: int):
        self.sleep_s = sleep_ms / 1e3
        self.num_batches = num_batches
        rng = np.random.default_rng(0)
        self.batch = {"x": rng.normal(size=(GLOBAL_BATCH, FEATURES)).astype(np.float32)}

    def __iter__(self):
        for _ in range(self.num_batches):
            time.sleep(self.sleep_s)
            yield self.batch

    def __len__(self):
        return self.num_batches


def step(batch, weights, iterations):
    """``iterations`` rounds of a small matmul per replica, then an all-reduced loss."""
    x = jax.lax.fori_loop(0, iterations, lambda _, h: jnp.tanh(h @ weights), batch["x"])
    return ts.get_replica_context().all_reduce("mean", jnp.mean(x**2))


def step_ms(strategy, batch, weights, iterations: int) -> float:
    """Median milliseconds of one step with ``iterations`` loop rounds, loss read back."""
    iterations = np.int32(iterations)
    float(strategy.run(step, args=(batch, weights, iterations)))  # compile, warm up
    times = []
    for _ in range(7):
        start = time.perf_counter()
        float(strategy.run(step, args=(batch, weights, iterations)))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def calibrate(strategy, weights, target_ms: float) -> int:
    """The loop count that makes one step take about ``target_ms``."""
    (batch,) = strategy.experimental_distribute_dataset(SleepyLoader(0, 1))
    low, high = 32, 256  # a line through two points: fixed cost plus cost per round
    low_ms, high_ms = (step_ms(strategy, batch, weights, n) for n in (low, high))
    per_round = (high_ms - low_ms) / (high - low)
    return max(1, round(low + (target_ms - low_ms) / per_round))


def epoch_step_ms(strategy, weights, loader, iterations: int, buffer_size: int) -> float:
    """Steady-state milliseconds per step of one epoch, reading the loss every step."""
    options = ts.InputOptions(experimental_per_replica_buffer_size=buffer_size)
    dist = strategy.experimental_distribute_dataset(loader, options)
    start = None
    for batch in dist:
        float(strategy.run(step, args=(batch, weights, iterations)))
        if start is None:
            start = time.perf_counter()
    return (time.perf_counter() - start) * 1e3 / (len(loader) - 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="batches per timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="epochs of each kind per config")
    _results.add_arguments(parser)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    strategy = ts.TPUStrategy()
    rng = np.random.default_rng(1)
    weights = strategy.replicate(
        (rng.normal(size=(FEATURES, FEATURES)) / np.sqrt(FEATURES)).astype(np.float32)
    )
    title = (
        f"{strategy.num_replicas_in_sync} replicas, global batch {GLOBAL_BATCH}x{FEATURES}, "
        f"{args.batches} batches per epoch, {args.repeats} epochs each"
    )
    rows = []
    for loader_ms, target_ms in CONFIGS_MS:
        iterations = np.int32(calibrate(strategy, weights, target_ms))
        runs = {  # name: (loader, buffer size); "step" is Y alone: a loader that never sleeps
            "step": (SleepyLoader(0, args.batches), 0),
            "prefetch": (SleepyLoader(loader_ms, args.batches), 2),
            "sync": (SleepyLoader(loader_ms, args.batches), 0),
        }
        times = _harness.alternate(
            {
                name: functools.partial(
                    epoch_step_ms, strategy, weights, loader, iterations, buffer_size
                )
                for name, (loader, buffer_size) in runs.items()
            },
            args.repeats,
        )
        medians = {
            row["variant"]: row["median"] for row in _harness.summarize(times, "step", False)
        }
        rows.append(
            {
                "loader_ms": loader_ms,
                "step_target_ms": target_ms,
                "step_ms": medians["step"],
                "prefetch_ms": medians["prefetch"],
                "sync_ms": medians["sync"],
                "max_ms": max(loader_ms, medians["step"]),
                "sum_ms": loader_ms + medians["step"],
                "runs_ms": times,
            }
        )
    print(title)
    print("ms per step. X: loader sleep per batch; Y: the step alone (target, then measured")
    print("in the same alternation with a loader that never sleeps)")
    print(
        _harness.table(
            ["X", "Y", "Y measured", "prefetch", "sync", "max(X, Y)", "X + Y"],
            [
                [
                    row["loader_ms"],
                    row["step_target_ms"],
                    f"{row['step_ms']:.1f}",
                    f"{row['prefetch_ms']:.1f}",
                    f"{row['sync_ms']:.1f}",
                    f"{row['max_ms']:.1f}",
                    f"{row['sum_ms']:.1f}",
                ]
                for row in rows
            ],
        )
    )
    _results.write(_results.record("input_pipeline", title, rows=rows), args, plot(rows, title))


def plot(rows: list[dict], title: str):
    """ms per step with and without prefetch, against max(X, Y) and X + Y, per config."""
    fig = _results.figure(figsize=(7, 3.8))
    ax = fig.subplots()
    positions = np.arange(len(rows))
    width = 0.35
    for offset, key, label in ((-1, "prefetch_ms", "with prefetch"), (1, "sync_ms", "synchronous")):
        bars = ax.bar(positions + offset * width / 2, [r[key] for r in rows], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    for key, marker, label in (("max_ms", "_", "max(X, Y)"), ("sum_ms", "x", "X + Y")):
        ax.scatter(
            positions,
            [r[key] for r in rows],
            marker=marker,
            s=200,
            color="black",
            label=label,
            zorder=3,
        )
    ax.set_xticks(positions, [f"X={r['loader_ms']} ms\nY={r['step_ms']:.1f} ms" for r in rows])
    ax.set_ylabel("ms per step (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


if __name__ == "__main__":
    main()
