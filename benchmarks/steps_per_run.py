"""Steps per second with N steps per compiled program (``strategy.experimental_run_steps``).

Two tiny workloads on 8 replicas, global batch 64, where per-step dispatch matters most:
  train  a linear model (16 -> 4) trained with SGD: one all-reduce of the gradient per step;
  local  the same model's loss and gradient with no collective (say, gradient accumulation).
N = 1 is one ``strategy.run`` per step; N = 8 and 32 run N steps in one program (a lax.scan).
Rounds alternate between the variants; the table shows median steps/s and the ratio to N = 1.
Writes ``steps_per_run.json`` and ``steps_per_run.png`` into ``results/local/`` (``--record``: into
the tracked ``results/``).

Usage: python benchmarks/steps_per_run.py [--steps 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import _results

PARSER = argparse.ArgumentParser(description=__doc__.splitlines()[0])
PARSER.add_argument("--steps", type=int, default=256, help="timed steps per round (multiple of 32)")
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
            for _ in range(total_steps // steps_per_run):
                if steps_per_run == 1:
                    w, _ = strategy.run(step, args=(w, next(source)))
                else:
                    w, _, _ = strategy.experimental_run_steps(step, w, source, steps_per_run)
            jax.block_until_ready(w)
            state["w"] = w

        return run

    variants = {
        (name, n): variant(step, n) for name, step in WORKLOADS.items() for n in STEPS_PER_RUN
    }
    for run in variants.values():
        run(64)  # compile and warm up
    rates = {key: [] for key in variants}
    for _ in range(ARGS.rounds):
        for key, run in variants.items():
            start = time.perf_counter()
            run(ARGS.steps)
            rates[key].append(ARGS.steps / (time.perf_counter() - start))
    rows = []
    for (name, n), r in rates.items():
        base = statistics.median(rates[(name, 1)])
        rows.append(
            {
                "workload": name,
                "steps_per_run": n,
                "median_steps_per_s": statistics.median(r),
                "ratio_to_1": statistics.median(r) / base,
                "rounds": r,
            }
        )
    title = (
        f"linear {FEATURES}->{OUTPUTS}, global batch {GLOBAL_BATCH}, {jax.device_count()} x "
        f"{jax.devices()[0].platform}, {ARGS.rounds} rounds of {ARGS.steps} steps"
    )
    print(f"\n{title}")
    print(f"{'workload':<30} {'steps_per_run':>13} {'steps/s':>9} {'ratio to N=1':>13}")
    for row in rows:
        print(
            f"{row['workload']:<30} {row['steps_per_run']:>13} "
            f"{row['median_steps_per_s']:>9.1f} {row['ratio_to_1']:>13.2f}"
        )
    out = _results.folder(ARGS)
    record = {
        "benchmark": "steps_per_run",
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "rows": rows,
    }
    (out / "steps_per_run.json").write_text(json.dumps(record, indent=2))
    plot(rows, title, out / "steps_per_run.png")
    print(f"wrote {out / 'steps_per_run.json'} and {out / 'steps_per_run.png'}")


def plot(rows: list[dict], title: str, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(STEPS_PER_RUN)
    for k, n in enumerate(STEPS_PER_RUN):
        values = [r["median_steps_per_s"] for r in rows if r["steps_per_run"] == n]
        positions = [i + (k - 1) * width for i in range(len(WORKLOADS))]
        bars = ax.bar(positions, values, width, label=f"N = {n}")
        ratios = [r["ratio_to_1"] for r in rows if r["steps_per_run"] == n]
        ax.bar_label(bars, labels=[f"{x:.1f}x" for x in ratios], fontsize=8)
    ax.set_xticks(range(len(WORKLOADS)), list(WORKLOADS))
    ax.set_ylabel("steps / s (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(title="steps per program")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
