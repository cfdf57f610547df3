"""TPUStrategy: one object that owns the mesh, runs steps on every replica and combines results."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import jax

from tpustrat import (
    _accounting,
    _cache,
    _context,
    _cross_replica,
    _dispatch,
    _input,
    _layout,
    _logical,
    _mesh,
    _metrics,
    _multistep,
    _nnx,
    _summary,
    _values,
    _watchdog,
)
from tpustrat._checks import check_bool, check_int, check_leaf, describe, is_iterator
from tpustrat._context import ReduceOp, strategy_scope
from tpustrat._dataset_options import InputContext, InputOptions
from tpustrat._input import DistributedDataset
from tpustrat._topology import DeviceAssignment
from tpustrat._types import PyTree
from tpustrat._values import PerReplica, ValueContext, is_per_replica


class TPUStrategy:
    """Synchronous data parallelism over a device mesh of replicas by logical cores.

    ``run`` executes a step function on every replica as one compiled SPMD program; PerReplica
    arguments give each replica its own component, anything else is given whole to every
    replica. Inside the step, values are local to the replica (as under ``jax.pmap``) until the
    step combines them with ``ts.get_replica_context().all_reduce``.

    Args:
      devices: the devices to use, in replica-major order; default ``jax.devices()`` in JAX's
        topology-aware order (that of ``jax.make_mesh``: on TPU, consecutive replicas are
        interconnect neighbours, and several slices are grouped slice by slice).
      num_logical_cores: how many devices each replica spans (for model parallelism).
      device_assignment: a ``ts.DeviceAssignment`` that fixes every replica's devices and
        logical cores on the physical topology; replaces ``devices`` and ``num_logical_cores``.
      spmd: TF's ``experimental_spmd_xla_partitioning`` (``tpustrat.compat``). JAX always
        compiles one SPMD program; True only refuses ``experimental_assign_to_logical_device``,
        as TF does.
      max_steps_in_flight: how many ``run`` calls may be queued on the devices before ``run``
        waits for the oldest. Small numbers keep the host in step and avoid runaway queues.
      num_slices: how many slices (TPU slices joined over the data-centre network) the replicas
        form; default: the number of distinct ``slice_index`` values of the devices (1 off
        TPU). With several, ``ReplicaContext.all_reduce`` runs hierarchically. Pass a number
        to declare slices of a single-slice or CPU job, e.g. to try a multi-slice program.

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
        num_slices: int | None = None,
    ) -> None:
        check_int("num_logical_cores", num_logical_cores, minimum=1)
        check_int("max_steps_in_flight", max_steps_in_flight, minimum=1)
        check_bool("spmd", spmd)
        if device_assignment is not None:
            if not isinstance(device_assignment, DeviceAssignment):
                raise TypeError(
                    f"device_assignment must be a ts.DeviceAssignment, got "
                    f"{describe(device_assignment)}; build one "
                    "with ts.DeviceAssignment.build(ts.Topology.from_devices(jax.devices()), "
                    "computation_shape, num_replicas=...), or pass devices instead"
                )
            if devices is not None or num_logical_cores not in (
                1,
                device_assignment.num_cores_per_replica,
            ):
                raise ValueError(
                    "pass either device_assignment or devices/num_logical_cores, not both: the "
                    "device assignment already fixes the devices and cores of every replica"
                )
            grid = device_assignment.devices
        elif devices is None:
            grid = _mesh.default_device_grid(jax.devices(), num_logical_cores)
        else:
            grid = devices
        self._mesh = _mesh.build_mesh(grid, num_logical_cores)
        self._num_slices = _mesh.count_slices(self._mesh, num_slices)
        self._device_assignment = device_assignment
        self._spmd = spmd
        self._dispatcher = _dispatch.Dispatcher(self._mesh, self._num_slices, max_steps_in_flight)
        self._multisteps = _cache.FunctionCache(_multistep.MultiStep)

    @property
    def mesh(self) -> jax.sharding.Mesh:
        """The ``jax.sharding.Mesh`` every array of the strategy lives on.

        Its axes are ``("replica", "logical_core")`` when each replica has one logical core or
        a prime number of them (8x1, 4x2 on 8 devices). A composite core count is factored into
        prime-sized sub-axes, ``("replica", "logical_core.0", "logical_core.1", ...)``, so that
        the logical-core annotations can tile one tensor over several dimensions: 2x4 has two
        sub-axes of 2, 1x8 three. ``logical_core_axes`` names the core axes, for a spec that
        tiles a dimension over all of a replica's cores.

        Example:
          >>> ts.TPUStrategy(num_logical_cores=2).mesh.axis_names
          ('replica', 'logical_core')
          >>> ts.TPUStrategy(num_logical_cores=4).mesh.axis_names
          ('replica', 'logical_core.0', 'logical_core.1')
        """
        return self._mesh

    @property
    def logical_core_axes(self) -> tuple[str, ...]:
        """The axes of ``mesh`` that number a replica's logical cores, major to minor.

        As one spec entry they tile a dimension over all of a replica's cores, whatever the
        core count: ``NamedSharding(strategy.mesh, P(None, strategy.logical_core_axes))``.

        Example:
          >>> strategy = ts.TPUStrategy(num_logical_cores=4)
          >>> strategy.logical_core_axes
          ('logical_core.0', 'logical_core.1')
          >>> w = jax.device_put(np.ones((2, 8)), jax.sharding.NamedSharding(
          ...     strategy.mesh, jax.sharding.PartitionSpec(None, strategy.logical_core_axes)))
          >>> w.addressable_shards[0].data.shape
          (2, 2)
        """
        return _mesh.core_axes(self._mesh)

    @property
    def experimental_device_assignment(self) -> DeviceAssignment | None:
        """The DeviceAssignment the strategy was built with, if any."""
        return self._device_assignment

    @property
    def num_replicas_in_sync(self) -> int:
        """How many replicas run each step together."""
        return self._mesh.shape[_mesh.REPLICA_AXIS]

    @property
    def num_slices(self) -> int:
        """How many slices the replicas form (see ``num_slices`` in the constructor)."""
        return self._num_slices

    @property
    def num_logical_cores(self) -> int:
        """How many devices each replica spans."""
        return _mesh.num_cores(self._mesh)

    @property
    def should_checkpoint(self) -> bool:
        """Whether this process takes part in saving checkpoints: True on every process.

        ``ts.CheckpointManager.save`` is a call of every process (each writes the shards of
        its own devices), so unlike TF's chief-only flag this is never False; guarding a save
        with it keeps a TF loop's shape.
        """
        return True

    @property
    def should_save_summary(self) -> bool:
        """Whether this process writes summaries: process 0 only (``ts.SummaryWriter``'s rule)."""
        return _summary.writes_summaries()

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
        options: _dispatch.RunOptions | None = None,
    ) -> PyTree:
        """Runs ``fn(*args, **kwargs)`` on every replica.

        Called from Python, ``run`` compiles once per function and argument signature and reuses
        the executable; called inside ``jax.jit``, it becomes part of the caller's program.

        Args:
          fn: the step; it sees replica-local values and may use ``ts.get_replica_context()``.
          args: a tuple; PerReplica leaves give replica i its i-th component, and every other
            leaf (arrays, numbers, typed keys) is given whole to every replica, the same
            whether ``run`` is called plainly or inside ``jax.jit``. To give each replica its
            block of an array laid out over the replica axis, pass
            ``ts.PerReplica.from_blocks(x, strategy.num_replicas_in_sync)``; such an array
            passed plainly is refused. Flax NNX objects (``nnx.Module``, ``nnx.Optimizer``,
            ``nnx.Metric``) are updated in place, as under ``nnx.jit``; a metric's
            ``MetricState`` accumulates per replica (update it with the replica's own rows)
            and reading it on the host sums the replicas.
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
        if _context.get_replica_context() is not None:
            raise RuntimeError(
                "strategy.run was called inside a step that strategy.run is running; the step "
                "already runs on every replica, with this replica's values: call the inner "
                "step function directly"
            )
        if not callable(fn):
            raise TypeError(
                f"strategy.run needs a callable step, got {describe(fn)}; "
                "pass the function, e.g. strategy.run(step, args=(state, batch))"
            )
        if not isinstance(args, (tuple, list)):
            raise TypeError(
                f"strategy.run args must be a tuple, got a {type(args).__name__}; for a single "
                "argument write args=(x,), and pass keyword arguments as kwargs={...}"
            )
        if kwargs is not None and not (
            isinstance(kwargs, Mapping) and all(isinstance(k, str) for k in kwargs)
        ):
            raise TypeError(
                f"strategy.run kwargs must be a dict of keyword arguments by name, got "
                f"{describe(kwargs)}; e.g. kwargs={{'training': True}}"
            )
        # Top-level iterators only (a cheap check): JAX would warn and take one as a leaf.
        for i, arg in enumerate(args):
            if is_iterator(arg):
                check_leaf(f"args[{i}]", arg)
        if options is None:
            options = _dispatch.DEFAULT_OPTIONS
        elif not isinstance(options, _dispatch.RunOptions):
            raise TypeError(
                f"strategy.run options must be a ts.RunOptions, got {type(options).__name__}; "
                "e.g. options=ts.RunOptions(donate_argnums=(0,))"
            )
        elif options.donate_argnums and max(options.donate_argnums) >= len(args):
            raise ValueError(
                f"donate_argnums {options.donate_argnums} names a position past the {len(args)} "
                "args of this call; donate an existing position, e.g. (0,) for the state"
            )
        args = args if type(args) is tuple else tuple(args)
        return self._dispatcher.run(self, fn, args, {} if kwargs is None else dict(kwargs), options)

    def run_steps(
        self,
        fn: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]],
        state: PyTree,
        iterator: Iterator[PyTree],
        steps_per_run: int,
        *,
        stack_outputs: bool = False,
        unroll: int | bool = 1,
        options: _dispatch.RunOptions | None = None,
    ) -> _multistep.StepsResult:
        """Runs up to ``steps_per_run`` training steps in one compiled program.

        Takes the next ``steps_per_run`` batches from ``iterator`` (a distributed dataset's
        iterator, say), stacks them on the devices and runs ``fn`` over them in a ``lax.scan``,
        carrying the state. The result equals ``steps_per_run`` separate ``run`` calls, with one
        dispatch instead of many (TF's ``steps_per_run``, Keras's ``steps_per_execution``).

        Args:
          fn: ``fn(state, batch) -> (state, outputs)``, a step as passed to ``run``.
          state: the training state, e.g. replicated parameters and optimizer state; Flax NNX
            objects in it are updated in place, as by ``run``.
          iterator: an iterator (``iter(dataset)``, not the dataset itself, which would give
            its first batches again on every call) of batches (PerReplica pytrees) of one
            structure and shape.
          steps_per_run: how many batches to consume.
          stack_outputs: return every step's outputs stacked (True) or the last step's (False).
          unroll: steps per iteration of the scan, as ``lax.scan``'s ``unroll``: ``True``
            writes all the steps out in one loop-free program, which compiles in time
            proportional to ``steps_per_run``. XLA:CPU runs convolutions inside a loop many
            times slower than outside one, so on CPU pass ``unroll=True`` for a convolutional
            model; on TPU and GPU keep 1.
          options: ``ts.RunOptions`` for the compiled program (``donate_argnums=(0,)`` donates
            the state).

        Returns:
          A ``StepsResult(state, outputs, num_steps)``. At the end of the data ``num_steps`` is
          smaller than asked: the remaining batches run as one shorter program (compiled once
          per count, and counted by ``compile_stats``).

        Raises:
          StopIteration: ``iterator`` had no batch left, as ``next(iterator)`` raises; a loop
            over an epoch ends there (``while True: ... except StopIteration: break``).

        Example:
          >>> strategy = ts.TPUStrategy()
          >>> batches = iter([strategy.experimental_distribute_values_from_function(
          ...     lambda ctx: np.float32(1.0))] * 5)
          >>> step = lambda total, x: (total + ts.get_replica_context().all_reduce("sum", x), x)
          >>> total, steps = np.float32(0), []
          >>> while True:
          ...     try:
          ...         total, _, num_steps = strategy.run_steps(step, total, batches, 3)
          ...     except StopIteration:
          ...         break
          ...     steps.append(num_steps)
          >>> float(total), steps
          (40.0, [3, 2])
        """
        if not callable(fn):
            raise TypeError(
                f"run_steps needs a callable step fn(state, batch) -> (state, "
                f"outputs), got {describe(fn)}"
            )
        check_int("steps_per_run", steps_per_run, minimum=1)
        if not isinstance(unroll, bool):
            unroll = check_int("unroll", unroll, minimum=1)
        if not isinstance(iterator, Iterator):
            raise TypeError(
                f"run_steps takes an iterator, got a {type(iterator).__name__}, "
                "which would give its first batches again on every call (so a loop until "
                "StopIteration would never end); pass iter(dataset) once and the same iterator "
                "to every call"
            )
        batches = list(itertools.islice(iterator, steps_per_run))
        if not batches:
            raise StopIteration
        _multistep.check_batches(batches)
        # True == 1 to Python: the key tells a fully unrolled program from a loop of one step.
        key = (stack_outputs, unroll, isinstance(unroll, bool), len(batches))
        multistep = self._multisteps.get(fn, key)
        try:
            new_state, outputs = self.run(multistep, args=(state, *batches), options=options)
        except (TypeError, ValueError) as error:
            # run names the state args[0]; here the user passed it as state.
            if type(error) in (TypeError, ValueError) and str(error).startswith("args[0]"):
                raise type(error)("state" + str(error)[len("args[0]") :]) from None
            raise
        if _multistep.has_nnx_objects(state):
            new_state = _multistep.restore_objects(state, new_state)
        return _multistep.StepsResult(new_state, outputs, len(batches))

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
        return self._dispatcher.ledger.stats()

    def reduce(self, reduce_op: ReduceOp | str, value: PyTree, axis: int | None = None) -> PyTree:
        """Combines a distributed value across replicas into one value.

        With ``axis``, each replica's value is also reduced along that axis, so MEAN with
        ``axis=0`` averages over every example of every replica. As in tf.distribute, a
        replicated value (any plain array, which counts as the same on every replica) reduces
        to itself under MEAN, MAX and MIN, and to ``num_replicas_in_sync`` times itself under
        SUM. The result has ``jnp.sum`` / ``mean`` / ``max`` / ``min``'s value and dtype over
        the components, as ``ReplicaContext.all_reduce`` inside the step (see ``ts.ReduceOp``).
        This is a cross-replica call, made on ``run``'s results: inside the step it raises a
        RuntimeError, as do ``gather``, ``experimental_local_results``, ``replicate`` and
        ``experimental_distribute_values_from_function``.

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
        _context.check_cross_replica(
            "reduce",
            f"combine the replicas with ts.get_replica_context().all_reduce({op.value!r}, value)",
        )
        with _watchdog.calling("reduce"):
            result = _cross_replica.reduce(op, value, axis, self.num_replicas_in_sync)
        self._dispatcher.window.admit_result(result)
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
        _context.check_cross_replica(
            "gather",
            "concatenate the replicas with ts.get_replica_context().all_gather(value, axis)",
        )
        with _watchdog.calling("gather"):
            result = _cross_replica.gather(value, axis, self.num_replicas_in_sync)
        self._dispatcher.window.admit_result(result)
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
        _context.check_cross_replica(
            "experimental_local_results",
            "each value is already this replica's own; return it from the step and split run's "
            "result with experimental_local_results",
        )
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
        _context.check_cross_replica(
            "experimental_distribute_values_from_function",
            "derive per-replica values from ts.get_replica_context().replica_id_in_sync_group, "
            "or build them before run and pass them in args",
        )
        if not callable(value_fn):
            raise TypeError(
                f"value_fn must be a callable taking a ts.ValueContext, got "
                f"{describe(value_fn)}; e.g. "
                "lambda ctx: np.float32(ctx.replica_id_in_sync_group)"
            )
        n = self.num_replicas_in_sync
        components = {}
        for r in _values.local_replicas(self._mesh):
            components[r] = value_fn(ValueContext(r, n))
            _values.check_array_leaves(
                "experimental_distribute_values_from_function",
                components[r],
                f"value_fn's value for replica {r}",
            )
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
        _context.check_cross_replica(
            "replicate",
            "values are already on the replica; replicate the state before run and pass it in args",
        )
        leaves = jax.tree.leaves(tree, is_leaf=lambda x: is_per_replica(x) or is_iterator(x))
        for leaf in leaves:
            if isinstance(leaf, PerReplica):
                raise TypeError(
                    "strategy.replicate got a PerReplica in tree; reduce it first, e.g. "
                    "strategy.reduce('mean', value)"
                )
            if is_iterator(leaf):
                check_leaf("tree", leaf)
        split = _nnx.split_objects(tree)
        if split is not None:
            _, state, objects, _, _ = split
            state = _metrics.whole_values(state)  # a metric's blocks, summed
            _nnx.loaded_nnx().update(objects, _values.replicate(state, self._mesh))
            return jax.tree.map(
                lambda x: x if _nnx.is_nnx_object(x) else _values.replicate(x, self._mesh),
                tree,
                is_leaf=_nnx.is_nnx_object,
            )
        _values.check_array_leaves("replicate", tree, "tree")
        return _values.replicate(tree, self._mesh)

    def place_params(self, tree: PyTree, rules: _layout.LayoutRules) -> PyTree:
        """Lays ``tree``'s leaves out over each replica's logical cores, as ``rules`` say.

        Each leaf goes to every replica, tiled over the replica's cores by the first rule whose
        pattern its path matches, or whole on every core if none does (``strategy.replicate``).
        A ``ts.PerReplica`` leaf (one block per replica) keeps its blocks on their replicas,
        each block tiled over its replica's cores by the rule; parameters sharded over the
        replicas (``ts.shard_params``, and ``ts.shard_update``'s optimizer state) are placed
        this way, matched by the parameter's path: shard first, then place.
        ``run`` takes the placed arrays as they are, the step sees every leaf whole, and the
        state it returns keeps these layouts, so a training loop compiles one program.

        Args:
          tree: parameters, an optimizer state, a train state, or Flax NNX objects (a module,
            an ``nnx.Optimizer``), whose variables are placed in place.
          rules: a ``ts.LayoutRules``.

        Returns:
          ``tree``'s own structure with every leaf placed; NNX objects are returned themselves.

        Example:
          >>> strategy = ts.TPUStrategy(num_logical_cores=2)
          >>> rules = ts.LayoutRules([(r"kernel", (None, "logical_core"))])
          >>> params = strategy.place_params({"kernel": np.ones((3, 4), np.float32)}, rules)
          >>> {s.data.shape for s in params["kernel"].addressable_shards}
          {(3, 2)}
          >>> float(strategy.run(lambda p: p["kernel"].sum(), args=(params,)))
          12.0
        """
        _context.check_cross_replica(
            "place_params",
            "values are already on the replica; place the state before run and pass it in args",
        )
        return _layout.place(tree, rules, self._mesh)

    def experimental_distribute_dataset(
        self, dataset: Iterable[PyTree], options: InputOptions | None = None
    ) -> DistributedDataset:
        """Splits each global batch of ``dataset`` over the replicas, prefetched to the devices.

        Replica ``i`` of ``R`` gets rows ``[i * B / R, (i + 1) * B / R)`` of a batch of ``B``
        rows. A partial last batch is padded and masked, dropped, or refused, as ``options``
        say (``ts.InputOptions``); the module docstring of ``tpustrat._input`` gives the recipe
        for exact epoch metrics.

        Args:
          dataset: an iterable of pytrees whose leaves share a leading global-batch axis (a
            list, a generator, a ``tf.data.Dataset``, a grain loader).
          options: a ``ts.InputOptions``.

        Returns:
          A ``ts.DistributedDataset`` whose elements have the dataset's structure with
          PerReplica leaves.

        Example:
          >>> strategy = ts.TPUStrategy()
          >>> batches = [{"x": np.arange(16.0).reshape(8, 2)}]
          >>> for batch in strategy.experimental_distribute_dataset(batches):
          ...     print(batch["x"], strategy.run(lambda b: b["x"].sum(), args=(batch,)))
          PerReplica(float32[8, 1, 2]) PerReplica(float32[8])
        """
        _context.check_cross_replica(
            "experimental_distribute_dataset",
            "use the batch run gave the step; distribute the dataset before the loop and pass "
            "each element to run",
        )
        return _input.distribute_dataset(self._mesh, dataset, options)

    def distribute_datasets_from_function(
        self,
        dataset_fn: Callable[[InputContext], Iterable[PyTree]],
        options: InputOptions | None = None,
    ) -> DistributedDataset:
        """Calls ``dataset_fn(ts.InputContext)`` once per process for that process's replicas.

        As in tf.distribute, the dataset yields per-replica batches
        (``ctx.get_per_replica_batch_size(global_batch_size)`` rows), and each step gives one
        to each of the process's replicas, in replica order.

        Example:
          >>> strategy = ts.TPUStrategy()
          >>> def dataset_fn(ctx):
          ...     rows = ctx.get_per_replica_batch_size(16)
          ...     return [np.zeros((rows, 3), np.float32)] * 8  # one step of 8 replicas
          >>> dist = strategy.distribute_datasets_from_function(dataset_fn)
          >>> len(dist), dist.element_spec.shape
          (1, (2, 3))
        """
        _context.check_cross_replica(
            "distribute_datasets_from_function",
            "use the batch run gave the step; distribute the dataset before the loop and pass "
            "each element to run",
        )
        return _input.distribute_datasets_from_function(self._mesh, dataset_fn, options)

    def experimental_split_to_logical_devices(
        self, tensor: jax.Array, partition_dimensions: Sequence[int]
    ) -> jax.Array:
        """Inside ``run``: tiles ``tensor`` across this replica's logical cores.

        Dimension ``i`` is cut into ``partition_dimensions[i]`` pieces; the tile with index
        ``(i0, i1, ...)`` lives on logical core ``np.ravel_multi_index((i0, i1, ...),
        partition_dimensions)``, TF's tile assignment. Numerically the identity.

        Args:
          tensor: a value inside the step function.
          partition_dimensions: one positive int per dimension of ``tensor``, multiplying to
            ``num_logical_cores``; each must divide its dimension.

        Returns:
          ``tensor``, annotated.

        Example:
          >>> strategy = ts.TPUStrategy(num_logical_cores=4)
          >>> def step(x):
          ...     return strategy.experimental_split_to_logical_devices(x, [1, 2, 2]) * 2
          >>> out = strategy.run(step, args=(np.ones((2, 4, 4), np.float32),))
          >>> float(out.sum())
          64.0
        """
        return _logical.split_to_logical_devices(self, self._mesh, tensor, partition_dimensions)

    def experimental_replicate_to_logical_devices(self, tensor: jax.Array) -> jax.Array:
        """Inside ``run``: keeps a whole copy of ``tensor`` on each of this replica's cores.

        Example:
          >>> strategy = ts.TPUStrategy(num_logical_cores=2)
          >>> step = lambda x: strategy.experimental_replicate_to_logical_devices(x + 1)
          >>> float(strategy.run(step, args=(np.float32(1),)))
          2.0
        """
        return _logical.replicate_to_logical_devices(self, self._mesh, tensor)

    def experimental_assign_to_logical_device(
        self, tensor: jax.Array, logical_device_id: int
    ) -> jax.Array:
        """Inside ``run``: TF's placement of ``tensor`` on one logical core, checked as in TF.

        The id must name a core of the replica, and ``spmd=True`` refuses the call, as in TF.
        One SPMD program cannot keep a tensor on one core alone, so the tensor stays whole on
        every core of the replica (as ``experimental_replicate_to_logical_devices``, which new
        code calls instead; see ``tpustrat.compat``).
        """
        return _logical.assign_to_logical_device(
            self, self._mesh, tensor, logical_device_id, self._spmd
        )


