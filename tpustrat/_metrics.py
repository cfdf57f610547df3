"""Metrics that aggregate on read: per-replica accumulators, summed when the host reads them.

Every ``nnx.metrics.MetricState`` variable of the Flax NNX objects passed to ``run`` (the
``total`` and ``count`` of an ``nnx.metrics.Average``, the metrics of an ``nnx.MultiMetric``) is
an accumulator held per replica, as tf.distribute's ``SyncOnRead`` variables are. Its whole
value is the sum of the replicas' blocks. Entering ``run``, a variable holding a whole value
``v`` is laid out as the blocks ``[v, 0, 0, ...]``, one per replica (an array of shape
``(replicas, *shape)`` sharded over the replica axis); inside the step each replica sees its
own block and adds its rows' contribution to it with no collective. After ``run`` the variable
holds the per-replica array, and reading it on the host (``metric.compute()``,
``metric.total[...]``) sums the blocks in one small compiled reduction, whose replicated result
every process of a job reads alike. Setting it on the host (``metric.reset()``) stores a whole
value again. Inside the step a read gives the replica's own block, as ``SyncOnRead`` does in
replica context.

Summing blocks is right only for additive updates, so the compiled step is checked
(``check_step``): each accumulator must leave the step unchanged or as ``block + d``, where
``d`` depends on no accumulator (``check_additive``); and ``d`` must not be the same on every
replica because of a collective, which the sum would count once per replica. That last check
looks at each value the step adds, and at each accumulator's whole update; a collective's
result added inside a loop or call together with replica-local values is not seen. A ``d`` the
same on every replica without a collective (a count of rows, a constant) is taken as each
replica's own contribution.

The variables' class becomes a subclass of their own (made once per class, so
``isinstance(v, MetricState)`` holds), whose ``get_value`` and ``set_value`` sum and store.
The swap changes the objects' graph definition, so ``run`` splits objects it has not seen
once more (``adopt``); the split it keeps between calls (``_nnx.Graph``) then carries each
accumulator's position, and a later call lays out only those, whichever form the step returns
its new values in (``_nnx.LeafValues``: at the same position; a state: at the same path).
Which raw values are tpustrat's per-replica arrays is kept by the arrays' identity in a weak
table, never guessed from a shape; ``copy.deepcopy`` of an NNX object copies those arrays, and
the copy's accumulators read as blocks (``nnx.clone`` shares them and reads the sum). Nothing
here imports flax unless the user already has.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Collection, Generator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tpustrat import _jaxpr, _nnx, _replication
from tpustrat._jaxpr import primitives as prim
from tpustrat._mesh import REPLICA_AXIS
from tpustrat._types import PyTree
from tpustrat._values import PerReplica, is_per_replica

# The per-replica arrays tpustrat wrote into accumulators, by identity (id -> the array itself;
# Flax variables take no weak references, so the arrays are the keys). An entry goes with its
# array. A variable holding one of them, as ``run`` left it or as ``nnx.split``, ``nnx.merge``
# and ``nnx.state`` pass it on, holds blocks; one holding any other array (set on the host,
# restored, replicated) holds a whole value.
_BLOCKS: weakref.WeakValueDictionary[int, jax.Array] = weakref.WeakValueDictionary()
_ON_READ: dict[type, type] = {}  # a MetricState class -> its subclass summed on read
_ON_READ_CLASSES: set[type] = set()


def _on_read_class(cls: Any) -> type:
    """The subclass of the variable class ``cls`` whose values are summed over replicas on read."""
    if cls in _ON_READ_CLASSES:
        return cls
    sub = _ON_READ.get(cls)
    if sub is not None:
        return sub

    def get_value(self, **kwargs):
        blocks = _blocks_of(self)
        if blocks is None:
            return cls.get_value(self, **kwargs)
        whole = _sum_blocks(blocks)
        index = kwargs.get("index", ...)
        return whole if index is ... else whole[index]

    def set_value(self, value, **kwargs):
        blocks = _blocks_of(self)
        if blocks is None:
            cls.set_value(self, value, **kwargs)
            return
        index = kwargs.get("index")
        if index is None:  # variable.set_value(v)
            self.set_raw_value(value)
        elif index is ...:  # variable[...] = v, as metric.reset() sets it: no sum needed
            whole = jnp.broadcast_to(jnp.asarray(value, blocks.dtype), blocks.shape[1:])
            self.set_raw_value(whole)
        else:
            self.set_raw_value(_sum_blocks(blocks))
            cls.set_value(self, value, **kwargs)

    def __reduce__(self):  # pickle, copy.deepcopy: a variable of ``cls`` with the whole value
        state: dict = cls.__getstate__(self)
        blocks = _blocks_of(self)
        if blocks is not None:
            state = {**state, "_raw_value": _sum_blocks(blocks)}
        return _variable_from_state, (cls, state)

    sub = type(
        cls.__name__,
        (cls,),
        {
            "__slots__": (),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "get_value": get_value,
            "set_value": set_value,
            "__reduce__": __reduce__,
            "__reduce_ex__": lambda self, protocol: __reduce__(self),
        },
    )
    _ON_READ[cls] = sub
    _ON_READ_CLASSES.add(sub)
    return sub


def _variable_from_state(cls: type, state: dict) -> Any:
    variable = object.__new__(cls)
    variable.__setstate__(state)
    return variable


def _blocks_of(variable: Any) -> jax.Array | None:
    """The variable's per-replica array if tpustrat wrote it there and it is still held."""
    raw = variable.get_raw_value()
    return raw if _BLOCKS.get(id(raw)) is raw else None


