"""The benchmark harness: device set-up, alternation, summaries, the in-flight loop, tables,
and that every benchmark script measures and records through it."""

import argparse
import ast
import doctest
import itertools
import json
import pathlib

import _harness
import _results
import numpy as np
import pytest

SCRIPTS = sorted(
    path
    for path in pathlib.Path(__file__).parent.glob("*.py")
    if not path.name.startswith(("_", "test_"))
)


@pytest.mark.parametrize("module", [_harness, _results], ids=lambda m: m.__name__)
def test_examples(module):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder(exclude_empty=True).find(module):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} examples failed in {module.__name__}"


@pytest.mark.parametrize(
    "before, after",
    [
        ({}, "--xla_force_host_platform_device_count=8"),
        (
            {"XLA_FLAGS": "--xla_dump_to=x"},
            "--xla_dump_to=x --xla_force_host_platform_device_count=8",
        ),
        ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, None),
    ],
)
def test_prepare_sets_a_device_count_only_where_none_is_set(before, after):
    environ = dict(before, JAX_PLATFORMS="tpu", KERAS_BACKEND="torch")
    _harness.prepare(8, environ)
    assert environ["XLA_FLAGS"] == (after or before["XLA_FLAGS"])
    assert environ["JAX_PLATFORMS"] == "tpu"  # the user's platform is honoured
    assert environ["KERAS_BACKEND"] == "torch"
    fresh = dict(before)
    _harness.prepare(8, fresh)
    assert fresh["KERAS_BACKEND"] == "jax"
    assert "JAX_PLATFORMS" not in fresh


@pytest.mark.parametrize("platforms", [None, "cpu", "tpu"])
def test_device_environment_replaces_the_count_and_keeps_the_rest(platforms):
    environ = {"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=8 --b=2", "HOME": "/h"}
    if platforms:
        environ["JAX_PLATFORMS"] = platforms
    env = _harness.device_environment(256, environ)
    assert env["XLA_FLAGS"] == "--a=1 --b=2 --xla_force_host_platform_device_count=256"
    assert env["JAX_PLATFORMS"] == (platforms or "cpu")
    assert env["HOME"] == "/h"
    assert environ["XLA_FLAGS"].endswith("=8 --b=2")  # the parent's is unchanged


def test_run_with_devices_reports_a_failing_child():
    with pytest.raises(RuntimeError, match=r"(?s)4-device child .* exited with 3.*boom"):
        _harness.run_with_devices(
            4, ["-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"], 60
        )
    with pytest.raises(RuntimeError, match="boom"):
        _harness.run_with_devices(4, ["-c", "raise SystemExit('boom')"], 60)


@pytest.mark.parametrize("variants, rounds", [(1, 3), (2, 5), (3, 7), (4, 4)])
def test_alternate_rotates_the_order_each_round(variants, rounds):
    names = "abcd"[:variants]
    order = []
    samples = _harness.alternate(
        {n: lambda n=n: order.append(n) or len(order) for n in names}, rounds
    )
    for index in range(rounds):
        shift = index % variants
        played = order[index * variants : (index + 1) * variants]
        assert played == list(names[shift:] + names[:shift])
    for name in names:
        assert samples[name] == [k + 1 for k, played in enumerate(order) if played == name]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("per_second", [True, False])
def test_summarize_against_numpy(seed, per_second):
    rng = np.random.default_rng(seed)
    rounds = int(rng.integers(1, 10))
    samples = {name: list(rng.uniform(0.5, 2.0, rounds)) for name in ("a", "b", "c")}
    rows = _harness.summarize(samples, "b", per_second)
    assert [row["variant"] for row in rows] == ["a", "b", "c"]
    for row in rows:
        values = np.array(samples[row["variant"]])
        base = np.array(samples["b"])
        np.testing.assert_allclose(row["median"], np.median(values))
        np.testing.assert_allclose(row["ratio"], np.median(values) / np.median(base))
        np.testing.assert_allclose(row["paired_ratio"], np.median(values / base))
        np.testing.assert_allclose(row["spread"], np.ptp(values) / np.median(values))
        assert row["rounds"] == samples[row["variant"]]
        assert row["higher_is_better"] is per_second


class Token:
    """Stands for a dispatched call's output: ``block_until_ready`` marks the call done."""

    def __init__(self, log: list["Token"]):
        self.done = False
        self.in_flight_before = sum(not token.done for token in log)
        log.append(self)

    def block_until_ready(self):
        self.done = True
        return self


