"""What weight-update sharding (``ts.shard_update``) saves in memory, and what it costs.

Workload: an MLP of ``--layers`` square ``--width`` layers (3 x 4096: 50.3M parameters) trained
with Adam through ``strategy.run``, in two forms: replicated (``all_reduce("mean", grads)``,
then ``optax.adam``) and sharded (the replica's own gradients into
``ts.shard_update(optax.adam)``). For each replica count in ``--replicas`` a subprocess
simulates that many CPU devices (``XLA_FLAGS``), compiles both train steps from abstract
arguments (nothing is trained or allocated) and reads, per device:

- argument bytes from the compiled program's ``memory_analysis()`` (parameters, optimizer
  state and the per-replica batch of ``--batch`` rows);
- the optimizer state's bytes from its layout (the shard every device holds);
- collective bytes from the optimized HLO (``collectives.count_collectives``), with the ring
  model's bytes sent per device: ``2 (R-1)/R N`` for an all-reduce of N bytes, ``(R-1)/R N`` for
  a reduce-scatter from N bytes or an all-gather to N bytes.

Then, on 8 simulated devices, the steady step rate of both forms on a small model
(``--rate-width``), over ``--rounds`` rounds of ``--steps`` steps that alternate the two forms;
the ratio is the median over rounds of sharded/replicated steps per second.

Prints a table and writes ``weight_update_sharding.json`` and ``.png`` into ``results/local/``
(``--record``: into the tracked ``results/``).

Usage: python benchmarks/weight_update_sharding.py  (about 15 s on 2 cores)
       python benchmarks/weight_update_sharding.py --width 1024 --replicas 8 64 --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

import _harness
import _results

_harness.prepare()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from collectives import count_collectives  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import tpustrat as ts  # noqa: E402


def init_params(width: int, layers: int, rng: np.random.Generator | None = None) -> dict:
    """The MLP's parameters; abstract (ShapeDtypeStruct) without ``rng``."""
    params = {}
    for i in range(layers):
        for name, shape in ((f"w{i}", (width, width)), (f"b{i}", (width,))):
            if rng is None:
                params[name] = jax.ShapeDtypeStruct(shape, jnp.float32)
            else:
                scale = 1 / math.sqrt(width) if name.startswith("w") else 0.0
                params[name] = (scale * rng.normal(size=shape)).astype(np.float32)
    return params


def loss(params: dict, batch: tuple) -> jax.Array:
    x, y = batch
    layers = len(params) // 2
    for i in range(layers):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        x = jnp.tanh(x) if i < layers - 1 else x
    return jnp.mean((x - y) ** 2)


def make_step(tx, sharded: bool):
    def step(params, opt_state, batch):
        grads = jax.grad(loss)(params, batch)
        if not sharded:
            grads = ts.get_replica_context().all_reduce("mean", grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def make_tx(sharded: bool):
    return ts.shard_update(optax.adam(1e-3)) if sharded else optax.adam(1e-3)


def batch_for(strategy: ts.TPUStrategy, rows: int, width: int, seed: int = 0):
    def component(ctx):
        rng = np.random.default_rng([seed, ctx.replica_id_in_sync_group])
        x = rng.normal(size=(rows, width)).astype(np.float32)
        return x, np.tanh(x[:, ::-1])

    return strategy.experimental_distribute_values_from_function(component)


def with_shardings(tree, strategy: ts.TPUStrategy):
    """ShapeDtypeStructs laid out as run returns them: PerReplica leaves over replicas."""
    replicated = NamedSharding(strategy.mesh, P())
    per_replica = NamedSharding(strategy.mesh, P("replica"))

    def place(node):
        if isinstance(node, ts.PerReplica):
            return jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=per_replica), node
            )
        return jax.ShapeDtypeStruct(node.shape, node.dtype, sharding=replicated)

    return jax.tree.map(place, tree, is_leaf=lambda x: isinstance(x, ts.PerReplica))


def per_device_bytes(tree) -> int:
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def ring_bytes(collectives: dict, replicas: int) -> float:
    """Bytes each device sends under the ring model, summed over the program's collectives."""
    share = (replicas - 1) / replicas
    sent = 0.0
    for kind, entry in collectives.items():
        if kind == "all-reduce":
            sent += 2 * share * entry["operand_bytes"]
        elif kind == "reduce-scatter":
            sent += share * entry["operand_bytes"]
        elif kind == "all-gather":
            sent += share * entry["result_bytes"]
        else:
            raise ValueError(f"unexpected collective {kind!r} in a data-parallel train step")
    return sent


def measure_compiled(width: int, layers: int, rows: int) -> dict:
    """Child process: compile both train steps on every device of this process; no training."""
    strategy = ts.TPUStrategy()
    replicas = strategy.num_replicas_in_sync
    params = with_shardings(init_params(width, layers), strategy)
    batch = batch_for(strategy, rows, width)
    result = {
        "replicas": replicas,
        "parameters": sum(math.prod(p.shape) for p in jax.tree.leaves(params)),
    }
    for form in ("replicated", "sharded"):
        tx = make_tx(form == "sharded")
        state = jax.eval_shape(lambda p, tx=tx: strategy.run(tx.init, args=(p,)), params)
        state = with_shardings(state, strategy)
        step = make_step(tx, form == "sharded")
        start = time.perf_counter()
        compiled = (
            jax.jit(lambda p, s, b, step=step: strategy.run(step, args=(p, s, b)))
            .lower(params, state, batch)
            .compile()
        )
        memory = compiled.memory_analysis()
        collectives = count_collectives(compiled.as_text(), replicas)
        result[form] = {
            "argument_bytes": int(memory.argument_size_in_bytes),
            "temp_bytes": int(memory.temp_size_in_bytes),
            "parameter_bytes": per_device_bytes(params),
            "state_bytes": per_device_bytes(state),
            "collectives": collectives,
            "collective_operand_bytes": sum(c["operand_bytes"] for c in collectives.values()),
            "ring_bytes_sent": ring_bytes(collectives, replicas),
            "compile_s": time.perf_counter() - start,
        }
    return result


