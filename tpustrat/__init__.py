"""tpustrat: tf.distribute.TPUStrategy for JAX, built on jax.sharding and jax.shard_map."""

from tpustrat._context import (
    ReduceOp,
    ReplicaContext,
    get_replica_context,
    get_strategy,
)
from tpustrat._strategy import RunOptions, TPUStrategy
from tpustrat._values import Mirrored, PerReplica, ValueContext

__version__ = "0.1.0"

__all__ = [
    "Mirrored",
    "PerReplica",
    "ReduceOp",
    "ReplicaContext",
    "RunOptions",
    "TPUStrategy",
    "ValueContext",
    "get_replica_context",
    "get_strategy",
]
