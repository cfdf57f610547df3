"""What crosses between replicas in one compiled step: collective ops and their bytes.

Compiles step_overhead's MLP train step (64-512-512-10, global batch 256) through
``strategy.run`` on the 8x1 and 4x2 meshes and counts the all-reduce, all-gather,
reduce-scatter, collective-permute and all-to-all instructions in the optimized HLO, with their
operand and result bytes per device, next to the gradient bytes (4 bytes per parameter). A second
step, prediction with ``ctx.all_gather`` of the logits, compares the gathered bytes with the
bytes of the global output (256 x 10 x 4). For reference, step_overhead's hand-written (b) and
auto-partitioned (c) train steps on 8x1. The counts depend only on the jax/XLA version, not on
the machine's load. Prints a table and writes ``collectives.json`` and ``collectives.png``
into ``results/local/`` (``--record``: into the tracked ``results/``).

Usage: python benchmarks/collectives.py  (about 10 s)
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

import _harness
import _results

_harness.prepare()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import step_overhead as workload  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import tpustrat as ts  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}  # and [suf]N: N / 8 bytes
_ARRAY = re.compile(r"\b(pred|bf16|c64|c128|[suf]\d+)\[([\d,]*)\]")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>\(.*?\)|\S+)\s+"
    r"(?P<opcode>[\w\-]+)\((?P<operands>[^)]*)\)(?P<attributes>.*)$"
)
_OPERAND = re.compile(r"%([\w.\-]+)")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape, e.g. ``f32[64,512]{1,0}`` or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        size = DTYPE_BYTES.get(dtype) or int(dtype[1:]) // 8
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def group_size(attributes: str, num_devices: int) -> int | None:
    """Devices per replica group, from either of XLA's spellings of ``replica_groups``."""
    if match := re.search(r"replica_groups=\{\{([\d,]*)\}", attributes):
        return len(match.group(1).split(","))
    if re.search(r"replica_groups=\{\}", attributes):
        return num_devices
    if match := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes):
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", match.group(1)))
        return math.prod(int(sizes[axis]) for axis in re.findall(r"'(\w+)'", match.group(2)))
    return None


def count_collectives(hlo: str, num_devices: int) -> dict[str, dict[str, Any]]:
    """Collective ops in compiled HLO text, by kind, with bytes per device.

    An async pair (``all-reduce-start`` / ``all-reduce-done``) counts as one op: the start
    contributes the operands, the done the result.
    """
    instructions = [m for m in map(_INSTRUCTION.match, hlo.splitlines()) if m]
    sizes = {m["name"]: shape_bytes(m["shape"]) for m in instructions}
    totals: dict[str, dict[str, Any]] = {}
    for m in instructions:
        opcode = m["opcode"]
        kind = opcode.removesuffix("-start").removesuffix("-done")
        if kind not in COLLECTIVES:
            continue
        entry = totals.setdefault(
            kind, {"ops": 0, "operand_bytes": 0, "result_bytes": 0, "group_size": None}
        )
        if not opcode.endswith("-done"):
            entry["ops"] += 1
            entry["operand_bytes"] += sum(sizes.get(n, 0) for n in _OPERAND.findall(m["operands"]))
            entry["group_size"] = group_size(m["attributes"], num_devices)
        if not opcode.endswith("-start"):
            entry["result_bytes"] += shape_bytes(m["shape"])
    return totals


def compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def tpustrat_programs(params, x, y) -> list[tuple[str, str, str, str, int]]:
    """(program, mesh, HLO, reference name, reference bytes) for the strategy.run steps."""
    gradient_bytes = sum(np.asarray(p).nbytes for p in jax.tree.leaves(params))
    output_bytes = workload.GLOBAL_BATCH * workload.SIZES[-1] * 4

    def predict_step(params, batch):
        logits = workload.predict(params, batch[0])
        return ts.get_replica_context().all_gather(logits, axis=0)

    programs = []
    for logical_cores in (1, 2):
        strategy = ts.TPUStrategy(num_logical_cores=logical_cores)
        mesh = f"{strategy.num_replicas_in_sync}x{logical_cores}"
        state = strategy.replicate(params)
        batch = workload.per_replica_batch(strategy, x, y)
        for name, step, reference, reference_bytes in [
            ("(a) train step, strategy.run", workload.tpustrat_step, "gradients", gradient_bytes),
            ("(a) predict + ctx.all_gather", predict_step, "gathered logits", output_bytes),
        ]:
            hlo = compiled_text(
                lambda s, b, step=step, strategy=strategy: strategy.run(step, args=(s, b)),
                state,
                batch,
            )
            programs.append((name, mesh, hlo, reference, reference_bytes))
    return programs