def measure_step_rate(width: int, layers: int, rows: int, rounds: int, steps: int) -> dict:
    """Steady steps/s of both forms on this process's devices, in alternated rounds."""
    strategy = ts.TPUStrategy()
    params = strategy.replicate(init_params(width, layers, np.random.default_rng(0)))
    batch = batch_for(strategy, rows, width)
    forms = {}
    for form in ("replicated", "sharded"):
        tx = make_tx(form == "sharded")
        step = make_step(tx, form == "sharded")
        state = (params, strategy.run(tx.init, args=(params,)))
        for _ in range(3):  # compile and warm up
            state = strategy.run(step, args=(*state, batch))
        forms[form] = {"step": step, "state": jax.block_until_ready(state)}

    def steps_per_second(form: str) -> float:
        step, state = forms[form]["step"], forms[form]["state"]
        start = time.perf_counter()
        for _ in range(steps):
            state = strategy.run(step, args=(*state, batch))
        forms[form]["state"] = jax.block_until_ready(state)
        return steps / (time.perf_counter() - start)

    rates = _harness.alternate(
        {form: functools.partial(steps_per_second, form) for form in forms}, rounds
    )
    sharded = _harness.summarize(rates, "replicated", per_second=True)[1]
    return {
        "width": width,
        "layers": layers,
        "rows_per_replica": rows,
        "steps_per_round": steps,
        "steps_per_s": {form: float(np.median(r)) for form, r in rates.items()},
        "ratio_per_round": [s / r for s, r in zip(rates["sharded"], rates["replicated"])],
        "ratio": sharded["paired_ratio"],
    }


def run_child(replicas: int, args: argparse.Namespace) -> dict:
    command = [__file__, "--child", "--width", str(args.width)]
    command += ["--layers", str(args.layers), "--batch", str(args.batch)]
    return _harness.run_with_devices(replicas, command, args.timeout)


def mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def table(memory: list[dict], rate: dict) -> str:
    header = ["replicas", "layout", "argument MB/device", "optimizer state MB/device"]
    header += ["collective operand MB", "ring MB sent/device", "args vs replicated"]
    cells = []
    for row in memory:
        base = row["replicated"]["argument_bytes"]
        for form in ("replicated", "sharded"):
            entry = row[form]
            cells.append(
                [
                    row["replicas"],
                    form,
                    mb(entry["argument_bytes"]),
                    mb(entry["state_bytes"]),
                    mb(entry["collective_operand_bytes"]),
                    mb(entry["ring_bytes_sent"]),
                    f"{entry['argument_bytes'] / base:.3f}x",
                ]
            )
    steps = rate["steps_per_s"]
    return (
        f"{_harness.table(header, cells)}\n\n"
        f"step rate, {rate['layers']} x {rate['width']} MLP, 8 replicas: replicated "
        f"{steps['replicated']:.1f} steps/s, sharded {steps['sharded']:.1f} steps/s, "
        f"ratio {rate['ratio']:.3f} (median over rounds of "
        f"{', '.join(f'{r:.3f}' for r in rate['ratio_per_round'])})"
    )


def plot(memory: list[dict], title: str):
    """Argument and optimizer-state bytes per device against replicas, both layouts."""
    replicas = [row["replicas"] for row in memory]
    fig = _results.figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for form, marker in (("replicated", "o"), ("sharded", "s")):
        for key, style, what in (
            ("argument_bytes", "-", "arguments"),
            ("state_bytes", "--", "optimizer state"),
        ):
            values = [row[form][key] / 1e6 for row in memory]
            ax.plot(replicas, values, marker=marker, linestyle=style, label=f"{form}: {what}")
    first = memory[0]["replicated"]["state_bytes"] / 1e6
    ax.plot(replicas, [first / r for r in replicas], color="gray", linestyle=":", label="1/R")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(replicas, [str(r) for r in replicas])
    ax.set_xlabel("replicas (simulated devices)")
    ax.set_ylabel("MB per device")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="rows per replica")
    parser.add_argument("--replicas", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--rate-width", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per subprocess")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    _results.add_arguments(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_compiled(args.width, args.layers, args.batch)))
        return

    memory = [run_child(r, args) for r in args.replicas]
    rate = measure_step_rate(args.rate_width, args.layers, args.batch, args.rounds, args.steps)
    print(table(memory, rate))
    eight = next((row for row in memory if row["replicas"] == 8), memory[0])
    ratio = eight["sharded"]["argument_bytes"] / eight["replicated"]["argument_bytes"]
    print(
        f"\n{eight['parameters'] / 1e6:.1f}M-parameter Adam model on {eight['replicas']} "
        f"replicas: sharded arguments are {ratio:.3f}x the replicated ones"
    )
    title = (
        f"{eight['parameters'] / 1e6:.1f}M-parameter Adam MLP: bytes per device, "
        "replicated vs ts.shard_update"
    )
    data = _results.record(
        "weight_update_sharding",
        title,
        args={k: v for k, v in vars(args).items() if k != "child"},
        memory=memory,
        step_rate=rate,
        argument_ratio_at_8=ratio,
    )
    _results.write(data, args, plot(memory, title))


if __name__ == "__main__":
    main()
