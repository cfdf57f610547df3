"""ts.compute_average_loss: each replica's share of the global mean (tf.nn.compute_average_loss)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tpustrat as ts


def _losses(strategy, rows=3, seed=0):
    values = np.random.default_rng(seed).normal(size=(strategy.num_replicas_in_sync * rows, 2))
    values = values.astype(np.float32)
    per_replica = ts.PerReplica(np.split(values, strategy.num_replicas_in_sync))
    return values, per_replica


def test_shares_sum_to_the_global_mean(strategy):
    values, losses = _losses(strategy)
    share = strategy.run(ts.compute_average_loss, args=(losses,))
    # Per-example losses of shape (rows, 2): summed over the second axis, divided by the rows.
    expected = values.sum() / values.shape[0]
    np.testing.assert_allclose(strategy.reduce("sum", share), expected, rtol=1e-6, atol=1e-7)


def test_sample_weight_and_global_batch_size(strategy):
    values, losses = _losses(strategy, seed=1)
    weights = np.linspace(0.0, 2.0, values.shape[0], dtype=np.float32)[:, None]
    per_replica_weights = ts.PerReplica(np.split(weights, strategy.num_replicas_in_sync))
    share = strategy.run(
        lambda loss, weight: ts.compute_average_loss(loss, weight, global_batch_size=40),
        args=(losses, per_replica_weights),
    )
    np.testing.assert_allclose(
        strategy.reduce("sum", share), (values * weights).sum() / 40, rtol=1e-6
    )


def test_outside_run_it_is_the_mean_of_the_batch():
    losses = np.arange(6, dtype=np.float32)
    np.testing.assert_allclose(ts.compute_average_loss(losses), losses.mean())
    mask = np.array([True, True, False, True, False, False])
    np.testing.assert_allclose(ts.compute_average_loss(losses, mask=mask), (0 + 1 + 3) / 3)


def test_masked_partial_batch_gives_the_gradient_of_the_real_rows(strategy):
    """A 13-row last batch padded to 16: the gradient is one device's on the 13 rows alone."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(29, 3)).astype(np.float32)
    y = rng.normal(size=(29,)).astype(np.float32)
    w = np.float32([0.5, -1.0, 2.0])
    dataset = [(x[:16], y[:16]), (x[16:], y[16:])]
    options = ts.InputOptions(mask=True)

    def step(w, batch, mask):
        features, targets = batch

        def loss_fn(w):
            per_example = (features @ w - targets) ** 2
            return ts.compute_average_loss(per_example, mask=mask)

        grads = jax.grad(loss_fn)(w)
        return ts.get_replica_context().all_reduce("sum", grads)

    replicated = strategy.replicate(w)
    for (features, targets), (batch, mask) in zip(
        dataset, strategy.experimental_distribute_dataset(dataset, options)
    ):
        grads = strategy.run(step, args=(replicated, batch, mask))
        expected = jax.grad(_mean_squared_error)(w, features, targets)
        np.testing.assert_allclose(grads, expected, rtol=1e-5, atol=1e-6)


def _mean_squared_error(w, features, targets):
    return jnp.mean((features @ w - targets) ** 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"per_example_loss": np.arange(3)}, TypeError, "floating-point"),
        ({"per_example_loss": np.float32(1)}, ValueError, "scalar"),
        (
            {"per_example_loss": np.ones(3, np.float32), "sample_weight": np.ones(2)},
            ValueError,
            "sample_weight",
        ),
        (
            {"per_example_loss": np.ones(3, np.float32), "global_batch_size": 0},
            ValueError,
            "global_batch_size",
        ),
        (
            {"per_example_loss": np.ones(3, np.float32), "global_batch_size": "8"},
            TypeError,
            "global_batch_size",
        ),
        (
            {"per_example_loss": np.ones(3, np.float32), "mask": np.ones(2, bool)},
            ValueError,
            "mask",
        ),
        (
            {
                "per_example_loss": np.ones(3, np.float32),
                "mask": np.ones(3, bool),
                "global_batch_size": 8,
            },
            ValueError,
            "mask and global_batch_size",
        ),
    ],
)
def test_bad_arguments_say_what_to_pass(kwargs, error, words):
    with pytest.raises(error, match=words):
        ts.compute_average_loss(**kwargs)


def test_wrong_arguments_are_named():
    losses = np.ones(4, np.float32)
    deleted = jnp.ones(4)
    deleted.delete()
    with pytest.raises(TypeError, match=r"per_example_loss must be an array, got list \[1\.0"):
        ts.compute_average_loss([1.0, 2.0])
    with pytest.raises(TypeError, match=r"sample_weight has dtype key<fry>; pass an array of"):
        ts.compute_average_loss(losses, sample_weight=jax.random.key(0))
    with pytest.raises(TypeError, match=r"sample_weight must be an array, got str 'x'"):
        ts.compute_average_loss(losses, sample_weight="x")
    with pytest.raises(ValueError, match=r"mask is a deleted jax\.Array float32\[4\]"):
        ts.compute_average_loss(losses, mask=deleted)
    with pytest.raises(TypeError, match=r"mask is an array of dtype <U1"):
        ts.compute_average_loss(losses, mask=np.array(["a"] * 4))


def test_a_global_batch_beyond_int32_and_bfloat16_losses():
    mean = ts.compute_average_loss(np.ones(4, np.float32), global_batch_size=2**40)
    np.testing.assert_allclose(float(mean), 4 / 2**40, rtol=1e-6)
    assert float(ts.compute_average_loss(jnp.full(4, 2, jnp.bfloat16))) == 2.0
