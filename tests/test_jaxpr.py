"""The jaxpr layer: sub-jaxprs of every call-like primitive, unknown ones refused, the markers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.extend.core import ClosedJaxpr, Primitive

import tpustrat as ts
from tpustrat import _jaxpr
from tpustrat._mesh import REPLICA_AXIS
from tpustrat._replication import varying_outputs


@jax.custom_jvp
def _custom_jvp_sin(x):
    return jnp.sin(x)


_custom_jvp_sin.defjvp(lambda p, t: (_custom_jvp_sin(p[0]), jnp.cos(p[0]) * t[0]))


@jax.custom_vjp
def _custom_vjp_sin(x):
    return jnp.sin(x)


_custom_vjp_sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (jnp.cos(x) * g,))

_MESH = jax.make_mesh((8,), (REPLICA_AXIS,), axis_types=(jax.sharding.AxisType.Explicit,))

# What each call-like primitive is made by: (function, its kind, how many jaxprs it holds).
CALL_LIKE = {
    "jit": (jax.jit(jnp.sin), "call", 1),
    "custom_jvp": (_custom_jvp_sin, "call", 1),
    "custom_vjp": (_custom_vjp_sin, "call", 1),
    "checkpoint": (jax.checkpoint(jnp.sin), "call", 1),
    "shard_map": (
        jax.shard_map(jnp.sin, mesh=_MESH, in_specs=jax.sharding.PartitionSpec(),
                      out_specs=jax.sharding.PartitionSpec(), check_vma=False),
        "per_device",
        1,
    ),
    "cond": (lambda x: lax.cond(x.sum() > 0, jnp.sin, jnp.sin, x), "control", 2),
    "while": (lambda x: lax.while_loop(lambda c: c.sum() > 9, jnp.sin, x), "control", 2),
    "scan": (lambda x: lax.scan(lambda c, _: (jnp.sin(c), None), x, length=2)[0], "control", 1),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CALL_LIKE))
def test_every_call_like_primitive_has_its_jaxprs_found(name):
    fn, kind, count = CALL_LIKE[name]
    jaxpr = jax.make_jaxpr(fn)(np.ones(8, np.float32)).jaxpr
    (eqn,) = [e for e in jaxpr.eqns if e.primitive in _jaxpr.HIGHER_ORDER]
    assert _jaxpr.HIGHER_ORDER[eqn.primitive].kind == kind
    inner = _jaxpr.inner_jaxprs(eqn)
    assert len(inner) == count
    assert all(_jaxpr.primitives.sin_p in _jaxpr.primitives_in(j) for j in inner[-1:])
    for per_device in (False, True):
        body = _jaxpr.call_body(eqn, per_device=per_device)
        if kind == "call" or (kind == "per_device" and per_device):
            assert body is not None and len(body[0].invars) == len(eqn.invars)
            assert _jaxpr.primitives.sin_p in _jaxpr.primitives_in(body[0])
        else:
            assert body is None
    # A higher-order primitive whose jaxprs are not where the table says is refused, not guessed.
    moved = eqn.replace(params={k: None for k in eqn.params})
    with pytest.raises(RuntimeError, match="not the jaxprs tpustrat reads there"):
        _jaxpr.inner_jaxprs(moved)


def _unknown_call_primitive() -> Primitive:
    """A higher-order primitive of another library: it applies the jaxpr it holds."""
    mystery = Primitive("tpustrat_test_call")
    mystery.multiple_results = True
    mystery.def_abstract_eval(lambda *args, jaxpr: jaxpr.out_avals)
    mystery.def_impl(lambda *args, jaxpr: jax.core.eval_jaxpr(jaxpr.jaxpr, jaxpr.consts, *args))
    return mystery


def test_an_unknown_higher_order_primitive_is_refused():
    mystery = _unknown_call_primitive()

    def call(fn, x):
        body: ClosedJaxpr = jax.make_jaxpr(fn)(x)
        return mystery.bind(x, jaxpr=body)[0]

    jaxpr = jax.make_jaxpr(lambda x: call(jnp.sin, x))(1.0).jaxpr
    (eqn,) = jaxpr.eqns
    # Its jaxprs are seen (a host callback inside it is found) ...
    assert _jaxpr.primitives.sin_p in _jaxpr.primitives_in(jaxpr)
    # ... but it is no call, so no analysis takes it as its body:
    assert _jaxpr.call_body(eqn, per_device=True) is None
    assert varying_outputs(jaxpr, [False]) == [True]  # the proof lets it vary
    tx = optax.GradientTransformation(lambda p: (), lambda g, s, p=None: (call(jnp.sin, g), s))
    sharded = ts.shard_update(tx)
    strategy = ts.TPUStrategy()
    with pytest.raises(ValueError, match=r"'tpustrat_test_call'.* is not known to work block by"):
        strategy.run(lambda g: sharded.update(g, ()), args=(np.ones(16, np.float32),))


def test_markers_are_the_identity_under_jit_grad_and_vmap():
    x = np.linspace(-1, 1, 8, dtype=np.float32)

    def marked(x):
        y = _jaxpr.mark_varying(jnp.sin(x), (REPLICA_AXIS,))
        return _jaxpr.mark_invariant(y, (REPLICA_AXIS,), x)

    np.testing.assert_array_equal(jax.jit(marked)(x), jnp.sin(x))
    np.testing.assert_allclose(jax.grad(lambda x: marked(x).sum())(x), np.cos(x), rtol=1e-6)
    np.testing.assert_array_equal(jax.vmap(marked)(x[:, None])[:, 0], jnp.sin(x))
    # the compiled program is the unmarked one, instruction for instruction
    ops = lambda f: re.findall(r"= \S+ ([\w-]+)\(", jax.jit(f).lower(x).compile().as_text())
    assert ops(marked) == ops(jnp.sin)


def test_the_proof_reads_the_markers():
    every = (REPLICA_AXIS, "logical_core")

    def step(x, w):
        moved = lax.ppermute(x, REPLICA_AXIS, [(i, (i + 1) % 4) for i in range(4)])
        return (
            _jaxpr.mark_varying(w, (REPLICA_AXIS,)),  # replicated, marked varying
            _jaxpr.mark_invariant(moved, (REPLICA_AXIS,), w),  # vouched for: as w is
            _jaxpr.mark_invariant(moved, (REPLICA_AXIS,), x),  # x less the replica axis
        )

    jaxpr = jax.make_jaxpr(step, axis_env=[(REPLICA_AXIS, 4), ("logical_core", 2)])(1.0, 2.0)
    assert varying_outputs(jaxpr, [{REPLICA_AXIS}, set()], every) == [True, False, False]
    assert varying_outputs(jaxpr, [set(every), set()], every) == [True, False, True]
