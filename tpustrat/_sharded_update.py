"""Weight-update sharding: each replica updates its 1/R block of every parameter (ZeRO-1/2).

As in Xu et al. 2020 ("Automatic Cross-Replica Sharding of Weight Update in Data-Parallel
Training") and DeepSpeed's ZeRO stages 1 and 2: gradients are reduce-scattered instead of
all-reduced, every replica runs the optimizer on its block of each leaf and keeps only that
block of the optimizer state, and the updates are all-gathered. The two collectives move the
same bytes as the all-reduce they replace; optimizer memory per device falls as 1/R.

Layout. A leaf of rank >= 1 is cut along one axis: the first whose length divides by R (no
padding), else its longest axis, zero-padded to a multiple of R. Cutting along an axis, rather
than flattening, keeps every leaf's rank, so masks and transformations that read ``ndim`` (no
weight decay on biases, say) decide as they would on the whole leaf. Scalars and leaves whose
every axis has length 1 stay whole on every replica.

Exactness. The wrapped transformation's ``init`` and ``update`` are traced to a jaxpr and
replayed block-wise by a small interpreter that knows which values are blocks of a leaf and
along which axis. Elementwise primitives run on the blocks as they are; a reduction over the
cut axis (``jnp.sum``, ``max``, ``min``, ``all``, ``any``: a global norm, a finite check), or a
contraction of two blocks over it, masks the padding and is completed across replicas with
psum, pmax or pmin, so ``clip_by_global_norm`` sees the global norm. Anything else that would
mix elements along the cut axis (a matmul with a whole matrix, a cumulative sum, a reshape
across the cut, a mean whose count would be the block's), or combine blocks with values made
from element positions (``jnp.arange``, random noise), raises a ValueError naming the
primitive: the analysis fails closed rather than train on a wrong update. It reads jaxprs
through the public ``jax.extend.core`` only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from tpustrat import _mesh
from tpustrat._context import ReplicaContext, Strategy, get_replica_context
from tpustrat._values import Mirrored, PerReplica, is_distributed

PyTree = Any


@jax.tree_util.register_pytree_with_keys_class
class ReplicaShard:
    """One leaf of a sharded optimizer state: every replica holds one block of it.

    ``run`` returns it holding a ``ts.PerReplica`` whose stacked array has shape
    ``(num_replicas, *block_shape)`` and is sharded over the replicas, so no device holds the
    whole leaf; inside ``run`` each replica sees its own block. ``shape`` is the whole leaf's
    shape and ``axis`` the axis it is cut along (zero-padded to a multiple of the replicas).
    It is a pytree node: checkpointers such as orbax save the array inside.

    Args:
      blocks: the blocks (a PerReplica outside ``run``, a block inside).
      shape: the shape of the whole leaf.
      axis: the axis cut into blocks.

    Example:
      >>> shard = ReplicaShard(ts.PerReplica([np.zeros(2, np.float32)] * 4), shape=(7,), axis=0)
      >>> shard
      ReplicaShard(PerReplica(float32[4, 2]), shape=(7,), axis=0)
    """

    __slots__ = ("axis", "blocks", "shape")
    blocks: Any
    shape: tuple[int, ...]
    axis: int

    def __init__(self, blocks: Any, shape: Sequence[int], axis: int):
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))
        object.__setattr__(self, "axis", int(axis))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ReplicaShard is immutable; make a new one instead of setting {name}")

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("blocks"), self.blocks),), (self.shape, self.axis)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    def __repr__(self) -> str:
        return f"ReplicaShard({self.blocks!r}, shape={self.shape}, axis={self.axis})"


class ShardedUpdate(NamedTuple):
    """An optax-style ``(init, update)`` pair whose state and update are split over replicas.

    Made by ``ts.shard_update``; both functions are called inside ``strategy.run``.

    Example:
      >>> import optax
      >>> tx = ts.shard_update(optax.sgd(0.1))
      >>> isinstance(tx, ShardedUpdate), tx._fields
      (True, ('init', 'update'))
    """

    init: Callable[[PyTree], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]


def shard_update(tx: Any) -> ShardedUpdate:
    """Shards the weight update of an optax GradientTransformation over the replicas.

    Call ``init`` and ``update`` inside ``strategy.run``, giving ``update`` the replica's own
    gradients (not all-reduced: the update reduce-scatters them itself). Each replica keeps and
    updates only its block of the optimizer state; the updates come back whole and identical
    on every replica. The state ``run`` returns holds ``ts.ReplicaShard`` leaves over
    ``ts.PerReplica`` blocks; pass it back to ``run`` as it is, checkpoint it like any pytree of
    arrays, and move it to another replica count with ``ts.reshard_update_state``.

    Args:
      tx: any object with optax's ``init(params)`` and ``update(updates, state, params)``,
        e.g. ``optax.adamw(1e-3)`` or a chain with ``optax.clip_by_global_norm``.

    Returns:
      A ``ShardedUpdate(init, update)``, usable wherever the optax transformation was.

    Example:
      >>> import optax
      >>> strategy = ts.TPUStrategy()
      >>> tx = ts.shard_update(optax.adam(0.1))
      >>> params = strategy.replicate({"w": np.ones(16, np.float32)})
      >>> opt_state = strategy.run(tx.init, args=(params,))
      >>> opt_state[0].mu["w"]
      ReplicaShard(PerReplica(float32[8, 2]), shape=(16,), axis=0)
      >>> def step(params, opt_state, x):
      ...     grads = jax.grad(lambda p: jnp.sum((p["w"] * x) ** 2))(params)
      ...     updates, opt_state = tx.update(grads, opt_state, params)
      ...     return optax.apply_updates(params, updates), opt_state
      >>> x = strategy.experimental_distribute_values_from_function(
      ...     lambda ctx: np.full(16, ctx.replica_id_in_sync_group, np.float32))
      >>> params, opt_state = strategy.run(step, args=(params, opt_state, x))
      >>> print(np.asarray(jax.tree.leaves(params)[0])[:3].round(4))
      [0.9 0.9 0.9]
    """
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(
            f"shard_update takes an optax GradientTransformation (an object with init and "
            f"update), got {type(tx).__name__}; e.g. ts.shard_update(optax.adam(1e-3))"
        )

    def init(params: PyTree) -> PyTree:
        ctx = _replica_context("init")
        splits = _splits(params, ctx.num_replicas_in_sync)
        blocks = _map_blocks(_own_block, params, splits, ctx)
        local = _interpret(tx.init, (blocks,), splits, ctx)[0]
        whole = jax.eval_shape(tx.init, params)
        state = jax.tree.map(lambda b, w: _wrap_leaf(b, w, ctx.num_replicas_in_sync), local, whole)
        return _mark_per_replica(state, ctx)

    def update(
        updates: PyTree, state: PyTree, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, PyTree]:
        ctx = _replica_context("update")
        splits = _splits(updates, ctx.num_replicas_in_sync)
        grads = _map_blocks(_reduce_block, updates, splits, ctx)
        param_blocks = None if params is None else _map_blocks(_own_block, params, splits, ctx)
        shards, state_tree = jax.tree.flatten(state, is_leaf=_is_shard)
        state_local = state_tree.unflatten([_unwrap(x) for x in shards])
        state_splits = [_Split(x.axis, x.shape[x.axis]) if _is_shard(x) else None for x in shards]
        param_splits = [] if params is None else splits
        extra_splits = [None] * len(jax.tree.leaves(extra_args))
        (new_updates, new_local), out_splits = _interpret(
            lambda *a, **k: tx.update(*a, **k),
            (grads, state_local, param_blocks),
            [*splits, *state_splits, *param_splits, *extra_splits],
            ctx,
            extra_args,
        )
        num_updates = len(jax.tree.leaves(new_updates))
        for split, old, path in zip(
            out_splits[num_updates:], shards, _paths(state, is_leaf=_is_shard)
        ):
            if isinstance(split, _Split) and not _is_shard(old):
                raise ValueError(
                    f"optimizer state{path} is whole on every replica but its update depends "
                    "on blocks of the gradients; ts.shard_update cannot keep it exact"
                )
        new_updates = _map_blocks(_gather_block, new_updates, splits, ctx)
        new_state = jax.tree.map(
            lambda old, new: ReplicaShard(new, old.shape, old.axis) if _is_shard(old) else new,
            state,
            new_local,
            is_leaf=_is_shard,
        )
        return new_updates, _mark_per_replica(new_state, ctx)

    return ShardedUpdate(init, update)


def reshard_update_state(state: PyTree, strategy: Strategy) -> PyTree:
    """Moves a sharded optimizer state onto ``strategy``'s replicas, whatever count it had.

    Each ``ReplicaShard`` is reassembled (padding dropped), re-cut for the new replica count and
    placed one block per replica; other leaves are copied to every device of ``strategy``. Use
    it after restoring a checkpoint written with a different number of replicas. The whole
    state passes through this process's memory once, so call it in a single-process job.

    Args:
      state: the state ``ts.shard_update(tx).init`` returned through ``run`` (or restored).
      strategy: the ``ts.TPUStrategy`` that will run the next steps.

    Returns:
      The same state, laid out for ``strategy.num_replicas_in_sync`` replicas.

    Example:
      >>> shard = ReplicaShard(ts.PerReplica([np.arange(2.0) + 2 * i for i in range(4)]), (7,), 0)
      >>> moved = reshard_update_state({"mu": shard}, ts.TPUStrategy())
      >>> moved["mu"], np.asarray(moved["mu"].blocks.stacked)[:, 0]
      (ReplicaShard(PerReplica(float32[8, 1]), shape=(7,), axis=0), array([0., 1., 2., 3., 4., 5., 6., 0.], dtype=float32))
    """  # noqa: E501
    num_replicas = strategy.num_replicas_in_sync
    per_replica = jax.sharding.NamedSharding(strategy.mesh, jax.sharding.PartitionSpec("replica"))
    replicated = jax.sharding.NamedSharding(strategy.mesh, jax.sharding.PartitionSpec())

    def move(node):
        if _is_shard(node):
            whole = _assemble(node)
            blocks = _cut(whole, node.axis, num_replicas)
            return ReplicaShard(
                PerReplica.from_stacked(jax.device_put(blocks, per_replica)), node.shape, node.axis
            )
        if isinstance(node, PerReplica):
            raise ValueError(
                f"the state holds a PerReplica leaf {node!r} outside a ReplicaShard; "
                "reshard_update_state moves states made by ts.shard_update only"
            )
        value = node.value if isinstance(node, Mirrored) else node
        return jax.tree.map(lambda x: jax.device_put(x, replicated), value)

    return jax.tree.map(move, state, is_leaf=lambda x: _is_shard(x) or is_distributed(x))


# ---------------------------------------------------------------------------------------------
# Layout: which axis of a leaf is cut, and the collectives that cut and join it.


class _Split(NamedTuple):
    """A value is this replica's block of a whole value cut along ``axis`` of length ``size``."""

    axis: int
    size: int