@pytest.mark.parametrize("steps, window", list(itertools.product([0, 1, 2, 7, 20], [1, 2, 4])))
def test_in_flight_keeps_at_most_window_calls_in_flight(steps, window):
    log: list[Token] = []
    states = []

    def step(state):
        states.append(state)
        return (state[0] + 1, Token(log))

    last = _harness.in_flight(step, (0, None), steps, window, ready=lambda state: state[1])
    assert last[0] == steps
    assert states == [(k, log[k - 1] if k else None) for k in range(steps)]
    assert [token.in_flight_before for token in log] == [min(k, window) for k in range(steps)]
    assert all(token.done for token in log)  # the last state's too: the loop ends ready


def test_in_flight_waits_on_the_first_leaf_by_default():
    jnp = pytest.importorskip("jax.numpy")
    state = {"count": jnp.zeros(()), "total": jnp.ones(3)}
    last = _harness.in_flight(
        lambda s: {"count": s["count"] + 1, "total": s["total"] * 2}, state, steps=6, window=2
    )
    np.testing.assert_allclose(last["count"], 6)
    np.testing.assert_allclose(last["total"], [64, 64, 64])


def test_table_aligns_numbers_right_and_text_left():
    text = _harness.table(
        ["program", "mesh", "bytes", "ratio"],
        [["(a) train", "8x1", "1,204,264", "1.000"], ["(b) predict", "4x2", "-", "n/a"]],
    )
    assert text.splitlines() == [
        "| program     | mesh |     bytes | ratio |",
        "| :--- | ---: | ---: | ---: |",
        "| (a) train   |  8x1 | 1,204,264 | 1.000 |",
        "| (b) predict |  4x2 |         - |   n/a |",
    ]


def test_table_refuses_a_row_of_the_wrong_length():
    with pytest.raises(ValueError):
        _harness.table(["a", "b"], [["1", "2", "3"]])


def test_every_script_uses_the_harness():
    """No script sets up devices, keeps calls in flight, starts children or writes files itself."""
    own = {
        "environ": "changes the environment (use _harness.prepare or device_environment)",
        "subprocess": "starts a child (use _harness.run_with_devices)",
        "deque": "keeps calls in flight (use _harness.in_flight)",
        "write_text": "writes a file (use _results.write)",
        "savefig": "saves a figure (use _results.write)",
        "matplotlib": "imports matplotlib (use _results.figure)",
        "datetime": "dates its own record (use _results.record)",
    }
    found = []
    for path in SCRIPTS:
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names.update(alias.name.split(".")[0] for alias in node.names)
                names.add((getattr(node, "module", None) or "").split(".")[0])
        found += [f"{path.name} {why}" for name, why in own.items() if name in names]
        calls = [ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)]
        if "_harness.prepare" not in calls:
            found.append(f"{path.name} does not call _harness.prepare")
        if "_results.write" not in calls:
            found.append(f"{path.name} does not write through _results.write")
    assert SCRIPTS and not found, "\n".join(found)


def test_write_puts_the_record_and_the_figure_in_the_chosen_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(_results, "RECORDED", tmp_path / "results")
    saved: list[object] = []

    class Figure:
        def tight_layout(self):
            saved.append("laid out")

        def savefig(self, path, dpi):
            saved.append((path, dpi))

    for options, where in [
        ({"record": False, "out": None}, tmp_path / "results" / "local"),
        ({"record": True, "out": None}, tmp_path / "results"),
        ({"record": True, "out": str(tmp_path / "elsewhere")}, tmp_path / "elsewhere"),
    ]:
        saved.clear()
        data = {"benchmark": "example", "rows": [{"median": 1.5}]}
        path = _results.write(data, argparse.Namespace(**options), Figure())
        assert path == where / "example.json"
        assert json.loads(path.read_text()) == data
        assert saved == ["laid out", (where / "example.png", 120)]


def test_record_fields_replace_the_common_ones():
    data = _results.record("example", "a workload", devices=[8, 64], rows=[])
    assert data["devices"] == [8, 64]
    assert data["benchmark"] == "example" and data["workload"] == "a workload"
    assert {"command", "machine", "versions", "date", "load_average"} <= set(data)
    assert "jax" in data["versions"]
