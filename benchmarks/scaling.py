"""How tpustrat's host APIs, compile time and collective bytes scale from 8 to 1,024 devices.

Each device count runs in its own process with that many simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``). Per count it measures, best of a
few repeats:
  - strategy construction;
  - ``experimental_distribute_values_from_function``, ``experimental_local_results``,
    ``PerReplica.values``, ``reduce``, ``gather`` and one element of
    ``experimental_distribute_dataset``, for a per-replica value of 1,024 float32s, against a
    plain ``jax.device_put`` of the same bytes (the ratio column);
  - the first ``run`` of a train step (trace + compile) and the all-reduce bytes per device in
    its compiled program;
  - the bytes that cross between two slices per device: a flat all-reduce against tpustrat's
    hierarchical one (``TPUStrategy(num_slices=2)``), read from the compiled programs.
Prints a table, writes ``scaling.json`` and ``scaling.png`` into ``results/local/`` (``--record``:
into the tracked ``results/``).

Usage: python benchmarks/scaling.py [--devices 8 64 256 1024] [--record]  (about 2 minutes on 2
cores)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import _harness
import _results

_harness.prepare()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import tpustrat as ts  # noqa: E402

HOST_APIS = ("values_from_function", "local_results", "values", "reduce", "gather", "dataset")
GRADIENT_FLOATS = 131_072  # a 512 KiB gradient


def measure(num_devices: int) -> dict:
    """Runs in the child process, with ``num_devices`` simulated devices."""

    def best_ms(fn, repeats=3):
        jax.block_until_ready(fn())
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        return 1e3 * min(times)

    start = time.perf_counter()
    strategy = ts.TPUStrategy()
    record = {"devices": num_devices, "construct_ms": 1e3 * (time.perf_counter() - start)}
    host = np.ones((num_devices, 1024), np.float32)
    sharding = NamedSharding(strategy.mesh, P(ts.REPLICA_AXIS))
    record["device_put_ms"] = best_ms(lambda: jax.device_put(host, sharding))
    value = strategy.experimental_distribute_values_from_function(
        lambda ctx: host[ctx.replica_id_in_sync_group]
    )
    no_prefetch = ts.InputOptions(experimental_per_replica_buffer_size=0)
    apis = {
        "values_from_function": lambda: strategy.experimental_distribute_values_from_function(
            lambda ctx: host[ctx.replica_id_in_sync_group]
        ),
        "local_results": lambda: strategy.experimental_local_results(value),
        "values": lambda: value.values,
        "reduce": lambda: strategy.reduce("sum", value),
        "gather": lambda: strategy.gather(value, axis=0),
        "dataset": lambda: next(
            iter(strategy.experimental_distribute_dataset([host], no_prefetch))
        ),
    }
    for name, fn in apis.items():
        record[f"{name}_ms"] = best_ms(fn)

    def train_step(w, x):
        grad = jax.grad(lambda w: ((x @ w.reshape(1024, -1)) ** 2).mean())(w)
        return w - 0.1 * ts.get_replica_context().all_reduce("mean", grad)

    w = strategy.replicate(np.zeros(GRADIENT_FLOATS, np.float32))
    x = strategy.experimental_distribute_values_from_function(lambda ctx: np.ones((2, 1024)))
    start = time.perf_counter()
    jax.block_until_ready(strategy.run(train_step, args=(w, x)))
    record["first_step_s"] = time.perf_counter() - start
    record["all_reduce_bytes"] = _all_reduce_bytes(strategy, train_step, w, x)
    for name, slices in (("flat", 1), ("hierarchical", 2)):
        sliced = ts.TPUStrategy(num_slices=2) if slices == 2 else strategy
        crossing = _cross_slice_bytes(
            sliced, train_step, sliced.replicate(np.zeros(GRADIENT_FLOATS, np.float32)), x
        )
        record[f"cross_slice_bytes_{name}"] = crossing
    return record


def _compiled(strategy, step, *args) -> str:
    return jax.jit(lambda *a: strategy.run(step, args=a)).lower(*args).compile().as_text()


_COLLECTIVE = re.compile(
    r"= (\w+)\[([\d,]*)\]\S* (all-reduce|reduce-scatter)\(.*?replica_groups=(\S+?)(?:, |$)"
)
_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4}


def _collectives(text: str):
    for dtype, dims, kind, groups in _COLLECTIVE.findall(text):
        size = _ITEMSIZE.get(dtype, 4)
        for dim in filter(None, dims.split(",")):
            size *= int(dim)
        yield kind, size, groups


def _all_reduce_bytes(strategy, step, *args) -> int:
    return sum(size for kind, size, _ in _collectives(_compiled(strategy, step, *args)))


def _cross_slice_bytes(strategy, step, *args) -> int:
    """Result bytes per device of the all-reduces whose groups span both slices."""
    num_devices = len(strategy.mesh.devices.flat)
    total = 0
    for kind, size, groups in _collectives(_compiled(strategy, step, *args)):
        first = _first_group(groups, num_devices)
        if kind == "all-reduce" and min(first) < num_devices // 2 <= max(first):
            total += size
    return total


def _first_group(groups: str, num_devices: int) -> list[int]:
    """The devices of the first replica group, from any of XLA's spellings of them."""
    if groups.startswith("{{"):
        return [int(d) for d in groups[2:].split("}")[0].split(",")]
    iota = re.match(r"\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", groups)
    if iota:
        ids = np.arange(num_devices).reshape([int(d) for d in iota[3].split(",")])
        if iota[4]:
            ids = ids.transpose([int(d) for d in iota[4].split(",")])
        return ids.reshape(int(iota[1]), int(iota[2]))[0].tolist()
    return list(range(num_devices))  # {}: every device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    _results.add_arguments(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    rows = []
    for n in args.devices:
        rows.append(_harness.run_with_devices(n, [__file__, "--child", str(n)], timeout=900))
        print(f"measured {n} devices", file=sys.stderr)
    print(table(rows))
    workload = (
        f"host APIs on a per-replica value of 1,024 float32s, a {GRADIENT_FLOATS * 4:,}-byte "
        f"gradient all-reduce; simulated CPU devices {args.devices}, each count in its own process"
    )
    data = _results.record("scaling", workload, devices=args.devices, rows=rows)
    _results.write(data, args, plot(rows))


