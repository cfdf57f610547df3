"""TPUStrategy: one object that owns the mesh, runs steps on every replica and combines results."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tpustrat import _mesh, _run, _values
from tpustrat._context import ReduceOp, ReplicaContext, strategy_scope
from tpustrat._values import Mirrored, PerReplica, ValueContext

PyTree = Any

_REDUCERS = {
    ReduceOp.SUM: jnp.sum,
    ReduceOp.MEAN: jnp.mean,
    ReduceOp.MAX: jnp.max,
    ReduceOp.MIN: jnp.min,
}


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Per-call options of ``strategy.run``.

    Attributes:
      donate_argnums: positions in ``args`` whose arrays ``run`` may overwrite with its outputs
        (the training state, typically), so that an update happens in place. A donated argument
        must not be used after the call.
    """

    donate_argnums: tuple[int, ...] = ()


class TPUStrategy:
    """Synchronous data parallelism over a ``("replica", "logical_core")`` device mesh.

    ``run`` executes a step function on every replica as one compiled SPMD program; PerReplica
    arguments give each replica its own component, anything else is given whole to every
    replica. Inside the step, values are local to the replica (as under ``jax.pmap``) until the
    step combines them with ``ts.get_replica_context().all_reduce``.

    Args:
      devices: the devices to use, in replica-major order; default ``jax.devices()``.
      num_logical_cores: how many devices each replica spans (for model parallelism).
      max_steps_in_flight: how many ``run`` calls may be queued on the devices before ``run``
        waits for the oldest. Small numbers keep the host in step and avoid runaway queues.

    Example:
      >>> strategy = ts.TPUStrategy()
      >>> values = strategy.experimental_distribute_values_from_function(
      ...     lambda ctx: np.float32(ctx.replica_id_in_sync_group))
      >>> doubled = strategy.run(lambda x: 2 * x, args=(values,))
      >>> float(strategy.reduce("sum", doubled))
      56.0
    """

    def __init__(
        self,
        devices: Sequence[jax.Device] | None = None,
        num_logical_cores: int = 1,
        *,
        max_steps_in_flight: int = 2,
    ):
        self._mesh = _mesh.build_mesh(
            jax.devices() if devices is None else devices, num_logical_cores
        )
        self._window = _run.DispatchWindow(max_steps_in_flight)
        self._per_replica_sharding = _mesh.per_replica_sharding(self._mesh)
        self._replicated_sharding = _mesh.replicated_sharding(self._mesh)
        self._steps: dict[Any, Callable[..., PyTree]] = {}

    @property
    def mesh(self) -> jax.sharding.Mesh:
        """The ``jax.sharding.Mesh`` with axes ``("replica", "logical_core")``."""
        return self._mesh

    @property
    def num_replicas_in_sync(self) -> int:
        """How many replicas run each step together."""
        return self._mesh.shape[_mesh.REPLICA_AXIS]

    @property
    def num_logical_cores(self) -> int:
        """How many devices each replica spans."""
        return self._mesh.shape[_mesh.LOGICAL_CORE_AXIS]

    def __repr__(self) -> str:
        return (
            f"TPUStrategy(num_replicas_in_sync={self.num_replicas_in_sync}, "
            f"num_logical_cores={self.num_logical_cores}, "
            f"platform={self._mesh.devices.flat[0].platform!r})"
        )

    def scope(self) -> contextlib.AbstractContextManager[TPUStrategy]:
        """A context in which ``ts.get_strategy()`` returns this strategy."""
        return strategy_scope(self)

    def run(
        self,
        fn: Callable[..., PyTree],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        options: RunOptions | None = None,
    ) -> PyTree:
        """Runs ``fn(*args, **kwargs)`` on every replica.

        Called from Python, ``run`` compiles once per function and argument signature and reuses
        the executable; called inside ``jax.jit``, it becomes part of the caller's program.

        Args:
          fn: the step; it sees replica-local values and may use ``ts.get_replica_context()``.
          args: a tuple; PerReplica leaves give replica i its i-th component, every other leaf
            (arrays, numbers, Mirrored values) is given whole to every replica.
          kwargs: keyword arguments, treated like ``args``.
          options: a ``ts.RunOptions``.

        Returns:
          ``fn``'s output structure with each leaf a Mirrored (provably the same on every
          replica, e.g. an all-reduce result) or a PerReplica.
        """
        if not callable(fn):
            raise TypeError(f"strategy.run needs a callable step, got {type(fn).__name__}")
        if not isinstance(args, (tuple, list)):
            raise TypeError(
                f"strategy.run args must be a tuple, got {type(args).__name__}; for a single "
                "argument write args=(x,)"
            )
        options = options or RunOptions()
        inputs, traced = self._prepare((tuple(args), dict(kwargs or {})))
        key = (fn, tuple(options.donate_argnums))
        step = self._steps.get(key)
        if step is None:
            step = _run.build_step(
                fn, self._mesh, lambda: ReplicaContext(self), donate_argnums=key[1]
            )
            self._steps[key] = step
        outputs = step(*inputs[0], **inputs[1])
        if not traced:
            self._window.admit(outputs)
        return outputs

    def reduce(self, reduce_op: ReduceOp | str, value: PyTree, axis: int | None = None) -> PyTree:
        """Combines a distributed value across replicas into one value.

        With ``axis``, each replica's value is also reduced along that axis, so MEAN with
        ``axis=0`` averages over every example of every replica. As in tf.distribute, a Mirrored
        value (and any plain array, which counts as the same on every replica) reduces to itself
        under MEAN, MAX and MIN, and to ``num_replicas_in_sync`` times itself under SUM.

        Args:
          reduce_op: a ReduceOp or one of ``"sum"``, ``"mean"``, ``"max"``, ``"min"``.
          value: a PerReplica, a Mirrored, or a pytree of them, e.g. ``run``'s output.
          axis: an axis of each replica's value to reduce too, or None.

        Returns:
          A pytree of ``jax.Array``.
        """
        op = ReduceOp.parse(reduce_op)
        reducer, n = _REDUCERS[op], self.num_replicas_in_sync

        def per_replica(x):
            if axis is None:
                return reducer(x, axis=0)
            return reducer(x, axis=(0, 1 + _check_axis(axis, np.ndim(x) - 1, "reduce")))

        def mirrored(x):
            x = jnp.asarray(x)
            if axis is not None:
                x = reducer(x, axis=_check_axis(axis, x.ndim, "reduce"))
            return x * n if op is ReduceOp.SUM else x

        result = _values.map_distributed(value, per_replica, mirrored)
        self._window.admit(result)
        return result

    def gather(self, value: PyTree, axis: int) -> PyTree:
        """Concatenates every replica's value along ``axis``, in replica order.

        Args:
          value: a PerReplica, a Mirrored (gathered as identical copies), or a pytree of them.
          axis: the axis of each replica's value to concatenate along.

        Returns:
          A pytree of ``jax.Array`` whose ``axis`` is ``num_replicas_in_sync`` times longer.
        """
        n = self.num_replicas_in_sync

        def per_replica(x):
            a = _check_axis(axis, np.ndim(x) - 1, "gather")
            shape = x.shape[1:]
            moved = jnp.moveaxis(x, 0, a)
            return moved.reshape(*shape[:a], n * shape[a], *shape[a + 1 :])

        def mirrored(x):
            x = jnp.asarray(x)
            return jnp.concatenate([x] * n, axis=_check_axis(axis, x.ndim, "gather"))

        result = _values.map_distributed(value, per_replica, mirrored)
        self._window.admit(result)
        return result

    def experimental_local_results(self, value: PyTree) -> tuple[PyTree, ...]:
        """Splits a distributed value into one pytree per replica of this process.

        Args:
          value: a PerReplica, a Mirrored, or a pytree of them (plain leaves are repeated).

        Returns:
          A tuple with one pytree per local replica, in replica order. In a job of several
          processes only the replicas of this process are included.
        """
        return tuple(
            _values.map_distributed(value, lambda x, r=r: _component(x, r), lambda x: x)
            for r in _values.local_replicas(self._mesh)
        )

    def experimental_distribute_values_from_function(
        self, value_fn: Callable[[ValueContext], PyTree]
    ) -> PerReplica:
        """Builds a PerReplica by calling ``value_fn`` once for each replica.

        Args:
          value_fn: takes a ``ts.ValueContext`` and returns that replica's pytree of arrays;
            every replica's value must have the same structure, shapes and dtypes.

        Returns:
          A PerReplica whose component i is ``value_fn(ValueContext(i, num_replicas_in_sync))``.
        """
        n = self.num_replicas_in_sync
        components = {r: value_fn(ValueContext(r, n)) for r in _values.local_replicas(self._mesh)}
        return _values.place_per_replica(components, self._mesh)

    def replicate(self, tree: PyTree) -> Mirrored:
        """Copies ``tree`` (parameters, optimizer state) to every replica.

        Returns:
          A Mirrored; pass it to ``run`` and every replica sees the whole ``tree``.
        """
        if any(
            isinstance(x, PerReplica) for x in jax.tree.leaves(tree, is_leaf=_values.is_distributed)
        ):
            raise TypeError(
                "replicate got a PerReplica value; reduce it first, e.g. "
                "strategy.reduce('mean', value)"
            )
        return _values.place_mirrored(tree, self._mesh)

    def experimental_distribute_dataset(self, dataset, options=None):
        """Distributes a dataset of global batches over the replicas; see ``_input``."""
        from tpustrat import _input

        return _input.distribute_dataset(self, dataset, options)

    def distribute_datasets_from_function(self, dataset_fn, options=None):
        """Distributes per-process datasets made by ``dataset_fn``; see ``_input``."""
        from tpustrat import _input

        return _input.distribute_datasets_from_function(self, dataset_fn, options)

    def _prepare(self, inputs: PyTree) -> tuple[PyTree, bool]:
        """Checks ``run``'s inputs and places them on the mesh; also says if they are traced.

        One pass over the inputs; the tree is rebuilt only when some leaf must move.
        """
        nodes, tree = jax.tree.flatten(inputs, is_leaf=_values.is_distributed)
        n = self.num_replicas_in_sync
        per_replica, replicated = self._per_replica_sharding, self._replicated_sharding
        traced = moved = False
        placed_nodes = []
        for index, node in enumerate(nodes):
            if isinstance(node, PerReplica):
                leaves, sub, sharding = *jax.tree.flatten(node.stacked), per_replica
                if any(np.ndim(x) == 0 or np.shape(x)[0] != n for x in leaves):
                    raise ValueError(
                        f"{self._where(inputs, index)} is a PerReplica with {node.num_replicas} "
                        f"components but the strategy has {n} replicas; build it with one "
                        "component per replica, e.g. with "
                        "strategy.experimental_distribute_values_from_function"
                    )
            elif isinstance(node, Mirrored):
                leaves, sub, sharding = *jax.tree.flatten(node.value), replicated
            else:
                leaves, sub, sharding = [node], None, replicated
            placed = []
            for x in leaves:
                if isinstance(x, jax.core.Tracer):
                    traced = True
                elif not (isinstance(x, jax.Array) and x.sharding == sharding):
                    if not isinstance(x, _run.ARRAY_TYPES):
                        raise TypeError(
                            f"{self._where(inputs, index)} is a {type(x).__name__}; strategy.run "
                            "passes only arrays, numbers and pytrees of them (close over other "
                            "values in the step function instead)"
                        )
                    x, moved = jax.device_put(x, sharding), True
                placed.append(x)
            if sub is None:
                placed_nodes.append(placed[0])
            else:
                value = sub.unflatten(placed)
                placed_nodes.append(
                    PerReplica.from_stacked(value)
                    if isinstance(node, PerReplica)
                    else Mirrored(value)
                )
        if traced or not moved:
            return inputs, traced
        return tree.unflatten(placed_nodes), traced

    @staticmethod
    def _where(inputs: PyTree, index: int) -> str:
        path = jax.tree_util.tree_flatten_with_path(inputs, is_leaf=_values.is_distributed)[0][
            index
        ][0]
        return ("kwargs" if path[0].idx == 1 else "args") + jax.tree_util.keystr(path[1:])


def _check_axis(axis: int, ndim: int, what: str) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{what} axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{what} axis {axis} is out of range for per-replica values of rank {ndim}; use an "
            f"axis in [{-ndim}, {ndim})"
        )
    return int(axis) % ndim


def _component(x: jax.Array, replica: int) -> jax.Array:
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return x[replica]
    # Several processes: assemble this replica's rows from the shards this process holds.
    out = np.empty(x.shape[1:], x.dtype)
    for shard in x.addressable_shards:
        rows = shard.index[0]
        start = rows.start or 0
        stop = x.shape[0] if rows.stop is None else rows.stop
        if start <= replica < stop:
            out[shard.index[1:]] = np.asarray(shard.data)[replica - start]
    return jnp.asarray(out)
