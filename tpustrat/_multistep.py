"""Several training steps in one compiled program: a ``lax.scan`` over per-replica batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tpustrat import _nnx
from tpustrat._types import PyTree
from tpustrat._values import PerReplica, is_per_replica


class StepsResult(NamedTuple):
    """What ``strategy.run_steps`` returns.

    Attributes:
      state: the state after the last step; Flax NNX objects in it are the caller's own,
        updated in place, as ``run`` updates them.
      outputs: the last step's outputs, or every step's stacked along a new leading axis (for
        PerReplica outputs, right after the replica axis) when ``stack_outputs=True``.
      num_steps: how many batches were consumed; fewer than asked for at the end of the data.

    Example:
      >>> strategy = ts.TPUStrategy()
      >>> batches = iter([ts.PerReplica([np.float32(1)] * 8)] * 5)
      >>> step = lambda total, x: (total + x, x)
      >>> [strategy.run_steps(step, np.float32(0), batches, 4).num_steps
      ...  for _ in range(2)]
      [4, 1]
    """

    state: PyTree
    outputs: PyTree
    num_steps: int


class MultiStep:
    """``fn(state, batch) -> (state, outputs)`` scanned over a stack of batches.

    One instance per (fn, stack_outputs, unroll, number of batches), so ``strategy.run`` sees
    the same function on every call and compiles each count once, as a program of its own.
    ``unroll`` is ``lax.scan``'s. Flax NNX objects in the state (which ``run`` hands the step
    as objects) are carried as their state: each step works on objects merged from it, and
    the last step's state is written into the objects ``run`` passed, which ``run`` writes
    back to the caller's. Their places in the returned state hold None, for
    ``restore_objects`` to fill.
    """

    def __init__(
        self,
        fn: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]],
        options: tuple[bool, int | bool, bool, int],
    ):
        self.fn = fn
        # Whether unroll is a bool and the number of batches only key the strategy's cache.
        self.stack_outputs, self.unroll, _, _ = options
        self.__qualname__ = f"steps({getattr(fn, '__qualname__', repr(fn))})"

    def __call__(self, state: PyTree, *batches: PyTree) -> tuple[PyTree, PyTree]:
        _check_same_structure(batches)
        carry = _Carry(state)

        def body(values, batch):
            result = self.fn(carry.state(values), batch)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise TypeError(
                    f"run_steps needs fn(state, batch) -> (state, outputs); "
                    f"{self.__qualname__} returned a {type(result).__name__}"
                )
            new_state, outputs = result
            new_values = carry.values(new_state, self.__qualname__)
            return jax.tree.map(self._same_type, new_values, values), outputs

        # Stacked here, inside the one program, rather than by a dispatch of its own.
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
        final, outputs = lax.scan(body, carry.initial, stacked, unroll=self.unroll)
        if not self.stack_outputs:
            outputs = jax.tree.map(lambda x: x[-1], outputs)
        return carry.finish(final), outputs

    def _same_type(self, new: jax.Array, old: jax.Array) -> jax.Array:
        new = jnp.asarray(new)
        if new.dtype != old.dtype or new.shape != old.shape:
            raise TypeError(
                f"{self.__qualname__} returned a state leaf of {new.dtype}{list(new.shape)} for "
                f"one of {old.dtype}{list(old.shape)}; a step must keep each state leaf's dtype "
                "and shape (cast the initial state, e.g. np.float32(0) rather than 0)"
            )
        return new.astype(old.dtype)  # the same dtype, without a weak type the scan rejects


class _Carry:
    """The state as ``lax.scan`` carries it: arrays, and NNX objects as their state.

    Args:
      state: the step's state; NNX objects in it are the ones ``run`` passed to the step.
    """

    def __init__(self, state: PyTree):
        leaves, self._structure = jax.tree.flatten(state, is_leaf=_nnx.is_nnx_object)
        self._positions = [i for i, leaf in enumerate(leaves) if _nnx.is_nnx_object(leaf)]
        self._objects = tuple(leaves[i] for i in self._positions)
        arrays = [jnp.asarray(x) for i, x in enumerate(leaves) if i not in self._positions]
        self._graphdef, objects_state = None, None
        if self._objects:
            self._graphdef, objects_state = _nnx.loaded_nnx().split(self._objects)
        self.initial = (objects_state, arrays)

    def state(self, values: tuple) -> PyTree:
        """The state the step takes, with fresh NNX objects holding ``values``'s."""
        objects_state, arrays = values
        objects = ()
        if self._objects:
            objects = _nnx.loaded_nnx().merge(self._graphdef, objects_state)
        return self._rebuild(objects, arrays)

    def values(self, state: PyTree, name: str) -> tuple:
        """What the scan carries of the state a step returned (checked to be the same kind)."""
        leaves, structure = jax.tree.flatten(state, is_leaf=_nnx.is_nnx_object)
        positions = [i for i, leaf in enumerate(leaves) if _nnx.is_nnx_object(leaf)]
        if structure != self._structure or positions != self._positions:
            raise TypeError(
                f"{name} returned a state of structure {structure} but took "
                f"{self._structure}; return the updated state with the same structure (NNX "
                "objects may be returned as they are, updated in place)"
            )
        objects_state = None
        if self._objects:
            graphdef, objects_state = _nnx.loaded_nnx().split(tuple(leaves[i] for i in positions))
            if graphdef != self._graphdef:
                raise TypeError(
                    f"{name} changed the structure of the NNX objects in its state (it added "
                    "or removed a variable, or swapped a submodule); run_steps "
                    "carries the objects' state through every step unchanged in structure"
                )
        arrays = [x for i, x in enumerate(leaves) if i not in positions]
        return objects_state, arrays

    def finish(self, values: tuple) -> PyTree:
        """The state after the last step: the objects updated in place, None in their places."""
        objects_state, arrays = values
        if self._objects:
            _nnx.loaded_nnx().update(self._objects, objects_state)
        return self._rebuild([None] * len(self._objects), arrays)

    def _rebuild(self, objects: Sequence[Any], arrays: Sequence[Any]) -> PyTree:
        next_object, next_array = iter(objects).__next__, iter(arrays).__next__
        count = self._structure.num_leaves
        leaves = [next_object() if i in self._positions else next_array() for i in range(count)]
        return self._structure.unflatten(leaves)


