"""Collectives that tpustrat builds from JAX's own: the hierarchical all-reduce of multi-slice jobs.

A job of several slices (TPU slices joined over the data-centre network) all-reduces in three
steps: a reduce-scatter inside each slice, an all-reduce of the shards across slices, and an
all-gather inside each slice. The links between slices then carry ``1 / replicas_per_slice`` of
the bytes a flat all-reduce would send over them.
"""

from __future__ import annotations

import jax
from jax import lax

from tpustrat._jaxpr import mark_invariant
from tpustrat._mesh import REPLICA_AXIS


def hierarchical_sum(x: jax.Array, num_replicas: int, num_slices: int) -> jax.Array:
    """The sum of ``x`` over every replica, reduced slice by slice (see ``all_reduce``).

    Replicas ``[s * P, (s + 1) * P)`` form slice ``s`` for ``P = num_replicas // num_slices``.
    The result is the same on every replica by construction, which the grouped collectives
    inside do not show the replicated-output proof (``_replication``): it is marked invariant
    over the replica axis (``mark_invariant``), so the proof reads it as it reads a ``psum``.

    Example:
      >>> strategy = ts.TPUStrategy(num_slices=2)
      >>> x = np.arange(16, dtype=np.float32).reshape(8, 2)
      >>> spec = jax.sharding.PartitionSpec
      >>> f = jax.shard_map(lambda x: hierarchical_sum(x, 8, 2), mesh=strategy.mesh,
      ...                   in_specs=spec("replica"), out_specs=spec(), check_vma=False)
      >>> f(x)
      Array([[56., 64.]], dtype=float32)
    """
    per_slice = num_replicas // num_slices
    within = [list(range(s * per_slice, (s + 1) * per_slice)) for s in range(num_slices)]
    across = [list(range(i, num_replicas, per_slice)) for i in range(per_slice)]

    def all_reduce(x):
        flat = x.reshape(-1)
        padded = jax.numpy.pad(flat, (0, -flat.size % per_slice))
        shard = lax.psum_scatter(
            padded, REPLICA_AXIS, scatter_dimension=0, axis_index_groups=within, tiled=True
        )
        shard = lax.psum(shard, REPLICA_AXIS, axis_index_groups=across)
        whole = lax.all_gather(shard, REPLICA_AXIS, axis_index_groups=within, tiled=True)
        return whole[: flat.size].reshape(x.shape)

    return mark_invariant(all_reduce(x), (REPLICA_AXIS,), x)
