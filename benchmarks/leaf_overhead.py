"""Host cost per call against the number of pytree leaves: strategy.run vs jit(shard_map).

The step adds 1 to every leaf of a state of N float32[4] arrays (N = 1, 10, 100, 1,000), on 8
replicas, with the state fed back each call. (a) is ``strategy.run(step, args=(state,))``;
(b) is the same step hand-written as ``jax.jit(jax.shard_map(...))``, with the same 2 steps in
flight. The device work is tiny, so the time per call is the host path: flattening, checks,
jit's dispatch, and the buffers of N outputs on 8 devices. (b') is (b) plus the checks that
keep a runtime's fast path safe, and nothing else: it flattens the call's arguments and reads
every leaf's sharding and deletion flag, as ``run``'s repeated call does, so (b')/(b) is what
those checks alone cost and the least (a)/(b) can be. Rounds alternate (a), (b) and (b'); the
table shows the median microseconds per call and the ratios, and the CPU time the Python
thread itself spends per call (``time.thread_time``: the host work, without the device threads
it competes with on a small host). A second table does the same for Flax NNX objects, with a
model of 10 and 100 variables: (c) ``strategy.run`` on the live model, which it splits and
updates in place on every call, (d) ``nnx.jit`` of the same step on one device, (e)
``strategy.run`` on the model's state (``nnx.split`` once, ``nnx.merge`` inside the step).
``--profile`` then profiles (a) with 1,000 leaves under cProfile and prints where its host time
goes.
Writes ``leaf_overhead.json`` and ``leaf_overhead.png`` into ``results/local/`` (``--record``:
into the tracked ``results/``).

Usage: python benchmarks/leaf_overhead.py [--rounds 9] [--profile]  (about 1 minute on 2 cores)
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import operator
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import _harness
import _results

_harness.prepare()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import tpustrat as ts  # noqa: E402

LEAF_COUNTS = (1, 10, 100, 1000)
WINDOW = 2  # tpustrat's default max_steps_in_flight, used by both loops
TPUSTRAT, BASELINE = "(a) tpustrat strategy.run", "(b) jit(shard_map) by hand"
CHECKED = "(b') (b) + flatten, sharding and deletion checks"
SHARDING, IS_DELETED = operator.attrgetter("sharding"), operator.methodcaller("is_deleted")
FIRST_LEAF = operator.itemgetter("w0000")
NNX_VARIABLES = (10, 100)
LIVE = "(c) run(step, args=(model,))"
NNX_JIT = "(d) nnx.jit(step)(model), 1 device"
FUNCTIONAL = "(e) run(step, args=(state,))"


def step(state):
    return jax.tree.map(lambda w: w + 1, state)


def initial_state(leaves: int) -> dict[str, np.ndarray]:
    return {f"w{k:04d}": np.full(4, k, np.float32) for k in range(leaves)}


def timed(loop: Callable[[int], None], host_cpu: list[float] | None) -> Callable[[int], float]:
    """``run(calls)``: times ``loop(calls)``, which waits for its last call.

    Returns seconds per call, and appends the Python thread's CPU seconds per call
    (``time.thread_time``) to ``host_cpu``.
    """

    def run(calls: int) -> float:
        start, cpu = time.perf_counter(), time.thread_time()
        loop(calls)
        if host_cpu is not None:
            host_cpu.append((time.thread_time() - cpu) / calls)
        return (time.perf_counter() - start) / calls

    return run


def make_tpustrat(leaves: int, host_cpu: list[float] | None = None) -> Callable[[int], float]:
    """(a), timed by ``timed``."""
    strategy = ts.TPUStrategy(max_steps_in_flight=WINDOW)
    state = {"now": strategy.replicate(initial_state(leaves))}

    def loop(calls: int) -> None:
        s = state["now"]
        for _ in range(calls):
            s = strategy.run(step, args=(s,))
        jax.block_until_ready(s)
        state["now"] = s

    return timed(loop, host_cpu)


def make_shard_map(
    leaves: int, host_cpu: list[float] | None = None, checked: bool = False
) -> Callable[[int], float]:
    """(b), or with ``checked`` (b'), timed by ``timed``."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replica",))
    jitted = jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=(P(),), out_specs=P(), check_vma=False)
    )
    sharding = NamedSharding(mesh, P())  # jit's outputs carry this very object, as run's do
    state = {"now": jax.device_put(initial_state(leaves), sharding)}
    # What every call must find: run's repeated call compares the same three things.
    expected = jax.tree_util.tree_flatten(((state["now"],), {}))[1]
    shardings = (sharding,) * leaves

    def checked_call(s):
        flat, structure = jax.tree_util.tree_flatten(((s,), {}))
        if (
            structure != expected
            or tuple(map(SHARDING, flat)) != shardings
            or any(map(IS_DELETED, flat))
        ):
            raise AssertionError(f"(b') found an input out of place: {structure}")
        return jitted(s)

    def loop(calls: int) -> None:
        # Any output leaf will do: the program is done when it is ready.
        state["now"] = _harness.in_flight(
            checked_call if checked else jitted, state["now"], calls, WINDOW, ready=FIRST_LEAF
        )

    return timed(loop, host_cpu)


