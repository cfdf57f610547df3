"""Compiling a per-replica step function into one SPMD program over the mesh."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import signal
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

from tpustrat import (
    _accounting,
    _bucketing,
    _cache,
    _jaxpr,
    _mesh,
    _metrics,
    _nnx,
    _placement,
    _replication,
    _watchdog,
)
from tpustrat._checks import check_int, describe
from tpustrat._context import ReplicaContext, replica_scope
from tpustrat._placement import ARRAY_TYPES
from tpustrat._types import PyTree
from tpustrat._values import PerReplica, is_distributed, is_per_replica

_JAX_DONATION_WARNING = "Some donated buffers were not usable"
_flatten = jax.tree_util.tree_flatten  # jax.tree.flatten, one call fewer on run's hot path


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Per-call options of ``strategy.run``.

    Attributes:
      donate_argnums: positions in ``args`` whose arrays ``run`` may overwrite with its outputs
        (the training state, typically), so that an update happens in place and memory does not
        double. A donated argument must not be used after the call. When a donated buffer
        cannot be reused (no output of its shape, dtype and placement), ``run`` warns once per
        compilation, naming the buffer.
      experimental_bucketizing_dynamic_shape: pad the per-replica leading (batch) dimension of
        PerReplica arguments up to the next power of two, so that a stream of varying batch
        sizes compiles at most ``ceil(log2(max)) + 1`` programs. The step reads which rows are
        real from ``ts.get_replica_context().row_mask``; PerReplica outputs keep the padded
        rows.

    Example:
      >>> strategy = ts.TPUStrategy()
      >>> state = strategy.replicate(np.zeros(4, np.float32))
      >>> new = strategy.run(lambda s: s + 1, args=(state,),
      ...                    options=ts.RunOptions(donate_argnums=(0,)))
      >>> state.is_deleted(), float(new.sum())
      (True, 4.0)
    """

    donate_argnums: tuple[int, ...] = ()
    experimental_bucketizing_dynamic_shape: bool = False

    def __post_init__(self):
        positions = self.donate_argnums
        if not isinstance(positions, tuple):
            raise TypeError(
                f"donate_argnums must be a tuple of argument positions >= 0, got "
                f"{describe(positions)}; "
                "e.g. donate_argnums=(0,) to donate args[0]"
            )
        for i, position in enumerate(positions):
            check_int(f"donate_argnums[{i}]", position, minimum=0)


