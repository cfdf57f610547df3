"""Compiling a per-replica step function into one SPMD program over the mesh."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tpustrat import _mesh, _replication
from tpustrat._context import ReplicaContext
from tpustrat._values import Mirrored, PerReplica, is_distributed

PyTree = Any

ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, int, float, bool, complex)


def build_step(
    fn: Callable[..., PyTree],
    mesh: Mesh,
    make_context: Callable[[], ReplicaContext],
    donate_argnums: tuple[int, ...] = (),
) -> Callable[..., PyTree]:
    """Returns ``step(*args, **kwargs)``: ``fn`` on every replica as one jitted ``shard_map``.

    ``shard_map`` is manual over ``"replica"`` only, so ``"logical_core"`` stays with the
    partitioner. Replicated inputs are not marked as varying (``check_vma=False``): a gradient
    with respect to one stays local to the replica, as under ``pmap`` and in tf.distribute.
    Outputs proven identical on every replica (see ``_replication``) come back Mirrored, the
    rest PerReplica. The jitted function caches one executable per argument signature.
    """

    def body_for(per_replica_flags, rebuild, stacked_outputs):
        def body(*arrays):
            local = [a[0] if pr else a for a, pr in zip(arrays, per_replica_flags)]
            args, kwargs = rebuild(local)
            with make_context()._activate():
                out = fn(*args, **kwargs)
            leaves, tree = _flatten_outputs(out)
            body.out_tree = tree
            if stacked_outputs is None:
                return [x[None] for x in leaves]
            return [x[None] if s else x for x, s in zip(leaves, stacked_outputs)]

        return body

    def step(*args, **kwargs):
        arrays, per_replica_flags, rebuild = _split_inputs((args, kwargs))
        in_specs = tuple(P(_mesh.REPLICA_AXIS) if pr else P() for pr in per_replica_flags)
        # First pass: trace with every output stacked, to learn which outputs vary.
        probe = body_for(per_replica_flags, rebuild, None)
        provisional = jax.shard_map(
            probe,
            mesh=mesh,
            in_specs=in_specs,
            out_specs=P(_mesh.REPLICA_AXIS),
            axis_names={_mesh.REPLICA_AXIS},
            check_vma=False,
        )
        avals = [_abstract(a) for a in arrays]
        closed = jax.make_jaxpr(provisional)(*avals)
        inner = _shard_map_body(closed)
        varying = _replication.varying_outputs(
            inner, [_mesh.REPLICA_AXIS in _spec_axes(s) for s in _shard_map_in_specs(closed)]
        )
        body = body_for(per_replica_flags, rebuild, varying)
        out_specs = [P(_mesh.REPLICA_AXIS) if v else P() for v in varying]
        mapped = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            axis_names={_mesh.REPLICA_AXIS},
            check_vma=False,
        )
        outputs = mapped(*arrays)
        wrapped = [
            PerReplica.from_stacked(x) if v else Mirrored(x) for x, v in zip(outputs, varying)
        ]
        return body.out_tree.unflatten(wrapped)

    return jax.jit(step, donate_argnums=donate_argnums)


class DispatchWindow:
    """Bounds how many steps run ahead of the host.

    XLA:CPU can abort on a rendezvous timeout when many collective programs are queued at once,
    and on any backend an unbounded queue hides the real step time. After each step, the window
    keeps one output array; when more than ``size`` are pending, it waits for the oldest.
    """

    def __init__(self, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"max_steps_in_flight must be an int >= 1, got {size!r}")
        self.size = size
        self._pending: collections.deque[jax.Array] = collections.deque()

    def admit(self, outputs: PyTree) -> None:
        """Records a dispatched step's outputs, waiting for old steps while too many are pending."""
        leaves = jax.tree.leaves(outputs)
        if leaves:
            self._pending.append(leaves[0])
        while len(self._pending) > self.size:
            oldest = self._pending.popleft()
            if not oldest.is_deleted():  # a donated output was consumed by a later step
                oldest.block_until_ready()

    def drain(self) -> None:
        """Waits for every pending step."""
        while self._pending:
            oldest = self._pending.popleft()
            if not oldest.is_deleted():
                oldest.block_until_ready()


def _abstract(x) -> jax.ShapeDtypeStruct:
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _split_inputs(tree: PyTree):
    """Flattens ``tree`` into arrays, per-replica flags and a function to rebuild local values."""
    nodes, node_tree = jax.tree.flatten(tree, is_leaf=is_distributed)
    arrays, flags, parts = [], [], []
    for node in nodes:
        if isinstance(node, PerReplica):
            leaves, sub = jax.tree.flatten(node.stacked)
            flags += [True] * len(leaves)
        elif isinstance(node, Mirrored):
            leaves, sub = jax.tree.flatten(node.value)
            flags += [False] * len(leaves)
        else:
            leaves, sub = [node], None
            flags.append(False)
        arrays += leaves
        parts.append((len(leaves), sub))

    def rebuild(local_arrays):
        values, start = [], 0
        for count, sub in parts:
            chunk = local_arrays[start : start + count]
            values.append(chunk[0] if sub is None else sub.unflatten(chunk))
            start += count
        return node_tree.unflatten(values)

    return arrays, flags, rebuild


def _flatten_outputs(out: PyTree):
    paths_leaves, tree = jax.tree_util.tree_flatten_with_path(out)
    leaves = []
    for path, leaf in paths_leaves:
        if not isinstance(leaf, ARRAY_TYPES):
            raise TypeError(
                f"strategy.run: the step returned a {type(leaf).__name__} at output"
                f"{jax.tree_util.keystr(path) or ' (the root)'}; a step can only return arrays, "
                "numbers and pytrees of them (return metadata outside the step)"
            )
        leaves.append(jax.numpy.asarray(leaf))
    return leaves, tree


def _shard_map_eqn(closed):
    for eqn in closed.jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            return eqn
    raise AssertionError(f"no shard_map in the traced step:\n{closed}")


def _shard_map_body(closed):
    return _shard_map_eqn(closed).params["jaxpr"]


def _shard_map_in_specs(closed):
    return _shard_map_eqn(closed).params["in_specs"]


def _spec_axes(spec) -> set[str]:
    axes = set()
    for entry in spec:
        if entry is None:
            continue
        axes.update(entry if isinstance(entry, tuple) else (entry,))
    return axes