@functools.lru_cache(maxsize=16)
def _summer(mesh: Mesh):
    return jax.jit(
        lambda blocks: jnp.sum(blocks, axis=0, dtype=blocks.dtype),
        out_shardings=NamedSharding(mesh, P()),
    )


def _sum_blocks(blocks: jax.Array) -> jax.Array:
    sharding = blocks.sharding
    assert isinstance(sharding, NamedSharding)  # as _spread and run's outputs lay blocks out
    return _summer(sharding.mesh)(blocks)


def _spread(value: Any, mesh: Mesh) -> jax.Array:
    """A whole value laid out as blocks ``[value, 0, 0, ...]`` over the replicas.

    Built on the host and placed, which compiles nothing: every process holds the same whole
    value (a fresh metric, a reset, a restore), and each places the blocks of its devices.
    """
    whole = np.asarray(value)
    blocks = np.zeros((mesh.shape[REPLICA_AXIS], *whole.shape), whole.dtype)
    blocks[0] = whole
    sharding = NamedSharding(mesh, P(REPLICA_AXIS))
    return jax.make_array_from_callback(blocks.shape, sharding, lambda index: blocks[index])


@functools.cache
def _variable_types() -> tuple[type, type]:
    """``(nnx.Variable, nnx.metrics.MetricState)``, looked up once flax is loaded."""
    nnx = _nnx.loaded_nnx()
    return nnx.Variable, nnx.metrics.MetricState


def _is_variable(x: Any) -> bool:
    return isinstance(x, _variable_types()[0])


def _is_accumulator(x: Any) -> bool:
    return isinstance(x, _variable_types()[1])


def whole_values(tree: PyTree) -> PyTree:
    """``tree`` with each accumulator that holds per-replica blocks replaced by a copy holding
    their sum: what a checkpoint saves, and what ``replicate`` places."""
    if _nnx.nnx_module() is None:
        return tree

    def whole(x: Any) -> Any:
        if _is_variable(x):
            blocks = _blocks_of(x)
            if blocks is not None:
                return x.replace(_sum_blocks(blocks))
        return x

    return jax.tree.map(whole, tree, is_leaf=lambda x: _nnx.is_nnx_object(x) or _is_variable(x))


# For each Graph (``_nnx.Graph``) already adopted: the indices of its accumulators among its
# leaves. A loop keeps one Graph while its objects hold it, so each call looks its layout up
# here instead of walking the variables. An entry goes with its Graph.
_LAYOUTS: weakref.WeakKeyDictionary[_nnx.Graph, tuple[int, ...]] = weakref.WeakKeyDictionary()


def adopt(graph: _nnx.Graph) -> bool:
    """Makes every accumulator among ``graph``'s leaves summed on read.

    The class of each ``MetricState`` variable not yet adopted is swapped (once per variable).
    That changes the objects' graph definition, so the caller splits them again; the graph it
    then gets is adopted with no swap, and its accumulators' positions are kept for later calls.

    Returns:
      Whether a class was swapped: ``graph`` no longer describes the objects.
    """
    if graph in _LAYOUTS:
        return False
    indices = tuple(i for i, leaf in enumerate(graph.leaves) if _is_accumulator(leaf))
    swapped = False
    for i in indices:
        variable = graph.leaves[i]
        if type(variable) not in _ON_READ_CLASSES:
            variable.__class__ = _on_read_class(type(variable))
            swapped = True
    if not swapped:
        _LAYOUTS[graph] = indices
    return swapped