def _layout(shape: tuple[int, ...], num_replicas: int) -> _Split | None:
    if num_replicas == 1 or all(d == 1 for d in shape):
        return None  # scalars and one-element leaves stay whole
    for axis, d in enumerate(shape):
        if d % num_replicas == 0:
            return _Split(axis, d)
    axis = int(np.argmax(shape))
    return _Split(axis, shape[axis])


def _splits(tree: PyTree, num_replicas: int) -> list[_Split | None]:
    """The layout of each leaf of ``tree``, in flattening order."""
    return [_layout(np.shape(x), num_replicas) for x in jax.tree.leaves(tree)]


def _map_blocks(
    fn: Callable[[jax.Array, _Split | None, ReplicaContext], jax.Array],
    tree: PyTree,
    splits: list[_Split | None],
    ctx: ReplicaContext,
) -> PyTree:
    """``fn(leaf, split, ctx)`` for each leaf of ``tree`` and its split."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([fn(x, split, ctx) for x, split in zip(leaves, splits)])


def _block_length(size: int, num_replicas: int) -> int:
    return -(-size // num_replicas)


def _pad_widths(ndim: int, split: _Split, num_replicas: int) -> list[tuple[int, int]]:
    """Zero padding at the end of the cut axis, up to a multiple of ``num_replicas``."""
    widths = [(0, 0)] * ndim
    widths[split.axis] = (0, _block_length(split.size, num_replicas) * num_replicas - split.size)
    return widths


def _pad(x: jax.Array, split: _Split, num_replicas: int) -> jax.Array:
    widths = _pad_widths(x.ndim, split, num_replicas)
    return jnp.pad(x, widths) if widths[split.axis][1] else x


def _own_block(x: jax.Array, split: _Split | None, ctx: ReplicaContext) -> jax.Array:
    """This replica's block of a whole (replicated) leaf."""
    x = jnp.asarray(x)
    if split is None:
        return x
    n = ctx.num_replicas_in_sync
    length = _block_length(split.size, n)
    start = ctx.replica_id_in_sync_group * length
    return lax.dynamic_slice_in_dim(_pad(x, split, n), start, length, split.axis)


