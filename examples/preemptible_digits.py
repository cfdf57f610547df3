"""Digits training that survives preemption: checkpoints every N steps and resumes on restart.

The Flax Linen classifier of ``linen_digits.py``, trained under a
``ts.PreemptionCheckpointHandler``. The checkpoint holds the TrainState (parameters, optimizer
state, step), the input position and the random key used for dropout. Restarting the same
command continues from the latest checkpoint, at the first batch not trained on, so a run that
was stopped and restarted ends with the parameters of a run that never stopped.

- ``kill -TERM <pid>`` (what a Cloud TPU VM or Kubernetes sends before stopping a machine):
  the step in flight finishes, that step is saved, and the process exits with status 42.
- ``kill -9 <pid>`` (or a crash): the restart resumes from the last checkpoint, at most
  ``--save-every`` steps back; a save cut off half-way is never used.

Usage: python examples/preemptible_digits.py --checkpoint-dir /tmp/digits-ckpt
       [--steps 600] [--save-every 50] [--batch-size 128] [--logical-cores 1]
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
from collections.abc import Sequence
from typing import Any, NamedTuple

import _digits_data as digits
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

import tpustrat as ts

LOG_EVERY = 50


class MLP(nn.Module):
    """64 pixels -> hidden (ReLU, dropout) -> 10 classes."""

    hidden: int = 128
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(digits.NUM_CLASSES)(x)


class Result(NamedTuple):
    """What ``main`` returns: where the run started and ended, and the test accuracy."""

    first_step: int
    last_step: int
    test_accuracy: float
    params: Any


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", required=True, help="where checkpoints go")
    parser.add_argument("--steps", type=int, default=600, help="total training steps")
    parser.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size")
    parser.add_argument("--logical-cores", type=int, default=1, help="devices per replica")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Result:
    args = parse_args(argv)
    strategy = ts.TPUStrategy(num_logical_cores=args.logical_cores)
    data = digits.load(seed=args.seed)
    global_batch_size = args.batch_size
    model = MLP()
    params = model.init(jax.random.key(args.seed), np.zeros((1, digits.NUM_FEATURES)), train=False)[
        "params"
    ]
    tx = optax.adam(args.learning_rate)
    initial = {
        "train": strategy.replicate(TrainState.create(apply_fn=model.apply, params=params, tx=tx)),
        "dropout_key": strategy.replicate(jax.random.key(args.seed + 1)),
    }

    def train_step(state: TrainState, key: jax.Array, batch: Any) -> Any:
        images, labels = batch
        key = jax.random.fold_in(key, ts.get_replica_context().replica_id_in_sync_group)

        def loss_fn(params):
            logits = state.apply_fn({"params": params}, images, train=True, rngs={"dropout": key})
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return per_example.sum() / global_batch_size

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        loss, grads = ts.get_replica_context().all_reduce("sum", (loss, grads))
        return state.apply_gradients(grads=grads), loss

    # An endless, seeded stream of shuffled batches: on restore the iterator skips the
    # batches the checkpointed run had already used.
    train_data = digits.train_batches(
        data.train_images, data.train_labels, global_batch_size, seed=args.seed
    )
    batches = iter(strategy.experimental_distribute_dataset(train_data))
    manager = ts.CheckpointManager(
        args.checkpoint_dir, strategy, max_to_keep=2, save_interval_steps=args.save_every
    )
    handler = ts.PreemptionCheckpointHandler(manager, initial, iterator=batches)
    first_step = handler.completed_steps
    print(f"{strategy}; starting at step {first_step} of {args.steps} (pid {os.getpid()})")
    state = handler.state
    for step in range(first_step + 1, args.steps + 1):
        key, step_key = jax.random.split(state["dropout_key"])
        train, loss = strategy.run(train_step, args=(state["train"], step_key, next(batches)))
        state = {"train": train, "dropout_key": key}
        handler.step_done(state)  # saves every --save-every steps; saves and exits on SIGTERM
        if step % LOG_EVERY == 0:
            print(f"step {step}: loss {float(strategy.reduce('mean', loss)):.4f}", flush=True)
    handler.close()
    manager.close()
    batches.close()

    def eval_step(state: TrainState, batch: Any, mask: jax.Array) -> Any:
        images, labels = batch
        logits = state.apply_fn({"params": state.params}, images, train=False)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) & mask)
        return ts.get_replica_context().all_reduce("sum", (correct, jnp.sum(mask)))

    correct = examples = 0
    test_data = digits.eval_batches(data.test_images, data.test_labels, global_batch_size)
    for batch, mask in strategy.experimental_distribute_dataset(
        test_data, ts.InputOptions(mask=True)
    ):
        batch_correct, batch_examples = strategy.run(eval_step, args=(state["train"], batch, mask))
        correct += int(strategy.reduce("mean", batch_correct))
        examples += int(strategy.reduce("mean", batch_examples))
    accuracy = correct / examples
    print(f"trained to step {args.steps}; test accuracy {accuracy:.4f} ({correct}/{examples})")
    params = jax.tree.map(np.asarray, jax.tree.leaves(state["train"].params))
    return Result(first_step, args.steps, accuracy, params)


if __name__ == "__main__":
    main()
