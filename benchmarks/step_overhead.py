"""Step rate of one MLP training step: tpustrat's strategy.run against hand-written JAX and Keras.

Workload: an MLP 64-512-512-10, global batch 256, SGD, on 8 replicas. Variants:
  (a) tpustrat  ``strategy.run`` called from Python, its default dispatch window;
  (b) shard_map ``jax.jit(jax.shard_map(...))`` written by hand, the same step and window;
  (c) auto      ``jax.jit`` with NamedSharding inputs, left to the SPMD partitioner;
  (d) Keras 3   ``model.fit`` under ``keras.distribution.DataParallel`` (JAX backend), when
                keras is installed (the ``bench`` extra). Keras feeds each step a host batch
                and runs its own loop; a callback holds it to the same window, and its time is
                from ``on_train_begin`` to ``on_train_end`` of a fit over exactly the timed
                steps.
Runs alternate (a b c d, b c d a, c d a b, ...) so that machine noise hits every variant alike;
the table shows median steps/s, the ratio of medians to (b), and the median over rounds of
each round's ratio to (b) (steadier when the machine's load drifts). Then (a) and (b) run a
step that computes nothing, with the same arguments, returning a scalar and never the
parameters (a step that returned them would copy them): that times dispatch alone, and
tpustrat's extra microseconds per call.
Writes ``step_overhead.json`` and ``step_overhead.png`` into ``results/local/`` (``--record``: into
the tracked ``results/``).

On a CPU-only machine it simulates 8 devices (unless XLA_FLAGS already sets a device count).

Usage: python benchmarks/step_overhead.py [--steps 200] [--rounds 9]  (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Before jax is imported: 8 simulated devices on the host CPU. Accelerators are not affected.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("KERAS_BACKEND", "jax")

import argparse
import collections
import datetime
import importlib.metadata
import itertools
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import _harness
import _results
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpustrat as ts

SIZES = (64, 512, 512, 10)
GLOBAL_BATCH = 256
LEARNING_RATE = 0.01
WINDOW = 2  # steps in flight, the same for every variant
BASELINE = "(b) jit(shard_map) by hand"
KERAS = "(d) Keras 3 DataParallel fit"


def init_params(key):
    params = []
    for fan_in, fan_out in itertools.pairwise(SIZES):
        key, sub = jax.random.split(key)
        params.append(
            (jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in), jnp.zeros(fan_out))
        )
    return params


def predict(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def loss_fn(params, x, y):
    logits = predict(params, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def sgd(params, grads):
    return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)


def tpustrat_step(params, batch):
    """(a): one replica's step under ``strategy.run``; pmap's recipe, mean loss and mean grads."""
    grads = jax.grad(loss_fn)(params, *batch)
    return sgd(params, ts.get_replica_context().all_reduce("mean", grads))


def train_body(params, x, y):
    """(b): the same step as the body of a hand-written ``shard_map``."""
    grads = jax.grad(loss_fn)(params, x, y)
    return sgd(params, jax.lax.pmean(grads, "replica"))


def no_op_step(params, batch):
    """A step that computes nothing, to time dispatch alone: it takes the train step's arguments
    and returns one replicated scalar (one number of each parameter, summed), so a call writes
    no buffer the size of the parameters."""
    del batch
    return sum(jnp.ravel(w)[0] for w in jax.tree.leaves(params))


def shard_map_step(mesh: jax.sharding.Mesh, body=train_body, donate_argnums=()):
    """``jax.jit(jax.shard_map(body))`` over ``mesh``: params replicated, batch split."""
    return jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P("replica"), P("replica")),
            out_specs=P(),
            check_vma=False,
        ),
        donate_argnums=donate_argnums,
    )


@jax.jit
def auto_step(params, x, y):
    """(c): the single-device step; ``jax.jit`` partitions it from the input shardings."""
    return sgd(params, jax.grad(loss_fn)(params, x, y))


def global_batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=GLOBAL_BATCH).astype(np.int32)
    return x, y


def per_replica_batch(strategy: ts.TPUStrategy, x: np.ndarray, y: np.ndarray) -> ts.PerReplica:
    n = strategy.num_replicas_in_sync
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: (
            np.split(x, n)[ctx.replica_id_in_sync_group],
            np.split(y, n)[ctx.replica_id_in_sync_group],
        )
    )


def make_tpustrat(params, x, y, step=tpustrat_step, feed_back=True) -> Callable[[int], float]:
    """(a); with ``feed_back=False`` every call gets the same parameters (for ``no_op_step``)."""
    strategy = ts.TPUStrategy(max_steps_in_flight=WINDOW)
    batch = per_replica_batch(strategy, x, y)
    state = {"params": strategy.replicate(params)}

    def run(steps):
        start = time.perf_counter()
        p = out = state["params"]
        for _ in range(steps):
            out = strategy.run(step, args=(p, batch))
            if feed_back:
                p = out
        jax.block_until_ready(out)
        state["params"] = p
        return time.perf_counter() - start

    return run


def make_shard_map(params, x, y, body=train_body, feed_back=True) -> Callable[[int], float]:
    """(b); ``feed_back`` as for ``make_tpustrat``."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replica",))
    return _windowed(shard_map_step(mesh, body), mesh, params, x, y, feed_back)