def _reduce_block(x: jax.Array, split: _Split | None, ctx: ReplicaContext) -> jax.Array:
    """This replica's block of the mean over replicas of a local gradient."""
    x = jnp.asarray(x)
    if split is None:
        return ctx.all_reduce("mean", x)
    return ctx.reduce_scatter("mean", _pad(x, split, ctx.num_replicas_in_sync), split.axis)


def _gather_block(x: jax.Array, split: _Split | None, ctx: ReplicaContext) -> jax.Array:
    """The whole leaf from every replica's block, padding dropped."""
    if split is None:
        return x
    return lax.slice_in_dim(ctx.all_gather(x, split.axis), 0, split.size, axis=split.axis)


def _wrap_leaf(local: jax.Array, whole: jax.ShapeDtypeStruct, num_replicas: int) -> Any:
    """A state leaf from ``init`` as a ReplicaShard when it is a block of the whole leaf."""
    if np.shape(local) == whole.shape:
        return local
    differ = [a for a, (b, w) in enumerate(zip(np.shape(local), whole.shape)) if b != w]
    if (
        len(np.shape(local)) != len(whole.shape)
        or len(differ) != 1
        or np.shape(local)[differ[0]] != _block_length(whole.shape[differ[0]], num_replicas)
    ):
        raise ValueError(
            f"an optimizer state leaf has shape {np.shape(local)} when the transformation is "
            f"initialised with parameter blocks but {whole.shape} with whole parameters; "
            "ts.shard_update can only split state that mirrors the parameters' shapes"
        )
    return ReplicaShard(local, whole.shape, differ[0])


