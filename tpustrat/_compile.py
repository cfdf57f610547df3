"""Compiling a per-replica step function into one SPMD program over the mesh.

A ``Step`` traces the user's function once per argument signature inside a ``shard_map``,
proves which outputs are the same on every replica (``_replication``), checks the step's
metrics (``_metrics``), keeps the layouts of updated state over the logical cores, and
replays the trace as one ``jax.jit`` program. ``CompiledSteps`` keeps one ``Step`` per step
function and donation, and tells compile accounting (``_accounting.Ledger``) what it builds
and traces. Dispatching the program (the window, donation record, call accounting) is
``_dispatch``'s.
"""

from __future__ import annotations

import collections
import itertools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.extend.core import Jaxpr, Literal
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tpustrat import _accounting, _cache, _jaxpr, _mesh, _metrics, _nnx, _replication
from tpustrat._context import ReplicaContext, replica_scope
from tpustrat._placement import ARRAY_TYPES
from tpustrat._types import PyTree
from tpustrat._values import PerReplica, is_distributed, is_per_replica

_JAX_DONATION_WARNING = "Some donated buffers were not usable"


class Step:
    """``fn`` on every replica, compiled as one jitted ``shard_map`` over the mesh.

    ``shard_map`` is manual over the replica axis and leaves the logical-core axes to the
    partitioner (with one core per replica every axis is manual). Replicated inputs are not
    marked as varying (``check_vma=False``): a gradient with respect to one stays local to the
    replica, as under ``pmap`` and in tf.distribute. Outputs proven identical on every replica
    (see ``_replication``) come back as replicated ``jax.Array`` s, the rest as PerReplica.
    ``jax.jit`` caches one executable per argument signature; every trace is reported to
    ``on_trace`` with the signature, for compile accounting.

    Args:
      fn: the user's step function.
      mesh: the strategy's mesh.
      num_slices: how many slices the replicas form (for the replica context's collectives).
      on_trace: called with the abstract signature of ``(args, kwargs)`` at each trace.
      donate_argnums: positions of ``args`` whose buffers the program may reuse.
    """

    def __init__(
        self,
        fn: Callable[..., PyTree],
        mesh: Mesh,
        num_slices: int,
        on_trace: Callable[[_accounting.Signature], None],
        donate_argnums: tuple[int, ...] = (),
    ):
        self.name = getattr(fn, "__qualname__", None) or repr(fn)
        self.traces = 0
        self._fn, self._mesh, self._num_slices = fn, mesh, num_slices
        self._on_trace, self._donate_argnums = on_trace, donate_argnums
        # With one core per replica nothing is left to the partitioner: every axis is manual,
        # which also lets host callbacks (jax.pure_callback) run inside the step.
        one_core = mesh.devices.size == mesh.shape[_mesh.REPLICA_AXIS]
        self._manual_axes = set(mesh.axis_names) if one_core else {_mesh.REPLICA_AXIS}
        # The jitted function takes (valid_rows, block_specs, kwargs, *args): donated positions
        # shift by three, and the layouts of whole-array inputs are static.
        self._jitted = jax.jit(
            self._trace,
            static_argnums=(1,),
            donate_argnums=tuple(i + 3 for i in donate_argnums),
        )

    def __call__(
        self,
        valid_rows: np.int32 | None,
        block_specs: tuple[NamedSharding | None, ...] | None,
        args: tuple,
        kwargs: dict,
    ) -> tuple[PyTree, jax.Array]:
        """Runs the program; returns its outputs and a completion marker.

        ``valid_rows`` is the number of real rows of a bucketed call, or None; ``block_specs``
        gives the layout over the logical cores of each whole-array input leaf on a mesh with
        several cores (None elsewhere, see ``_placement.prepare``), or is None. The marker is
        an array that is ready when the step is done: one of its outputs, or, when the step
        donates (its outputs may be donated in turn) or returns no array, a scalar the program
        writes for the purpose. An extra output is not free: it is one more buffer on every
        device, every call.
        """
        if self._donate_argnums:  # _diagnose_donation says it better, once
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_JAX_DONATION_WARNING)
                outputs, marker = self._jitted(valid_rows, block_specs, kwargs, *args)
        else:
            outputs, marker = self._jitted(valid_rows, block_specs, kwargs, *args)
        if marker is None:
            marker = _an_output_array(outputs)
        return outputs, marker

    def _trace(self, valid_rows, block_specs, kwargs, *args):
        self.traces += 1
        self._on_trace(_accounting.signature((args, kwargs), _distributed_kind))
        arrays, per_replica_flags, rebuild = _split_inputs((args, kwargs))
        replicas = self._mesh.shape[_mesh.REPLICA_AXIS]
        for a, pr in zip(arrays, per_replica_flags):
            if pr and (a.ndim == 0 or a.shape[0] != replicas):  # run's fast path skips prepare
                raise ValueError(
                    f"a PerReplica argument has {a.shape[:1] or 'no'} components but the "
                    f"strategy has {replicas} replicas; build it with one component per replica"
                )
        layouts = block_specs or [None] * len(arrays)
        in_specs = [P(_mesh.REPLICA_AXIS) if pr else P() for pr in per_replica_flags]
        if valid_rows is not None:
            arrays, per_replica_flags = [valid_rows, *arrays], [False, *per_replica_flags]
            in_specs = [P(), *in_specs]
        out_tree = []

        def body(*arrays):
            local = [a[0] if pr else a for a, pr in zip(arrays, per_replica_flags)]
            mask = None
            if valid_rows is not None:
                rows = _padded_rows(local[1:], per_replica_flags[1:])
                mask, local = jnp.arange(rows) < local[0], local[1:]
            call_args, call_kwargs = rebuild(local)
            with replica_scope(ReplicaContext(self._mesh, self._num_slices, mask)):
                out = _call_step(self._fn, call_args, call_kwargs)
            leaves, tree = _flatten_outputs(out)
            out_tree.append(tree)
            return [x[None] for x in leaves]

        manual_axes = self._manual_axes

        def shard_mapped(f, in_specs, out_specs):
            return jax.shard_map(
                f,
                mesh=self._mesh,
                in_specs=tuple(in_specs),
                out_specs=out_specs,
                axis_names=manual_axes,
                check_vma=False,
            )

        def trace():
            stacked = shard_mapped(body, in_specs, P(_mesh.REPLICA_AXIS))
            return jax.make_jaxpr(stacked)(*[_abstract(a) for a in arrays])

        # The user's step is traced once, with every output stacked over replicas. The proof of
        # which outputs are the same on every replica (_replication) reads that jaxpr, which is
        # then replayed with those outputs unstacked.
        closed = trace()
        if manual_axes != set(self._mesh.axis_names) and _needs_every_axis_manual(
            self.name, closed.jaxpr.eqns[0].params["jaxpr"]
        ):
            manual_axes = set(self._mesh.axis_names)
            closed = trace()
        (eqn,) = closed.jaxpr.eqns
        if self._mesh.devices.flat[0].platform == "cpu" and XLA_CPU_ABORTS_ON_INDEX_IN_LOOP:
            check_axis_index_outside_loops(self.name, eqn.params["jaxpr"])
        in_axes = [_mesh.spec_axes(s) for s in eqn.params["in_specs"]]
        combined_axes = [
            a for a in manual_axes if a == _mesh.REPLICA_AXIS or self._mesh.shape[a] > 1
        ]
        varying = _replication.varying_outputs(eqn.params["jaxpr"], in_axes, combined_axes)
        _metrics.check_step(
            self.name,
            eqn.params["jaxpr"],
            in_axes,
            combined_axes,
            out_tree[0],
            input_offset=_hoisted_constants(self.name, closed.jaxpr, eqn)
            + int(valid_rows is not None),
        )
        values = dict(zip(closed.jaxpr.invars, arrays))
        values.update(zip(closed.jaxpr.constvars, closed.consts))
        operands = [v.val if isinstance(v, Literal) else values[v] for v in eqn.invars]

        def replay(*local):
            outs = jax.core.eval_jaxpr(eqn.params["jaxpr"], (), *local)
            return [x if v else x[0] for x, v in zip(outs, varying)]

        out_specs = [P(_mesh.REPLICA_AXIS) if v else P() for v in varying]
        outputs = shard_mapped(replay, eqn.params["in_specs"], out_specs)(*operands)
        keep = [not v and not a for v, a in zip(varying, _annotated_outputs(eqn.params["jaxpr"]))]
        outputs = _keep_layouts(out_tree[0], outputs, keep, args, layouts)
        if self._donate_argnums:
            _diagnose_donation(self.name, args, self._donate_argnums, outputs, varying)
        wrapped = [PerReplica.from_stacked(x) if v else x for x, v in zip(outputs, varying)]
        marker = None if outputs and not self._donate_argnums else jnp.zeros((), jnp.int32)
        return out_tree[0].unflatten(wrapped), marker


