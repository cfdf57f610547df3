"""What the processes of tests/test_cluster.py run; each child imports this module by name.

``exercise`` is the whole multi-process workload. The test runs it once in the test process
(one process, 8 devices: the reference) and once under 2 processes x 4 devices, and compares.
"""

import logging
import os
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import tpustrat as ts

NUM_STEPS = 10
GLOBAL_BATCH = 32
FEATURES = 5
HIDDEN = 16
LEARNING_RATE = 0.1


def make_data():
    """``NUM_STEPS`` global batches; row ``k`` of the data set carries ``id == k``."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_STEPS * GLOBAL_BATCH, FEATURES)).astype(np.float32)
    y = np.sin(x @ rng.normal(size=(FEATURES, 1))).astype(np.float32)
    ids = np.arange(NUM_STEPS * GLOBAL_BATCH, dtype=np.int32)
    return [
        {
            "id": ids[s : s + GLOBAL_BATCH],
            "x": x[s : s + GLOBAL_BATCH],
            "y": y[s : s + GLOBAL_BATCH],
        }
        for s in range(0, len(x), GLOBAL_BATCH)
    ]


def init_params():
    rng = np.random.default_rng(1)
    return {
        "w1": rng.normal(scale=0.5, size=(FEATURES, HIDDEN)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": rng.normal(scale=0.5, size=(HIDDEN, 1)).astype(np.float32),
    }


def sgd_step(params, batch):
    """One data-parallel SGD step: this replica's share of the loss, gradients summed."""

    def loss_fn(p):
        hidden = jnp.tanh(batch["x"] @ p["w1"] + p["b1"])
        return jnp.sum((hidden @ p["w2"] - batch["y"]) ** 2) / GLOBAL_BATCH

    grads = ts.get_replica_context().all_reduce("sum", jax.grad(loss_fn)(params))
    return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)


def _host(tree):
    """Host copies of the leaves (a PerReplica's stacked array)."""
    return jax.tree.map(np.asarray, tree)


def _params(params):
    """The host value of parameters that ``run`` returned (a dict of replicated arrays)."""
    return jax.tree.map(np.asarray, params)


def train_from_values(strategy, data):
    """10 steps fed by ``experimental_distribute_values_from_function``; also which replicas
    this process was asked for."""
    n = strategy.num_replicas_in_sync
    asked = set()
    params = strategy.replicate(init_params())
    for batch in data:

        def rows(ctx, batch=batch):
            asked.add(ctx.replica_id_in_sync_group)
            share = GLOBAL_BATCH // n
            start = ctx.replica_id_in_sync_group * share
            return {k: v[start : start + share] for k, v in batch.items()}

        params = strategy.run(
            sgd_step, args=(params, strategy.experimental_distribute_values_from_function(rows))
        )
    return _params(params), sorted(asked)


def train_from_dataset(strategy, data):
    """10 steps fed by ``experimental_distribute_dataset``; also the row ids each local replica
    received in the first batch."""
    return _train_on(strategy, strategy.experimental_distribute_dataset(data))


def train_from_function(strategy, data):
    """10 steps fed by ``distribute_datasets_from_function``: each pipeline reads only its
    replicas' rows, as per-replica batches. Returns the parameters, the InputContext each
    pipeline got, the row ids it read and the row ids each local replica received in the first
    batch."""
    seen = {}

    def dataset_fn(ctx):
        seen["context"] = (ctx.num_input_pipelines, ctx.input_pipeline_id)
        per_replica = ctx.get_per_replica_batch_size(GLOBAL_BATCH)
        local = ctx.num_replicas_in_sync // ctx.num_input_pipelines
        first = ctx.input_pipeline_id * local
        seen["read"] = []
        for batch in data:
            for replica in range(first, first + local):
                start = replica * per_replica
                rows = {k: v[start : start + per_replica] for k, v in batch.items()}
                seen["read"].extend(rows["id"].tolist())
                yield rows

    params, first_ids = _train_on(strategy, strategy.distribute_datasets_from_function(dataset_fn))
    return params, seen["context"], seen["read"], first_ids


def train_from_process_shards(strategy, data):
    """10 steps fed by ``experimental_distribute_dataset(..., shard_by_process=True)``: the
    dataset's elements are per-process batches (process ``p``'s rows of each global batch, in
    process order) and each process places only its own. Returns the parameters and the row
    ids this process's elements held."""
    processes = len({d.process_index for d in strategy.mesh.devices.flat})
    share = GLOBAL_BATCH // processes
    elements = [
        {k: v[p * share : (p + 1) * share] for k, v in batch.items()}
        for batch in data
        for p in range(processes)
    ]
    dist = strategy.experimental_distribute_dataset(
        elements, ts.InputOptions(shard_by_process=True)
    )
    params = strategy.replicate(init_params())
    placed = []
    for batch in dist:
        placed += [int(i) for ids in strategy.experimental_local_results(batch["id"]) for i in ids]
        params = strategy.run(sgd_step, args=(params, batch))
    return _params(params), placed, len(dist)


def _train_on(strategy, dist):
    """SGD over every batch of ``dist``; the parameters and the row ids each local replica
    received in the first batch."""
    params = strategy.replicate(init_params())
    first_ids = None
    for batch in dist:
        if first_ids is None:
            first_ids = _host(strategy.experimental_local_results(batch["id"]))
        params = strategy.run(sgd_step, args=(params, batch))
    return _params(params), first_ids


