"""Every public optax transformation through ts.shard_update: equal to plain optax, or refused.

The transformations are not hand-picked: the suite walks ``dir(optax)`` and
``dir(optax.contrib)``, calls every callable whose required arguments it can fill from
``FILL`` (``learning_rate=0.1`` and the like), and keeps what returns an ``init``/``update``
pair. Each one runs 3 steps through ``ts.shard_update`` on leaves of odd shapes ((7,) cut with
padding, (3, 5) cut along its second axis with padding, a scalar) and must give the updates of
plain optax on one device fed the global gradient, to rtol 1e-6 (atol 1e-6, an ulp of the
values that cancel), or raise a ValueError at ``init`` or ``update``. There is no third
outcome. ``CHUNK`` transformations share each compiled program, which is most of the time.
"""

import inspect
import warnings

import jax
import numpy as np
import optax
import optax.contrib
import pytest

import tpustrat as ts

STEPS = 3
CHUNK = 8  # transformations per compiled program: fewer compiles, none too large
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Values that are multiples of 1/64, as are the gradients: sums and squares of them are exact
# in float32 in any order, so the sharded and one-device programs start from equal inputs.
PARAMS = {  # (7,) is cut with padding, (3, 5) along its second axis with padding
    "b": (np.arange(7, dtype=np.float32) - 3) / 8,
    "c": (np.arange(15, dtype=np.float32).reshape(3, 5) - 5) / 16,
    "s": np.array(0.5, np.float32),
}


def _matrices(params):
    return jax.tree.map(lambda p: np.ndim(p) > 1, params)


# Values for required arguments, by name: a transformation whose required arguments are all
# here is built; one with any other required argument is listed as not constructible.
FILL = {
    "learning_rate": lambda: 0.1,
    "step_size": lambda: 0.1,
    "max_norm": lambda: 1.0,
    "max_delta": lambda: 0.1,
    "clipping": lambda: 0.1,
    "threshold": lambda: 1.0,
    "decay": lambda: 0.9,
    "eta": lambda: 0.1,
    "gamma": lambda: 0.5,
    "inner": lambda: optax.sgd(0.1),
    "opt": lambda: optax.adam(0.1),
    "optimizer": lambda: optax.sgd(0.1),
    "adv_optimizer": lambda: optax.sgd(0.1),
    "base_optimizer": lambda: optax.sgd(0.1),
    "fast_optimizer": lambda: optax.sgd(0.1),
    "every_k_schedule": lambda: 2,
    "sync_period": lambda: 2,
    "slow_step_size": lambda: 0.5,
    "max_consecutive_errors": lambda: 2,
    "mask": lambda: _matrices,
    "freeze_mask": lambda: _matrices,
    "should_transform_fn": lambda: lambda step: step > 0,
    "step_size_fn": lambda: optax.constant_schedule(0.1),
    "max_backtracking_steps": lambda: 3,
    "max_linesearch_steps": lambda: 3,
    "l2_norm_clip": lambda: 1.0,
    "noise_multiplier": lambda: 0.1,
    "seed": lambda: 0,
}

# Checked on both meshes: what most users run.
COMMON = ("sgd", "adam", "adamw", "lion", "adagrad", "rmsprop", "clip_by_global_norm")

# Chains the issue names, on top of what the namespace gives one by one.
CHAINS = {
    "chain(clip_by_global_norm, adam)": lambda: optax.chain(
        optax.clip_by_global_norm(0.5), optax.adam(0.1)
    ),
    "chain(clip_by_global_norm, sgd)": lambda: optax.chain(
        optax.clip_by_global_norm(0.5), optax.sgd(0.1, momentum=0.9)
    ),
    "chain(clip_by_global_norm, adamw(mask))": lambda: optax.chain(
        optax.clip_by_global_norm(0.5), optax.adamw(0.1, mask=_matrices)
    ),
}


def _is_transformation(x):
    return callable(getattr(x, "init", None)) and callable(getattr(x, "update", None))