def _mark_per_replica(state: PyTree, ctx: ReplicaContext) -> PyTree:
    """Makes every ReplicaShard's block come out of ``run`` as a PerReplica.

    A block that does not depend on the replica (the zeros ``init`` makes) would otherwise be
    proven the same on every replica and returned whole. Selecting between the block and
    itself on the replica index marks it as varying for that proof; XLA folds the select away.
    """

    def mark(node):
        if not _is_shard(node):
            return node
        block = jnp.asarray(node.blocks)
        first = jnp.broadcast_to(ctx.replica_id_in_sync_group >= 0, block.shape)
        return ReplicaShard(lax.select(first, block, block), node.shape, node.axis)

    return jax.tree.map(mark, state, is_leaf=_is_shard)


def _assemble(shard: ReplicaShard) -> np.ndarray:
    """The whole leaf of a ReplicaShard held as a PerReplica, on the host."""
    stacked = shard.blocks.stacked if isinstance(shard.blocks, PerReplica) else shard.blocks
    stacked = np.asarray(jax.device_get(stacked))
    joined = np.concatenate(list(stacked), axis=shard.axis)
    return np.take(joined, np.arange(shard.shape[shard.axis]), axis=shard.axis)


def _cut(whole: np.ndarray, axis: int, num_replicas: int) -> np.ndarray:
    """``whole`` padded along ``axis`` and cut into blocks stacked on a new leading axis."""
    padded = np.pad(whole, _pad_widths(whole.ndim, _Split(axis, whole.shape[axis]), num_replicas))
    return np.stack(np.split(padded, num_replicas, axis=axis))


