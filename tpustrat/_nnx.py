"""Flax NNX objects as ``run`` arguments: updated in place, as under ``nnx.jit``.

A step that takes an ``nnx.Module``, ``nnx.Optimizer`` or ``nnx.Metric`` and mutates it (an
optimizer update, a metric update, BatchNorm statistics, an RNG stream's counter) changes the
caller's objects when ``run`` returns. ``run`` splits the objects into a graph definition and
their variables (``nnx.flatten``), passes the variables' values through the compiled program
like any replicated argument, merges them back into fresh objects inside the step, and after
the step sets each of the caller's variables to its new value. Shared references between the
arguments survive, because all of them are split together. A loop passes the same objects on
every call: the last call's split is kept, and used again while a check of the objects (each
attribute by identity, each variable's type and metadata) finds the graph unchanged, as
``nnx.cached_partial`` keeps its split for a step's repeated calls.

Inside ``run`` each ``nnx.Rngs`` stream draws keys folded with the replica index, so dropout
masks differ across replicas; the stream's key itself is left as it was and only its counter
advances, identically on every replica, so two runs from one seed are identical.

Nothing here imports flax unless the user already has: a job without NNX never pays for it.
"""

from __future__ import annotations

import functools
import operator
import sys
import weakref
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any

import jax

from tpustrat import _cache
from tpustrat._accounting import LeafName
from tpustrat._mesh import REPLICA_AXIS
from tpustrat._types import PyTree
from tpustrat._values import PerReplica, is_distributed, is_per_replica


def nnx_module() -> ModuleType | None:
    """flax.nnx if the user's program has imported it, else None."""
    return sys.modules.get("flax.nnx")


# The oldest Flax whose NNX tpustrat supports: the Variable API it reads and writes
# (get_value, get_raw_value, set_raw_value), nnx.flatten, and metrics that honour mask=.
OLDEST_NNX_FLAX = (0, 12, 6)


def loaded_nnx() -> ModuleType:
    """flax.nnx, for code that holds NNX objects and so knows the program has imported it.

    Raises:
      RuntimeError: if the installed Flax is older than ``OLDEST_NNX_FLAX``.
    """
    nnx = sys.modules["flax.nnx"]
    _check_flax_version(sys.modules["flax"].__version__)
    return nnx


@functools.cache
def _check_flax_version(version: str) -> None:
    release = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    if release < OLDEST_NNX_FLAX:
        oldest = ".".join(map(str, OLDEST_NNX_FLAX))
        raise RuntimeError(
            f"tpustrat's Flax NNX support needs flax >= {oldest}, and flax {version} is "
            f"installed; upgrade it (pip install -U 'flax>={oldest}', which needs jax >= 0.8.1). "
            "Flax Linen and plain JAX state work with older Flax"
        )


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
    every call and compiles once. A loop passes the same objects on every call: the last
    call's ``Graph`` is kept, and a call that finds it unchanged (``Graph.holds``) skips
    Flax's split. Otherwise the objects' graph definition is nearly always the last one's:
    comparing it with that one costs less than hashing it to look it up (both walk the whole
    graph). At most ``max_size`` definitions are kept, the oldest dropped first.

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
        self._by_graph: list[Lifted] = []  # the most recently used last
        self._graph: Graph | None = None
        self._object_names: list[str] | None = None

    def graph(self, objects: tuple) -> Graph:
        """The graph of ``objects``: the last call's when it still holds, else split anew."""
        graph = self._graph
        if graph is not None and graph.holds(objects):
            return graph
        this = weakref.ref(self)

        def forget() -> None:  # an object died: let its variables go with it
            steps = this()
            if steps is not None:
                steps._graph = None

        self._graph = graph = Graph(objects, forget, self.object_names())
        return graph

    def object_names(self) -> list[str]:
        """The argument paths of the NNX objects, in order (see ``object_names``)."""
        if self._object_names is None:
            self._object_names = object_names(self._structure, self._positions)
        return self._object_names

    def get(self, graph: Graph) -> Lifted:
        """The step for objects of this graph, made on first use."""
        graphdef = graph.graphdef
        last = self._last
        if last is not None and last.graphdef == graphdef:
            return last
        # Found by equality, not by hash: some Flax releases' graph definitions do not hash
        # (flax 0.12.6 hashes a list-valued static attribute, an nnx.MultiMetric's names).
        found = [i for i, kept in enumerate(self._by_graph) if kept.graphdef == graphdef]
        if found:
            lifted = self._by_graph.pop(found[0])
        else:
            lifted = Lifted(self._fn, graphdef, self._structure, self._positions, graph.direct)
            if last is not None:  # the objects' graph changed since the last call
                lifted.recompile_reason = graph_change(last.graphdef, graphdef, self.object_names())
        self._by_graph.append(lifted)
        del self._by_graph[: -self._max_size]  # the oldest first
        self._last = lifted
        return lifted