class _Accumulator(NamedTuple):
    leaf: int  # its index among the graph's leaves
    path: tuple  # its path in Flax's split, to find it in a new state the step returns


class Accumulators:
    """The accumulators of one ``run`` over NNX objects: laid out on the way in, kept on the
    way out.

    Args:
      graph: the objects' ``_nnx.Graph``, adopted (``adopt``).
      objects: the NNX objects passed to ``run``.
      mesh: the strategy's mesh.

    Attributes:
      values: ``graph.values()`` with each accumulator's value a PerReplica of its blocks: what
        the step takes.
    """

    def __init__(self, graph: _nnx.Graph, objects: tuple, mesh: Mesh):
        self.values = graph.values()
        self._graph, self._objects = graph, objects
        self._accumulators: list[_Accumulator] = []
        self._written: set[int] = set()
        indices = _LAYOUTS.get(graph, ())
        if not indices:
            return  # no metrics: nothing to lay out
        values = self.values.values = list(self.values.values)
        for i in indices:
            variable = graph.leaves[i]
            raw = variable.get_raw_value()
            if not isinstance(raw, (jax.Array, np.ndarray)) and len(jax.tree.leaves(raw)) != 1:
                raise ValueError(
                    f"the metric variable {_name(objects, graph.paths[i])} holds "
                    f"{type(raw).__name__}; strategy.run sums a MetricState's blocks over the "
                    "replicas, which needs one array per MetricState: hold each accumulator in "
                    "a MetricState of its own"
                )
            blocks = _blocks_of(variable)
            if blocks is None:
                blocks = _spread(raw, mesh)
            blocks = PerReplica.from_stacked(blocks)
            if graph.direct:  # the value itself
                values[i] = blocks
            else:  # the variable: a copy of it holding the blocks
                treedef = jax.tree.structure(values[i], is_leaf=is_per_replica)
                values[i] = treedef.unflatten([blocks])
            self._accumulators.append(_Accumulator(i, graph.paths[i]))

    def __bool__(self) -> bool:
        return bool(self._accumulators)

    @contextlib.contextmanager
    def tracing(self) -> Generator[None]:
        """While active, ``check_step`` checks the traced step's updates of these accumulators."""
        if not self._accumulators:
            yield
            return
        _ACTIVE.stack.append(self)
        try:
            yield
        finally:
            _ACTIVE.stack.pop()

    def take_blocks(self, new: PyTree) -> PyTree:
        """What the step returned for the objects, each accumulator's PerReplica replaced by its
        array.

        ``new`` is ``_nnx.LeafValues`` (an accumulator at its own leaf's index) or a state (an
        accumulator found by its path), as ``_nnx.Lifted`` returns them.
        """
        if not self._accumulators:
            return new
        if type(new) is _nnx.LeafValues:
            values = list(new.values)
            for accumulator in self._accumulators:
                values[accumulator.leaf] = self._take(accumulator, values[accumulator.leaf])
            return _nnx.LeafValues(new.names, values)
        found = _accumulator_leaves(new)
        leaves, treedef = jax.tree.flatten(new, is_leaf=is_per_replica)
        for accumulator in self._accumulators:
            index = found.get(accumulator.path)
            if index is not None:  # else the step removed it; write_back takes the new state
                leaves[index] = self._take(accumulator, leaves[index])
        return treedef.unflatten(leaves)

    def _take(self, accumulator: _Accumulator, leaf: Any) -> jax.Array:
        if not isinstance(leaf, PerReplica):
            raise ValueError(
                f"the metric variable {self.name(accumulator)} left the step the same on every "
                "replica; its replicas' blocks are summed when it is read. Add each "
                "replica's own contribution to it (metric.update with the replica's rows)"
            )
        blocks = leaf.stacked
        self._written.add(id(blocks))
        return blocks

    def record(self) -> None:
        """Marks the accumulators written back as holding per-replica blocks."""
        for accumulator in self._accumulators:
            raw = self._graph.leaves[accumulator.leaf].get_raw_value()
            if id(raw) in self._written:
                _BLOCKS[id(raw)] = raw
        self._written.clear()

    def name(self, accumulator: _Accumulator) -> str:
        """The accumulator as errors name it: ``MultiMetric.loss.total``."""
        return _name(self._objects, accumulator.path)

    def input_leaves(self) -> list[int]:
        """Each accumulator's index among the leaves of ``values``, flattened as ``run`` does."""
        starts, start = [], 0
        for value in self.values.values:
            starts.append(start)
            start += len(jax.tree.leaves(value, is_leaf=is_per_replica))
        return [starts[a.leaf] for a in self._accumulators]

    def output_leaves(self, new: PyTree) -> list[int | None]:
        """Each accumulator's output in ``new`` (the objects' part of the step's outputs, with
        each leaf numbered), or None where the step removed it."""
        if type(new) is _nnx.LeafValues:
            return [_single(jax.tree.leaves(new.values[a.leaf])) for a in self._accumulators]
        found = _accumulator_leaves(new)
        numbers = jax.tree.leaves(new)
        return [
            None if found.get(a.path) is None else numbers[found[a.path]]
            for a in self._accumulators
        ]