def _is_shard(x: Any) -> bool:
    return isinstance(x, ReplicaShard)


def _unwrap(x: Any) -> Any:
    return x.blocks if _is_shard(x) else x


def _paths(tree: PyTree, is_leaf: Callable[[Any], bool]) -> list[str]:
    return [
        jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    ]


def _replica_context(what: str) -> ReplicaContext:
    ctx = get_replica_context()
    if ctx is None:
        raise RuntimeError(
            f"ts.shard_update(...).{what} was called outside strategy.run; call it inside the "
            "step function you pass to strategy.run (it runs collectives over the replicas)"
        )
    return ctx


# ---------------------------------------------------------------------------------------------
# The block-wise interpreter.

_ELEMENTWISE = frozenset(
    {"abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt",
     "ceil", "clamp", "conj", "convert_element_type", "copy", "copy_p", "cos", "cosh", "digamma",
     "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "imag",
     "integer_pow", "is_finite", "le", "lgamma", "log", "log1p", "logistic", "lt", "max", "min",
     "mul", "ne", "neg", "nextafter", "not", "or", "pow", "real", "reduce_precision", "rem",
     "round", "rsqrt", "select_n", "sign", "sin", "sinh", "sqrt", "square", "stop_gradient", "sub",
     "tan", "tanh", "xor"}
)  # fmt: skip
# reduction -> (the value padding must hold, the collective that completes it)
_REDUCTIONS = {
    "reduce_sum": (0, "sum"),
    "reduce_max": (-np.inf, "max"),
    "reduce_min": (np.inf, "min"),
    "reduce_or": (False, "max"),
    "reduce_and": (True, "min"),
}
# Primitives whose result depends on each element's position: on a block, they differ from the
# same positions of the whole leaf.
_POSITION_SOURCES = frozenset({"iota", "random_bits", "threefry2x32", "rng_bit_generator"})


class _Positional:
    """Marks a whole value computed from element positions (``jnp.arange``, random numbers)."""

    def __repr__(self) -> str:
        return "_POSITIONAL"


_POSITIONAL = _Positional()
_INLINED = frozenset(
    {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call",
     "custom_vjp_call", "custom_vjp_call_jaxpr"}
)  # fmt: skip


def _interpret(
    fn: Callable[..., Any],
    args: tuple,
    splits: list[_Split | None],
    ctx: ReplicaContext,
    kwargs: dict | None = None,
) -> tuple[PyTree, list[_Split | None]]:
    """Runs ``fn(*args, **kwargs)`` on blocks; ``splits`` says which flat leaves are blocks.

    Returns the outputs and, for each output leaf, its ``_Split`` (None when it is whole).
    """
    kwargs = kwargs or {}
    leaves, tree = jax.tree.flatten((args, kwargs))
    if len(splits) != len(leaves):
        raise AssertionError(f"{len(splits)} splits for {len(leaves)} leaves")

    def flat(*xs):
        a, k = tree.unflatten(xs)
        return fn(*a, **k)

    closed, shapes = jax.make_jaxpr(flat, return_shape=True)(*leaves)
    outs, out_splits = _eval(closed.jaxpr, closed.consts, leaves, splits, ctx)
    return jax.tree.unflatten(jax.tree.structure(shapes), outs), out_splits