def has_nnx_objects(state: PyTree) -> bool:
    """Whether ``state`` holds Flax NNX objects (which ``restore_objects`` puts back)."""
    return any(map(_nnx.is_nnx_object, jax.tree.leaves(state, is_leaf=_nnx.is_nnx_object)))


def restore_objects(state: PyTree, new_state: PyTree) -> PyTree:
    """``new_state`` with the caller's NNX objects of ``state`` back in their places."""
    leaves, structure = jax.tree.flatten(state, is_leaf=_nnx.is_nnx_object)
    new_leaves = structure.flatten_up_to(new_state)
    return structure.unflatten(
        [old if _nnx.is_nnx_object(old) else new for old, new in zip(leaves, new_leaves)]
    )


def check_batches(batches: Sequence[PyTree]) -> None:
    """Refuses batches that differ in structure, or in a leaf's shape or dtype, naming it."""
    _check_same_structure(tuple(batches))
    first = jax.tree_util.tree_flatten_with_path(batches[0], is_leaf=is_per_replica)[0]
    for k, batch in enumerate(batches[1:], start=1):
        for (path, a), b in zip(first, jax.tree.leaves(batch, is_leaf=is_per_replica)):
            kind_a, kind_b = isinstance(a, PerReplica), isinstance(b, PerReplica)
            a_shape, b_shape = _shape_of(a), _shape_of(b)
            if kind_a != kind_b or a_shape != b_shape or _dtype_of(a) != _dtype_of(b):
                name = f"batch{jax.tree_util.keystr(path)}"
                raise ValueError(
                    f"{name} is {_describe(a)} in batch 0 but {_describe(b)} in batch {k}; "
                    "run_steps stacks its batches, which must agree in shape and "
                    "dtype: pad the last partial batch (ts.InputOptions), or run batches of "
                    "another shape with strategy.run"
                )


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, PerReplica) or hasattr(x, "shape") else np.shape(x)


def _dtype_of(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else np.result_type(x)


def _describe(x: Any) -> str:
    kind = "a PerReplica of " if isinstance(x, PerReplica) else ""
    return f"{kind}{_dtype_of(x)}{list(_shape_of(x))}"


def _check_same_structure(batches: tuple[PyTree, ...]) -> None:
    first = jax.tree.structure(batches[0])
    for k, batch in enumerate(batches[1:], start=1):
        if jax.tree.structure(batch) != first:
            raise ValueError(
                f"batch {k} has structure {jax.tree.structure(batch)} but batch 0 has {first}; "
                "run_steps needs batches of one structure"
            )
