"""Checking ``run``'s arguments and placing them on the mesh."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tpustrat._mesh import REPLICA_AXIS, spec_axes
from tpustrat._values import Mirrored, PerReplica, is_distributed

PyTree = Any

ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, int, float, bool, complex)


def prepare(
    inputs: PyTree,
    num_replicas: int,
    per_replica: NamedSharding,
    replicated: NamedSharding,
) -> tuple[PyTree, bool]:
    """Checks ``run``'s ``(args, kwargs)`` and places them; also says if they are traced.

    PerReplica leaves go to ``per_replica``, all others to ``replicated``; leaves already there
    (or on an equivalent sharding) stay put. Wrappers around a pytree are pushed down to its
    leaves, the form ``run`` returns, so that ``Mirrored(tree)`` and a tree of Mirrored share
    one compiled program. One pass over the inputs; the tree is rebuilt only when needed.
    """
    nodes, tree = jax.tree.flatten(inputs, is_leaf=is_distributed)
    traced = moved = False
    placed_nodes = []
    for index, node in enumerate(nodes):
        if isinstance(node, PerReplica):
            leaves, sub, sharding = *jax.tree.flatten(node.stacked), per_replica
            if any(np.ndim(x) == 0 or np.shape(x)[0] != num_replicas for x in leaves):
                raise ValueError(
                    f"{_where(inputs, index)} is a PerReplica with {node.num_replicas} "
                    f"components but the strategy has {num_replicas} replicas; build it with one "
                    "component per replica, e.g. with "
                    "strategy.experimental_distribute_values_from_function"
                )
        elif isinstance(node, Mirrored):
            leaves, sub, sharding = *jax.tree.flatten(node.value), replicated
        else:
            leaves, sub, sharding = [node], None, replicated
        placed = []
        for x in leaves:
            if isinstance(x, jax.core.Tracer):
                traced = True
            elif isinstance(x, jax.Array) and x.is_deleted():
                raise ValueError(
                    f"{_where(inputs, index)} was donated to an earlier run call and its buffer "
                    "is gone; pass the state that call returned instead"
                )
            elif not _is_placed(x, sharding, isinstance(node, PerReplica)):
                if not isinstance(x, ARRAY_TYPES):
                    raise TypeError(
                        f"{_where(inputs, index)} is a {type(x).__name__}; strategy.run passes "
                        "only arrays, numbers and pytrees of them (close over other values in "
                        "the step function instead)"
                    )
                x, moved = jax.device_put(x, sharding), True
            placed.append(x)
        if sub is None:
            placed_nodes.append(placed[0])
        else:
            wrap = PerReplica.from_stacked if isinstance(node, PerReplica) else Mirrored
            moved = moved or sub.num_nodes > 1
            placed_nodes.append(sub.unflatten([wrap(x) for x in placed]))
    if traced or not moved:
        return inputs, traced
    return tree.unflatten(placed_nodes), traced


def _is_placed(x: Any, sharding: NamedSharding, per_replica: bool) -> bool:
    """Whether ``x`` can go into the program as it is.

    Besides the canonical layouts, an array on the strategy's own mesh may be tiled over the
    logical cores (a model-parallel parameter that ``run`` returned, say): the program takes it
    as it is, rather than gathering it first.
    """
    if not isinstance(x, jax.Array):
        return False
    current = x.sharding
    if current == sharding:
        return True
    if isinstance(current, NamedSharding) and current.mesh == sharding.mesh:
        spec = tuple(current.spec)
        lead = spec[:1] if per_replica else ()
        if per_replica and lead not in ((REPLICA_AXIS,), ((REPLICA_AXIS,),)):
            return False
        return REPLICA_AXIS not in spec_axes(PartitionSpec(*spec[len(lead) :]))
    return current.is_equivalent_to(sharding, x.ndim)


def _where(inputs: PyTree, index: int) -> str:
    path = jax.tree_util.tree_flatten_with_path(inputs, is_leaf=is_distributed)[0][index][0]
    return ("kwargs" if path[0].idx == 1 else "args") + jax.tree_util.keystr(path[1:])