def reference_programs(params, x, y) -> list[tuple[str, str, str, str, int]]:
    """The hand-written (b) and auto-partitioned (c) train steps of step_overhead, on 8x1."""
    gradient_bytes = sum(np.asarray(p).nbytes for p in jax.tree.leaves(params))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replica",))
    args = (
        jax.device_put(params, NamedSharding(mesh, P())),
        jax.device_put(x, NamedSharding(mesh, P("replica"))),
        jax.device_put(y, NamedSharding(mesh, P("replica"))),
    )
    mesh_name = f"{jax.device_count()}x1"
    return [
        (
            "(b) train step, jit(shard_map)",
            mesh_name,
            compiled_text(workload.shard_map_step(mesh), *args),
            "gradients",
            gradient_bytes,
        ),
        (
            "(c) train step, jit + NamedSharding",
            mesh_name,
            compiled_text(workload.auto_step, *args),
            "gradients",
            gradient_bytes,
        ),
    ]


def plot(rows: list[dict], title: str):
    """Per program, the collectives' result bytes per device against the reference bytes."""
    labels = [f"{r['program']} {r['mesh']}\n{r['collective']} x{r['ops']}" for r in rows][::-1]
    measured = [r["result_bytes"] for r in rows][::-1]
    reference = [r["reference_bytes"] for r in rows][::-1]
    positions = np.arange(len(rows))
    fig = _results.figure(figsize=(9, 0.75 * len(rows) + 2))
    ax = fig.subplots()
    ax.barh(positions + 0.2, measured, height=0.4, label="collective result bytes per device")
    ax.barh(positions - 0.2, reference, height=0.4, label="reference bytes", color="#c0c0c0")
    for y, r in zip(positions, rows[::-1]):
        ax.text(
            r["result_bytes"] * 1.1, y + 0.2, f"{r['result_bytes']:,} B", va="center", fontsize=8
        )
        ax.text(
            r["reference_bytes"] * 1.1,
            y - 0.2,
            f"{r['reference']}: {r['reference_bytes']:,} B",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(positions, labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(right=max(measured + reference) * 30)
    ax.set_xlabel("bytes per device per step (log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _results.add_arguments(parser)
    args = parser.parse_args()
    params = jax.tree.map(np.asarray, workload.init_params(jax.random.key(0)))
    x, y = workload.global_batch()
    rows = []
    for program, mesh, hlo, reference, reference_bytes in tpustrat_programs(
        params, x, y
    ) + reference_programs(params, x, y):
        found = count_collectives(hlo, jax.device_count()) or {
            "none": {"ops": 0, "operand_bytes": 0, "result_bytes": 0, "group_size": None}
        }
        for kind, totals in found.items():
            rows.append(
                {
                    "program": program,
                    "mesh": mesh,
                    "collective": kind,
                    **totals,
                    "reference": reference,
                    "reference_bytes": reference_bytes,
                    "result_over_reference": totals["result_bytes"] / reference_bytes,
                }
            )
    title = (
        f"MLP {'-'.join(map(str, workload.SIZES))}, global batch {workload.GLOBAL_BATCH}, "
        f"{jax.device_count()} x {jax.devices()[0].platform}, jax {jax.__version__}"
    )
    print(title)
    header = ["program", "mesh", "collective", "ops", "group", "operand bytes", "result bytes"]
    header += ["reference", "reference bytes", "result / reference"]
    print(
        _harness.table(
            header,
            [
                [
                    r["program"],
                    r["mesh"],
                    r["collective"],
                    r["ops"],
                    r["group_size"] or "-",
                    f"{r['operand_bytes']:,}",
                    f"{r['result_bytes']:,}",
                    r["reference"],
                    f"{r['reference_bytes']:,}",
                    f"{r['result_over_reference']:.3f}",
                ]
                for r in rows
            ],
        )
    )
    _results.write(_results.record("collectives", title, rows=rows), args, plot(rows, title))


if __name__ == "__main__":
    main()