def _eval(jaxpr: Jaxpr, consts, args, splits, ctx: ReplicaContext):
    values, where = {}, {}
    # Outputs of a reduction over a cut axis: the element count the block contributed.
    block_counts: dict[Any, int] = {}

    def read(atom):
        if isinstance(atom, Literal):
            return atom.val, None
        return values[atom], where.get(atom)

    for var, value in zip(jaxpr.constvars, consts):
        values[var] = value
    for var, value, split in zip(jaxpr.invars, args, splits):
        values[var], where[var] = value, split
    for eqn in jaxpr.eqns:
        ins, in_splits = zip(*map(read, eqn.invars)) if eqn.invars else ((), ())
        if eqn.primitive.name == "div" and block_counts.get(_var(eqn.invars[0])):
            divisor = eqn.invars[1]
            if isinstance(divisor, Literal) and np.all(divisor.val == block_counts[eqn.invars[0]]):
                raise ValueError(
                    "the transformation takes a mean over the axis ts.shard_update cuts "
                    "(a sum divided by the block's element count); a mean over blocks would be "
                    "wrong, so this transformation cannot be sharded"
                )
        outs, out_splits = _equation(eqn, list(ins), list(in_splits), ctx)
        total = eqn.primitive.name == "reduce_sum" and isinstance(in_splits[0], _Split)
        if total and out_splits[0] is None:
            shape = np.shape(ins[0])
            block_counts[eqn.outvars[0]] = int(np.prod([shape[a] for a in eqn.params["axes"]]))
        for var, value, split in zip(eqn.outvars, outs, out_splits):
            values[var], where[var] = value, split
    results = [read(v) for v in jaxpr.outvars]
    return [r[0] for r in results], [r[1] for r in results]


def _var(atom) -> Any:
    """A jaxpr variable as a dict key; None for a literal (literals are not hashable)."""
    return None if isinstance(atom, Literal) else atom


