"""The loops users write, on the MLP of step_overhead: tpustrat's defaults against hand-written JAX.

Workload: step_overhead's MLP 64-512-512-10, global batch 256, SGD, 8 replicas. Loops:
  (A) tpustrat plain     ``params = strategy.run(step, args=(params, batch))``, no options: what
                         a user writes first (the default window of 2 steps in flight);
  (B) hand-written best  ``jax.jit(jax.shard_map(...), donate_argnums=0)``, 4 steps in flight
                         (it waits on the loss, which nothing donates);
  (C) tpustrat loop      a distributed dataset of host batches (prefetched onto the devices),
                         ``run_steps`` with 8 steps per program, state donated;
  (D) hand-written naive ``jax.jit(jax.shard_map(...))`` fed the host batch (numpy) every step,
                         no donation, reading the loss every step (``float(loss)``);
  (E) hand-written ceiling (C)'s 8 steps per program written by hand (``lax.scan`` in one
                         ``jax.jit(jax.shard_map(...))``), state donated, 4 programs in flight,
                         on one batch put on the devices once: (C) with no input pipeline and
                         no runtime, the most (C) could gain over (D) on this machine.
(A), (B) and (E) reuse one batch already on the devices; (C) and (D) consume a host batch per
step.
Rounds alternate the loops. The table gives median steps/s, the ratio to (B) and to (D), and
each loop's spread over rounds ((max - min) / median). To find where (A)'s spread comes from,
(A) also runs with the garbage collector paused during its rounds, and with 4 steps in flight
as (B) has; every round records how many collections ran and how long they took
(``gc.callbacks``).
Writes ``defaults.json`` and ``defaults.png`` into ``results/local/`` (``--record``: into the
tracked ``results/``).

Usage: python benchmarks/defaults.py [--steps 200] [--rounds 9]  (about 1.5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import statistics
import time
from collections.abc import Callable

import _harness
import _results

_harness.prepare()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from step_overhead import (  # noqa: E402
    GLOBAL_BATCH,
    SIZES,
    global_batch,
    init_params,
    loss_fn,
    per_replica_batch,
    sgd,
    shard_map_step,
    tpustrat_step,
)

import tpustrat as ts  # noqa: E402

PLAIN, PLAIN_NO_GC = "(A) tpustrat plain run", "(A') (A), gc paused in rounds"
PLAIN_4 = "(A4) (A), max_steps_in_flight=4"
BEST, OWN, NAIVE = "(B) hand-written best", "(C) tpustrat loop", "(D) hand-written naive"
CEILING = "(E) hand-written ceiling"
STEPS_PER_RUN = 8
IN_FLIGHT = 4  # (B) and (E)


class GcWatch:
    """Counts garbage collections and their seconds while active (through ``gc.callbacks``)."""

    def __init__(self):
        self.count, self.seconds, self._start = 0, 0.0, 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase, info):
        del info
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._start

    def reset(self) -> tuple[int, float]:
        seen = (self.count, self.seconds)
        self.count, self.seconds = 0, 0.0
        return seen


def make_plain(params, x, y, pause_gc: bool = False, **options) -> Callable[[int], float]:
    strategy = ts.TPUStrategy(**options)
    batch = per_replica_batch(strategy, x, y)
    holder = {"params": strategy.replicate(params)}

    def run(steps):
        p = holder["params"]
        if pause_gc:
            gc.disable()
        start = time.perf_counter()
        for _ in range(steps):
            p = strategy.run(tpustrat_step, args=(p, batch))
        jax.block_until_ready(p)
        elapsed = time.perf_counter() - start
        gc.enable()
        holder["params"] = p
        return steps / elapsed

    return run


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()), ("replica",))


def _body(params, x, y):
    """The step of (B), (D) and (E): step_overhead's train_body, also returning the loss."""
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    loss, grads = jax.lax.pmean((loss, grads), "replica")
    return sgd(params, grads), loss


def make_best(params, x, y) -> Callable[[int], float]:
    mesh = _mesh()
    return _in_flight_loop(shard_map_step(mesh, _body, donate_argnums=0), mesh, params, x, y, 1)


def _in_flight_loop(program, mesh, params, x, y, steps_per_call: int) -> Callable[[int], float]:
    """(B) and (E): ``program(params, x, y) -> (params, loss)``, ``steps_per_call`` steps a
    call, on a batch put on the devices once, the state donated and ``IN_FLIGHT`` calls in
    flight (waiting on the loss, which nothing donates)."""
    x, y = jax.device_put((x, y), NamedSharding(mesh, P("replica")))
    holder = {"params": jax.device_put(params, NamedSharding(mesh, P()))}

    def run(steps):
        start = time.perf_counter()
        holder["params"], _ = _harness.in_flight(
            lambda state: program(state[0], x, y),
            (holder["params"], None),
            steps // steps_per_call,
            IN_FLIGHT,
            ready=lambda state: state[1],
        )
        return steps / (time.perf_counter() - start)

    return run


def _step_with_loss(params, batch):
    x, y = batch
    ctx = ts.get_replica_context()
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    loss, grads = ctx.all_reduce("mean", (loss, grads))
    return sgd(params, grads), loss


