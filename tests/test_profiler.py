"""ts.StepProfiler: a jax.profiler trace of chosen steps, each marked with its step number."""

import gzip
import json

import numpy as np
import pytest

import tpustrat as ts


def _step_markers(logdir, name="train"):
    """The step numbers of the ``name`` annotations in the trace's Perfetto file."""
    (trace,) = logdir.glob("plugins/profile/*/*.trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    return sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == name)


def test_traces_the_chosen_steps_each_marked(tmp_path):
    strategy = ts.TPUStrategy()
    profiler = ts.StepProfiler(tmp_path, first=2, last=4)
    x = np.float32(0)
    for i in range(7):
        with profiler.step(i):
            x = strategy.run(lambda x: x + 1, args=(x,))
    assert float(x) == 7.0
    assert profiler.traced_steps == [2, 3, 4]
    assert len(list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))) == 1
    assert _step_markers(tmp_path) == [2, 3, 4]


def test_stop_ends_a_trace_cut_short(tmp_path):
    profiler = ts.StepProfiler(tmp_path, first=1, last=100, name="eval")
    try:
        for i in range(3):
            with profiler.step(i):
                pass
    finally:
        profiler.stop()
    assert profiler.traced_steps == [1, 2]
    assert _step_markers(tmp_path, "eval") == [1, 2]
    profiler.stop()  # a second stop does nothing


def test_an_error_in_the_last_step_still_ends_the_trace(tmp_path):
    profiler = ts.StepProfiler(tmp_path, first=0)
    with pytest.raises(RuntimeError, match="in the step"), profiler.step(0):
        raise RuntimeError("in the step")
    assert _step_markers(tmp_path) == [0]
    profiler = ts.StepProfiler(tmp_path / "again", first=0)  # another trace may start
    with profiler.step(0):
        pass
    assert _step_markers(tmp_path / "again") == [0]


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"logdir": None}, TypeError, "logdir"),
        ({"first": -1}, ValueError, "first"),
        ({"first": "2"}, TypeError, "first"),
        ({"first": 3, "last": 2}, ValueError, "last"),
        ({"first": 2**40, "last": 2}, ValueError, "last 2 comes before first 1099511627776"),
        ({"name": ["train"]}, TypeError, r"name must be a non-empty str, got list \['train'\]"),
        ({"name": ""}, TypeError, "name"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, words):
    kwargs.setdefault("logdir", tmp_path)
    kwargs.setdefault("first", 0)
    with pytest.raises(error, match=words):
        ts.StepProfiler(**kwargs)
