"""The README's quickstart: linear regression on 8 replicas, equal to one device on the batch."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np

import tpustrat as ts

strategy = ts.TPUStrategy()  # every device; 8 simulated CPU devices here
x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
y = x @ np.array([1.0, -2.0, 0.5], np.float32)


def step(w, batch):  # runs on every replica, on its 64 / 8 rows
    xb, yb = batch
    grad = jax.grad(lambda w: ((xb @ w - yb) ** 2).sum() / len(x))(w)  # this replica's share
    return w - 0.1 * ts.get_replica_context().all_reduce("sum", grad)  # the global gradient


batch = next(iter(strategy.experimental_distribute_dataset([(x, y)])))  # rows split by replica
w = strategy.replicate(np.zeros(3, np.float32))
for _ in range(200):
    w = strategy.run(step, args=(w, batch))
print(np.round(np.asarray(w), 3))  # [ 1.  -2.   0.5]
