"""Training-loop recipes the docs give, checked against one device on the global batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tpustrat as ts

MICRO_STEPS = 4


@pytest.fixture(params=[1, 2], ids=["8x1", "4x2"])
def mixed_strategy(request):
    """Two mesh shapes for the mixed-precision recipes, whose programs are slower to compile."""
    return ts.TPUStrategy(num_logical_cores=request.param)


def _data(rows, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 5)).astype(np.float32)
    y = (x @ rng.normal(size=(5, 3)) + 0.1 * rng.normal(size=(rows, 3))).astype(np.float32)
    return x, y


def _init():
    rng = np.random.default_rng(1)
    return {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}


def _loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _accumulating_step(tx):
    """A data-parallel step whose optimizer is optax.MultiSteps: one micro-batch per call."""

    def step(state, batch):
        params, opt_state = state
        x, y = batch
        grads = jax.grad(_loss)(params, x, y)
        grads = ts.get_replica_context().all_reduce("mean", grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    return step


def _large_batch_reference(x, y, steps):
    """One device, plain adam, the whole accumulated batch in each step."""
    tx = optax.adam(0.05)
    params = _init()
    opt_state = tx.init(params)
    rows = len(x) // steps
    for i in range(steps):
        grads = jax.grad(_loss)(params, x[i * rows : (i + 1) * rows], y[i * rows : (i + 1) * rows])
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_gradient_accumulation_equals_the_large_batch_step(strategy):
    """optax.MultiSteps over 4 micro-batches of 8 rows per replica, with run and run_steps."""
    n = strategy.num_replicas_in_sync
    large_steps = 3
    x, y = _data(large_steps * MICRO_STEPS * 8 * n)
    tx = optax.MultiSteps(optax.adam(0.05), every_k_schedule=MICRO_STEPS)
    step = _accumulating_step(tx)
    micro_batches = [
        (xb, yb)
        for xb, yb in zip(
            np.split(x, large_steps * MICRO_STEPS), np.split(y, large_steps * MICRO_STEPS)
        )
    ]
    expected = _large_batch_reference(x, y, large_steps)

    params = _init()
    state = strategy.replicate((params, tx.init(params)))
    for batch in strategy.experimental_distribute_dataset(micro_batches):
        state, _ = strategy.run(step, args=(state, batch))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state[0], expected
    )

    state = strategy.replicate((params, tx.init(params)))
    iterator = iter(strategy.experimental_distribute_dataset(micro_batches))
    for _ in range(large_steps):
        state, _, num_steps = strategy.run_steps(step, state, iterator, MICRO_STEPS)
        assert num_steps == MICRO_STEPS
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state[0], expected
    )


def _mixed_loss(params, x, y, dtype):
    """The forward pass in ``dtype`` (bf16 or f16), the loss itself in float32."""
    w, b = params["w"].astype(dtype), params["b"].astype(dtype)
    prediction = (x.astype(dtype) @ w + b).astype(jnp.float32)
    return jnp.mean((prediction - y) ** 2)


def test_bf16_compute_with_f32_parameters(mixed_strategy):
    strategy = mixed_strategy
    x, y = _data(16 * strategy.num_replicas_in_sync)
    tx = optax.sgd(0.05)

    def step(params, x, y):
        grads = jax.grad(_mixed_loss)(params, x, y, jnp.bfloat16)
        grads = ts.get_replica_context().all_reduce("mean", grads)
        return optax.apply_updates(params, tx.update(grads, tx.init(params))[0])

    params = strategy.replicate(_init())
    expected = _init()
    for xs, ys in zip(np.split(x, 2), np.split(y, 2)):
        batch = strategy.experimental_distribute_dataset([(xs, ys)])
        (xb, yb) = next(iter(batch))
        params = strategy.run(step, args=(params, xb, yb))
        grads = jax.grad(_mixed_loss)(expected, xs, ys, jnp.bfloat16)
        expected = optax.apply_updates(expected, tx.update(grads, tx.init(expected))[0])
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    # The backward pass sums bf16 products in another order per replica: bf16's precision.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3), params, expected
    )


def test_f16_dynamic_loss_scaling_skips_a_step_on_every_replica(mixed_strategy):
    """One replica's overflow (an input beyond float16's range) skips the step everywhere, and
    the scale and parameters follow one device on the global batch."""
    strategy = mixed_strategy
    from flax.training.dynamic_scale import DynamicScale

    n = strategy.num_replicas_in_sync
    x, y = _data(4 * n * 3, seed=3)
    x[4 * n + 1, 0] = 1e6  # batch 1, replica 0's second row: inf in float16
    tx = optax.sgd(0.05)

    def update(scale, params, x, y, axis_name):
        scale, finite, _, grads = scale.value_and_grad(_mixed_loss, axis_name=axis_name)(
            params, x, y, jnp.float16
        )
        new = optax.apply_updates(params, tx.update(grads, tx.init(params))[0])
        params = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, params)
        return scale, params, finite

    def step(scale, params, x, y):
        return update(scale, params, x, y, ts.REPLICA_AXIS)

    state = strategy.replicate((DynamicScale(scale=256.0), _init()))
    expected, reference_finite = (DynamicScale(scale=256.0), _init()), []
    for xs, ys in zip(np.split(x, 3), np.split(y, 3)):
        (xb, yb) = next(iter(strategy.experimental_distribute_dataset([(xs, ys)])))
        scale, params, finite = strategy.run(step, args=(*state, xb, yb))
        state = (scale, params)
        *expected, finite_one = update(*expected, jnp.asarray(xs), jnp.asarray(ys), None)
        reference_finite.append(bool(finite_one))
        assert bool(finite) == reference_finite[-1]  # replicated: one flag for every replica
    assert reference_finite == [True, False, True]
    np.testing.assert_array_equal(state[0].scale, expected[0].scale)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3), state[1], expected[1]
    )
