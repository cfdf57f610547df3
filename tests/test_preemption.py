"""Preemption: real SIGTERMs to training processes, which save, exit and resume exactly."""

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import _checkpoint_workers as workers
import numpy as np
import pytest

import tpustrat as ts
from tpustrat.testing import run_in_local_processes

NUM_STEPS = workers.NUM_BATCHES


def run_until_sigterm(directory, out, at_step, timeout=120):
    """Starts the worker, sends SIGTERM once it has printed ``step at_step`` (or later); returns
    its exit code, the first step it ran and the steps it printed."""
    with subprocess.Popen(
        workers.command(directory, out, NUM_STEPS),
        env=workers.environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            steps, signalled = [], False
            for line in process.stdout:
                if line.startswith("step "):
                    steps.append(int(line.split()[1]))
                    if steps[-1] >= at_step and not signalled:
                        process.send_signal(signal.SIGTERM)
                        signalled = True
            stderr = process.stderr.read()
            code = process.wait()
        finally:
            timer.cancel()
    assert signalled, f"the run ended before step {at_step}: {stderr[-2000:]}"
    return code, steps, stderr


@pytest.mark.slow  # five training processes, each starting JAX and compiling: ~20 s on 2 cores
def test_sigterm_at_three_random_steps_resumes_exactly(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kill_steps = [rng.randint(2, 7), rng.randint(10, 14), rng.randint(17, 21)]
    reference = workers.run(tmp_path / "reference", tmp_path / "reference", NUM_STEPS)
    assert reference.returncode == 0, reference.stderr[-3000:]
    directory = tmp_path / "checkpoints"
    for at_step in kill_steps:
        code, steps, stderr = run_until_sigterm(directory, tmp_path / "run", at_step)
        assert code == ts.PreemptionCheckpointHandler.EXIT_CODE, (seed, stderr[-3000:])
        # The save happened at the step boundary right after the notice: nothing was lost.
        with ts.CheckpointManager(directory, ts.TPUStrategy()) as manager:
            assert manager.latest_step() == steps[-1], seed
    final = workers.run(directory, tmp_path / "run", NUM_STEPS)
    assert final.returncode == 0, final.stderr[-3000:]
    trained = [line.split() for line in Path(f"{tmp_path / 'run'}.log").read_text().splitlines()]
    assert [int(step) for step, _ in trained] == list(range(1, NUM_STEPS + 1)), seed
    assert [int(batch) for _, batch in trained] == list(range(NUM_STEPS)), seed  # each once
    want, got = np.load(tmp_path / "reference.npz"), np.load(tmp_path / "run.npz")
    for name in want.files:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-7, err_msg=f"seed {seed}")


def _signal_process_1(folder, stop):
    """Waits until process 1 has done 3 steps, then sends it (only it) SIGTERM."""
    pid_file, progress = Path(folder, "pid-1"), Path(folder, "progress-1")
    while not stop.is_set():
        done = progress.read_text().strip() if progress.exists() else ""
        if pid_file.exists() and done and int(done) >= 3:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
            return
        time.sleep(0.05)


def test_two_processes_save_the_same_step_when_one_gets_sigterm(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    stop = threading.Event()
    signaller = threading.Thread(target=_signal_process_1, args=(folder, stop), daemon=True)
    signaller.start()
    try:
        results = run_in_local_processes(
            workers.preempt_in_cluster,
            2,
            devices_per_process=4,
            args=(str(tmp_path / "checkpoints"), str(folder)),
            timeout=150,
        )
    finally:
        stop.set()
        signaller.join()
    saved = [result["saved_step"] for result in results]
    assert saved[0] is not None and saved[0] == saved[1], saved
    assert saved[0] < 20 * workers.NUM_BATCHES  # stopped by the notice, not the end of data
    for result in results:
        assert result["latest_step"] == saved[0]
        assert result["position"]["batches"] == saved[0]
        np.testing.assert_array_equal(result["w"], result["w_now"])
    np.testing.assert_array_equal(results[0]["w"], results[1]["w"])


def test_keep_running_after_the_save_when_asked(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    manager = ts.CheckpointManager(tmp_path, ts.TPUStrategy(), save_interval_steps=100)
    handler = ts.PreemptionCheckpointHandler(manager, {"w": np.float32(0)}, exit_code=None)
    state, reports = handler.state, []
    for step in range(1, 6):
        state = {"w": state["w"] + 1}
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: the process does not die
        reports.append(handler.step_done(state))
    handler.close()
    assert signal.getsignal(signal.SIGTERM) is previous  # close put the old handler back
    assert reports == [False, True, False, False, False]
    assert handler.saved_step == 2 and manager.all_steps() == [2]  # the others are off interval
    assert float(manager.restore(state)["w"]) == 2.0
    manager.close()


def test_restores_on_construction(tmp_path):
    strategy = ts.TPUStrategy()
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        manager.save(6, {"w": np.float32(6)})
    manager = ts.CheckpointManager(tmp_path, strategy)
    with ts.PreemptionCheckpointHandler(manager, {"w": np.float32(0)}) as handler:
        assert handler.completed_steps == 6
        assert float(handler.state["w"]) == 6.0
    manager.close()


def test_wrong_manager_is_a_type_error():
    with pytest.raises(TypeError, match=r"manager must be a ts\.CheckpointManager"):
        ts.PreemptionCheckpointHandler("/tmp/checkpoints", {})
