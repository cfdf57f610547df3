"""ts.SummaryWriter: TensorBoard event files every N steps, from process 0, read back here."""

import _summary_workers as workers
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

import tpustrat as ts
from tpustrat.testing import run_in_local_processes


def _events(logdir):
    """(tag, step, value) of every scalar, and (tag, step, count) of every histogram.

    TensorBoard's loader gives both as tensors: a scalar's one value, and a histogram's
    ``(left edge, right edge, count)`` per bucket.
    """
    scalars, histograms = [], []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                array = tensor_util.make_ndarray(value.tensor)
                if plugin == "scalars":
                    scalars.append((value.tag, event.step, float(array)))
                elif plugin == "histograms":
                    histograms.append((value.tag, event.step, float(array[:, 2].sum())))
    return scalars, histograms


def test_scalars_every_n_steps_read_back(tmp_path):
    strategy = ts.TPUStrategy()
    written = []
    with ts.SummaryWriter(tmp_path, every_n_steps=10) as writer:
        for step in range(25):
            loss = strategy.reduce("mean", ts.PerReplica([np.float32(step + i) for i in range(8)]))
            written.append(writer.scalars(step, {"loss": loss, "lr": 0.5}))
    scalars, _ = _events(tmp_path)
    assert [step for step, wrote in enumerate(written) if wrote] == [0, 10, 20]
    assert sorted(scalars) == sorted(
        [("loss", s, s + 3.5) for s in (0, 10, 20)] + [("lr", s, 0.5) for s in (0, 10, 20)]
    )


def test_histogram_read_back(tmp_path):
    strategy = ts.TPUStrategy()
    weights = strategy.replicate(np.arange(12, dtype=np.float32).reshape(3, 4))
    with ts.SummaryWriter(tmp_path) as writer:
        assert writer.histogram(3, "weights", weights)
    _, histograms = _events(tmp_path)
    assert histograms == [("weights", 3, 12.0)]


def test_strategy_says_which_process_writes():
    strategy = ts.TPUStrategy()
    assert strategy.should_save_summary is True
    assert strategy.should_checkpoint is True


def test_only_process_0_writes(tmp_path):
    results = run_in_local_processes(
        workers.write_from_every_process,
        2,
        devices_per_process=4,
        args=(str(tmp_path / "p"),),
        timeout=120,
    )
    (flag_0, wrote_0, files_0), (flag_1, wrote_1, _) = results
    assert (flag_0, wrote_0, flag_1, wrote_1) == (True, True, False, False)
    assert len(files_0) == 1  # one event file, process 0's
    scalars, _ = _events(tmp_path / "p" / "run")
    assert scalars == [("loss", 0, 3.5)]


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda w, s: w.scalars(0, {"loss": ts.PerReplica([1.0] * 8)}), TypeError, "reduce"),
        (lambda w, s: w.scalars(0, [1.0]), TypeError, "mapping"),
        (lambda w, s: w.scalars(0, {"loss": np.ones(3)}), ValueError, "one value"),
        (lambda w, s: w.scalars(-1, {"loss": 1.0}), ValueError, "step"),
        (lambda w, s: w.scalars(1.5, {"loss": 1.0}), TypeError, "step"),
        (lambda w, s: w.scalars(0, {3: 1.0}), TypeError, "names"),
        (lambda w, s: w.scalars(0, {"loss": "high"}), TypeError, "loss"),
        (lambda w, s: w.histogram(0, "w", np.ones(0)), ValueError, "non-empty"),
        (lambda w, s: w.histogram(0, "w", np.array([np.nan])), ValueError, "values of 'w' holds"),
        (lambda w, s: w.histogram(0, 3, np.ones(2)), TypeError, "name must be a str, got int 3"),
        (lambda w, s: w.histogram(0, "w", iter([1.0])), TypeError, "values is list_iterator"),
        (lambda w, s: w.scalars(0, {"loss": 1 + 2j}), TypeError, r"values\['loss'\] is complex"),
        (lambda w, s: w.scalars(0, iter([1.0])), TypeError, "values must be a mapping"),
    ],
)
def test_bad_values_say_what_to_pass(tmp_path, call, error, words):
    strategy = ts.TPUStrategy()
    with ts.SummaryWriter(tmp_path) as writer, pytest.raises(error, match=words):
        call(writer, strategy)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"logdir": None}, TypeError, "logdir"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"every_n_steps": "2"}, TypeError, "every_n_steps"),
    ],
)
def test_bad_construction(tmp_path, kwargs, error, words):
    kwargs.setdefault("logdir", tmp_path)
    with pytest.raises(error, match=words):
        ts.SummaryWriter(**kwargs)


def test_a_closed_writer_refuses(tmp_path):
    writer = ts.SummaryWriter(tmp_path)
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.scalars(0, {"loss": 1.0})
