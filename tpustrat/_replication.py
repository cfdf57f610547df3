"""Which outputs of a replica's step are provably the same on every replica.

``strategy.run`` returns such outputs as replicated arrays and the rest as PerReplica. The proof
is a forward pass over the step's jaxpr: a value *varies* across replicas if it depends on a
PerReplica input or on the replica index, unless a collective that combines every replica (psum,
pmean, pmax, pmin, all_gather over ``"replica"``) produced it. Control flow is followed exactly
where it matters (a ``cond`` on a varying predicate varies; loop carries reach a fixed point) and
anything unknown counts as varying, so a replicated result is never wrong, only sometimes missed.
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from tpustrat._collectives import HIERARCHICAL_ALL_REDUCE
from tpustrat._mesh import REPLICA_AXIS

# Collectives whose result every replica receives whole.
_COMBINE_ALL = frozenset(
    {"psum", "psum_invariant", "pmax", "pmin", "all_gather", "all_gather_invariant"}
)
# Primitives that name the replica axis but give each replica the value it would have had anyway.
_KEEP_VARIANCE = frozenset({"pvary", "pcast", "pbroadcast"})
# Host callbacks run once per device and may return something different on each.
_HOST_CALLBACKS = frozenset({"pure_callback", "io_callback", "debug_callback"})


def varying_outputs(jaxpr: Jaxpr | ClosedJaxpr, varying_inputs: Sequence[bool]) -> list[bool]:
    """For each output of ``jaxpr``, whether it may differ between replicas.

    Args:
      jaxpr: the body of the per-replica step (inside ``shard_map``).
      varying_inputs: for each input, whether it differs between replicas.

    Returns:
      One bool per output; False means provably identical on every replica.
    """
    if isinstance(jaxpr, ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    if len(varying_inputs) != len(jaxpr.invars):
        raise ValueError(f"{len(varying_inputs)} flags for {len(jaxpr.invars)} inputs")
    varies = {v: bool(f) for v, f in zip(jaxpr.invars, varying_inputs)}
    varies.update({v: False for v in jaxpr.constvars})

    def read(atom) -> bool:
        return False if isinstance(atom, Literal) else varies.get(atom, True)

    for eqn in jaxpr.eqns:
        flags = _equation(eqn, [read(v) for v in eqn.invars])
        varies.update(zip(eqn.outvars, flags))
    return [read(v) for v in jaxpr.outvars]


def _equation(eqn, inputs: list[bool]) -> list[bool]:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    any_varying = any(inputs)
    if (
        name == "axis_index"
        or name in _HOST_CALLBACKS
        or (_names_replica_axis(eqn.params) and name not in _COMBINE_ALL | _KEEP_VARIANCE)
    ):
        return [True] * n_out  # axis_index, psum_scatter, all_to_all, ppermute, ...
    if name in _COMBINE_ALL:
        if eqn.params.get("axis_index_groups") is not None:
            return [True] * n_out  # combines groups of replicas, not every replica
        return [any_varying and not _names_replica_axis(eqn.params)] * n_out
    if name == "jit" and eqn.params.get("name") == HIERARCHICAL_ALL_REDUCE:
        return [False] * n_out  # tpustrat's own all-reduce over every replica, by slices
    if name == "cond":
        if inputs[0]:
            return [True] * n_out
        branches = [varying_outputs(b, inputs[1:]) for b in eqn.params["branches"]]
        return [any(column) for column in zip(*branches)]
    if name == "scan":
        return _scan(eqn, inputs)
    if name == "while":
        return _while(eqn, inputs)
    inner = [v for v in eqn.params.values() if isinstance(v, (Jaxpr, ClosedJaxpr))]
    if len(inner) == 1 and _arity(inner[0]) == (len(inputs), n_out):
        return varying_outputs(inner[0], inputs)  # jit, remat, custom_jvp_call, ...
    if inner or any(
        isinstance(v, tuple) and v and isinstance(v[0], ClosedJaxpr) for v in eqn.params.values()
    ):
        return [True] * n_out  # an unknown higher-order primitive: assume the worst
    return [any_varying] * n_out


def _scan(eqn, inputs: list[bool]) -> list[bool]:
    n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    consts, carry, xs = (
        inputs[:n_consts],
        inputs[n_consts : n_consts + n_carry],
        inputs[n_consts + n_carry :],
    )
    while True:
        out = varying_outputs(eqn.params["jaxpr"], consts + carry + xs)
        new_carry = [a or b for a, b in zip(carry, out[:n_carry])]
        if new_carry == carry:
            return out
        carry = new_carry


def _while(eqn, inputs: list[bool]) -> list[bool]:
    n_cond, n_body = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    cond_consts, body_consts = inputs[:n_cond], inputs[n_cond : n_cond + n_body]
    carry = inputs[n_cond + n_body :]
    while True:
        if any(varying_outputs(eqn.params["cond_jaxpr"], cond_consts + carry)):
            return [True] * len(carry)  # replicas may stop after different trip counts
        out = varying_outputs(eqn.params["body_jaxpr"], body_consts + carry)
        new_carry = [a or b for a, b in zip(carry, out)]
        if new_carry == carry:
            return carry
        carry = new_carry


def _arity(jaxpr: Jaxpr | ClosedJaxpr) -> tuple[int, int]:
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    return len(jaxpr.invars), len(jaxpr.outvars)


def _names_replica_axis(params) -> bool:
    for key in ("axes", "axis_name"):
        names = params.get(key)
        if names is None:
            continue
        names = names if isinstance(names, (tuple, list, frozenset, set)) else (names,)
        if REPLICA_AXIS in names:
            return True
    return False