class Layers(nnx.Module):
    """``variables // 2`` Linear(4, 4) layers: a kernel and a bias each."""

    def __init__(self, variables: int):
        rngs = nnx.Rngs(0)
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(variables // 2)])


def bump(model: Layers) -> None:
    for layer in model.layers:
        layer.kernel[...] = layer.kernel[...] + 1


def make_nnx_variants(variables: int, host_cpu: dict[str, list[float]]) -> dict:
    """(c), (d) and (e) for a model of ``variables`` variables, each ``run(calls)`` timed."""
    strategy = ts.TPUStrategy(max_steps_in_flight=WINDOW)
    live, alone = Layers(variables), Layers(variables)
    strategy.replicate(live)
    graphdef, state = nnx.split(Layers(variables))
    holder = {"state": strategy.replicate(state)}

    def functional_step(state):
        model = nnx.merge(graphdef, state)
        bump(model)
        return nnx.state(model)

    jitted = nnx.jit(bump)
    calls = {
        LIVE: lambda: strategy.run(bump, args=(live,)),
        NNX_JIT: lambda: jitted(alone),
        FUNCTIONAL: lambda: holder.update(
            state=strategy.run(functional_step, args=(holder["state"],))
        ),
    }

    def looped(call: Callable[[], Any]) -> Callable[[int], None]:
        def loop(n: int) -> None:
            for _ in range(n):
                call()
            jax.block_until_ready((nnx.state(live), nnx.state(alone), holder["state"]))

        return loop

    return {name: timed(looped(call), host_cpu[name]) for name, call in calls.items()}


def nnx_rows(rounds: int) -> list[dict]:
    """Host time per call of a step on live NNX objects, nnx.jit's, and on the state."""
    rows = []
    for variables in NNX_VARIABLES:
        host_cpu: dict[str, list[float]] = {LIVE: [], NNX_JIT: [], FUNCTIONAL: []}
        runs = make_nnx_variants(variables, host_cpu)
        for run in runs.values():
            run(5)
        for cpu in host_cpu.values():
            cpu.clear()
        calls = max(20, 2000 // variables)
        samples = _harness.alternate(
            {name: functools.partial(run, calls) for name, run in runs.items()}, rounds
        )
        rows.append(
            {
                "variables": variables,
                **{
                    name: {
                        "median_us": 1e6 * statistics.median(values),
                        "host_cpu_us": 1e6 * statistics.median(host_cpu[name]),
                    }
                    for name, values in samples.items()
                },
            }
        )
    return rows


def calls_per_round(leaves: int) -> int:
    return max(20, 2000 // leaves)  # about 0.2 s per round on 2 cores


def profile(calls: int = 50, leaves: int = 1000) -> str:
    """cProfile's top entries for ``calls`` tpustrat calls with ``leaves`` leaves."""
    run = make_tpustrat(leaves)
    run(5)
    profiler = cProfile.Profile()
    profiler.enable()
    run(calls)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    return text.getvalue()


def plot(rows: list[dict], title: str):
    """us per call against leaves, the ratios to (b), and the host CPU (a) and (b') add."""
    fig = _results.figure(figsize=(15, 4))
    left, middle, right = fig.subplots(1, 3)
    counts = [row["leaves"] for row in rows]
    for name in (TPUSTRAT, BASELINE, CHECKED):
        left.plot(counts, [row[name]["median_us"] for row in rows], marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="leaves in the state", ylabel="us per call")
    left.legend()
    middle.plot(counts, [row["ratio"] for row in rows], marker="o", label="(a)/(b), medians")
    middle.plot(counts, [row["paired_ratio"] for row in rows], marker="s", label="(a)/(b), paired")
    middle.plot(
        counts,
        [row["checked_paired_ratio"] for row in rows],
        marker="^",
        label="(b')/(b), paired: the checks alone",
    )
    middle.axhline(1.10, color="grey", linestyle=":", label="1.10 (goal, 1 leaf)")
    middle.axhline(1.05, color="grey", linestyle="--", label="1.05 (goal, 1,000 leaves)")
    middle.set(xscale="log", xlabel="leaves in the state", ylabel="time / (b) time")
    middle.legend()
    positions = np.arange(len(counts))
    variants = (TPUSTRAT, CHECKED)
    width = 0.8 / len(variants)
    for k, name in enumerate(variants):
        extra = [row[name]["host_cpu_us"] - row[BASELINE]["host_cpu_us"] for row in rows]
        right.bar(
            positions + k * width,
            extra,
            width,
            label=f"{name[:4].strip()} - (b)",
            color="C0" if name == TPUSTRAT else "C2",  # the left panel's colours
        )
    right.set_xticks(positions + width * (len(variants) - 1) / 2, [str(c) for c in counts])
    right.axhline(0, color="black", linewidth=0.8)
    right.set(xlabel="leaves in the state", ylabel="host CPU us per call, more than (b)")
    right.legend()
    fig.suptitle(title, fontsize=9)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--profile", action="store_true", help="cProfile (a) at 1,000 leaves")
    parser.add_argument("--leaves", type=int, nargs="+", default=LEAF_COUNTS)
    _results.add_arguments(parser)
    args = parser.parse_args()
    rows = []
    for leaves in args.leaves:
        calls = calls_per_round(leaves)
        host_cpu: dict[str, list[float]] = {TPUSTRAT: [], BASELINE: [], CHECKED: []}
        runs = {
            TPUSTRAT: make_tpustrat(leaves, host_cpu[TPUSTRAT]),
            BASELINE: make_shard_map(leaves, host_cpu[BASELINE]),
            CHECKED: make_shard_map(leaves, host_cpu[CHECKED], checked=True),
        }
        for run in runs.values():
            run(5)  # compile, then settle into the fast path
        for cpu in host_cpu.values():
            cpu.clear()
        samples = _harness.alternate(
            {name: functools.partial(run, calls) for name, run in runs.items()}, args.rounds
        )
        summary = {r["variant"]: r for r in _harness.summarize(samples, BASELINE, False)}
        rows.append(
            {
                "leaves": leaves,
                "calls_per_round": calls,
                **{
                    name: {
                        "median_us": 1e6 * s["median"],
                        "rounds_us": [1e6 * v for v in s["rounds"]],
                        "host_cpu_us": 1e6 * statistics.median(host_cpu[name]),
                    }
                    for name, s in summary.items()
                },
                "ratio": summary[TPUSTRAT]["ratio"],
                "paired_ratio": summary[TPUSTRAT]["paired_ratio"],
                "checked_ratio": summary[CHECKED]["ratio"],
                "checked_paired_ratio": summary[CHECKED]["paired_ratio"],
            }
        )
    title = (
        f"state of N float32[4] leaves, step w + 1, {jax.device_count()} x "
        f"{jax.devices()[0].platform}, {WINDOW} steps in flight, {args.rounds} rounds"
    )
    nnx_table = nnx_rows(args.rounds)
    data = _results.record("leaf_overhead", title, rows=rows, nnx=nnx_table)
    print(f"\n{title}\n{data['machine']}, jax {jax.__version__}")
    print(f"  {CHECKED}")
    header = ["leaves", "(a) us/call", "(b) us/call", "(a)/(b)", "paired", "(b')/(b)", "paired"]
    header += ["(a) host CPU us", "(b) host CPU us", "(b') host CPU us"]
    print(
        _harness.table(
            header,
            [
                [
                    f"{row['leaves']:,}",
                    f"{row[TPUSTRAT]['median_us']:,.0f}",
                    f"{row[BASELINE]['median_us']:,.0f}",
                    f"{row['ratio']:.3f}",
                    f"{row['paired_ratio']:.3f}",
                    f"{row['checked_ratio']:.3f}",
                    f"{row['checked_paired_ratio']:.3f}",
                    f"{row[TPUSTRAT]['host_cpu_us']:,.1f}",
                    f"{row[BASELINE]['host_cpu_us']:,.1f}",
                    f"{row[CHECKED]['host_cpu_us']:,.1f}",
                ]
                for row in rows
            ],
        )
    )
    print(f"\nFlax NNX objects, a step that adds 1 to every kernel ({args.rounds} rounds):")
    header = ["variables"]
    for name in (LIVE, NNX_JIT, FUNCTIONAL):
        print(f"  {name}")
        header += [f"{name[:3]} us/call", f"{name[:3]} host CPU us"]
    print(
        _harness.table(
            header,
            [
                [row["variables"]]
                + [
                    f"{row[name][key]:,.0f}"
                    for name in (LIVE, NNX_JIT, FUNCTIONAL)
                    for key in ("median_us", "host_cpu_us")
                ]
                for row in nnx_table
            ],
        )
    )
    if args.profile:
        data["profile_1000_leaves"] = profile()
        print(data["profile_1000_leaves"])
    _results.write(data, args, plot(rows, f"{title}\n{data['machine']}"))


if __name__ == "__main__":
    main()