def _hoisted_constants(name: str, outer: Jaxpr, eqn: Any) -> int:
    """How many of the ``shard_map``'s operands come before the traced arrays: the constants
    that some JAX versions (0.8) hoist out of the body and pass in first.

    Raises:
      RuntimeError: the operands do not end with the traced arrays, in order (the step's
        inputs cannot be matched to its variables, so the metric check cannot run).
    """
    lead = len(eqn.invars) - len(outer.invars)
    if lead < 0 or any(a is not b for a, b in zip(eqn.invars[lead:], outer.invars, strict=True)):
        raise RuntimeError(
            f"run({name}): the traced shard_map's operands {list(eqn.invars)} do not end with "
            f"the step's inputs {list(outer.invars)}, so its metric variables cannot be found; "
            "this JAX version traces shard_map in a way tpustrat does not support. Use a "
            "supported JAX version (see pyproject.toml)"
        )
    return lead


class CompiledSteps:
    """The compiled ``Step`` of each step function and donation, and its compile accounting.

    Weakly keyed on the function and bounded, as ``jax.jit``'s caches are (``_cache``): a step
    goes, and compile accounting forgets it, when its function is garbage collected or when it
    is the least recently used of more than 64. A training loop calls one step function over
    and over, so the step found last is tried first, by its function and donation.

    Args:
      mesh: the strategy's mesh.
      num_slices: how many slices the replicas form.
      ledger: the compile accounting, told of every step built and every trace.
    """

    def __init__(self, mesh: Mesh, num_slices: int, ledger: _accounting.Ledger):
        self._mesh, self._num_slices, self._ledger = mesh, num_slices, ledger
        self._ids = itertools.count()
        self._steps = _cache.FunctionCache(self._build, on_evict=self._forget)
        self._last: tuple[Any, tuple[int, ...], Step, int] | None = None

    def get(self, fn: Callable[..., PyTree], donate_argnums: tuple[int, ...]) -> tuple[Step, int]:
        """The step compiling ``fn`` with ``donate_argnums``, and its compile-accounting key."""
        last = self._last
        if last is not None and last[1] == donate_argnums and last[0]() == fn:
            return last[2], last[3]
        step, key = self._steps.get(fn, donate_argnums)
        self._last = (_cache.reference(fn), donate_argnums, step, key)
        return step, key

    def _build(
        self, fn: Callable[..., PyTree], donate_argnums: tuple[int, ...]
    ) -> tuple[Step, int]:
        key = next(self._ids)
        step = Step(
            fn,
            self._mesh,
            self._num_slices,
            on_trace=lambda signature: self._ledger.traced(key, signature),
            donate_argnums=donate_argnums,
        )
        target = fn.target() if isinstance(fn, _cache.WeakCallable) else fn
        origin = _cache.origin(fn)
        self._ledger.new_step(
            key,
            step.name,
            None if origin is None else (origin, donate_argnums),
            target.recompile_reason if isinstance(target, _nnx.Lifted) else None,
        )
        return step, key

    def _forget(self, entry: tuple[Step, int]) -> None:
        if self._last is not None and self._last[3] == entry[1]:
            self._last = None
        self._ledger.forget(entry[1])


