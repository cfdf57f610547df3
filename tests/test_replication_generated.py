"""The replication proof on generated programs, checked against what every replica computes.

Modelled on JAX's ``ShardMapSystematicTest``: seeded random step functions are built from a
grammar of primitives (elementwise math, reductions, reshapes, slicing, dots, collectives, axis
indices, control flow, custom derivatives, gradients, random numbers, host callbacks, integer
ops, casts) over replicated and PerReplica inputs, and run through ``strategy.run``. A step
holds several programs and returns each value twice: as the proof decides, and through a copy
the proof must call varying, which gives what every device (each logical core of each
replica) computed, in the same compiled program: the ground truth. Every device's copy of an
output the proof calls replicated must be bit-equal to what every device computed; every
PerReplica output must be bit-equal to the ground truth. Calling an identical value
PerReplica is allowed (the proof fails closed), and counted.

A program is a plan (nested tuples, printed when a check fails) that ``_Evaluator`` turns into
JAX operations, on every mesh shape of ``MESHES``. Programs chosen by hand cover
the cases where a value is replicated by coincidence rather than by proof; a proof made
unsound on purpose must fail the checks; and the generated steps must use the primitives of
the grammar, each classified by the proof.
"""

from __future__ import annotations

import collections
import functools
import itertools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import io_callback

import tpustrat as ts
from tpustrat import _compile, _jaxpr, _replication
from tpustrat._mesh import REPLICA_AXIS

SIZE = 8  # every generated value is float32[SIZE]; SIZE is divisible by every replica count
PROGRAMS_PER_STEP = 8
STEPS_PER_CASE = 4

# The inputs every step takes, in env order, and whether each is the same on every replica.
# "same" is a PerReplica whose components are all equal: replicated by coincidence only.
INPUTS = ("w", "x", "same", "n", "m")  # and a sixth value (see _step_function)
INPUT_REPLICATED = {"w": True, "x": False, "same": False, "n": True, "m": False}

UNARY = (
    "sin", "tanh", "neg", "abs", "square", "exp", "log1p", "floor", "round", "sign", "rsqrt",
    "logistic", "cumsum", "cummax", "sort", "rev", "roll", "transpose", "sum", "max", "mean",
    "argmax", "top_k", "bf16", "f16", "int", "stop_gradient", "reshape_sum", "pad_slice",
    "scatter_add", "gather", "reduce", "reduce_window",
)  # fmt: skip
BINARY = ("add", "sub", "mul", "max", "min", "atan2", "where", "select", "dot", "outer", "einsum",
          "concat", "dynamic_slice", "int_ops")  # fmt: skip
# Collectives whose result is the same on every replica, and those whose result is not.
COMBINING = ("sum", "mean", "max", "min", "psum", "pmean", "gather_sum", "gather_first")
LOCAL_COLLECTIVES = ("gather_mine", "ppermute", "reduce_scatter")
RANDOM = ("normal", "fold_in", "split", "replica_key", "bits")
# "count" answers differently on every call, so on every device.
CALLBACKS = ("pure", "io", "count", "debug_print")


