"""Combining distributed values outside ``run``: reduce, gather, and per-replica results."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tpustrat import _values
from tpustrat._context import ReduceOp

PyTree = Any

_REDUCERS = {
    ReduceOp.SUM: jnp.sum,
    ReduceOp.MEAN: jnp.mean,
    ReduceOp.MAX: jnp.max,
    ReduceOp.MIN: jnp.min,
}


def reduce(op: ReduceOp, value: PyTree, axis: int | None, num_replicas: int) -> PyTree:
    """``strategy.reduce``: across replicas, and along ``axis`` of each replica's value."""
    reducer = _REDUCERS[op]

    def per_replica(x):
        if axis is None:
            return _readable_everywhere(reducer(x, axis=0), x)
        axes = (0, 1 + check_axis(axis, np.ndim(x) - 1, "reduce"))
        return _readable_everywhere(reducer(x, axis=axes), x)

    def mirrored(x):
        x = jnp.asarray(x)
        if axis is not None:
            x = reducer(x, axis=check_axis(axis, x.ndim, "reduce"))
        return x * num_replicas if op is ReduceOp.SUM else x

    return _values.map_distributed(value, per_replica, mirrored)


def gather(value: PyTree, axis: int, num_replicas: int) -> PyTree:
    """``strategy.gather``: every replica's value concatenated along ``axis``."""

    def per_replica(x):
        a = check_axis(axis, np.ndim(x) - 1, "gather")
        shape = x.shape[1:]
        moved = jnp.moveaxis(x, 0, a)
        gathered = moved.reshape(*shape[:a], num_replicas * shape[a], *shape[a + 1 :])
        return _readable_everywhere(gathered, x)

    def mirrored(x):
        x = jnp.asarray(x)
        return jnp.concatenate([x] * num_replicas, axis=check_axis(axis, x.ndim, "gather"))

    return _values.map_distributed(value, per_replica, mirrored)


def local_results(value: PyTree, mesh: Mesh) -> tuple[PyTree, ...]:
    """One pytree per replica this process addresses, in replica order."""
    return tuple(
        _values.map_distributed(value, lambda x, r=r: _values.replica_component(x, r), lambda x: x)
        for r in _values.local_replicas(mesh)
    )


def _readable_everywhere(result: jax.Array, source: Any) -> jax.Array:
    """``result``, replicated when ``source`` spans several processes, so that each can read it."""
    concrete = isinstance(source, jax.Array) and not isinstance(source, jax.core.Tracer)
    if concrete and not source.is_fully_addressable:
        return jax.device_put(result, NamedSharding(source.sharding.mesh, P()))
    return result


def check_axis(axis: int, ndim: int, what: str) -> int:
    """``axis`` as a non-negative index into a per-replica value of rank ``ndim``."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{what} axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{what} axis {axis} is out of range for per-replica values of rank {ndim}; use an "
            f"axis in [{-ndim}, {ndim})"
        )
    return int(axis) % ndim