def scale(v):
    return 2 * v + 1


def masked_row_sum(x):
    """This replica's sum over its real rows, and how many rows are real."""
    mask = ts.get_replica_context().row_mask
    return (x * mask).sum(), mask.sum()


def bucketed_sums(strategy):
    """Shape bucketing pads 3 and 5 rows per replica to buckets of 4 and 8: the masked sums."""
    options = ts.RunOptions(experimental_bucketizing_dynamic_shape=True)
    sums = []
    for rows in (3, 5):
        values = strategy.experimental_distribute_values_from_function(
            lambda ctx, rows=rows: (
                np.arange(rows, dtype=np.float32) + 10 * ctx.replica_id_in_sync_group
            )
        )
        total, count = strategy.run(masked_row_sum, args=(values,), options=options)
        sums.append([float(strategy.reduce("sum", v)) for v in (total, count)])
    return sums


def exercise(strategy):
    """Everything the multi-process test compares with one process, as host values."""
    data = make_data()
    params, asked = train_from_values(strategy, data)
    dataset_params, dataset_ids = train_from_dataset(strategy, data)
    function_params, context, read, function_ids = train_from_function(strategy, data)
    shard_params, shard_ids, shard_steps = train_from_process_shards(strategy, data)
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: (
            np.arange(6, dtype=np.float32).reshape(2, 3) * (ctx.replica_id_in_sync_group + 1)
        )
    )
    out = strategy.run(scale, args=(values,))
    return {
        "params": params,
        "asked": asked,
        "dataset_params": dataset_params,
        "dataset_ids": dataset_ids,
        "function_params": function_params,
        "function_context": context,
        "function_read": read,
        "function_ids": function_ids,
        "shard_params": shard_params,
        "shard_ids": shard_ids,
        "shard_steps": shard_steps,
        "reduce": {
            op: np.asarray(strategy.reduce(op, out)) for op in ("sum", "mean", "max", "min")
        },
        "reduce_axis": np.asarray(strategy.reduce("sum", out, axis=1)),
        "gather": [np.asarray(strategy.gather(out, axis)) for axis in (0, 1)],
        "local": _host(strategy.experimental_local_results(out)),
        "bucketed": bucketed_sums(strategy),
    }


def in_cluster(num_logical_cores):
    """The child side: the job's ClusterInfo, idempotence checks, and ``exercise``."""
    info = ts.initialize_cluster()
    again = ts.initialize_cluster(info.coordinator_address, info.num_processes, info.process_id)
    try:
        ts.initialize_cluster(info.coordinator_address, 3, info.process_id)
        mismatch = None
    except ts.ClusterError as error:
        mismatch = str(error)
    strategy = ts.TPUStrategy(num_logical_cores=num_logical_cores)
    grid = strategy.mesh.devices.reshape(strategy.num_replicas_in_sync, -1)
    mesh_processes = [[d.process_index for d in row] for row in grid]
    return {
        "info": info,
        "same_info": again is info,
        "mismatch": mismatch,
        "mesh_processes": mesh_processes,
        **exercise(strategy),
    }


def record_pid(folder):
    Path(folder, f"pid-{jax.process_index()}").write_text(str(os.getpid()))


def fail_in_process_1(folder):
    """Process 1 raises after a first step; process 0 waits until the launcher stops it."""
    record_pid(folder)
    strategy = ts.TPUStrategy()
    values = strategy.experimental_distribute_values_from_function(lambda ctx: np.float32(1.0))
    total = lambda v: ts.get_replica_context().all_reduce("sum", v)
    assert float(strategy.reduce("sum", strategy.run(total, args=(values,)))) == 16.0
    if jax.process_index() == 1:
        raise RuntimeError("process 1 failed on purpose")
    time.sleep(600)


def sleep_forever(folder):
    record_pid(folder)
    time.sleep(3600)


def reduce_in_process_0_only(folder):
    """Both processes run a step and reduce a PerReplica; then process 0 alone reduces again
    and waits for process 1, whose program ends and waits in the job's shutdown. Each process
    logs the "tpustrat" logger to ``log-<process id>.txt``."""
    record_pid(folder)
    handler = logging.FileHandler(Path(folder, f"log-{jax.process_index()}.txt"))
    logging.getLogger("tpustrat").addHandler(handler)
    strategy = ts.TPUStrategy()
    values = strategy.experimental_distribute_values_from_function(lambda ctx: np.float32(1.0))
    total = lambda v: ts.get_replica_context().all_reduce("sum", v)
    strategy.run(total, args=(values,))
    assert float(strategy.reduce("sum", values)) == 8.0
    if jax.process_index() == 0:
        strategy.reduce("sum", values)  # process 1 never makes this call


def fail_with_a_long_traceback():
    """Raises an error chained to 15 others: a traceback of about 80 lines."""
    error = None
    for layer in range(15):
        try:
            raise ValueError(f"layer {layer}") from error
        except ValueError as caught:
            error = caught
    raise RuntimeError("the worker failed") from error


def return_a_lock():
    return threading.Lock()
