"""How the benchmarks measure: devices, alternated rounds, summaries, in-flight loops, tables.

Not a benchmark itself. A script calls ``prepare()`` before it imports jax, since XLA reads the
simulated device count from ``XLA_FLAGS`` once, when jax starts; so this module imports jax
only inside the functions that dispatch. Where the records go is ``_results``.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, TypeVar

State = TypeVar("State")
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_NUMBER = re.compile(r"^([-+]?[\d.,]+|-|n/a)")


def prepare(devices: int = 8, environ: MutableMapping[str, str] = os.environ) -> None:
    """Sets up a benchmark's process; call it before importing jax.

    A CPU-only host simulates ``devices`` devices, unless ``XLA_FLAGS`` already sets a count;
    accelerators are not affected, and ``JAX_PLATFORMS`` stays as the user set it. Keras, where
    a script compares with it, runs on JAX unless ``KERAS_BACKEND`` says otherwise.

    Args:
        devices: how many CPU devices to simulate.
        environ: the environment to change.

    Example:
        >>> environ = {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=true"}
        >>> prepare(8, environ)
        >>> environ["XLA_FLAGS"]
        '--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=8'
        >>> prepare(4, environ)  # a count already set is kept
        >>> environ["XLA_FLAGS"].count("device_count")
        1
    """
    flags = environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG not in flags:
        environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={devices}".strip()
    environ.setdefault("KERAS_BACKEND", "jax")


def device_environment(devices: int, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """A copy of ``environ`` for a child process with ``devices`` simulated CPU devices.

    Any device count in ``XLA_FLAGS`` is replaced, the other flags kept; ``JAX_PLATFORMS``
    defaults to ``cpu``, so that the child simulates its devices on an accelerator host too.

    Example:
        >>> env = device_environment(64, {"XLA_FLAGS": f"{DEVICE_COUNT_FLAG}=8 --xla_dump_to=x"})
        >>> env["XLA_FLAGS"], env["JAX_PLATFORMS"]
        ('--xla_dump_to=x --xla_force_host_platform_device_count=64', 'cpu')
    """
    env = dict(environ)
    kept = [flag for flag in env.get("XLA_FLAGS", "").split() if DEVICE_COUNT_FLAG not in flag]
    env["XLA_FLAGS"] = " ".join([*kept, f"{DEVICE_COUNT_FLAG}={devices}"])
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def run_with_devices(devices: int, argv: Sequence[str], timeout: float) -> Any:
    """Runs ``python *argv`` with ``devices`` simulated CPU devices; returns its last line's JSON.

    Raises:
        RuntimeError: the child failed; the message ends with its standard error.

    Example:
        >>> run_with_devices(4, ["-c", "import os; print(os.environ['XLA_FLAGS'][-1])"], 60)
        4
    """
    done = subprocess.run(
        [sys.executable, *argv],
        env=device_environment(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode:
        raise RuntimeError(
            f"the {devices}-device child `python {' '.join(argv)}` exited with "
            f"{done.returncode}; its standard error ends:\n{done.stderr[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def alternate(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each variant's measurement in each round; the order rotates from round to round.

    Each callable runs one timed round and returns its measurement (seconds per step, say).
    Rotating the order (a b c, b c a, c a b, ...) spreads the machine's noise over all the
    variants alike. A garbage collection runs before each round, outside the timing, so that
    no variant pays for the garbage another one left.

    Example:
        >>> order = []
        >>> samples = alternate({n: lambda n=n: order.append(n) or len(order) for n in "abc"}, 2)
        >>> "".join(order), samples
        ('abcbca', {'a': [1, 6], 'b': [2, 4], 'c': [3, 5]})
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            samples[name].append(variants[name]())
    return samples


def summarize(samples: dict[str, list[float]], baseline: str, per_second: bool) -> list[dict]:
    """Per variant: the median, its ratio to ``baseline``'s, and the median of paired ratios.

    With ``per_second`` the samples are rates (higher is better) and a ratio above 1 means
    faster than the baseline; otherwise they are times, and the ratio is time over the
    baseline's time (above 1 means slower). The paired ratio is the median over rounds of each
    round's ratio, which cancels load that drifts between rounds; the spread is
    (max - min) / median.

    Example:
        >>> rows = summarize({"a": [2.0, 4.0], "b": [1.0, 4.0]}, "b", per_second=True)
        >>> [(r["variant"], r["median"], r["ratio"], r["paired_ratio"]) for r in rows]
        [('a', 3.0, 1.2, 1.5), ('b', 2.5, 1.0, 1.0)]
    """
    base = samples[baseline]
    rows = []
    for name, values in samples.items():
        rows.append(
            {
                "variant": name,
                "median": statistics.median(values),
                "ratio": statistics.median(values) / statistics.median(base),
                "paired_ratio": statistics.median(v / b for v, b in zip(values, base)),
                "spread": (max(values) - min(values)) / statistics.median(values),
                "rounds": values,
                "higher_is_better": per_second,
            }
        )
    return rows


def in_flight(
    step: Callable[[State], State],
    state: State,
    steps: int,
    window: int,
    ready: Callable[[State], Any] | None = None,
) -> State:
    """``state = step(state)``, ``steps`` times, with at most ``window`` steps in flight.

    The loop of a hand-written JAX program: each call returns before the devices finish, so
    after each call it waits for the call ``window`` places back to be done. Without a bound,
    XLA:CPU with simulated devices aborts on a collective rendezvous within a few hundred
    steps. At the end it waits for every call still in flight and for the whole state.

    Args:
        step: one dispatch, from one state to the next.
        state: the first state.
        steps: how many times to call ``step``.
        window: how many calls may be in flight.
        ready: from a state, an array that is ready when its call is done (a loss, say: one
            that nothing donates); by default the state's first leaf.

    Returns:
        The last state, ready.

    Example:
        >>> import jax.numpy as jnp
        >>> in_flight(lambda x: x + 1, jnp.zeros(()), steps=5, window=2)
        Array(5., dtype=float32)
    """
    import jax

    ready = ready or (lambda out: jax.tree.leaves(out)[0])
    pending = collections.deque()
    for _ in range(steps):
        state = step(state)
        pending.append(ready(state))
        if len(pending) > window:
            pending.popleft().block_until_ready()
    for output in pending:
        output.block_until_ready()
    return jax.block_until_ready(state)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, padded to read in a terminal; columns of numbers align right.

    Cells are printed with ``str``: format numbers before. A column is numeric when each of
    its cells starts with a number (or is ``-`` or ``n/a``).

    Example:
        >>> print(table(["variant", "steps/s"], [["(a) run", "133.4"], ["(b)", "97.0"]]))
        | variant | steps/s |
        | :--- | ---: |
        | (a) run |   133.4 |
        | (b)     |    97.0 |
    """
    cells = [[str(cell) for cell in row] for row in rows]
    columns = list(zip(header, *cells, strict=True))
    widths = [max(map(len, column)) for column in columns]
    numeric = [all(_NUMBER.match(cell) for cell in column[1:]) for column in columns]

    def line(row: Sequence[str]) -> str:
        padded = (
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, numeric)
        )
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("---:" if right else ":---" for right in numeric) + " |"
    return "\n".join([line(header), rule, *map(line, cells)])


