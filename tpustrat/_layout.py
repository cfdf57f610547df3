"""Layout rules: parameters placed over each replica's logical cores by name pattern.

``ts.LayoutRules`` maps regular expressions over a leaf's path (its keys joined with ``/``:
``params/Dense_0/kernel`` in a Linen tree, ``layers/0/kernel`` in an NNX module) to a
partition spec over the logical cores, as Keras 3's ``LayoutMap`` and MaxText's logical-axis
rules do. ``strategy.place_params`` puts every leaf where its first matching rule says, on the
strategy's mesh; a leaf no rule matches stays whole on every core. ``run`` takes placed
arrays as they are and gives back the state it updates in the same layouts (see
``_run._keep_layouts``), so a placement holds from step to step with one compiled program.

A spec names only the logical cores, so a leaf's spec is independent of what the replica
axis carries: a whole leaf has the same tiles on every replica, and a ``PerReplica`` leaf (a
block per replica, parameters sharded over the replicas) has its block tiled over each
replica's cores, laid out ``P("replica", *spec)``. Parameters ``ts.shard_params`` cut into
blocks compose this way (2-D, replicas x cores): a ``ts.ReplicaShard``'s blocks go by the
parameter's path, and the spec applies to each replica's block, which has the whole leaf's
rank; ``gather_params`` inside ``run`` all-gathers the tiled blocks over the replicas.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tpustrat import _mesh, _nnx, _values
from tpustrat._checks import describe
from tpustrat._types import PyTree
from tpustrat._values import PerReplica, is_per_replica

_CORES = _mesh.LOGICAL_CORE_AXIS


@dataclasses.dataclass(frozen=True)
class LayoutRules:
    """Partition specs over each replica's logical cores, chosen by a leaf's path.

    Each rule is ``(pattern, spec)``: ``pattern`` is a regular expression searched
    (``re.search``) in the leaf's path, its keys joined with ``/`` (``params/Dense_0/kernel``,
    ``layers/0/kernel``; an optimizer's moments of that parameter, ``opt_state/0/mu/...``, match
    the same pattern), and ``spec`` gives one entry per dimension of the leaf: ``None`` to keep
    the dimension whole, ``"logical_core"`` to cut it into one tile per core (on a mesh whose
    cores are factored into sub-axes, ``strategy.logical_core_axes``, the name stands for all of
    them). The first rule that matches wins; a leaf no rule matches stays whole on every core.

    ``strategy.place_params`` (and ``partition_specs``) refuse, naming the leaf and the rule: a
    spec whose length is not the leaf's rank, a dimension that the number of logical cores does
    not divide (nothing is padded: pad the dimension, or leave the leaf whole), and a rule that
    matches no leaf of the tree (a misspelt pattern would otherwise leave a layer whole
    silently). ``describe`` prints which rule placed which leaf.

    Args:
      rules: a sequence of ``(pattern, spec)`` pairs; ``spec`` a tuple or list of ``None`` and
        ``"logical_core"`` entries, or a ``jax.sharding.PartitionSpec`` of them.

    Example:
      >>> rules = ts.LayoutRules([(r"dense_\\d+/kernel", (None, "logical_core"))])
      >>> params = {"dense_0": {"kernel": np.ones((4, 8)), "bias": np.ones(8)}}
      >>> specs = rules.partition_specs(params)
      >>> tuple(specs["dense_0"]["kernel"]), tuple(specs["dense_0"]["bias"])
      ((None, 'logical_core'), ())
    """

    rules: tuple[tuple[str, P], ...]

    def __init__(self, rules: Sequence[tuple[str, Sequence[str | None] | P]]):
        if isinstance(rules, (str, bytes, dict)) or not isinstance(rules, Sequence):
            raise TypeError(
                f"LayoutRules takes a list of (pattern, spec) pairs, got {describe(rules)}; "
                'e.g. ts.LayoutRules([(r"dense_\\d+/kernel", (None, "logical_core"))])'
            )
        checked = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, (tuple, list)) or len(rule) != 2:
                raise TypeError(
                    f"rule {i} must be a (pattern, spec) pair, got {describe(rule)}; e.g. "
                    '(r"kernel", (None, "logical_core"))'
                )
            pattern, spec = rule
            checked.append((_check_pattern(i, pattern), _check_spec(i, pattern, spec)))
        object.__setattr__(self, "rules", tuple(checked))

    def partition_specs(self, tree: PyTree, num_logical_cores: int | None = None) -> PyTree:
        """The spec over the logical cores of every leaf of ``tree``, by the first matching rule.

        Args:
          tree: a pytree of arrays (parameters, a train state) or Flax NNX objects, whose
            ``nnx.Variable`` s are the leaves.
          num_logical_cores: if given, every split dimension is checked to be divisible by it.

        Returns:
          ``tree``'s structure with a ``PartitionSpec`` for each leaf; an NNX object's place
          holds its ``nnx.State`` with a spec for each variable.

        Raises:
          ValueError: for a spec of the wrong rank, a dimension the cores do not divide, or a
            rule that matches no leaf.
        """
        named, rebuild = _named_leaves(tree)
        placements = self._assign(named, num_logical_cores)
        return rebuild([placement.spec for placement in placements])

    def describe(self, tree: PyTree, num_logical_cores: int | None = None) -> str:
        """A table of every leaf of ``tree``: its path, shape, the rule that placed it and the spec.

        Problems that ``place_params`` would refuse are shown on the leaf's line, and rules
        that match no leaf are listed at the end; nothing is raised.

        Example:
          >>> rules = ts.LayoutRules([(r"kernel", (None, "logical_core")), (r"embed", (None,))])
          >>> print(rules.describe({"dense": {"kernel": np.ones((4, 8)), "bias": np.ones(8)}}))
          dense/bias    (8,)    default  P()
          dense/kernel  (4, 8)  rule 0   P(None, 'logical_core')  'kernel'
          rule 1 'embed' matches no leaf
        """
        named, _ = _named_leaves(tree)
        placements = self._assign(named, num_logical_cores, strict=False)
        rows = []
        for (path, leaf), placement in zip(named, placements):
            rule = "default" if placement.rule is None else f"rule {placement.rule}"
            spec = "P(" + ", ".join(map(repr, placement.spec)) + ")"
            note = "" if placement.rule is None else repr(self.rules[placement.rule][0])
            if placement.problem:
                note = f"{note}  ! {placement.problem}"
            rows.append([path, str(_shape(leaf)), rule, spec, note])
        widths = [max((len(row[c]) for row in rows), default=0) for c in range(4)]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, [*widths, 0])).rstrip() for row in rows
        ]
        used = {placement.rule for placement in placements}
        lines += [
            f"rule {i} {pattern!r} matches no leaf"
            for i, (pattern, _) in enumerate(self.rules)
            if i not in used
        ]
        return "\n".join(lines)

    def _assign(
        self, named: list[tuple[str, Any]], cores: int | None, strict: bool = True
    ) -> list[_Placement]:
        """The placement of each ``(path, leaf)``; with ``strict``, the first problem raises."""
        placements, used = [], set()
        for path, leaf in named:
            shape = _shape(leaf)
            for index, (pattern, spec) in enumerate(self.rules):
                if re.search(pattern, path):
                    used.add(index)
                    problem = _problem(path, shape, index, pattern, spec, cores)
                    if problem and strict:
                        raise ValueError(problem)
                    placements.append(_Placement(index, P() if problem else spec, problem))
                    break
            else:
                placements.append(_Placement(None, P(), None))
        unmatched = [(i, pattern) for i, (pattern, _) in enumerate(self.rules) if i not in used]
        if unmatched and strict:
            paths = [path for path, _ in named]
            shown = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
            raise ValueError(
                "layout rule(s) "
                + ", ".join(f"{i} {pattern!r}" for i, pattern in unmatched)
                + f" match no leaf of the tree, whose paths are: {shown or '(no leaves)'}; "
                "fix the pattern (it is searched in the path, keys joined with '/'), or drop "
                "the rule; rules.describe(tree) lists every path"
            )
        return placements


@dataclasses.dataclass(frozen=True)
class _Placement:
    rule: int | None  # the index of the rule that matched, None for the default
    spec: P
    problem: str | None


def place(tree: PyTree, rules: LayoutRules, mesh: Mesh) -> PyTree:
    """``strategy.place_params``: every leaf of ``tree`` laid out over the cores by ``rules``.

    Leaves go onto ``mesh`` (the strategy's) with their rule's spec, ``"logical_core"``
    spelled as the mesh's core axes (behind the replica axis for a PerReplica's stacked
    blocks), the sharding ``run`` keeps for the state it updates; on a mesh of one core per
    replica no leaf is tiled. NNX objects are updated in place and returned
    themselves.
    """
    if not isinstance(rules, LayoutRules):
        raise TypeError(
            f"place_params takes a ts.LayoutRules, got {describe(rules)}; build one with "
            'ts.LayoutRules([(r"kernel", (None, "logical_core"))])'
        )
    tree = _values.unwrap_mirrored(tree)
    if _nnx.split_objects(tree) is None:
        _values.check_array_leaves("place_params", tree, "tree")
    cores = _mesh.num_cores(mesh)
    named, rebuild = _named_leaves(tree)
    placements = rules._assign(named, cores)

    def put(leaf: Any, spec: P) -> Any:
        stacked = isinstance(leaf, PerReplica)
        entries = [_mesh.REPLICA_AXIS] if stacked else []
        if cores > 1 and _CORES in spec:
            entries += list(spec)
            while entries[-1] is None:  # as JAX writes the layouts of a program's outputs
                entries.pop()
        if not entries:
            return _values.replicate(leaf, mesh)
        sharding = NamedSharding(mesh, _mesh.spell_cores(P(*entries), mesh))
        array = leaf.stacked if stacked else leaf
        if not (isinstance(array, jax.Array) and array.sharding == sharding):
            array = _values.put(
                np.array(array) if isinstance(array, np.ndarray) else array, sharding
            )
        return PerReplica.from_stacked(array) if stacked else array

    placed = [put(leaf, placement.spec) for (_, leaf), placement in zip(named, placements)]
    return rebuild(placed, write=True)


def _named_leaves(tree: PyTree):
    """``[(path, leaf)]`` of ``tree`` and a function rebuilding it from new leaves.

    Paths are keys joined with ``/``. An NNX object's leaves are its variables' values, under
    the object's own path; ``rebuild(leaves, write=True)`` writes them into the objects (all
    split together, so a variable two objects share is one leaf) and returns ``tree``.
    """
    split = _nnx.split_objects(tree)
    if split is None:
        pairs, structure = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_per_replica)
        named = [(_path_name(path), leaf) for path, leaf in pairs]
        return named, lambda leaves, write=False: structure.unflatten(leaves)
    _, state, objects, (_, positions), _ = split
    variable_type = _nnx.loaded_nnx().Variable

    def is_variable(x: Any) -> bool:
        return isinstance(x, variable_type)

    def is_node(x: Any) -> bool:
        return _nnx.is_nnx_object(x) or is_per_replica(x)

    nodes = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]
    plain = [(i, _path_name(path), leaf) for i, (path, leaf) in enumerate(nodes)]
    object_paths = [plain[i][1] for i in positions]
    variables = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_variable)[0]
    values, state_structure = jax.tree.flatten(state, is_leaf=is_per_replica)
    # A ts.ReplicaShard in an NNX object's state (an nnx.Optimizer's moments of sharded
    # Params) is a node of the object's graph holding its blocks' variable under "blocks".
    shards = {
        (k, *node_path)
        for k, obj in enumerate(objects)
        for node_path, node in _nnx.loaded_nnx().iter_graph(obj)
        if _is_replica_shard(node)
    }
    named = []
    for path, variable in variables:
        prefix = object_paths[path[0].key]  # the object's index among those split together
        keys = tuple(getattr(key, "key", key) for key in path)
        if keys[:-1] in shards and keys[-1] == "blocks":
            path = path[:-1]  # named as the parameter it cuts
        name = "/".join(p for p in (prefix, _path_name(path[1:])) if p)
        named += [(name, value) for value in jax.tree.leaves(variable, is_leaf=is_per_replica)]
    if len(named) != len(values):
        raise TypeError(
            f"place_params found {len(values)} arrays in the NNX objects' state but "
            f"{len(named)} in their variables; place a state whose variables each hold one array"
        )
    count = len(named)
    plain = [(i, name, leaf) for i, name, leaf in plain if i not in positions]
    named += [(name, leaf) for _, name, leaf in plain]

    def rebuild(leaves: list, write: bool = False) -> PyTree:
        state = state_structure.unflatten(leaves[:count])
        flat, structure = jax.tree.flatten(tree, is_leaf=is_node)
        if write:
            _nnx.loaded_nnx().update(objects, state)
        else:  # each object's place takes its state
            for k, i in enumerate(positions):
                flat[i] = state[k]
        for (i, _, _), value in zip(plain, leaves[count:]):
            flat[i] = value
        return structure.unflatten(flat)

    return named, rebuild


def _is_replica_shard(node: Any) -> bool:
    """Whether ``node`` is a ``ts.ReplicaShard`` (defined on this module's floor, in
    ``_sharded_update``, so known by its fields)."""
    return type(node).__name__ == "ReplicaShard" and all(
        hasattr(node, field) for field in ("blocks", "shape", "axis")
    )


def _shape(leaf: Any) -> tuple[int, ...]:
    """A leaf's shape; a PerReplica's is that of one replica's component."""
    return leaf.stacked.shape[1:] if isinstance(leaf, PerReplica) else np.shape(leaf)


