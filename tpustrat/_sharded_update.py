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

Exactness. The wrapped transformation's ``init`` and ``update`` are traced to a jaxpr on the
WHOLE leaves' shapes, so every count, shape and constant they read (``x.size``, the divisor of
``jnp.mean`` or ``jnp.std``, a mask built from ``x.shape``, ``jnp.arange``, random noise) is
the whole leaf's, as plain optax sees it. A small interpreter then replays the jaxpr, knowing
which values are blocks of a leaf and along which axis. An equation of whole values runs as
traced. Elementwise primitives run on the blocks, a whole operand cut to the same block; a
reduction over the cut axis (``jnp.sum``, ``max``, ``min``, ``all``, ``any``: a global norm, a
mean, a variance, a finite check), or a contraction over it, masks the padding and is completed
across replicas with psum, pmax or pmin, so ``clip_by_global_norm`` sees the global norm and
``optax.centralize`` the whole leaf's mean. A block flattened across the cut axis (as
``jnp.vdot`` and ``optax.tree.vdot`` flatten) may be multiplied by one flattened alike and
summed whole, nothing else. Any other equation that takes a block (a cumulative sum, a sort, a
reshape across the cut axis, a primitive it does not know) raises a ValueError
naming the primitive, the code of the transformation that made it and the leaf, and saying to
use plain optax for it: the analysis fails closed rather than train on a wrong update. It reads
jaxprs through ``_jaxpr``, keyed on JAX's primitive objects.

Sharded parameters. A parameter that is a ``ReplicaShard`` (``ts.shard_params``) keeps its
own cut, and its gradient arrives as a block already reduced over the replicas; its update
stays a block. ``init`` outside ``run`` with such parameters replays the transformation under
``jax.vmap`` over the replicas' blocks, so ``nnx.Optimizer`` gets a state cut the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Self

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Jaxpr, JaxprEqn

from tpustrat import _jaxpr, _mesh, _nnx
from tpustrat._checks import check_int, check_leaf, check_tree, describe
from tpustrat._context import ReduceOp, ReplicaContext, Strategy, get_replica_context
from tpustrat._jaxpr import primitives as prim
from tpustrat._types import PyTree
from tpustrat._values import Mirrored, PerReplica, is_distributed