class Graph:
    """The NNX objects of a ``run`` call split into a graph definition and their leaves.

    ``leaves`` are what Flax's split gives, in its order: the objects' own ``nnx.Variable`` s
    (and any plain value an object holds as data). ``values()`` reads what the compiled step
    takes and ``write_back`` sets the step's results, without walking the graph. ``holds``
    tells whether a later call's objects still have this graph: the same objects, each Flax
    object with the very attributes it had (compared by identity), each list and dict inside
    with the same items, each variable with the same type, metadata and kind of value.
    Anything that would change the graph definition or the leaves changes one of those, so a
    call that passes ``holds`` would split to this same graph. Objects whose graph holds
    something that check cannot compare (a pytree node of another type, a graph node that is
    not a Flax object, a leaf that is not a plain variable) are split on every call.

    Args:
      objects: the NNX objects among the arguments.
      on_death: called when one of ``objects`` is garbage collected; the owner then drops
        this graph, which holds the variables.
      object_names: the argument paths of ``objects`` (``args[0]``), to name the leaves.
    """

    def __init__(self, objects: tuple, on_death: Callable[[], None], object_names: list[str]):
        nnx = loaded_nnx()
        self.graphdef, flat = nnx.flatten(objects)
        self.paths: tuple[tuple, ...] = tuple(flat.paths)
        self.names = tuple(_leaf_name(object_names, path) for path in self.paths)
        self.leaves = tuple(flat.leaves)
        # Plain variables take their new values one by one; a graph with anything else (a
        # value leaf, an array reference) passes its leaves whole and goes through nnx.update.
        self.direct = all(
            isinstance(v, nnx.Variable) and not v.hijax and not v.ref for v in self.leaves
        )
        self._roots = tuple(weakref.ref(obj, lambda _: on_death()) for obj in objects)
        self._watch = _Watch(objects, self.leaves) if self.direct else None

    def holds(self, objects: tuple) -> bool:
        """Whether ``objects`` split now would give this graph definition and leaves."""
        watch = self._watch
        return (
            watch is not None
            and len(objects) == len(self._roots)
            and all(map(operator.is_, objects, [root() for root in self._roots]))
            and watch.holds(self.leaves)
        )

    def values(self) -> LeafValues:
        """What the compiled step takes: the variables' values, or the leaves themselves."""
        if self.direct:
            return LeafValues(self.names, [v.get_raw_value() for v in self.leaves])
        return LeafValues(self.names, list(self.leaves))


@jax.tree_util.register_pytree_with_keys_class
class LeafValues:
    """The values of NNX objects' leaves, each keyed by its name: what ``Lifted`` takes.

    Compile accounting reports a leaf by its name (``args[0].layers[2].kernel``), the path of
    the argument that holds it followed by its attributes.

    Args:
      names: each leaf's name.
      values: each leaf's value, in the same order.
    """

    __slots__ = ("names", "values")

    def __init__(self, names: tuple[str, ...], values: list):
        self.names, self.values = names, values

    def tree_flatten(self) -> tuple[list, tuple[str, ...]]:
        return self.values, self.names

    def tree_flatten_with_keys(self) -> tuple[list, tuple[str, ...]]:
        return [(LeafName(n), v) for n, v in zip(self.names, self.values)], self.names

    @classmethod
    def tree_unflatten(cls, names: tuple[str, ...], values: Any) -> LeafValues:
        return cls(names, list(values))


