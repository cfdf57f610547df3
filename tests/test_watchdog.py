"""The watchdog in one process: which waits it reports, once, with the process's call counts.

The multi-process case (one process calls reduce, the other does not) is in test_cluster.py.
"""

import logging
import time

import numpy as np
import pytest

import tpustrat as ts
from tpustrat import _dispatch, _watchdog


@pytest.fixture
def watchdog(caplog):
    """Starts the watchdog as process 3 of 4 with a limit of 0.2 s; stops it afterwards."""
    caplog.set_level(logging.WARNING, logger="tpustrat")
    _watchdog.start(3, 4, 0.2)
    yield caplog
    _watchdog.start(0, 1, None)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "tpustrat"]


def test_a_long_wait_names_the_call_its_count_and_the_process(watchdog):
    before = dict(_watchdog.calls)
    with _watchdog.calling("gather"):
        time.sleep(1.0)
    n = {kind: before[kind] + (kind == "gather") for kind in before}
    assert _warnings(watchdog) == [
        f"tpustrat: process 3 of 4 has waited 0.2 s or more in gather (its gather call "
        f"{n['gather']}); its calls so far: run {n['run']}, reduce {n['reduce']}, gather "
        f"{n['gather']}, checkpoint save {n['checkpoint save']}. Every process must make the "
        "same run, reduce, gather and checkpoint calls in the same order: compare this line "
        "with the other processes' logs; the process whose counts differ made a call the "
        "others did not (often a call under `if jax.process_index() == 0:`)"
    ]


def test_each_wait_is_reported_once(watchdog):
    for _ in range(2):
        with _watchdog.calling("reduce"):
            time.sleep(0.9)  # more than four times the limit
    reports = _warnings(watchdog)
    assert len(reports) == 2
    assert all(" in reduce (its reduce call " in report for report in reports)


def test_short_waits_in_a_row_are_not_reported(watchdog):
    for _ in range(20):  # 1.2 s of waits, none longer than a quarter of the limit
        with _watchdog.waiting("run"):
            time.sleep(0.05)
        time.sleep(0.01)
    time.sleep(0.3)
    assert _warnings(watchdog) == []


def test_an_exception_ends_the_wait(watchdog):
    with pytest.raises(KeyError), _watchdog.calling("reduce"):
        raise KeyError("the wait ends with this exception")
    time.sleep(0.8)
    assert _warnings(watchdog) == []


def test_nothing_is_watched_before_start_or_after_stop(caplog):
    caplog.set_level(logging.WARNING, logger="tpustrat")
    _watchdog.start(0, 2, 0.2)
    _watchdog.start(0, 2, None)
    with _watchdog.waiting("reduce"):
        time.sleep(0.8)
    assert _warnings(caplog) == []


def test_marking_a_wait_costs_well_under_a_microsecond():
    """run marks each wait of its dispatch window, so a mark must stay cheap (thread time, so
    that other processes on the machine do not count)."""
    mark = _watchdog.waiting("run")
    per_mark = []
    for _ in range(5):
        start = time.thread_time()
        for _ in range(20_000):
            with mark:
                pass
        per_mark.append((time.thread_time() - start) / 20_000)
    assert min(per_mark) < 1e-6


class _SlowMarker:
    """Stands for a step's output array that takes 0.8 s to be ready."""

    def is_deleted(self):
        return False

    def block_until_ready(self):
        time.sleep(0.8)


def test_run_reduce_and_gather_are_counted_and_the_window_wait_is_marked(watchdog):
    strategy = ts.TPUStrategy()
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: np.full(1, ctx.replica_id_in_sync_group, np.float32)
    )
    before = dict(_watchdog.calls)
    out = strategy.run(lambda v: v + 1, args=(values,))
    out = strategy.run(lambda v: v + 1, args=(out,))
    assert float(strategy.reduce("sum", out)[0]) == 44.0
    assert strategy.gather(out, axis=0).shape == (8,)
    counted = {kind: _watchdog.calls[kind] - before[kind] for kind in before}
    assert counted == {"run": 2, "reduce": 1, "gather": 1, "checkpoint save": 0, "shutdown": 0}
    window = _dispatch.DispatchWindow(1)
    window.admit(_SlowMarker())
    window.admit(_SlowMarker())  # waits for the first one
    (report,) = _warnings(watchdog)
    calls = _watchdog.calls["run"]
    assert f"process 3 of 4 has waited 0.2 s or more in run (run call {calls} waits for an " in (
        report
    )


def test_checkpoint_saves_are_counted(tmp_path):
    strategy = ts.TPUStrategy()
    before = _watchdog.calls["checkpoint save"]
    with ts.CheckpointManager(tmp_path, strategy) as manager:
        manager.save(1, {"w": np.ones(3, np.float32)})
        manager.wait_until_finished()
    assert _watchdog.calls["checkpoint save"] == before + 1
