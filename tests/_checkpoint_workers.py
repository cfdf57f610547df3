"""What the processes of tests/test_checkpoint.py and tests/test_preemption.py run.

``python tests/_checkpoint_workers.py DIRECTORY OUT STEPS [--big] [--kill-during-save-at K]``
trains a tiny model with a ``ts.PreemptionCheckpointHandler``: it prints ``step N`` after each
step, logs the batch trained on at step N to ``OUT.log``, and on finishing writes the
parameters to ``OUT.npz``. The other module-level functions run under
``tpustrat.testing.run_in_local_processes``.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpustrat as ts

NUM_BATCHES = 24
GLOBAL_BATCH = 8
FEATURES = 3
LEARNING_RATE = 0.1
KEY_DTYPE = jax.eval_shape(lambda: jax.random.key(0)).dtype
STEP_SECONDS = 0.05  # so that a signal sent after "step N" arrives a few steps later at most


def make_data():
    """``NUM_BATCHES`` global batches; batch ``b`` carries ``id == b`` in every row."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_BATCHES, GLOBAL_BATCH, FEATURES)).astype(np.float32)
    y = (x @ np.arange(1.0, FEATURES + 1, dtype=np.float32))[..., None]
    return [
        {"id": np.full(GLOBAL_BATCH, b, np.int32), "x": x[b], "y": y[b]} for b in range(NUM_BATCHES)
    ]


def replicated(strategy, value):
    """``value`` (an array or a typed key) on every device of ``strategy``, in any process."""
    if jax.dtypes.issubdtype(getattr(value, "dtype", None), jax.dtypes.prng_key):
        return jax.random.wrap_key_data(replicated(strategy, jax.random.key_data(value)))
    value = np.asarray(value)
    sharding = NamedSharding(strategy.mesh, P())
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def initial_state(strategy, big_floats=0):
    """Parameters, a typed random key and, for a slow save, ``big_floats`` more floats."""
    state = {
        "params": {
            "w": replicated(strategy, np.zeros((FEATURES, 1), np.float32)),
            "b": replicated(strategy, np.zeros(1, np.float32)),
        },
        "key": replicated(strategy, jax.random.key(0)),
    }
    if big_floats:
        state["big"] = replicated(strategy, np.ones(big_floats, np.float32))
    return state


def sgd_step(params, batch, noise):
    def loss_fn(p):
        error = batch["x"] @ p["w"] + p["b"] - batch["y"]
        return jnp.sum(error**2) / GLOBAL_BATCH

    grads = ts.get_replica_context().all_reduce("sum", jax.grad(loss_fn)(params))
    return {
        "w": params["w"] - LEARNING_RATE * (grads["w"] + noise),
        "b": params["b"] - 0.1 * grads["b"],
    }


def train_step(strategy, state, batch):
    """One step; the random stream (noise added to the gradient) continues from the state."""
    key, noise_key = jax.random.split(state["key"])
    noise = 0.01 * jax.random.normal(noise_key, (FEATURES, 1))
    params = strategy.run(sgd_step, args=(state["params"], batch, noise))
    return {**state, "params": params, "key": key}


def batch_index(strategy, batch):
    ids = np.concatenate([np.asarray(x) for x in strategy.experimental_local_results(batch["id"])])
    assert (ids == ids[0]).all()
    return int(ids[0])


def train(directory, out, num_steps, kill_during_save_at=None, big=False):
    strategy = ts.TPUStrategy()
    dist = strategy.experimental_distribute_dataset(make_data())
    iterator = iter(dist)
    big = 4_000_000 if big else 0  # 16 MB, so that a save takes a while
    manager = ts.CheckpointManager(directory, strategy, save_interval_steps=4)
    handler = ts.PreemptionCheckpointHandler(
        manager, initial_state(strategy, big), iterator=iterator
    )
    print(f"start {handler.completed_steps}", flush=True)
    state = handler.state
    with open(f"{out}.log", "a") as log:
        for step in range(handler.completed_steps + 1, num_steps + 1):
            batch = next(iterator)
            state = train_step(strategy, state, batch)
            log.write(f"{step} {batch_index(strategy, batch)}\n")
            log.flush()
            print(f"step {step}", flush=True)
            time.sleep(STEP_SECONDS)
            handler.step_done(state)
            if step == kill_during_save_at:
                os.kill(os.getpid(), signal.SIGKILL)  # the async save of this step is running
    handler.close()
    manager.close()
    np.savez(f"{out}.npz", **{k: np.asarray(v) for k, v in state["params"].items()})