def _an_output_array(outputs: PyTree) -> jax.Array:
    """One array of ``outputs``, found without flattening a large output (a train state)."""
    node = outputs
    while True:
        kind = type(node)
        if kind is dict and node:
            node = next(iter(node.values()))
        elif (kind is tuple or kind is list) and node:
            node = node[0]
        elif kind is PerReplica:
            return node.stacked
        elif isinstance(node, jax.Array):
            return node
        else:  # another pytree node, or an empty container first: any leaf will do
            return jax.tree.leaves(outputs)[0]


def _keep_layouts(out_tree, outputs: list, keep: list[bool], args: tuple, layouts) -> list:
    """Outputs laid out over the logical cores as the argument they update was.

    On a mesh with several logical cores XLA picks the layout of a replicated output over the
    cores, so a state that went in replicated may come back tiled (after
    ``experimental_split_to_logical_devices`` in the step), and the next call would compile
    again for the new layout. The whole output, or else a top-level part of it, with the
    structure, shapes and dtypes of a top-level argument (``state`` in ``step(state, batch) ->
    (state, loss)``) is the updated argument: its leaves marked in ``keep`` (replicated, and
    not laid out by the step's own annotation) keep that argument's layouts (``layouts``, from
    ``_placement.prepare``), tiled or whole, so the program's outputs feed the next call
    unchanged.
    """
    if not any(isinstance(layout, NamedSharding) for layout in layouts):
        return outputs
    arguments, start = [], 0
    for arg in args:
        leaves, structure = jax.tree.flatten(arg, is_leaf=is_per_replica)
        arguments.append((structure, leaves, range(start, start + len(leaves))))
        start += len(leaves)
    outputs = list(outputs)

    def updates(part) -> bool:
        """Keeps the layouts of the argument ``part`` updates, if it updates one."""
        out_indices, structure = jax.tree.flatten(part)
        for argument in arguments:
            arg_structure, leaves, positions = argument
            if arg_structure != structure or any(
                isinstance(leaf, PerReplica) or _abstract(leaf) != _abstract(outputs[o])
                for leaf, o in zip(leaves, out_indices)
            ):
                continue
            arguments[:] = [a for a in arguments if a is not argument]  # no == on arrays
            for o, i in zip(out_indices, positions):
                if isinstance(layouts[i], NamedSharding) and keep[o]:
                    outputs[o] = jax.lax.with_sharding_constraint(outputs[o], layouts[i])
            return True
        return False

    indices = out_tree.unflatten(list(range(len(outputs))))  # the output, by leaf position
    if not updates(indices) and isinstance(indices, (tuple, list)):
        for part in indices:
            updates(part)
    return outputs