class _Generator:
    """Draws plans. ``env`` lists, for each value in scope, whether it is surely replicated.

    "Surely replicated" is the generator's own conservative judgement, used only to keep
    collectives out of branches and loops whose replicas might disagree (they would deadlock);
    the checks never read it.
    """

    def __init__(self, rng: random.Random, callbacks: bool):
        self.rng, self.callbacks = rng, callbacks

    def program(self, env: list[bool]) -> tuple:
        return self.expression(env, depth=3, collectives=True, differentiable=False)

    def expression(self, env, depth, collectives, differentiable) -> tuple:
        rng = self.rng
        if depth == 0 or rng.random() < 0.15:
            if rng.random() < 0.1:
                return ("const", rng.choice((0.0, 1.0, -2.5)))
            if self.callbacks and rng.random() < 0.3:
                return ("in", 5)  # the host's number: it differs between logical cores
            return ("in", rng.randrange(len(env)))
        kinds = ["unary"] * 4 + ["binary"] * 4 + ["cancel", "cond", "scan", "fori", "custom"]
        kinds += ["random", "axis_index", "where_self"]
        if collectives:
            kinds += ["combining"] * 3 + ["local_collective"]
        if not differentiable:
            kinds += ["while", "grad"]
            if self.callbacks:
                kinds += ["callback"]
        kind = rng.choice(kinds)
        sub = lambda e=env, d=depth - 1, c=collectives: self.expression(e, d, c, differentiable)
        if kind == "unary":
            return ("unary", rng.choice(UNARY), sub())
        if kind == "binary":
            return ("binary", rng.choice(BINARY), sub(), sub())
        if kind == "cancel":  # replicated by coincidence: x - x, x * 0, x ^ x
            return ("cancel", rng.choice(("sub", "mul0", "xor")), sub())
        if kind == "where_self":
            return ("where_self", sub(), sub())
        if kind == "combining":  # pmax and pmin have no derivative
            ops = [op for op in COMBINING if not (differentiable and op in ("max", "min"))]
            return ("combining", rng.choice(ops), sub())
        if kind == "local_collective":
            return ("local_collective", rng.choice(LOCAL_COLLECTIVES), sub())
        if kind == "axis_index":
            return ("axis_index",)
        if kind == "cond":
            predicate = sub()
            inner = collectives and self.surely_replicated(predicate, env)
            branches = [sub(c=inner) for _ in range(rng.choice((2, 2, 3)))]
            return ("cond", predicate, *branches)
        if kind == "scan":
            body_env = [*env, False, False]  # the carry and the scanned slice: unknown
            carry, y = (self.expression(body_env, depth - 1, collectives, differentiable)
                        for _ in range(2))  # fmt: skip
            return ("scan", sub(), sub(), carry, y)
        if kind == "fori":
            body = self.expression([*env, False, True], depth - 1, collectives, differentiable)
            return ("fori", sub(), body)
        if kind == "while":
            bound = sub()
            inner = collectives and self.surely_replicated(bound, env)
            return ("while", bound, sub(), self.expression([*env, False], depth - 1, inner, False))
        if kind == "custom":  # the *_total functions all-reduce
            names = ["vjp_double", "jvp_softplus"] + ["vjp_total", "jvp_total"] * collectives
            return ("custom", rng.choice(names), sub())
        if kind == "grad":
            body = self.expression([*env, False], depth - 1, collectives, differentiable=True)
            return ("grad", sub(), body)
        if kind == "random":
            return ("random", rng.choice(RANDOM), rng.choice(("key", "local_key")), sub())
        assert kind == "callback"
        return ("callback", rng.choice(CALLBACKS), sub())

    def surely_replicated(self, plan: tuple, env: list[bool]) -> bool:
        """Conservatively, whether ``plan`` is the same on every replica (see the class)."""
        kind = plan[0]
        if kind == "const":
            return True
        if kind == "in":
            return env[plan[1]]
        if kind == "combining":
            return True
        if kind in ("unary", "binary", "cancel", "where_self", "custom"):
            children = [p for p in plan[1:] if isinstance(p, tuple)]
            return all(self.surely_replicated(p, env) for p in children)
        return False


def _custom_functions():
    @jax.custom_vjp
    def vjp_double(x):
        return 2 * x

    vjp_double.defvjp(lambda x: (2 * x, None), lambda _, g: (2 * g,))

    @jax.custom_vjp
    def vjp_total(x):
        return lax.psum(x, REPLICA_AXIS)

    vjp_total.defvjp(lambda x: (lax.psum(x, REPLICA_AXIS), None), lambda _, g: (g,))

    @jax.custom_jvp
    def jvp_softplus(x):
        return jnp.logaddexp(x, 0.0)

    jvp_softplus.defjvp(lambda p, t: (jvp_softplus(p[0]), t[0] * jax.nn.sigmoid(p[0])))

    @jax.custom_jvp
    def jvp_total(x):
        return lax.pmean(x, REPLICA_AXIS)

    jvp_total.defjvp(lambda p, t: (jvp_total(p[0]), jvp_total(t[0])))
    return {
        "vjp_double": vjp_double,
        "vjp_total": vjp_total,
        "jvp_softplus": jvp_softplus,
        "jvp_total": jvp_total,
    }