def _build():
    """Every constructible transformation of the optax namespace, and why the rest are not."""
    built, skipped = {}, {}
    for prefix, namespace in (("", optax), ("contrib.", optax.contrib)):
        for attribute in sorted(dir(namespace)):
            name, obj = prefix + attribute, getattr(namespace, attribute)
            if attribute.startswith("_") or inspect.ismodule(obj) or not callable(obj):
                continue  # not a function or class: nothing to call
            try:
                parameters = inspect.signature(obj).parameters.values()
            except (TypeError, ValueError):
                skipped[name] = "has no signature"
                continue
            required = [
                p
                for p in parameters
                if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
            missing = [p.name for p in required if p.name not in FILL]
            if missing:
                skipped[name] = f"no value for the required {', '.join(missing)}"
                continue
            positional = [FILL[p.name]() for p in required if p.kind == p.POSITIONAL_ONLY]
            keywords = {p.name: FILL[p.name]() for p in required if p.kind != p.POSITIONAL_ONLY}
            try:
                made = obj(*positional, **keywords)
            except Exception as error:  # any failure means: not constructible
                skipped[name] = f"raised {type(error).__name__} when called"
                continue
            if not _is_transformation(made):
                skipped[name] = f"returns a {type(made).__name__}, not a transformation"
                continue
            built[name] = made
    for name, make in CHAINS.items():
        built[name] = make()
    return built, skipped


def _gradients(seed=5):
    """The global gradient of each step: multiples of 1/64, as one device sees them."""
    rng = np.random.default_rng(seed)
    draw = lambda p: np.asarray(rng.integers(-64, 65, np.shape(p)) / 64, np.float32)
    return [jax.tree.map(draw, PARAMS) for _ in range(STEPS)]


def _split_over(num_replicas, global_grads, seed=6):
    """Per-replica gradients whose mean is exactly ``global_grads`` (noise that sums to zero)."""
    rng = np.random.default_rng(seed)
    local = []
    for grads in global_grads:
        noise = [
            jax.tree.map(lambda g: rng.integers(-64, 65, np.shape(g)) / 64, grads)
            for _ in range(num_replicas - 1)
        ]
        noise.append(jax.tree.map(lambda *n: -np.sum(n, axis=0), *noise))
        local.append(
            [jax.tree.map(lambda g, n: (g + n).astype(np.float32), grads, r) for r in noise]
        )
    return local


def _chunks(names, size=CHUNK):
    names = list(names)
    return [names[i : i + size] for i in range(0, len(names), size)]


def _one_device(built, global_grads):
    """Plain optax's updates at each step, for every transformation that runs in plain optax.

    Jitted programs of ``CHUNK`` transformations each; one that fails in plain optax (it needs
    extra arguments such as ``value``, say) is listed with the reason.
    """
    want, failed = {}, {}

    def steps(names, params, grads):
        out = {}
        for name in names:
            tx = built[name]
            try:
                p, state, updates = params, tx.init(params), []
                for g in grads:
                    u, state = tx.update(g, state, p)
                    p = optax.apply_updates(p, u)
                    updates.append(u)
            except Exception as error:  # recorded: not runnable in plain optax
                failed[name] = f"{type(error).__name__} in plain optax"
                continue
            out[name] = updates
        return out

    for names in _chunks(built):
        program = jax.jit(steps, static_argnums=0).lower(tuple(names), PARAMS, global_grads)
        compiled = program.compile(compiler_options=FAST_COMPILE)
        want.update(jax.device_get(compiled(PARAMS, global_grads)))
    return want, failed


def _sharded(strategy, built, local_grads):
    """Each transformation through ts.shard_update, ``CHUNK`` to a program; the ValueErrors."""
    got, refused = {}, {}
    for names in _chunks(built):
        sharded = {name: ts.shard_update(built[name]) for name in names}

        def init(params, sharded=sharded):
            states = {}
            for name, tx in sharded.items():
                try:
                    states[name] = tx.init(params)
                except ValueError as error:
                    refused[name] = f"init: {error}"
            return states

        def step(all_params, states, grads, sharded=sharded):
            new_params, new_states, updates = {}, {}, {}
            for name, state in states.items():
                params = all_params[name]
                try:
                    u, new_states[name] = sharded[name].update(grads, state, params)
                except ValueError as error:
                    refused[name] = f"update: {error}"
                    continue
                new_params[name], updates[name] = optax.apply_updates(params, u), u
            return new_params, new_states, updates

        params = strategy.replicate(PARAMS)
        states = strategy.run(init, args=(params,))
        all_params = {name: params for name in states}
        for local in local_grads:
            grads = strategy.experimental_distribute_values_from_function(
                lambda ctx, local=local: local[ctx.replica_id_in_sync_group]
            )
            all_params, states, updates = strategy.run(step, args=(all_params, states, grads))
            for name, u in jax.device_get(updates).items():
                got.setdefault(name, []).append(u)
            states = {name: s for name, s in states.items() if name in all_params}
    return got, refused


@pytest.fixture(scope="module")
def transformations():
    """The built transformations, the skipped names, plain optax's updates, the failures."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        built, skipped = _build()
        want, not_runnable = _one_device(built, _gradients())
    return built, skipped, want, not_runnable


def test_the_namespace_walk_builds_the_common_optimizers(transformations):
    built, skipped, _, _ = transformations
    for name in COMMON:
        assert name in built, skipped.get(name)
    assert "softmax_cross_entropy" in skipped  # a loss: its required arguments are not filled
    assert len(built) > 100


@pytest.mark.slow  # about 60 optax transformations compiled per mesh: 25-50 s on 2 cores
@pytest.mark.parametrize(
    ("strategy", "half"), [((8, 1), 0), ((4, 2), 1)], ids=["8x1", "4x2"], indirect=["strategy"]
)
def test_every_transformation_equals_plain_optax_or_is_refused(strategy, half, transformations):
    """Every transformation runs on one of the two meshes (alternately, by name; compiling is
    most of the cost), and the common optimizers and the chains on both."""
    built, skipped, want, not_runnable = transformations
    names = sorted(want)
    want = {
        name: want[name]
        for name in names
        if names.index(name) % 2 == half or name in {*COMMON, *CHAINS}
    }
    local = _split_over(strategy.num_replicas_in_sync, _gradients())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        got, refused = _sharded(strategy, {name: built[name] for name in want}, local)
    equal = []
    for name in want:
        if name in refused:
            assert name not in got, name
            continue
        assert len(got[name]) == STEPS, name
        for step, (g, w) in enumerate(zip(got[name], want[name])):
            assert jax.tree.structure(g) == jax.tree.structure(w), name
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
                np.testing.assert_allclose(
                    a, b, rtol=1e-6, atol=1e-6, err_msg=f"{name}, step {step + 1}"
                )
        equal.append(name)
    print(
        f"\n{strategy}: built {len(built)}, equal {len(equal)}, refused {len(refused)}, "
        f"not runnable in plain optax {len(not_runnable)}, not constructible {len(skipped)}"
    )
    for name, why in sorted(refused.items()):
        print(f"  refused {name}: {why.splitlines()[0]}")
    for name, why in sorted(not_runnable.items()):
        print(f"  not runnable {name}: {why}")
    assert len(equal) + len(refused) == len(want)
    assert set(equal) >= {"sgd", "adam", "adamw", "lion", "adagrad", "rmsprop"}
    assert {"clip_by_global_norm", *CHAINS} <= set(equal)
