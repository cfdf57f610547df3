"""The replica context: what a step function sees while it runs on one replica."""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
from collections.abc import Callable, Generator
from typing import Any, Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from tpustrat._checks import check_axis, check_tree, describe
from tpustrat._collectives import hierarchical_sum
from tpustrat._mesh import REPLICA_AXIS
from tpustrat._types import PyTree
from tpustrat._values import is_distributed


class Strategy(Protocol):
    """What the replica context and the modules under the strategy read of a strategy.

    ``ts.TPUStrategy`` is one; the modules below ``_strategy`` name this Protocol instead of
    importing the strategy, so that imports run one way.
    """

    @property
    def mesh(self) -> Mesh:
        """The ``jax.sharding.Mesh`` of the strategy: ``"replica"``, then its core axes."""
        ...

    @property
    def num_replicas_in_sync(self) -> int:
        """How many replicas run each step together."""
        ...

    @property
    def num_slices(self) -> int:
        """How many slices the replicas form."""
        ...


_S = TypeVar("_S", bound=Strategy)

_REPLICA_CONTEXT: contextvars.ContextVar[ReplicaContext | None] = contextvars.ContextVar(
    "tpustrat_replica_context", default=None
)
# The strategy of the innermost strategy.scope() or run. run sets it around the compiled
# step it calls (the step traces there) with the ContextVar's own set and reset: on its hot
# path, and inside the interrupt hold of a donating call, where no Python frame may be entered.
CURRENT_STRATEGY: contextvars.ContextVar[Strategy | None] = contextvars.ContextVar(
    "tpustrat_strategy", default=None
)


class ReduceOp(str, enum.Enum):
    """How values from several replicas combine into one. The plain strings work too.

    Every reduction across replicas (``strategy.reduce`` and ``ReplicaContext.all_reduce``
    alike) gives the value and dtype that ``jnp.sum``, ``jnp.mean``, ``jnp.max`` or
    ``jnp.min`` give over the stacked components (``axis=0``):

    - SUM of ``bool``, ``int8``/``int16`` and ``uint8``/``uint16`` counts in ``int32`` /
      ``uint32``; wider types keep their dtype (and wrap around on overflow, as in numpy).
    - MEAN of integers and bools is a float (the default float dtype, ``float32`` unless
      ``jax_enable_x64``), computed in that float so that the sum never overflows: 8
      replicas of ``int32`` ``2**30`` average to ``1073741824.0``. MEAN of ``float16`` and
      ``bfloat16`` keeps the dtype and never overflows where the mean itself fits.
    - MAX and MIN keep the dtype.

    Typed PRNG keys (``jax.random.key``) have no arithmetic or order and are refused with a
    TypeError; gather them, or reduce their bits (``jax.random.key_data``).

    Example:
      >>> ts.ReduceOp.parse("mean") is ts.ReduceOp.MEAN
      True
      >>> ts.ReduceOp.MEAN.result_dtype(np.int32), ts.ReduceOp.SUM.result_dtype(np.int8)
      (dtype('float32'), dtype('int32'))
    """

    SUM = "sum"
    MEAN = "mean"
    MAX = "max"
    MIN = "min"

    @classmethod
    def parse(cls, op: ReduceOp | str) -> ReduceOp:
        """Returns the ReduceOp that ``op`` names; a TypeError or ValueError says the choices."""
        choices = ", ".join(repr(o.value) for o in cls)
        if not isinstance(op, str):
            raise TypeError(
                f"reduce_op must be a ts.ReduceOp or a string, got {describe(op)}; "
                f"use ts.ReduceOp.SUM/MEAN/MAX/MIN or one of {choices}"
            )
        try:
            return cls(op.lower())
        except ValueError:
            raise ValueError(
                f"reduce_op must be ts.ReduceOp.SUM/MEAN/MAX/MIN or one of {choices}; got {op!r}"
            ) from None

    def result_dtype(self, dtype: Any) -> np.dtype:
        """The dtype of this reduction over replicas whose values have ``dtype``."""
        return _result_dtype(self, np.dtype(dtype), jax.config.read("jax_enable_x64"))

    def check_reducible(self, what: str, dtype: Any) -> None:
        """Raises a TypeError naming ``what`` (the call) if values of ``dtype`` cannot reduce."""
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"{what} cannot {self.value} typed PRNG keys ({dtype}) in value: keys have no "
                "arithmetic or order. Gather them instead (strategy.gather, ctx.all_gather), read "
                "each replica's (strategy.experimental_local_results), or reduce their bits, "
                "jax.random.key_data(keys)"
            )


