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

import argparse
import functools
import itertools
import os
import statistics
import time
from collections.abc import Callable

import _harness
import _results

_harness.prepare()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import tpustrat as ts  # noqa: E402

SIZES = (64, 512, 512, 10)
GLOBAL_BATCH = 256
LEARNING_RATE = 0.01
WINDOW = 2  # steps in flight, the same for every variant
TPUSTRAT, BASELINE = "(a) tpustrat strategy.run", "(b) jit(shard_map) by hand"
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
    """A hand-written loop of ``step(params, x, y)``, ``WINDOW`` steps in flight."""
    x = jax.device_put(x, NamedSharding(mesh, P("replica")))
    y = jax.device_put(y, NamedSharding(mesh, P("replica")))
    state = {"params": jax.device_put(params, NamedSharding(mesh, P()))}

    def run(steps):
        start = time.perf_counter()
        p = state["params"]
        out = _harness.in_flight(lambda out: step(out if feed_back else p, x, y), p, steps, WINDOW)
        if feed_back:
            state["params"] = out
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


def plot(rows: list[dict], title: str):
    """Median steps/s per variant, whiskers from the slowest to the fastest round."""
    fig = _results.figure(figsize=(9, 0.75 * len(rows) + 1.4))
    ax = fig.subplots()
    rows = rows[::-1]  # the first variant on top
    medians = [row["median"] for row in rows]
    low = [m - min(row["rounds"]) for m, row in zip(medians, rows)]
    high = [max(row["rounds"]) - m for m, row in zip(medians, rows)]
    # The numbers go in the axis labels, not on the bars, where the whiskers would cross them.
    labels = [
        f"{row['variant']}\n{row['median']:.0f} steps/s, {row['ratio']:.3f} x (b)"
        f" (paired {row['paired_ratio']:.3f})"
        for row in rows
    ]
    ax.barh(labels, medians, xerr=[low, high], color="#4c72b0", capsize=4)
    ax.set_xlabel("steps/s (median; whiskers: min and max over rounds)")
    ax.set_title(title, fontsize=9)
    return fig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds")
    parser.add_argument("--no-op-calls", type=int, default=1000, help="calls per round, no-op")
    _results.add_arguments(parser)
    return parser.parse_args(argv)


def steps_per_second(
    variants: dict[str, Callable[[int], float]], rounds: int, steps: int
) -> dict[str, list[float]]:
    """Steps/s of each variant in each alternated round, after a warm-up of 10 steps."""
    for run in variants.values():
        run(10)  # compile and warm up
    seconds = _harness.alternate(
        {name: functools.partial(run, steps) for name, run in variants.items()}, rounds
    )
    return {name: [steps / s for s in values] for name, values in seconds.items()}


def main() -> None:
    args = parse_args()
    params = jax.tree.map(np.asarray, init_params(jax.random.key(0)))
    x, y = global_batch()
    factories = {
        TPUSTRAT: make_tpustrat,
        BASELINE: make_shard_map,
        "(c) jit + NamedSharding": make_auto,
        KERAS: make_keras,
    }
    skipped = _harness.keras_unavailable()
    if skipped:
        print(f"skipping (d): {skipped}")
        del factories[KERAS]
    load_before = os.getloadavg()[0]
    rates = steps_per_second(
        {name: make(params, x, y) for name, make in factories.items()}, args.rounds, args.steps
    )
    # The same two loops around a step that computes nothing: what dispatch alone costs.
    no_op_rates = steps_per_second(
        {
            TPUSTRAT: make_tpustrat(params, x, y, step=no_op_step, feed_back=False),
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
    rows = _harness.summarize(rates, BASELINE, per_second=True)
    baseline = statistics.median(rates[BASELINE])
    dispatch = {
        name: {"median_us_per_call": 1e6 / statistics.median(r), "rounds_calls_per_s": r}
        for name, r in no_op_rates.items()
    }
    extra_us = dispatch[TPUSTRAT]["median_us_per_call"] - dispatch[BASELINE]["median_us_per_call"]
    title = (
        f"MLP {'-'.join(map(str, SIZES))}, global batch {GLOBAL_BATCH}, "
        f"{jax.device_count()} x {jax.devices()[0].platform}, {args.rounds} rounds of "
        f"{args.steps} steps, window {WINDOW}"
    )
    data = _results.record(
        "step_overhead",
        title,
        load_average_before=load_before,
        keras_skipped=skipped,
        rows=rows,
        dispatch_only=dispatch,
        tpustrat_extra_us_per_call=extra_us,
    )
    print(f"\n{title}\n{data['machine']}, jax {jax.__version__}")
    rounds = {
        "min - max steps/s": lambda row: f"{min(row['rounds']):.0f} - {max(row['rounds']):.0f}"
    }
    print(_harness.summary_table(rows, "median steps/s", rounds))
    print(f"\ndispatch alone (a step that computes nothing, {args.no_op_calls} calls per round)")
    print(
        _harness.table(
            ["variant", "us per call"],
            [[name, f"{entry['median_us_per_call']:.0f}"] for name, entry in dispatch.items()],
        )
    )
    print(
        f"tpustrat's extra {extra_us:.0f} us/call is {extra_us * baseline / 1e4:.1f}% of a "
        f"(b) train step ({1e6 / baseline:.0f} us)"
    )
    _results.write(data, args, plot(rows, f"{title}\n{data['machine']}, jax {jax.__version__}"))


if __name__ == "__main__":
    main()