def _single(numbers: list[int]) -> int | None:
    return numbers[0] if len(numbers) == 1 else None


class _Stack(threading.local):
    def __init__(self):
        self.stack: list[Accumulators] = []


_ACTIVE = _Stack()


def _name(objects: tuple, path: tuple) -> str:
    """``MultiMetric.loss.total`` for the path ``(1, 'loss', 'total')`` into ``(model,
    metrics)``'s split."""
    keys = list(path)
    if keys and isinstance(keys[0], int) and keys[0] < len(objects):
        keys[0] = type(objects[keys[0]]).__name__
    return ".".join(str(k) for k in keys)


def _accumulator_leaves(state: PyTree) -> dict[tuple, int]:
    """For each accumulator of ``state`` (by its path in Flax's split), the index of its leaf
    among the state's."""
    found, index = {}, 0
    for path, node in jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: _is_variable(x) or is_per_replica(x)
    )[0]:
        if _is_accumulator(node):
            found[tuple(map(_nnx.key_of, path))] = index
        index += len(jax.tree.leaves(node, is_leaf=is_per_replica)) if _is_variable(node) else 1
    return found


def check_step(
    name: str,
    jaxpr: Jaxpr | ClosedJaxpr,
    in_axes: Sequence[Collection[str]],
    combined_axes: Sequence[str],
    out_tree: Any,
    input_offset: int,
) -> None:
    """Checks the traced step's updates of the accumulators of the ``run`` being traced.

    A no-op unless ``Accumulators.tracing`` is active. The step is ``_nnx.Lifted``'s: its
    inputs start with the objects' values (``Accumulators.values``), and its output is
    ``(out, new)``, ``new`` the objects' new values or their new state.

    Args:
      name: the step's name, for errors.
      jaxpr: the per-replica step (the body of the ``shard_map``).
      in_axes: for each input of ``jaxpr``, the mesh axes along which it varies.
      combined_axes: the axes a collective must combine for a value to be replicated.
      out_tree: the treedef of the step's flattened outputs.
      input_offset: how many inputs of ``jaxpr`` come before the objects' values.

    Raises:
      ValueError: an accumulator is updated other than by adding to it, or by adding a value
        that a collective made the same on every replica.
    """
    if not _ACTIVE.stack:
        return
    accumulators = _ACTIVE.stack[-1]
    if not accumulators:
        return
    # The step's outputs numbered in order: each accumulator's output holds its index.
    new = out_tree.unflatten(list(range(out_tree.num_leaves)))[1]
    inputs = {i + input_offset: k for k, i in enumerate(accumulators.input_leaves())}
    outputs = {o: k for k, o in enumerate(accumulators.output_leaves(new)) if o is not None}
    names = [accumulators.name(a) for a in accumulators._accumulators]
    added, contributions = check_additive(name, jaxpr, inputs, outputs, names)
    if not added:
        return
    # Which values added through a collective are the same on every replica: each added value
    # of the step itself, and each accumulator's whole update (which covers values added inside
    # loops and calls). The accumulators' inputs count as replicated, so that an update varies
    # exactly when what it adds does.
    inner, _ = _jaxpr.open_jaxpr(jaxpr)
    probe = inner.replace(outvars=[*inner.outvars, *(var for _, var in contributions)])
    replicated_in = [
        frozenset() if i in inputs else frozenset(axes) for i, axes in enumerate(in_axes)
    ]
    varying = _replication.varying_outputs(probe, replicated_in, combined_axes)
    added_to = {outputs[o] for o in added}
    same = {outputs[o] for o, collective in added.items() if collective and not varying[o]}
    same |= {
        k
        for j, (k, _) in enumerate(contributions)
        if k in added_to and not varying[len(inner.outvars) + j]
    }
    if same:
        raise ValueError(
            f"run({name}): the step adds to {', '.join(names[k] for k in sorted(same))} a value "
            "that a collective made the same on every replica; run sums the replicas' blocks of "
            "a metric when it is read, so that value would count once per replica. Drop the "
            "all-reduce and update the metric with the replica's own rows: "
            "metric.update(loss=losses, mask=mask) rather than "
            "metric.update(loss=ctx.all_reduce('sum', ...))"
        )