JNP_REDUCTIONS: dict[ReduceOp, Callable[..., jax.Array]] = {
    ReduceOp.SUM: jnp.sum,
    ReduceOp.MEAN: jnp.mean,
    ReduceOp.MAX: jnp.max,
    ReduceOp.MIN: jnp.min,
}
"""The jnp reduction whose value and dtype each ReduceOp gives over the replicas."""


@functools.lru_cache(maxsize=256)
def _result_dtype(op: ReduceOp, dtype: np.dtype, x64: bool) -> np.dtype:
    del x64  # part of the key: the default float and int widths follow it
    reducer = JNP_REDUCTIONS[op]
    out = jax.eval_shape(lambda x: reducer(x, axis=0), jax.ShapeDtypeStruct((2,), dtype))
    return np.dtype(out.dtype)


class ReplicaContext:
    """Inside ``strategy.run``: which replica this is, and collectives across replicas.

    Get it with ``ts.get_replica_context()`` inside the step function.

    Example:
      >>> strategy = ts.TPUStrategy()
      >>> def step():
      ...     ctx = ts.get_replica_context()
      ...     return ctx.all_reduce("sum", 1.0)
      >>> float(strategy.run(step))
      8.0
    """

    def __init__(self, mesh: Mesh, num_slices: int, row_mask: jax.Array | None = None) -> None:
        self._mesh = mesh
        self._num_slices = num_slices
        self._row_mask = row_mask
        self._active = False
        self._replica_id: jax.Array | None = None

    @property
    def strategy(self) -> Strategy:
        """The strategy running this step (the one whose ``run`` traces it)."""
        self._check_active("strategy")
        strategy = CURRENT_STRATEGY.get()
        assert strategy is not None, "strategy.run sets its strategy around the step"
        return strategy

    @property
    def num_replicas_in_sync(self) -> int:
        """How many replicas run the step together."""
        return self._mesh.shape[REPLICA_AXIS]

    @property
    def replica_id_in_sync_group(self) -> jax.Array:
        """This replica's index, a traced int32 scalar in ``[0, num_replicas_in_sync)``."""
        self._check_active("replica_id_in_sync_group")
        return self._index()

    @property
    def row_mask(self) -> jax.Array | None:
        """With shape bucketing, True for the real rows of this replica's padded batch.

        ``run(..., options=ts.RunOptions(experimental_bucketizing_dynamic_shape=True))`` pads the
        leading dimension of PerReplica arguments up to a power of two; weigh per-row results
        with this mask. None when the call was not bucketed.
        """
        return self._row_mask

    def all_reduce(self, reduce_op: ReduceOp | str, value: PyTree) -> PyTree:
        """Combines ``value`` across replicas; every replica gets the result.

        As in tf.distribute, SUM of a value that is the same on every replica is
        ``num_replicas_in_sync`` times that value. The result has the value and dtype of
        ``strategy.reduce`` on the same components (``ts.ReduceOp``): the MEAN of integers is a
        float, computed without overflow.

        Args:
          reduce_op: a ReduceOp or one of ``"sum"``, ``"mean"``, ``"max"``, ``"min"``.
          value: a pytree of arrays (or Python numbers).

        Returns:
          A pytree like ``value``, identical on every replica.

        On a strategy of several slices (``strategy.num_slices > 1``), SUM and MEAN run
        hierarchically: a reduce-scatter inside each slice, an all-reduce of the
        ``1 / replicas_per_slice`` shards across slices, and an all-gather inside each slice,
        so the slow links between slices carry a fraction of the bytes.
        """
        op = ReduceOp.parse(reduce_op)
        self._check_active("all_reduce")
        check_in_step_tree("value", value)
        n, num_slices = self.num_replicas_in_sync, self._num_slices

        def combine(x):
            if op in (ReduceOp.MAX, ReduceOp.MIN) and jnp.iscomplexobj(x):
                # XLA has no max of complex numbers; numpy's order (real part, then imaginary
                # part) is jnp.max's, over every replica's value.
                return JNP_REDUCTIONS[op](lax.all_gather(x, REPLICA_AXIS), axis=0)
            if op is ReduceOp.MAX:
                return lax.pmax(x, REPLICA_AXIS)
            if op is ReduceOp.MIN:
                return lax.pmin(x, REPLICA_AXIS)
            if num_slices > 1:
                return sum_or_mean(op, x, n, lambda x: hierarchical_sum(x, n, num_slices))
            return sum_or_mean(op, x, n, lambda x: lax.psum(x, REPLICA_AXIS))

        def checked(x):
            x = jnp.asarray(x)
            op.check_reducible("all_reduce", x.dtype)
            linear = op in (ReduceOp.SUM, ReduceOp.MEAN)
            reduce = _with_cores_manual(combine) if n == 1 else combine
            return _compilable_on_cpu(self._mesh, x, reduce, linear=linear)

        return jax.tree.map(checked, value)

    def replica_key(self, key: jax.Array) -> jax.Array:
        """A PRNG key for this replica: ``key`` folded with the replica index.

        Pass a key that changes every step (``jax.random.fold_in(seed_key, step)``) and each
        replica draws its own numbers (dropout masks differ across replicas), reproducibly from
        one seed. A key passed to ``run`` as it is would give every replica the same numbers.
        Works for typed keys (``jax.random.key``) and raw ``jax.random.PRNGKey`` keys.

        Example:
          >>> strategy = ts.TPUStrategy()
          >>> def step(key):
          ...     key = ts.get_replica_context().replica_key(key)
          ...     return jax.random.uniform(key)
          >>> draws = strategy.run(step, args=(jax.random.key(0),))
          >>> len(set(np.asarray(draws.stacked).tolist()))  # eight different numbers
          8
        """
        self._check_active("replica_key")
        return jax.random.fold_in(key, self._index())

    def all_gather(self, value: PyTree, axis: int) -> PyTree:
        """Concatenates every replica's ``value`` along ``axis``, in replica order.

        Args:
          value: a pytree of arrays of rank >= 1, the same shapes on every replica.
          axis: the axis to concatenate along; negative counts from the end.

        Returns:
          A pytree like ``value`` whose ``axis`` is ``num_replicas_in_sync`` times longer.
        """
        self._check_active("all_gather")
        check_in_step_tree("value", value)
        num_replicas = self.num_replicas_in_sync

        def gather(x):
            x = jnp.asarray(x)
            dim = check_axis("all_gather", axis, x.ndim, _shape(x))
            if x.size == 0:  # XLA cannot lower a collective of no elements; none are moved
                shape = (*x.shape[:dim], x.shape[dim] * num_replicas, *x.shape[dim + 1 :])
                return jnp.zeros(shape, x.dtype)
            return lax.all_gather(x, REPLICA_AXIS, axis=dim, tiled=True)

        return jax.tree.map(gather, value)

    def reduce_scatter(self, reduce_op: ReduceOp | str, value: PyTree, axis: int) -> PyTree:
        """Combines ``value`` across replicas and gives each replica one block of the result.

        The inverse of ``all_gather``: ``value``'s ``axis`` is cut into ``num_replicas_in_sync``
        equal blocks, and replica ``i`` receives block ``i`` of the sum (or mean) over replicas.
        It moves half the bytes of an ``all_reduce``, which equals ``reduce_scatter`` followed
        by ``all_gather``.

        Args:
          reduce_op: ``"sum"`` or ``"mean"`` (or the ReduceOp).
          value: a pytree of arrays whose ``axis`` is divisible by ``num_replicas_in_sync``.
          axis: the axis to cut into blocks; negative counts from the end.

        Returns:
          A pytree like ``value`` whose ``axis`` is ``num_replicas_in_sync`` times shorter.

        Example:
          >>> strategy = ts.TPUStrategy()
          >>> def step():
          ...     ctx = ts.get_replica_context()
          ...     return ctx.reduce_scatter("sum", np.arange(16.0), axis=0)
          >>> print(strategy.experimental_local_results(strategy.run(step))[1])
          [16. 24.]
        """
        op = ReduceOp.parse(reduce_op)
        self._check_active("reduce_scatter")
        if op not in (ReduceOp.SUM, ReduceOp.MEAN):
            raise ValueError(
                f"reduce_scatter supports the reduce ops 'sum' and 'mean', got {op.value!r}; "
                f"use all_reduce({op.value!r}, ...) and slice this replica's block instead"
            )
        check_in_step_tree("value", value)
        num_replicas = self.num_replicas_in_sync

        def scatter(x):
            x = jnp.asarray(x)
            op.check_reducible("reduce_scatter", x.dtype)
            dim = check_axis("reduce_scatter", axis, x.ndim, _shape(x))
            if x.shape[dim] % num_replicas:
                raise ValueError(
                    f"reduce_scatter axis {axis} of a value of shape {x.shape} has length "
                    f"{x.shape[dim]}, which is not divisible by {num_replicas} replicas; pad "
                    f"that axis to a multiple of {num_replicas} (e.g. with jnp.pad) first"
                )
            if x.size == 0:  # XLA cannot lower a collective of no elements; none are moved
                shape = (*x.shape[:dim], x.shape[dim] // num_replicas, *x.shape[dim + 1 :])
                return jnp.zeros(shape, op.result_dtype(x.dtype))
            return _compilable_on_cpu(
                self._mesh,
                x,
                lambda x: sum_or_mean(
                    op,
                    x,
                    num_replicas,
                    lambda x: lax.psum_scatter(x, REPLICA_AXIS, scatter_dimension=dim, tiled=True),
                ),
            )

        return jax.tree.map(scatter, value)

    def _check_active(self, what: str) -> None:
        if not self._active:
            raise RuntimeError(
                f"ReplicaContext.{what} was used outside strategy.run; call it inside the "
                "function you pass to strategy.run (ts.get_replica_context() is None elsewhere)"
            )

    def _index(self) -> jax.Array:
        """The replica index that ``replica_scope`` read at the top of the step.

        Read there once rather than where the step asks for it, which may be inside a loop
        (its own, or ``run_steps``'s scan): XLA:CPU of jaxlib 0.7.0 to 0.8.0 aborts the
        process compiling a small loop that reads the device's index (see
        ``_compile.check_axis_index_outside_loops``). The value is the same.
        """
        assert self._replica_id is not None, "replica_scope reads the index before the step runs"
        return self._replica_id


def sum_or_mean(
    op: ReduceOp, x: jax.Array, num_replicas: int, sum_over_replicas: Callable[[jax.Array], Any]
) -> jax.Array:
    """SUM or MEAN of ``x`` over the replicas, in the dtype ``op.result_dtype`` gives.

    Integers and bools are cast to that dtype before the sum (a float, for MEAN, so that the
    sum cannot overflow); ``float16`` and ``bfloat16`` are divided before the sum, which stays
    in their dtype (half the bytes of a ``float32`` sum) and cannot overflow where the mean fits.
    """
    dtype = op.result_dtype(x.dtype)
    divide_first = op is ReduceOp.MEAN and dtype.itemsize < 4
    if x.dtype != dtype:
        x = x.astype(dtype)
    total = sum_over_replicas(x / num_replicas if divide_first else x)
    return total / num_replicas if op is ReduceOp.MEAN and not divide_first else total


def _with_cores_manual(reduce: Callable[[jax.Array], jax.Array]) -> Callable:
    """``reduce``, a reduction over a replica axis of size 1, run with the logical cores manual.

    XLA's SPMD partitioner (with Shardy) drops a manual axis of size 1, and then refuses a
    collective over it among the cores it partitions ("Cross-partition allreduce must be in
    (partial) manual partitioning mode"). Made manual, the cores each reduce the whole value.
    """
    mesh = jax.sharding.get_abstract_mesh()
    cores = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual}
    if not cores:
        return reduce
    return jax.shard_map(
        reduce, mesh=mesh, in_specs=P(), out_specs=P(), axis_names=cores, check_vma=False
    )


