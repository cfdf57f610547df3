"""A Flax Linen classifier for scikit-learn's digits, trained with optax on every replica.

Most Flax code in the wild looks like this: an ``nn.Module``, ``model.init`` and
``model.apply``, and flax's ``TrainState``. ``strategy.replicate`` copies the TrainState to every
replica and ``strategy.run`` runs the step on each; a replica gets its slice of the global batch
from ``strategy.experimental_distribute_dataset``, sums its examples' losses divided by the
global batch size, and all-reduces the gradients with SUM, the tf.distribute recipe. Evaluation
masks the padded rows of the last partial batch, so every test example counts exactly once.

On a CPU-only machine the script simulates 8 devices; on a TPU VM it uses the TPU cores.

Usage: python examples/linen_digits.py [--epochs 30] [--batch-size 128] [--logical-cores 1]
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "") and (
    os.environ.get("JAX_PLATFORMS", "cpu") == "cpu"
):
    # Before jax is imported: 8 simulated devices on the host CPU. Accelerators are not affected.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import _digits_data as digits
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from tqdm import tqdm

import tpustrat as ts

LOG_EVERY = 20  # steps between progress-bar updates of the loss and examples/s


class MLP(nn.Module):
    """A multilayer perceptron: 64 pixels -> hidden -> hidden -> 10 classes, ReLU."""

    hidden: int = 256

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(digits.NUM_CLASSES)(x)


class Result(NamedTuple):
    """What ``main`` returns: the test accuracy, its counts, and the training loss per step."""

    test_accuracy: float
    correct: int
    examples: int
    losses: list[float]
    train_seconds: float


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    parser.add_argument("--steps", type=int, help="training steps; overrides --epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size")
    parser.add_argument("--logical-cores", type=int, default=1, help="devices per replica")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=256, help="width of the hidden layers")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Result:
    args = parse_args(argv)
    strategy = ts.TPUStrategy(num_logical_cores=args.logical_cores)
    data = digits.load(seed=args.seed)
    global_batch_size = args.batch_size
    steps = args.steps or args.epochs * (len(data.train_images) // global_batch_size)
    print(f"{strategy}, global batch {global_batch_size}, {steps} steps")

    model = MLP(args.hidden)
    params = model.init(jax.random.key(args.seed), np.zeros((1, digits.NUM_FEATURES)))["params"]
    tx = optax.adam(args.learning_rate)
    state = strategy.replicate(TrainState.create(apply_fn=model.apply, params=params, tx=tx))

    def train_step(state: TrainState, batch: tuple[jax.Array, jax.Array]) -> Any:
        images, labels = batch  # this replica's slice of the global batch

        def loss_fn(params):
            logits = state.apply_fn({"params": params}, images)
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return per_example.sum() / global_batch_size

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        loss, grads = ts.get_replica_context().all_reduce("sum", (loss, grads))
        return state.apply_gradients(grads=grads), loss

    def eval_step(state: TrainState, batch: tuple[jax.Array, jax.Array], mask: jax.Array) -> Any:
        images, labels = batch
        logits = state.apply_fn({"params": state.params}, images)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) & mask)
        return ts.get_replica_context().all_reduce("sum", (correct, jnp.sum(mask)))

    train_data = digits.train_batches(
        data.train_images, data.train_labels, global_batch_size, seed=args.seed
    )
    losses = []
    start = time.perf_counter()
    logged_step, logged_at = 0, start
    with (
        iter(strategy.experimental_distribute_dataset(train_data)) as batches,
        tqdm(total=steps, unit="step") as bar,
    ):
        for step in range(1, steps + 1):
            state, loss = strategy.run(train_step, args=(state, next(batches)))
            losses.append(loss)
            bar.update()
            if step % LOG_EVERY == 0 or step == steps:
                loss_value = float(loss)  # waits for this step
                now = time.perf_counter()
                rate = (step - logged_step) * global_batch_size / (now - logged_at)
                bar.set_postfix(loss=f"{loss_value:.4f}", examples_per_s=f"{rate:,.0f}")
                logged_step, logged_at = step, now
    jax.block_until_ready(state)
    train_seconds = time.perf_counter() - start

    test_data = digits.eval_batches(data.test_images, data.test_labels, global_batch_size)
    correct = examples = 0
    for batch, mask in strategy.experimental_distribute_dataset(
        test_data, ts.InputOptions(mask=True)
    ):
        batch_correct, batch_examples = strategy.run(eval_step, args=(state, batch, mask))
        correct += int(batch_correct)
        examples += int(batch_examples)
    accuracy = correct / examples
    print(f"trained {steps} steps in {train_seconds:.1f} s, compilation included")
    print(f"test accuracy: {accuracy:.4f} ({correct}/{examples} examples)")
    return Result(accuracy, correct, examples, [float(x) for x in losses], train_seconds)


if __name__ == "__main__":
    main()
