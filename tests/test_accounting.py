"""Compile accounting and donation: counts, reasons for recompiles, donated buffers."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tpustrat as ts


def _step(x, scale):
    return ts.get_replica_context().all_reduce("sum", jax.tree.map(lambda v: v * scale, x))


def test_counts_and_reasons():
    strategy = ts.TPUStrategy()
    batch = ts.PerReplica.from_stacked(np.ones((8, 4, 2), np.float32))
    for _ in range(3):
        strategy.run(_step, args=(batch, 2.0))
    stats = strategy.compile_stats()
    assert (stats.num_compiles, stats.num_cache_hits, stats.recompiles) == (1, 2, ())

    strategy.run(_step, args=(ts.PerReplica.from_stacked(np.ones((8, 3, 2), np.float32)), 2.0))
    strategy.run(_step, args=(ts.PerReplica.from_stacked(np.ones((8, 3, 2), np.int32)), 2.0))
    strategy.run(_step, args=(ts.PerReplica.from_stacked(np.ones((8, 3, 2), np.int32)), 2))
    strategy.run(
        _step, args=(ts.PerReplica.from_stacked(np.ones((8, 3, 2), np.int32)), np.float32(2))
    )
    strategy.run(_step, args=((batch,), 2.0))
    stats = strategy.compile_stats()
    assert stats.num_compiles == 6
    reasons = [r.reasons for r in stats.recompiles]
    assert all(r.function == "_step" for r in stats.recompiles)
    assert reasons[0] == (
        "args[0] changed shape from (8, 4, 2) to (8, 3, 2); a partial batch? pad it "
        "(ts.InputOptions) or pass ts.RunOptions(experimental_bucketizing_dynamic_shape=True)",
    )
    assert reasons[1] == ("args[0] changed dtype from float32 to int32; cast it once",)
    assert reasons[2] == ("args[1] changed dtype from float32 to int32; cast it once",)
    assert reasons[3] == ("args[1] changed dtype from int32 to float32; cast it once",)
    assert reasons[4][0].startswith("the argument structure changed (added args[0][0]")
    assert "removed args[0]" in reasons[4][0]
    assert "6 programs compiled, 2 cache hits" in str(stats)


def test_python_number_versus_array():
    strategy = ts.TPUStrategy()
    strategy.run(lambda s: s * 2, args=(2.0,))
    strategy.run(lambda s: s * 2, args=(2.0,))  # another lambda: another function, no recompile
    step = lambda s: s * 2
    strategy.run(step, args=(2.0,))
    strategy.run(step, args=(np.float32(2.0),))
    (recompile,) = strategy.compile_stats().recompiles
    assert "args[0] changed from a Python number to a float32 array" in recompile.reasons[0]


def _scaled(scale):
    def step(x):
        return x * scale

    return step


def test_a_new_function_object_of_the_same_code_is_named_with_the_fix():
    strategy = ts.TPUStrategy()
    for scale in (2.0, 3.0):
        strategy.run(lambda x, scale=scale: x * scale, args=(np.float32(1),))
        strategy.run(_scaled(scale), args=(np.float32(1),))
    lambda_again, closure_again = strategy.compile_stats().recompiles
    assert (
        lambda_again.function
        == "test_a_new_function_object_of_the_same_code_is_named_with_the_fix.<locals>.<lambda>"
    )
    assert closure_again.function == "_scaled.<locals>.step"
    for recompile in (lambda_again, closure_again):
        (reason,) = recompile.reasons
        assert reason.startswith(f"{recompile.function} is a new function object of the same code")
        assert "define the function once, outside the loop" in reason
    assert strategy.compile_stats().num_compiles == 4


@pytest.mark.parametrize("first", ["replicated", "PerReplica"])
def test_a_leaf_switching_between_replicated_and_per_replica_is_named(first):
    strategy = ts.TPUStrategy()
    kinds = {
        "replicated": np.ones(3, np.float32),
        "PerReplica": ts.PerReplica.from_stacked(np.ones((8, 3), np.float32)),
    }
    second = "PerReplica" if first == "replicated" else "replicated"
    for kind in (first, second):
        strategy.run(_step, args=({"w": np.ones(3, np.float32), "x": kinds[kind]}, 2.0))
    (recompile,) = strategy.compile_stats().recompiles
    names = {"replicated": "a replicated value", "PerReplica": "a PerReplica"}
    assert recompile.reasons == (
        f"args[0]['x'] switched from {names[first]} to {names[second]}; pass it the same way "
        "on every call (a replicated value as a plain or replicated array, a per-replica one "
        "always as a PerReplica)",
    )


def test_a_structure_change_says_where_and_what():
    strategy = ts.TPUStrategy()
    w = np.ones(3, np.float32)
    strategy.run(_step, args=({"a": (w, w)}, 2.0))
    strategy.run(_step, args=({"a": [w, w]}, 2.0))
    strategy.run(_step, args=({"a": [w, w], "b": w}, 2.0))
    tuple_to_list, added = (r.reasons for r in strategy.compile_stats().recompiles)
    assert tuple_to_list == (
        "the argument structure changed (args[0]['a'] was a tuple and is a list); pass the same "
        "pytree structure on every call",
    )
    assert added == (
        "the argument structure changed (added args[0]['b']); pass the same pytree structure "
        "on every call",
    )


class _Model(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.dense = nnx.Linear(2, 3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)


def _bump(model, x):
    bias = model.dense.bias[...]
    model.dense.bias[...] = bias + x.astype(bias.dtype)


# A change to the model between two calls, and the reason compile_stats must give.
NNX_CHANGES = {
    "a new attribute": (
        lambda m: setattr(m, "extra", nnx.Param(jnp.zeros(2))),
        "the NNX objects' graph changed: args[0].extra was added (Param)",
    ),
    "a variable of another type": (
        lambda m: setattr(m.dense, "kernel", nnx.BatchStat(m.dense.kernel[...])),
        "the NNX objects' graph changed: args[0].dense.kernel changed from Param to BatchStat",
    ),
    "a static attribute": (
        lambda m: m.eval(),
        "the NNX objects' graph changed: args[0].dropout.deterministic changed from False to True",
    ),
    "a variable of another shape": (
        lambda m: setattr(m.dense, "bias", nnx.Param(jnp.zeros(4))),
        "args[0].dense.bias changed shape from (3,) to (4,)",
    ),
    "a variable of another dtype": (
        lambda m: setattr(m.dense, "bias", nnx.Param(jnp.zeros(3, jnp.bfloat16))),
        "args[0].dense.bias changed dtype from float32 to bfloat16; cast it once",
    ),
}


@pytest.mark.parametrize("change", list(NNX_CHANGES), ids=lambda c: c.replace(" ", "-"))
def test_an_nnx_recompile_names_the_object_and_attribute(change):
    mutate, reason = NNX_CHANGES[change]
    strategy = ts.TPUStrategy()
    model = _Model()
    strategy.run(_bump, args=(model, np.float32(1)))
    mutate(model)
    strategy.run(_bump, args=(model, np.float32(1)))
    (recompile,) = strategy.compile_stats().recompiles
    assert recompile.function == "_bump"
    assert recompile.reasons[0].startswith(reason), recompile.reasons
    np.testing.assert_allclose(
        np.asarray(model.dense.bias[...], np.float32),
        2.0 - (change in ("a variable of another shape", "a variable of another dtype")),
    )


def test_runs_inside_jit_are_not_counted():
    strategy = ts.TPUStrategy()
    jax.jit(lambda x: strategy.run(lambda v: v + 1, args=(x,)))(1.0)
    assert strategy.compile_stats().num_compiles == 0


DONATE = ts.RunOptions(donate_argnums=(0,))


def test_donated_state_is_updated_in_place():
    strategy = ts.TPUStrategy()
    state = strategy.replicate({"w": np.ones(16, np.float32), "n": np.int32(0)})
    old = [state["w"], state["n"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a usable donation warns nothing, JAX's warning included
        new = strategy.run(
            lambda s: {"w": s["w"] * 2, "n": s["n"] + 1}, args=(state,), options=DONATE
        )
    assert all(buffer.is_deleted() for buffer in old)
    np.testing.assert_allclose(np.asarray(new["w"]), 2 * np.ones(16))
    with pytest.raises(ValueError, match=r"args\[0\]\['n'\] was donated to an earlier run call"):
        strategy.run(lambda s: s, args=(state,))


def test_unusable_donation_warns_once_naming_the_buffer():
    strategy = ts.TPUStrategy()

    def shrink(s):
        return {"w": s["w"][:2], "b": s["b"] + 1}

    def state():
        return strategy.replicate({"w": np.ones(16, np.float32), "b": np.zeros(3, np.float32)})

    with pytest.warns(UserWarning, match=r"1 donated buffer\(s\) cannot be reused") as record:
        strategy.run(shrink, args=(state(),), options=DONATE)
    assert "args[0]['w'] (float32[16], replicated)" in str(record[0].message)
    assert "Some donated buffers were not usable" not in " ".join(str(r.message) for r in record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy.run(shrink, args=(state(),), options=DONATE)  # same program: no second warning


def test_donating_a_missing_argument_is_an_error():
    strategy = ts.TPUStrategy()
    with pytest.raises(ValueError, match=r"donate_argnums \(3,\) names a position past the 1"):
        strategy.run(lambda s: s, args=(1.0,), options=ts.RunOptions(donate_argnums=(3,)))
    with pytest.raises(TypeError, match="donate_argnums must be a tuple of argument positions"):
        ts.RunOptions(donate_argnums=0)
    with pytest.raises(TypeError, match=r"donate_argnums\[0\] must be an int, got the bool True"):
        ts.RunOptions(donate_argnums=(True,))
    with pytest.raises(ValueError, match=r"donate_argnums\[0\] must be an int >= 0, got -1"):
        ts.RunOptions(donate_argnums=(-1,))
