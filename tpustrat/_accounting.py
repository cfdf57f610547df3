"""Compile accounting: how many programs a strategy compiled, and why it compiled again."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax

from tpustrat._types import PyTree

logger = logging.getLogger("tpustrat")


@dataclasses.dataclass(frozen=True)
class Recompile:
    """One extra compilation of a step function that had been compiled before.

    Attributes:
      function: the step function's name.
      reasons: what changed since its previous compilation, one sentence per argument.
    """

    function: str
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.function} compiled again: " + "; ".join(self.reasons)


@dataclasses.dataclass(frozen=True)
class CompileStats:
    """What ``strategy.compile_stats()`` reports.

    Attributes:
      num_compiles: programs compiled by plain (not jit-traced) ``run`` calls.
      num_cache_hits: plain ``run`` calls that reused a compiled program.
      recompiles: every compilation of a function that had been compiled before, with reasons;
        under shape bucketing a program for a new bucket is counted but is not a recompile.

    Example:
      >>> strategy = ts.TPUStrategy()
      >>> _ = [strategy.run(lambda x: x + 1, args=(np.zeros(4),)) for _ in range(3)]
      >>> stats = strategy.compile_stats()
      >>> stats.num_compiles, stats.num_cache_hits  # one lambda per call: three functions
      (3, 0)
    """

    num_compiles: int = 0
    num_cache_hits: int = 0
    recompiles: tuple[Recompile, ...] = ()

    def __str__(self) -> str:
        lines = [f"{self.num_compiles} programs compiled, {self.num_cache_hits} cache hits"]
        lines += [f"  - {r}" for r in self.recompiles]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Signature:
    """The abstract signature jit keys its cache on: structure and each leaf's type."""

    structure: Any
    leaves: tuple[tuple[str, tuple[int, ...], str, bool], ...]  # path, shape, dtype, weak


def signature(tree: PyTree) -> Signature:
    """The signature of ``(args, kwargs)`` as seen while tracing."""
    with_paths, structure = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for path, leaf in with_paths:
        aval = jax.typeof(leaf)
        leaves.append((_path_name(path), tuple(aval.shape), str(aval.dtype), bool(aval.weak_type)))
    return Signature(structure, tuple(leaves))


def explain(old: Signature, new: Signature) -> tuple[str, ...]:
    """Sentences saying how ``new`` differs from ``old``, with a hint at the usual fix."""
    if old.structure != new.structure:
        old_paths = {p for p, *_ in old.leaves}
        new_paths = {p for p, *_ in new.leaves}
        added, removed = sorted(new_paths - old_paths), sorted(old_paths - new_paths)
        detail = ", ".join(
            [f"added {', '.join(added)}"] * bool(added)
            + [f"removed {', '.join(removed)}"] * bool(removed)
        )
        return (
            "the argument structure changed"
            + (f" ({detail})" if detail else " (container types or PerReplica/Mirrored kinds)")
            + "; pass the same pytree structure on every call",
        )
    reasons = []
    for (path, shape, dtype, weak), (_, new_shape, new_dtype, new_weak) in zip(
        old.leaves, new.leaves
    ):
        if shape != new_shape:
            hint = (
                "; a partial batch? pad it (ts.InputOptions) or pass "
                "ts.RunOptions(experimental_bucketizing_dynamic_shape=True)"
                if shape[1:2] != new_shape[1:2] and shape[2:] == new_shape[2:]
                else ""
            )
            reasons.append(f"{path} changed shape from {shape} to {new_shape}{hint}")
        if dtype != new_dtype:
            reasons.append(f"{path} changed dtype from {dtype} to {new_dtype}; cast it once")
        elif weak != new_weak:
            reasons.append(
                f"{path} changed from a Python number to a {new_dtype} array (or back); pass "
                "the same kind of value on every call"
            )
    return tuple(reasons) or ("the arguments' shardings or the step's closure changed",)


_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_backend_compiles = [0]


def _count_backend_compile(event: str, duration_secs: float, **kwargs: str | int) -> None:
    del duration_secs, kwargs
    if event == _BACKEND_COMPILE_EVENT:
        _backend_compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_backend_compile)


def backend_compiles() -> int:
    """How many XLA programs this process has compiled so far."""
    return _backend_compiles[0]


class Ledger:
    """Counts compiles and cache hits of plain ``run`` calls, with the reasons for recompiles."""

    def __init__(self):
        self._compiles = 0
        self._hits = 0
        self._recompiles: list[Recompile] = []
        self._traced: dict[Any, Signature] = {}  # the latest trace of each step
        self._compiled: dict[Any, Signature] = {}  # the signature of its latest compile

    def traced(self, key: Any, signature: Signature) -> None:
        """Records that the step ``key`` was traced for ``signature``."""
        self._traced[key] = signature

    def hit(self) -> None:
        """Records a plain ``run`` call that reused a compiled program."""
        self._hits += 1

    def compiled(self, key: Any, name: str, traced: bool, bucketing: bool = False) -> None:
        """Records a plain ``run`` call of the step ``key`` that compiled (``traced``: anew).

        Under shape bucketing (``bucketing``), a compile for a new bucket, where only the
        per-replica row counts changed, is expected and not reported as a recompile.
        """
        self._compiles += 1
        old, new = self._compiled.get(key), self._traced.get(key)
        if new is None:  # never traced, so nothing to compare (a compile follows a trace)
            return
        self._compiled[key] = new
        if old is None or (traced and bucketing and _only_rows_changed(old, new)):
            return
        if traced:
            reasons = explain(old, new)
        else:  # same types, new layout: jit lowers again without tracing
            reasons = (
                "the arguments' shardings changed (a parameter the last step left tiled over "
                "the logical cores, or an array placed by hand); this compiles once per layout",
            )
        event = Recompile(name, reasons)
        self._recompiles.append(event)
        logger.info("%s", event)

    def forget(self, key: Any) -> None:
        """Drops what is known of the step ``key``, whose program the strategy let go."""
        self._traced.pop(key, None)
        self._compiled.pop(key, None)

    def stats(self) -> CompileStats:
        return CompileStats(self._compiles, self._hits, tuple(self._recompiles))


def _only_rows_changed(old: Signature, new: Signature) -> bool:
    """Whether ``new`` differs from ``old`` only in the per-replica rows (a new bucket)."""
    return old.structure == new.structure and all(
        (path, dtype, weak) == (new_path, new_dtype, new_weak)
        and shape[:1] + shape[2:] == new_shape[:1] + new_shape[2:]
        for (path, shape, dtype, weak), (new_path, new_shape, new_dtype, new_weak) in zip(
            old.leaves, new.leaves
        )
    )


def _path_name(path: Sequence[Any]) -> str:
    if not path:
        return "args"
    head, rest = path[0], path[1:]
    root = "kwargs" if getattr(head, "idx", 0) == 1 else "args"
    return root + jax.tree_util.keystr(tuple(p for p in rest if _is_user_key(p)))


def _is_user_key(entry: Any) -> bool:
    # PerReplica and Mirrored flatten through one child: leave that step out of the path.
    return not isinstance(entry, jax.tree_util.FlattenedIndexKey)
