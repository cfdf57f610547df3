"""TPUStrategy: one object that owns the mesh, runs steps on every replica and combines results."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from tpustrat import (
    _accounting,
    _bucketing,
    _cross_replica,
    _mesh,
    _multistep,
    _nnx,
    _placement,
    _run,
    _values,
)
from tpustrat._context import ReduceOp, ReplicaContext, strategy_scope
from tpustrat._input import DatasetDistribution
from tpustrat._logical import LogicalCoreAnnotations
from tpustrat._topology import DeviceAssignment
from tpustrat._values import PerReplica, ValueContext

PyTree = Any


class TPUStrategy(DatasetDistribution, LogicalCoreAnnotations):
    """Synchronous data parallelism over a ``("replica", "logical_core")`` device mesh.

    ``run`` executes a step function on every replica as one compiled SPMD program; PerReplica
    arguments give each replica its own component, anything else is given whole to every
    replica. Inside the step, values are local to the replica (as under ``jax.pmap``) until the
    step combines them with ``ts.get_replica_context().all_reduce``.

    Args:
      devices: the devices to use, in replica-major order; default ``jax.devices()``.
      num_logical_cores: how many devices each replica spans (for model parallelism).
      device_assignment: a ``ts.DeviceAssignment`` that fixes every replica's devices and
        logical cores on the physical topology; replaces ``devices`` and ``num_logical_cores``.
      spmd: TF's ``experimental_spmd_xla_partitioning``. JAX always compiles one SPMD program;
        True only refuses ``experimental_assign_to_logical_device``, as TF does.
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
        device_assignment: DeviceAssignment | None = None,
        spmd: bool = False,
        max_steps_in_flight: int = 2,
    ):
        if device_assignment is not None:
            if devices is not None or num_logical_cores not in (
                1,
                device_assignment.num_cores_per_replica,
            ):
                raise ValueError(
                    "pass either device_assignment or devices/num_logical_cores, not both: the "
                    "device assignment already fixes the devices and cores of every replica"
                )
            devices = device_assignment.devices
        self._mesh = _mesh.build_mesh(
            jax.devices() if devices is None else devices, num_logical_cores
        )
        self._public_mesh = _mesh.public_mesh(self._mesh)
        self._device_assignment = device_assignment
        self._spmd = bool(spmd)
        self._window = _run.DispatchWindow(max_steps_in_flight)
        self._per_replica_sharding = _mesh.per_replica_sharding(self._mesh)
        self._replicated_sharding = _mesh.replicated_sharding(self._mesh)
        self._steps: dict[Any, _run.Step] = {}
        self._multisteps: dict[Any, _multistep.MultiStep] = {}
        self._lifted: dict[Any, _nnx.Lifted] = {}
        self._ledger = _accounting.Ledger()
        self._donated = _placement.DonationRecord()
        self._layouts = _placement.PlacedLayouts()

    @property
    def mesh(self) -> jax.sharding.Mesh:
        """The ``jax.sharding.Mesh`` with axes ``("replica", "logical_core")``.

        Arrays the strategy places live on an equivalent mesh whose logical cores are factored
        into prime-sized sub-axes (``logical_core.0``, ...), so that the logical-core
        annotations can tile a tensor over several dimensions; the devices are the same.
        """
        return self._public_mesh

    @property
    def experimental_device_assignment(self) -> DeviceAssignment | None:
        """The DeviceAssignment the strategy was built with, if any."""
        return self._device_assignment

    @property
    def num_replicas_in_sync(self) -> int:
        """How many replicas run each step together."""
        return self._mesh.shape[_mesh.REPLICA_AXIS]

    @property
    def num_logical_cores(self) -> int:
        """How many devices each replica spans."""
        return self._public_mesh.shape[_mesh.LOGICAL_CORE_AXIS]

    def __repr__(self) -> str:
        return (
            f"TPUStrategy(num_replicas_in_sync={self.num_replicas_in_sync}, "
            f"num_logical_cores={self.num_logical_cores}, "
            f"platform={self._mesh.devices.flat[0].platform!r})"
        )

    def scope(self) -> contextlib.AbstractContextManager[TPUStrategy]:
        """A context in which ``ts.get_strategy()`` returns this strategy.

        Example:
          >>> strategy = ts.TPUStrategy()
          >>> with strategy.scope():
          ...     ts.get_strategy() is strategy
          True
        """
        return strategy_scope(self)

    def run(
        self,
        fn: Callable[..., PyTree],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        options: _run.RunOptions | None = None,
    ) -> PyTree:
        """Runs ``fn(*args, **kwargs)`` on every replica.

        Called from Python, ``run`` compiles once per function and argument signature and reuses
        the executable; called inside ``jax.jit``, it becomes part of the caller's program.

        Args:
          fn: the step; it sees replica-local values and may use ``ts.get_replica_context()``.
          args: a tuple; PerReplica leaves give replica i its i-th component, an array split
            over the replica axis gives each replica its block, and every other leaf (arrays,
            numbers) is given whole to every replica. Flax NNX objects (``nnx.Module``,
            ``nnx.Optimizer``, ``nnx.Metric``) are updated in place, as under ``nnx.jit``.
          kwargs: keyword arguments, treated like ``args``.
          options: a ``ts.RunOptions``.

        Returns:
          ``fn``'s output structure, each leaf either a ``jax.Array`` replicated over the mesh
          (provably the same on every replica, e.g. an all-reduce result) or a PerReplica.

        Example:
          >>> strategy = ts.TPUStrategy(num_logical_cores=2)  # 4 replicas
          >>> def step(w, x):
          ...     ctx = ts.get_replica_context()
          ...     return {"local": w * x, "total": ctx.all_reduce("sum", w * x)}
          >>> x = ts.PerReplica([np.float32(i) for i in range(4)])
          >>> out = strategy.run(step, args=(np.float32(2), x))
          >>> out["local"], float(out["total"])
          (PerReplica(float32[4]), 12.0)
        """
        if not callable(fn):
            raise TypeError(f"strategy.run needs a callable step, got {type(fn).__name__}")
        if not isinstance(args, (tuple, list)):
            raise TypeError(
                f"strategy.run args must be a tuple, got {type(args).__name__}; for a single "
                "argument write args=(x,)"
            )
        options = options or _DEFAULT_OPTIONS
        if options.donate_argnums and max(options.donate_argnums) >= len(args):
            raise ValueError(
                f"donate_argnums {options.donate_argnums} names a position past the {len(args)} "
                "args of this call; donate an existing position, e.g. (0,) for the state"
            )
        inputs = (tuple(args), dict(kwargs or {}))
        leaves, structure = jax.tree.flatten(inputs)
        block_specs = False
        if not (options.experimental_bucketizing_dynamic_shape or self._donated.may_hold(leaves)):
            block_specs = self._layouts.match(leaves, structure)
        if block_specs is not False:  # every leaf already in place, as on the last such call
            return self._call(fn, options, None, block_specs, inputs, fast=True)
        split = _nnx.split_objects(inputs)
        if split is not None:
            return self._run_nnx(fn, args, split, options)
        valid_rows = None
        if options.experimental_bucketizing_dynamic_shape:
            inputs, valid_rows = _bucketing.pad_to_bucket(inputs)
        inputs, block_specs, traced = self._prepare(inputs)
        if traced:
            return self._step((fn, options.donate_argnums))(valid_rows, block_specs, *inputs)[0]
        return self._call(fn, options, valid_rows, block_specs, inputs, fast=False)

    def _prepare(self, inputs: PyTree) -> tuple[PyTree, Any, bool]:
        return _placement.prepare(
            inputs,
            self.num_replicas_in_sync,
            self._per_replica_sharding,
            self._replicated_sharding,
            self._donated,
            self._layouts,
        )

    def _call(self, fn, options, valid_rows, block_specs, inputs, fast: bool) -> PyTree:
        """Runs the compiled step on placed ``inputs`` and does the host's bookkeeping.

        On the fast path the inputs were not checked leaf by leaf; when ``jax.jit`` refuses
        them (a deleted buffer, a PerReplica of the wrong length), ``prepare`` says why.
        """
        key = (fn, options.donate_argnums)
        step = self._step(key)
        try:
            outputs, marker, retraced, compiled = step(valid_rows, block_specs, *inputs)
        except Exception:
            if not fast:
                raise
            try:
                self._prepare(inputs)  # raises the clear error when an input is at fault
            except (TypeError, ValueError) as clear:
                raise clear from None
            raise
        if isinstance(marker, jax.core.Tracer):  # inside the user's jax.jit: nothing dispatched
            return outputs
        if options.donate_argnums:
            self._donated.add_survivors(inputs[0], options.donate_argnums)
        self._ledger.count(key, step.name, retraced, compiled)
        self._window.admit(marker)
        return outputs

    def _run_nnx(self, fn, args, split, options: _run.RunOptions) -> PyTree:
        """``run`` of a step that takes Flax NNX objects: their new state is written back."""
        graphdef, state, objects, (structure, positions), leaves = split
        object_args = {
            i for i, arg in enumerate(args) if any(map(_nnx.is_nnx_object, _nnx_leaves(arg)))
        }
        if not set(options.donate_argnums) <= object_args:
            raise ValueError(
                f"donate_argnums {options.donate_argnums} names array arguments of a step that "
                f"takes NNX objects (at {sorted(object_args)}); with NNX arguments only the "
                "objects' state can be donated: donate their positions only"
            )
        key = (fn, graphdef, structure, positions)
        lifted = self._lifted.get(key)
        if lifted is None:
            lifted = self._lifted[key] = _nnx.Lifted(fn, graphdef, structure, positions)
        donate = (0,) if options.donate_argnums else ()
        out, new_state = self.run(
            lifted,
            args=(state, leaves),
            options=dataclasses.replace(options, donate_argnums=donate),
        )
        _nnx.write_back(objects, new_state)
        return out

    def experimental_run_steps(
        self,
        fn: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]],
        state: PyTree,
        iterator: Iterator[PyTree],
        steps_per_run: int,
        *,
        stack_outputs: bool = False,
        options: _run.RunOptions | None = None,
    ) -> _multistep.StepsResult:
        """Runs up to ``steps_per_run`` training steps in one compiled program.

        Takes the next ``steps_per_run`` batches from ``iterator`` (a distributed dataset's
        iterator, say), stacks them on the devices and runs ``fn`` over them in a ``lax.scan``,
        carrying the state. The result equals ``steps_per_run`` separate ``run`` calls, with one
        dispatch instead of many (TF's ``steps_per_run``, Keras's ``steps_per_execution``).

        Args:
          fn: ``fn(state, batch) -> (state, outputs)``, a step as passed to ``run``.
          state: the training state, e.g. replicated parameters and optimizer state.
          iterator: yields batches (PerReplica pytrees) of one structure and shape.
          steps_per_run: how many batches to consume.
          stack_outputs: return every step's outputs stacked (True) or the last step's (False).
          options: ``ts.RunOptions`` for the compiled program (``donate_argnums=(0,)`` donates
            the state).

        Returns:
          A ``StepsResult(state, outputs, num_steps)``. At the end of the data ``num_steps`` is
          smaller than asked (the remaining batches run as single steps) and 0 when nothing was
          left, with ``outputs`` None.

        Example:
          >>> strategy = ts.TPUStrategy()
          >>> batches = iter([strategy.experimental_distribute_values_from_function(
          ...     lambda ctx: np.float32(1.0))] * 3)
          >>> step = lambda total, x: (total + ts.get_replica_context().all_reduce("sum", x), x)
          >>> result = strategy.experimental_run_steps(step, np.float32(0), batches, 3)
          >>> float(result.state), result.num_steps
          (24.0, 3)
        """
        key = (fn, stack_outputs)
        if key not in self._multisteps:
            self._multisteps[key] = _multistep.MultiStep(fn, stack_outputs)
        return self._multisteps[key].run(
            lambda f, *args: self.run(f, args=args, options=options), state, iterator, steps_per_run
        )

    def compile_stats(self) -> _accounting.CompileStats:
        """How many programs plain ``run`` calls compiled, the cache hits, and why it recompiled.

        Example:
          >>> strategy = ts.TPUStrategy()
          >>> step = lambda x: x + 1
          >>> for n in (4, 4, 6):
          ...     _ = strategy.run(step, args=(np.zeros(n),))
          >>> print(strategy.compile_stats())  # doctest: +ELLIPSIS
          2 programs compiled, 1 cache hits
            - <lambda> compiled again: args[0] changed shape from (4,) to (6,)...
        """
        return self._ledger.stats()

    def _step(self, key: tuple[Callable[..., PyTree], tuple[int, ...]]) -> _run.Step:
        """The compiled step for ``key = (fn, donate_argnums)``, made on first use."""
        step = self._steps.get(key)
        if step is None:
            fn, donate_argnums = key
            step = _run.Step(
                fn,
                self._mesh,
                lambda row_mask: ReplicaContext(self, row_mask),
                on_trace=lambda signature: self._ledger.traced(key, signature),
                donate_argnums=donate_argnums,
            )
            self._steps[key] = step
        return step

    def reduce(self, reduce_op: ReduceOp | str, value: PyTree, axis: int | None = None) -> PyTree:
        """Combines a distributed value across replicas into one value.

        With ``axis``, each replica's value is also reduced along that axis, so MEAN with
        ``axis=0`` averages over every example of every replica. As in tf.distribute, a
        replicated value (any plain array, which counts as the same on every replica) reduces
        to itself under MEAN, MAX and MIN, and to ``num_replicas_in_sync`` times itself under
        SUM.

        Args:
          reduce_op: a ReduceOp or one of ``"sum"``, ``"mean"``, ``"max"``, ``"min"``.
          value: a PerReplica, a replicated array, or a pytree of them, e.g. ``run``'s output.
          axis: an axis of each replica's value to reduce too, or None.

        Returns:
          A pytree of ``jax.Array``.

        Example:
          >>> strategy = ts.TPUStrategy()
          >>> x = ts.PerReplica([np.full(3, i, np.float32) for i in range(8)])
          >>> float(strategy.reduce("sum", x, axis=None)[0]), float(strategy.reduce("mean", x, 0))
          (28.0, 3.5)
        """
        op = ReduceOp.parse(reduce_op)
        result = _cross_replica.reduce(op, value, axis, self.num_replicas_in_sync)
        self._window.admit(result)
        return result

    def gather(self, value: PyTree, axis: int) -> PyTree:
        """Concatenates every replica's value along ``axis``, in replica order.

        Args:
          value: a PerReplica, a replicated array (gathered as identical copies), or a pytree
            of them.
          axis: the axis of each replica's value to concatenate along.

        Returns:
          A pytree of ``jax.Array`` whose ``axis`` is ``num_replicas_in_sync`` times longer.

        Example:
          >>> strategy = ts.TPUStrategy()
          >>> x = ts.PerReplica([np.full((1, 2), i, np.float32) for i in range(8)])
          >>> strategy.gather(x, axis=0).shape
          (8, 2)
        """
        result = _cross_replica.gather(value, axis, self.num_replicas_in_sync)
        self._window.admit(result)
        return result

    def experimental_local_results(self, value: PyTree) -> tuple[PyTree, ...]:
        """Splits a distributed value into one pytree per replica of this process.

        Args:
          value: a PerReplica, a replicated array, or a pytree of them (plain leaves are
            repeated).

        Returns:
          A tuple with one pytree per local replica, in replica order. In a job of several
          processes only the replicas of this process are included.

        Example:
          >>> strategy = ts.TPUStrategy(num_logical_cores=4)  # 2 replicas
          >>> x = ts.PerReplica([np.float32(10), np.float32(20)])
          >>> [float(v) for v in strategy.experimental_local_results(x)]
          [10.0, 20.0]
        """
        return _cross_replica.local_results(value, self._mesh)

    def experimental_distribute_values_from_function(
        self, value_fn: Callable[[ValueContext], PyTree]
    ) -> PyTree:
        """Builds a per-replica value by calling ``value_fn`` once for each replica.

        Args:
          value_fn: takes a ``ts.ValueContext`` and returns that replica's pytree of arrays
            (typed PRNG keys included); every replica's value must have the same structure,
            shapes and dtypes.

        Returns:
          ``value_fn``'s structure with a PerReplica at each leaf, whose component i comes
          from ``value_fn(ValueContext(i, num_replicas_in_sync))``.

        Example:
          >>> strategy = ts.TPUStrategy()
          >>> v = strategy.experimental_distribute_values_from_function(
          ...     lambda ctx: np.arange(2.0) + ctx.replica_id_in_sync_group)
          >>> v, float(v.values[7][1])
          (PerReplica(float32[8, 2]), 8.0)
        """
        n = self.num_replicas_in_sync
        components = {r: value_fn(ValueContext(r, n)) for r in _values.local_replicas(self._mesh)}
        return _values.place_per_replica(components, self._mesh)

    def replicate(self, tree: PyTree) -> PyTree:
        """Copies ``tree`` (parameters, optimizer state, a train state) to every replica.

        Args:
          tree: any pytree of arrays and numbers (a dict, a flax ``TrainState``), or Flax NNX
            objects, whose state is placed in place.

        Returns:
          ``tree``'s own structure with every leaf a ``jax.Array`` replicated over the mesh;
          NNX objects are returned themselves, their state now on every replica.

        Example:
          >>> strategy = ts.TPUStrategy()
          >>> params = strategy.replicate({"w": np.ones(3, np.float32)})
          >>> params["w"].sharding.is_fully_replicated, len(params["w"].sharding.device_set)
          (True, 8)
          >>> float(strategy.run(lambda p: p["w"].sum(), args=(params,)))
          3.0
        """
        if any(isinstance(x, PerReplica) for x in jax.tree.leaves(tree, is_leaf=_is_per_replica)):
            raise TypeError(
                "replicate got a PerReplica value; reduce it first, e.g. "
                "strategy.reduce('mean', value)"
            )
        split = _nnx.split_objects(tree)
        if split is not None:
            _, state, objects, _, _ = split
            _nnx.nnx_module().update(objects, _values.replicate(state, self._mesh))
            return jax.tree.map(
                lambda x: x if _nnx.is_nnx_object(x) else _values.replicate(x, self._mesh),
                tree,
                is_leaf=_nnx.is_nnx_object,
            )
        return _values.replicate(tree, self._mesh)


_DEFAULT_OPTIONS = _run.RunOptions()


def _is_per_replica(x: Any) -> bool:
    return isinstance(x, PerReplica)


def _nnx_leaves(tree: PyTree) -> list[Any]:
    return jax.tree.leaves(tree, is_leaf=_nnx.is_nnx_object)
