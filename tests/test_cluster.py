"""Multi-process jobs: 2 processes x 4 CPU devices on localhost, compared with 1 process x 8.

Each launch costs a few seconds, so one launch per mesh shape runs the whole workload of
``_cluster_workers.exercise`` and the tests below check its parts. Every process has a timeout
and is stopped, pass or fail.
"""

import contextlib
import doctest
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import _cluster_workers as workers
import jax
import numpy as np
import pytest
from conftest import SEVERAL_REPLICAS, mesh_id

import tpustrat as ts
from tpustrat import _cluster, _launch
from tpustrat.testing import run_in_local_processes

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4


@pytest.fixture(scope="module", params=SEVERAL_REPLICAS, ids=mesh_id)
def job(request):
    """(replicas per process, the one-process reference, each process's results)."""
    replicas, cores = request.param
    reference = workers.exercise(ts.TPUStrategy(num_logical_cores=cores))
    results = run_in_local_processes(
        workers.in_cluster,
        NUM_PROCESSES,
        devices_per_process=DEVICES_PER_PROCESS,
        args=(cores,),
        timeout=120,
    )
    return replicas // NUM_PROCESSES, reference, results


def _local(reference_list, process_id, per_process):
    return reference_list[process_id * per_process : (process_id + 1) * per_process]


def test_cluster_info_and_idempotence(job):
    _, _, results = job
    address = results[0]["info"].coordinator_address
    assert address.startswith("127.0.0.1:")
    for process_id, result in enumerate(results):
        assert result["info"] == ts.ClusterInfo(
            process_id=process_id,
            num_processes=NUM_PROCESSES,
            coordinator_address=address,
            local_device_count=DEVICES_PER_PROCESS,
            global_device_count=NUM_PROCESSES * DEVICES_PER_PROCESS,
            platform="cpu",
        )
        assert result["same_info"]
        assert "already joined a job with num_processes=2" in result["mismatch"]
        assert "asks for num_processes=3" in result["mismatch"]


def test_each_process_holds_and_feeds_its_own_replicas(job):
    per_process, _, results = job
    cores = DEVICES_PER_PROCESS // per_process
    for process_id, result in enumerate(results):
        assert result["mesh_processes"] == [
            [p] * cores for p in range(NUM_PROCESSES) for _ in range(per_process)
        ]
        local = list(range(process_id * per_process, (process_id + 1) * per_process))
        assert result["asked"] == local  # value_fn ran for this process's replicas only


@pytest.mark.parametrize("feed", ["params", "dataset_params", "function_params", "shard_params"])
def test_training_matches_one_process(job, feed):
    _, reference, results = job
    for result in results:
        for name, value in reference["params"].items():
            np.testing.assert_allclose(result[feed][name], value, rtol=2e-5, atol=1e-6)
    moved = np.abs(reference["params"]["w1"] - workers.init_params()["w1"]).max()
    assert moved > 1e-2  # ten steps really trained


def test_sharded_by_process_each_process_places_only_its_elements(job):
    _, reference, results = job
    share = workers.GLOBAL_BATCH // NUM_PROCESSES
    assert reference["shard_steps"] == workers.NUM_STEPS
    for process_id, result in enumerate(results):
        assert result["shard_steps"] == workers.NUM_STEPS
        assert result["shard_ids"] == [
            step * workers.GLOBAL_BATCH + process_id * share + row
            for step in range(workers.NUM_STEPS)
            for row in range(share)
        ]


def test_datasets_read_and_place_only_local_rows(job):
    per_process, reference, results = job
    share = workers.GLOBAL_BATCH // NUM_PROCESSES
    for process_id, result in enumerate(results):
        assert result["function_context"] == (NUM_PROCESSES, process_id)
        expected_read = [
            step * workers.GLOBAL_BATCH + process_id * share + row
            for step in range(workers.NUM_STEPS)
            for row in range(share)
        ]
        assert result["function_read"] == expected_read
        for key in ("dataset_ids", "function_ids"):
            expected = _local(reference["dataset_ids"], process_id, per_process)
            assert len(result[key]) == per_process
            for got, want in zip(result[key], expected):
                np.testing.assert_array_equal(got, want)