@jax.tree_util.register_pytree_with_keys_class
class ReplicaShard:
    """A leaf split over the replicas: every replica holds one block of it.

    The leaves of ``ts.shard_params``'s parameters and of ``ts.shard_update``'s optimizer
    state are ReplicaShards.

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

    def __init__(self, blocks: Any, shape: Sequence[int], axis: int) -> None:
        if not isinstance(blocks, PerReplica):  # a block inside run, or a placeholder of JAX's
            check_leaf("ReplicaShard blocks", blocks)
        if not isinstance(shape, (tuple, list)):
            raise TypeError(
                f"ReplicaShard shape must be a tuple of ints (the whole leaf's shape), got "
                f"{describe(shape)}"
            )
        dims = tuple(
            check_int(f"ReplicaShard shape[{i}]", d, minimum=0) for i, d in enumerate(shape)
        )
        axis = check_int("ReplicaShard axis", axis, minimum=0)
        if axis >= len(dims):
            raise ValueError(
                f"ReplicaShard axis {axis} is out of range for shape {dims}; pass the axis the "
                f"leaf is cut along, in [0, {len(dims)})"
            )
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "shape", dims)
        object.__setattr__(self, "axis", axis)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ReplicaShard is immutable; make a new one instead of setting {name}")

    def tree_flatten_with_keys(
        self,
    ) -> tuple[tuple[tuple[jax.tree_util.GetAttrKey, Any]], tuple[tuple[int, ...], int]]:
        return ((jax.tree_util.GetAttrKey("blocks"), self.blocks),), (self.shape, self.axis)

    @classmethod
    def tree_unflatten(cls, aux: tuple[tuple[int, ...], int], children: Sequence[Any]) -> Self:
        value = object.__new__(cls)  # JAX unflattens with any leaf (None, specs): no checks
        for name, field in zip(("blocks", "shape", "axis"), (children[0], *aux)):
            object.__setattr__(value, name, field)
        return value

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


def shard_update(tx: Any, reduce_op: ReduceOp | str = ReduceOp.MEAN) -> ShardedUpdate:
    """Shards the weight update of an optax GradientTransformation over the replicas.

    Call ``init`` and ``update`` inside ``strategy.run``, giving ``update`` the replica's own
    gradients (not all-reduced: the update reduce-scatters them itself, combining them with
    ``reduce_op``). MEAN fits a loss that is the replica's mean (pmap's ``loss.mean()``), SUM
    a loss that is the replica's share of the global mean (``ts.compute_average_loss``, or
    tf.distribute's ``loss.sum() / global_batch``): pass the one that matches the loss, as the
    all-reduce a plain optimizer would take. Each replica keeps and
    updates only its block of the optimizer state; the updates come back whole and identical
    on every replica. The state ``run`` returns holds ``ts.ReplicaShard`` leaves over
    ``ts.PerReplica`` blocks; pass it back to ``run`` as it is, checkpoint it like any pytree of
    arrays, and move it to another replica count with ``ts.reshard_update_state``.

    Parameters sharded by ``ts.shard_params`` are taken as they are: their gradients are
    blocks already summed over the replicas (the reduce-scatter that is the gradient of the
    gather), which ``update`` divides by the number of replicas for ``"mean"``; their updates
    come back as blocks, and their state is cut like them, inside ``run`` or out of it.

    ``init`` called outside ``run`` on whole parameters (as ``nnx.Optimizer(model,
    ts.shard_update(tx), wrt=nnx.Param)`` calls it) gives the plain optax state, whole.
    ``update`` in ``run`` keeps a whole state leaf whole: it updates its block like any other
    and all-gathers the result, so the update is still sharded and exact, but such a leaf is
    not split in memory. For the
    1/R state memory, make the state inside ``run`` (``strategy.run(tx.init, args=(params,))``)
    and keep it as a pytree, with ``nnx.split``/``nnx.merge`` for an NNX model.

    Args:
      tx: any object with optax's ``init(params)`` and ``update(updates, state, params)``,
        e.g. ``optax.adamw(1e-3)`` or a chain with ``optax.clip_by_global_norm``.
      reduce_op: how the replicas' gradients combine: ``"mean"`` (the default) or ``"sum"``.

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
            f"shard_update takes an optax GradientTransformation as tx (an object with init and "
            f"update), got {describe(tx)}; e.g. ts.shard_update(optax.adam(1e-3))"
        )
    op = ReduceOp.parse(reduce_op)
    if op not in (ReduceOp.MEAN, ReduceOp.SUM):
        raise ValueError(
            f"shard_update reduce_op must be 'mean' or 'sum' (how the replicas' gradients "
            f"combine), got {op.value!r}"
        )

    def init(params: PyTree) -> PyTree:
        ctx = get_replica_context()
        if ctx is not None:
            return _init(tx, params, ctx)
        if any(map(_is_shard, jax.tree.leaves(params, is_leaf=_is_shard))):
            return _init_outside_run(tx, params)
        return tx.init(params)  # as nnx.Optimizer calls it: the plain state, whole

    def update(
        updates: PyTree, state: PyTree, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, PyTree]:
        ctx = _replica_context("update")
        num_replicas = ctx.num_replicas_in_sync
        local_updates, splits, sharded, update_shards = _local(updates, num_replicas, "updates")
        grads = jax.tree.unflatten(
            jax.tree.structure(local_updates),
            [
                _reduced_block(op, x, ctx) if is_block else _reduce_block(op, x, split, ctx)
                for x, split, is_block in zip(jax.tree.leaves(local_updates), splits, sharded)
            ],
        )
        param_blocks, param_splits = None, []
        if params is not None:
            local_params, param_splits, param_sharded, _ = _local(params, num_replicas, "params")
            if param_sharded != sharded:
                raise ValueError(
                    "ts.shard_update got parameters and gradients of which one is sharded "
                    "(ts.shard_params) and the other whole; pass the gradients with respect to "
                    "the sharded parameters as jax.grad gives them, and the parameters as they are"
                )
            param_blocks = _blocks(local_params, param_splits, param_sharded, ctx)
        shards, state_tree = jax.tree.flatten(state, is_leaf=_is_shard)
        state_paths = _paths(state, is_leaf=_is_shard)
        state_local = state_tree.unflatten([_unwrap(x) for x in shards])
        state_splits = [
            _Split(x.axis, x.shape[x.axis], "state" + path) if _is_shard(x) else None
            for x, path in zip(shards, state_paths)
        ]
        extra_splits = [None] * len(jax.tree.leaves(extra_args))
        (new_updates, new_local), out_splits, _ = _interpret_with_replica_axis(
            lambda *a, **k: tx.update(*a, **k),
            (grads, state_local, param_blocks),
            [*splits, *state_splits, *param_splits, *extra_splits],
            ctx,
            extra_args,
        )
        num_updates = len(jax.tree.leaves(new_updates))
        update_leaves: list[Any] = []
        for x, out, split, shard in zip(
            jax.tree.leaves(new_updates), out_splits[:num_updates], splits, update_shards
        ):
            if shard is None:  # a whole parameter: its update comes back whole
                update_leaves.append(_whole_update(x, out, ctx))
            else:  # a sharded parameter (ts.shard_params): its update stays a block
                block = _keep_block(x, out, split, split.leaf, ctx)
                update_leaves.append(ReplicaShard(block, shard.shape, shard.axis))
        new_updates = _mark_per_replica(
            jax.tree.structure(updates, is_leaf=_is_shard).unflatten(update_leaves)
        )
        new_leaves = []
        for new, split, old, path in zip(
            jax.tree.leaves(new_local), out_splits[num_updates:], shards, state_paths
        ):
            if not _is_shard(old):  # whole on every replica: it stays whole
                new_leaves.append(new if split is None else _gather_block(new, split, ctx))
                continue
            block = _keep_block(
                new, split, _Split(old.axis, old.shape[old.axis]), "state" + path, ctx
            )
            new_leaves.append(ReplicaShard(block, old.shape, old.axis))
        return new_updates, _mark_per_replica(state_tree.unflatten(new_leaves))

    return ShardedUpdate(init, update)