def _path_name(path: tuple) -> str:
    """``path``'s keys joined with ``/``. The blocks of a ``ts.ReplicaShard`` (a pytree node
    with one child, its ``blocks`` attribute) are named as the parameter they cut, so that a
    rule for ``dense/kernel`` places the parameter whether it is sharded over the replicas
    (``ts.shard_params``) or whole."""
    if path and path[-1] == jax.tree_util.GetAttrKey("blocks"):
        path = path[:-1]
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _check_pattern(index: int, pattern: Any) -> str:
    if not isinstance(pattern, str):
        raise TypeError(
            f"rule {index}'s pattern must be a regular expression string, got "
            f'{describe(pattern)}; e.g. r"dense_\\d+/kernel"'
        )
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"rule {index}'s pattern {pattern!r} is not a regular expression ({error}); fix it, "
            "or escape it with re.escape"
        ) from None
    return pattern


def _check_spec(index: int, pattern: str, spec: Any) -> P:
    if not isinstance(spec, (tuple, list, P)):
        raise TypeError(
            f"rule {index} ({pattern!r}) has spec {describe(spec)}; give one entry per "
            'dimension of the leaf, None or "logical_core", e.g. (None, "logical_core")'
        )
    entries = []
    for entry in spec:
        names = entry if isinstance(entry, tuple) else (entry,)
        if entry is None or names == ():
            entries.append(None)
            continue
        for name in names:
            if name == _CORES:
                continue
            if name == _mesh.REPLICA_AXIS or (isinstance(name, str) and "." in name):
                why = (
                    "the replica axis is data parallelism's, and every replica holds the same tiles"
                    if name == _mesh.REPLICA_AXIS
                    else "a rule names all of a replica's cores as one axis, whatever sub-axes "
                    "a strategy's mesh factors them into"
                )
            else:
                why = "it is not an axis of the mesh"
            raise ValueError(
                f"rule {index} ({pattern!r}) has spec {tuple(spec)} naming axis {name!r}: {why}; "
                f'name only "{_CORES}" (or None for a dimension kept whole)'
            )
        entries.append(_CORES)
    if (count := entries.count(_CORES)) > 1:
        raise ValueError(
            f"rule {index} ({pattern!r}) has spec {tuple(spec)}, which cuts {count} "
            f'dimensions over "{_CORES}"; a leaf can be cut over the cores along one dimension'
        )
    return P(*entries)


def _problem(
    path: str, shape: tuple, index: int, pattern: str, spec: P, cores: int | None
) -> str | None:
    """Why ``spec`` cannot place a leaf of ``shape``, or None."""
    if len(spec) != len(shape):
        return (
            f"layout rule {index} ({pattern!r}) gives {path} (shape {shape}, rank {len(shape)}) "
            f"the spec {tuple(spec)} of rank {len(spec)}; give one entry per dimension, or "
            "make the pattern match only leaves of that rank"
        )
    for axis, (size, entry) in enumerate(zip(shape, spec)):
        if entry is not None and cores is not None and size % cores:
            return (
                f"layout rule {index} ({pattern!r}) cuts dimension {axis} of {path} (shape "
                f"{shape}) over {cores} logical cores, but {size} is not divisible by {cores}; "
                "pad that dimension to a multiple of the cores, or leave the leaf whole"
            )
    return None