def test_reduce_gather_and_local_results_match_one_process(job):
    per_process, reference, results = job
    for process_id, result in enumerate(results):
        for op, value in reference["reduce"].items():
            np.testing.assert_allclose(result["reduce"][op], value, rtol=1e-6)
        np.testing.assert_allclose(result["reduce_axis"], reference["reduce_axis"], rtol=1e-6)
        for got, want in zip(result["gather"], reference["gather"]):
            np.testing.assert_array_equal(got, want)
        expected = _local(reference["local"], process_id, per_process)
        assert len(result["local"]) == per_process
        for got, want in zip(result["local"], expected):
            np.testing.assert_array_equal(got, want)


def test_shape_bucketing_pads_only_local_shards(job):
    per_process, reference, results = job
    n = per_process * NUM_PROCESSES  # replicas; replica r holds r * 10 + [0, rows)
    expected = [
        [rows * (rows - 1) / 2 * n + 10 * rows * n * (n - 1) / 2, rows * n] for rows in (3, 5)
    ]
    np.testing.assert_allclose(reference["bucketed"], expected)
    for result in results:
        np.testing.assert_allclose(result["bucketed"], reference["bucketed"])


def _assert_stopped(folder):
    pids = [int(p.read_text()) for p in folder.glob("pid-*")]
    assert pids, "no process got as far as recording its pid"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_failed_process_stops_the_others(tmp_path):
    start = time.monotonic()
    with pytest.raises(ts.ClusterError, match="process 1 of 2 failed with exit code 1") as error:
        run_in_local_processes(
            workers.fail_in_process_1, 2, devices_per_process=2, args=(str(tmp_path),), timeout=90
        )
    assert "processes [0] were still running and were stopped" in str(error.value)
    assert "RuntimeError: process 1 failed on purpose" in str(error.value)
    assert time.monotonic() - start < 60
    _assert_stopped(tmp_path)


def test_timeout_stops_every_process(tmp_path):
    with pytest.raises(ts.ClusterError, match=r"timed out after 15 s with processes \[0, 1\]") as e:
        run_in_local_processes(
            workers.sleep_forever, 2, devices_per_process=1, args=(str(tmp_path),), timeout=15
        )
    assert "in sleep_forever" in str(e.value)  # each process's Python stack
    _assert_stopped(tmp_path)


