"""Parameters sharded over the replicas (FSDP, ZeRO-3), gathered whole when a layer uses them.

``shard_params`` cuts each large parameter into one block per replica (a ``ts.ReplicaShard``
over a ``ts.PerReplica``), so a device holds 1/R of it. Inside ``run`` the model reads whole
weights: ``gather_params`` (for Flax NNX, reading a sharded ``nnx.Param``; for Linen, a
module wrapped in ``gather_on_use``) all-gathers the blocks and cuts the padding off.
``jax.grad`` turns each all-gather into a reduce-scatter, so the gradient of a block is the
sum over the replicas of every replica's gradient, already a block; ``ts.shard_update``
takes those blocks as they are and updates only the blocks, with an optimizer state cut the
same way.

Layout. A leaf of rank >= 2 is cut along its last axis, zero-padded to a multiple of R as
``ts.shard_update`` pads (a block is never longer than the whole axis). The first axis is
never cut: it is the layer axis of scanned layers (``nnx.scan``, ``nn.scan``), which the
scan slices one layer at a time, so each layer's block is gathered inside the scan's body.
The cut axis and which leaves are cut do not depend on R, so a checkpoint restores onto any
replica count. Leaves of rank 0 or 1 (biases, scales, counts) stay whole on every replica:
they are small, and their gradients are all-reduced as in data parallelism.

Inside a scan over layers the block a layer reads has fewer axes than the ReplicaShard's
whole shape: the leading axes the scan consumed are dropped from the shape when gathering.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax import lax

from tpustrat import _mesh, _nnx
from tpustrat._checks import check_tree, describe
from tpustrat._context import Strategy, get_replica_context
from tpustrat._sharded_update import ReplicaShard, _assemble, _block_length, _cut
from tpustrat._types import PyTree
from tpustrat._values import PerReplica, is_distributed


def shard_params(tree: PyTree, strategy: Strategy) -> PyTree:
    """Splits parameters over ``strategy``'s replicas: each device keeps one block of each.

    For a pytree of arrays, returns the same structure with each leaf of rank 2 or more a
    ``ts.ReplicaShard`` over a ``ts.PerReplica`` of blocks sharded over the replicas, cut
    along its last axis; leaves of rank 0 or 1 come back replicated. For a Flax NNX module,
    converts its ``nnx.Param`` variables in place and returns the module: a sharded Param
    reads whole inside ``run`` (all-gathered), as its ReplicaShard outside. Pass the result to
    ``run`` and update it with ``ts.shard_update(tx)``, which takes the blocks' gradients.

    Args:
      tree: a pytree of arrays (the parameters), or an NNX module.
      strategy: the ``ts.TPUStrategy`` whose replicas hold the blocks.

    Returns:
      The sharded pytree, or the module itself.

    Example:
      >>> strategy = ts.TPUStrategy()
      >>> params = ts.shard_params({"w": np.ones((4, 16), np.float32), "b": np.zeros(16)}, strategy)
      >>> params["w"], params["b"].sharding.is_fully_replicated
      (ReplicaShard(PerReplica(float32[8, 4, 2]), shape=(4, 16), axis=1), True)
      >>> def total(params):
      ...     return ts.gather_params(params)["w"].sum()
      >>> float(strategy.run(total, args=(params,)))
      64.0
    """
    mesh = _strategy_mesh("shard_params", strategy)
    num_replicas = strategy.num_replicas_in_sync
    if get_replica_context() is not None:
        raise RuntimeError(
            "ts.shard_params was called inside strategy.run; call it once before the training "
            "loop and pass its result to run"
        )
    if _nnx.is_nnx_object(tree):
        return _shard_module(tree, mesh, num_replicas)
    _check_plain("shard_params", tree)
    return jax.tree.map(lambda x: _shard_leaf(x, mesh, num_replicas), tree)


def gather_params(tree: PyTree) -> PyTree:
    """The whole parameters of sharded ones (``ts.shard_params``'s).

    Inside ``run``, all-gathers each ``ts.ReplicaShard`` over the replicas and cuts its
    padding off: call it in the loss, on the whole tree (every weight gathered up front) or
    on one layer's parameters where that layer runs (one layer whole at a time); its gradient
    is a reduce-scatter. Outside ``run``, returns whole arrays for export or evaluation on one
    device; an NNX module's sharded Params turn back, in place, into the Param types they
    were, holding whole arrays.

    Args:
      tree: a pytree holding ReplicaShard leaves (other leaves pass through), or an NNX module.

    Returns:
      ``tree`` with every ReplicaShard replaced by its whole array (the module itself for NNX).

    Example:
      >>> strategy = ts.TPUStrategy()
      >>> params = ts.shard_params({"w": np.arange(24.0).reshape(2, 12)}, strategy)
      >>> ts.gather_params(params)["w"].shape
      (2, 12)
    """
    inside = get_replica_context() is not None
    if _nnx.is_nnx_object(tree):
        if inside:
            raise RuntimeError(
                "ts.gather_params got an NNX module inside strategy.run; there its sharded "
                "Params read whole by themselves: use the module as it is"
            )
        return _gather_module(tree)
    check_tree("tree", tree, opaque=lambda x: _is_shard(x) or is_distributed(x))
    gather = _gather_block if inside else _whole
    return jax.tree.map(lambda x: gather(x) if _is_shard(x) else x, tree, is_leaf=_is_shard)


def gather_on_use(target: Any) -> Any:
    """Wraps a Flax Linen module so that it reads its sharded parameters whole.

    ``nn.map_variables`` over the ``"params"`` collection with ``ts.gather_params``: the
    wrapped module sees whole weights, all-gathered when it runs, and its gradients come back
    as blocks. Wrap the layer class that ``nn.scan`` repeats, so that each layer's weights are
    gathered inside the scan, one layer at a time; wrap the other modules that hold large
    weights (embeddings, the head) apart. Wrapping the whole model gathers every weight up
    front. On whole (unsharded) parameters, as in ``init``, it changes nothing.

    Args:
      target: a Linen ``nn.Module`` subclass or instance, as ``nn.map_variables`` takes.

    Returns:
      The wrapped module, used where ``target`` was.

    Example:
      >>> import flax.linen as nn
      >>> strategy = ts.TPUStrategy()
      >>> dense = ts.gather_on_use(nn.Dense)(16)
      >>> params = dense.init(jax.random.key(0), np.ones((1, 4), np.float32))["params"]
      >>> sharded = ts.shard_params(params, strategy)
      >>> y = strategy.run(lambda p: dense.apply({"params": p}, np.ones((1, 4))), args=(sharded,))
      >>> y.shape
      (1, 16)
    """
    import flax.linen as nn  # a Linen user's program has imported it already

    if not (
        isinstance(target, nn.Module)
        or (isinstance(target, type) and issubclass(target, nn.Module))
    ):
        raise TypeError(
            f"ts.gather_on_use takes a Flax Linen module class or instance as target, got "
            f"{describe(target)}; e.g. ts.gather_on_use(nn.Dense)(features). For NNX, "
            "ts.shard_params(module, strategy) is enough"
        )
    return nn.map_variables(target, "params", trans_in_fn=gather_params, init=True)


def _param_axis(shape: tuple[int, ...]) -> int | None:
    """The axis a parameter of ``shape`` is cut along; None: it stays whole."""
    return len(shape) - 1 if len(shape) >= 2 else None


def _shard_leaf(x: Any, mesh: jax.sharding.Mesh, num_replicas: int | None) -> Any:
    """``x`` cut into blocks over ``num_replicas``, or replicated (always, for None)."""
    _check_not_placed(x, mesh)
    axis = _param_axis(np.shape(x))
    if axis is None or num_replicas is None:
        return jax.device_put(x, _mesh.replicated_sharding(mesh))
    blocks = _cut(np.asarray(jax.device_get(x)), axis, num_replicas)
    per_replica = _mesh.per_replica_sharding(mesh)
    return ReplicaShard(
        PerReplica.from_stacked(jax.device_put(blocks, per_replica)), np.shape(x), axis
    )


def _check_not_placed(x: Any, mesh: jax.sharding.Mesh) -> None:
    """Refuses an array tiled over ``mesh``'s devices (``strategy.place_params``'s): cutting
    it into blocks would drop that layout."""
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return
    sharding = x.sharding
    if not sharding.is_fully_replicated and sharding.device_set == set(mesh.devices.flat):
        raise ValueError(
            f"ts.shard_params got an array of shape {x.shape} laid out over the strategy's "
            f"devices ({getattr(sharding, 'spec', sharding)}), as "
            "strategy.place_params lays it out; shard first, then place the sharded "
            "parameters: strategy.place_params(ts.shard_params(params, strategy), rules)"
        )


def _gather_block(shard: ReplicaShard) -> jax.Array:
    """The whole array of ``shard``'s block inside ``run``; leading axes a scan consumed (the
    block has fewer axes than the whole shape) are left out of the shape."""
    ctx = get_replica_context()
    assert ctx is not None
    block = shard.blocks
    if isinstance(block, PerReplica):
        raise ValueError(
            f"{shard!r} reached a gather inside strategy.run still holding its PerReplica; "
            "pass the sharded parameters to run as arguments (args=(params, ...)), not as "
            "values the step closes over"
        )
    consumed = len(shard.shape) - np.ndim(block)
    shape, axis = shard.shape[consumed:], shard.axis - consumed
    num_replicas = ctx.num_replicas_in_sync
    length = _block_length(shard.shape[shard.axis], num_replicas)
    if consumed < 0 or axis < 0 or np.shape(block) != (*shape[:axis], length, *shape[axis + 1 :]):
        raise ValueError(
            f"a ReplicaShard of a whole {shard.shape} cut along axis {shard.axis} has a block of "
            f"shape {np.shape(block)} here, not one of {num_replicas} replicas' blocks (scanned "
            "layers must be stacked on axis 0). Shard the parameters for this strategy: "
            "ts.shard_params(ts.gather_params(params), strategy)"
        )
    whole = lax.all_gather(block, _mesh.REPLICA_AXIS, axis=axis, tiled=True)
    return lax.slice_in_dim(whole, 0, shape[axis], axis=axis)


def _whole(shard: ReplicaShard) -> jax.Array:
    if not isinstance(shard.blocks, PerReplica):
        raise ValueError(
            f"ts.gather_params outside strategy.run got {shard!r}, whose blocks are not a "
            "ts.PerReplica; pass the parameters ts.shard_params or run returned"
        )
    return jax.numpy.asarray(_assemble(shard))


def _check_plain(call: str, tree: PyTree) -> None:
    check_tree("tree", tree, opaque=lambda x: _is_shard(x) or is_distributed(x))
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: _is_shard(x) or is_distributed(x)
    )[0]:
        where = f"tree{jax.tree_util.keystr(path)}"
        if _is_shard(leaf):
            raise ValueError(
                f"ts.{call} got {where}, which is sharded already ({leaf!r}); shard "
                "parameters once, or move them to another strategy with "
                "ts.shard_params(ts.gather_params(params), strategy)"
            )
        if is_distributed(leaf) or not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(
                f"ts.{call} takes a pytree of arrays (the parameters), but {where} is "
                f"{describe(leaf)}; keep other values out of the tree you shard"
            )


def _strategy_mesh(call: str, strategy: Any) -> jax.sharding.Mesh:
    mesh = getattr(strategy, "mesh", None)
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(
            f"ts.{call} strategy must be a ts.TPUStrategy, got {describe(strategy)}; pass the "
            "strategy that will run the steps"
        )
    return mesh


def _is_shard(x: Any) -> bool:
    return isinstance(x, ReplicaShard)


# Flax NNX: a sharded Param is an instance of a subclass of its own Param type whose value is
# a ReplicaShard and whose read gathers it. Flax is imported only by a program that uses it, so
# the subclasses are made on first use, one per Param type (nnx.Param, or a user's subclass).
_SHARDED_BASE = "_tpustrat_sharded_base"  # on a sharded Param type: the type it was


@functools.cache
def sharded_param_type(base: type) -> type:
    """The sharded form of the Param type ``base``: a read all-gathers it inside ``run``."""
    missing = object()

    class ShardedParam(base):
        """A Param split over the replicas (``ts.shard_params``); inside ``strategy.run`` a
        read all-gathers its blocks, outside it reads as its ReplicaShard."""

        def get_value(self, *, index: Any = missing) -> Any:
            raw = self.get_raw_value()
            if not _is_shard(raw) or get_replica_context() is None:
                return super().get_value() if index is missing else super().get_value(index=index)
            whole = _gather_block(raw)
            return whole if index is missing else whole[index]

    ShardedParam.__module__ = "tpustrat"
    ShardedParam.__name__ = ShardedParam.__qualname__ = f"Sharded{base.__name__}"
    setattr(ShardedParam, _SHARDED_BASE, base)
    return ShardedParam


def _shard_module(module: Any, mesh: jax.sharding.Mesh, num_replicas: int) -> Any:
    nnx = _nnx.loaded_nnx()
    variables = [v for _, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)]
    for variable in variables:
        raw = variable.get_raw_value()
        if hasattr(type(variable), _SHARDED_BASE) or _is_shard(raw):
            raise ValueError(
                f"ts.shard_params got a module whose Params are sharded already ({raw!r}); "
                "shard a module once, or move it to another strategy with "
                "ts.shard_params(ts.gather_params(module), strategy)"
            )
    for variable in variables:
        raw = variable.get_raw_value()
        if not isinstance(variable, nnx.Param) or not hasattr(raw, "shape"):
            variable.set_raw_value(jax.tree.map(lambda x: _shard_leaf(x, mesh, None), raw))
            continue
        value = _shard_leaf(raw, mesh, num_replicas)
        if _is_shard(value):  # the same object: shared references survive
            variable.__class__ = sharded_param_type(type(variable))
        variable.set_raw_value(value)
    return module


def _gather_module(module: Any) -> Any:
    nnx = _nnx.loaded_nnx()
    for _, variable in nnx.iter_graph(module):
        base = getattr(type(variable), _SHARDED_BASE, None)
        if base is not None:
            raw = variable.get_raw_value()
            variable.set_raw_value(_whole(raw) if _is_shard(raw) else raw)
            variable.__class__ = base
    return module