def _init(tx: Any, params: PyTree, ctx: Any) -> PyTree:
    """``tx.init`` on this replica's blocks: the state with ReplicaShard leaves."""
    num_replicas = ctx.num_replicas_in_sync
    local, splits, sharded, _ = _local(params, num_replicas, "params")
    blocks = _blocks(local, splits, sharded, ctx)
    state_local, out_splits, shapes = _interpret(tx.init, (blocks,), splits, ctx)
    # state that mirrors a parameter is cut as that parameter is
    param_layouts: dict[tuple[int, ...], _Split | None] = {}
    for x, split in zip(jax.tree.leaves(local), splits):
        param_layouts.setdefault(_whole_aval(x, split).shape, split)
    leaves, treedef = jax.tree.flatten(state_local)
    state = []
    for leaf, split, shape in zip(leaves, out_splits, shapes):
        if split is None and shape in param_layouts:
            split = param_layouts[shape]
            leaf = leaf if split is None else _own_block(leaf, split, ctx)
        state.append(leaf if split is None else ReplicaShard(leaf, shape, split.axis))
    return _mark_per_replica(treedef.unflatten(state))


class _VmappedReplicas:
    """What ``_init`` reads of a ReplicaContext, for replicas simulated by ``jax.vmap``
    over the blocks' leading axis (named ``REPLICA_AXIS``, so the collectives apply)."""

    def __init__(self, num_replicas: int):
        self.num_replicas_in_sync = num_replicas

    @property
    def replica_id_in_sync_group(self) -> jax.Array:
        return lax.axis_index(_mesh.REPLICA_AXIS)


def _init_outside_run(tx: Any, params: PyTree) -> PyTree:
    """``tx.init`` of sharded parameters (``ts.shard_params``) outside ``run``, as
    ``nnx.Optimizer`` calls it: the state sharded as it would be inside ``run``."""
    nnx: Any = _nnx.nnx_module()
    is_variable = (lambda x: isinstance(x, nnx.Variable)) if nnx else (lambda x: False)
    from_nnx = any(map(is_variable, jax.tree.leaves(params, is_leaf=is_variable)))
    if from_nnx:  # nnx.Optimizer's call, on the model's Variables: init their values
        params = (getattr(nnx, "as_pure", None) or nnx.pure)(params)  # nnx.pure on flax 0.12.6
    leaves, treedef = jax.tree.flatten(params, is_leaf=_is_shard)
    stacks = [x.blocks.stacked for x in leaves if _is_shard(x) and isinstance(x.blocks, PerReplica)]
    if len(stacks) != sum(map(_is_shard, leaves)):
        raise ValueError(
            "ts.shard_update(...).init got a ReplicaShard parameter whose blocks are not a "
            "ts.PerReplica; pass the parameters ts.shard_params returned"
        )
    counts = {x.shape[0] for x in stacks}
    if len(counts) != 1:
        raise ValueError(
            f"ts.shard_update(...).init got parameters sharded over different replica counts "
            f"{sorted(counts)}; shard them all with one strategy (ts.shard_params)"
        )
    (num_replicas,) = counts
    sharding = stacks[0].sharding
    wholes = [x for x in leaves if not _is_shard(x)]

    def per_replica(blocks, wholes):
        blocks, wholes = iter(blocks), iter(wholes)
        tree = treedef.unflatten(
            [
                ReplicaShard(next(blocks), x.shape, x.axis) if _is_shard(x) else next(wholes)
                for x in leaves
            ]
        )
        return _init(tx, tree, _VmappedReplicas(num_replicas))

    stacked = jax.jit(jax.vmap(per_replica, in_axes=(0, None), axis_name=_mesh.REPLICA_AXIS))(
        stacks, wholes
    )
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())

    def place(node):
        if _is_shard(node):
            blocks = PerReplica.from_stacked(jax.device_put(node.blocks, sharding))
            if from_nnx:  # nnx.Optimizer makes a Variable of each leaf: the blocks, not the shard
                blocks = nnx.Variable(blocks, **{SHARD_METADATA: (node.shape, node.axis)})
            return ReplicaShard(blocks, node.shape, node.axis)
        return jax.device_put(node[0], replicated)

    return jax.tree.map(place, stacked, is_leaf=_is_shard)


# The metadata key, on the nnx Variable that holds a ReplicaShard's blocks in an nnx.Optimizer,
# of the whole leaf's (shape, axis): nnx.state keeps a Variable's metadata, not the ReplicaShard
# around it, and a checkpoint needs both to re-cut the blocks for another number of replicas.
SHARD_METADATA = "tpustrat_replica_shard"


def variable_shard(x: Any) -> tuple[tuple[int, ...], int] | None:
    """The whole (shape, axis) of the ReplicaShard whose blocks the nnx Variable ``x`` holds
    (in an ``nnx.Optimizer`` over ``ts.shard_update``); None for any other value."""
    nnx: Any = _nnx.nnx_module()
    if nnx is None or not isinstance(x, nnx.Variable):
        return None
    shard = x.get_metadata().get(SHARD_METADATA)
    if shard is None or not isinstance(x.get_raw_value(), PerReplica):
        return None
    shape, axis = shard
    return tuple(shape), axis