def test_a_call_made_by_one_process_is_named_in_every_process_log(tmp_path):
    """Process 0 reduces once more than process 1, which ends its program: each logs where it
    waits and its call counts after warn_after_waiting; then the test stops both."""
    failure = []

    def launch():
        with pytest.raises(ts.ClusterError) as error:
            run_in_local_processes(
                workers.reduce_in_process_0_only,
                2,
                devices_per_process=4,
                args=(str(tmp_path),),
                timeout=120,
                warn_after_waiting=2,
            )
        failure.append(str(error.value))

    launcher = threading.Thread(target=launch)
    launcher.start()
    logs = [tmp_path / f"log-{process_id}.txt" for process_id in range(2)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(
        log.exists() and "tpustrat:" in log.read_text() for log in logs
    ):
        time.sleep(0.2)
    for pid in [int(p.read_text()) for p in tmp_path.glob("pid-*")]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    launcher.join()
    assert "was killed by signal SIGKILL" in failure[0]
    _assert_stopped(tmp_path)
    counts = "; its calls so far: run 1, reduce {}, gather 0, checkpoint save 0. Every process"
    assert (
        logs[0]
        .read_text()
        .startswith(
            "tpustrat: process 0 of 2 has waited 2 s or more in reduce (its reduce call 2)"
            + counts.format(2)
        )
    )
    assert (
        logs[1]
        .read_text()
        .startswith(
            "tpustrat: process 1 of 2 has waited 2 s or more in the job's shutdown: its program "
            "ended, and JAX waits for the other processes" + counts.format(1)
        )
    )


def _environment():
    """This environment with one CPU device, minus what JAX's cluster detection reads."""
    detected = ("SLURM_", "OMPI_", "PMI_", "KUBERNETES_", "JAX_COORDINATOR", "TPU_")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(detected)}
    return {**environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _python(code, *argv, timeout=60):
    """Runs ``code`` in a fresh Python on one CPU device; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_environment(),
    )


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_start_up_failures_say_what_to_do():
    code = """
        import os, sys
        import tpustrat as ts

        def join(port, process_id):
            os.environ["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
            return ts.initialize_cluster(f"127.0.0.1:{port}", 2, process_id,
                                         initialization_timeout=2)

        held, free = map(int, sys.argv[1:])
        for attempt in [ts.initialize_cluster, lambda: join(held, 0), lambda: join(free, 1)]:
            try:
                attempt()
            except ts.ClusterError as error:
                print(error, flush=True)
        join(free, 0)  # alone: nobody else registers, so the process ends
        print("still running")
    """
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port, free = held.getsockname()[1], _free_port()
        done = _python(code, port, free)
    assert "no cluster was detected and none was described" in done.stdout
    assert f"serves the coordinator at 127.0.0.1:{port}, but port {port}" in done.stdout
    assert "already in use" in done.stdout
    assert f"process 1 of 2 could not reach the coordinator at 127.0.0.1:{free} within 2 s" in (
        done.stdout
    )
    assert done.returncode == 1 and "still running" not in done.stdout
    assert (
        f"tpustrat: process 0 of 2 serves the coordinator at 127.0.0.1:{free}, but not every "
        "process registered within 2 s: the job was not started on all hosts"
    ) in done.stderr


def _start_python(code, *argv):
    """Starts ``code`` in a fresh Python on one CPU device, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_environment(),
    )


def _finish(processes, timeout):
    """Each process's (return code, stdout, stderr); every process is stopped at the end."""
    done = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            done.append((process.returncode, stdout, stderr))
    finally:
        for process in processes:
            process.kill()
            process.wait()
    return done


_JOIN = """
    import os, sys, time
    import tpustrat as ts

    address, num_processes, process_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    os.environ["JAX_COORDINATOR_BIND_ADDRESS"] = address
    start = time.monotonic()
    try:
        ts.initialize_cluster(address, num_processes, process_id, initialization_timeout=4)
    except ts.ClusterError as error:
        print(error, flush=True)
    print(f"after {time.monotonic() - start:.1f} s", flush=True)
"""


def test_process_told_of_more_processes_than_process_0_is_named_in_both():
    address = f"127.0.0.1:{_free_port()}"
    done = _finish([_start_python(_JOIN, address, 2, 0), _start_python(_JOIN, address, 3, 1)], 90)
    (_, served, _), (_, told_more, _) = done
    assert all(_seconds_taken(stdout) < 15 for _, stdout, _ in done)  # not gloo's 30 s
    assert (
        f"process 1 was started with num_processes=3, but process 0 (started with "
        f"num_processes=2) and the coordinator at {address} run a job of 2 processes: the "
        "processes were started with different num_processes"
    ) in served
    assert (
        f"process 1 (started with num_processes=3) joined the coordinator at {address}, which "
        "runs a job of 2 processes (process 0's num_processes): the processes were started "
        "with different num_processes"
    ) in told_more


def test_process_0_told_of_more_processes_is_named_in_both():
    address = f"127.0.0.1:{_free_port()}"
    done = _finish([_start_python(_JOIN, address, 3, 0), _start_python(_JOIN, address, 2, 1)], 90)
    for (code, _, stderr), who, this_one in zip(done, ["0 of 3 serves", "1 of 2 reached"], [3, 2]):
        assert code == 1
        assert (
            f"tpustrat: process {who} the coordinator at {address}, but not every process "
            "registered within 4 s"
        ) in stderr
        assert f"started with different num_processes (this one: {this_one};" in stderr


def test_another_program_on_the_coordinator_port_is_named():
    """A listener that accepts and says nothing, and one that answers something else."""
    code = """
        import os, sys, time
        import tpustrat as ts

        address = sys.argv[1]
        os.environ["JAX_COORDINATOR_BIND_ADDRESS"] = address
        start = time.monotonic()
        for process_id in (0, 1):
            try:
                ts.initialize_cluster(address, 2, process_id, initialization_timeout=60)
            except ts.ClusterError as error:
                print(error, flush=True)
        print(f"after {time.monotonic() - start:.1f} s", flush=True)
    """
    with socket.socket() as silent, socket.socket() as talker:
        for listener in (silent, talker):
            listener.bind(("127.0.0.1", 0))
            listener.listen()
        talk = threading.Thread(target=_greet, args=(talker, b"SSH-2.0-OpenSSH_9.6\r\n"))
        talk.start()
        addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in (silent, talker)]
        done = _finish([_start_python(code, address) for address in addresses], timeout=90)
        talk.join()
    assert all(_seconds_taken(stdout) < 15 for _, stdout, _ in done)  # not the 60 s timeout
    for (_, stdout, _), address in zip(done, addresses):
        port = address.rsplit(":", 1)[1]
        assert f"process 0 of 2 serves the coordinator at {address}, but port {port}" in stdout
        assert "already in use" in stdout
    (_, silent_out, _), (_, talker_out, _) = done
    expected = (
        "process 1 of 2 connected to {}, but the program listening there {}, which JAX's "
        "coordinator never does: the port is used by another program"
    )
    assert expected.format(addresses[0], "said nothing for 5 s") in silent_out
    assert expected.format(addresses[1], "answered b'SSH-2.0-O'") in talker_out