def make_own(params, x, y) -> Callable[[int], float]:
    strategy = ts.TPUStrategy()
    donate = ts.RunOptions(donate_argnums=(0,))
    holder = {"params": strategy.replicate(params)}

    def run(steps):
        iterator = iter(strategy.experimental_distribute_dataset(itertools.repeat((x, y), steps)))
        p = holder["params"]
        start = time.perf_counter()
        for _ in range(steps // STEPS_PER_RUN):
            p = strategy.run_steps(
                _step_with_loss, p, iterator, STEPS_PER_RUN, options=donate
            ).state
        jax.block_until_ready(p)
        elapsed = time.perf_counter() - start
        iterator.close()
        holder["params"] = p
        return steps / elapsed

    return run


def make_naive(params, x, y) -> Callable[[int], float]:
    step = shard_map_step(_mesh(), _body)
    holder = {"params": params}

    def run(steps):
        p = holder["params"]
        start = time.perf_counter()
        for _ in range(steps):
            p, loss = step(p, x, y)
            float(loss)
        jax.block_until_ready(p)
        holder["params"] = p
        return steps / (time.perf_counter() - start)

    return run


def make_ceiling(params, x, y) -> Callable[[int], float]:
    mesh = _mesh()

    def scanned(params, x, y):
        return jax.lax.scan(lambda p, _: _body(p, x, y), params, None, length=STEPS_PER_RUN)

    program = shard_map_step(mesh, scanned, donate_argnums=0)
    return _in_flight_loop(program, mesh, params, x, y, STEPS_PER_RUN)


def plot(rows: list[dict], title: str):
    """Median steps/s per loop, whiskers from the slowest to the fastest round."""
    rows = rows[::-1]
    fig = _results.figure(figsize=(10, 0.6 * len(rows) + 1.4))
    ax = fig.subplots()
    medians = [row["median"] for row in rows]
    low = [m - min(row["rounds"]) for m, row in zip(medians, rows)]
    high = [max(row["rounds"]) - m for m, row in zip(medians, rows)]
    bars = ax.barh(
        [row["variant"] for row in rows], medians, xerr=[low, high], color="#4c72b0", capsize=4
    )
    for bar, row in zip(bars, rows):
        ax.text(
            bar.get_width() * 0.02,
            bar.get_y() + bar.get_height() / 2,
            f"{row['median']:.0f} steps/s, {row['ratio']:.3f} x (B), "
            f"{row['ratio_to_naive']:.2f} x (D), spread {row['spread']:.2f}",
            va="center",
            color="white",
            fontsize=8,
        )
    ax.set_xlabel("steps/s (median; whiskers: min and max over rounds)")
    ax.set_title(title, fontsize=9)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help=f"multiple of {STEPS_PER_RUN}")
    parser.add_argument("--rounds", type=int, default=9)
    _results.add_arguments(parser)
    args = parser.parse_args()
    params = jax.tree.map(np.asarray, init_params(jax.random.key(0)))
    x, y = global_batch()
    loops = {
        PLAIN: make_plain(params, x, y),
        PLAIN_NO_GC: make_plain(params, x, y, pause_gc=True),
        PLAIN_4: make_plain(params, x, y, max_steps_in_flight=IN_FLIGHT),
        BEST: make_best(params, x, y),
        OWN: make_own(params, x, y),
        NAIVE: make_naive(params, x, y),
        CEILING: make_ceiling(params, x, y),
    }
    for run in loops.values():
        run(2 * STEPS_PER_RUN)  # compile and warm up
    watch, collections_seen = GcWatch(), {name: [] for name in loops}

    def watched(name, run):
        watch.reset()
        rate = run(args.steps)
        collections_seen[name].append(watch.reset())
        return rate

    rates = _harness.alternate(
        {name: functools.partial(watched, name, run) for name, run in loops.items()}, args.rounds
    )
    rows = _harness.summarize(rates, BEST, per_second=True)
    naive = statistics.median(rates[NAIVE])
    for row in rows:
        seen = collections_seen[row["variant"]]
        row["ratio_to_naive"] = row["median"] / naive
        row["gc_collections_per_round"] = statistics.median(c for c, _ in seen)
        row["gc_ms_per_round"] = 1e3 * statistics.median(s for _, s in seen)
    title = (
        f"MLP {'-'.join(map(str, SIZES))}, global batch {GLOBAL_BATCH}, "
        f"{jax.device_count()} x {jax.devices()[0].platform}, {args.rounds} rounds of "
        f"{args.steps} steps"
    )
    data = _results.record("defaults", title, rows=rows)
    print(f"\n{title}\n{data['machine']}, jax {jax.__version__}")
    columns = {
        "/ (D)": lambda row: f"{row['ratio_to_naive']:.2f}",
        "gc/round": lambda row: f"{row['gc_collections_per_round']:.0f}",
        "gc ms": lambda row: f"{row['gc_ms_per_round']:.1f}",
    }
    print(_harness.summary_table(rows, "steps/s", columns))
    _results.write(data, args, plot(rows, f"{title}\n{data['machine']}"))


if __name__ == "__main__":
    main()