# The abstract values of the additivity check: what a value of the step is, as a function of
# the accumulators' blocks. ``collective`` says that it depends on a collective's result.
class _Clean(NamedTuple):
    collective: bool  # depends on no accumulator


class _Block(NamedTuple):
    k: int  # accumulator k's block, unchanged (reshaped at most)


class _Added(NamedTuple):
    k: int  # accumulator k's block plus values that depend on no accumulator
    collective: bool


class _Mixed(NamedTuple):
    primitive: str  # anything else; the primitive that combined an accumulator so


_Value = _Clean | _Block | _Added | _Mixed
_CLEAN = _Clean(False)

_ADDS = frozenset({prim.add_p, prim.add_jaxvals_p})
# Unary primitives that move a value's elements without combining them, when they keep its size.
_MOVES = frozenset(
    {
        prim.reshape_p,
        prim.squeeze_p,
        prim.broadcast_in_dim_p,
        prim.slice_p,
        prim.dynamic_slice_p,
        prim.transpose_p,
        prim.copy_p,
        prim.convert_element_type_p,
    }
)
# Collectives whose result is the same on every replica of a group, and tpustrat's own.
_COMBINING = _replication.COMBINING | {_jaxpr.INVARIANT}


def check_additive(
    name: str,
    jaxpr: Jaxpr | ClosedJaxpr,
    inputs: dict[int, int],
    outputs: dict[int, int],
    names: Sequence[str],
) -> tuple[dict[int, bool], list[tuple[int, Any]]]:
    """Proves that each accumulator output is its input, unchanged or plus independent values.

    A forward pass over ``jaxpr``: an accumulator's input is its block; ``add`` of a block and a
    value that depends on no accumulator is the block, added to; a reshape of the same size
    keeps what a value is; calls and ``scan`` loops are followed (a loop carry to a fixed
    point); any other equation that reads a block makes its outputs depend on it in an unknown
    way (fail closed).

    Args:
      name: the step's name, for errors.
      jaxpr: the step.
      inputs: input index of ``jaxpr`` -> the accumulator it holds.
      outputs: output index of ``jaxpr`` -> the accumulator it returns.
      names: each accumulator's name, for errors.

    Returns:
      ``(added, contributions)``: for each accumulator output added to, whether what it adds
      depends on a collective's result; and ``(accumulator, value)`` for each value of
      ``jaxpr`` itself (not of a loop or call inside it) added to an accumulator that depends
      on one.

    Raises:
      ValueError: an accumulator output is not its own input, unchanged or added to.
    """
    inner, _ = _jaxpr.open_jaxpr(jaxpr)
    values = [_Block(inputs[i]) if i in inputs else _CLEAN for i in range(len(inner.invars))]
    contributions: list[tuple[int, Any]] = []
    out = _analyze(inner, values, contributions)
    added = {}
    for o, k in sorted(outputs.items()):
        value = out[o]
        if isinstance(value, _Block) and value.k == k:
            continue
        if isinstance(value, _Added) and value.k == k:
            added[o] = value.collective
            continue
        if isinstance(value, _Clean):
            seen = "is assigned a new value (a reset or an assignment inside the step)"
        elif isinstance(value, _Mixed):
            seen = f"is combined with its own value by `{value.primitive}`"
        else:
            seen = f"takes the value of {names[value.k]}"
        raise ValueError(
            f"run({name}): the metric variable {names[k]} {seen}; strategy.run keeps each "
            "MetricState per replica and sums the replicas' values when it is read, which is "
            "right only for additive updates (total += f(batch), count += g(batch)). Update it "
            "additively, reset it outside the step (metric.reset() on the host), or keep the "
            "value outside the metric (return it from the step)"
        )
    return added, contributions


