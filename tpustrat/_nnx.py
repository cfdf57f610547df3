"""Flax NNX objects as ``run`` arguments: updated in place, as under ``nnx.jit``.

A step that takes an ``nnx.Module``, ``nnx.Optimizer`` or ``nnx.Metric`` and mutates it (an
optimizer update, a metric update, BatchNorm statistics, an RNG stream's counter) changes the
caller's objects when ``run`` returns. ``run`` splits the objects into a graph definition and
their state (``nnx.split``), passes the state through the compiled program like any replicated
argument, merges it back into fresh objects inside the step, and after the step writes the
new state back into the caller's objects (``nnx.update``). Shared references between the
arguments survive, because all of them are split together.

Inside ``run`` each ``nnx.Rngs`` stream draws keys folded with the replica index, so dropout
masks differ across replicas; the stream's key itself is left as it was and only its counter
advances, identically on every replica, so two runs from one seed are identical.

Nothing here imports flax unless the user already has: a job without NNX never pays for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax

from tpustrat._mesh import REPLICA_AXIS
from tpustrat._values import PerReplica, is_distributed, is_per_replica

PyTree = Any


def nnx_module() -> ModuleType | None:
    """flax.nnx if the user's program has imported it, else None."""
    return sys.modules.get("flax.nnx")


def loaded_nnx() -> ModuleType:
    """flax.nnx, for code that holds NNX objects and so knows the program has imported it."""
    return sys.modules["flax.nnx"]


def is_nnx_object(x: Any) -> bool:
    """Whether ``x`` is an NNX graph object (a Module, Optimizer, Metric, Rngs, ...)."""
    nnx = nnx_module()
    if nnx is None:
        return False
    base = getattr(nnx, "Pytree", None) or nnx.Object
    return isinstance(x, base)


class LiftedSteps:
    """The ``Lifted`` steps of one function and argument structure, one per graph definition.

    Kept by the strategy per (function, structure), so that ``run`` sees the same callable on
    every call and compiles once. A loop passes the same objects on every call, so their graph
    definition is nearly always the last one's: comparing it with that one costs less than
    hashing it to look it up (both walk the whole graph). At most ``max_size`` definitions are
    kept, the oldest dropped first.

    Args:
      fn: the user's step.
      structure: the treedef of ``(args, kwargs)`` with each NNX object as a leaf.
      positions: the indices of those leaves that are NNX objects, in order.
      max_size: the most graph definitions kept.
    """

    def __init__(self, fn: Callable[..., PyTree], structure: Any, positions, max_size: int = 8):
        self._fn, self._structure, self._positions = fn, structure, tuple(positions)
        self._max_size = max_size
        self._last: Lifted | None = None
        self._by_graph: dict[Any, Lifted] = {}

    def get(self, graphdef: Any) -> Lifted:
        """The step for objects of this graph definition, made on first use."""
        last = self._last
        if last is not None and last.graphdef == graphdef:
            return last
        lifted = self._by_graph.pop(graphdef, None)
        if lifted is None:
            lifted = Lifted(self._fn, graphdef, self._structure, self._positions)
        self._by_graph[graphdef] = lifted
        while len(self._by_graph) > self._max_size:
            del self._by_graph[next(iter(self._by_graph))]
        self._last = lifted
        return lifted


class Lifted:
    """``fn`` over NNX objects, as a function of their state: what ``run`` compiles.

    One instance per (function, graph definition, argument structure), kept by the strategy
    (``LiftedSteps``), so that ``run`` sees the same callable on every call and compiles once.

    Args:
      fn: the user's step.
      graphdef: the graph definition of the NNX objects among the arguments, split together.
      structure: the treedef of ``(args, kwargs)`` with each NNX object as a leaf.
      positions: the indices of those leaves that are NNX objects, in order.
    """

    def __init__(self, fn: Callable[..., PyTree], graphdef: Any, structure: Any, positions):
        self.fn, self.graphdef, self.structure = fn, graphdef, structure
        self.positions = tuple(positions)
        self.__qualname__ = getattr(fn, "__qualname__", None) or repr(fn)

    def __call__(self, state: PyTree, leaves: list) -> tuple[PyTree, PyTree]:
        nnx = loaded_nnx()
        objects = nnx.merge(self.graphdef, state)
        leaves = list(leaves)
        for position, obj in zip(self.positions, objects):
            leaves[position] = obj
        args, kwargs = self.structure.unflatten(leaves)
        keys = jax.tree.map(lambda k: k, nnx.state(objects, nnx.RngKey))  # a snapshot
        replica = jax.lax.axis_index(REPLICA_AXIS)
        nnx.update(objects, jax.tree.map(lambda k: jax.random.fold_in(k, replica), keys))
        out = self.fn(*args, **kwargs)
        nnx.update(objects, keys)  # the stream's key stays replicated; its counter advanced
        return out, nnx.state(objects)


def split_objects(inputs: PyTree) -> tuple[Any, Any, tuple, PyTree, list] | None:
    """Finds the NNX objects in ``(args, kwargs)``; None when there are none.

    Returns:
      ``(graphdef, state, objects, structure, leaves)``: the objects' graph definition and
      state (split together), the objects themselves, the treedef of ``inputs`` with each
      object as a leaf, and that tree's leaves with the objects replaced by None.
    """
    if nnx_module() is None:
        return None
    leaves, structure = jax.tree.flatten(
        inputs, is_leaf=lambda x: is_nnx_object(x) or is_distributed(x)
    )
    positions = [i for i, leaf in enumerate(leaves) if is_nnx_object(leaf)]
    if not positions:
        return None
    objects = tuple(leaves[i] for i in positions)
    graphdef, state = loaded_nnx().split(objects)
    for i in positions:
        leaves[i] = None
    return graphdef, state, objects, (structure, tuple(positions)), leaves


def write_back(objects: tuple, state: PyTree, new_state: PyTree) -> None:
    """Writes the step's ``new_state`` into the caller's ``objects``, whose state was ``state``.

    ``state`` is what ``nnx.split`` gave: its variables are the objects' own. When the step
    kept the state's structure (no variable added or removed, no metadata changed), each one
    takes its new value as ``nnx.update`` would give it, without walking the objects' graph
    again; otherwise ``nnx.update`` does the walk.

    Raises:
      ValueError: if the step left some of the objects' state different on each replica.
    """
    nnx = loaded_nnx()

    def per_replica_paths(tree: PyTree) -> list[str]:
        return [
            jax.tree_util.keystr(path)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_per_replica)[0]
            if isinstance(leaf, PerReplica)
        ]

    given = set(per_replica_paths(state))  # blocks of sharded parameters (ts.shard_params)
    varying = [path for path in per_replica_paths(new_state) if path not in given]
    if varying:
        raise ValueError(
            f"the step left NNX state that differs between replicas: {', '.join(varying)}; "
            "an object passed to strategy.run must end the step the same on every replica. "
            "All-reduce the gradients before the optimizer update "
            "(ts.get_replica_context().all_reduce('mean', grads)), and give BatchNorm "
            f"axis_name=ts.REPLICA_AXIS ({REPLICA_AXIS!r}) so its statistics are global"
        )
    if jax.tree.structure(new_state) != jax.tree.structure(state):
        nnx.update(objects, new_state)
        return

    def is_variable(x: Any) -> bool:
        return isinstance(x, nnx.Variable)

    for variable, new in zip(
        jax.tree.leaves(state, is_leaf=is_variable), jax.tree.leaves(new_state, is_leaf=is_variable)
    ):
        variable.update_from_state(new)