class _Watch:
    """What must stay the same for NNX objects to keep their graph: see ``Graph.holds``.

    Args:
      objects: the NNX objects, whose graph is walked once, here.
      variables: their variables, in Flax's order.
    """

    def __init__(self, objects: tuple, variables: tuple):
        nnx = loaded_nnx()
        base = getattr(nnx, "Pytree", None) or nnx.Object
        # (object, its type, attribute names, attribute values) for each Flax object.
        self.objects: list[tuple[weakref.ref, type, tuple, tuple]] = []
        self.containers: list[tuple[Any, tuple]] = []  # each list, dict or State, its items
        self.states: list[tuple[Any, tuple[bool, bool]]] = []  # each object's PytreeState
        self.supported = True
        seen: set[int] = set()
        stack: list[Any] = [objects]
        while stack and self.supported:
            node = stack.pop()
            if id(node) in seen or node is None or isinstance(node, nnx.Variable):
                continue
            seen.add(id(node))
            kind = type(node)
            if isinstance(node, base):
                attributes = vars(node)
                self.objects.append(
                    (weakref.ref(node), kind, tuple(attributes), tuple(attributes.values()))
                )
                stack.extend(attributes.values())
            elif kind is list or kind is dict or kind is nnx.State:  # an optimizer's state
                items = _items(node)
                self.containers.append((node, items))
                stack.extend(items)
            elif isinstance(node, tuple):
                stack.extend(node)
            elif kind.__name__ == "PytreeState" and kind.__module__.startswith("flax."):
                self.states.append((node, (node.initializing, node.is_setup)))
            elif nnx.graph.is_graph_node(node) or not jax.tree_util.treedef_is_leaf(
                jax.tree.structure(node)
            ):
                self.supported = False  # contents this cannot compare
        self.variable_types = tuple(map(type, variables))
        self.value_types = tuple(type(v.get_raw_value()) for v in variables)
        self.metadata = [v.get_metadata() for v in variables]

    def holds(self, variables: tuple) -> bool:
        """Whether every watched object, container and variable is as it was."""
        if not self.supported:
            return False
        for ref, kind, keys, values in self.objects:
            obj = ref()
            if obj is None or type(obj) is not kind:
                return False
            attributes = vars(obj)
            if tuple(attributes) != keys or not all(map(operator.is_, attributes.values(), values)):
                return False
        for container, items in self.containers:
            now = _items(container)
            if len(now) != len(items) or not all(map(operator.is_, now, items)):
                return False
        for state, flags in self.states:
            if (state.initializing, state.is_setup) != flags:
                return False
        return (
            tuple(map(type, variables)) == self.variable_types
            and tuple(type(v.get_raw_value()) for v in variables) == self.value_types
            and [v.get_metadata() for v in variables] == self.metadata
        )


def _items(container: Any) -> tuple:
    """A list's items, or a dict's (a State's own dict's) keys then values, by identity."""
    kind = type(container)
    if kind is list:
        return tuple(container)
    mapping = container if kind is dict else container.raw_mapping  # State wraps on reads
    return (mapping, *mapping, *mapping.values())


class Lifted:
    """``fn`` over NNX objects, as a function of their leaves: what ``run`` compiles.

    One instance per (function, graph definition, argument structure), kept by the strategy
    (``LiftedSteps``), so that ``run`` sees the same callable on every call and compiles once.
    It takes what ``Graph.values`` gives and returns the step's output with the objects' new
    values in the same form; when the step changed the graph (a variable added, metadata
    changed), or the graph is not ``direct``, it returns their whole new state instead.

    Args:
      fn: the user's step.
      graphdef: the graph definition of the NNX objects among the arguments, split together.
      structure: the treedef of ``(args, kwargs)`` with each NNX object as a leaf.
      positions: the indices of those leaves that are NNX objects, in order.
      direct: whether the graph's leaves are all plain variables (``Graph.direct``).
    """

    def __init__(
        self, fn: Callable[..., PyTree], graphdef: Any, structure: Any, positions, direct: bool
    ):
        self.fn, self.graphdef, self.structure = fn, graphdef, structure
        self.positions, self.direct = tuple(positions), direct
        self.__qualname__ = getattr(fn, "__qualname__", None) or repr(fn)
        origin = _cache.origin(fn)
        self.step_origin = None if origin is None else (origin, structure)
        # Why its first compile is a recompile: set when the objects' graph changed.
        self.recompile_reason: str | None = None

    def __call__(self, values: LeafValues, leaves: list) -> tuple[PyTree, PyTree]:
        nnx = loaded_nnx()
        objects = nnx.unflatten(self.graphdef, list(values.values))
        leaves = list(leaves)
        for position, obj in zip(self.positions, objects):
            leaves[position] = obj
        args, kwargs = self.structure.unflatten(leaves)
        keys = jax.tree.map(lambda k: k, nnx.state(objects, nnx.RngKey))  # a snapshot
        replica = jax.lax.axis_index(REPLICA_AXIS)
        nnx.update(objects, jax.tree.map(lambda k: jax.random.fold_in(k, replica), keys))
        out = self.fn(*args, **kwargs)
        nnx.update(objects, keys)  # the stream's key stays replicated; its counter advanced
        if self.direct:
            graphdef, new_values = nnx.flatten(objects, with_paths=False)
            if graphdef == self.graphdef:  # in the form taken, so run keeps each one's layout
                return out, LeafValues(values.names, list(new_values))
        return out, nnx.state(objects)