def _annotated_outputs(jaxpr) -> list[bool]:
    """For each output of the step's jaxpr, whether the step laid it out itself.

    That is, whether it comes from a layout annotation (``experimental_split_to_logical_devices``
    and the like: a sharding constraint), seen through the reshapes that stack it over replicas.
    """
    producers = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}

    def producer(atom):
        return None if isinstance(atom, Literal) else producers.get(atom)

    annotated = []
    for var in jaxpr.outvars:
        eqn = producer(var)
        while eqn is not None and eqn.primitive in _STACKING and len(eqn.invars) == 1:
            eqn = producer(eqn.invars[0])
        annotated.append(eqn is not None and eqn.primitive in _jaxpr.LAYOUT_ANNOTATIONS)
    return annotated


_STACKING = frozenset(
    {_jaxpr.primitives.reshape_p, _jaxpr.primitives.broadcast_in_dim_p, _jaxpr.primitives.squeeze_p}
)


def _call_step(fn: Callable[..., PyTree], args: tuple, kwargs: dict) -> PyTree:
    """Calls the user's step, naming the fix of two mistakes JAX and Flax report obscurely.

    A step that uses an unbound axis name gets the replica axis's name; a step that changes
    a Flax NNX object it closes over (Flax's TraceContextError) is told to pass the object to
    ``run``, which updates it in place.
    """
    try:
        return fn(*args, **kwargs)
    except NameError as error:
        if "unbound axis name" not in str(error):
            raise
        raise NameError(
            f"{error}. Inside strategy.run the replica axis is called "
            f"{_mesh.REPLICA_AXIS!r} (ts.REPLICA_AXIS): write lax.pmean(x, ts.REPLICA_AXIS), "
            "nn.BatchNorm(axis_name=ts.REPLICA_AXIS) or nnx.BatchNorm(..., "
            "axis_name=ts.REPLICA_AXIS), or use ts.get_replica_context().all_reduce"
        ) from error
    except Exception as error:
        if type(error).__name__ != "TraceContextError" or "flax" not in type(error).__module__:
            raise
        raise ValueError(
            f"{error}. The step changes a Flax NNX object it closes over; strategy.run cannot "
            "write back an object it was not given. Pass the object to run as an argument, "
            "e.g. strategy.run(step, args=(model, optimizer, batch)): run updates it in place"
        ) from error


def _needs_every_axis_manual(name: str, jaxpr) -> bool:
    """Whether the step calls back to the host, which JAX allows only with every axis manual.

    Such a step then runs with the logical cores manual too: each core of a replica computes
    the whole step, and the callback runs once per device. Raises a ValueError if the step also
    lays tensors out over the logical cores, which that rules out.
    """
    used = _jaxpr.primitives_in(jaxpr)
    callbacks = sorted(p.name for p in used & _jaxpr.HOST_CALLBACKS)
    if not callbacks:
        return False
    if used & _jaxpr.LAYOUT_ANNOTATIONS:
        raise ValueError(
            f"run({name}): the step calls the host ({', '.join(callbacks)}: "
            "jax.pure_callback, io_callback or jax.debug.print) and also lays tensors out over "
            "the logical cores (experimental_split_to_logical_devices or a sharding "
            "constraint); JAX runs host callbacks only where every mesh axis is manual, which "
            "leaves no cores to lay out. Drop the annotations from this step (each core then "
            "computes the whole replica), or call the host from a step of its own"
        )
    return True