_DEFAULT_STRATEGY: list[TPUStrategy] = []  # made on first use, then the same one
_DEFAULT_STRATEGY_LOCK = threading.Lock()


def _default_strategy() -> TPUStrategy:
    with _DEFAULT_STRATEGY_LOCK:
        if not _DEFAULT_STRATEGY:
            _DEFAULT_STRATEGY.append(TPUStrategy(devices=jax.local_devices()[:1]))
        return _DEFAULT_STRATEGY[0]


def get_strategy() -> TPUStrategy:
    """The strategy of the innermost ``strategy.scope()`` or ``run``; the default outside both.

    As ``tf.distribute.get_strategy()``, it always returns a strategy, so that code written for
    a strategy also runs without one. The default strategy is one replica on this process's
    first device (``jax.local_devices()[0]``), made on first use and the same one afterwards;
    ``ts.has_strategy()`` says whether a non-default strategy is current.

    Example:
      >>> strategy = ts.TPUStrategy()
      >>> with strategy.scope():
      ...     ts.get_strategy() is strategy
      True
      >>> default = ts.get_strategy()
      >>> default.num_replicas_in_sync, default is ts.get_strategy()
      (1, True)
    """
    current = cast("TPUStrategy | None", _context.current_strategy())
    return _default_strategy() if current is None else current


def has_strategy() -> bool:
    """Whether a strategy's ``scope()`` or ``run`` is current (``tf.distribute.has_strategy()``).

    Example:
      >>> strategy = ts.TPUStrategy()
      >>> with strategy.scope():
      ...     ts.has_strategy()
      True
      >>> ts.has_strategy(), ts.get_strategy().num_replicas_in_sync
      (False, 1)
    """
    current = _context.current_strategy()
    return current is not None and current not in _DEFAULT_STRATEGY