def find_objects(inputs: PyTree) -> tuple[tuple, Any, tuple, list] | None:
    """Finds the NNX objects in ``(args, kwargs)``; None when there are none.

    Returns:
      ``(objects, structure, positions, leaves)``: the objects, the treedef of ``inputs``
      with each object as a leaf, the objects' indices among its leaves, and those leaves
      with the objects replaced by None.
    """
    if nnx_module() is None:
        return None
    leaves, structure = jax.tree.flatten(
        inputs, is_leaf=lambda x: is_nnx_object(x) or is_distributed(x)
    )
    positions = tuple(i for i, leaf in enumerate(leaves) if is_nnx_object(leaf))
    if positions:
        loaded_nnx()  # refuses a Flax too old for NNX support
    if not positions:
        return None
    objects = tuple(leaves[i] for i in positions)
    for i in positions:
        leaves[i] = None
    return objects, structure, positions, leaves


def object_names(structure: Any, positions: tuple) -> list[str]:
    """The argument paths (``args[0]``, ``kwargs['model']``) of the NNX objects, in order."""
    indices = structure.unflatten(list(range(structure.num_leaves)))
    paths = {i: path for path, i in jax.tree_util.tree_flatten_with_path(indices)[0]}
    names = []
    for position in positions:
        head, *rest = paths[position]
        root = "kwargs" if head.idx == 1 else "args"
        names.append(root + jax.tree_util.keystr(tuple(rest)))
    return names


def split_objects(inputs: PyTree) -> tuple[Any, Any, tuple, Any, list] | None:
    """``find_objects``, with the objects split: None when there are none.

    Returns:
      ``(graphdef, state, objects, (structure, positions), leaves)``: the objects' graph
      definition and state (``nnx.split``, together), then what ``find_objects`` gives.
    """
    found = find_objects(inputs)
    if found is None:
        return None
    objects, structure, positions, leaves = found
    graphdef, state = loaded_nnx().split(objects)
    return graphdef, state, objects, (structure, positions), leaves


def write_back(
    graph: Graph, objects: tuple, new: PyTree, object_names: Callable[[], Sequence[str]]
) -> None:
    """Writes what ``Lifted`` returned (``new``) into the caller's ``objects`` of ``graph``.

    ``LeafValues`` hold one new value per variable, in ``graph.leaves``'s order: each variable takes
    its value as ``nnx.update`` would give it, without walking the objects' graph. A state
    (the step changed the graph, or it is not ``direct``) goes through ``nnx.update``.

    Raises:
      ValueError: if the step left some of the objects' state different on each replica;
        ``object_names()`` names the arguments that hold the objects, for the message.
    """
    if type(new) is LeafValues:
        new = new.values
        if any(type(value) is PerReplica for value in new):
            # Variables that came in holding blocks (ts.shard_params) go out holding blocks.
            varying = [
                name
                for name, leaf, value in zip(graph.names, graph.leaves, new)
                if isinstance(value, PerReplica) and not any(map(is_per_replica, _raw_leaves(leaf)))
            ]
            if varying:
                _refuse_varying(varying)
        for variable, value in zip(graph.leaves, new):
            # As nnx.update sets a variable: setting the attribute checks the trace once.
            variable.set_raw_value(value, _unsafe_bypass_check=True)
        return
    paths = jax.tree_util.tree_flatten_with_path(new, is_leaf=is_per_replica)[0]
    varying = [path for path, leaf in paths if isinstance(leaf, PerReplica)]
    if varying:
        names = object_names()
        # Variables that came in holding blocks (ts.shard_params) go out holding blocks.
        given = [
            name
            for name, leaf in zip(graph.names, graph.leaves)
            if any(map(is_per_replica, _raw_leaves(leaf)))
        ]
        varying = [_leaf_name(names, tuple(map(key_of, path))) for path in varying]
        varying = [
            n for n in varying if not any(n == g or n.startswith((g + ".", g + "[")) for g in given)
        ]
        if varying:
            _refuse_varying(varying)
    loaded_nnx().update(objects, new)