def _local(tree: PyTree, num_replicas: int, name: str):
    """``tree`` inside ``run`` with each ReplicaShard replaced by its block.

    Returns:
      ``(local, splits, sharded, shards)``: the tree, each leaf's split (a ReplicaShard's
      own, else the layout ``shard_update`` gives a whole leaf), whether the leaf is a block,
      and the ReplicaShard (or None) each leaf came from.
    """
    nodes = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_shard)[0]
    local, splits, sharded, shards = [], [], [], []
    for path, node in nodes:
        leaf = name + jax.tree_util.keystr(path)
        if _is_shard(node):
            block = node.blocks
            length = _block_length(node.shape[node.axis], num_replicas)
            if np.ndim(block) != len(node.shape) or np.shape(block)[node.axis] != length:
                raise ValueError(
                    f"{leaf} is a ReplicaShard of a whole {node.shape} cut along axis "
                    f"{node.axis} whose block here has shape {np.shape(block)}, not a block for "
                    f"{num_replicas} replicas; shard it for this strategy "
                    "(ts.shard_params(ts.gather_params(tree), strategy))"
                )
            local.append(block)
            splits.append(_Split(node.axis, node.shape[node.axis], leaf))
        else:
            local.append(node)
            split = _layout(np.shape(node), num_replicas)
            splits.append(split and split._replace(leaf=leaf))
        sharded.append(_is_shard(node))
        shards.append(node if _is_shard(node) else None)
    treedef = jax.tree.structure(tree, is_leaf=_is_shard)
    return treedef.unflatten(local), splits, sharded, shards


def _blocks(local: PyTree, splits: list, sharded: list[bool], ctx: Any) -> PyTree:
    """This replica's block of each leaf of ``local``; a leaf that is a block already stays."""
    leaves, treedef = jax.tree.flatten(local)
    return treedef.unflatten(
        [
            x if is_block else _own_block(x, split, ctx)
            for x, split, is_block in zip(leaves, splits, sharded)
        ]
    )


def _reduced_block(op: ReduceOp, x: jax.Array, ctx: ReplicaContext) -> jax.Array:
    """The gradient of a sharded parameter's block, already summed over the replicas by the
    reduce-scatter that is the gather's gradient: divided by the replicas for MEAN."""
    return x / ctx.num_replicas_in_sync if op is ReduceOp.MEAN else x


def _keep_block(x: jax.Array, have: _Split | None, want: _Split, leaf: str, ctx) -> jax.Array:
    """An output that must be this replica's block along ``want``: cut if whole."""
    if have is None:  # a whole value (a reset to zeros, say): keep this replica's block
        return _own_block(x, want, ctx)
    if have.axis != want.axis:
        raise ValueError(
            f"{leaf} is cut along axis {want.axis} but its update is a block cut along axis "
            f"{have.axis}; ts.shard_update cannot keep it exact. Use plain optax for this "
            "transformation"
        )
    return x


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
    if not isinstance(getattr(strategy, "mesh", None), jax.sharding.Mesh):
        raise TypeError(
            f"reshard_update_state strategy must be a ts.TPUStrategy, got {describe(strategy)}; "
            "pass the strategy that will run the next steps"
        )
    check_tree("state", state, opaque=lambda x: _is_shard(x) or is_distributed(x))
    num_replicas = strategy.num_replicas_in_sync
    per_replica = _mesh.per_replica_sharding(strategy.mesh)
    replicated = _mesh.replicated_sharding(strategy.mesh)

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
    """A value is this replica's block of a whole value cut along ``axis`` of length ``size``.

    ``leaf`` names the leaf the block comes from (``updates['w']``), for error messages.
    """

    axis: int
    size: int
    leaf: str = ""


class _Raveled(NamedTuple):
    """A value is this replica's block of a leaf of ``shape`` cut along ``axis`` of length
    ``size``, flattened to one axis with its padding zeroed (as ``jnp.vdot`` flattens).

    Its elements are in block order, not the whole leaf's, so it is only multiplied by a value
    flattened the same way and then summed whole (``psum``): a dot product, never more.
    """

    axis: int
    size: int
    shape: tuple[int, ...]
    leaf: str = ""


def _layout(shape: tuple[int, ...], num_replicas: int) -> _Split | None:
    if num_replicas == 1 or all(d == 1 for d in shape):
        return None  # scalars and one-element leaves stay whole
    for axis, d in enumerate(shape):
        if d % num_replicas == 0:
            return _Split(axis, d)
    axis = int(np.argmax(shape))
    return _Split(axis, shape[axis])


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


def _reduce_block(
    op: ReduceOp, x: jax.Array, split: _Split | None, ctx: ReplicaContext
) -> jax.Array:
    """This replica's block of the mean (or sum) over replicas of a local gradient."""
    x = jnp.asarray(x)
    if split is None:
        return ctx.all_reduce(op, x)
    return ctx.reduce_scatter(op, _pad(x, split, ctx.num_replicas_in_sync), split.axis)


