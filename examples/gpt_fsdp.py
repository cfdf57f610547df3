"""A small GPT in Flax NNX trained with its parameters sharded over the replicas (FSDP).

The model: token and position embeddings, ``--layers`` pre-norm transformer blocks (causal
self-attention, then an MLP) created with ``nnx.vmap`` and run by ``nnx.scan`` under
``nnx.remat``, a final LayerNorm and an output head. ``ts.shard_params(model, strategy)`` cuts
every parameter of rank >= 2 into one block per replica, in place; inside ``strategy.run`` a
block's weights are all-gathered when the scan reaches that layer, so one layer is whole at a
time, and the gradients come back as blocks for ``ts.shard_update(optax.adamw)``. The model's
code is the same as for plain data parallelism.

The task is synthesised: each sequence reads a fixed cycle of ``--period`` distinct tokens from a
random start, so the next token is always predictable and the loss falls towards zero. Before
training, the script compiles the train step for both layouts and prints the bytes per device
from ``memory_analysis()`` (argument + output + temp - alias).

On a CPU-only machine the script simulates 8 devices; on a TPU VM it uses the TPU cores.

Usage: python examples/gpt_fsdp.py [--steps 30] [--layers 4] [--width 64] [--heads 4]
         [--vocab 64] [--seq-len 24] [--batch-size 32]
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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import tpustrat as ts


class Block(nnx.Module):
    """A pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
        self.proj = nnx.Linear(width, width, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
        q, k, v = (t.reshape(batch, length, self.heads, width // self.heads) for t in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(width // self.heads)
        causal = jnp.tril(jnp.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
        x = x + self.proj(attended)
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class GPT(nnx.Module):
    """Embeddings, ``layers`` scanned blocks, a final norm and an output head."""

    def __init__(self, vocab: int, length: int, width: int, heads: int, layers: int, seed: int):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (length, width)))

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(width, heads, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def layer(x: jax.Array, block: Block) -> jax.Array:
            return block(x)

        return self.head(self.norm(layer(x, self.blocks)))


def loss_fn(model: GPT, tokens: jax.Array) -> jax.Array:
    """Next-token cross entropy, averaged over this replica's sequences and positions."""
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def sharded_step(model: GPT, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads)  # the blocks' gradients, summed over replicas by the gather
    return ts.get_replica_context().all_reduce("mean", loss)


def data_parallel_step(model: GPT, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, ts.get_replica_context().all_reduce("mean", grads))
    return ts.get_replica_context().all_reduce("mean", loss)


def cycles(vocab: int, period: int, length: int, rows: int, seed: int) -> np.ndarray:
    """``rows`` sequences of one fixed cycle of ``period`` distinct tokens, random starts."""
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(vocab)[:period]
    starts = rng.integers(0, period, size=(rows, 1))
    return cycle[(starts + np.arange(length)) % period].astype(np.int32)


def bytes_per_device(strategy: ts.TPUStrategy, step, model, optimizer, tokens) -> int:
    """The compiled step's argument + output + temp - alias bytes per device."""
    graphdef, state = nnx.split((model, optimizer))

    def pure(state, tokens):
        model, optimizer = nnx.merge(graphdef, state)
        loss = step(model, optimizer, tokens)
        return nnx.state((model, optimizer)), loss

    compiled = (
        jax.jit(lambda s, t: strategy.run(pure, args=(s, t)), donate_argnums=0)
        .lower(state, tokens)
        .compile()
    )
    memory = compiled.memory_analysis()
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )


class Result(NamedTuple):
    losses: list[float]
    sharded_bytes: int
    data_parallel_bytes: int
    parameters: int


def main(argv: Sequence[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--period", type=int, default=12, help="tokens in the repeated cycle")
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per global batch")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args(argv)

    strategy = ts.TPUStrategy()
    replicas = strategy.num_replicas_in_sync
    shape = (args.vocab, args.seq_len, args.width, args.heads, args.layers)

    def tx() -> optax.GradientTransformation:
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.learning_rate))

    def batches(seed: int):
        rows = cycles(args.vocab, args.period, args.seq_len, args.batch_size * args.steps, seed)
        return strategy.experimental_distribute_dataset(np.split(rows, args.steps))

    model = ts.shard_params(GPT(*shape, seed=0), strategy)  # the one switch
    optimizer = nnx.Optimizer(model, ts.shard_update(tx()), wrt=nnx.Param)
    plain = strategy.replicate(GPT(*shape, seed=0))
    plain_optimizer = nnx.Optimizer(plain, tx(), wrt=nnx.Param)
    parameters = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(plain, nnx.Param)))

    tokens = next(iter(batches(seed=1)))
    sharded_bytes = bytes_per_device(strategy, sharded_step, model, optimizer, tokens)
    plain_bytes = bytes_per_device(strategy, data_parallel_step, plain, plain_optimizer, tokens)
    print(f"{parameters:,} parameters, {replicas} replicas; train step bytes per device:")
    print(f"  data parallelism:    {plain_bytes:>12,}")
    print(f"  sharded parameters:  {sharded_bytes:>12,} ({sharded_bytes / plain_bytes:.2f}x)")

    losses = []
    for step, batch in enumerate(batches(seed=0), 1):
        losses.append(float(strategy.run(sharded_step, args=(model, optimizer, batch))))
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:4d}: loss {losses[-1]:.4f}")
    ts.gather_params(model)  # whole parameters again, for export or one-device evaluation
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return Result(losses, int(sharded_bytes), int(plain_bytes), parameters)


if __name__ == "__main__":
    main()
