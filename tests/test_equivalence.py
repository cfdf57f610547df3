"""Data-parallel training equals single-device training on the global batch.

A Flax NNX MLP trained with optax for 10 steps on N replicas must reach the parameters one
device reaches on the whole global batch, with either the tf.distribute recipe (sum of the
per-example losses over the global batch size, then an all-reduce SUM of the gradients) or the
pmap recipe (local mean, then an all-reduce MEAN). SGD with momentum is used on purpose: unlike
Adam it is not scale invariant, so a runtime that summed gradients twice would fail here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SEVERAL_REPLICAS, mesh_id
from flax import nnx

import tpustrat as ts

GLOBAL_BATCH = 32
STEPS = 10


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(6, 16, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def _setup():
    graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
    params = jax.tree.map(np.asarray, params)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS, GLOBAL_BATCH, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=(STEPS, GLOBAL_BATCH)).astype(np.int32)
    return graphdef, params, x, y


def _per_example_loss(graphdef, params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


OPTIMIZER = optax.sgd(0.1, momentum=0.9)


def _single_device(graphdef, params, x, y):
    @jax.jit
    def step(params, opt_state, xb, yb):
        grads = jax.grad(lambda p: _per_example_loss(graphdef, p, xb, yb).mean())(params)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = OPTIMIZER.init(params)
    for t in range(STEPS):
        params, opt_state = step(params, opt_state, x[t], y[t])
    return params


def _tf_recipe_grads(graphdef, params, xb, yb):
    loss = lambda p: _per_example_loss(graphdef, p, xb, yb).sum() / GLOBAL_BATCH
    return ts.get_replica_context().all_reduce(ts.ReduceOp.SUM, jax.grad(loss)(params))


def _pmap_recipe_grads(graphdef, params, xb, yb):
    loss = lambda p: _per_example_loss(graphdef, p, xb, yb).mean()
    return ts.get_replica_context().all_reduce(ts.ReduceOp.MEAN, jax.grad(loss)(params))


@pytest.mark.parametrize("recipe", [_tf_recipe_grads, _pmap_recipe_grads], ids=["tf", "pmap"])
@pytest.mark.parametrize("shape", SEVERAL_REPLICAS, ids=mesh_id)
def test_data_parallel_equals_single_device(shape, recipe):
    graphdef, params, x, y = _setup()
    want = _single_device(graphdef, params, x, y)

    strategy = ts.TPUStrategy(num_logical_cores=shape[1])
    n = strategy.num_replicas_in_sync
    per_replica = GLOBAL_BATCH // n

    def train_step(state, batch):
        (params, opt_state), (xb, yb) = state, batch
        grads = recipe(graphdef, params, xb, yb)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    state = strategy.replicate((params, OPTIMIZER.init(params)))
    for t in range(STEPS):
        batch = strategy.experimental_distribute_values_from_function(
            lambda ctx, t=t: (
                x[t, ctx.replica_id_in_sync_group * per_replica :][:per_replica],
                y[t, ctx.replica_id_in_sync_group * per_replica :][:per_replica],
            )
        )
        state = strategy.run(train_step, args=(state, batch))

    got_params = state[0]
    for v in jax.tree.leaves(got_params, is_leaf=_is_per_replica):
        assert isinstance(v, jax.Array), "updated parameters must come back as plain arrays"
        assert v.sharding.is_fully_replicated, "updated parameters must come back replicated"
    got = jax.tree.map(np.asarray, got_params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, np.asarray(w), rtol=2e-5, atol=1e-6)
    # The parameters really moved: a bug that skipped updates would also "match" at step 0.
    assert (
        max(
            float(jnp.abs(a - b).max())
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params))
        )
        > 1e-2
    )


def _is_per_replica(v):
    return isinstance(v, ts.PerReplica)