def _gather_block(x: jax.Array, split: _Split | None, ctx: ReplicaContext) -> jax.Array:
    """The whole leaf from every replica's block, padding dropped."""
    if split is None:
        return x
    return lax.slice_in_dim(ctx.all_gather(x, split.axis), 0, split.size, axis=split.axis)


def _whole_update(x: jax.Array, split: _Split | None, ctx: ReplicaContext) -> jax.Array:
    """An update leaf, whole and provably the same on every replica.

    A block is all-gathered. A whole leaf that has a layout is cut and all-gathered too: it
    is the same on every replica already, but ``run`` proves that only through collectives
    it knows, and the gather moves the bytes the all-reduce of plain data parallelism would.
    """
    if split is None:
        split = _layout(np.shape(x), ctx.num_replicas_in_sync)
        x = _own_block(x, split, ctx)
    return _gather_block(x, split, ctx)


def _mark_per_replica(state: PyTree) -> PyTree:
    """Makes every ReplicaShard's block come out of ``run`` as a PerReplica.

    A block that does not depend on the replica (the zeros ``init`` makes) would otherwise be
    proven the same on every replica and returned whole; the marker of varying values
    (``_jaxpr.mark_varying``) says it is not.
    """

    def mark(node):
        if not _is_shard(node):
            return node
        block = _jaxpr.mark_varying(jnp.asarray(node.blocks), (_mesh.REPLICA_AXIS,))
        return ReplicaShard(block, node.shape, node.axis)

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


# The block-wise interpreter.

_ELEMENTWISE = frozenset(
    {
        prim.abs_p, prim.acos_p, prim.acosh_p, prim.add_p, prim.and_p, prim.asin_p,
        prim.asinh_p, prim.atan_p, prim.atan2_p, prim.atanh_p, prim.bessel_i0e_p,
        prim.bessel_i1e_p, prim.cbrt_p, prim.ceil_p, prim.clamp_p, prim.clz_p, prim.complex_p,
        prim.conj_p, prim.convert_element_type_p, prim.copy_p, prim.cos_p, prim.cosh_p,
        prim.digamma_p, prim.div_p, prim.eq_p, prim.erf_p, prim.erf_inv_p, prim.erfc_p,
        prim.exp_p, prim.exp2_p, prim.expm1_p, prim.floor_p, prim.ge_p, prim.gt_p,
        prim.igamma_p, prim.igammac_p, prim.imag_p, prim.integer_pow_p, prim.is_finite_p,
        prim.le_p, prim.lgamma_p, prim.log_p, prim.log1p_p, prim.logistic_p, prim.lt_p,
        prim.max_p, prim.min_p, prim.mul_p, prim.ne_p, prim.neg_p, prim.nextafter_p,
        prim.not_p, prim.or_p, prim.polygamma_p, prim.population_count_p, prim.pow_p,
        prim.real_p, prim.reduce_precision_p, prim.rem_p, prim.round_p, prim.rsqrt_p,
        prim.select_n_p, prim.shift_left_p, prim.shift_right_arithmetic_p,
        prim.shift_right_logical_p, prim.sign_p, prim.sin_p, prim.sinh_p, prim.sqrt_p,
        prim.square_p, prim.sub_p, prim.tan_p, prim.tanh_p, prim.xor_p, prim.zeta_p,
    }
    - {None}
)  # fmt: skip
# reduction -> (the value padding must hold, the collective that completes it)
_REDUCTIONS = {
    prim.reduce_sum_p: (0, "sum"),
    prim.reduce_max_p: (-np.inf, "max"),
    prim.reduce_min_p: (np.inf, "min"),
    prim.reduce_or_p: (False, "max"),
    prim.reduce_and_p: (True, "min"),
}
# Annotations of where a value is laid out; inside ``run`` every value is the replica's own.
_LAYOUT_ONLY = frozenset({prim.reshard_p, prim.sharding_constraint_p} - {None})


def _interpret(
    fn: Callable[..., Any],
    args: tuple,
    splits: list[_Split | None],
    ctx: ReplicaContext,
    kwargs: dict | None = None,
) -> tuple[PyTree, list[_Split | None], list[tuple[int, ...]]]:
    """Runs ``fn(*args, **kwargs)`` on blocks; ``splits`` says which flat leaves are blocks.

    ``fn`` is traced on the WHOLE leaves' shapes, so every count, shape and constant it reads
    (``x.size``, ``jnp.mean``, a mask built from ``x.shape``) is the whole leaf's; the jaxpr is
    then replayed on the blocks by ``_eval``, which refuses any equation it cannot prove exact.

    Returns:
      The outputs, each output leaf's ``_Split`` (None when it is whole), and each output
      leaf's whole shape.
    """
    kwargs = kwargs or {}
    leaves, tree = jax.tree.flatten((args, kwargs))
    if len(splits) != len(leaves):
        raise AssertionError(f"{len(splits)} splits for {len(leaves)} leaves")

    def flat(*xs):
        a, k = tree.unflatten(xs)
        return fn(*a, **k)

    closed, shapes = jax.make_jaxpr(flat, return_shape=True)(
        *[_whole_aval(x, split) for x, split in zip(leaves, splits)]
    )
    outs, out_splits = _eval(closed.jaxpr, closed.consts, leaves, splits, ctx)
    for split in out_splits:
        if isinstance(split, _Raveled):
            raise ValueError(
                f"ts.shard_update cannot run this transformation block by block: it returns "
                f"{split.leaf or 'a leaf'} flattened across the cut axis, whose elements a "
                "block does not hold in order. Use plain optax for this transformation"
            )
    whole_shapes = [tuple(s.shape) for s in jax.tree.leaves(shapes)]
    return jax.tree.unflatten(jax.tree.structure(shapes), outs), out_splits, whole_shapes