def _compilable_on_cpu(
    mesh: Mesh,
    x: jax.Array,
    reduce: Callable[[jax.Array], jax.Array],
    *,
    linear: bool = True,
) -> jax.Array:
    """``reduce(x)``, a reduction across replicas, in a form XLA:CPU compiles and runs.

    Two XLA:CPU failures (jax 0.10) are worked around, on CPU only:

    - it aborts the process compiling a ``bfloat16`` reduction (``psum``, ``pmax``,
      ``psum_scatter``) over the replica axis when each replica spans several devices
      ("Invalid binary instruction opcode copy"): ``x`` is reduced in ``float32`` and the result
      rounded back to ``bfloat16``;
    - it aborts the process running a ``psum`` of a complex constant ("Check failed: buffer !=
      nullptr"): when ``reduce`` is ``linear`` (SUM or MEAN), the real and imaginary parts are
      reduced apart, which is the same sum.

    Other platforms and dtypes reduce as they are.
    """
    devices = mesh.devices
    if devices.flat[0].platform != "cpu":
        return reduce(x)
    if linear and jnp.iscomplexobj(x):
        return lax.complex(reduce(jnp.real(x)), reduce(jnp.imag(x)))
    if x.dtype == jnp.bfloat16 and devices.size != mesh.shape[REPLICA_AXIS]:
        return reduce(x.astype(jnp.float32)).astype(jnp.bfloat16)
    return reduce(x)


