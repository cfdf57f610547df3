"""A generated test of the public surface: every bad argument gives a result or a clear error.

Every public function, constructor and method is called with one argument at a time replaced by
a value drawn from wrong types, out-of-range numbers, mismatched shapes and dtypes, deleted
arrays, distributed values of the wrong size and pytrees that hold one array twice (seeded).
The only outcomes allowed are a result (which must itself be usable: a dataset is iterated once)
or a ``TypeError``, ``ValueError`` or ``ts.*Error`` whose message names the argument. Anything
else (an ``AttributeError``, a ``KeyError``, JAX's own error, a hang) fails the test, which lists
every such call with its exception.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import pathlib
import random
import traceback
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import deleted_array

import tpustrat as ts

_CLEAR = (TypeError, ValueError, ts.CheckpointError, ts.ClusterError)
_NUM_DRAWN = 8  # random values per argument, beyond the fixed ones


@dataclasses.dataclass(frozen=True)
class Entry:
    """One public callable: how to call it with valid arguments, and the words naming each one.

    ``names`` maps an argument to the words any of which its error may use instead of the
    argument's own name (e.g. ``fn`` is "the step" to ``run``).
    """

    name: str
    call: Callable[..., Any]
    valid: dict[str, Callable[[], Any]]
    names: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    allowed: tuple[type[BaseException], ...] = ()


def _shared_leaves() -> dict[str, jax.Array]:
    """A pytree holding one array twice (a new array each call: a donating call deletes it)."""
    shared = jnp.ones(3)
    return {"a": shared, "b": shared}


def _fixed_bad_values(strategy: ts.TPUStrategy) -> list[tuple[str, Callable[[], Any]]]:
    other = ts.TPUStrategy(jax.devices()[:4])
    return [
        ("None", lambda: None),
        ("str", lambda: "x"),
        ("empty str", lambda: ""),
        ("float", lambda: 1.5),
        ("nan", lambda: float("nan")),
        ("negative", lambda: -1),
        ("zero", lambda: 0),
        ("huge", lambda: 2**40),
        ("bool", lambda: True),
        ("list", lambda: [1, 2]),
        ("dict", lambda: {"a": 1}),
        ("tuple", lambda: ()),
        ("object", object),
        ("lambda", lambda: lambda *a, **k: 0),
        ("str array", lambda: np.array(["a", "b"])),
        ("complex array", lambda: np.zeros((2, 3), np.complex64)),
        ("float64 array", lambda: np.zeros(5)),
        ("int64 array beyond int32", lambda: np.array([2**40], np.int64)),
        ("object array", lambda: np.array([object()], dtype=object)),
        ("jax array", lambda: jnp.zeros((3, 2))),
        ("scalar array", lambda: jnp.float32(2)),
        ("deleted array", deleted_array),
        ("typed key", lambda: jax.random.key(0)),
        ("shared leaves", _shared_leaves),
        ("short PerReplica", lambda: ts.PerReplica([np.zeros(2, np.float32)] * 4)),
        (
            "PerReplica of another strategy",
            lambda: other.experimental_distribute_values_from_function(
                lambda ctx: np.float32(ctx.replica_id_in_sync_group)
            ),
        ),
        ("Mirrored", lambda: ts.Mirrored(np.zeros(2, np.float32))),
        ("strategy", lambda: strategy),
        ("path", lambda: pathlib.Path("/nonexistent/dir")),
        ("iterator", lambda: iter([1, 2])),
    ]


def _drawn_bad_values(rng: random.Random) -> list[tuple[str, Callable[[], Any]]]:
    """Random numbers, strings, shapes and nested containers."""
    drawn: list[tuple[str, Callable[[], Any]]] = []
    for _ in range(_NUM_DRAWN):
        kind = rng.choice(["int", "float", "str", "array", "nested", "tuple of ints"])
        if kind == "int":
            value = rng.choice([-(2**63), -7, 3, 7, 13, 10**6, 2**31])
            drawn.append((f"int {value}", lambda v=value: v))
        elif kind == "float":
            value = rng.choice([-0.5, 0.25, 3.0, 1e30, float("inf")])
            drawn.append((f"float {value}", lambda v=value: v))
        elif kind == "str":
            value = rng.choice(["sum", "avg", "replica", "0", "-1", "cpu", "\x00"])
            drawn.append((f"str {value!r}", lambda v=value: v))
        elif kind == "array":
            shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3)))
            dtype = rng.choice([np.float32, np.int32, np.bool_, np.float16, np.uint8])
            drawn.append(
                (f"array {dtype.__name__}{list(shape)}", lambda s=shape, d=dtype: np.ones(s, d))
            )
        elif kind == "nested":
            depth = rng.randint(1, 3)

            def nested(depth=depth):
                tree: Any = np.float32(1)
                for level in range(depth):
                    tree = {"k": tree, "l": [tree, None]} if level % 2 else (tree, tree)
                return tree

            drawn.append((f"nested depth {depth}", nested))
        else:
            ints = tuple(rng.randint(-2, 9) for _ in range(rng.randint(0, 4)))
            drawn.append((f"tuple {ints}", lambda v=ints: v))
    return drawn


def _consume(result: Any) -> None:
    """Uses a lazy result once, so that an error it defers is seen here."""
    if isinstance(result, ts.DistributedDataset):
        iterator = iter(result)
        try:
            next(iterator, None)
        finally:
            iterator.close()
    jax.block_until_ready([leaf for leaf in jax.tree.leaves(result) if isinstance(leaf, jax.Array)])


def _entries(strategy: ts.TPUStrategy, tmp_path: pathlib.Path) -> list[Entry]:
    n = strategy.num_replicas_in_sync
    per_replica = lambda: strategy.experimental_distribute_values_from_function(
        lambda ctx: np.full(2, ctx.replica_id_in_sync_group, np.float32)
    )
    batches = lambda: [np.ones((2 * n, 3), np.float32)] * 2
    step = lambda *xs, **kw: (xs, kw)
    manager_dirs = iter(range(10**6))

    def manager(**kwargs):
        kwargs.setdefault("directory", tmp_path / f"ckpt{next(manager_dirs)}")
        kwargs.setdefault("strategy", strategy)
        created = ts.CheckpointManager(**kwargs)
        created.close()
        return created

    def save(step, state, force):
        directory = tmp_path / f"save{next(manager_dirs)}"
        with ts.CheckpointManager(directory, strategy, asynchronous=False) as created:
            created.save(step, state, force=force)

    def in_step(method: str):
        """Calls a replica-context or logical-core method inside ``run`` with the arguments."""

        def call(**kwargs):
            def body(x):
                ctx = ts.get_replica_context()
                target = ctx if hasattr(ctx, method) else strategy
                return getattr(target, method)(**kwargs)

            return strategy.run(body, args=(per_replica(),))

        return call

    saved = tmp_path / "saved"  # one saved step, restored by every restore call
    with ts.CheckpointManager(saved, strategy, asynchronous=False) as created:
        created.save(1, {"w": strategy.replicate(np.arange(3, dtype=np.float32))})

    def restore(target, step):
        with ts.CheckpointManager(saved, strategy, asynchronous=False) as created:
            return created.restore(target, step=step)

    def preemption(state, iterator, exit_code):
        directory = tmp_path / f"preempt{next(manager_dirs)}"
        with ts.CheckpointManager(directory, strategy, asynchronous=False) as created:
            handler = ts.PreemptionCheckpointHandler(
                created, state, iterator=iterator, exit_code=exit_code
            )
            handler.close()
            return handler.state

    def iterator_set_state(state):
        iterator = iter(strategy.experimental_distribute_dataset(batches()))
        try:
            iterator.set_state(state)
            return next(iterator)
        finally:
            iterator.close()

    def summary_scalars(step, values):
        with ts.SummaryWriter(tmp_path / "summaries") as writer:
            return writer.scalars(step, values)

    def summary_histogram(step, name, values):
        with ts.SummaryWriter(tmp_path / "summaries") as writer:
            return writer.histogram(step, name, values)

    def summary_writer(logdir, every_n_steps):
        with ts.SummaryWriter(logdir, every_n_steps=every_n_steps) as writer:
            return writer.every_n_steps

    idle_manager = ts.CheckpointManager(tmp_path / "idle", strategy)
    idle_manager.close()

    return [
        Entry(
            "ts.PreemptionCheckpointHandler",
            preemption,
            {
                "state": lambda: {"w": np.float32(0)},
                "iterator": lambda: None,
                "exit_code": lambda: 42,
            },
        ),
        Entry(
            "DistributedIterator.set_state",
            iterator_set_state,
            {"state": lambda: {"batches": 1, "reads": 1}},
        ),
        Entry("CheckpointManager.should_save", idle_manager.should_save, {"step": lambda: 1}),
        Entry(
            "SummaryWriter.scalars",
            summary_scalars,
            {"step": lambda: 1, "values": lambda: {"loss": np.float32(0.5)}},
        ),
        Entry(
            "SummaryWriter.histogram",
            summary_histogram,
            {"step": lambda: 1, "name": lambda: "w", "values": lambda: np.ones(4, np.float32)},
        ),
        Entry(
            "ts.SummaryWriter",
            summary_writer,
            {"logdir": lambda: tmp_path / "summaries", "every_n_steps": lambda: 2},
        ),
        Entry(
            "ts.StepProfiler",
            lambda logdir, first, last, name: ts.StepProfiler(logdir, first, last, name),
            {
                "logdir": lambda: tmp_path / "profile",
                "first": lambda: 1,
                "last": lambda: 2,
                "name": lambda: "train",
            },
        ),
        Entry(
            "CheckpointManager.reached_preemption",
            idle_manager.reached_preemption,
            {"step": lambda: 1},
        ),
        Entry("ts.Topology.from_devices", ts.Topology.from_devices, {"devices": jax.devices}),
        Entry(
            "ts.Topology",
            ts.Topology,
            {"devices": jax.devices, "coordinates": lambda: [[i, 0, 0, 0] for i in range(8)]},
        ),
        Entry(
            "ts.DeviceAssignment",
            ts.DeviceAssignment,
            {
                "topology": lambda: ts.Topology.from_devices(jax.devices()),
                "core_assignment": lambda: [[[i, 0, 0, 0]] for i in range(n)],
                "computation_shape": lambda: None,
            },
        ),
        Entry(
            "ts.DeviceAssignment.build",
            ts.DeviceAssignment.build,
            {
                "topology": lambda: ts.Topology.from_devices(jax.devices()),
                "computation_shape": lambda: None,
                "computation_stride": lambda: None,
                "num_replicas": lambda: n,
            },
        ),
        Entry(
            "ts.compute_average_loss",
            ts.compute_average_loss,
            {
                "per_example_loss": lambda: np.ones(2 * n, np.float32),
                "sample_weight": lambda: None,
                "global_batch_size": lambda: None,
                "mask": lambda: None,
            },
        ),
        Entry(
            "ts.PerReplica.from_blocks",
            ts.PerReplica.from_blocks,
            {
                "array": lambda: np.ones((2 * n, 3), np.float32),
                "num_replicas": lambda: n,
                "axis": lambda: 0,
            },
        ),
        Entry(
            "ReplicaContext.all_reduce",
            in_step("all_reduce"),
            {"reduce_op": lambda: "sum", "value": lambda: np.ones(4, np.float32)},
        ),
        Entry(
            "ReplicaContext.all_gather",
            in_step("all_gather"),
            {"value": lambda: np.ones(4, np.float32), "axis": lambda: 0},
        ),
        Entry(
            "ReplicaContext.reduce_scatter",
            in_step("reduce_scatter"),
            {
                "reduce_op": lambda: "sum",
                "value": lambda: np.ones(8, np.float32),
                "axis": lambda: 0,
            },
        ),
        Entry(
            "ReplicaContext.replica_key", in_step("replica_key"), {"key": lambda: jax.random.key(0)}
        ),
        Entry(
            "strategy.experimental_split_to_logical_devices",
            in_step("experimental_split_to_logical_devices"),
            {"tensor": lambda: np.ones((2, 4), np.float32), "partition_dimensions": lambda: [1, 1]},
        ),
        Entry(
            "strategy.experimental_replicate_to_logical_devices",
            in_step("experimental_replicate_to_logical_devices"),
            {"tensor": lambda: np.ones((2, 4), np.float32)},
        ),
        Entry(
            "strategy.experimental_assign_to_logical_device",
            in_step("experimental_assign_to_logical_device"),
            {"tensor": lambda: np.ones((2, 4), np.float32), "logical_device_id": lambda: 0},
        ),
        Entry(
            "strategy.run (donating args[0])",
            lambda state, batch: strategy.run(
                lambda s, b: (jax.tree.map(lambda x: x, s), b),
                args=(state, batch),
                options=ts.RunOptions(donate_argnums=(0,)),
            ),
            {
                "state": lambda: strategy.replicate({"w": np.ones(3, np.float32)}),
                "batch": per_replica,
            },
            names={"state": ("args[0]",), "batch": ("args[1]",)},
        ),
        Entry(
            "ts.ReplicaShard",
            ts.ReplicaShard,
            {
                "blocks": lambda: ts.PerReplica([np.zeros(1, np.float32)] * n),
                "shape": lambda: (n,),
                "axis": lambda: 0,
            },
        ),
        Entry(
            "TPUStrategy",
            ts.TPUStrategy,
            {
                "devices": lambda: None,
                "num_logical_cores": lambda: 1,
                "max_steps_in_flight": lambda: 2,
                "num_slices": lambda: None,
                "device_assignment": lambda: None,
            },
        ),
        Entry(
            "strategy.run",
            strategy.run,
            {
                "fn": lambda: step,
                "args": lambda: (per_replica(),),
                "kwargs": lambda: None,
                "options": lambda: None,
            },
            names={"fn": ("step", "callable")},
        ),
        Entry(
            "strategy.reduce",
            strategy.reduce,
            {"reduce_op": lambda: "sum", "value": per_replica, "axis": lambda: None},
        ),
        Entry("strategy.gather", strategy.gather, {"value": per_replica, "axis": lambda: 0}),
        Entry(
            "strategy.experimental_local_results",
            strategy.experimental_local_results,
            {"value": per_replica},
        ),
        Entry("strategy.replicate", strategy.replicate, {"tree": lambda: np.ones(3)}),
        Entry(
            "strategy.experimental_distribute_values_from_function",
            strategy.experimental_distribute_values_from_function,
            {"value_fn": lambda: lambda ctx: np.float32(ctx.replica_id_in_sync_group)},
        ),
        Entry(
            "strategy.experimental_distribute_dataset",
            strategy.experimental_distribute_dataset,
            {"dataset": batches, "options": lambda: None},
        ),
        Entry(
            "strategy.distribute_datasets_from_function",
            strategy.distribute_datasets_from_function,
            {
                "dataset_fn": lambda: lambda ctx: [np.ones((2, 3), np.float32)] * n,
                "options": lambda: None,
            },
        ),
        Entry(
            "strategy.run_steps",
            lambda fn, state, iterator, steps_per_run: strategy.run_steps(
                fn, state, iterator, steps_per_run
            ),
            {
                "fn": lambda: lambda s, b: (s, b),
                "state": lambda: np.float32(0),
                "iterator": lambda: iter(strategy.experimental_distribute_dataset(batches())),
                "steps_per_run": lambda: 2,
            },
            names={"fn": ("step", "callable")},
            allowed=(StopIteration,),
        ),
        Entry(
            "ts.RunOptions",
            ts.RunOptions,
            {"donate_argnums": lambda: (), "experimental_bucketizing_dynamic_shape": lambda: False},
        ),
        Entry(
            "ts.InputOptions",
            ts.InputOptions,
            {
                "experimental_fetch_to_device": lambda: True,
                "experimental_per_replica_buffer_size": lambda: 2,
                "mask": lambda: False,
                "drop_remainder": lambda: False,
                "global_batch_size": lambda: None,
                "shard_by_process": lambda: False,
            },
        ),
        Entry(
            "ts.InputContext",
            ts.InputContext,
            {
                "num_input_pipelines": lambda: 1,
                "input_pipeline_id": lambda: 0,
                "num_replicas_in_sync": lambda: 8,
            },
        ),
        Entry(
            "InputContext.get_per_replica_batch_size",
            lambda global_batch_size: ts.InputContext(1, 0, 8).get_per_replica_batch_size(
                global_batch_size
            ),
            {"global_batch_size": lambda: 16},
        ),
        Entry(
            "ts.ValueContext",
            ts.ValueContext,
            {"replica_id_in_sync_group": lambda: 0, "num_replicas_in_sync": lambda: 8},
        ),
        Entry("ts.PerReplica", ts.PerReplica, {"values": lambda: [np.float32(1)] * n}),
        Entry("ts.Mirrored", ts.Mirrored, {"value": lambda: np.float32(1)}),
        Entry("ts.shard_update", ts.shard_update, {"tx": lambda: optax.sgd(0.1)}),
        Entry(
            "ts.shard_params",
            ts.shard_params,
            {"tree": lambda: {"w": np.ones((2, 8), np.float32)}, "strategy": lambda: strategy},
        ),
        Entry(
            "ts.gather_params",
            ts.gather_params,
            {"tree": lambda: ts.shard_params({"w": np.ones((2, 8), np.float32)}, strategy)},
        ),
        Entry("ts.gather_on_use", ts.gather_on_use, {"target": lambda: nn.Dense}),
        Entry(
            "ts.reshard_update_state",
            ts.reshard_update_state,
            {"state": lambda: {"w": np.ones(3, np.float32)}, "strategy": lambda: strategy},
        ),
        Entry(
            "ts.CheckpointManager",
            manager,
            {
                "max_to_keep": lambda: 3,
                "save_interval_steps": lambda: 1,
                "asynchronous": lambda: True,
            },
        ),
        Entry(
            "CheckpointManager.save",
            save,
            {
                "step": lambda: 1,
                "state": lambda: {"w": strategy.replicate(np.ones(3, np.float32))},
                "force": lambda: False,
            },
        ),
        Entry(
            "CheckpointManager.restore",
            restore,
            {
                "target": lambda: {"w": strategy.replicate(np.ones(3, np.float32))},
                "step": lambda: None,
            },
        ),
    ]


def _names_argument(message: str, argument: str, entry: Entry) -> bool:
    words = (argument, *entry.names.get(argument, ()))
    return any(word in message for word in words)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_bad_argument_gives_a_result_or_a_clear_error(seed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a str drawn as a folder (a logdir "x") is made in here
    strategy = ts.TPUStrategy()
    rng = random.Random(seed)
    bad_values = _fixed_bad_values(strategy) + _drawn_bad_values(rng)
    entries = _entries(strategy, tmp_path)
    calls, refused, results, unclear = 0, 0, 0, []
    # A call that hangs is a failure too: dump every thread's stack and end the run.
    faulthandler.dump_traceback_later(300, exit=True)
    for entry in entries:
        for argument in entry.valid:
            for label, make in bad_values:
                kwargs = {name: valid() for name, valid in entry.valid.items()}
                kwargs[argument] = make()
                calls += 1
                try:
                    _consume(entry.call(**kwargs))
                except _CLEAR as error:
                    if _names_argument(str(error), argument, entry):
                        refused += 1
                        continue
                    unclear.append(
                        f"{entry.name}({argument}={label}): {type(error).__name__}: "
                        f"{str(error)[:300]} [does not name {argument!r}]"
                    )
                except entry.allowed:
                    refused += 1
                except Exception as error:
                    where = traceback.extract_tb(error.__traceback__)[-1]
                    unclear.append(
                        f"{entry.name}({argument}={label}): {type(error).__name__}: "
                        f"{str(error)[:300]} [at {pathlib.Path(where.filename).name}:"
                        f"{where.lineno}]"
                    )
                else:
                    results += 1
    faulthandler.cancel_dump_traceback_later()
    print(f"{calls} calls: {results} results, {refused} clear errors, {len(unclear)} unclear")
    assert calls > 500
    assert not unclear, f"{len(unclear)} of {calls} calls were not clear:\n" + "\n".join(unclear)
