"""A benchmark's record: where it goes, what it holds, and the one writer of its JSON and PNG.

By default into ``benchmarks/results/local/``, which git ignores, so a run never dirties the
clone; ``--record`` writes into the tracked ``benchmarks/results/`` that benchmarks/README.md
quotes (``make bench RECORD=1``); ``--out DIR`` anywhere else. jax is imported only by the
functions that describe the machine, after the script has set its devices up (``_harness``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import sys
from typing import Any

RECORDED = pathlib.Path(__file__).resolve().parent / "results"
VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "keras")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--record`` and ``--out``, the options that choose the record's folder.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_arguments(parser)
        >>> parser.parse_args(["--record"]).record
        True
    """
    parser.add_argument(
        "--record",
        action="store_true",
        help="write into the tracked benchmarks/results/ (default: benchmarks/results/local/)",
    )
    parser.add_argument("--out", help="write into this folder instead")


def folder(args: argparse.Namespace) -> pathlib.Path:
    """The folder named by the arguments, created if missing.

    Example:
        >>> folder(argparse.Namespace(record=False, out=None)) == RECORDED / "local"
        True
    """
    out = pathlib.Path(args.out) if args.out else RECORDED if args.record else RECORDED / "local"
    out.mkdir(parents=True, exist_ok=True)
    return out


def machine() -> str:
    """The accelerator, or the CPU model and core count, for the record.

    Example:
        >>> "cores" in machine() or " x " in machine()
        True
    """
    import jax

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


def versions() -> dict[str, str]:
    """The installed versions of jax and the libraries the benchmarks compare with.

    Example:
        >>> "jax" in versions()
        True
    """
    found = {}
    for package in VERSIONED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def record(name: str, workload: str, **fields: Any) -> dict[str, Any]:
    """A record: the common fields (command, machine, devices, versions, date, load), then
    ``fields``, which may replace any of them.

    Args:
        name: the benchmark's name, which is also the name of its files.
        workload: one line that says what was measured.
        **fields: the measurements.

    Returns:
        The record, ready for ``write``.

    Example:
        >>> data = record("example", "a tiny workload", rows=[{"variant": "(a)"}])
        >>> data["benchmark"], data["workload"], data["rows"]
        ('example', 'a tiny workload', [{'variant': '(a)'}])
    """
    import jax

    return {
        "benchmark": name,
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "versions": versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg()[0],
        "workload": workload,
        **fields,
    }


def figure(**options: Any):
    """A matplotlib figure for ``write``, drawn without pyplot or a display.

    Args:
        **options: ``matplotlib.figure.Figure``'s, e.g. ``figsize=(9, 4)``; draw on it with
            ``fig.subplots()``.
    """
    from matplotlib.figure import Figure

    return Figure(**options)


def write(data: dict[str, Any], args: argparse.Namespace, figure=None) -> pathlib.Path:
    """Writes ``<name>.json`` and, given a figure, ``<name>.png`` into the folder of ``args``.

    Args:
        data: a record from ``record``; its ``benchmark`` field names the files.
        args: the parsed options of ``add_arguments``.
        figure: a figure from ``figure``, laid out and saved here; or None.

    Returns:
        The JSON file's path.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> path = write({"benchmark": "example"}, argparse.Namespace(out=out))
        wrote .../example.json
        >>> json.loads(path.read_text())
        {'benchmark': 'example'}
    """
    path = folder(args) / f"{data['benchmark']}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    if figure is None:
        print(f"wrote {path}")
        return path
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return path