def command(directory, out, num_steps, *flags):
    """The command line that runs ``train`` in a new process."""
    return [sys.executable, __file__, str(directory), str(out), str(num_steps), *flags]


def environment():
    """The environment for it: the tpustrat this process imported (a checkout or the wheel)."""
    package_root = Path(ts.__file__).resolve().parent.parent
    return dict(os.environ, PYTHONPATH=str(package_root), JAX_PLATFORMS="cpu")


def run(directory, out, num_steps, *flags, timeout=120):
    """Runs ``train`` in a new process to its end (or its own SIGKILL); returns the process."""
    return subprocess.run(
        command(directory, out, num_steps, *flags),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def record_pid(folder):
    Path(folder, f"pid-{jax.process_index()}").write_text(str(os.getpid()))


def preempt_in_cluster(directory, folder):
    """Trains until the handler reports the agreed preemption step; returns what it saved."""
    record_pid(folder)
    strategy = ts.TPUStrategy()
    dist = strategy.experimental_distribute_dataset(make_data() * 20)
    iterator = iter(dist)
    manager = ts.CheckpointManager(directory, strategy, save_interval_steps=1000)
    handler = ts.PreemptionCheckpointHandler(
        manager, initial_state(strategy), iterator=iterator, exit_code=None
    )
    state, preempted = handler.state, False
    progress = Path(folder, f"progress-{jax.process_index()}")
    while not preempted and handler.completed_steps < 20 * NUM_BATCHES:
        state = train_step(strategy, state, next(iterator))
        progress.write_text(str(handler.completed_steps + 1))
        time.sleep(STEP_SECONDS)
        preempted = handler.step_done(state)
    handler.close()
    saved = manager.restore(state)
    manager.close()
    return {
        "saved_step": handler.saved_step,
        "latest_step": manager.latest_step(),
        "w": np.asarray(saved["params"]["w"]),
        "w_now": np.asarray(state["params"]["w"]),
        "position": iterator.get_state(),
    }


def mesh_state(strategy):
    """A state with replicated, typed-key and PerReplica leaves; its values are fixed."""
    return {
        "params": {
            "w": replicated(strategy, np.arange(12, dtype=np.float32).reshape(3, 4)),
            "b": replicated(strategy, np.float32(0.5)),
        },
        "key": replicated(strategy, jax.random.key(7)),
        "step": np.int32(11),
        "per_replica": strategy.experimental_distribute_values_from_function(
            lambda ctx: np.full(2, ctx.replica_id_in_sync_group, np.float32)
        ),
    }


def abstract_mesh_state(strategy):
    """``mesh_state``'s shapes, dtypes and shardings, without any array."""
    sharding = NamedSharding(strategy.mesh, P())
    n = strategy.num_replicas_in_sync
    return {
        "params": {
            "w": jax.ShapeDtypeStruct((3, 4), np.float32, sharding=sharding),
            "b": jax.ShapeDtypeStruct((), np.float32, sharding=sharding),
        },
        "key": jax.ShapeDtypeStruct((), KEY_DTYPE, sharding=sharding),
        "step": np.int32(0),
        "per_replica": abstract_per_replica(jax.ShapeDtypeStruct((n, 2), np.float32)),
    }


def abstract_per_replica(stacked):
    """A PerReplica holding a ShapeDtypeStruct (as jax.eval_shape would give)."""
    return jax.tree.unflatten(jax.tree.structure(ts.PerReplica([np.float32(0)])), [stacked])


def host_values(strategy, state):
    """What a process can read of ``state``: replicated leaves whole, PerReplica leaves local."""
    return {
        "w": np.asarray(state["params"]["w"]),
        "b": np.asarray(state["params"]["b"]),
        "key": np.asarray(jax.random.key_data(state["key"])),
        "step": int(state["step"]),
        "per_replica": [
            np.asarray(x) for x in strategy.experimental_local_results(state["per_replica"])
        ],
        "shardings": [
            tuple(state["params"]["w"].sharding.spec),
            tuple(state["per_replica"].stacked.sharding.spec),
        ],
        "devices": len(state["params"]["w"].sharding.device_set),
    }


def save_in_cluster(directory):
    strategy = ts.TPUStrategy()
    with ts.CheckpointManager(directory, strategy) as manager:
        manager.save(3, mesh_state(strategy))
    return True


def restore_in_cluster(directory, num_logical_cores):
    strategy = ts.TPUStrategy(num_logical_cores=num_logical_cores)
    target = abstract_mesh_state(strategy)  # nothing is materialised before the restore
    with ts.CheckpointManager(directory, strategy) as manager:
        restored = manager.restore(target)
    return host_values(strategy, restored)


def restore_wb_in_cluster(directory):
    """Restores a ``{"w": (64, 64), "b": (64,)}`` float32 state; returns it or the error."""
    strategy = ts.TPUStrategy()
    sharding = NamedSharding(strategy.mesh, P())
    target = {
        "w": jax.ShapeDtypeStruct((64, 64), np.float32, sharding=sharding),
        "b": jax.ShapeDtypeStruct((64,), np.float32, sharding=sharding),
    }
    with ts.CheckpointManager(directory, strategy) as manager:
        try:
            restored = manager.restore(target)
        except ts.CheckpointError as error:
            return str(error)
    return {name: np.asarray(value) for name, value in restored.items()}


def two_managers(directory):
    """Opens a second manager on a directory that one already uses; prints what happened.

    Run with ``python -c`` (see ``run_function``): the test checks that the process exits.
    """
    strategy = ts.TPUStrategy()
    state = {"w": replicated(strategy, np.ones(4, np.float32))}
    first = ts.CheckpointManager(directory, strategy)
    first.save(1, state)
    try:
        second = ts.CheckpointManager(directory, strategy)
    except ValueError as error:
        print(f"refused: {error}", flush=True)
    else:
        second.save(2, state)
        second.wait_until_finished()
        print("opened a second manager", flush=True)
    first.save(3, state)
    first.wait_until_finished()  # the process then exits without closing it


def interrupt_saves(directory, seconds):
    """Saves steps 1, 2, ... (a 16 MB state of the step number) until SIGINT, sent from a
    thread ``seconds`` after step 1 is saved, interrupts the loop wherever it is, as Ctrl-C
    would."""
    strategy = ts.TPUStrategy()
    manager = ts.CheckpointManager(directory, strategy)
    for step in range(1, 1000):
        manager.save(step, {"w": replicated(strategy, np.full(4_000_000, step, np.float32))})
        print(f"saving {step}", flush=True)
        manager.wait_until_finished()
        if step == 1:
            threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT)).start()


def run_function(call, timeout=60):
    """Runs ``call`` (Python source calling a function of this module) in a new process."""
    tests = str(Path(__file__).resolve().parent)
    env = environment()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], tests])
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    return subprocess.run(
        [sys.executable, "-c", f"import _checkpoint_workers as w; w.{call}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


if __name__ == "__main__":
    kill_at = None
    if "--kill-during-save-at" in sys.argv:
        kill_at = int(sys.argv[sys.argv.index("--kill-during-save-at") + 1])
    train(sys.argv[1], sys.argv[2], int(sys.argv[3]), kill_at, "--big" in sys.argv)