def make_auto(params, x, y) -> Callable[[int], float]:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replica",))
    return _windowed(auto_step, mesh, params, x, y)


def _windowed(step, mesh, params, x, y, feed_back=True) -> Callable[[int], float]:
    x = jax.device_put(x, NamedSharding(mesh, P("replica")))
    y = jax.device_put(y, NamedSharding(mesh, P("replica")))
    state = {"params": jax.device_put(params, NamedSharding(mesh, P()))}

    def run(steps):
        start = time.perf_counter()
        p = out = state["params"]
        pending = collections.deque()
        for _ in range(steps):
            out = step(p, x, y)
            if feed_back:
                p = out
            pending.append(jax.tree.leaves(out)[0])
            if len(pending) > WINDOW:
                pending.popleft().block_until_ready()
        jax.block_until_ready(out)
        state["params"] = p
        return time.perf_counter() - start

    return run


def make_keras(params, x, y) -> Callable[[int], float]:
    import keras

    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    model = keras.Sequential(
        [keras.Input((SIZES[0],))]
        + [keras.layers.Dense(n, activation="relu") for n in SIZES[1:-1]]
        + [keras.layers.Dense(SIZES[-1])]
    )
    model.set_weights([np.asarray(a) for layer in params for a in layer])
    model.compile(
        optimizer=keras.optimizers.SGD(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    def run(steps):
        window = _harness.keras_window(keras, WINDOW)
        model.fit(
            np.tile(x, (steps, 1)),
            np.tile(y, steps),
            batch_size=GLOBAL_BATCH,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[window],
        )
        return window.seconds

    return run


def plot(rows: list[dict], title: str, path: pathlib.Path) -> None:
    plt = _harness.pyplot()
    rows = rows[::-1]  # the first variant on top
    medians = [row["median_steps_per_s"] for row in rows]
    low = [m - min(row["rounds"]) for m, row in zip(medians, rows)]
    high = [max(row["rounds"]) - m for m, row in zip(medians, rows)]
    # The numbers go in the axis labels, not on the bars, where the whiskers would cross them.
    labels = [
        f"{row['variant']}\n{row['median_steps_per_s']:.0f} steps/s, {row['ratio_to_b']:.3f} x (b)"
        f" (paired {row['paired_ratio_to_b']:.3f})"
        for row in rows
    ]
    fig, ax = plt.subplots(figsize=(9, 0.75 * len(rows) + 1.4))
    ax.barh(labels, medians, xerr=[low, high], color="#4c72b0", capsize=4)
    ax.set_xlabel("steps/s (median; whiskers: min and max over rounds)")
    ax.set_title(title, fontsize=9)
    _harness.save_figure(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds")
    parser.add_argument("--no-op-calls", type=int, default=1000, help="calls per round, no-op")
    _results.add_arguments(parser)
    return parser.parse_args(argv)


def alternate(
    variants: dict[str, Callable[[int], float]], rounds: int, steps: int
) -> dict[str, list[float]]:
    """Steps/s of each variant in each round; the order rotates from round to round."""
    for run in variants.values():
        run(10)  # compile and warm up
    rates = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            rates[name].append(steps / variants[name](steps))
    return rates


def main() -> None:
    args = parse_args()
    params = jax.tree.map(np.asarray, init_params(jax.random.key(0)))
    x, y = global_batch()
    factories = {
        "(a) tpustrat strategy.run": make_tpustrat,
        BASELINE: make_shard_map,
        "(c) jit + NamedSharding": make_auto,
        KERAS: make_keras,
    }
    skipped = _harness.keras_unavailable()
    if skipped:
        print(f"skipping (d): {skipped}")
        del factories[KERAS]
    load_before = os.getloadavg()
    rates = alternate(
        {name: make(params, x, y) for name, make in factories.items()}, args.rounds, args.steps
    )
    # The same two loops around a step that computes nothing: what dispatch alone costs.
    no_op_rates = alternate(
        {
            "(a) tpustrat strategy.run": make_tpustrat(
                params, x, y, step=no_op_step, feed_back=False
            ),
            BASELINE: make_shard_map(
                params,
                x,
                y,
                body=lambda params, x, y: no_op_step(params, (x, y)),
                feed_back=False,
            ),
        },
        args.rounds,
        args.no_op_calls,
    )
    baseline = statistics.median(rates[BASELINE])
    rows = [
        {
            "variant": name,
            "median_steps_per_s": statistics.median(r),
            "ratio_to_b": statistics.median(r) / baseline,
            "paired_ratio_to_b": statistics.median(
                [rate / base for rate, base in zip(r, rates[BASELINE])]
            ),
            "rounds": r,
        }
        for name, r in rates.items()
    ]
    dispatch = {
        name: {"median_us_per_call": 1e6 / statistics.median(r), "rounds_calls_per_s": r}
        for name, r in no_op_rates.items()
    }
    extra_us = (
        dispatch["(a) tpustrat strategy.run"]["median_us_per_call"]
        - dispatch[BASELINE]["median_us_per_call"]
    )
    title = (
        f"MLP {'-'.join(map(str, SIZES))}, global batch {GLOBAL_BATCH}, "
        f"{jax.device_count()} x {jax.devices()[0].platform}, {args.rounds} rounds of "
        f"{args.steps} steps, window {WINDOW}"
    )
    print(f"\n{title}\n{_harness.machine()}, jax {jax.__version__}")
    print(f"{'variant':<30} {'steps/s':>9} {'ratio to (b)':>13} {'paired ratio':>13}")
    for row in rows:
        print(
            f"{row['variant']:<30} {row['median_steps_per_s']:>9.1f} {row['ratio_to_b']:>13.3f} "
            f"{row['paired_ratio_to_b']:>13.3f}"
        )
    print(f"\ndispatch alone (a step that computes nothing, {args.no_op_calls} calls per round)")
    for name, entry in dispatch.items():
        print(f"{name:<30} {entry['median_us_per_call']:>9.0f} us/call")
    print(
        f"tpustrat's extra {extra_us:.0f} us/call is {extra_us * baseline / 1e4:.1f}% of a "
        f"(b) train step ({1e6 / baseline:.0f} us)"
    )
    out = _results.folder(args)
    record = {
        "benchmark": "step_overhead",
        "command": " ".join(["python", *sys.argv]),
        "machine": _harness.machine(),
        "jax": jax.__version__,
        "keras": None if skipped else importlib.metadata.version("keras"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "devices": jax.device_count(),
        "workload": title,
        "rows": rows,
        "dispatch_only": dispatch,
        "tpustrat_extra_us_per_call": extra_us,
    }
    (out / "step_overhead.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(rows, f"{title}\n{record['machine']}, jax {jax.__version__}", out / "step_overhead.png")
    print(f"wrote {out / 'step_overhead.json'} and {out / 'step_overhead.png'}")


if __name__ == "__main__":
    main()