def _seconds_taken(stdout):
    """The seconds a snippet says its start-up attempts took (its last line, 'after N s')."""
    return float(stdout.splitlines()[-1].split()[1])


def _greet(listener, greeting):
    listener.settimeout(30)
    try:
        connection, _ = listener.accept()
    except TimeoutError:
        return  # nobody came: the test's assertions say so
    with connection:
        connection.sendall(greeting)
        time.sleep(1)


def test_dead_process_ends_the_job_after_heartbeat_timeout():
    code = """
        import os, sys, time
        import numpy as np
        import tpustrat as ts

        address, process_id = sys.argv[1], int(sys.argv[2])
        os.environ["JAX_COORDINATOR_BIND_ADDRESS"] = address
        ts.initialize_cluster(address, 2, process_id, heartbeat_timeout=2)
        strategy = ts.TPUStrategy()
        ones = strategy.experimental_distribute_values_from_function(lambda ctx: np.float32(1))
        total = lambda x: ts.get_replica_context().all_reduce("sum", x)
        print(float(strategy.reduce("mean", strategy.run(total, args=(ones,)))), flush=True)
        if process_id == 1:
            os._exit(0)  # dies without a word to the others
        time.sleep(120)  # host work: only the missing heartbeats can tell this process
    """
    address = f"127.0.0.1:{_free_port()}"
    survivor = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), address, "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_environment(),
    )
    try:
        assert _python(code, address, 1, timeout=60).stdout.splitlines()[-1] == "2.0"
        start = time.monotonic()
        stdout, stderr = survivor.communicate(timeout=60)
    finally:
        survivor.kill()
        survivor.wait()
    assert stdout.splitlines()[-1] == "2.0"  # after gloo's connection notices
    # jaxlib 0.10 aborts (-SIGABRT); jaxlib 0.8 exits with status 1 after the same fatal log.
    assert survivor.returncode in (-signal.SIGABRT, 1)
    assert "stopped sending heartbeats" in stderr
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("exit_at_once", [False, True])
def test_uncaught_exception_runs_atexit_handlers_unless_asked_to_exit(tmp_path, exit_at_once):
    code = """
        import atexit, os, sys
        from pathlib import Path
        import tpustrat as ts

        address, process_id, folder, exit_at_once = sys.argv[1:]
        os.environ["JAX_COORDINATOR_BIND_ADDRESS"] = address
        ts.initialize_cluster(
            address, 2, int(process_id), exit_on_uncaught_exception=exit_at_once == "True"
        )
        atexit.register(Path(folder, f"flushed-{process_id}").write_text, "checkpoint")
        raise RuntimeError("the step failed")
    """
    address = f"127.0.0.1:{_free_port()}"
    argv = [sys.executable, "-c", textwrap.dedent(code), address]
    other = subprocess.Popen(
        [*argv, "1", str(tmp_path), str(exit_at_once)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_environment(),
    )
    try:
        done = _python(code, address, 0, tmp_path, exit_at_once)
        other.communicate(timeout=60)
    finally:
        other.kill()
        other.wait()
    assert done.returncode == 1 and "RuntimeError: the step failed" in done.stderr
    flushed = sorted(p.name for p in tmp_path.glob("flushed-*"))
    assert flushed == ([] if exit_at_once else ["flushed-0", "flushed-1"])


def test_user_script_with_function_in_main(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent("""
            import jax
            import numpy as np
            import tpustrat as ts
            from tpustrat.testing import run_in_local_processes

            def replica_sum():
                strategy = ts.TPUStrategy()
                ids = strategy.experimental_distribute_values_from_function(
                    lambda ctx: np.float32(ctx.replica_id_in_sync_group))
                info = ts.initialize_cluster()
                return info.process_id, float(strategy.reduce("sum", ids)), jax.device_count()

            if __name__ == "__main__":
                print(run_in_local_processes(replica_sum, 2, devices_per_process=3, timeout=90))
        """)
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[(0, 15.0, 6), (1, 15.0, 6)]"


@pytest.fixture
def fresh_cluster_state(monkeypatch):
    """Forgets any job this test process joined, and restores the state afterwards."""
    monkeypatch.setattr(_cluster, "_joined", None)


def test_backend_already_started_is_reported(fresh_cluster_state):
    jax.devices()  # this test process has long started its backend
    with pytest.raises(ts.ClusterError, match="must run before JAX uses a device"):
        ts.initialize_cluster(f"127.0.0.1:{_free_port()}", 2, 0)


def test_single_process_job(fresh_cluster_state):
    info = ts.initialize_cluster(num_processes=1)
    assert info == ts.ClusterInfo(0, 1, None, 8, 8, "cpu")
    assert ts.initialize_cluster() is info
    assert ts.initialize_cluster(num_processes=1, process_id=0) is info
    with pytest.raises(ts.ClusterError, match="num_processes=1, but this call asks for num_"):
        ts.initialize_cluster(num_processes=2)
    with pytest.raises(ts.ClusterError, match="coordinator_address=None, but this call asks"):
        ts.initialize_cluster("127.0.0.1:1234")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"coordinator_address": "10.0.0.1"}, ValueError, "must be 'host:port'"),
        (
            {"coordinator_address": "10.0.0.1:0"},
            ValueError,
            "port in \\[1, 65535\\], got '10.0.0.1:0'",
        ),
        ({"num_processes": 0}, ValueError, "num_processes must be an int >= 1, got 0"),
        ({"num_processes": "2"}, TypeError, "num_processes must be an int, got str '2'"),
        (
            {"num_processes": 2, "process_id": 2},
            ValueError,
            "process_id 2 is out of range for 2 processes",
        ),
        ({"local_device_ids": [0, "1"]}, TypeError, r"local_device_ids\[1\] must be an int"),
        ({"num_processes": 1, "initialization_timeout": 0}, ValueError, "initialization_timeout"),
        ({"num_processes": 1, "heartbeat_timeout": 2.5}, TypeError, "heartbeat_timeout must be"),
        (
            {"coordinator_address": 8476},
            TypeError,
            "coordinator_address must be a 'host:port' string, got int 8476",
        ),
        ({"coordinator_address": "http://10.0.0.1:8476"}, ValueError, "drop the scheme: '10.0"),
        (
            {"coordinator_address": "::1:8476"},
            ValueError,
            r"write an IPv6 address in brackets: '\[::1\]:8476'",
        ),
        ({"coordinator_address": " 10.0.0.1:8476"}, ValueError, "remove the spaces"),
        ({"coordinator_address": "10.0.0.1:\uff18\uff14"}, ValueError, "port in \\[1, 65535\\]"),
        ({"coordinator_address": "[::1:8476"}, ValueError, "must be 'host:port'"),
        ({"coordinator_address": "[host]:8476"}, ValueError, "must be 'host:port'"),
        ({"coordinator_address": "my host:8476"}, ValueError, "must be 'host:port'"),
        ({"process_id": -1}, ValueError, "process_id must be an int >= 0, got -1"),
        (
            {"local_device_ids": "01"},
            TypeError,
            "local_device_ids must be a list of device ids, got str '01'",
        ),
        (
            {"num_processes": 1, "warn_after_waiting": 0},
            ValueError,
            "warn_after_waiting must be a number of seconds > 0, got 0",
        ),
        (
            {"num_processes": 1, "warn_after_waiting": "60"},
            TypeError,
            "warn_after_waiting must be a number of seconds, got str '60'",
        ),
        (
            {"num_processes": 1, "exit_on_uncaught_exception": 1},
            TypeError,
            "exit_on_uncaught_exception must be True or False, got 1",
        ),
    ],
)
def test_invalid_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        ts.initialize_cluster(**kwargs)


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("10.0.0.1:8476", ("10.0.0.1", 8476)),
        ("[::1]:8476", ("::1", 8476)),
        ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
        ("host-3.example.com:65535", ("host-3.example.com", 65535)),
    ],
)
def test_valid_coordinator_addresses(address, parts):
    assert _cluster._split_address(address) == parts


