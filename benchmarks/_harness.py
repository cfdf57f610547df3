"""What the benchmark scripts share: alternated rounds, medians and ratios, the record, the machine.

Not a benchmark itself. The scripts import it after they have set ``XLA_FLAGS`` (8 simulated
devices on a CPU-only host), since that must happen before jax is imported.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable

import jax


def machine() -> str:
    """The accelerator, or the CPU model and core count, for the record."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{jax.device_count()} x {device.device_kind}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


def alternate(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each variant's measurement in each round; the order rotates from round to round.

    Each callable runs one timed round and returns its measurement (seconds per step, say).
    Rotating the order (a b c, b c a, c a b, ...) spreads the machine's noise over all the
    variants alike. A garbage collection runs before each round, outside the timing, so that
    no variant pays for the garbage another one left.
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
    round's ratio, which cancels load that drifts between rounds.
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


def record(name: str, workload: str, **fields) -> dict:
    """The JSON record's common fields: command, machine, versions, date, load."""
    versions = {"jax": jax.__version__}
    for package in ("flax", "optax", "keras"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "benchmark": name,
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg()[0],
        "workload": workload,
        **fields,
    }


def write(name: str, data: dict, out: pathlib.Path) -> pathlib.Path:
    """Writes ``<out>/<name>.json`` (``out`` from ``_results.folder``); returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def pyplot():
    """matplotlib's pyplot without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Lays ``fig`` out, writes it to ``path`` as a PNG, and frees it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def keras_unavailable() -> str | None:
    """Why the Keras variant cannot run here, or None when it can."""
    try:
        import keras
    except ImportError:
        return "keras is not installed (pip install -e '.[bench]')"
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
