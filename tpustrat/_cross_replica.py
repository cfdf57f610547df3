"""Combining distributed values outside ``run``: reduce, gather, and per-replica results."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tpustrat import _values
from tpustrat._checks import check_axis
from tpustrat._context import JNP_REDUCTIONS, ReduceOp
from tpustrat._mesh import REPLICA_AXIS
from tpustrat._types import PyTree
from tpustrat._values import PerReplica, is_per_replica


def reduce(op: ReduceOp, value: PyTree, axis: int | None, num_replicas: int) -> PyTree:
    """``strategy.reduce``: across replicas, and along ``axis`` of each replica's value.

    The result has the value and dtype of ``jnp.sum`` / ``mean`` / ``max`` / ``min`` over the
    stacked components (see ``ReduceOp``), as ``ReplicaContext.all_reduce`` gives inside a step.
    """
    _values.check_array_leaves("reduce", value)
    reducer = JNP_REDUCTIONS[op]

    def per_replica(x):
        _check_count("reduce", x, num_replicas)
        op.check_reducible("strategy.reduce", x.dtype)
        axes = (
            (0,)
            if axis is None
            else (0, 1 + check_axis("reduce", axis, np.ndim(x) - 1, _rank(np.ndim(x) - 1)))
        )
        if _on_devices(x):
            return _readable_everywhere(reducer(x, axis=axes), x)
        rows = _every_replica(x)
        dtype = op.result_dtype(rows.dtype)
        wide = rows.astype(np.float32) if rows.dtype.kind == "f" and rows.itemsize < 4 else rows
        host = {
            ReduceOp.SUM: np.sum,
            ReduceOp.MEAN: np.mean,
            ReduceOp.MAX: np.max,
            ReduceOp.MIN: np.min,
        }[op](wide, axis=axes)
        with np.errstate(over="ignore"):  # a float16 sum past 65504 is inf, as on the devices
            return jnp.asarray(np.asarray(host).astype(dtype))

    def replicated(x):
        x = jnp.asarray(x)
        op.check_reducible("strategy.reduce", x.dtype)
        if axis is not None:
            x = reducer(x, axis=check_axis("reduce", axis, x.ndim, _rank(x.ndim)))
        if op.result_dtype(x.dtype) != x.dtype:  # e.g. a mean of ints: a float
            x = x.astype(op.result_dtype(x.dtype))
        return x * num_replicas if op is ReduceOp.SUM else x

    return _values.map_distributed(value, per_replica, replicated)


def gather(value: PyTree, axis: int, num_replicas: int) -> PyTree:
    """``strategy.gather``: every replica's value concatenated along ``axis``."""
    _values.check_array_leaves("gather", value)

    def per_replica(x):
        _check_count("gather", x, num_replicas)
        a = check_axis("gather", axis, np.ndim(x) - 1, _rank(np.ndim(x) - 1))
        shape = x.shape[1:]
        if _on_devices(x):
            moved = jnp.moveaxis(x, 0, a)
            gathered = moved.reshape(*shape[:a], num_replicas * shape[a], *shape[a + 1 :])
            return _readable_everywhere(gathered, x)
        rows = _every_replica(x)
        return jnp.asarray(np.concatenate(list(rows), axis=a))

    def replicated(x):
        x = jnp.asarray(x)
        return jnp.concatenate(
            [x] * num_replicas, axis=check_axis("gather", axis, x.ndim, _rank(x.ndim))
        )

    return _values.map_distributed(value, per_replica, replicated)


def local_results(value: PyTree, mesh: Mesh) -> tuple[PyTree, ...]:
    """One pytree per replica this process addresses, in replica order, each on its devices."""
    _values.check_array_leaves("experimental_local_results", value)
    num_replicas = mesh.shape[REPLICA_AXIS]
    leaves, tree = jax.tree.flatten(_values.unwrap_mirrored(value), is_leaf=is_per_replica)
    for leaf in leaves:
        if isinstance(leaf, PerReplica):
            _check_count("experimental_local_results", leaf.stacked, num_replicas)
    components = [
        _values.replica_components(leaf.stacked) if isinstance(leaf, PerReplica) else None
        for leaf in leaves
    ]
    return tuple(
        tree.unflatten(
            [leaf if parts is None else parts[r] for leaf, parts in zip(leaves, components)]
        )
        for r in _values.local_replicas(mesh)
    )


def _check_count(call: str, stacked: Any, num_replicas: int) -> None:
    """Raises a ValueError unless a PerReplica's ``stacked`` array has ``num_replicas`` rows."""
    count = np.shape(stacked)[0] if np.ndim(stacked) else 0
    if count != num_replicas:
        raise ValueError(
            f"strategy.{call} value is a PerReplica with {count} components, but the strategy has "
            f"{num_replicas} replicas; pass a value with one component per replica, made by this "
            "strategy (run's output, experimental_distribute_values_from_function or a "
            "distributed dataset), or use the strategy that made it"
        )


def _on_devices(x: Any) -> bool:
    """Whether to combine ``x`` with a device program rather than on the host.

    Inside the user's ``jax.jit`` (a tracer) there is no host; typed keys (which only
    ``gather`` accepts) have no host form.
    Every other value is combined on the host from the shards this process holds: a program
    over hundreds of devices would cost far more than reading them.
    """
    return isinstance(x, jax.core.Tracer) or _values.is_key(x)


def _every_replica(x: Any) -> np.ndarray:
    """Every replica's component of ``x``, stacked on the host in replica order.

    In a job of several processes each process reads its own replicas and they exchange them
    (``multihost_utils.process_allgather``).
    """
    local = _values.local_components(x)
    replicas = sorted(local)
    rows = np.stack([local[r] for r in replicas])
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        every = multihost_utils.process_allgather(np.asarray(replicas, np.int32), tiled=True)
        rows = multihost_utils.process_allgather(rows, tiled=True)[np.argsort(every)]
    return rows


def _readable_everywhere(result: jax.Array, source: Any) -> jax.Array:
    """``result``, replicated when ``source`` spans several processes, so that each can read it."""
    concrete = isinstance(source, jax.Array) and not isinstance(source, jax.core.Tracer)
    if not concrete or source.is_fully_addressable:
        return result
    sharding = source.sharding
    if not isinstance(sharding, NamedSharding):
        raise TypeError(
            f"a value that spans several processes must be laid out with a NamedSharding to be "
            f"reduced or gathered, got a {type(sharding).__name__}; place it with "
            "jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))"
        )
    replicated = NamedSharding(sharding.mesh, P())
    if _values.is_key(result):  # device_put moves no typed key between processes: move its bits
        bits = jax.device_put(jax.random.key_data(result), replicated)
        return jax.random.wrap_key_data(bits, impl=jax.random.key_impl(result))
    return jax.device_put(result, replicated)


def _rank(ndim: int) -> str:
    return f"per-replica values of rank {ndim}"