CUSTOM = _custom_functions()


_CALLS = itertools.count()


def _host_sin(x):
    return np.sin(np.asarray(x)).astype(np.float32)


class _Evaluator:
    """Builds the JAX operations of a plan, inside ``strategy.run``."""

    def __init__(self, num_replicas: int, keys: dict[str, jax.Array]):
        self.num_replicas, self.keys = num_replicas, keys
        self.loops = 0  # how many loop bodies enclose the plan being built

    def __call__(self, plan: tuple, env: list[jax.Array]) -> jax.Array:
        kind, args = plan[0], plan[1:]
        value = getattr(self, "_" + kind)(env, *args)
        assert value.shape == (SIZE,) and value.dtype == jnp.float32, (plan, value)
        return value

    def _const(self, env, c):
        return jnp.full((SIZE,), c, jnp.float32)

    def _in(self, env, index):
        return env[index]

    def _unary(self, env, op, a):
        return _UNARY[op](self(a, env))

    def _binary(self, env, op, a, b):
        return _BINARY[op](self(a, env), self(b, env))

    def _cancel(self, env, op, a):
        x = self(a, env)
        if op == "sub":
            return x - x
        if op == "mul0":
            return x * 0.0
        bits = lax.bitcast_convert_type(x, jnp.int32)
        return (bits ^ bits).astype(jnp.float32)

    def _where_self(self, env, c, a):
        x = self(a, env)
        return jnp.where(self(c, env) > 0, x, x)

    def _combining(self, env, op, a):
        x, ctx = self(a, env), ts.get_replica_context()
        if op in ("sum", "mean", "max", "min"):
            return ctx.all_reduce(op, x)
        if op == "psum":
            return lax.psum(x, REPLICA_AXIS)
        if op == "pmean":
            return lax.pmean(x, REPLICA_AXIS)
        gathered = ctx.all_gather(x, axis=0).reshape(self.num_replicas, SIZE)
        return gathered.sum(0) if op == "gather_sum" else gathered[0]

    def _local_collective(self, env, op, a):
        x, ctx, n = self(a, env), ts.get_replica_context(), self.num_replicas
        if op == "gather_mine":
            gathered = ctx.all_gather(x, axis=0).reshape(n, SIZE)
            return gathered[ctx.replica_id_in_sync_group]
        if op == "ppermute":
            return lax.ppermute(x, REPLICA_AXIS, [(i, (i + 1) % n) for i in range(n)])
        return jnp.tile(ctx.reduce_scatter("sum", x, axis=0), n)

    def _axis_index(self, env):
        if (
            self.loops
            and _compile.XLA_CPU_ABORTS_ON_INDEX_IN_LOOP
            and jax.default_backend() == "cpu"
        ):
            # XLA:CPU of these jaxlib versions aborts compiling lax.axis_index in a small loop
            # (see tpustrat._compile), and run refuses it: the index the context read at the top of
            # the step is the same value, in the loop by closure.
            index = ts.get_replica_context().replica_id_in_sync_group
        else:
            index = lax.axis_index(REPLICA_AXIS)
        return jnp.full((SIZE,), index, jnp.float32)

    def _loop_body(self, plan: tuple, env: list[jax.Array]) -> jax.Array:
        self.loops += 1
        try:
            return self(plan, env)
        finally:
            self.loops -= 1

    def _cond(self, env, predicate, *branches):
        p = self(predicate, env)
        fns = [lambda b=b: self(b, env) for b in branches]
        if len(fns) == 2:
            return lax.cond(p.sum() > 0, *fns)
        index = jnp.clip(jnp.floor(jnp.abs(p[0])), 0, len(fns) - 1).astype(jnp.int32)
        return lax.switch(index, fns)

    def _scan(self, env, init, xs, carry, y):
        x = self(xs, env)

        def body(c, row):
            inner = [*env, c, jnp.broadcast_to(row, (SIZE,))]
            return jnp.tanh(self._loop_body(carry, inner)), self._loop_body(y, inner)

        final, ys = lax.scan(body, self(init, env), x[:3])
        return final + ys.sum(0)

    def _fori(self, env, init, body):
        def step(i, v):
            return jnp.tanh(self._loop_body(body, [*env, v, jnp.full((SIZE,), i, jnp.float32)]))

        return lax.fori_loop(0, 3, step, self(init, env))

    def _while(self, env, bound, init, body):
        n = 1 + jnp.floor(jnp.abs(self(bound, env)[0])).astype(jnp.int32) % 4

        def step(carry):
            i, v = carry
            return i + 1, jnp.tanh(self._loop_body(body, [*env, v]))

        return lax.while_loop(lambda c: c[0] < n, step, (jnp.int32(0), self(init, env)))[1]

    def _custom(self, env, name, a):
        return CUSTOM[name](self(a, env))

    def _grad(self, env, at, body):
        return jax.grad(lambda v: jnp.sum(jnp.sin(self(body, [*env, v]))))(self(at, env))

    def _random(self, env, op, key_name, a):
        key, x = jax.random.wrap_key_data(self.keys[key_name]), self(a, env)
        if op == "normal":
            return jax.random.normal(key, (SIZE,)) + x
        if op == "fold_in":
            key = jax.random.fold_in(key, jnp.floor(jnp.abs(x[0])).astype(jnp.int32))
            return jax.random.uniform(key, (SIZE,))
        if op == "split":
            return jax.random.normal(jax.random.split(key)[1], (SIZE,)) * x
        if op == "replica_key":
            return jax.random.uniform(ts.get_replica_context().replica_key(key), (SIZE,))
        bits = jax.random.bits(key, (SIZE,), jnp.uint32)
        return (bits >> 9).astype(jnp.float32) + x

    def _callback(self, env, op, a):
        x = self(a, env)
        shape = jax.ShapeDtypeStruct((SIZE,), jnp.float32)
        if op == "pure":
            return jax.pure_callback(_host_sin, shape, x)
        if op == "io":
            return io_callback(_host_sin, shape, x)
        if op == "count":
            # powers of two, so that sums of different answers rarely coincide
            return io_callback(lambda v: v + np.float32(2.0 ** (next(_CALLS) % 16)), shape, x)
        jax.debug.print("generated program: {}", x[0])
        return x


