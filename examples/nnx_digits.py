"""A Flax NNX classifier for scikit-learn's digits, trained with optax on every replica.

The model is split into a graph definition and a state (``nnx.split``); the training step is a
pure function of that state, run on every replica by ``strategy.run``. Each replica gets its
slice of the global batch from ``strategy.experimental_distribute_dataset``, takes its share
of the mean loss (``ts.compute_average_loss``: its examples' losses over the global batch size)
and all-reduces the gradients with SUM, the tf.distribute recipe. The loss and accuracy are
``nnx.MultiMetric`` s passed to ``run``: each replica adds its own examples to them, with no
collective, and reading them on the host sums the replicas. The training metrics go to
TensorBoard through ``ts.SummaryWriter`` every 20 steps, and ``--profile`` traces a few steps
with ``ts.StepProfiler`` into the same folder. Evaluation masks the padded rows of the last
partial batch, so every test example counts exactly once.

On a CPU-only machine the script simulates 8 devices; on a TPU VM it uses the TPU cores.

Usage: python examples/nnx_digits.py [--epochs 30] [--batch-size 128] [--logical-cores 1]
         [--logdir DIR] [--profile]
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
import contextlib
import tempfile
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import _digits_data as digits
import jax
import optax
from flax import nnx
from tqdm import tqdm

import tpustrat as ts

LOG_EVERY = 20  # steps between summaries (the metrics over those steps) and progress updates
PROFILED_STEPS = (10, 12)  # the steps --profile traces: after compilation, a few of them


class MLP(nnx.Module):
    """A multilayer perceptron: 64 pixels -> hidden -> hidden -> 10 classes, ReLU."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.hidden1 = nnx.Linear(digits.NUM_FEATURES, hidden, rngs=rngs)
        self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, digits.NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.hidden1(x))
        x = nnx.relu(self.hidden2(x))
        return self.out(x)


class TrainState(NamedTuple):
    params: nnx.State
    opt_state: optax.OptState


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
    parser.add_argument(
        "--logdir",
        default=os.path.join(tempfile.gettempdir(), "nnx_digits", time.strftime("%Y%m%d-%H%M%S")),
        help="folder for TensorBoard summaries (and the --profile trace); default a new folder "
        "under the system temp dir",
    )
    parser.add_argument(
        "--profile", action="store_true", help=f"trace steps {PROFILED_STEPS} into --logdir"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Result:
    args = parse_args(argv)
    strategy = ts.TPUStrategy(num_logical_cores=args.logical_cores)
    data = digits.load(seed=args.seed)
    global_batch_size = args.batch_size
    steps = args.steps or args.epochs * (len(data.train_images) // global_batch_size)
    print(f"{strategy}, global batch {global_batch_size}, {steps} steps")

    model = MLP(args.hidden, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model)
    tx = optax.adam(args.learning_rate)
    state = strategy.replicate(TrainState(params, tx.init(params)))

    def train_step(
        state: TrainState, metrics: nnx.MultiMetric, batch: tuple[jax.Array, jax.Array]
    ) -> Any:
        images, labels = batch  # this replica's slice of the global batch

        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(images)
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return ts.compute_average_loss(per_example), (per_example, logits)

        (loss, (per_example, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        metrics.update(loss=per_example, logits=logits, labels=labels)  # this replica's rows
        loss, grads = ts.get_replica_context().all_reduce("sum", (loss, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state), loss

    def eval_step(
        params: nnx.State,
        metrics: nnx.metrics.Accuracy,
        batch: tuple[jax.Array, jax.Array],
        mask: jax.Array,
    ) -> None:
        images, labels = batch
        metrics.update(logits=nnx.merge(graphdef, params)(images), labels=labels, mask=mask)

    train_data = digits.train_batches(
        data.train_images, data.train_labels, global_batch_size, seed=args.seed
    )
    profiler = ts.StepProfiler(args.logdir, *PROFILED_STEPS) if args.profile else None
    metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"), accuracy=nnx.metrics.Accuracy())
    losses = []
    start = time.perf_counter()
    logged_step, logged_at = 0, start
    with (
        iter(strategy.experimental_distribute_dataset(train_data)) as batches,
        ts.SummaryWriter(args.logdir, every_n_steps=LOG_EVERY) as writer,
        tqdm(total=steps, unit="step") as bar,
    ):
        for step in range(1, steps + 1):
            with profiler.step(step) if profiler else contextlib.nullcontext():
                state, loss = strategy.run(train_step, args=(state, metrics, next(batches)))
            losses.append(loss)
            bar.update()
            if step % LOG_EVERY == 0 or step == steps:
                # Every process reads the metrics: the read sums the replicas, over the mesh.
                values = metrics.compute()  # over the steps since the last read
                metrics.reset()
                writer.scalars(
                    step, {"train/loss": values["loss"], "train/accuracy": values["accuracy"]}
                )
                loss_value = float(loss)  # waits for this step
                now = time.perf_counter()
                rate = (step - logged_step) * global_batch_size / (now - logged_at)
                bar.set_postfix(loss=f"{loss_value:.4f}", examples_per_s=f"{rate:,.0f}")
                logged_step, logged_at = step, now
    jax.block_until_ready(state)
    train_seconds = time.perf_counter() - start

    test_data = digits.eval_batches(data.test_images, data.test_labels, global_batch_size)
    accuracy = nnx.metrics.Accuracy()
    for batch, mask in strategy.experimental_distribute_dataset(
        test_data, ts.InputOptions(mask=True)
    ):
        strategy.run(eval_step, args=(state.params, accuracy, batch, mask))
    correct, examples = round(float(accuracy.total[...])), int(accuracy.count[...])
    test_accuracy = float(accuracy.compute())
    print(f"trained {steps} steps in {train_seconds:.1f} s, compilation included")
    print(f"summaries{' and profile' if profiler else ''}: tensorboard --logdir {args.logdir}")
    print(f"test accuracy: {test_accuracy:.4f} ({correct}/{examples} examples)")
    return Result(test_accuracy, correct, examples, [float(x) for x in losses], train_seconds)


if __name__ == "__main__":
    main()
