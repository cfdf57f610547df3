"""Real workloads: a ResNet-18-style CNN and a GPT-2-style decoder, tpustrat against its peers.

Both models are Flax NNX modules with bfloat16 compute and float32 parameters, trained with
Adam (optax) on synthetic data: CIFAR-shaped images (32x32x3, 10 classes) for the CNN, random
tokens for the decoder. The CNN uses GroupNorm where ResNet-18 has BatchNorm, so that every
variant computes the same function (BatchNorm statistics would be per replica in a shard_map
and global under jax.jit). Variants, same model, same global batch, same optimizer:

  (a) jit(shard_map) by hand: ``jax.jit(jax.shard_map(step))`` with ``lax.pmean`` of the
      gradients, parameters and optimizer state donated: the baseline;
  (b) jit + NamedSharding: the single-device step under ``jax.jit``, batch split over the
      devices, parameters replicated, donated; XLA partitions it;
  (c) Keras 3 DataParallel: the same architecture written with Keras layers (mixed_bfloat16,
      Adam), ``model.fit`` under ``keras.distribution.DataParallel`` (JAX backend), when keras
      is installed (the ``bench`` extra);
  (d) tpustrat run: ``strategy.run(step, args=(state, batch))`` with no options, the plain loop;
  (e) tpustrat run_steps: ``strategy.run_steps`` over a distributed dataset
      (host batches prefetched onto the devices), 4 steps per program (``--steps-per-run``),
      state donated; for the CNN on CPU with ``unroll=True`` (XLA:CPU runs convolutions inside
      a loop many times slower), otherwise (or with ``--scan-loop``) as one ``lax.scan`` loop;
  (f) (e) with weight-update sharding: ``ts.shard_update(optax.adam)``, so that each replica
      keeps and updates only its block of the optimizer state.

(a), (b) and (d) reuse one batch already on the devices; (e) and (f) feed a fresh host batch
each step through their dataset; (c) feeds host batches through Keras's own loop. Each keeps at
most 2 steps in flight. Rounds alternate the variants; the table gives median images/s or
tokens/s, ms per step, the ratio to (a) (of medians, and the median of each round's ratio), the
first call's time (trace and compile), per-device memory of the compiled step
(``memory_analysis``: arguments + outputs + temporaries - aliased; for (e) and (f), of one
donated step through ``run``), and the step's FLOPs per
device (``cost_analysis`` of (a)'s compiled program). MFU divides achieved FLOP/s per device by
the chip's bf16 peak (table below); on CPU it shows achieved GFLOP/s instead.

Default sizes are small enough for a CPU (one workload in about a minute on 2 cores); ``--full``
uses the real ones: ResNet-18 (widths 64-512, 2 blocks per stage) at 32x32, per-device batch
128; GPT with 6 layers, width 512, 8 heads, context 256, vocabulary 50,304, per-device batch 16.
Writes ``workloads[_full].json`` and ``.png`` into ``results/local/`` (``--record``: into the
tracked ``results/``).

Usage:
  python benchmarks/workloads.py [--workload resnet|gpt|both] [--rounds 5] [--steps 8]
  python benchmarks/workloads.py --full       # on a TPU VM or a GPU machine
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import statistics
import textwrap
import time
from collections.abc import Callable
from typing import Any

import _harness
import _results

_harness.prepare()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from step_overhead import per_replica_batch  # noqa: E402

import tpustrat as ts  # noqa: E402

WINDOW = 2  # steps in flight, for every variant
STEPS_PER_RUN = [4]  # variant (e); --steps-per-run sets it
LEARNING_RATE = 1e-3
BASELINE = "(a) jit(shard_map) by hand"
KERAS = "(c) Keras 3 DataParallel"

# Dense bf16 peak FLOP/s per device (per chip for TPUs), from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "H100": 989e12,  # SXM; the PCIe card is lower
    "H200": 989e12,
    "A100": 312e12,
}


def peak_flops(device: jax.Device) -> float | None:
    """The bf16 peak of ``device`` from the table, or None (a CPU, an unknown chip)."""
    kind = device.device_kind
    for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "TPU v5 lite" before "TPU v5"
        if name.lower() in kind.lower():
            return PEAK_BF16_FLOPS[name]
    return None


# ----------------------------------------------------------------------------- models


class ResidualBlock(nnx.Module):
    """ResNet's basic block: two 3x3 convolutions, GroupNorm, a projected shortcut if needed."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        conv = functools.partial(nnx.Conv, dtype=jnp.bfloat16, use_bias=False, rngs=rngs)
        norm = functools.partial(nnx.GroupNorm, dtype=jnp.bfloat16, rngs=rngs)
        self.conv1 = conv(cin, cout, (3, 3), strides=stride)
        self.norm1 = norm(cout, num_groups=min(32, cout // 4))
        self.conv2 = conv(cout, cout, (3, 3))
        self.norm2 = norm(cout, num_groups=min(32, cout // 4))
        self.projected = stride != 1 or cin != cout
        if self.projected:
            self.project = conv(cin, cout, (1, 1), strides=stride)
            self.project_norm = norm(cout, num_groups=min(32, cout // 4))

    def __call__(self, x):
        y = jax.nn.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        shortcut = self.project_norm(self.project(x)) if self.projected else x
        return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
    """ResNet-18 for 32x32 images: a 3x3 stem, four stages of basic blocks, global pooling."""

    def __init__(self, width: int, blocks: tuple[int, ...], classes: int, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, width, (3, 3), use_bias=False, dtype=jnp.bfloat16, rngs=rngs)
        self.stem_norm = nnx.GroupNorm(
            width, num_groups=min(32, width // 4), dtype=jnp.bfloat16, rngs=rngs
        )
        layers, cin = [], width
        for stage, count in enumerate(blocks):
            cout = width * 2**stage
            for k in range(count):
                layers.append(ResidualBlock(cin, cout, 2 if stage and not k else 1, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(layers)
        self.head = nnx.Linear(cin, classes, dtype=jnp.bfloat16, rngs=rngs)

    def __call__(self, images):
        x = jax.nn.relu(self.stem_norm(self.stem(images.astype(jnp.bfloat16))))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


class DecoderBlock(nnx.Module):
    """A pre-norm transformer block: causal multi-head attention, then a 4x GELU MLP."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        dense = functools.partial(nnx.Linear, dtype=jnp.bfloat16, rngs=rngs)
        self.heads = heads
        self.norm1 = nnx.LayerNorm(width, dtype=jnp.bfloat16, rngs=rngs)
        self.qkv = dense(width, 3 * width)
        self.out = dense(width, width)
        self.norm2 = nnx.LayerNorm(width, dtype=jnp.bfloat16, rngs=rngs)
        self.up = dense(width, 4 * width)
        self.down = dense(4 * width, width)

    def __call__(self, x):
        batch, length, width = x.shape
        q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
        q, k, v = (t.reshape(batch, length, self.heads, -1) for t in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        causal = jnp.tril(jnp.ones((length, length), bool))
        scores = jnp.where(causal, scores.astype(jnp.float32), -1e9)
        attention = jax.nn.softmax(scores, axis=-1).astype(jnp.bfloat16)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", attention, v).reshape(batch, length, width)
        x = x + self.out(mixed)
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class GPT(nnx.Module):
    """A GPT-2-style decoder with learned positions and tied input and output embeddings."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int, *, rngs):
        self.embed = nnx.Embed(vocab, width, dtype=jnp.bfloat16, rngs=rngs)
        self.position = nnx.Embed(context, width, dtype=jnp.bfloat16, rngs=rngs)
        self.blocks = nnx.List([DecoderBlock(width, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(width, dtype=jnp.bfloat16, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.norm(x))


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model at one size, with its synthetic global batch."""

    name: str
    unit: str  # what a throughput counts: images or tokens
    build: Callable[[], nnx.Module]
    batch: Callable[[int], tuple[np.ndarray, np.ndarray]]  # global batch size -> (x, y)
    per_device_batch: int
    units_per_example: int
    describe: str
    keras_model: Callable[[], Any] | None = None
    convolutional: bool = False


def resnet_workload(full: bool) -> Workload:
    width, blocks, batch = (64, (2, 2, 2, 2), 128) if full else (16, (1, 1, 1, 1), 8)

    def data(n):
        rng = np.random.default_rng(0)
        return (
            rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
            rng.integers(0, 10, n).astype(np.int32),
        )

    return Workload(
        "resnet",
        "images",
        lambda: ResNet(width, blocks, 10, rngs=nnx.Rngs(0)),
        data,
        batch,
        1,
        f"ResNet-{2 + 2 * sum(blocks)} (GroupNorm) width {width}, 32x32x3, "
        f"{batch} images per device",
        lambda: keras_resnet(width, blocks),
        convolutional=True,
    )


def gpt_workload(full: bool) -> Workload:
    vocab, width, layers, heads, context, batch = (
        (50304, 512, 6, 8, 256, 16) if full else (1024, 128, 2, 4, 64, 2)
    )

    def data(n):
        tokens = np.random.default_rng(0).integers(0, vocab, (n, context + 1)).astype(np.int32)
        return tokens[:, :-1], tokens[:, 1:]

    return Workload(
        "gpt",
        "tokens",
        lambda: GPT(vocab, width, layers, heads, context, rngs=nnx.Rngs(0)),
        data,
        batch,
        context,
        f"GPT {layers} layers, width {width}, {heads} heads, context {context}, vocabulary "
        f"{vocab}, {batch} sequences per device",
        lambda: keras_gpt(vocab, width, layers, heads, context),
    )


# ----------------------------------------------------------------------------- train steps


def make_update(graphdef, tx):
    """The per-replica update; ``mean`` averages (grads, loss) over replicas (or not at all)."""

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def update(params, opt_state, x, y, mean):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        grads, loss = mean((grads, loss))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return update


@dataclasses.dataclass
class Variant:
    """A timed loop: ``run(steps)`` returns seconds per step; ``first_s`` its first call."""

    run: Callable[[int], float]
    first_s: float
    memory_bytes: int | None = None
    flops: float | None = None


def _windowed_loop(step, state, batch) -> Callable[[int], float]:
    """A hand-written loop: ``state = step(*state, *batch)``, at most WINDOW steps in flight."""
    holder = {"state": state}

    def run(steps):
        start = time.perf_counter()
        params, opt_state, _ = _harness.in_flight(
            lambda out: step(out[0], out[1], *batch),
            (*holder["state"], None),
            steps,
            WINDOW,
            ready=lambda out: out[2],  # the loss, which nothing donates
        )
        holder["state"] = (params, opt_state)
        return (time.perf_counter() - start) / steps

    return run


def _timed_first(run: Callable[[int], float]) -> float:
    start = time.perf_counter()
    run(1)
    return time.perf_counter() - start


def _compiled_stats(compiled) -> tuple[int, float | None]:
    memory = compiled.memory_analysis()
    used = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return used, (cost or {}).get("flops")


def make_shard_map(mesh, update, params, opt_state, x, y) -> Variant:
    def body(p, o, x, y):
        return update(p, o, x, y, lambda t: jax.lax.pmean(t, "replica"))

    step = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(), P("replica"), P("replica")),
            out_specs=(P(), P(), P()),
            check_vma=False,
        ),
        donate_argnums=(0, 1),
    )
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("replica"))
    state = jax.device_put((params, opt_state), replicated)
    batch = jax.device_put((x, y), split)
    run = _windowed_loop(step, state, batch)
    first = _timed_first(run)
    memory, flops = _compiled_stats(step.lower(*state, *batch).compile())
    return Variant(run, first, memory, flops)


def make_auto(mesh, update, params, opt_state, x, y) -> Variant:
    step = jax.jit(lambda p, o, x, y: update(p, o, x, y, lambda t: t), donate_argnums=(0, 1))
    state = jax.device_put((params, opt_state), NamedSharding(mesh, P()))
    batch = jax.device_put((x, y), NamedSharding(mesh, P("replica")))
    run = _windowed_loop(step, state, batch)
    first = _timed_first(run)
    return Variant(run, first, _compiled_stats(step.lower(*state, *batch).compile())[0])


def _tpustrat_step(update):
    def step(state, batch):
        params, opt_state = state
        mean = functools.partial(ts.get_replica_context().all_reduce, "mean")
        params, opt_state, loss = update(params, opt_state, *batch, mean)
        return (params, opt_state), loss

    return step


def _tpustrat_memory(strategy, step, state, batch, options=None) -> int:
    """Per-device memory of the program ``run`` compiles, lowered through ``jax.jit``."""
    donate = (0,) if options is not None and options.donate_argnums else ()
    program = jax.jit(
        lambda s, b: strategy.run(step, args=(s, b), options=options), donate_argnums=donate
    )
    return _compiled_stats(program.lower(state, batch).compile())[0]


def make_tpustrat_run(strategy, update, params, opt_state, x, y) -> Variant:
    step = _tpustrat_step(update)
    batch = per_replica_batch(strategy, x, y)
    holder = {"state": strategy.replicate((params, opt_state))}

    def run(steps):
        state = holder["state"]
        start = time.perf_counter()
        for _ in range(steps):
            state, _ = strategy.run(step, args=(state, batch))
        jax.block_until_ready(state)
        holder["state"] = state
        return (time.perf_counter() - start) / steps

    first = _timed_first(run)
    return Variant(run, first, _tpustrat_memory(strategy, step, holder["state"], batch))


def _run_steps_loop(strategy, unroll, step, state, x, y) -> Variant:
    """``run_steps`` over a prefetching dataset of host batches, state donated."""
    donate = ts.RunOptions(donate_argnums=(0,))
    memory = _tpustrat_memory(strategy, step, state, per_replica_batch(strategy, x, y), donate)
    holder = {"state": state}

    def run(steps):
        batches = strategy.experimental_distribute_dataset(itertools.repeat((x, y), steps))
        iterator = iter(batches)
        state = holder["state"]
        start = time.perf_counter()
        for _ in range(steps // STEPS_PER_RUN[0]):
            state = strategy.run_steps(
                step, state, iterator, STEPS_PER_RUN[0], unroll=unroll, options=donate
            ).state
        jax.block_until_ready(state)
        holder["state"] = state
        iterator.close()
        return (time.perf_counter() - start) / steps

    first = _timed_first(lambda _: run(STEPS_PER_RUN[0]))
    return Variant(run, first, memory)


def make_tpustrat_run_steps(strategy, unroll, update, params, opt_state, x, y) -> Variant:
    state = strategy.replicate((params, opt_state))
    return _run_steps_loop(strategy, unroll, _tpustrat_step(update), state, x, y)


def make_tpustrat_sharded_update(strategy, unroll, graphdef, params, x, y) -> Variant:
    """(e) with ``ts.shard_update(optax.adam)``: each replica updates its block of the state."""
    tx = ts.shard_update(optax.adam(LEARNING_RATE))
    update = make_update(graphdef, tx)

    def step(state, batch):
        params, opt_state = state
        ctx = ts.get_replica_context()

        def mean_loss(grads_and_loss):  # the update reduce-scatters the gradients itself
            grads, loss = grads_and_loss
            return grads, ctx.all_reduce("mean", loss)

        params, opt_state, loss = update(params, opt_state, *batch, mean_loss)
        return (params, opt_state), loss

    params = strategy.replicate(params)
    state = (params, strategy.run(tx.init, args=(params,)))
    return _run_steps_loop(strategy, unroll, step, state, x, y)


# ----------------------------------------------------------------------------- Keras


def keras_resnet(width: int, blocks: tuple[int, ...]):
    import keras
    from keras import layers

    def norm(x):
        return layers.GroupNormalization(min(32, x.shape[-1] // 4), epsilon=1e-6)(x)

    images = keras.Input((32, 32, 3))
    x = layers.ReLU()(norm(layers.Conv2D(width, 3, padding="same", use_bias=False)(images)))
    for stage, count in enumerate(blocks):
        cout = width * 2**stage
        for k in range(count):
            stride = 2 if stage and not k else 1
            y = layers.Conv2D(cout, 3, stride, padding="same", use_bias=False)(x)
            y = layers.ReLU()(norm(y))
            y = norm(layers.Conv2D(cout, 3, padding="same", use_bias=False)(y))
            if stride != 1 or x.shape[-1] != cout:
                x = norm(layers.Conv2D(cout, 1, stride, use_bias=False)(x))
            x = layers.ReLU()(layers.Add()([x, y]))
    logits = layers.Dense(10, dtype="float32")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(images, logits)


def keras_gpt(vocab: int, width: int, layers_count: int, heads: int, context: int):
    import keras
    from keras import layers

    class AddPositions(layers.Layer):
        """Adds a learned embedding of each position (a trainable table, as in the NNX model)."""

        def build(self, input_shape):
            self.table = self.add_weight(shape=(context, width), initializer="random_normal")

        def call(self, x):
            return x + keras.ops.cast(self.table, x.dtype)

    tokens = keras.Input((context,), dtype="int32")
    embed = layers.Embedding(vocab, width)
    x = AddPositions()(embed(tokens))
    for _ in range(layers_count):
        y = layers.LayerNormalization(epsilon=1e-6)(x)
        x = x + layers.MultiHeadAttention(heads, width // heads)(y, y, use_causal_mask=True)
        y = layers.LayerNormalization(epsilon=1e-6)(x)
        x = x + layers.Dense(width)(layers.Dense(4 * width, activation="gelu")(y))
    x = layers.LayerNormalization(epsilon=1e-6)(x)
    logits = keras.ops.cast(keras.ops.matmul(x, keras.ops.transpose(embed.embeddings)), "float32")
    return keras.Model(tokens, logits)


def make_keras(workload: Workload, x, y) -> Variant:
    import keras

    keras.config.set_dtype_policy("mixed_bfloat16")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    model = workload.keras_model()
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    def run(steps):
        window = _harness.keras_window(keras, WINDOW)
        reps = (steps,) + (1,) * (x.ndim - 1)
        model.fit(
            np.tile(x, reps),
            np.tile(y, (steps,) + (1,) * (y.ndim - 1)),
            batch_size=len(x),
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[window],
        )
        return window.seconds / steps

    return Variant(run, _timed_first(run))


# ----------------------------------------------------------------------------- driver


def benchmark(
    workload: Workload, rounds: int, steps: int, keras_reason: str | None, scan_loop: bool
) -> dict:
    devices = jax.device_count()
    global_batch = workload.per_device_batch * devices
    x, y = workload.batch(global_batch)
    graphdef, params = nnx.split(workload.build())
    params = jax.tree.map(np.asarray, params)
    tx = optax.adam(LEARNING_RATE)
    opt_state = jax.tree.map(np.asarray, tx.init(params))
    update = make_update(graphdef, tx)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replica",))
    strategy = ts.TPUStrategy(max_steps_in_flight=WINDOW)
    state = (params, opt_state, x, y)
    variants = {
        BASELINE: make_shard_map(mesh, update, *state),
        "(b) jit + NamedSharding": make_auto(mesh, update, *state),
    }
    if keras_reason is None:
        variants[KERAS] = make_keras(workload, x, y)
    variants["(d) tpustrat run"] = make_tpustrat_run(strategy, update, *state)
    cpu = jax.devices()[0].platform == "cpu"
    unroll = True if cpu and workload.convolutional and not scan_loop else 1
    variants["(e) tpustrat run_steps + prefetch + donation"] = make_tpustrat_run_steps(
        strategy, unroll, update, *state
    )
    variants["(f) (e) + ts.shard_update(adam)"] = make_tpustrat_sharded_update(
        strategy, unroll, graphdef, params, x, y
    )
    for variant in variants.values():
        variant.run(STEPS_PER_RUN[0])  # warm up
    seconds = _harness.alternate(
        {name: functools.partial(v.run, steps) for name, v in variants.items()}, rounds
    )
    rates = {name: [global_batch / s for s in values] for name, values in seconds.items()}
    rows = _harness.summarize(rates, BASELINE, per_second=True)
    flops = variants[BASELINE].flops
    peak = peak_flops(jax.devices()[0])
    for row in rows:
        variant = variants[row["variant"]]
        step_s = statistics.median(seconds[row["variant"]])
        row.update(
            units_per_s=row["median"] * workload.units_per_example,
            step_ms=1e3 * step_s,
            first_call_s=variant.first_s,
            memory_mb_per_device=None
            if variant.memory_bytes is None
            else variant.memory_bytes / 2**20,
            flops_per_device_per_s=None if flops is None else flops / step_s,
            mfu=None if flops is None or peak is None else flops / step_s / peak,
        )
    return {
        "workload": workload.name,
        "describe": f"{workload.describe}; (e) and (f) with unroll={unroll}",
        "unit": workload.unit,
        "global_batch": global_batch,
        "flops_per_step_per_device": flops,
        "peak_bf16_flops_per_device": peak,
        "rows": rows,
    }


def print_table(result: dict) -> None:
    unit = result["unit"]
    print(f"\n{result['describe']}, global batch {result['global_batch']}")
    flops = result["flops_per_step_per_device"]
    print(f"FLOPs per step per device (compiled (a)): {flops:.3e}" if flops else "FLOPs: n/a")
    last = "MFU" if result["peak_bf16_flops_per_device"] else "GFLOP/s/device"
    header = ["variant", f"{unit}/s", "ms/step", "ratio", "paired", "spread", "first call s"]
    header += ["MB/device", last]
    cells = []
    for row in result["rows"]:
        memory = row["memory_mb_per_device"]
        achieved = row["flops_per_device_per_s"]
        if achieved is None:
            last_value = "n/a"
        elif row["mfu"] is not None:
            last_value = f"{100 * row['mfu']:.1f}%"
        else:
            last_value = f"{achieved / 1e9:.2f}"
        cells.append(
            [
                row["variant"],
                f"{row['units_per_s']:.1f}",
                f"{row['step_ms']:.1f}",
                f"{row['ratio']:.3f}",
                f"{row['paired_ratio']:.3f}",
                f"{row['spread']:.2f}",
                f"{row['first_call_s']:.1f}",
                "n/a" if memory is None else f"{memory:.1f}",
                last_value,
            ]
        )
    print(_harness.table(header, cells))


def plot(results: list[dict], title: str):
    """Per workload, throughput per variant, whiskers from the slowest to the fastest round."""
    fig = _results.figure(figsize=(8 * len(results), 4.5))
    axes = fig.subplots(1, len(results), squeeze=False)
    for ax, result in zip(axes[0], results):
        rows = result["rows"][::-1]
        names = [row["variant"] for row in rows]
        values = [row["units_per_s"] for row in rows]
        low = [max(0, v * (1 - min(row["rounds"]) / row["median"])) for v, row in zip(values, rows)]
        high = [
            max(0, v * (max(row["rounds"]) / row["median"] - 1)) for v, row in zip(values, rows)
        ]
        bars = ax.barh(names, values, xerr=[low, high], color="#4c72b0", capsize=4)
        for bar, row in zip(bars, rows):
            ax.text(
                bar.get_width() * 0.02,
                bar.get_y() + bar.get_height() / 2,
                f"{row['ratio']:.3f} x (a)",
                va="center",
                color="white",
            )
        ax.set_xlabel(f"{result['unit']}/s (median; whiskers: min and max over rounds)")
        ax.set_title(textwrap.fill(result["describe"], 60), fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("resnet", "gpt", "both"), default="both")
    parser.add_argument("--full", action="store_true", help="the real sizes (TPU or GPU)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--steps-per-run", type=int, default=4, help="for variant (e)")
    parser.add_argument(
        "--scan-loop", action="store_true", help="(e) as a lax.scan loop on CPU too (unroll=1)"
    )
    _results.add_arguments(parser)
    args = parser.parse_args()
    if args.steps % args.steps_per_run:
        parser.error("--steps must be a multiple of --steps-per-run")
    STEPS_PER_RUN[0] = args.steps_per_run
    keras_reason = _harness.keras_unavailable()
    if keras_reason:
        print(f"skipping {KERAS}: {keras_reason}")
    names = ("resnet", "gpt") if args.workload == "both" else (args.workload,)
    builders = {"resnet": resnet_workload, "gpt": gpt_workload}
    results = [
        benchmark(builders[name](args.full), args.rounds, args.steps, keras_reason, args.scan_loop)
        for name in names
    ]
    title = (
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, {args.rounds} rounds of "
        f"{args.steps} steps, {WINDOW} in flight, Adam, bf16 compute / f32 params"
    )
    data = _results.record(
        "workloads_full" if args.full else "workloads",
        title,
        keras_skipped=keras_reason,
        results=results,
    )
    print(f"\n{title}\n{data['machine']}, jax {jax.__version__}")
    for result in results:
        print_table(result)
    _results.write(data, args, plot(results, f"{title}\n{data['machine']}"))


if __name__ == "__main__":
    main()
