"""Dispatching compiled steps: ``strategy.run`` from checked arguments to its outputs.

``Dispatcher`` takes a call from the strategy: it finds the inputs already in place
(``_placement.PlacementCache``) or places them (``_placement.prepare``, after shape
bucketing), finds the compiled step (``_compile.CompiledSteps``), dispatches it inside the
window that bounds the steps in flight (``DispatchWindow``), records what the call donated,
and counts the call for compile accounting. Flax NNX objects are lifted into state around
the call and written back after it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import signal
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from tpustrat import _accounting, _bucketing, _cache, _mesh, _metrics, _nnx, _placement, _watchdog
from tpustrat._checks import check_int, describe
from tpustrat._compile import CompiledSteps, Step
from tpustrat._context import CURRENT_STRATEGY, Strategy
from tpustrat._types import PyTree

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


class Dispatcher:
    """``strategy.run``'s dispatch: place the inputs, run the compiled step, keep the books.

    One per strategy. It owns the compile accounting (``ledger``), the compiled steps, the
    placement cache (with the record of donated arrays), the dispatch window and the lifted
    NNX steps. ``run`` tries, in order: the placement cache (every input where the last call
    of that structure left it), else ``_placement.prepare`` (after shape bucketing); then the
    compiled ``Step``, dispatched inside the window; then the books.

    Args:
      mesh: the strategy's mesh.
      num_slices: how many slices the replicas form.
      max_steps_in_flight: the dispatch window's size.
    """

    def __init__(self, mesh: Mesh, num_slices: int, max_steps_in_flight: int):
        self._mesh = mesh
        self._num_replicas = mesh.shape[_mesh.REPLICA_AXIS]
        self._per_replica = _mesh.per_replica_sharding(mesh)
        self._replicated = _mesh.replicated_sharding(mesh)
        self.window = DispatchWindow(max_steps_in_flight)
        self.ledger = _accounting.Ledger()
        self._steps = CompiledSteps(mesh, num_slices, self.ledger)
        self._lifted = _cache.FunctionCache(
            lambda weak_fn, options: _nnx.LiftedSteps(weak_fn, *options)
        )
        self._placed = _placement.PlacementCache()

    def run(
        self,
        strategy: Strategy,
        fn: Callable[..., PyTree],
        args: tuple,
        kwargs: dict,
        options: RunOptions,
    ) -> PyTree:
        """``strategy.run`` on checked arguments.

        ``strategy`` is the strategy called: the step is traced in its ``StrategyScope``, so
        that the step sees it as ``ts.get_strategy()`` and ``ReplicaContext.strategy``.
        """
        if _INTERRUPTS.pending:
            _INTERRUPTS.raise_pending()
        inputs = (args, kwargs)
        if _nnx.nnx_module() is not None and any(
            map(_nnx.is_nnx_object, itertools.chain(args, kwargs.values()))
        ):  # NNX objects at the top: not worth flattening as pytrees, which they also are
            return self._run_nnx(strategy, fn, args, _nnx.find_objects(inputs), options)
        leaves, structure = _flatten(inputs)
        if options.donate_argnums and len(set(map(id, leaves))) != len(leaves):
            unshared = _unshare_donated(args, kwargs, options.donate_argnums)
            if unshared is not None:
                inputs = unshared
                leaves, structure = _flatten(inputs)
        if not options.experimental_bucketizing_dynamic_shape:
            block_specs = self._placed.lookup(leaves, structure)
            if block_specs is not _placement.MISS:  # every input in place, as last time
                step, key = self._steps.get(fn, options.donate_argnums)
                return self._call(strategy, step, key, options, None, block_specs, inputs, True)
        found = _nnx.find_objects(inputs)
        if found is not None:
            return self._run_nnx(strategy, fn, args, found, options)
        valid_rows = None
        if options.experimental_bucketizing_dynamic_shape:
            inputs, valid_rows = _bucketing.pad_to_bucket(inputs)
        inputs, block_specs, traced = self._prepare(inputs)
        step, key = self._steps.get(fn, options.donate_argnums)
        if traced:
            token = CURRENT_STRATEGY.set(strategy)
            try:
                return step(valid_rows, block_specs, *inputs)[0]
            finally:
                CURRENT_STRATEGY.reset(token)
        return self._call(strategy, step, key, options, valid_rows, block_specs, inputs, False)

    def _prepare(self, inputs: PyTree) -> tuple[PyTree, Any, bool]:
        return _placement.prepare(
            inputs, self._num_replicas, self._per_replica, self._replicated, self._placed
        )

    def _call(
        self,
        strategy: Strategy,
        step: Step,
        key: int,
        options: RunOptions,
        valid_rows: Any,
        block_specs: Any,
        inputs: PyTree,
        fast: bool,
    ) -> PyTree:
        """Runs the compiled step on placed ``inputs`` and does the host's bookkeeping.

        On the fast path the inputs were not checked leaf by leaf; when ``jax.jit`` refuses
        them (a PerReplica of the wrong length, say), ``prepare`` says why. The dispatch
        window waits before the step is dispatched, and a step that donates is dispatched and
        returned under ``_INTERRUPTS``: a Ctrl-C finds the caller holding either the inputs,
        untouched, or this call's outputs.
        """
        self.window.make_room()
        if not options.donate_argnums:
            return self._dispatch(
                strategy, step, key, options, valid_rows, block_specs, inputs, fast
            )
        with _INTERRUPTS:
            return self._dispatch(
                strategy, step, key, options, valid_rows, block_specs, inputs, fast
            )

    def _dispatch(
        self,
        strategy: Strategy,
        step: Step,
        key: int,
        options: RunOptions,
        valid_rows: Any,
        block_specs: Any,
        inputs: PyTree,
        fast: bool,
    ) -> PyTree:
        traces, compiles = step.traces, _accounting.backend_compiles()
        token = CURRENT_STRATEGY.set(strategy)  # the step traces, if it does, as the strategy's
        try:
            outputs, marker = step(valid_rows, block_specs, *inputs)
        except Exception:
            if not fast:
                raise
            try:
                self._prepare(inputs)  # raises the clear error when an input is at fault
            except (TypeError, ValueError) as clear:
                raise clear from None
            raise
        finally:
            CURRENT_STRATEGY.reset(token)
        if isinstance(marker, jax.core.Tracer):  # inside the user's jax.jit: nothing dispatched
            return outputs
        if options.donate_argnums:
            self._placed.donated.add_survivors(inputs[0], options.donate_argnums)
        retraced, compiled = step.traces != traces, _accounting.backend_compiles() != compiles
        if retraced or compiled:
            bucketing = options.experimental_bucketizing_dynamic_shape
            self.ledger.compiled(key, step.name, retraced, bucketing)
        else:
            self.ledger.hit()
        _watchdog.calls["run"] += 1
        self.window.record(marker)
        return outputs

    def _run_nnx(self, strategy: Strategy, fn, args, found, options: RunOptions) -> PyTree:
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
                strategy,
                lifted,
                (accumulators.values, leaves),
                {},
                dataclasses.replace(options, donate_argnums=donate),
            )
            _nnx.write_back(graph, objects, accumulators.take_blocks(new), steps.object_names)
            accumulators.record()
        return out


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


def _nnx_leaves(tree: PyTree) -> list[Any]:
    return jax.tree.leaves(tree, is_leaf=_nnx.is_nnx_object)