def _interpret_with_replica_axis(
    fn: Callable[..., Any],
    args: tuple,
    splits: list[_Split | None],
    ctx: ReplicaContext,
    kwargs: dict | None = None,
) -> tuple[PyTree, list[_Split | None], list[tuple[int, ...]]]:
    """``_interpret`` on the blocks in the shape ``run`` holds them: ``(1, *block)``.

    ``run`` stacks a ReplicaShard's blocks as ``(num_replicas, *block)`` and hands a step its
    replica's ``(1, *block)`` without the leading axis. The update runs under ``jax.vmap``
    over that axis put back (``block[None]``), so its arithmetic is on arrays of the stacked
    buffers' own shape and XLA folds each pair of reshapes away. Run on the blocks without the
    axis, XLA:CPU recomputes a new state block (Adam's moment) inside the fusion that writes
    the new parameter, which then reads the old block while another fusion overwrites that
    donated buffer in place, so it keeps a copy of every donated state block for the whole
    step. The values are the same either way.
    """
    leaves, tree = jax.tree.flatten((args, kwargs or {}))
    positions = [i for i, split in enumerate(splits) if split is not None]
    if not positions:
        return _interpret(fn, args, splits, ctx, kwargs)
    found = []

    def on_blocks(*blocks):
        full = list(leaves)
        for i, block in zip(positions, blocks):
            full[i] = block
        call_args, call_kwargs = tree.unflatten(full)
        outs, out_splits, shapes = _interpret(fn, call_args, splits, ctx, call_kwargs)
        out_leaves, out_tree = jax.tree.flatten(outs)
        found.append((out_tree, out_splits, shapes))
        return [jnp.asarray(x) for x in out_leaves]

    outs = jax.vmap(on_blocks)(*[jnp.asarray(leaves[i])[None] for i in positions])
    out_tree, out_splits, shapes = found[0]
    return out_tree.unflatten([x[0] for x in outs]), out_splits, shapes


def _whole_aval(x: Any, split: _Split | None) -> jax.ShapeDtypeStruct:
    """The shape and dtype of the whole leaf of which ``x`` is the block ``split`` says."""
    aval = jax.typeof(x)
    shape = list(aval.shape)
    if split is not None:
        shape[split.axis] = split.size
    return jax.ShapeDtypeStruct(tuple(shape), aval.dtype, weak_type=aval.weak_type)


def _eval(jaxpr: Jaxpr, consts, args, splits, ctx: ReplicaContext, caller: str = ""):
    """Replays ``jaxpr`` (traced on whole shapes) on ``args``, blocks where ``splits`` say.

    ``caller`` says where the call whose body ``jaxpr`` is was made, for error messages.
    """

    def equation(eqn, inputs):
        ins, in_splits = zip(*inputs) if inputs else ((), ())
        if any(s is not None for s in in_splits):
            outs, out_splits = _equation(eqn, list(ins), list(in_splits), ctx, caller)
        else:  # whole values only: the equation runs as traced, on the whole shapes
            outs, out_splits = _jaxpr.bind(eqn, ins), [None] * len(eqn.outvars)
        return list(zip(outs, out_splits))

    results = _jaxpr.walk(
        jaxpr,
        list(zip(args, splits)),
        equation,
        constants=[(value, None) for value in consts],
        literal=lambda value: (value, None),
    )
    return [r[0] for r in results], [r[1] for r in results]


def _whole_shape(atom) -> tuple[int, ...]:
    return tuple(atom.aval.shape)


