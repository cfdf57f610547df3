"""Steps per second with N steps per compiled program (``strategy.run_steps``).

Two tiny workloads on 8 replicas, global batch 64, where per-step dispatch matters most:
  train  a linear model (16 -> 4) trained with SGD: one all-reduce of the gradient per step;
  local  the same model's loss and gradient with no collective (say, gradient accumulation).
N = 1 is one ``strategy.run`` per step; N = 8 and 32 run N steps in one program (a lax.scan).
Rounds alternate the variants, their order rotating; the table shows median steps/s, the ratio
to N = 1 and the median over rounds of each round's ratio.
Writes ``steps_per_run.json`` and ``steps_per_run.png`` into ``results/local/`` (``--record``: into
the tracked ``results/``).

Usage: python benchmarks/steps_per_run.py [--steps 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time

import _harness
import _results

_harness.prepare()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import tpustrat as ts  # noqa: E402

GLOBAL_BATCH, FEATURES, OUTPUTS = 64, 16, 4
STEPS_PER_RUN = (1, 8, 32)


def _loss_and_grad(w, batch):
    x, y = batch
    return jax.value_and_grad(lambda w: ((x @ w - y) ** 2).sum() / GLOBAL_BATCH)(w)


def train_step(w, batch):
    loss, grad = _loss_and_grad(w, batch)
    loss, grad = ts.get_replica_context().all_reduce("sum", (loss, grad))  # one all-reduce
    return w - 0.01 * grad, loss


def local_step(grad_sum, batch):
    loss, grad = _loss_and_grad(jax.numpy.zeros_like(grad_sum), batch)
    return grad_sum + grad, loss


WORKLOADS = {"train (1 all-reduce per step)": train_step, "local (no collective)": local_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=256, help="timed steps per round (x 32)")
    parser.add_argument("--rounds", type=int, default=5)
    _results.add_arguments(parser)
    args = parser.parse_args()
    strategy = ts.TPUStrategy()
    rng = np.random.default_rng(0)
    data = [
        (
            rng.normal(size=(GLOBAL_BATCH, FEATURES)).astype(np.float32),
            rng.normal(size=(GLOBAL_BATCH, OUTPUTS)).astype(np.float32),
        )
        for _ in range(32)
    ]
    batches = list(strategy.experimental_distribute_dataset(data))

    def variant(step, steps_per_run):
        state = {"w": strategy.replicate(np.zeros((FEATURES, OUTPUTS), np.float32))}

        def run(total_steps):
            w, source = state["w"], itertools.cycle(batches)
            start = time.perf_counter()
            for _ in range(total_steps // steps_per_run):
                if steps_per_run == 1:
                    w, _ = strategy.run(step, args=(w, next(source)))
                else:
                    w, _, _ = strategy.run_steps(step, w, source, steps_per_run)
            jax.block_until_ready(w)
            state["w"] = w
            return total_steps / (time.perf_counter() - start)

        return run

    variants = {
        (name, n): variant(step, n) for name, step in WORKLOADS.items() for n in STEPS_PER_RUN
    }
    for run in variants.values():
        run(64)  # compile and warm up
    rates = _harness.alternate(
        {label(*key): functools.partial(run, args.steps) for key, run in variants.items()},
        args.rounds,
    )
    rows = []
    for name in WORKLOADS:
        ours = {label(name, n): rates[label(name, n)] for n in STEPS_PER_RUN}
        for n, summary in zip(
            STEPS_PER_RUN, _harness.summarize(ours, label(name, 1), per_second=True)
        ):
            rows.append({"workload": name, "steps_per_run": n, **summary})
    title = (
        f"linear {FEATURES}->{OUTPUTS}, global batch {GLOBAL_BATCH}, {jax.device_count()} x "
        f"{jax.devices()[0].platform}, {args.rounds} rounds of {args.steps} steps"
    )
    print(f"\n{title}")
    print(_harness.summary_table(rows, "steps/s"))
    _results.write(_results.record("steps_per_run", title, rows=rows), args, plot(rows, title))


def label(workload: str, steps_per_run: int) -> str:
    return f"{workload}, N = {steps_per_run}"


def plot(rows: list[dict], title: str):
    """Median steps/s per workload and N, labelled with the ratio to N = 1."""
    fig = _results.figure(figsize=(7, 3.8))
    ax = fig.subplots()
    width = 0.8 / len(STEPS_PER_RUN)
    for k, n in enumerate(STEPS_PER_RUN):
        values = [r["median"] for r in rows if r["steps_per_run"] == n]
        positions = [i + (k - 1) * width for i in range(len(WORKLOADS))]
        bars = ax.bar(positions, values, width, label=f"N = {n}")
        ratios = [r["ratio"] for r in rows if r["steps_per_run"] == n]
        ax.bar_label(bars, labels=[f"{x:.1f}x" for x in ratios], fontsize=8)
    ax.set_xticks(range(len(WORKLOADS)), list(WORKLOADS))
    ax.set_ylabel("steps / s (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(title="steps per program")
    return fig


if __name__ == "__main__":
    main()
