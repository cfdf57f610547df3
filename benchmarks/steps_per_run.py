"""Steps per second with N training steps per compiled program (experimental_run_steps).

Workload: a tiny linear model (16 -> 4), global batch 64, SGD, on 8 replicas, where dispatch
dominates. N = 1 is one ``strategy.run`` per step; N = 8 and 32 run N steps in one program.
Rounds alternate between the variants; the table shows median steps/s and the ratio to N = 1.

Usage: python benchmarks/steps_per_run.py [--steps 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import platform
import statistics
import sys
import time

PARSER = argparse.ArgumentParser(description=__doc__.splitlines()[0])
PARSER.add_argument("--steps", type=int, default=256, help="timed steps per round (multiple of 32)")
PARSER.add_argument("--rounds", type=int, default=5)
PARSER.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
ARGS = PARSER.parse_args()
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import jax  # noqa: E402
import numpy as np  # noqa: E402

import tpustrat as ts  # noqa: E402

GLOBAL_BATCH, FEATURES, OUTPUTS = 64, 16, 4


def train_step(w, batch):
    x, y = batch
    loss, grad = jax.value_and_grad(lambda w: ((x @ w - y) ** 2).sum() / GLOBAL_BATCH)(w)
    loss, grad = ts.get_replica_context().all_reduce("sum", (loss, grad))  # one all-reduce
    return w - 0.01 * grad, loss


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
    state = {"w": strategy.replicate(np.zeros((FEATURES, OUTPUTS), np.float32))}

    def variant(steps_per_run):
        def run(total_steps):
            w, data = state["w"], itertools.cycle(batches)
            for _ in range(total_steps // steps_per_run):
                if steps_per_run == 1:
                    w, _ = strategy.run(train_step, args=(w, next(data)))
                else:
                    w, _, _ = strategy.experimental_run_steps(train_step, w, data, steps_per_run)
            jax.block_until_ready(w)
            state["w"] = w

        return run

    variants = {k: variant(k) for k in (1, 8, 32)}
    for run in variants.values():
        run(64)  # compile and warm up
    rates = {k: [] for k in variants}
    for _ in range(ARGS.rounds):
        for k, run in variants.items():
            start = time.perf_counter()
            run(ARGS.steps)
            rates[k].append(ARGS.steps / (time.perf_counter() - start))
    base = statistics.median(rates[1])
    rows = [
        {
            "steps_per_run": k,
            "median_steps_per_s": statistics.median(r),
            "ratio_to_1": statistics.median(r) / base,
            "rounds": r,
        }
        for k, r in rates.items()
    ]
    print(
        f"\nlinear {FEATURES}->{OUTPUTS}, global batch {GLOBAL_BATCH}, {jax.device_count()} x "
        f"{jax.devices()[0].platform}, {ARGS.rounds} rounds of {ARGS.steps} steps"
    )
    print(f"{'steps_per_run':>13} {'steps/s':>9} {'ratio to N=1':>13}")
    for row in rows:
        print(
            f"{row['steps_per_run']:>13} {row['median_steps_per_s']:>9.1f} "
            f"{row['ratio_to_1']:>13.2f}"
        )
    out = pathlib.Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "steps_per_run",
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "jax": jax.__version__,
        "rows": rows,
    }
    (out / "steps_per_run.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