def _equation(eqn: JaxprEqn, ins, splits, ctx: ReplicaContext, caller: str):
    """One equation with at least one block among its inputs."""
    primitive = eqn.primitive
    where = _source(eqn) or caller
    n_out = len(eqn.outvars)
    if primitive is prim.cond_p:
        return _cond(eqn, ins, splits, ctx, where)
    body = _jaxpr.call_body(eqn, per_device=False)
    if body is not None:
        return _eval(*body, ins, splits, ctx, where)
    if any(isinstance(s, _Raveled) for s in splits):
        return _raveled(eqn, ins, splits, where)
    if primitive in _ELEMENTWISE:
        axes = {s.axis for s in splits if isinstance(s, _Split)}
        if len(axes) > 1:
            raise _unsupported(eqn, where, splits, "combines blocks cut along different axes")
        split = next(s for s in splits if isinstance(s, _Split))
        ins = [
            x
            if s is not None
            else _cut_whole(eqn, where, splits, x, _whole_shape(atom), split, ctx)
            for x, s, atom in zip(ins, splits, eqn.invars)
        ]
        return _jaxpr.bind(eqn, ins), [split] * n_out
    if primitive in _REDUCTIONS:
        return _reduce(eqn, ins[0], splits[0], ctx)
    if primitive is prim.dot_general_p:
        return _contract(eqn, ins, splits, ctx, where)
    split = splits[0] if len(splits) == 1 else None
    if split is None:
        raise _unsupported(eqn, where, splits, "is not known to work block by block")
    x, shape = ins[0], _whole_shape(eqn.invars[0])
    length = np.shape(x)[split.axis]
    if primitive in _LAYOUT_ONLY:  # says where the value lives, not what it is
        return [x], [split]
    if primitive is prim.broadcast_in_dim_p:
        axis = eqn.params["broadcast_dimensions"][split.axis]
        new_shape = list(eqn.params["shape"])
        new_shape[axis] = length
        return _jaxpr.bind(eqn, [x], shape=tuple(new_shape)), [split._replace(axis=axis)]
    if primitive is prim.transpose_p:
        axis = eqn.params["permutation"].index(split.axis)
        return _jaxpr.bind(eqn, [x]), [split._replace(axis=axis)]
    if primitive is prim.squeeze_p:
        axis = split.axis - sum(d < split.axis for d in eqn.params["dimensions"])
        return _jaxpr.bind(eqn, [x]), [split._replace(axis=axis)]
    if primitive is prim.reshape_p and eqn.params.get("dimensions") is None:
        new = list(eqn.params["new_sizes"])
        before = int(np.prod(shape[: split.axis]))
        for axis in range(len(new)):
            if int(np.prod(new[:axis])) == before and new[axis] == split.size:
                new[axis] = length
                return _jaxpr.bind(eqn, [x], new_sizes=tuple(new)), [split._replace(axis=axis)]
        if len(new) == 1:  # flattened whole: only a dot product or a sum may follow
            flat = jnp.ravel(_fill_padding(x, split, ctx, 0))
            return [flat], [_Raveled(split.axis, split.size, shape, split.leaf)]
        raise _unsupported(
            eqn, where, splits, f"reshapes {shape} to {tuple(new)} across the cut axis {split.axis}"
        )
    raise _unsupported(eqn, where, splits, "is not known to work block by block")


# Unary or binary primitives that keep zero padding zero when every operand has it.
_ZERO_PRESERVING = frozenset(
    {prim.mul_p, prim.neg_p, prim.conj_p, prim.real_p, prim.convert_element_type_p, prim.copy_p}
)


def _raveled(eqn, ins, splits, where: str):
    """An equation on flattened blocks: a product of them, or their sum or dot product."""
    kinds = {(s.axis, s.size, s.shape) if isinstance(s, _Raveled) else s for s in splits}
    if len(kinds) == 1 and all(isinstance(s, _Raveled) for s in splits):
        primitive = eqn.primitive
        if primitive in _ZERO_PRESERVING and primitive.multiple_results is False:
            return _jaxpr.bind(eqn, ins), [splits[0]]
        total = primitive is prim.reduce_sum_p and tuple(eqn.params["axes"]) == (0,)
        if primitive is prim.dot_general_p:
            (contracting, batch) = eqn.params["dimension_numbers"]
            total = tuple(map(tuple, contracting)) == ((0,), (0,)) and not any(batch)
        if total:
            return [lax.psum(_jaxpr.bind(eqn, ins)[0], _mesh.REPLICA_AXIS)], [None]
    raise _unsupported(
        eqn, where, splits, "takes a flattened leaf other than into a product, sum or dot product"
    )


def _cut_whole(eqn, where, splits, x, shape: tuple[int, ...], split: _Split, ctx: ReplicaContext):
    """A whole operand of an elementwise equation, cut to match a block along ``split``."""
    if len(shape) == 0 or shape[split.axis] == 1:
        return x  # it broadcasts along the cut axis as it is
    if shape[split.axis] != split.size:
        raise _unsupported(
            eqn, where, splits, f"combines a block with a whole value of shape {shape}"
        )
    return _own_block(x, split, ctx)


def _reduce(eqn, x, split: _Split, ctx: ReplicaContext):
    """A reduction: along other axes on the block; over the cut axis, completed by a collective."""
    axes = tuple(eqn.params["axes"])
    if split.axis not in axes:
        axis = split.axis - sum(a < split.axis for a in axes)
        return _jaxpr.bind(eqn, [x]), [split._replace(axis=axis)]
    fill, combine = _REDUCTIONS[eqn.primitive]
    if jnp.issubdtype(x.dtype, jnp.integer) and not np.isfinite(fill):
        fill = jnp.iinfo(x.dtype).min if fill < 0 else jnp.iinfo(x.dtype).max
    (local,) = _jaxpr.bind(eqn, [_fill_padding(x, split, ctx, fill)])
    if combine == "sum":
        return [lax.psum(local, _mesh.REPLICA_AXIS)], [None]
    as_int = local.dtype == jnp.bool_
    value = local.astype(jnp.int32) if as_int else local
    value = (lax.pmax if combine == "max" else lax.pmin)(value, _mesh.REPLICA_AXIS)
    return [value.astype(jnp.bool_) if as_int else value], [None]