def _raw_leaves(leaf: Any) -> list[Any]:
    """The leaves of a variable's value (or of a plain leaf), PerReplica kept whole."""
    raw = leaf.get_raw_value() if isinstance(leaf, loaded_nnx().Variable) else leaf
    return jax.tree.leaves(raw, is_leaf=is_per_replica)


def graph_change(old: Any, new: Any, object_names: Sequence[str]) -> str:
    """A sentence saying how the NNX graph definition ``new`` differs from ``old``."""
    before, after = _describe(old, object_names), _describe(new, object_names)
    if before is None or after is None:
        return "the NNX objects' graph definition changed"
    changes = [f"{name} was added ({after[name][1]})" for name in _tops(after.keys() - before)]
    changes += [f"{name} was removed" for name in _tops(before.keys() - after)]
    for name in before.keys() & after.keys():
        (kind, was, *rest), (new_kind, now, *new_rest) = before[name], after[name]
        if (kind, was) != (new_kind, now):
            changes.append(f"{name} changed from {was} to {now}")
        elif rest != new_rest:
            changes.append(f"{name}'s metadata changed from {rest[0]} to {new_rest[0]}")
    if not changes:
        return "the NNX objects' graph definition changed (shared references between them)"
    shown = sorted(changes)[:3]
    more = f", and {len(changes) - 3} more" if len(changes) > 3 else ""
    return (
        f"the NNX objects' graph changed: {'; '.join(shown)}{more}; each graph compiles "
        "once (model.train() and model.eval() are two), but a graph that changes on every "
        "call compiles on every call"
    )


def _tops(names: Iterable[str]) -> list[str]:
    """``names`` without those inside another of them (``a.b`` inside ``a``)."""
    tops: list[str] = []
    for name in sorted(names):
        if not any(name.startswith((top + ".", top + "[")) for top in tops):
            tops.append(name)
    return tops


def _describe(graphdef: Any, object_names: Sequence[str]) -> dict[str, tuple] | None:
    """Each node, variable and static attribute of a graph definition, by name; or None.

    Reads Flax's ``GraphDef`` (its ``nodes`` and ``attributes``, in the order of Flax's
    walk); anything else than that walk gives None.
    """
    described: dict[str, tuple] = {}
    nodes, attributes = iter(graphdef.nodes), iter(graphdef.attributes)

    def visit(name: str) -> None:
        node = next(nodes)
        kind = type(node).__name__
        if kind == "VariableDef":
            described[name] = ("variable", node.type.__name__, dict(node.metadata))
        elif kind == "NodeDef":
            described[name] = ("node", getattr(node.type, "__name__", str(node.type)))
            for _ in range(node.num_attributes):
                key, attribute = next(attributes)
                child = _child_name(name, key, object_names)
                attribute_kind = type(attribute).__name__
                if attribute_kind == "NodeAttr":
                    visit(child)
                    if str(key).startswith("_pytree__"):
                        described.pop(child, None)
                elif str(key).startswith("_pytree__"):  # Flax's own books: not the user's
                    continue
                elif attribute_kind == "Static":
                    described[child] = ("static", repr(attribute.value))
                else:
                    described[child] = ("leaf", "a value")
        else:  # NodeRef (a shared reference) and the rest
            described[name] = ("reference", kind)

    try:
        visit("")
    except (StopIteration, AttributeError, TypeError):
        return None
    return described


def _child_name(name: str, key: Any, object_names: Sequence[str]) -> str:
    if not name:  # the tuple of the objects
        return object_names[key]
    return name + (f".{key}" if isinstance(key, str) else f"[{key}]")


def _leaf_name(object_names: Sequence[str], path: tuple) -> str:
    """``args[0].layers[2].kernel``: a path in Flax's split of the objects, by argument."""
    head, *rest = path
    return object_names[head] + "".join(
        f".{key}" if isinstance(key, str) else f"[{key}]" for key in rest
    )


def key_of(entry: Any) -> Any:
    """The attribute name, key or index of one entry of a JAX key path."""
    for field in ("key", "name", "idx"):
        if hasattr(entry, field):
            return getattr(entry, field)
    return entry


def _refuse_varying(names: list[str]) -> None:
    raise ValueError(
        f"the step left NNX state that differs between replicas: {', '.join(names)}; "
        "an object passed to strategy.run must end the step the same on every replica. "
        "All-reduce the gradients before the optimizer update "
        "(ts.get_replica_context().all_reduce('mean', grads)), and give BatchNorm "
        f"axis_name=ts.REPLICA_AXIS ({REPLICA_AXIS!r}) so its statistics are global"
    )