def test_a_second_call_with_other_settings_is_refused(fresh_cluster_state):
    info = ts.initialize_cluster(num_processes=1, heartbeat_timeout=10)
    assert ts.initialize_cluster(heartbeat_timeout=10, initialization_timeout=300) is info
    with pytest.raises(
        ts.ClusterError,
        match="joined a job with heartbeat_timeout=10, but this call asks for heartbeat_timeout=20",
    ):
        ts.initialize_cluster(heartbeat_timeout=20)
    with pytest.raises(ts.ClusterError, match=r"warn_after_waiting=60\.0, but this call asks for"):
        ts.initialize_cluster(warn_after_waiting=5)
    with pytest.raises(ts.ClusterError, match="exit_on_uncaught_exception=False, but this call"):
        ts.initialize_cluster(exit_on_uncaught_exception=True)


def test_tpu_held_by_another_process_message():
    jax_error = (
        "Unable to initialize backend 'tpu': ABORTED: The TPU is already in use by process "
        "with pid 176028. Not attempting to load libtpu.so in this process."
    )
    message = _cluster._tpu_held_message(jax_error)
    assert "held by another process" in message
    assert "pid 176028" in message and "lsof" in message
    assert _cluster._tpu_held_message("Unable to initialize backend 'tpu': no TPU") is None