def _release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: ``"0.8.1.dev20250101"`` gives ``(0, 8, 1)``."""
    numbers = []
    for part in version.split(".")[:3]:
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


# XLA:CPU of jaxlib 0.7.0 to 0.8.0 aborts the process ("LLVM ERROR: Program used external function
# '__xla_cpu_runtime_PartitionId' which could not be resolved!") compiling a program whose small
# loop reads the device's index: its small-while-loop-hoisting pass compiles such a loop as one
# kernel that calls a runtime function its JIT does not provide. lax.axis_index is that read.
# jaxlib 0.8.1 compiles it.
XLA_CPU_ABORTS_ON_INDEX_IN_LOOP = _release(jaxlib.__version__) < (0, 8, 1)


def check_axis_index_outside_loops(name: str, jaxpr) -> None:
    """Raises a ValueError if the step reads ``lax.axis_index`` inside a loop.

    For XLA:CPU of the jaxlib versions that abort compiling it (see
    ``XLA_CPU_ABORTS_ON_INDEX_IN_LOOP``): a clear error rather than a dead process. Every loop
    counts, though XLA hoists only small ones, since which loops it hoists is XLA's choice.
    ``ReplicaContext.replica_id_in_sync_group`` and ``replica_key`` read the index once, at the
    top of the step, wherever the step uses them.
    """
    if _jaxpr.reads_axis_index_in_loop(jaxpr):
        raise ValueError(
            f"run({name}): the step reads lax.axis_index inside a loop (lax.scan, fori_loop or "
            "while_loop, run_steps' scan included), which XLA:CPU of jaxlib "
            f"{jaxlib.__version__} aborts the process compiling; read it once outside the loop, "
            "or use ts.get_replica_context().replica_id_in_sync_group (or replica_key), which "
            "reads it at the top of the step; jaxlib 0.8.1 and later compile it"
        )


def _split_inputs(tree: PyTree):
    """Flattens ``tree`` into arrays, per-replica flags and a function to rebuild local values."""
    nodes, node_tree = jax.tree.flatten(tree, is_leaf=is_per_replica)
    arrays = [n.stacked if isinstance(n, PerReplica) else n for n in nodes]
    flags = [isinstance(n, PerReplica) for n in nodes]
    return arrays, flags, node_tree.unflatten


def _padded_rows(local_arrays, per_replica_flags) -> int:
    """The padded row count: the leading dimension of any per-replica leaf that has one."""
    return next(a.shape[0] for a, pr in zip(local_arrays, per_replica_flags) if pr and a.ndim)


def _flatten_outputs(out: PyTree):
    paths_leaves, tree = jax.tree_util.tree_flatten_with_path(out)
    leaves = []
    for path, leaf in paths_leaves:
        if not isinstance(leaf, ARRAY_TYPES) and not _numpy_like(leaf):
            raise TypeError(
                f"strategy.run: the step returned a {type(leaf).__name__} at output"
                f"{jax.tree_util.keystr(path) or ' (the root)'}; a step can only return arrays, "
                "numbers and pytrees of them (return metadata outside the step)"
            )
        leaves.append(jnp.asarray(leaf))
    return leaves, tree


def _numpy_like(x) -> bool:
    """An array constant of JAX's own that is not a numpy array (jax 0.8's ``TypedNdArray``)."""
    return hasattr(x, "__array__") and hasattr(x, "shape") and hasattr(x, "dtype")


def _diagnose_donation(name, args, donate_argnums, outputs, varying) -> None:
    """Warns, once per compilation, about donated buffers that no output can reuse."""
    free = collections.Counter((tuple(o.shape), str(o.dtype), v) for o, v in zip(outputs, varying))
    unusable = []
    for i in donate_argnums:
        for path, node in jax.tree_util.tree_flatten_with_path(args[i], is_leaf=is_per_replica)[0]:
            stacked = isinstance(node, PerReplica)
            leaf = node.stacked if stacked else node
            key = (tuple(leaf.shape), str(leaf.dtype), stacked)
            if free[key] > 0:
                free[key] -= 1
                continue
            kind = "PerReplica" if stacked else "replicated"
            unusable.append(
                f"args[{i}]{jax.tree_util.keystr(path)} ({leaf.dtype}{list(leaf.shape)}, {kind})"
            )
    if unusable:
        warnings.warn(
            f"run({name}): {len(unusable)} donated buffer(s) cannot be reused because no output "
            f"has the same shape, dtype and placement (PerReplica or replicated): "
            f"{', '.join(unusable)}. Return the updated value with that shape and dtype, or do "
            "not donate it.",
            stacklevel=4,
        )


def _abstract(x) -> jax.ShapeDtypeStruct:
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _distributed_kind(x: Any) -> str | None:
    """``"PerReplica"`` or ``"Mirrored"`` for a distributed value, else None."""
    return type(x).__name__ if is_distributed(x) else None
