"""Compile accounting: how many programs a strategy compiled, and why it compiled again."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable, Sequence
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
class LeafName:
    """A key path entry that names a leaf where the user knows it.

    A value ``run`` passes on the user's behalf (an NNX variable's, under its attribute path)
    carries its name in its key path; compile accounting reports the leaf by that name alone.

    Attributes:
      name: the leaf's name, e.g. ``args[0].layers[2].kernel``.
    """

    name: str

    def __str__(self) -> str:
        return f"[{self.name}]"


@dataclasses.dataclass(frozen=True)
class Signature:
    """The abstract signature jit keys its cache on: structure and each leaf's type.

    Each leaf has its path, shape, dtype, whether the dtype is weak (a Python number's), and
    its kind: ``"replicated"``, or the distributed value's type (``"PerReplica"``).
    """

    structure: Any
    leaves: tuple[tuple[str, tuple[int, ...], str, bool, str], ...]


def signature(tree: PyTree, kind: Callable[[Any], str | None] = lambda x: None) -> Signature:
    """The signature of ``(args, kwargs)`` as seen while tracing.

    ``kind(node)`` names a distributed value's type (``"PerReplica"``), None for anything else.
    """
    nodes = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: kind(x) is not None)[0]
    leaves = []
    for outer, node in nodes:
        node_kind = kind(node) or "replicated"
        for inner, leaf in jax.tree_util.tree_flatten_with_path(node)[0]:
            aval = jax.typeof(leaf)
            leaves.append(
                (
                    _path_name(outer + inner),
                    tuple(aval.shape),
                    str(aval.dtype),
                    bool(aval.weak_type),
                    node_kind,
                )
            )
    return Signature(jax.tree.structure(tree), tuple(leaves))


def explain(old: Signature, new: Signature) -> tuple[str, ...]:
    """Sentences saying how ``new`` differs from ``old``, with a hint at the usual fix."""
    if old.structure != new.structure:
        return _explain_structure(old, new)
    reasons = []
    for (path, shape, dtype, weak, _), (_, new_shape, new_dtype, new_weak, _) in zip(
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


def _explain_structure(old: Signature, new: Signature) -> tuple[str, ...]:
    """Sentences saying how the structure of ``new`` differs from ``old``'s."""
    old_kinds = {path: kind for path, *_, kind in old.leaves}
    new_kinds = {path: kind for path, *_, kind in new.leaves}
    if old_kinds.keys() == new_kinds.keys():
        switched = [p for p in old_kinds if old_kinds[p] != new_kinds[p]]
        if switched:
            return tuple(
                f"{path} switched from {_kind_name(old_kinds[path])} to "
                f"{_kind_name(new_kinds[path])}; pass it the same way on every call (a "
                "replicated value as a plain or replicated array, a per-replica one always "
                "as a PerReplica)"
                for path in switched
            )
    added = sorted(new_kinds.keys() - old_kinds.keys())
    removed = sorted(old_kinds.keys() - new_kinds.keys())
    detail = ", ".join(
        [f"added {', '.join(added)}"] * bool(added)
        + [f"removed {', '.join(removed)}"] * bool(removed)
    )
    if not detail:
        old_args, new_args = old.structure.children(), new.structure.children()
        detail = next(
            (
                difference
                for name, a, b in zip(("args", "kwargs"), old_args, new_args)
                if (difference := _first_difference(a, b, name)) is not None
            ),
            "container types",
        )
    return (
        f"the argument structure changed ({detail}); pass the same pytree structure on every call",
    )


def _kind_name(kind: str) -> str:
    return "a replicated value" if kind == "replicated" else f"a {kind}"


def _first_difference(old: Any, new: Any, path: str) -> str | None:
    """Where two pytree structures first differ, and how: ``args[0] was a tuple, is a list``."""
    old_node, new_node = old.node_data(), new.node_data()
    old_type, old_aux = old_node if old_node is not None else (None, None)
    new_type, new_aux = new_node if new_node is not None else (None, None)
    if old_type is not new_type:
        return f"{path} was {_type_name(old_type)} and is {_type_name(new_type)}"
    if old_aux != new_aux:
        return (
            f"{path}, {_type_name(old_type)}, changed its keys or metadata from {old_aux!r} "
            f"to {new_aux!r}"
        )
    old_children, new_children = old.children(), new.children()
    for i, (a, b) in enumerate(zip(old_children, new_children)):
        key = f"[{old_aux[i]!r}]" if old_type is dict and old_aux is not None else f"[{i}]"
        difference = _first_difference(a, b, path + key)
        if difference is not None:
            return difference
    if len(old_children) != len(new_children):
        return f"{path} had {len(old_children)} children and has {len(new_children)}"
    return None


def _type_name(kind: type | None) -> str:
    return "a leaf" if kind is None else f"a {kind.__name__}"


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

    def __init__(self, max_origins: int = 256):
        self._compiles = 0
        self._hits = 0
        self._recompiles: list[Recompile] = []
        self._traced: dict[Any, Signature] = {}  # the latest trace of each step
        self._compiled: dict[Any, Signature] = {}  # the signature of its latest compile
        self._why_new: dict[Any, str] = {}  # why a new step compiles what another did
        self._origins: dict[Hashable, Any] = {}  # the latest step of each origin, bounded
        self._max_origins = max_origins

    def new_step(self, key: Any, name: str, origin: Hashable | None, reason: str | None) -> None:
        """Records a new step ``key`` for a function of ``origin`` (see ``_cache.origin``).

        Its first compile is a recompile when it has a ``reason`` (an NNX graph that changed),
        or when a step of the same origin was made before: a new function object of the
        same code, a lambda or closure made on each call.
        """
        if reason is None and origin is not None and origin in self._origins:
            reason = (
                f"{name} is a new function object of the same code as one compiled before "
                "(a lambda, closure or functools.partial made on each call); each new object "
                "compiles again: define the function once, outside the loop, and pass what "
                "changes as arguments"
            )
        if reason is not None:
            self._why_new[key] = reason
        if origin is not None:
            self._origins.pop(origin, None)
            self._origins[origin] = key
            while len(self._origins) > self._max_origins:
                del self._origins[next(iter(self._origins))]

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
        if old is None:
            why = self._why_new.pop(key, None)
            if why is not None:
                self._record(Recompile(name, (why,)))
            return
        if traced and bucketing and _only_rows_changed(old, new):
            return
        if traced:
            reasons = explain(old, new)
        else:  # same types, new layout: jit lowers again without tracing
            reasons = (
                "the arguments' shardings changed (a parameter the last step left tiled over "
                "the logical cores, or an array placed by hand); this compiles once per layout",
            )
        self._record(Recompile(name, reasons))

    def _record(self, event: Recompile) -> None:
        self._recompiles.append(event)
        logger.info("%s", event)

    def forget(self, key: Any) -> None:
        """Drops what is known of the step ``key``, whose program the strategy let go."""
        self._traced.pop(key, None)
        self._compiled.pop(key, None)
        self._why_new.pop(key, None)

    def stats(self) -> CompileStats:
        return CompileStats(self._compiles, self._hits, tuple(self._recompiles))


def _only_rows_changed(old: Signature, new: Signature) -> bool:
    """Whether ``new`` differs from ``old`` only in the per-replica rows (a new bucket)."""
    return old.structure == new.structure and all(
        (path, dtype, weak, kind) == (new_path, new_dtype, new_weak, new_kind)
        and shape[:1] + shape[2:] == new_shape[:1] + new_shape[2:]
        for (path, shape, dtype, weak, kind), (
            new_path,
            new_shape,
            new_dtype,
            new_weak,
            new_kind,
        ) in zip(old.leaves, new.leaves)
    )


def _path_name(path: Sequence[Any]) -> str:
    named = [i for i, entry in enumerate(path) if isinstance(entry, LeafName)]
    if named:  # the user's name for the leaf, and what lies below it
        rest = tuple(p for p in path[named[-1] + 1 :] if _is_user_key(p))
        return path[named[-1]].name + jax.tree_util.keystr(rest)
    if not path:
        return "args"
    head, rest = path[0], path[1:]
    root = "kwargs" if getattr(head, "idx", 0) == 1 else "args"
    return root + jax.tree_util.keystr(tuple(p for p in rest if _is_user_key(p)))


def _is_user_key(entry: Any) -> bool:
    # PerReplica and Mirrored flatten through one child: leave that step out of the path.
    return not isinstance(entry, jax.tree_util.FlattenedIndexKey)