def table(rows: list[dict]) -> str:
    header = ["devices", "construct ms", "device_put ms"]
    header += [f"{api} ms (x put)" for api in HOST_APIS]
    header += ["first step s", "all-reduce B/device", "cross-slice B, flat", "hierarchical"]
    cells = []
    for r in rows:
        put = r["device_put_ms"]
        cells.append(
            [r["devices"], f"{r['construct_ms']:.0f}", f"{put:.2f}"]
            + [f"{r[f'{a}_ms']:.2f} ({r[f'{a}_ms'] / put:.1f}x)" for a in HOST_APIS]
            + [
                f"{r['first_step_s']:.2f}",
                f"{r['all_reduce_bytes']:,}",
                f"{r['cross_slice_bytes_flat']:,}",
                f"{r['cross_slice_bytes_hierarchical']:,}",
            ]
        )
    return _harness.table(header, cells)


def plot(rows: list[dict]):
    """Host API times against devices (left), and the bytes that cross slices (right)."""
    devices = [r["devices"] for r in rows]
    fig = _results.figure(figsize=(12, 4.5))
    left, right = fig.subplots(1, 2)
    for api in ("device_put", *HOST_APIS):
        left.plot(devices, [r[f"{api}_ms"] for r in rows], marker="o", label=api)
    right.plot(devices, [r["cross_slice_bytes_flat"] for r in rows], marker="o", label="flat")
    right.plot(
        devices,
        [r["cross_slice_bytes_hierarchical"] for r in rows],
        marker="o",
        label="hierarchical (num_slices=2)",
    )
    for ax, ylabel, title in (
        (left, "ms per call", "host APIs against a plain device_put"),
        (right, "bytes per device crossing slices", "a 512 KiB gradient all-reduce"),
    ):
        ax.set(xscale="log", yscale="log", xlabel="simulated devices", ylabel=ylabel, title=title)
        ax.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    main()
