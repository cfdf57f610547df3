"""The largest model whose train step fits a per-device memory budget, for three layouts.

Workload: a stack of ``--layers`` residual MLP blocks (``h + gelu(h @ w1 + b1) @ w2 + b2``,
``w1`` of ``--width`` x 4 ``--width``), scanned with ``lax.scan`` over the layer axis, each
block under ``jax.checkpoint``; Adam in f32; ``--batch`` rows per replica; 8 replicas.
Three layouts of the same train step, each through ``strategy.run`` inside one ``jax.jit`` that
donates the parameters and the optimizer state:

- (a) plain data parallelism: whole parameters and Adam state on every device, gradients
  all-reduced (``all_reduce("mean")``), ``optax.adam``;
- (b) ``ts.shard_update(optax.adam)``: whole parameters, the optimizer state cut over the
  replicas;
- (c) ``ts.shard_params`` + ``ts.shard_update``: parameters and optimizer state cut over the
  replicas, each block's weights gathered inside the scan (``ts.gather_params``), one layer
  whole at a time.

Each step is compiled from abstract arguments (nothing is allocated), and its bytes per device
are the compiled program's ``memory_analysis()``: argument + output + temp - alias (the donated
inputs that the outputs overwrite count once). The search is over the number of layers
(bisection guided by the bytes' slope) for the largest stack within ``--budget-gb`` per device.

Then, at one model size (``--collective-layers``), the collective bytes per step of each
layout: the operand and result bytes of the all-reduce, all-gather and reduce-scatter ops of
``compiled.as_text()``, those in a scan's loop body counted once per layer, and the ring
model's bytes sent per device (``2 (R-1)/R N`` per all-reduce of N bytes, ``(R-1)/R N`` per
reduce-scatter from or all-gather to N bytes). And the step rate of the three layouts on a
mid-size model (``--rate-width``, ``--rate-layers``), trained side by side in alternated
rounds.

Prints a table and writes ``largest_model.json`` and ``.png`` into ``results/local/``
(``--record``: into the tracked ``results/``).

Usage: python benchmarks/largest_model.py  (a few minutes on 2 cores)
       python benchmarks/largest_model.py --width 256 --budget-gb 0.25 --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import time

import _harness
import _results

_harness.prepare()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from collectives import count_collectives  # noqa: E402
from weight_update_sharding import ring_bytes, with_shardings  # noqa: E402

import tpustrat as ts  # noqa: E402

LAYOUTS = ("data parallel", "shard_update", "shard_params")
GB = 1e9


def init_params(width: int, layers: int, rng: np.random.Generator | None = None) -> dict:
    """The block stack's parameters, stacked on a leading layer axis; abstract without ``rng``."""
    hidden = 4 * width
    shapes = {
        "w1": (layers, width, hidden),
        "b1": (layers, hidden),
        "w2": (layers, hidden, width),
        "b2": (layers, width),
    }
    if rng is None:
        return {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in shapes.items()}
    scale = {"w1": 1 / math.sqrt(width), "w2": 1 / math.sqrt(hidden), "b1": 0.0, "b2": 0.0}
    return {
        name: (scale[name] * rng.normal(size=shape)).astype(np.float32)
        for name, shape in shapes.items()
    }


def loss(params: dict, batch: tuple, gather) -> jax.Array:
    x, y = batch

    def block(h, p):
        p = gather(p)  # (c): this layer's weights whole, and only this layer's
        return h + jax.nn.gelu(h @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"], None

    h, _ = jax.lax.scan(jax.checkpoint(block), x, params)
    return jnp.mean((h - y) ** 2)


def make_tx(layout: str):
    tx = optax.adam(1e-4)
    return tx if layout == "data parallel" else ts.shard_update(tx)


def make_step(layout: str):
    tx = make_tx(layout)
    gather = ts.gather_params if layout == "shard_params" else (lambda p: p)

    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch, gather)
        if layout == "data parallel":
            grads = ts.get_replica_context().all_reduce("mean", grads)
        # (b) the replica's own gradients, (c) the blocks' gradients (reduce-scattered)
        updates, opt_state = tx.update(grads, opt_state, params)
        value = ts.get_replica_context().all_reduce("mean", value)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def compiled_step(strategy: ts.TPUStrategy, layout: str):
    step = make_step(layout)
    return jax.jit(lambda p, s, b: strategy.run(step, args=(p, s, b)), donate_argnums=(0, 1))


