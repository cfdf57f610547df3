"""Model parallelism inside each replica: a wide layer split over the replica's logical cores.

The MLP's hidden layer (64 -> 1024) has its weight columns split over the logical cores of each
replica with ``experimental_split_to_logical_devices``, while the batch is split over replicas.
The script trains it for a few steps and checks the parameters against the same training on
one device.

Usage: python examples/model_parallel.py [--logical-cores 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import jax
import numpy as np
import optax

import tpustrat as ts

WIDE = 1024
GLOBAL_BATCH = 64


def init(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (64, WIDE)) / 8.0,
        "b1": jax.numpy.zeros(WIDE),
        "w2": jax.random.normal(k2, (WIDE, 10)) / 32.0,
        "b2": jax.numpy.zeros(10),
    }


def per_example_loss(params, x, y):
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logical-cores", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    strategy = ts.TPUStrategy(num_logical_cores=args.logical_cores)
    cores, replicas = strategy.num_logical_cores, strategy.num_replicas_in_sync
    optimizer = optax.sgd(0.05, momentum=0.9)

    def split(params):
        """The wide layer's columns (and the next layer's rows) over this replica's cores."""
        return dict(
            params,
            w1=strategy.experimental_split_to_logical_devices(params["w1"], [1, cores]),
            b1=strategy.experimental_split_to_logical_devices(params["b1"], [cores]),
            w2=strategy.experimental_split_to_logical_devices(params["w2"], [cores, 1]),
        )

    def train_step(state, batch):
        (params, opt_state), (x, y) = state, batch
        ctx = ts.get_replica_context()
        loss_fn = lambda p: per_example_loss(split(p), x, y).sum() / GLOBAL_BATCH
        loss, grads = jax.value_and_grad(loss_fn)(params)
        loss, grads = ctx.all_reduce("sum", (loss, grads))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(64, 10)).astype(np.float32)
    xs = rng.normal(size=(args.steps, GLOBAL_BATCH, 64)).astype(np.float32)
    ys = (xs @ teacher).argmax(-1).astype(np.int32)
    dataset = [(x, y) for x, y in zip(xs, ys)]

    params = jax.tree.map(np.asarray, init(jax.random.key(0)))
    state = strategy.replicate((params, optimizer.init(params)))
    for step, batch in enumerate(strategy.experimental_distribute_dataset(dataset)):
        state, loss = strategy.run(train_step, args=(state, batch))
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {float(loss):.4f}")

    @jax.jit
    def one_device_step(params, opt_state, x, y):
        grads = jax.grad(lambda p: per_example_loss(p, x, y).mean())(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    reference, opt_state = params, optimizer.init(params)
    for x, y in dataset:
        reference, opt_state = one_device_step(reference, opt_state, x, y)
    trained = {k: np.asarray(v) for k, v in state[0].items()}
    error = max(  # per parameter: the largest difference relative to its largest entry
        float(np.max(np.abs(trained[k] - reference[k])) / np.max(np.abs(reference[k])))
        for k in reference
    )
    print(
        f"{replicas} replicas x {cores} logical cores; the hidden layer holds "
        f"{WIDE // cores} of its {WIDE} units on each core"
    )
    print(f"largest difference from one-device training (relative): {error:.2e}")
    return error


if __name__ == "__main__":
    sys.exit(0 if main() < 1e-5 else 1)
