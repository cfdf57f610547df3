"""What the processes of tests/test_metrics.py's multi-process test run; imported by name.

``accumulate_and_read`` updates NNX metrics in ``run`` over masked batches, reads them on the
host (every process reads), resets and accumulates again, and returns host values, which the
test compares between 1 process of 8 devices, 2 processes of 4, and one device's numbers.
"""

import numpy as np
from flax import nnx

import tpustrat as ts

CORE_COUNTS = (1, 2)
ROWS, GLOBAL_BATCH, CLASSES = 40, 16, 5


def data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(ROWS, CLASSES)).astype(np.float32)
    labels = rng.integers(0, CLASSES, ROWS).astype(np.int32)
    losses = rng.normal(size=ROWS).astype(np.float32)
    return logits, labels, losses


def _step(metrics, batch, mask):
    logits, labels, losses = batch
    metrics.update(logits=logits, labels=labels, loss=losses, mask=mask)


def _accumulate(strategy):
    rows = [tuple(a[i : i + GLOBAL_BATCH] for a in data()) for i in range(0, ROWS, GLOBAL_BATCH)]
    options = ts.InputOptions(mask=True, global_batch_size=GLOBAL_BATCH)
    metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"), accuracy=nnx.metrics.Accuracy())
    reads = []
    for _ in range(2):  # an epoch, a read, a reset, another epoch
        metrics.reset()
        for batch, mask in strategy.experimental_distribute_dataset(rows, options):
            strategy.run(_step, args=(metrics, batch, mask))
        values = metrics.compute()
        reads.append({name: float(value) for name, value in values.items()})
    reads.append({"count": int(metrics.accuracy.count[...])})
    return reads


def accumulate_and_read():
    """The workload for each core count; in a child process, after joining the job."""
    return {cores: _accumulate(ts.TPUStrategy(num_logical_cores=cores)) for cores in CORE_COUNTS}