DEFAULT_OPTIONS = RunOptions()


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
      make_context: builds the ReplicaContext for one trace, given the row mask (or None).
      on_trace: called with the abstract signature of ``(args, kwargs)`` at each trace.
      donate_argnums: positions of ``args`` whose buffers the program may reuse.
    """

    def __init__(
        self,
        fn: Callable[..., PyTree],
        mesh: Mesh,
        make_context: Callable[[jax.Array | None], ReplicaContext],
        on_trace: Callable[[_accounting.Signature], None],
        donate_argnums: tuple[int, ...] = (),
    ):
        self.name = getattr(fn, "__qualname__", None) or repr(fn)
        self.traces = 0
        self._fn, self._mesh, self._make_context = fn, mesh, make_context
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
            with replica_scope(self._make_context(mask)):
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


class Runner:
    """``strategy.run``'s orchestration: place the inputs, run the step, keep the books.

    One per strategy. It owns the compiled steps (weakly keyed on the step function and
    bounded, as ``jax.jit``'s caches are), the compile accounting, the dispatch window, the
    record of donated arrays and the layouts of inputs seen already in place (``run``'s fast
    path), and lifts Flax NNX objects into state. ``run`` calls, in order: a repeat of the
    last fast call (``_HotCall``), the fast path or ``_placement.prepare`` (after shape
    bucketing), the compiled ``Step``, then the books.

    Args:
      mesh: the strategy's mesh.
      make_context: builds the ReplicaContext of one trace, given the row mask (or None).
      max_steps_in_flight: the dispatch window's size.
    """

    def __init__(
        self,
        mesh: Mesh,
        make_context: Callable[[jax.Array | None], ReplicaContext],
        max_steps_in_flight: int,
    ):
        self._mesh, self._make_context = mesh, make_context
        self._num_replicas = mesh.shape[_mesh.REPLICA_AXIS]
        self._per_replica = _mesh.per_replica_sharding(mesh)
        self._replicated = _mesh.replicated_sharding(mesh)
        self.window = DispatchWindow(max_steps_in_flight)
        self.ledger = _accounting.Ledger()
        self._step_ids = itertools.count()
        self._steps = _cache.FunctionCache(
            self._new_step, on_evict=lambda entry: self.ledger.forget(entry[1])
        )
        self._lifted = _cache.FunctionCache(
            lambda weak_fn, options: _nnx.LiftedSteps(weak_fn, *options)
        )
        self._donated = _placement.DonationRecord()
        self._layouts = _placement.PlacedLayouts()
        self._hot: _HotCall | None = None

    def run(self, fn: Callable[..., PyTree], args: tuple, kwargs: dict, options: RunOptions):
        """``strategy.run`` on checked arguments."""
        if _INTERRUPTS.pending:
            _INTERRUPTS.raise_pending()
        inputs = (args, kwargs)
        if _nnx.nnx_module() is not None and any(
            map(_nnx.is_nnx_object, itertools.chain(args, kwargs.values()))
        ):  # NNX objects at the top: not worth flattening as pytrees, which they also are
            return self._run_nnx(fn, args, _nnx.find_objects(inputs), options)
        leaves, structure = _flatten(inputs)
        if options.donate_argnums and len(set(map(id, leaves))) != len(leaves):
            unshared = _unshare_donated(args, kwargs, options.donate_argnums)
            if unshared is not None:
                inputs = unshared
                leaves, structure = _flatten(inputs)
        donated = self._donated.may_hold(leaves)
        hot = self._hot
        if hot is not None and not donated and hot.repeats(fn, options, structure, leaves):
            return self._call(hot.step, hot.key, options, None, hot.block_specs, inputs, True)
        block_specs = False
        if not (options.experimental_bucketizing_dynamic_shape or donated):
            block_specs = self._layouts.match(leaves, structure)
        if block_specs is not False:  # every leaf already in place, as on the last such call
            step, key = self._steps.get(fn, options.donate_argnums)
            outputs = self._call(step, key, options, None, block_specs, inputs, True)
            self._hot = _HotCall(fn, options, structure, leaves, block_specs, step, key)
            return outputs
        found = _nnx.find_objects(inputs)
        if found is not None:
            return self._run_nnx(fn, args, found, options)
        valid_rows = None
        if options.experimental_bucketizing_dynamic_shape:
            inputs, valid_rows = _bucketing.pad_to_bucket(inputs)
        inputs, block_specs, traced = self._prepare(inputs)
        step, key = self._steps.get(fn, options.donate_argnums)
        if traced:
            return step(valid_rows, block_specs, *inputs)[0]
        return self._call(step, key, options, valid_rows, block_specs, inputs, False)

    def _prepare(self, inputs: PyTree) -> tuple[PyTree, Any, bool]:
        return _placement.prepare(
            inputs,
            self._num_replicas,
            self._per_replica,
            self._replicated,
            self._donated,
            self._layouts,
        )

    def _call(
        self, step: Step, key: int, options, valid_rows, block_specs, inputs, fast: bool
    ) -> PyTree:
        """Runs the compiled step on placed ``inputs`` and does the host's bookkeeping.

        On the fast path the inputs were not checked leaf by leaf; when ``jax.jit`` refuses
        them (a deleted buffer, a PerReplica of the wrong length), ``prepare`` says why. The
        dispatch window waits before the step is dispatched, and a step that donates is
        dispatched and returned under ``_INTERRUPTS``: a Ctrl-C finds the caller holding either
        the inputs, untouched, or this call's outputs.
        """
        self.window.make_room()
        if not options.donate_argnums:
            return self._dispatch(step, key, options, valid_rows, block_specs, inputs, fast)
        with _INTERRUPTS:
            return self._dispatch(step, key, options, valid_rows, block_specs, inputs, fast)

    def _dispatch(
        self, step: Step, key: int, options, valid_rows, block_specs, inputs, fast: bool
    ) -> PyTree:
        traces, compiles = step.traces, _accounting.backend_compiles()
        try:
            outputs, marker = step(valid_rows, block_specs, *inputs)
        except Exception:
            if not fast:
                raise
            self._hot = None
            try:
                self._prepare(inputs)  # raises the clear error when an input is at fault
            except (TypeError, ValueError) as clear:
                raise clear from None
            raise
        if isinstance(marker, jax.core.Tracer):  # inside the user's jax.jit: nothing dispatched
            return outputs
        if options.donate_argnums:
            self._donated.add_survivors(inputs[0], options.donate_argnums)
        retraced, compiled = step.traces != traces, _accounting.backend_compiles() != compiles
        if retraced or compiled:
            self._hot = None
            bucketing = options.experimental_bucketizing_dynamic_shape
            self.ledger.compiled(key, step.name, retraced, bucketing)
        else:
            self.ledger.hit()
        _watchdog.calls["run"] += 1
        self.window.record(marker)
        return outputs

    def _run_nnx(self, fn, args, found, options: RunOptions) -> PyTree:
        """``run`` of a step that takes Flax NNX objects: their new state is written back."""
        objects, structure, positions, leaves = found
        if options.donate_argnums:
            object_args = {
                i for i, arg in enumerate(args) if any(map(_nnx.is_nnx_object, _nnx_leaves(arg)))
            }
            if not set(options.donate_argnums) <= object_args:
                raise ValueError(
                    f"donate_argnums {options.donate_argnums} names array arguments of a step "
                    f"that takes NNX objects (at {sorted(object_args)}); with NNX arguments only "
                    "the objects' state can be donated: donate their positions only"
                )
        steps = self._lifted.get(fn, (structure, positions))
        graph = steps.graph(objects)
        while _metrics.adopt(graph):  # metrics' classes swapped: split again, once
            graph = steps.graph(objects)
        accumulators = _metrics.Accumulators(graph, objects, self._mesh)
        lifted = steps.get(graph)
        donate = (0,) if options.donate_argnums else ()
        self.window.make_room()
        # The objects take the whole new state, or keep the old.
        with _INTERRUPTS, accumulators.tracing():
            out, new = self.run(
                lifted,
                (accumulators.values, leaves),
                {},
                dataclasses.replace(options, donate_argnums=donate),
            )
            _nnx.write_back(graph, objects, accumulators.take_blocks(new), steps.object_names)
            accumulators.record()
        return out

    def _new_step(
        self, fn: Callable[..., PyTree], donate_argnums: tuple[int, ...]
    ) -> tuple[Step, int]:
        """A compiled step for ``fn`` and the key compile accounting knows it by."""
        key = next(self._step_ids)
        step = Step(
            fn,
            self._mesh,
            self._make_context,
            on_trace=lambda signature: self.ledger.traced(key, signature),
            donate_argnums=donate_argnums,
        )
        target = fn.target() if isinstance(fn, _cache.WeakCallable) else fn
        origin = _cache.origin(fn)
        self.ledger.new_step(
            key,
            step.name,
            None if origin is None else (origin, donate_argnums),
            target.recompile_reason if isinstance(target, _nnx.Lifted) else None,
        )
        return step, key


class _HotCall:
    """The last call that found every input in place; a training loop's next call repeats it.

    A loop calls the same step, with the same options, on the arrays the last call returned.
    Recognizing such a call costs a pytree-structure comparison and a read of each leaf's
    sharding and deletion: no lookup of the compiled step or of the remembered layouts.
    """

    __slots__ = ("block_specs", "fn", "key", "options", "shardings", "step", "structure")

    def __init__(self, fn, options: RunOptions, structure, leaves: list, block_specs, step, key):
        self.fn = _cache.reference(fn)  # weak where possible
        self.options, self.structure, self.block_specs = options, structure, block_specs
        self.shardings = _placement.shardings_of(leaves)  # concrete jax.Arrays, in place
        self.step: Step = step
        self.key: int = key

    def repeats(self, fn, options: RunOptions, structure, leaves: list) -> bool:
        """Whether a call of ``fn`` on ``leaves`` is this call again, every input in place."""
        if not (
            structure == self.structure
            and (options is self.options or options == self.options)
            and self.fn() == fn
        ):
            return False
        try:
            return _placement.laid_out_as(leaves, self.shardings)
        except AttributeError:  # a leaf that is not a concrete jax.Array: a number, a tracer
            return False


class DispatchWindow:
    """Bounds how many steps run ahead of the host.

    XLA:CPU can abort on a rendezvous timeout when many collective programs are queued at once,
    and on any backend an unbounded queue hides the real step time. Each dispatched program
    leaves one array here that is ready when the program is done (``Step``'s marker); when
    more than ``size`` are pending, the window waits for the oldest. ``run`` makes room
    before it dispatches a step (``make_room``), so that a Ctrl-C during the wait finds the
    step's inputs untouched; ``reduce`` and ``gather`` wait after theirs (``admit``). A
    marker deleted since (an output a later step, or the user, donated) is passed over: the
    step that consumed it cannot finish before it.
    """

    def __init__(self, size: int):
        self.size = check_int("max_steps_in_flight", size, minimum=1)
        self._pending: collections.deque[jax.Array] = collections.deque()

    def make_room(self) -> None:
        """Waits while ``size`` programs pend, so that one more may be dispatched."""
        self._wait_while_more_than(self.size - 1)

    def record(self, marker: jax.Array) -> None:
        """Records a program dispatched after ``make_room`` by a concrete array it computes."""
        self._pending.append(marker)

    def admit(self, marker: jax.Array) -> None:
        """Records a dispatched program by a concrete array it computes (its marker), waiting
        while more than ``size`` pend."""
        self._pending.append(marker)
        self._wait_while_more_than(self.size)

    def _wait_while_more_than(self, count: int) -> None:
        pending = self._pending
        while len(pending) > count:
            oldest = pending.popleft()
            if not oldest.is_deleted():  # a reduce result the user donated since: its step waits
                with _watchdog.waiting("run"):
                    oldest.block_until_ready()

    def admit_result(self, result: PyTree) -> None:
        """``admit`` for the result of ``reduce`` or ``gather``, whose first leaf stands for
        the program. Traced values are ignored: inside the user's ``jax.jit`` nothing is
        dispatched."""
        leaves = jax.tree.leaves(result)
        if leaves and not isinstance(leaves[0], jax.core.Tracer):
            self.admit(leaves[0])


class _InterruptHold:
    """Holds Ctrl-C back while a step that consumes its inputs is dispatched and returned.

    A step that donates deletes its donated inputs once it is dispatched; a KeyboardInterrupt
    raised between that and ``run``'s return would leave the caller with neither the inputs
    nor the outputs (and NNX objects half written back). Inside the hold SIGINT is only
    recorded, and the next ``run`` call raises the KeyboardInterrupt before it dispatches
    anything, so the caller holds the state the interrupted call returned (a program that
    calls ``run`` no more does not see that interrupt). Off the main thread, or under a
    SIGINT handler of the user's own, nothing is held back. Nested holds (an NNX step's
    state) are one hold.
    """

    def __init__(self):
        self.pending = False
        self._depth = 0
        self._holding = False

    def raise_pending(self) -> None:
        """Raises the KeyboardInterrupt held back by an earlier call."""
        self.pending = False
        raise KeyboardInterrupt

    def __enter__(self) -> None:
        # A KeyboardInterrupt raised in here (nothing is dispatched yet) leaves no hold behind.
        if self._depth == 0 and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            with contextlib.suppress(ValueError):  # not the main thread, which SIGINT reaches
                signal.signal(signal.SIGINT, self._record)
                self._holding = True
        self._depth += 1

    def __exit__(self, *exception) -> None:
        self._depth -= 1
        if self._depth == 0 and self._holding:
            self._holding = False
            # signal.signal runs the handler of a SIGINT already received (ours) before it
            # puts the default back.
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _record(self, signum, frame) -> None:
        del signum, frame
        self.pending = True


_INTERRUPTS = _InterruptHold()


def _unshare_donated(args: tuple, kwargs: dict, donate_argnums: tuple[int, ...]):
    """``(args, kwargs)`` with a copy for every repeat of a donated array, or None if none.

    XLA cannot donate one buffer twice (tied weights: ``{"a": w, "b": w}``), nor read a
    buffer the same call donates (``args=(x, x)`` with ``args[0]`` donated): the first
    occurrence in a donated argument is donated, every other occurrence is a copy.
    """
    donated: set[int] = set()
    parts = list(args)

    def copy_repeats(tree: PyTree, is_donated: bool) -> tuple[PyTree, bool]:
        leaves, structure = jax.tree.flatten(tree, is_leaf=_nnx.is_nnx_object)
        copied = False
        for k, leaf in enumerate(leaves):
            if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
                continue
            if id(leaf) in donated:
                leaves[k] = jax.device_put(leaf, leaf.sharding, may_alias=False)
                copied = True
            elif is_donated:
                donated.add(id(leaf))
        return (structure.unflatten(leaves) if copied else tree), copied

    positions = sorted(set(donate_argnums))
    changed = False
    for i in positions + [i for i in range(len(parts)) if i not in positions]:
        parts[i], copied = copy_repeats(parts[i], i in positions)
        changed |= copied
    kwargs, copied = copy_repeats(kwargs, False)
    return (tuple(parts), kwargs) if changed or copied else None


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
            "while_loop, experimental_run_steps' scan included), which XLA:CPU of jaxlib "
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


def _nnx_leaves(tree: PyTree) -> list[Any]:
    return jax.tree.leaves(tree, is_leaf=_nnx.is_nnx_object)
