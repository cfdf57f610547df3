"""Step time with metrics summed on read against metrics all-reduced every step.

A training step of an MLP (64 -> 256 -> 10, SGD, one all-reduce of the gradients) on 8
replicas, global batch 256, that also keeps the loss sum, the correct count and the example
count. Two pairs of variants, alike but for one all-reduce per step:
  NNX    an nnx.Module of three metric variables passed to run: MetricState accumulators that
         each replica adds its rows to (summed when read), against nnx.Variables added the
         all-reduced sums (ctx.all_reduce("sum", ...)), the same on every replica;
  plain  a pytree of sums returned by the step: PerReplica sums (read with
         strategy.reduce(SUM)), against replicated sums added the all-reduced values.
Rounds alternate the variants, their order rotating; each table row gives median steps/s and
the ratio to the pair's all-reduced variant (above 1: summing on read is faster). The host
read (the sum over replicas) happens once per epoch and is timed apart.
Writes ``metrics.json`` and ``metrics.png`` into ``results/local/`` (``--record``: into the
tracked ``results/``).

Usage: python benchmarks/metrics.py [--steps 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import time

import _harness
import _results

_harness.prepare()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import tpustrat as ts  # noqa: E402

GLOBAL_BATCH, FEATURES, HIDDEN, CLASSES = 256, 64, 256, 10
PAIRS = ("NNX", "plain")


class Sums(nnx.Module):
    """The loss sum, the correct count and the example count, in variables of ``kind``."""

    def __init__(self, kind: type):
        self.loss = kind(jnp.zeros((), jnp.float32))
        self.correct = kind(jnp.zeros((), jnp.float32))
        self.count = kind(jnp.zeros((), jnp.float32))


def _train(params, batch):
    """One SGD step; returns the new parameters and this replica's (loss, correct, count)."""
    images, labels = batch

    def loss_fn(params):
        hidden = jax.nn.relu(images @ params["w1"])
        logits = hidden @ params["w2"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return ts.compute_average_loss(losses), (losses, logits)

    (_, (losses, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = ts.get_replica_context().all_reduce("sum", grads)
    params = jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
    correct = jnp.sum(logits.argmax(-1) == labels, dtype=jnp.float32)
    return params, (losses.sum(), correct, jnp.float32(labels.shape[0]))


def nnx_on_read(params, sums, batch):
    params, (loss, correct, count) = _train(params, batch)
    sums.loss[...] += loss
    sums.correct[...] += correct
    sums.count[...] += count
    return params


def nnx_all_reduced(params, sums, batch):
    params, values = _train(params, batch)
    loss, correct, count = ts.get_replica_context().all_reduce("sum", values)
    sums.loss[...] += loss
    sums.correct[...] += correct
    sums.count[...] += count
    return params


def plain_on_read(params, sums, batch):
    params, values = _train(params, batch)
    return params, jax.tree.map(jnp.add, sums, values)


def plain_all_reduced(params, sums, batch):
    params, values = _train(params, batch)
    values = ts.get_replica_context().all_reduce("sum", values)
    return params, jax.tree.map(jnp.add, sums, values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    _results.add_arguments(parser)
    args = parser.parse_args()
    strategy = ts.TPUStrategy()
    rng = np.random.default_rng(0)
    data = [
        (
            rng.normal(size=(GLOBAL_BATCH, FEATURES)).astype(np.float32),
            rng.integers(0, CLASSES, GLOBAL_BATCH).astype(np.int32),
        )
        for _ in range(16)
    ]
    batches = list(strategy.experimental_distribute_dataset(data))
    init = {
        "w1": rng.normal(size=(FEATURES, HIDDEN)).astype(np.float32) / 8,
        "w2": rng.normal(size=(HIDDEN, CLASSES)).astype(np.float32) / 16,
    }

    def nnx_variant(step, kind):
        state = {"params": strategy.replicate(init), "sums": Sums(kind)}

        def run(steps):
            params, sums, source = state["params"], state["sums"], itertools.cycle(batches)
            start = time.perf_counter()
            for _ in range(steps):
                params = strategy.run(step, args=(params, sums, next(source)))
            jax.block_until_ready(params)
            state["params"] = params
            return steps / (time.perf_counter() - start)

        def read():
            return float(state["sums"].loss[...]) / float(state["sums"].count[...])

        return run, read

    def plain_variant(step, sums):
        state = {"params": strategy.replicate(init), "sums": sums}

        def run(steps):
            params, sums, source = state["params"], state["sums"], itertools.cycle(batches)
            start = time.perf_counter()
            for _ in range(steps):
                params, sums = strategy.run(step, args=(params, sums, next(source)))
            jax.block_until_ready((params, sums))
            state["params"], state["sums"] = params, sums
            return steps / (time.perf_counter() - start)

        def read():
            sums = state["sums"]
            if isinstance(sums[0], ts.PerReplica):
                sums = strategy.reduce(ts.ReduceOp.SUM, sums, axis=None)
            return float(sums[0]) / float(sums[2])

        return run, read

    zero = np.float32(0)
    per_replica = strategy.experimental_distribute_values_from_function(lambda ctx: (zero,) * 3)
    variants = {
        ("NNX", "summed on read"): nnx_variant(nnx_on_read, nnx.metrics.MetricState),
        ("NNX", "all-reduced every step"): nnx_variant(nnx_all_reduced, nnx.Variable),
        ("plain", "summed on read"): plain_variant(plain_on_read, per_replica),
        ("plain", "all-reduced every step"): plain_variant(
            plain_all_reduced, strategy.replicate((zero,) * 3)
        ),
    }
    reads = {}
    for key, (run, read) in variants.items():
        run(20)  # compile and warm up
        read()  # the read's program, compiled once
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            mean_loss = read()
            times.append(time.perf_counter() - start)
        reads[label(*key)] = {"mean_loss": mean_loss, "read_ms": 1e3 * statistics.median(times)}
    rates = _harness.alternate(
        {label(*key): functools.partial(run, args.steps) for key, (run, _) in variants.items()},
        args.rounds,
    )
    rows = []
    for pair in PAIRS:
        ours = {label(p, how): rates[label(p, how)] for p, how in variants if p == pair}
        for summary in _harness.summarize(
            ours, label(pair, "all-reduced every step"), per_second=True
        ):
            rows.append({"pair": pair, **summary, **reads[summary["variant"]]})
    title = (
        f"MLP {FEATURES}-{HIDDEN}-{CLASSES}, global batch {GLOBAL_BATCH}, "
        f"{jax.device_count()} x {jax.devices()[0].platform}, {args.rounds} rounds of "
        f"{args.steps} steps"
    )
    print(f"\n{title}")
    print(
        _harness.summary_table(rows, "steps/s", {"read (ms)": lambda row: f"{row['read_ms']:.2f}"})
    )
    _results.write(_results.record("metrics", title, rows=rows), args, plot(rows, title))


def label(pair: str, how: str) -> str:
    return f"{pair}, {how}"


def plot(rows: list[dict], title: str):
    """Median steps/s per pair and variant, labelled with the ratio to the all-reduced one."""
    fig = _results.figure(figsize=(7, 3.8))
    ax = fig.subplots()
    width = 0.4
    for k, how in enumerate(("summed on read", "all-reduced every step")):
        chosen = [r for r in rows if r["variant"].endswith(how)]
        positions = [i + (k - 0.5) * width for i in range(len(chosen))]
        bars = ax.bar(positions, [r["median"] for r in chosen], width, label=how)
        ax.bar_label(bars, labels=[f"{r['ratio']:.2f}x" for r in chosen], fontsize=8)
    ax.set_xticks(range(len(PAIRS)), list(PAIRS))
    ax.set_ylabel("steps / s (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(title="metrics")
    return fig


if __name__ == "__main__":
    main()