def sharded_layout(params: dict, strategy: ts.TPUStrategy) -> dict:
    """``ts.shard_params``'s layout of abstract ``params``: each leaf of rank >= 2 a
    ``ts.ReplicaShard`` cut along its last axis, zero-padded to a multiple of the replicas.

    ``ts.shard_params`` and ``ts.PerReplica.from_stacked`` take arrays only, so the abstract
    blocks go in through the pytree protocol (``tree_unflatten``), as JAX itself rebuilds these
    nodes around placeholders; ``check_layout`` compares the result with ``ts.shard_params``'s.
    """
    replicas = strategy.num_replicas_in_sync
    per_replica = jax.tree.structure(ts.PerReplica.from_stacked(np.zeros(replicas)))

    def shard(leaf):
        if leaf.ndim < 2:
            return leaf
        *lead, last = leaf.shape
        block = jax.ShapeDtypeStruct((replicas, *lead, -(-last // replicas)), leaf.dtype)
        blocks = jax.tree.unflatten(per_replica, [block])
        return ts.ReplicaShard.tree_unflatten((leaf.shape, leaf.ndim - 1), (blocks,))

    return jax.tree.map(shard, params)


def check_layout(strategy: ts.TPUStrategy) -> None:
    """Fails unless ``sharded_layout`` matches ``ts.shard_params`` on a small real model."""
    params = init_params(12, 3, np.random.default_rng(0))
    want = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ts.shard_params(params, strategy)
    )
    got = sharded_layout(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), strategy
    )
    if jax.tree.structure(got) != jax.tree.structure(want) or jax.tree.leaves(
        got
    ) != jax.tree.leaves(want):
        raise RuntimeError(
            f"the abstract layout {got} differs from ts.shard_params's {want}; update "
            "sharded_layout to ts.shard_params's layout rules"
        )


def abstract_arguments(strategy: ts.TPUStrategy, layout: str, width: int, layers: int, rows: int):
    params = init_params(width, layers)
    if layout == "shard_params":
        params = sharded_layout(params, strategy)
    params = with_shardings(params, strategy)
    tx = make_tx(layout)
    state = jax.eval_shape(lambda p: strategy.run(tx.init, args=(p,)), params)
    return params, with_shardings(state, strategy), make_batch(strategy, width, rows)


def make_batch(strategy: ts.TPUStrategy, width: int, rows: int):
    """One global batch of ``rows`` per replica (small: real arrays), inputs and targets."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(strategy.num_replicas_in_sync * rows, width)).astype(np.float32)
    return next(iter(strategy.experimental_distribute_dataset([(x, np.tanh(x[:, ::-1]))])))


def parameter_count(width: int, layers: int) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(init_params(width, layers)))


def measure(strategy: ts.TPUStrategy, layout: str, width: int, layers: int, rows: int) -> dict:
    """The compiled step's bytes per device: argument + output + temp - alias."""
    start = time.perf_counter()
    arguments = abstract_arguments(strategy, layout, width, layers, rows)
    compiled = compiled_step(strategy, layout).lower(*arguments).compile()
    memory = compiled.memory_analysis()
    fields = {
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
    }
    total = (
        fields["argument_bytes"]
        + fields["output_bytes"]
        + fields["temp_bytes"]
        - fields["alias_bytes"]
    )
    return {
        "layers": layers,
        "parameters": parameter_count(width, layers),
        "bytes_per_device": total,
        **fields,
        "compile_s": round(time.perf_counter() - start, 2),
    }


def largest(measure_layers, budget: float, start: int) -> tuple[dict, dict, list[dict]]:
    """The largest layer count whose bytes fit ``budget``, the smallest that does not, and
    every probe: integer bisection whose probe follows the bytes' slope between the bounds."""
    probes: dict[int, dict] = {}

    def probe(layers: int) -> dict:
        if layers not in probes:
            probes[layers] = measure_layers(layers)
            print(
                f"  {layers:5d} layers: {probes[layers]['bytes_per_device'] / GB:.3f} GB/device",
                flush=True,
            )
        return probes[layers]

    if probe(1)["bytes_per_device"] > budget:
        raise ValueError(
            f"one layer takes {probes[1]['bytes_per_device'] / GB:.3f} GB per device, over the "
            f"{budget / GB:.3f} GB budget; pass a smaller --width or a larger --budget-gb"
        )
    low, high = 1, max(2, start)
    while probe(high)["bytes_per_device"] <= budget:
        low, high = high, 2 * high
    while high - low > 1:
        low_bytes, high_bytes = probes[low]["bytes_per_device"], probes[high]["bytes_per_device"]
        slope = (high_bytes - low_bytes) / (high - low)
        guess = low + int((budget - low_bytes) // slope)
        # the slope's guess and the one past it bracket an affine answer in two compiles
        candidates = [layers for layers in (guess, guess + 1) if low < layers < high]
        middle = candidates[0] if candidates else (low + high) // 2
        if probe(middle)["bytes_per_device"] <= budget:
            low = middle
        else:
            high = middle
    return probes[low], probes[high], [probes[k] for k in sorted(probes)]


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(")
_WHILE = re.compile(r"\bwhile\(.*\bbody=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def executed_collectives(hlo: str, replicas: int) -> dict:
    """``count_collectives`` of each computation times how often one step runs it: once for
    the entry, the trip count for a while loop's body (the scans over layers, forward and
    backward). A collective anywhere else raises: its count would be a guess."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if match := _COMPUTATION.match(line):
            current = match.group(1)
            computations[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None:
            computations[current].append(line)
    runs = {entry: 1}
    pending = [entry]
    while pending:
        name = pending.pop()
        for line in computations[name]:
            if (body := _WHILE.search(line)) and (trip := _TRIP_COUNT.search(line)):
                runs[body.group(1)] = runs[name] * int(trip.group(1))
                pending.append(body.group(1))
    totals: dict[str, dict] = {}
    for name, lines in computations.items():
        found = count_collectives("\n".join(lines), replicas)
        if found and name not in runs:
            raise ValueError(
                f"collectives {sorted(found)} in computation {name}, neither the entry nor a "
                "while loop's body with a known trip count; count them by hand"
            )
        for kind, entry_counts in found.items():
            total = totals.setdefault(
                kind, {"ops": 0, "operand_bytes": 0, "result_bytes": 0, "group_size": None}
            )
            for field in ("ops", "operand_bytes", "result_bytes"):
                total[field] += runs[name] * entry_counts[field]
            total["group_size"] = entry_counts["group_size"]
    return totals


def collective_bytes(strategy: ts.TPUStrategy, width: int, layers: int, rows: int) -> dict:
    """Each layout's collectives per step at one model size, as its program runs them."""
    replicas = strategy.num_replicas_in_sync
    result = {}
    for layout in LAYOUTS:
        arguments = abstract_arguments(strategy, layout, width, layers, rows)
        hlo = compiled_step(strategy, layout).lower(*arguments).compile().as_text()
        found = executed_collectives(hlo, replicas)
        result[layout] = {
            "collectives": found,
            "operand_and_result_bytes": sum(
                c["operand_bytes"] + c["result_bytes"] for c in found.values()
            ),
            "ring_bytes_sent": ring_bytes(found, replicas),
        }
    return {
        "width": width,
        "layers": layers,
        "parameters": parameter_count(width, layers),
        **result,
    }


def step_rate(strategy: ts.TPUStrategy, args: argparse.Namespace) -> dict:
    """Steps/s of the three layouts on one model, trained side by side in alternated rounds."""
    width, layers, rows = args.rate_width, args.rate_layers, args.batch
    params = init_params(width, layers, np.random.default_rng(0))
    batch = make_batch(strategy, width, rows)
    states, steps = {}, {}
    for layout in LAYOUTS:
        if layout == "shard_params":
            placed = ts.shard_params(params, strategy)
        else:
            placed = strategy.replicate(params)
        opt_state = strategy.run(make_tx(layout).init, args=(placed,))
        steps[layout] = compiled_step(strategy, layout)
        state = (placed, opt_state, None)
        for _ in range(3):  # compile and warm up
            state = steps[layout](state[0], state[1], batch)
        states[layout] = jax.block_until_ready(state)

    def steps_per_second(layout: str) -> float:
        start = time.perf_counter()
        states[layout] = _harness.in_flight(
            lambda state: steps[layout](state[0], state[1], batch),
            states[layout],
            args.steps,
            window=2,
            ready=lambda state: state[2],
        )
        return args.steps / (time.perf_counter() - start)

    rates = _harness.alternate(
        {layout: functools.partial(steps_per_second, layout) for layout in LAYOUTS}, args.rounds
    )
    losses = {layout: float(states[layout][2]) for layout in LAYOUTS}
    return {
        "width": width,
        "layers": layers,
        "parameters": parameter_count(width, layers),
        "steps_per_round": args.steps,
        "rows": _harness.summarize(rates, "data parallel", per_second=True),
        "last_loss": losses,
    }


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def report(found: dict, collectives: dict, rate: dict, budget: float) -> str:
    base = found["data parallel"]["fits"]
    header = ["layout", "layers", "parameters", "MB/device", "next size MB/device"]
    header += ["params vs data parallel"]
    cells = [
        [
            layout,
            entry["fits"]["layers"],
            f"{entry['fits']['parameters'] / 1e6:,.1f}M",
            mb(entry["fits"]["bytes_per_device"]),
            mb(entry["over"]["bytes_per_device"]),
            f"{entry['fits']['parameters'] / base['parameters']:.2f}x",
        ]
        for layout, entry in found.items()
    ]
    plain = collectives["data parallel"]
    collective_cells = [
        [
            layout,
            ", ".join(
                f"{kind} x{c['ops']}" for kind, c in collectives[layout]["collectives"].items()
            ),
            mb(collectives[layout]["operand_and_result_bytes"]),
            mb(collectives[layout]["ring_bytes_sent"]),
            f"{collectives[layout]['ring_bytes_sent'] / plain['ring_bytes_sent']:.2f}x",
        ]
        for layout in LAYOUTS
    ]
    rate_columns = {
        "ms/step": lambda row: f"{1000 / row['median']:,.0f}",
        "last loss": lambda row: f"{rate['last_loss'][row['variant']]:.4f}",
    }
    return "\n\n".join(
        [
            f"largest model within {budget / GB:g} GB per device:\n"
            + _harness.table(header, cells),
            f"collectives per step, {collectives['parameters'] / 1e6:.1f}M parameters "
            f"({collectives['layers']} layers):\n"
            + _harness.table(
                ["layout", "ops", "operand+result MB", "ring MB sent/device", "vs data parallel"],
                collective_cells,
            ),
            f"step rate, {rate['parameters'] / 1e6:.1f}M parameters ({rate['layers']} x "
            f"{rate['width']}):\n" + _harness.summary_table(rate["rows"], "steps/s", rate_columns),
        ]
    )


def plot(found: dict, title: str):
    fig = _results.figure(figsize=(7, 4.5))
    ax = fig.subplots()
    base = found["data parallel"]["fits"]["parameters"]
    values = [found[layout]["fits"]["parameters"] / 1e6 for layout in LAYOUTS]
    bars = ax.bar(LAYOUTS, values, color=["tab:gray", "tab:blue", "tab:green"])
    for bar, value in zip(bars, values):
        ax.annotate(
            f"{value:,.1f}M ({value * 1e6 / base:.2f}x)",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_ylabel("largest model (million parameters)")
    ax.set_title(title, fontsize=9)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="rows per replica")
    parser.add_argument("--budget-gb", type=float, default=1.0, help="bytes per device, in GB")
    parser.add_argument("--collective-layers", type=int, default=8)
    parser.add_argument("--rate-width", type=int, default=256)
    parser.add_argument("--rate-layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    _results.add_arguments(parser)
    args = parser.parse_args()
    strategy = ts.TPUStrategy()
    check_layout(strategy)
    budget = args.budget_gb * GB

    found, start = {}, 16
    for layout in LAYOUTS:
        print(f"{layout}:", flush=True)
        fits, over, probes = largest(
            lambda n, layout=layout: measure(strategy, layout, args.width, n, args.batch),
            budget,
            start,
        )
        found[layout] = {"fits": fits, "over": over, "probes": probes}
        start = 8 * fits["layers"]  # the next layout fits more: start the search above
    collectives = collective_bytes(strategy, args.width, args.collective_layers, args.batch)
    rate = step_rate(strategy, args)
    print(report(found, collectives, rate, budget))
    base = found["data parallel"]["fits"]["parameters"]
    title = (
        f"Largest Adam f32 model within {args.budget_gb:g} GB per device, 8 replicas: "
        f"scanned residual MLP blocks of width {args.width}"
    )
    data = _results.record(
        "largest_model",
        title,
        args=vars(args),
        memory_formula="argument + output + temp - alias (memory_analysis, per device)",
        largest=found,
        ratio_to_data_parallel={
            layout: found[layout]["fits"]["parameters"] / base for layout in LAYOUTS
        },
        collectives=collectives,
        step_rate=rate,
    )
    _results.write(data, args, plot(found, title))


if __name__ == "__main__":
    main()