def _bind(eqn, ins):
    params = eqn.primitive.get_bind_params(eqn.params)
    # jax < 0.8 returns (subfuns, params); later versions fold the subfuns into the params.
    subfuns, params = params if isinstance(params, tuple) else ((), params)
    out = eqn.primitive.bind(*subfuns, *ins, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _equation(eqn, ins, splits, ctx: ReplicaContext):
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    cut = [s for s in splits if isinstance(s, _Split)]
    positional = any(s is _POSITIONAL for s in splits)
    if not cut:
        positional = positional or _reads_positions(eqn)
        return _bind(eqn, ins), [_POSITIONAL if positional else None] * n_out
    if positional:
        raise _unsupported(
            name,
            "combines blocks with values computed from element positions (jnp.arange, random "
            "numbers), which a block does not share with the whole leaf",
        )
    if name in _ELEMENTWISE:
        if len({s.axis for s in cut}) > 1:
            raise _unsupported(name, "combines blocks cut along different axes")
        return _bind(eqn, ins), [cut[0]] * n_out
    if name in _REDUCTIONS:
        return _reduce(eqn, ins[0], splits[0], ctx)
    if name == "dot_general":
        return _contract(eqn, ins, splits, ctx)
    (split,) = splits if len(splits) == 1 else (None,)
    if name == "broadcast_in_dim" and split is not None:
        axis = eqn.params["broadcast_dimensions"][split.axis]
        if eqn.params["shape"][axis] != np.shape(ins[0])[split.axis]:
            raise _unsupported(name, "broadcasts along the cut axis")
        return _bind(eqn, ins), [_Split(axis, split.size)]
    if name == "transpose" and split is not None:
        return _bind(eqn, ins), [_Split(eqn.params["permutation"].index(split.axis), split.size)]
    if name == "squeeze" and split is not None and split.axis not in eqn.params["dimensions"]:
        axis = split.axis - sum(d < split.axis for d in eqn.params["dimensions"])
        return _bind(eqn, ins), [_Split(axis, split.size)]
    if name == "reshape" and split is not None:
        shape, new = np.shape(ins[0]), tuple(eqn.params["new_sizes"])
        if new[: split.axis + 1] == shape[: split.axis + 1]:
            return _bind(eqn, ins), [split]
        raise _unsupported(name, f"reshapes {shape} to {new} across the cut axis {split.axis}")
    if name == "cond":
        return _cond(eqn, ins, splits, ctx)
    if name in _INLINED:
        inner = [v for v in eqn.params.values() if isinstance(v, (Jaxpr, ClosedJaxpr))]
        if len(inner) == 1:
            body = inner[0]
            consts = body.consts if isinstance(body, ClosedJaxpr) else ()
            body = body.jaxpr if isinstance(body, ClosedJaxpr) else body
            if len(body.invars) == len(ins):
                return _eval(body, consts, ins, splits, ctx)
    raise _unsupported(name, "is not known to work block by block")


def _reduce(eqn, x, split: _Split, ctx: ReplicaContext):
    axes = tuple(eqn.params["axes"])
    if split.axis not in axes:
        return _bind(eqn, [x]), [_Split(split.axis - sum(a < split.axis for a in axes), split.size)]
    fill, combine = _REDUCTIONS[eqn.primitive.name]
    if jnp.issubdtype(x.dtype, jnp.integer) and not np.isfinite(fill):
        fill = jnp.iinfo(x.dtype).min if fill < 0 else jnp.iinfo(x.dtype).max
    (local,) = _bind(eqn, [_fill_padding(x, split, ctx, fill)])
    if combine == "sum":
        return [lax.psum(local, _mesh.REPLICA_AXIS)], [None]
    as_int = local.dtype == jnp.bool_
    value = local.astype(jnp.int32) if as_int else local
    value = (lax.pmax if combine == "max" else lax.pmin)(value, _mesh.REPLICA_AXIS)
    return [value.astype(jnp.bool_) if as_int else value], [None]


def _contract(eqn, ins, splits, ctx: ReplicaContext):
    """A dot_general that contracts both operands over their cut axes (``jnp.vdot``, say)."""
    (lhs_contracting, rhs_contracting), _ = eqn.params["dimension_numbers"]
    lhs, rhs = splits
    if (
        lhs is None
        or rhs is None
        or lhs.axis not in lhs_contracting
        or rhs.axis != rhs_contracting[list(lhs_contracting).index(lhs.axis)]
    ):
        raise _unsupported("dot_general", "does not contract both operands over the cut axis")
    x, y = ins
    (local,) = _bind(eqn, [_fill_padding(x, lhs, ctx, 0), y])
    return [lax.psum(local, _mesh.REPLICA_AXIS)], [None]


def _cond(eqn, ins, splits, ctx: ReplicaContext):
    if splits[0] is not None:
        raise _unsupported("cond", "branches on a value computed from blocks")
    branch_splits: list[list[_Split | None]] = []

    def branch(closed):
        def run(*operands):
            outs, out_splits = _eval(closed.jaxpr, closed.consts, operands, splits[1:], ctx)
            branch_splits.append(out_splits)
            return outs

        return run

    outs = lax.switch(ins[0], [branch(b) for b in eqn.params["branches"]], *ins[1:])
    merged = []
    for column in zip(*branch_splits):
        cut = {s for s in column if isinstance(s, _Split)}
        if len({s.axis for s in cut}) > 1 or (cut and _POSITIONAL in column):
            raise _unsupported("cond", "returns blocks and whole values of different kinds")
        merged.append(next(iter(cut), _POSITIONAL if _POSITIONAL in column else None))
    return list(outs), merged


def _reads_positions(eqn) -> bool:
    """Whether ``eqn``, or any jaxpr inside it, uses a primitive of ``_POSITION_SOURCES``."""
    if eqn.primitive.name in _POSITION_SOURCES:
        return True
    for value in eqn.params.values():
        for inner in value if isinstance(value, tuple) else (value,):
            if isinstance(inner, (Jaxpr, ClosedJaxpr)):
                body = inner.jaxpr if isinstance(inner, ClosedJaxpr) else inner
                if any(_reads_positions(e) for e in body.eqns):
                    return True
    return False


def _fill_padding(x: jax.Array, split: _Split, ctx: ReplicaContext, fill: Any) -> jax.Array:
    """``x`` with the padding past the whole leaf's end set to ``fill``."""
    length = np.shape(x)[split.axis]
    position = ctx.replica_id_in_sync_group * length + lax.broadcasted_iota(
        jnp.int32, np.shape(x), split.axis
    )
    return jnp.where(position < split.size, x, jnp.asarray(fill, x.dtype))


def _unsupported(primitive: str, why: str) -> ValueError:
    return ValueError(
        f"ts.shard_update cannot split this transformation over replicas: its {primitive!r} "
        f"{why}, which would change the result. Use the transformation without "
        "ts.shard_update, or express the step with elementwise operations and full reductions"
    )