def _as_int(x):
    return jnp.clip(jnp.round(x * 4), -1000, 1000).astype(jnp.int32)


_UNARY = {
    "sin": jnp.sin,
    "tanh": jnp.tanh,
    "abs": jnp.abs,
    "exp": lambda x: jnp.exp(jnp.clip(x, -20, 20)),
    "log1p": lambda x: jnp.log1p(jnp.abs(x)),
    "floor": jnp.floor,
    "round": jnp.round,
    "sign": jnp.sign,
    "rsqrt": lambda x: lax.rsqrt(1 + x * x),
    "neg": lambda x: -x,
    "square": lambda x: x * x,
    "logistic": jax.nn.sigmoid,
    "cumsum": jnp.cumsum,
    "cummax": lambda x: lax.cummax(x, axis=0),
    "sort": jnp.sort,
    "rev": lambda x: x[::-1],
    "roll": lambda x: jnp.concatenate([x[3:], x[:3]]),
    "transpose": lambda x: x.reshape(2, SIZE // 2).T.reshape(SIZE),
    "sum": lambda x: jnp.broadcast_to(jnp.sum(x), (SIZE,)),
    "max": lambda x: jnp.broadcast_to(jnp.max(x), (SIZE,)),
    "mean": lambda x: x - jnp.mean(x),
    "argmax": lambda x: jax.nn.one_hot(jnp.argmax(x), SIZE, dtype=jnp.float32),
    "top_k": lambda x: jnp.tile(lax.top_k(x, 2)[0], SIZE // 2),
    "bf16": lambda x: x.astype(jnp.bfloat16).astype(jnp.float32),
    "f16": lambda x: jnp.clip(x, -1e4, 1e4).astype(jnp.float16).astype(jnp.float32),
    "int": lambda x: ((_as_int(x) // 3) % 5 + (_as_int(x) << 1)).astype(jnp.float32),
    "stop_gradient": lax.stop_gradient,
    "reshape_sum": lambda x: jnp.tile(x.reshape(2, SIZE // 2).sum(0), 2),
    "pad_slice": lambda x: jnp.pad(x, (2, 1))[1 : SIZE + 1],
    "scatter_add": lambda x: jnp.zeros(SIZE).at[jnp.arange(SIZE) % 3].add(x),
    "gather": lambda x: x[jnp.array([7, 0, 3, 3, 1, 6, 2, 5])],
    "reduce": lambda x: jnp.tile(
        lax.reduce(x.reshape(2, SIZE // 2), np.float32(1), lambda a, b: a * b + 1, (0,)), 2
    ),
    "reduce_window": lambda x: lax.reduce_window(
        x, np.float32(0), lambda a, b: jnp.maximum(a, b) - 1, (3,), (1,), "SAME"
    ),
}

_BINARY = {
    "add": jnp.add,
    "sub": jnp.subtract,
    "mul": jnp.multiply,
    "max": jnp.maximum,
    "min": jnp.minimum,
    "atan2": jnp.arctan2,
    "where": lambda a, b: jnp.where(a > b, a, b * 0.5),
    "select": lambda a, b: lax.select(a < 0, b, a),
    "dot": lambda a, b: jnp.outer(a, b) @ jnp.tanh(a),
    "outer": lambda a, b: (a[:, None] * b[None, :]).sum(1),
    "einsum": lambda a, b: jnp.tile(
        jnp.einsum("ij,kj->ik", a.reshape(2, SIZE // 2), b.reshape(2, SIZE // 2)).reshape(4),
        SIZE // 4,
    ),
    "concat": lambda a, b: jnp.concatenate([a[: SIZE // 2], b[SIZE // 2 :]]),
    "dynamic_slice": lambda a, b: lax.dynamic_slice(
        jnp.concatenate([a, b]), (jnp.clip(_as_int(a[0]), 0, SIZE),), (SIZE,)
    ),
    "int_ops": lambda a, b: ((_as_int(a) ^ _as_int(b)) + (_as_int(a) * 3) % 7).astype(jnp.float32),
}


def _draw_step(seed: int) -> tuple[list[tuple], bool]:
    """The plans of one step and whether it calls the host (its core axes are then manual)."""
    rng = random.Random(seed)
    callbacks = rng.random() < 0.5
    generator = _Generator(rng, callbacks)
    env = [INPUT_REPLICATED[name] for name in INPUTS] + [not callbacks]
    return [generator.program(env) for _ in range(PROGRAMS_PER_STEP)], callbacks


def _step_function(plans: list[tuple], num_replicas: int, callbacks: bool):
    """The step: each plan's value, then each again through a copy the proof must call varying.

    The sixth value in scope is, in a step that calls the host, a number the host gives each
    device (its ``count`` callback), which differs between the logical cores of a replica too;
    in other steps, ``2 * w``.

    The copy passes the value through a ``cond`` on the replica index that always takes the
    branch returning it unchanged (the other branch keeps JAX from forwarding the value past
    the ``cond``): the same bits, computed by the same program, stacked per replica.
    """

    def step(w, x, same, n, m, key, local_key):
        evaluate = _Evaluator(num_replicas, {"key": key, "local_key": local_key})
        ones = jnp.ones((SIZE,), jnp.float32)
        env = [w, x, same, n.astype(jnp.float32) * ones, m.astype(jnp.float32) * ones]
        env.append(evaluate._callback(env, "count", ("in", 0)) if callbacks else 2 * w)
        values = [evaluate(plan, env) for plan in plans]
        replica = lax.axis_index(REPLICA_AXIS)
        copies = [lax.cond(replica >= 0, lambda v: v, jnp.negative, v) for v in values]
        return values, copies

    return step


def _inputs(strategy: ts.TPUStrategy, seed: int):
    n = strategy.num_replicas_in_sync
    rng = np.random.default_rng(seed)
    per_replica = lambda values: ts.PerReplica(list(values))
    same = rng.normal(size=SIZE).astype(np.float32)
    return (
        rng.normal(size=SIZE).astype(np.float32),
        per_replica(rng.normal(size=(n, SIZE)).astype(np.float32)),
        per_replica([same] * n),
        np.int32(rng.integers(-3, 4)),
        per_replica(rng.integers(-3, 4, size=n).astype(np.int32)),
        np.asarray(jax.random.key_data(jax.random.key(seed))),
        per_replica(np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), n)))),
    )


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint32) if x.dtype == np.float32 else x


def _device_copies(array: jax.Array) -> dict[jax.Device, np.ndarray]:
    """What each device holds of ``array``, as bits (a row per replica of a stacked array)."""
    return {shard.device: _bits(shard.data) for shard in array.addressable_shards}


def _check_step(strategy, plans: list[tuple], callbacks: bool, seed: int) -> list[str]:
    """Runs one generated step and checks every output against what each device computed.

    Returns the verdict on each plan's output: "replicated", "per_replica" (the replicas'
    values differ) or "per_replica_identical" (the proof missed a replicated value).
    """
    n = strategy.num_replicas_in_sync
    step = _step_function(plans, n, callbacks)
    outputs, copies = strategy.run(step, args=_inputs(strategy, seed))
    verdicts = []
    for plan, output, copy in zip(plans, outputs, copies):
        context = f"step seed {seed}, plan {plan}"
        assert isinstance(copy, ts.PerReplica), f"a cond on the replica index varies ({context})"
        truth = _device_copies(copy.stacked)  # each device's own (1, SIZE) row
        rows = np.concatenate(list(truth.values()))
        identical = (rows == rows[0]).all()
        if isinstance(output, ts.PerReplica):
            verdicts.append("per_replica_identical" if identical else "per_replica")
            got = _device_copies(output.stacked)
            for device, row in truth.items():
                np.testing.assert_array_equal(got[device], row, err_msg=context)
            continue
        verdicts.append("replicated")
        assert identical, (
            f"the proof called an output replicated, but the devices computed different values "
            f"({context}): {np.asarray(rows).view(np.float32)}"
        )
        for device, value in _device_copies(output).items():  # each copy of the returned array
            np.testing.assert_array_equal(value, rows[0], err_msg=f"{device} ({context})")
    return verdicts


MESHES = {
    "8x1": dict(num_logical_cores=1),
    "4x2": dict(num_logical_cores=2),
    "2x4": dict(num_logical_cores=4),
    "8x1_2slices": dict(num_logical_cores=1, num_slices=2),
    "4x2_2slices": dict(num_logical_cores=2, num_slices=2),
}
SEEDS = (0, 1)


@functools.cache
def _strategy(mesh: str) -> ts.TPUStrategy:
    return ts.TPUStrategy(**MESHES[mesh])


def _step_seed(mesh: str, seed: int, step: int) -> int:
    return 10_000 * seed + 100 * list(MESHES).index(mesh) + step


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mesh", list(MESHES))
def test_generated_programs(mesh, seed):
    verdicts = collections.Counter()
    for i in range(STEPS_PER_CASE):
        step_seed = _step_seed(mesh, seed, i)
        plans, callbacks = _draw_step(step_seed)
        verdicts.update(_check_step(_strategy(mesh), plans, callbacks, step_seed))
    print(f"verdicts {mesh} seed {seed}: {dict(verdicts)}")  # shown by pytest -s
    # The grammar yields both kinds of output: a generator that lost one would check little.
    assert sum(verdicts.values()) == STEPS_PER_CASE * PROGRAMS_PER_STEP
    assert verdicts["replicated"] > 0 and verdicts["per_replica"] > 0, verdicts


# Programs chosen by hand, run on the meshes below in a step without and with host callbacks, and
# the verdict each must get: None where either verdict is right (the checks apply all the same).
# "per_core" marks a value replicated by an all-reduce over the replica axis of the host's
# number (in a step that calls the host, the sixth value), which differs between the logical
# cores of a replica: in such a step on a mesh of several cores per replica (the cores are then
# manual axes too) it must be PerReplica, elsewhere replicated.
# Scope: w, x, same, n, m, the sixth value, then a loop's carry and a scanned or counted value.
# fmt: off
HAND_PICKED = [
    (("cancel", "sub", ("in", 1)), None),  # x - x on a PerReplica x
    (("in", 2), "per_replica"),  # a PerReplica input, equal on every replica by coincidence
    (("local_collective", "ppermute", ("in", 0)), "per_replica"),  # a replicated value, moved
    (("axis_index",), "per_replica"),
    # a cond whose predicate is per replica and whose branches compute replicated values
    (("cond", ("in", 1), ("unary", "exp", ("in", 0)), ("unary", "sin", ("in", 0))), "per_replica"),
    (("cond", ("combining", "max", ("in", 1)), ("in", 0), ("unary", "sin", ("in", 0))),
     "replicated"),
    # a while loop whose trip count is per replica (m), and one whose count is replicated (n)
    (("while", ("in", 4), ("in", 0), ("unary", "sin", ("in", 6))), "per_replica"),
    (("while", ("in", 3), ("in", 0), ("unary", "sin", ("in", 6))), "replicated"),
    (("random", "normal", "local_key", ("in", 0)), "per_replica"),
    (("random", "normal", "key", ("in", 0)), "replicated"),
    (("random", "replica_key", "key", ("in", 0)), "per_replica"),
    (("scan", ("in", 0), ("in", 1), ("unary", "sin", ("in", 6)), ("in", 7)), "per_replica"),
    (("fori", ("in", 0), ("binary", "mul", ("in", 6), ("in", 7))), "replicated"),
    (("grad", ("in", 0), ("binary", "mul", ("in", 6), ("in", 0))), "replicated"),
    (("grad", ("in", 0), ("binary", "mul", ("in", 6), ("in", 1))), "per_replica"),
    (("custom", "jvp_softplus", ("in", 1)), "per_replica"),
    (("custom", "vjp_total", ("in", 1)), "replicated"),
    (("unary", "reduce", ("in", 0)), "replicated"),
    (("binary", "add", ("unary", "sort", ("in", 1)), ("unary", "top_k", ("in", 0))), "per_replica"),
    # all-reduces over the replica axis, a sub-axis of the mesh where the cores are manual
    (("combining", "psum", ("in", 1)), "replicated"),
    (("combining", "sum", ("in", 1)), "replicated"),
    (("combining", "gather_first", ("in", 1)), "replicated"),
    (("combining", "sum", ("axis_index",)), "replicated"),
    (("combining", "mean", ("in", 5)), "per_core"),
    # Found by test_generated_programs (step seed 224): on 4x2 in two slices, the all-reduce by
    # slices of the host's numbers was called replicated; each core held a different sum.
    (("where_self", ("in", 3),
      ("combining", "sum", ("binary", "where", ("const", 1.0), ("in", 5)))), "per_core"),
]
# fmt: on


@pytest.mark.parametrize("callbacks", [False, True], ids=["pure", "host"])
@pytest.mark.parametrize("mesh", ["8x1", "4x2_2slices"])  # 4x2: sub-axes, in slices
def test_hand_picked_programs(mesh, callbacks):
    strategy = _strategy(mesh)
    picked = HAND_PICKED + [(("callback", "pure", ("in", 0)), "per_replica")] * callbacks
    verdicts = _check_step(strategy, [plan for plan, _ in picked], callbacks, seed=7)
    cores_manual = callbacks and strategy.mesh.shape["logical_core"] > 1
    for (plan, expected), verdict in zip(picked, verdicts):
        if expected == "per_core":
            expected = "per_replica" if cores_manual else "replicated"
        if expected is not None:
            assert verdict.startswith(expected), (plan, verdict)


def test_the_checks_catch_an_unsound_proof(monkeypatch):
    """A proof that calls a per-replica output replicated fails the checks: they have teeth."""
    sound = _replication.varying_outputs

    def unsound(jaxpr, varying_inputs, combined_axes=(REPLICA_AXIS,)):
        return [False, *sound(jaxpr, varying_inputs, combined_axes)[1:]]

    monkeypatch.setattr(_replication, "varying_outputs", unsound)
    strategy = ts.TPUStrategy(num_logical_cores=2)
    with pytest.raises(AssertionError, match="the devices computed different values"):
        _check_step(strategy, [("unary", "sin", ("in", 1))], callbacks=False, seed=0)


def _primitives(jaxpr) -> set:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    found = set()
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive)
        for inner in _jaxpr.inner_jaxprs(eqn):
            found |= _primitives(inner)
    return found


def test_generated_programs_cover_the_grammar():
    """The steps of test_generated_programs and test_hand_picked_programs, traced: they use the
    primitives the proof has rules for, and none it has never classified."""
    found = set()
    for mesh in ["8x1", "4x2_2slices"]:
        strategy = _strategy(mesh)
        steps = [_draw_step(_step_seed(mesh, seed, i))
                 for seed in SEEDS for i in range(STEPS_PER_CASE)]  # fmt: skip
        steps.append(([plan for plan, _ in HAND_PICKED], True))
        for plans, callbacks in steps:
            step = _step_function(plans, strategy.num_replicas_in_sync, callbacks)
            run = lambda *args, step=step, strategy=strategy: strategy.run(step, args=args)
            found |= _primitives(jax.make_jaxpr(run)(*_inputs(strategy, 0)))
    unclassified = sorted(p.name for p in found if not _replication.is_classified(p))
    assert not unclassified, (
        f"generated steps use primitives the proof never classified: {unclassified}"
    )
    missing = GRAMMAR_PRIMITIVES - {p.name for p in found}
    assert not missing, f"no generated step uses {sorted(missing)}: the grammar lost them"


# The primitive of jax.debug.print: debug_callback on older JAX (0.7), debug_print on newer.
_DEBUG_PRINT = jax.make_jaxpr(lambda x: jax.debug.print("{}", x))(0.0).eqns[0].primitive.name

# Primitives the generated steps must exercise (the grammar's control flow, collectives,
# custom derivatives, random numbers, host callbacks and the computations primitives apply).
GRAMMAR_PRIMITIVES = {
    "cond", "while", "scan", "jit", "custom_jvp_call", "custom_vjp_call", "psum", "pmax",
    "pmin", "all_gather", "ppermute", "reduce_scatter", "axis_index", "pure_callback",
    "io_callback", _DEBUG_PRINT, "random_wrap", "random_bits", "random_fold_in",
    "random_split", "select_n", "dot_general", "reduce", "reduce_window", "scatter-add",
    "transpose", "reshape", "dynamic_slice", "convert_element_type", "sort", "xor",
    "shift_left", "cumsum", "argmax",
}  # fmt: skip
