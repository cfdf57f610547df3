"""Several training steps in one compiled program: a ``lax.scan`` over per-replica batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any


class StepsResult(NamedTuple):
    """What ``strategy.experimental_run_steps`` returns.

    Attributes:
      state: the state after the last step.
      outputs: the last step's outputs, or every step's stacked along a new leading axis (for
        PerReplica outputs, right after the replica axis) when ``stack_outputs=True``.
      num_steps: how many batches were consumed; fewer than asked for at the end of the data.

    Example:
      >>> strategy = ts.TPUStrategy()
      >>> batches = iter([ts.PerReplica([np.float32(1)] * 8)] * 5)
      >>> step = lambda total, x: (total + x, x)
      >>> [strategy.experimental_run_steps(step, np.float32(0), batches, 4).num_steps
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
    ``unroll`` is ``lax.scan``'s.
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

        def body(carry, batch):
            result = self.fn(carry, batch)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise TypeError(
                    f"experimental_run_steps needs fn(state, batch) -> (state, outputs); "
                    f"{self.__qualname__} returned a {type(result).__name__}"
                )
            new_state, outputs = result
            if jax.tree.structure(new_state) != jax.tree.structure(carry):
                raise TypeError(
                    f"{self.__qualname__} returned a state of structure "
                    f"{jax.tree.structure(new_state)} but took {jax.tree.structure(carry)}; "
                    "return the updated state with the same structure"
                )
            return jax.tree.map(self._same_type, new_state, carry), outputs

        state = jax.tree.map(jnp.asarray, state)
        # Stacked here, inside the one program, rather than by a dispatch of its own.
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
        final, outputs = lax.scan(body, state, stacked, unroll=self.unroll)
        if not self.stack_outputs:
            outputs = jax.tree.map(lambda x: x[-1], outputs)
        return final, outputs

    def _same_type(self, new: jax.Array, old: jax.Array) -> jax.Array:
        new = jnp.asarray(new)
        if new.dtype != old.dtype or new.shape != old.shape:
            raise TypeError(
                f"{self.__qualname__} returned a state leaf of {new.dtype}{list(new.shape)} for "
                f"one of {old.dtype}{list(old.shape)}; a step must keep each state leaf's dtype "
                "and shape (cast the initial state, e.g. np.float32(0) rather than 0)"
            )
        return new.astype(old.dtype)  # the same dtype, without a weak type the scan rejects


def _check_same_structure(batches: tuple[PyTree, ...]) -> None:
    first = jax.tree.structure(batches[0])
    for k, batch in enumerate(batches[1:], start=1):
        if jax.tree.structure(batch) != first:
            raise ValueError(
                f"batch {k} has structure {jax.tree.structure(batch)} but batch 0 has {first}; "
                "experimental_run_steps needs batches of one structure"
            )
