"""Step rate of one MLP training step: tpustrat's strategy.run against hand-written JAX.

Workload: an MLP 64-512-512-10, global batch 256, SGD, on 8 replicas. Variants:
  (a) tpustrat  ``strategy.run`` called from Python, its default dispatch window;
  (b) shard_map ``jax.jit(jax.shard_map(...))`` written by hand, the same step and window;
  (c) auto      ``jax.jit`` with NamedSharding inputs, left to the SPMD partitioner.
Runs alternate (a b c a b c ...) so that machine noise hits every variant alike; the table
shows median steps/s and the ratio to (b).

Usage: python benchmarks/step_overhead.py [--steps 200] [--rounds 5] [--devices 8]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import pathlib
import platform
import statistics
import sys
import time


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    return parser.parse_args()


ARGS = _parse()
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
    )

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


def init_params(key):
    params = []
    for fan_in, fan_out in itertools.pairwise(SIZES):
        key, sub = jax.random.split(key)
        params.append(
            (jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in), jnp.zeros(fan_out))
        )
    return params


def loss_fn(params, x, y):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    logits = x @ w + b
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def sgd(params, grads):
    return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)


def make_tpustrat(params, x, y):
    strategy = ts.TPUStrategy(max_steps_in_flight=WINDOW)
    n = strategy.num_replicas_in_sync

    def step(params, batch):
        grads = jax.grad(loss_fn)(params, *batch)
        return sgd(params, ts.get_replica_context().all_reduce("mean", grads))

    batch = strategy.experimental_distribute_values_from_function(
        lambda ctx: (
            np.split(x, n)[ctx.replica_id_in_sync_group],
            np.split(y, n)[ctx.replica_id_in_sync_group],
        )
    )
    state = {"params": strategy.replicate(params)}

    def run(steps):
        p = state["params"]
        for _ in range(steps):
            p = strategy.run(step, args=(p, batch))
        jax.block_until_ready(p)
        state["params"] = p

    return run


def make_shard_map(params, x, y):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replica",))

    def body(params, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        return sgd(params, jax.lax.pmean(grads, "replica"))

    step = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P("replica"), P("replica")),
            out_specs=P(),
            check_vma=False,
        )
    )
    x = jax.device_put(x, NamedSharding(mesh, P("replica")))
    y = jax.device_put(y, NamedSharding(mesh, P("replica")))
    state = {"params": jax.device_put(params, NamedSharding(mesh, P()))}
    return _windowed(step, state, x, y)


def make_auto(params, x, y):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replica",))

    @jax.jit
    def step(params, x, y):
        return sgd(params, jax.grad(loss_fn)(params, x, y))

    x = jax.device_put(x, NamedSharding(mesh, P("replica")))
    y = jax.device_put(y, NamedSharding(mesh, P("replica")))
    state = {"params": jax.device_put(params, NamedSharding(mesh, P()))}
    return _windowed(step, state, x, y)


def _windowed(step, state, x, y):
    def run(steps):
        p, pending = state["params"], collections.deque()
        for _ in range(steps):
            p = step(p, x, y)
            pending.append(jax.tree.leaves(p)[0])
            if len(pending) > WINDOW:
                pending.popleft().block_until_ready()
        jax.block_until_ready(p)
        state["params"] = p

    return run


def main() -> None:
    key = jax.random.key(0)
    params = jax.tree.map(np.asarray, init_params(key))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=GLOBAL_BATCH).astype(np.int32)
    variants = {
        "(a) tpustrat strategy.run": make_tpustrat(params, x, y),
        "(b) jit(shard_map) by hand": make_shard_map(params, x, y),
        "(c) jit + NamedSharding": make_auto(params, x, y),
    }
    for run in variants.values():
        run(10)  # compile and warm up
    rates = {name: [] for name in variants}
    for _ in range(ARGS.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run(ARGS.steps)
            rates[name].append(ARGS.steps / (time.perf_counter() - start))
    baseline = statistics.median(rates["(b) jit(shard_map) by hand"])
    rows = [
        {
            "variant": name,
            "median_steps_per_s": statistics.median(r),
            "ratio_to_b": statistics.median(r) / baseline,
            "rounds": r,
        }
        for name, r in rates.items()
    ]
    print(
        f"\nMLP {'-'.join(map(str, SIZES))}, global batch {GLOBAL_BATCH}, "
        f"{jax.device_count()} x {jax.devices()[0].platform}, {ARGS.rounds} rounds of "
        f"{ARGS.steps} steps, window {WINDOW}"
    )
    print(f"{'variant':<30} {'steps/s':>9} {'ratio to (b)':>13}")
    for row in rows:
        print(f"{row['variant']:<30} {row['median_steps_per_s']:>9.1f} {row['ratio_to_b']:>13.3f}")
    out = pathlib.Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "step_overhead",
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "jax": jax.__version__,
        "devices": jax.device_count(),
        "rows": rows,
    }
    (out / "step_overhead.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