def summary_table(
    rows: Sequence[dict], median: str, columns: Mapping[str, Callable[[dict], object]] = {}
) -> str:
    """``summarize``'s rows as a table: variant, median, ratio, paired ratio, spread, ``columns``.

    Args:
        rows: from ``summarize``.
        median: the median's column name, e.g. ``"steps/s"``.
        columns: more columns: name -> the cell for a row.

    Example:
        >>> rows = summarize({"(a)": [2.0, 4.0], "(b)": [1.0, 4.0]}, "(b)", per_second=True)
        >>> print(summary_table(rows, "steps/s", {"best": lambda row: max(row["rounds"])}))
        | variant | steps/s | ratio | paired ratio | spread | best |
        | :--- | ---: | ---: | ---: | ---: | ---: |
        | (a)     |     3.0 | 1.200 |        1.500 |   0.67 |  4.0 |
        | (b)     |     2.5 | 1.000 |        1.000 |   1.20 |  4.0 |
    """
    header = ["variant", median, "ratio", "paired ratio", "spread", *columns]
    cells = [
        [
            row["variant"],
            f"{row['median']:,.1f}",
            f"{row['ratio']:.3f}",
            f"{row['paired_ratio']:.3f}",
            f"{row['spread']:.2f}",
            *(cell(row) for cell in columns.values()),
        ]
        for row in rows
    ]
    return table(header, cells)


def keras_unavailable() -> str | None:
    """Why the Keras variant cannot run here, or None when it can.

    Example:
        >>> keras_unavailable() is None or "keras" in keras_unavailable().lower()
        True
    """
    try:
        import keras
    except ImportError as error:
        return f"keras cannot be imported ({error}); pip install -e '.[bench]'"
    if keras.backend.backend() != "jax":
        return f"KERAS_BACKEND is {keras.backend.backend()!r}; unset it or set it to 'jax'"
    return None


def keras_window(keras, window: int):
    """A Keras callback that keeps at most ``window`` steps in flight and times the fit.

    Left alone, ``fit`` dispatches steps without bound, and with simulated CPU devices XLA
    aborts on a collective rendezvous timeout within a few hundred steps. As an ``async_safe``
    callback, the batch-end hook runs on Keras's worker thread once that step's logs are ready;
    the batch-begin hook waits for it. ``seconds`` is the time from train begin to train end.
    """

    class Window(keras.callbacks.Callback):
        async_safe = True

        def on_train_begin(self, logs=None):
            self.finished, self.ready = 0, threading.Condition()
            self.start = time.perf_counter()

        def on_train_batch_begin(self, batch, logs=None):
            with self.ready:
                self.ready.wait_for(lambda: self.finished >= batch - window)

        def on_train_batch_end(self, batch, logs=None):
            with self.ready:
                self.finished += 1
                self.ready.notify()

        def on_train_end(self, logs=None):
            self.seconds = time.perf_counter() - self.start

    return Window()