def test_launcher_rejects_what_it_cannot_send():
    with pytest.raises(TypeError, match="top level of a module"):
        run_in_local_processes(lambda: 0, 2)
    with pytest.raises(ValueError, match="devices_per_process must be an int >= 1, got 0"):
        run_in_local_processes(workers.scale, 2, devices_per_process=0)
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0, got -1"):
        run_in_local_processes(workers.scale, 2, timeout=-1)
    with pytest.raises(TypeError, match="heartbeat_timeout must be a whole number of seconds, got"):
        run_in_local_processes(workers.scale, 2, heartbeat_timeout=0.5)
    with pytest.raises(
        ValueError, match="heartbeat_timeout must be a whole number of seconds >= 1"
    ):
        run_in_local_processes(workers.scale, 2, heartbeat_timeout=0)
    with pytest.raises(TypeError, match="timeout must be a number of seconds, got str '60'"):
        run_in_local_processes(workers.scale, 2, timeout="60")


@pytest.mark.parametrize("module", [_cluster, _launch], ids=lambda m: m.__name__)
def test_docstring_examples(module, fresh_cluster_state):
    """The Examples of these modules, kept out of test_docstrings.py as they join jobs."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(module, globs={"ts": ts, "jax": jax, "np": np}):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def _nested_function():
    def step():
        return 0

    return step


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"fn": lambda: 0}, TypeError, "could not send fn '<lambda>'.*not a lambda"),
        ({"fn": _nested_function()}, TypeError, "could not send fn '_nested_function.<locals>"),
        ({"fn": 3}, TypeError, "fn must be a callable, got int 3"),
        ({"args": 5}, TypeError, r"args must be a tuple or list .*got int 5; .*args=\(value,\)"),
        ({"args": "ab"}, TypeError, "args must be a tuple or list .*got str 'ab'"),
        ({"args": (1, threading.Lock())}, TypeError, r"could not send args\[1\], a lock,"),
        ({"kwargs": {"lock": threading.Lock()}}, TypeError, r"could not send kwargs\['lock'\]"),
        ({"kwargs": {1: 2}}, TypeError, "kwargs must be a dict of keyword arguments with str"),
        ({"kwargs": [1]}, TypeError, "kwargs must be a dict .*got list"),
        ({"env": {"X": 1}}, TypeError, "env must map str to str, got 'X': 1"),
        ({"env": ["X"]}, TypeError, r"env must be a dict of str to str, got list \['X'\]"),
        ({"num_processes": 0}, ValueError, "num_processes must be an int >= 1, got 0"),
        ({"warn_after_waiting": 0}, ValueError, "warn_after_waiting must be a number of seconds"),
    ],
)
def test_launcher_misuse_names_the_argument(kwargs, error, message):
    call = {"fn": workers.scale, "num_processes": 2, **kwargs}
    with pytest.raises(error, match=message):
        run_in_local_processes(**call)


def test_worker_error_comes_back_with_its_whole_traceback():
    with pytest.raises(ts.ClusterError) as error:
        run_in_local_processes(workers.fail_with_a_long_traceback, 1, timeout=60)
    message = str(error.value)
    assert message.startswith(
        "process 0 of 1 failed with exit code 1. Its traceback:\nTraceback (most recent call last)"
    )
    assert "ValueError: layer 0\n" in message  # the first of 80 lines
    assert "in fail_with_a_long_traceback" in message
    assert message.endswith("RuntimeError: the worker failed")


def test_result_that_cannot_be_sent_back_is_named():
    with pytest.raises(ts.ClusterError, match="could not send back what fn returned, a lock"):
        run_in_local_processes(workers.return_a_lock, 1, timeout=60)


def test_function_that_ends_its_process_is_reported():
    with pytest.raises(ts.ClusterError, match="process 0 of 1 exited with code 0 but returned"):
        run_in_local_processes(os._exit, 1, args=(0,), timeout=60)
