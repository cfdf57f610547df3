"""Smoke tests of the Flax examples: a few training steps, then an exact masked evaluation."""

import gzip
import importlib
import json
import pathlib
import runpy

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
TEST_SET_SIZE = 360  # digits' 1,797 images, 20% held out


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


@pytest.mark.parametrize("name", ["nnx_digits", "linen_digits"])
@pytest.mark.parametrize("logical_cores", [1, 2], ids=["8x1", "4x2"])
def test_example_trains_and_counts_every_test_example(
    examples_on_path, tmp_path, name, logical_cores
):
    example = importlib.import_module(name)
    # Global batch 96: the test set is 3 full batches and one of 72 rows, so with 8 replicas
    # the last replica's rows are all padding and with 4 replicas the last one is half padding.
    steps = 40
    flags = ["--logdir", str(tmp_path)] if name == "nnx_digits" else []
    result = example.main(
        ["--steps", str(steps), "--batch-size", "96", "--logical-cores", str(logical_cores), *flags]
    )
    assert result.examples == TEST_SET_SIZE
    assert result.correct == round(result.test_accuracy * TEST_SET_SIZE)
    assert isinstance(result.test_accuracy, float)
    assert 0.5 < result.test_accuracy <= 1.0  # chance is 0.1
    assert len(result.losses) == steps
    assert np.all(np.isfinite(result.losses))
    assert np.mean(result.losses[-5:]) < 0.5 * result.losses[0]


def _scalars(logdir):
    """{tag: {step: value}} of the scalars in ``logdir``'s TensorBoard event files."""
    scalars = {}
    for path in logdir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                array = tensor_util.make_ndarray(value.tensor)
                scalars.setdefault(value.tag, {})[event.step] = float(array)
    return scalars


def _profiled_steps(logdir):
    """The step numbers marked in the trace's Perfetto file (ts.StepProfiler's annotations)."""
    (trace,) = logdir.glob("plugins/profile/*/*.trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    return sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")


def test_nnx_example_writes_summaries_every_20_steps_and_profiles_steps_10_to_12(
    examples_on_path, tmp_path
):
    example = importlib.import_module("nnx_digits")
    result = example.main(
        ["--steps", "40", "--batch-size", "96", "--logdir", str(tmp_path), "--profile"]
    )
    scalars = _scalars(tmp_path)
    assert sorted(scalars) == ["train/accuracy", "train/loss"]
    # The metrics over the 20 steps up to each summary: full batches, so the loss is the mean
    # of the steps' mean losses, and the accuracy k of 20 x 96 rows.
    assert sorted(scalars["train/loss"]) == [20, 40]
    for step, loss in scalars["train/loss"].items():
        assert loss == pytest.approx(np.mean(result.losses[step - 20 : step]), rel=1e-5)
    for step, accuracy in scalars["train/accuracy"].items():
        assert step in (20, 40)
        assert 0.0 <= accuracy <= 1.0
        rows = 20 * 96
        assert accuracy * rows == pytest.approx(round(accuracy * rows), abs=1e-2)
    assert _profiled_steps(tmp_path) == [10, 11, 12]


def test_nnx_example_traces_nothing_without_profile(examples_on_path, tmp_path):
    example = importlib.import_module("nnx_digits")
    example.main(["--steps", "20", "--batch-size", "96", "--logdir", str(tmp_path)])
    assert not (tmp_path / "plugins").exists()
    assert list(_scalars(tmp_path)["train/loss"]) == [20]


@pytest.mark.parametrize("logical_cores", [2, 4])
def test_model_parallel_example_matches_one_device(examples_on_path, logical_cores):
    example = importlib.import_module("model_parallel")
    error = example.main(["--steps", "5", "--logical-cores", str(logical_cores)])
    assert error < 1e-5


def test_quickstart_recovers_the_weights(capsys):
    """The README's quickstart (examples/quickstart.py) runs as written."""
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    assert capsys.readouterr().out.strip().endswith("[ 1.  -2.   0.5]")


def test_preemptible_example_resumes_where_it_stopped(examples_on_path, tmp_path):
    example = importlib.import_module("preemptible_digits")
    flags = ["--save-every", "5", "--batch-size", "96"]
    first = example.main(["--checkpoint-dir", str(tmp_path / "a"), "--steps", "10", *flags])
    resumed = example.main(["--checkpoint-dir", str(tmp_path / "a"), "--steps", "20", *flags])
    straight = example.main(["--checkpoint-dir", str(tmp_path / "b"), "--steps", "20", *flags])
    assert (first.first_step, resumed.first_step, straight.first_step) == (0, 10, 0)
    for got, want in zip(resumed.params, straight.params):
        np.testing.assert_allclose(got, want, rtol=1e-7)
    assert resumed.test_accuracy == straight.test_accuracy > 0.5


def test_gpt_fsdp_example_learns_with_less_memory_than_data_parallelism(examples_on_path):
    example = importlib.import_module("gpt_fsdp")
    steps = 12
    result = example.main(["--steps", str(steps), "--layers", "2", "--width", "32"])
    assert len(result.losses) == steps
    assert np.all(np.isfinite(result.losses))
    assert np.mean(result.losses[-3:]) < 0.5 * result.losses[0]
    assert 0 < result.sharded_bytes < result.data_parallel_bytes
