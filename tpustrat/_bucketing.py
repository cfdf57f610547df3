"""Shape bucketing: pad varying per-replica batches to powers of two, so few programs compile."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tpustrat._types import PyTree
from tpustrat._values import PerReplica, is_distributed


def bucket_size(rows: int) -> int:
    """The smallest power of two >= ``rows`` (``rows`` >= 1).

    Example:
      >>> [bucket_size(n) for n in (1, 2, 3, 5, 8, 9)]
      [1, 2, 4, 8, 8, 16]
    """
    return 1 << max(rows - 1, 0).bit_length()


def pad_to_bucket(inputs: PyTree) -> tuple[PyTree, np.int32]:
    """Pads every PerReplica leaf's per-replica leading dimension to its bucket with zeros.

    Args:
      inputs: ``run``'s ``(args, kwargs)``.

    Returns:
      The padded inputs and the number of real rows, as an int32 scalar.
    """
    nodes, tree = jax.tree.flatten(inputs, is_leaf=is_distributed)
    rows = {
        int(np.shape(leaf)[1])
        for node in nodes
        if isinstance(node, PerReplica)
        for leaf in jax.tree.leaves(node.stacked)
        if np.ndim(leaf) >= 2
    }
    if len(rows) != 1:
        raise ValueError(
            "shape bucketing pads the leading (batch) dimension shared by every PerReplica "
            f"argument, but their per-replica leading dimensions are {sorted(rows) or 'absent'}; "
            "give every PerReplica leaf the same number of rows, or turn bucketing off"
        )
    (real,) = rows
    target = bucket_size(real)

    def pad(x):
        if np.ndim(x) < 2 or target == real:
            return x
        widths = [(0, 0), (0, target - real)] + [(0, 0)] * (np.ndim(x) - 2)
        if isinstance(x, jax.core.Tracer):
            return jnp.pad(x, widths)
        if isinstance(x, jax.Array):
            return _pad_shards(x, widths)
        # On the host, so that padding compiles nothing per distinct size.
        return np.pad(np.asarray(x), widths)

    padded = [
        PerReplica.from_stacked(jax.tree.map(pad, node.stacked))
        if isinstance(node, PerReplica)
        else node
        for node in nodes
    ]
    return tree.unflatten(padded), np.int32(real)


def _pad_shards(x: jax.Array, widths: list[tuple[int, int]]) -> jax.Array:
    """``x`` padded shard by shard on the host: each process reads only the shards it holds.

    Padding on the host compiles nothing per distinct size; the padded array keeps ``x``'s
    sharding, which must leave the padded (row) dimension whole.
    """
    shape = tuple(n + after for n, (_, after) in zip(x.shape, widths))
    shards = []
    for shard in x.addressable_shards:
        if shard.data.shape[1] != x.shape[1]:
            raise ValueError(
                f"shape bucketing pads the per-replica rows, but this PerReplica argument's "
                f"rows are split over devices ({x.sharding}); leave the row dimension unsplit"
            )
        padded = np.pad(np.asarray(shard.data), widths)
        shards.append(jax.device_put(padded, shard.device))
    return jax.make_array_from_single_device_arrays(shape, x.sharding, shards)