def _contract(eqn, ins, splits, ctx: ReplicaContext, where: str):
    """A dot_general over blocks: exact when the cut axis is contracted (completed by a psum)
    or is a free axis of one operand while the other is whole."""
    (contracting, batch) = eqn.params["dimension_numbers"]
    shapes = [_whole_shape(atom) for atom in eqn.invars]
    for side in (0, 1):
        split, other = splits[side], splits[1 - side]
        if not isinstance(split, _Split) or split.axis not in contracting[side]:
            continue
        paired = contracting[1 - side][list(contracting[side]).index(split.axis)]
        if other is None:  # cut the whole operand the same way
            other = _Split(paired, shapes[1 - side][paired], split.leaf)
            ins = list(ins)
            ins[1 - side] = _own_block(ins[1 - side], other, ctx)
        if other.axis != paired:
            break
        ins = [_fill_padding(x, s, ctx, 0) for x, s in zip(ins, (split, other)[:: 1 - 2 * side])]
        (local,) = _jaxpr.bind(eqn, ins)
        return [lax.psum(local, _mesh.REPLICA_AXIS)], [None]
    if sum(isinstance(s, _Split) for s in splits) == 1:
        side = 0 if isinstance(splits[0], _Split) else 1
        split = splits[side]
        if split.axis not in batch[side]:  # a free axis: each block gives its rows of the result
            free = [[d for d in range(len(shapes[k])) if d not in (*contracting[k], *batch[k])]
                    for k in (0, 1)]  # fmt: skip
            axis = len(batch[0]) + (len(free[0]) if side else 0) + free[side].index(split.axis)
            return _jaxpr.bind(eqn, ins), [split._replace(axis=axis)]
    raise _unsupported(eqn, where, splits, "mixes elements along the cut axis in a product")


def _cond(eqn, ins, splits, ctx: ReplicaContext, where: str):
    """A ``lax.cond``/``switch`` on a whole index, each branch replayed on the blocks."""
    if splits[0] is not None:
        raise _unsupported(eqn, where, splits, "branches on a value computed from blocks")
    branches = eqn.params["branches"]
    found: list[list[_Split | None]] = []
    for closed in branches:  # which outputs are blocks, in each branch
        jax.eval_shape(
            lambda *ops, c=closed: (
                found.append(_eval(c.jaxpr, c.consts, ops, splits[1:], ctx, where)[1]) or ()
            ),
            *ins[1:],
        )
    merged: list[_Split | None] = []
    for column in zip(*found):
        if any(isinstance(s, _Raveled) for s in column):
            raise _unsupported(eqn, where, splits, "returns a flattened leaf")
        cut = [s for s in column if isinstance(s, _Split)]
        if len({s.axis for s in cut}) > 1:
            raise _unsupported(eqn, where, splits, "returns blocks cut along different axes")
        merged.append(cut[0] if cut else None)

    def branch(closed):
        def run(*operands):
            outs, out_splits = _eval(closed.jaxpr, closed.consts, operands, splits[1:], ctx, where)
            return [
                _own_block(x, want, ctx) if want is not None and have is None else x
                for x, have, want in zip(outs, out_splits, merged)
            ]

        return run

    outs = lax.switch(ins[0], [branch(b) for b in branches], *ins[1:])
    return list(outs), merged


def _fill_padding(x: jax.Array, split: _Split, ctx: ReplicaContext, fill: Any) -> jax.Array:
    """``x`` with the padding past the whole leaf's end set to ``fill``."""
    length = np.shape(x)[split.axis]
    if length * ctx.num_replicas_in_sync == split.size:
        return x
    position = ctx.replica_id_in_sync_group * length + lax.broadcasted_iota(
        jnp.int32, np.shape(x), split.axis
    )
    return jnp.where(position < split.size, x, jnp.asarray(fill, x.dtype))


def _source(eqn) -> str:
    """Where the transformation's code made ``eqn``: its innermost frame outside JAX.

    ``contextlib`` frames are passed over too: JAX wraps some of its functions (``jnp.einsum``
    on jax 0.7) in a context-manager decorator, whose frame is not the transformation's.
    """
    try:
        frames = eqn.source_info.traceback.frames
    except AttributeError:
        return ""
    for frame in frames:
        path = frame.file_name.replace("\\", "/")
        inside = ("/jax/", "/tpustrat/", "/jaxlib/")
        if not any(part in path for part in inside) and not path.endswith("/contextlib.py"):
            short = "/".join(path.split("/")[-2:])
            return f" in {frame.function_name} ({short}:{frame.line_num})"
    return ""


def _unsupported(eqn, where: str, splits, why: str) -> ValueError:
    leaves = [s.leaf for s in splits if s is not None and s.leaf]
    leaf = f" on {leaves[0]}" if leaves else ""
    return ValueError(
        f"ts.shard_update cannot run this transformation block by block: its "
        f"{eqn.primitive.name!r}{where}{leaf} {why}, so its result over blocks is not "
        "proven equal to the whole leaf's. Use plain optax for this transformation (all-reduce "
        "the gradients and call it without ts.shard_update)"
    )