def _analyze(
    jaxpr: Jaxpr, inputs: Sequence[_Value], contributions: list | None = None
) -> list[_Value]:
    return _jaxpr.walk(
        jaxpr,
        inputs,
        lambda eqn, ins: _equation(eqn, ins, contributions),
        constants=[_CLEAN] * len(jaxpr.constvars),
        literal=lambda _: _CLEAN,
    )


def _equation(eqn: JaxprEqn, inputs: list[_Value], contributions: list | None) -> list[_Value]:
    primitive, n_out = eqn.primitive, len(eqn.outvars)
    if all(isinstance(v, _Clean) for v in inputs):
        collective = any(isinstance(v, _Clean) and v.collective for v in inputs)
        collective = collective or _combines(eqn)
        return [_Clean(collective)] * n_out
    mixed = next((v for v in inputs if isinstance(v, _Mixed)), None)
    if mixed is not None:
        return [mixed] * n_out
    if primitive in _ADDS and len(inputs) == 2:
        swap = isinstance(inputs[0], _Clean)
        block, other = inputs[::-1] if swap else inputs
        # A jaxpr's add takes operands of one shape: the block is not broadcast.
        if isinstance(block, (_Block, _Added)) and isinstance(other, _Clean):
            if other.collective and contributions is not None:
                contributions.append((block.k, eqn.invars[0 if swap else 1]))
            previous = block.collective if isinstance(block, _Added) else False
            return [_Added(block.k, previous or other.collective)]
    elif primitive in _MOVES and n_out == 1 and _keeps_size(eqn):
        block = inputs[0]
        if all(isinstance(v, _Clean) for v in inputs[1:]):  # dynamic_slice's indices
            return [block]
    elif (body := _jaxpr.call_body(eqn, per_device=True)) is not None:
        return _analyze(body[0], inputs)
    elif primitive is prim.scan_p:
        return _scan(eqn, inputs)
    return [_Mixed(primitive.name)] * n_out


def _keeps_size(eqn) -> bool:
    source, result = eqn.invars[0].aval, eqn.outvars[0].aval
    if np.prod(source.shape, dtype=int) != np.prod(result.shape, dtype=int):
        return False
    if eqn.primitive is prim.convert_element_type_p:
        return eqn.params["new_dtype"] == source.dtype
    return True


def _combines(eqn: JaxprEqn) -> bool:
    """Whether the equation, or a computation inside it, is a combining collective."""
    if eqn.primitive in _COMBINING:
        return True
    return any(_jaxpr.primitives_in(inner) & _COMBINING for inner in _jaxpr.inner_jaxprs(eqn))


def _scan(eqn: JaxprEqn, inputs: list[_Value]) -> list[_Value]:
    n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    body = eqn.params["jaxpr"].jaxpr
    consts = inputs[:n_consts]
    carry = inputs[n_consts : n_consts + n_carry]
    # A block sliced step by step is no block: only the carry accumulates.
    xs = [v if isinstance(v, _Clean) else _Mixed("scan") for v in inputs[n_consts + n_carry :]]
    while True:
        out = _analyze(body, [*consts, *carry, *xs])
        new_carry = [_join(a, b) for a, b in zip(carry, out[:n_carry])]
        if new_carry == carry:
            break
        carry = new_carry
    ys = [v if isinstance(v, _Clean) else _Mixed("scan") for v in out[n_carry:]]
    return [*carry, *ys]


def _join(a: _Value, b: _Value) -> _Value:
    """What a loop carry is that may be ``a`` or ``b``."""
    if a == b:
        return a
    if isinstance(a, _Mixed):
        return a
    if isinstance(b, _Mixed):
        return b
    if isinstance(a, _Clean) and isinstance(b, _Clean):
        return _Clean(a.collective or b.collective)
    if isinstance(a, (_Block, _Added)) and isinstance(b, (_Block, _Added)) and a.k == b.k:
        collective = any(isinstance(v, _Added) and v.collective for v in (a, b))
        return _Added(a.k, collective)
    return _Mixed("scan")
