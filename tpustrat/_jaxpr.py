"""Reading and walking jaxprs: JAX's primitives, the bodies of calls, and the markers of values.

The analyses that read a traced step share this layer: the proof of which outputs are the
same on every replica (``_replication``), the block-wise optimizer update (``_sharded_update``)
and the additivity check of metric accumulators (``_metrics``).

- Primitives are keyed by object, never by name (a primitive of another library may share a
  name with one of JAX's): ``primitives.add_p`` is JAX's ``add``, wherever this JAX defines it,
  or None where it has none (an older JAX lacks a few, which then cannot occur in its jaxprs).
- ``HIGHER_ORDER`` is the one table of the higher-order primitives the analyses enter: where
  each keeps its jaxprs, and whether it is a call (one body computing its results from its
  operands), ``shard_map``'s per-device call, or control flow (``cond``, ``while``, ``scan``),
  for which each analysis has its own rule. ``call_body`` gives a call's body;
  ``inner_jaxprs`` every jaxpr an equation holds. A higher-order primitive not in the table
  is no call: each analysis then treats it as unknown (the replication proof lets it vary, the
  block-wise update refuses it, the metric check calls it mixed), never as its body.
- ``walk`` is the forward pass each analysis runs, with its own abstract values and rules.
- ``mark_varying`` and ``mark_invariant`` are explicit markers: the identity on values (XLA
  sees nothing of them), read by the replication proof as "varies along these axes" and "was
  made the same along these axes by a collective".

Example:
  >>> jaxpr = jax.make_jaxpr(lambda x: jax.jit(jax.numpy.sin)(x) + 1.0)(1.0).jaxpr
  >>> call = jaxpr.eqns[0]
  >>> call.primitive is primitives.jit_p, call_body(call, per_device=False)[0].eqns[0].primitive
  (True, sin)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple, TypeVar

import jax
import jax.lax
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Literal, Primitive
from jax.extend.core import primitives as _public
from jax.interpreters import ad, batching, mlir

# isort: split
# JAX has no public name for these primitives (jax.extend.core.primitives and jax.lax export
# most others): shard_map, host callbacks, the varying-type cast, resharding, the invariant and
# asynchronous collectives, typed random keys and some linear algebra. This is tpustrat's only
# import from jax._src for jaxprs.
from jax._src import ad_checkpoint as _ad_checkpoint
from jax._src import buffer_callback as _buffer_callback
from jax._src import callback as _callback
from jax._src import core as _core
from jax._src import debugging as _debugging
from jax._src import pjit as _pjit
from jax._src import shard_alike as _shard_alike
from jax._src import shard_map as _shard_map
from jax._src.lax import lax as _lax
from jax._src.lax import linalg as _linalg
from jax._src.lax import parallel as _parallel

try:
    from jax._src.random import prng as _prng
except ImportError:  # JAX 0.7.0: jax._src.random is a module, and prng sits beside it
    _prng = importlib.import_module("jax._src.prng")

T = TypeVar("T")


class _Primitives:
    """JAX's primitives by their Python names (``add_p``), found in the modules that define
    them; None for a name this JAX does not define."""

    def __init__(self, *modules: ModuleType):
        self._modules = modules

    def __getattr__(self, name: str) -> Any:
        found = None
        for module in self._modules:
            value = getattr(module, name, None)
            if isinstance(value, Primitive):
                found = value
                break
        setattr(self, name, found)  # looked up once
        return found


primitives = _Primitives(
    _public, jax.lax, _core, _pjit, _ad_checkpoint, _shard_map, _shard_alike, _lax, _linalg,
    _parallel, _prng, _callback, _debugging, _buffer_callback,
)  # fmt: skip

# Host callbacks, which JAX runs only where every mesh axis is manual, and the annotations of
# where a value is laid out.
HOST_CALLBACKS: frozenset[Primitive] = frozenset(
    {
        primitives.pure_callback_p, primitives.io_callback_p, primitives.debug_callback_p,
        primitives.debug_print_p, primitives.buffer_callback_p,
    }
    - {None}
)  # fmt: skip
LAYOUT_ANNOTATIONS: frozenset[Primitive] = frozenset(
    {primitives.sharding_constraint_p, primitives.reshard_p, primitives.layout_constraint_p}
    - {None}
)


# ---------------------------------------------------------------------------------------------
# Higher-order primitives.


class HigherOrder(NamedTuple):
    """Where a higher-order primitive keeps its jaxprs, and what they compute.

    ``kind`` is ``"call"`` (its one body computes its results from its operands, as they are),
    ``"per_device"`` (``shard_map``: the body computes them from each device's block) or
    ``"control"`` (``cond``, ``while``, ``scan``: each analysis has its own rule).
    """

    parameters: tuple[str, ...]
    kind: str


_HIGHER_ORDER = {
    primitives.jit_p: HigherOrder(("jaxpr",), "call"),
    primitives.closed_call_p: HigherOrder(("call_jaxpr",), "call"),
    primitives.call_p: HigherOrder(("call_jaxpr",), "call"),
    primitives.remat_p: HigherOrder(("jaxpr",), "call"),  # jax.checkpoint
    primitives.custom_jvp_call_p: HigherOrder(("call_jaxpr",), "call"),
    primitives.custom_vjp_call_p: HigherOrder(("call_jaxpr",), "call"),
    primitives.shard_map_p: HigherOrder(("jaxpr",), "per_device"),
    primitives.cond_p: HigherOrder(("branches",), "control"),
    primitives.while_p: HigherOrder(("cond_jaxpr", "body_jaxpr"), "control"),
    primitives.scan_p: HigherOrder(("jaxpr",), "control"),
}
HIGHER_ORDER: dict[Primitive, HigherOrder] = {
    p: entry for p, entry in _HIGHER_ORDER.items() if p is not None
}


def open_jaxpr(jaxpr: Jaxpr | ClosedJaxpr) -> tuple[Jaxpr, Sequence[Any]]:
    """``jaxpr`` as an open jaxpr and the values of its constants (none for an open one)."""
    if isinstance(jaxpr, ClosedJaxpr):
        return jaxpr.jaxpr, jaxpr.consts
    return jaxpr, ()


def inner_jaxprs(eqn: JaxprEqn) -> list[Jaxpr | ClosedJaxpr]:
    """Every jaxpr ``eqn`` holds: a call's body, branches, loop bodies, a reduction's computation.

    For a primitive of ``HIGHER_ORDER``, the jaxprs at its parameters (a RuntimeError if they
    are not where the table says); for any other, every jaxpr among its parameters' values.
    """
    entry = HIGHER_ORDER.get(eqn.primitive)
    if entry is None:
        return _jaxprs_in(list(eqn.params.values()))
    found: list[Jaxpr | ClosedJaxpr] = []
    for name in entry.parameters:
        value = eqn.params.get(name)
        items = value if isinstance(value, (tuple, list)) else (value,)
        jaxprs = [item for item in items if isinstance(item, (Jaxpr, ClosedJaxpr))]
        if not jaxprs or len(jaxprs) != len(items):
            raise RuntimeError(
                f"the {eqn.primitive.name!r} equation's parameter {name!r} holds "
                f"{type(value).__name__}, not the jaxprs tpustrat reads there: this JAX "
                f"({jax.__version__}) lays out {eqn.primitive.name!r} in a way tpustrat does "
                "not support. Use a supported JAX version (see pyproject.toml)"
            )
        found += jaxprs
    return found


def _jaxprs_in(value: Any) -> list[Jaxpr | ClosedJaxpr]:
    if isinstance(value, (Jaxpr, ClosedJaxpr)):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [inner for item in value for inner in _jaxprs_in(item)]
    return []


def call_body(eqn: JaxprEqn, *, per_device: bool) -> tuple[Jaxpr, Sequence[Any]] | None:
    """The body of a call, and its constants, if ``eqn`` is one; else None.

    A call is a primitive of ``HIGHER_ORDER`` of kind ``"call"`` (``jit``, ``closed_call``,
    ``jax.checkpoint``, ``custom_jvp``, ``custom_vjp``; their custom rules apply only when
    differentiated, and a jaxpr is past that) or, with ``per_device``, ``shard_map``, whose
    body computes on each device's block of the operands. The body takes the call's operands
    and gives its results, one for one; a call whose body does not is no call (None).
    """
    entry = HIGHER_ORDER.get(eqn.primitive)
    if entry is None or entry.kind not in (("call", "per_device") if per_device else ("call",)):
        return None
    body, consts = open_jaxpr(eqn.params[entry.parameters[0]])
    if (len(body.invars), len(body.outvars)) != (len(eqn.invars), len(eqn.outvars)):
        return None
    return body, consts


def primitives_in(jaxpr: Jaxpr | ClosedJaxpr) -> frozenset[Primitive]:
    """Every primitive of ``jaxpr``, those of its inner jaxprs (calls, control flow) included.

    Example:
      >>> branches = jax.numpy.sin, jax.numpy.cos
      >>> jaxpr = jax.make_jaxpr(lambda x: jax.lax.cond(x > 0, *branches, x))(1.0)
      >>> sorted(p.name for p in primitives_in(jaxpr))
      ['cond', 'convert_element_type', 'cos', 'gt', 'sin']
    """
    jaxpr, _ = open_jaxpr(jaxpr)
    found: set[Primitive] = set()
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive)
        for inner in inner_jaxprs(eqn):
            found |= primitives_in(inner)
    return frozenset(found)


def reads_axis_index_in_loop(jaxpr: Jaxpr | ClosedJaxpr, in_loop: bool = False) -> bool:
    """Whether ``jaxpr`` reads ``axis_index`` inside a ``while`` or ``scan`` body, at any depth."""
    jaxpr, _ = open_jaxpr(jaxpr)
    for eqn in jaxpr.eqns:
        if in_loop and eqn.primitive is primitives.axis_index_p:
            return True
        inner_in_loop = in_loop or eqn.primitive in (primitives.while_p, primitives.scan_p)
        if any(reads_axis_index_in_loop(inner, inner_in_loop) for inner in inner_jaxprs(eqn)):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Walking and replaying.


def walk(
    jaxpr: Jaxpr,
    inputs: Sequence[T],
    equation: Callable[[JaxprEqn, list[T]], Sequence[T]],
    constants: Sequence[T],
    literal: Callable[[Any], T],
) -> list[T]:
    """A forward pass over ``jaxpr`` with abstract values: each equation's outputs from its inputs.

    Args:
      jaxpr: an open jaxpr.
      inputs: the value of each of its inputs.
      equation: the rule: an equation and its inputs' values to its outputs' values.
      constants: the value of each of its constants.
      literal: the value of a literal, given the literal's Python value.

    Returns:
      The value of each output of ``jaxpr``.

    Example:
      >>> jaxpr = jax.make_jaxpr(lambda x, y: jax.numpy.sin(x) * y)(1.0, 2.0).jaxpr
      >>> walk(jaxpr, ["x", "y"], lambda eqn, ins: [f"{eqn.primitive}({', '.join(ins)})"],
      ...      constants=[], literal=repr)
      ['mul(sin(x), y)']
    """
    if len(inputs) != len(jaxpr.invars) or len(constants) != len(jaxpr.constvars):
        raise ValueError(
            f"walk got {len(inputs)} inputs and {len(constants)} constants for a jaxpr of "
            f"{len(jaxpr.invars)} inputs and {len(jaxpr.constvars)} constants; pass one of each"
        )
    env: dict[Any, T] = dict(zip(jaxpr.invars, inputs))
    env.update(zip(jaxpr.constvars, constants))

    def read(atom: Any) -> T:
        return literal(atom.val) if isinstance(atom, Literal) else env[atom]

    for eqn in jaxpr.eqns:
        env.update(zip(eqn.outvars, equation(eqn, [read(v) for v in eqn.invars])))
    return [read(v) for v in jaxpr.outvars]


def bind(eqn: JaxprEqn, operands: Sequence[Any], **overrides: Any) -> list[Any]:
    """Applies ``eqn``'s primitive to ``operands`` with its parameters (some ``overrides``).

    Example:
      >>> eqn = jax.make_jaxpr(lambda x: jax.numpy.sum(x, axis=0))(np.ones((2, 3))).eqns[0]
      >>> bind(eqn, [np.ones((4, 5))], axes=(1,))[0].shape
      (4,)
    """
    params = eqn.primitive.get_bind_params({**eqn.params, **overrides})
    # jax < 0.8 returns (subfuns, params); later versions fold the subfuns into the params.
    subfuns, params = params if isinstance(params, tuple) else ((), params)
    out = eqn.primitive.bind(*subfuns, *operands, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


# ---------------------------------------------------------------------------------------------
# Markers: the identity on values, read by the replication proof.

VARYING = Primitive("tpustrat_varying")
INVARIANT = Primitive("tpustrat_invariant")


def mark_varying(x: jax.Array, axes: Sequence[str]) -> jax.Array:
    """``x``, marked as varying along the mesh ``axes``, whatever it is computed from.

    The replication proof then returns it per replica (a block of a sharded optimizer state
    that no replica's data went into, say). Numerically the identity, compiled to nothing.

    Example:
      >>> jax.make_jaxpr(lambda x: mark_varying(x, ("replica",)))(1.0)
      { lambda ; a:f32[]. let b:f32[] = tpustrat_varying[axes=('replica',)] a in (b,) }
    """
    return VARYING.bind(x, axes=tuple(axes))


def mark_invariant(value: jax.Array, axes: Sequence[str], source: jax.Array) -> jax.Array:
    """``value``, marked as made from ``source`` by a collective that combines the ``axes``.

    The replication proof then takes ``value`` to vary along the axes ``source`` varies along,
    less ``axes``, whatever collectives it went through (the grouped ones of the hierarchical
    all-reduce, which the proof alone would let vary). The caller vouches for it. Numerically
    the identity on ``value`` (``source`` is not read), compiled to nothing.

    Example:
      >>> jax.jit(lambda x: mark_invariant(2 * x, ("replica",), x))(np.float32(1.5))
      Array(3., dtype=float32)
    """
    return INVARIANT.bind(value, source, axes=tuple(axes))


def marked_axes(eqn: JaxprEqn) -> frozenset[str]:
    """The mesh axes a marker's equation names."""
    return frozenset(eqn.params["axes"])


def _define_marker(marker: Primitive) -> None:
    """The identity on the first operand, under every transformation ``run`` applies."""
    marker.def_impl(lambda value, *_, axes: value)
    marker.def_abstract_eval(lambda value, *_, axes: value)
    mlir.register_lowering(marker, lambda ctx, value, *_, axes: [value])

    def jvp(primals, tangents, *, axes):
        # The tangent passes unmarked: the proof then reads it from what computed it.
        return marker.bind(*primals, axes=axes), tangents[0]

    ad.primitive_jvps[marker] = jvp
    batching.primitive_batchers[marker] = lambda args, dims, *, axes: (
        marker.bind(*args, axes=axes),
        dims[0],
    )


_define_marker(VARYING)
_define_marker(INVARIANT)