def _shape(x: jax.Array) -> str:
    return f"a value of shape {x.shape}"


def check_in_step_tree(name: str, tree: PyTree) -> None:
    """``check_tree``, and a TypeError for a PerReplica or Mirrored: inside the step each
    replica has its own values, and a distributed value there came from a closure."""
    check_tree(name, tree)
    for leaf in jax.tree.leaves(tree, is_leaf=is_distributed):
        if is_distributed(leaf):
            raise TypeError(
                f"{name} holds a ts.{type(leaf).__name__} inside a step, which the step took "
                "from a closure rather than from run's args; pass it to run in args (each "
                "replica then gets its own component) and use what the step receives"
            )


def get_replica_context() -> ReplicaContext | None:
    """The ReplicaContext of the step being traced by ``strategy.run``; None outside ``run``.

    Example:
      >>> strategy = ts.TPUStrategy()
      >>> ids = strategy.run(lambda: ts.get_replica_context().replica_id_in_sync_group)
      >>> ids, ts.get_replica_context()
      (PerReplica(int32[8]), None)
    """
    return _REPLICA_CONTEXT.get()


def check_cross_replica(call: str, fix: str) -> None:
    """Raises a RuntimeError when ``call``, a host call on distributed values, runs in a step.

    Inside ``strategy.run`` each value is one replica's own, so a cross-replica call there
    would see that replica alone (``strategy.reduce`` would sum one value, not all of them).
    As in tf.distribute, such calls are refused in a replica context; ``fix`` says what to
    do inside the step instead.
    """
    if _REPLICA_CONTEXT.get() is not None:
        raise RuntimeError(
            f"strategy.{call} was called inside a step that strategy.run is running; it is a "
            f"cross-replica call, made on run's results from outside the step. Inside the "
            f"step, {fix}"
        )


def current_strategy() -> Strategy | None:
    """The strategy of the innermost ``strategy.scope()`` or ``run``, or None
    (``ts.get_strategy`` is the public, precisely typed face of this)."""
    return CURRENT_STRATEGY.get()


@contextlib.contextmanager
def replica_scope(context: ReplicaContext) -> Generator[ReplicaContext, None, None]:
    """Makes ``context`` the one ``get_replica_context`` returns while ``run`` traces the step
    inside the block (``run`` has made its strategy the current one)."""
    context._replica_id = lax.axis_index(REPLICA_AXIS)  # once, outside any loop: see _index
    context._active = True
    token = _REPLICA_CONTEXT.set(context)
    try:
        yield context
    finally:
        _REPLICA_CONTEXT.reset(token)
        context._active = False
        context._replica_id = None


@contextlib.contextmanager
def strategy_scope(strategy: _S) -> Generator[_S, None, None]:
    """Makes ``strategy`` the one ``current_strategy`` returns, until the block ends."""
    token = CURRENT_STRATEGY.set(strategy)
    try:
        yield strategy
    finally:
        CURRENT_STRATEGY.reset(token)
