"""Flax NNX objects as run arguments: updated in place as under nnx.jit, equal to one device.

The training step is the Flax NNX MNIST tutorial's, ported by replacing ``@nnx.jit`` with
``strategy.run`` and adding the gradient all-reduce (metrics accumulate per replica and are
summed when read).
"""

import gc
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SEVERAL_REPLICAS, TWO_MESH_SHAPES, mesh_id
from flax import linen, nnx

import tpustrat as ts

GLOBAL_BATCH = 32
STEPS = 10


class CNN(nnx.Module):
    """A small version of the tutorial's model: dense layers with dropout."""

    def __init__(self, rngs: nnx.Rngs, dropout: float = 0.0):
        self.linear1 = nnx.Linear(6, 16, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.linear2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.linear2(self.dropout(nnx.relu(self.linear1(x))))


def _loss_fn(model, batch):
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, logits


def train_step(model, optimizer, metrics, batch):
    """The tutorial's step, plus the gradient all-reduce that data parallelism needs."""
    ctx = ts.get_replica_context()
    grad_fn = nnx.value_and_grad(_loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(model, batch)
    grads = ctx.all_reduce("mean", grads)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])  # summed when read
    optimizer.update(model, grads)
    return ctx.all_reduce("mean", loss)


def _data():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(STEPS, GLOBAL_BATCH, 6)).astype(np.float32)
    label = rng.integers(0, 3, size=(STEPS, GLOBAL_BATCH)).astype(np.int32)
    return image, label


def _objects():
    model = CNN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
    return model, optimizer, metrics


@pytest.mark.parametrize("shape", SEVERAL_REPLICAS, ids=mesh_id)
def test_tutorial_step_trains_in_place_like_one_device(shape, compile_count):
    image, label = _data()
    model, optimizer, metrics = _objects()
    reference = nnx.jit(
        lambda m, o, mt, b: (
            mt.update(loss=_loss_fn(m, b)[0], logits=_loss_fn(m, b)[1], labels=b["label"]),
            o.update(m, nnx.grad(lambda m: _loss_fn(m, b)[0])(m)),
        )
    )
    ref_model, ref_optimizer, ref_metrics = _objects()
    for t in range(STEPS):
        reference(ref_model, ref_optimizer, ref_metrics, {"image": image[t], "label": label[t]})

    strategy = ts.TPUStrategy(num_logical_cores=shape[1])
    strategy.replicate((model, optimizer, metrics))  # the one call that places NNX state
    before = compile_count()
    for t in range(STEPS):
        dataset = [{"image": image[t], "label": label[t]}]
        batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
        loss = strategy.run(train_step, args=(model, optimizer, metrics, batch))
        assert isinstance(loss, jax.Array)
    assert compile_count() - before == 1, "the NNX step must compile once"
    assert int(optimizer.step[...]) == STEPS
    params, ref_params = nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-6)
    assert model.linear1.kernel[...].sharding.is_fully_replicated
    for name, value in metrics.compute().items():
        np.testing.assert_allclose(
            float(value), float(ref_metrics.compute()[name]), rtol=2e-5, err_msg=name
        )


class Holder(nnx.Module):
    def __init__(self, inner: nnx.Module):
        self.inner = inner


def test_shared_references_between_arguments_survive():
    strategy = ts.TPUStrategy()
    model = CNN(nnx.Rngs(0))
    holder = Holder(model)  # the same module reached twice

    def step(m, h):
        m.linear2.bias[...] = m.linear2.bias[...] + 1.0
        return h.inner.linear2.bias[...]

    out = strategy.run(step, args=(model, holder))
    np.testing.assert_allclose(np.asarray(out), np.ones(3))
    assert holder.inner is model
    np.testing.assert_allclose(np.asarray(model.linear2.bias[...]), np.ones(3))


def test_dropout_differs_across_replicas_and_repeats_from_one_seed():
    strategy = ts.TPUStrategy()
    ones = strategy.experimental_distribute_values_from_function(
        lambda ctx: np.ones(64, np.float32)
    )

    def apply(model, x):
        return model.dropout(x)

    def masks(seed):
        model = CNN(nnx.Rngs(seed), dropout=0.5)
        return [np.asarray(strategy.run(apply, args=(model, ones)).stacked) for _ in range(2)]

    first, second = masks(0)
    assert len({row.tobytes() for row in first}) == 8, "each replica draws its own mask"
    assert not np.array_equal(first, second), "each step draws new masks"
    again = masks(0)
    np.testing.assert_array_equal(again[0], first)
    np.testing.assert_array_equal(again[1], second)


def _predict(model, x):
    return model(x)


def test_switching_between_train_and_eval_modes_compiles_each_once(compile_count):
    """model.train() and model.eval() give two graph definitions; each compiles once."""
    strategy = ts.TPUStrategy()
    model = CNN(nnx.Rngs(0), dropout=0.5)
    strategy.replicate(model)
    x = strategy.experimental_distribute_values_from_function(
        lambda ctx: np.ones((2, 6), np.float32)
    )
    reference = nnx.merge(*nnx.split(model))
    reference.eval()
    want = np.asarray(reference(np.ones((2, 6), np.float32)))
    trained, evaluated = [], []
    before = compile_count()
    for _ in range(3):
        model.train()
        trained.append(np.asarray(strategy.run(_predict, args=(model, x)).stacked))
        model.eval()
        evaluated.append(np.asarray(strategy.run(_predict, args=(model, x)).stacked))
    assert compile_count() - before == 2
    for out in evaluated:  # no dropout in eval mode: every replica computes the plain model
        np.testing.assert_allclose(out, np.broadcast_to(want, out.shape), rtol=1e-6)
    assert not np.allclose(trained[0], trained[1]), "train mode draws new dropout masks"


def test_a_variable_the_step_adds_reaches_the_callers_object():
    strategy = ts.TPUStrategy()
    model = CNN(nnx.Rngs(0))

    def step(m):
        m.seen = nnx.BatchStat(jnp.full(3, 2.0))  # a new variable: the state's structure grows
        m.linear2.bias[...] = m.linear2.bias[...] + 1.0
        return m.linear2.bias[...]

    strategy.run(step, args=(model,))
    np.testing.assert_allclose(np.asarray(model.seen[...]), np.full(3, 2.0))
    np.testing.assert_allclose(np.asarray(model.linear2.bias[...]), np.ones(3))


def test_state_left_different_on_each_replica_is_a_clear_error():
    strategy = ts.TPUStrategy()
    model = CNN(nnx.Rngs(0))
    x = strategy.experimental_distribute_values_from_function(
        lambda ctx: np.full(3, ctx.replica_id_in_sync_group, np.float32)
    )

    def step(m, x):
        m.linear2.bias[...] = m.linear2.bias[...] + x  # no all-reduce: differs per replica

    with pytest.raises(ValueError, match=r"differs between replicas: .*linear2.*bias"):
        strategy.run(step, args=(model, x))


def test_donating_the_objects_state():
    strategy = ts.TPUStrategy()
    model = CNN(nnx.Rngs(0))
    strategy.replicate(model)
    old = model.linear1.kernel[...]
    want = 2 * np.array(old)  # a copy: a live view would keep the donated buffer

    def step(m):
        m.linear1.kernel[...] = m.linear1.kernel[...] * 2

    strategy.run(step, args=(model,), options=ts.RunOptions(donate_argnums=(0,)))
    assert old.is_deleted()
    np.testing.assert_allclose(np.asarray(model.linear1.kernel[...]), want)
    with pytest.raises(ValueError, match=r"donate_argnums \(1,\) names array arguments"):
        strategy.run(
            lambda m, x: x, args=(model, np.ones(2)), options=ts.RunOptions(donate_argnums=(1,))
        )


class BatchNormNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(5, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, axis_name=ts.REPLICA_AXIS, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.linear(x))


@pytest.mark.parametrize("shape", TWO_MESH_SHAPES, ids=mesh_id)
def test_cross_replica_batch_norm_nnx_equals_one_device(shape):
    strategy = ts.TPUStrategy(num_logical_cores=shape[1])
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(32, 5)).astype(np.float32)
    model = BatchNormNet(nnx.Rngs(0))
    reference = BatchNormNet(nnx.Rngs(0))
    reference.norm.axis_name = None  # one device sees the whole batch

    want = reference(x)
    batch = next(iter(strategy.experimental_distribute_dataset([x])))
    got = strategy.run(lambda m, b: m(b), args=(model, batch))
    np.testing.assert_allclose(
        np.asarray(got.stacked).reshape(32, 4), np.asarray(want), rtol=1e-4, atol=1e-5
    )
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            np.asarray(getattr(model.norm, name)[...]),
            np.asarray(getattr(reference.norm, name)[...]),
            rtol=1e-4,
            err_msg=name,
        )


class LinenBatchNormNet(linen.Module):
    axis_name: str | None = ts.REPLICA_AXIS

    @linen.compact
    def __call__(self, x):
        x = linen.Dense(4)(x)
        return linen.BatchNorm(use_running_average=False, axis_name=self.axis_name)(x)


@pytest.mark.parametrize("shape", TWO_MESH_SHAPES, ids=mesh_id)
def test_cross_replica_batch_norm_linen_equals_one_device(shape):
    strategy = ts.TPUStrategy(num_logical_cores=shape[1])
    x = np.random.default_rng(2).normal(-1.0, 2.0, size=(32, 5)).astype(np.float32)
    variables = LinenBatchNormNet(axis_name=None).init(jax.random.key(0), x)
    want, want_updates = LinenBatchNormNet(axis_name=None).apply(
        variables, x, mutable=["batch_stats"]
    )

    def step(variables, batch):
        return LinenBatchNormNet().apply(variables, batch, mutable=["batch_stats"])

    batch = next(iter(strategy.experimental_distribute_dataset([x])))
    got, updates = strategy.run(step, args=(strategy.replicate(variables), batch))
    np.testing.assert_allclose(
        np.asarray(got.stacked).reshape(32, 4), np.asarray(want), rtol=1e-4, atol=1e-5
    )
    for g, w in zip(jax.tree.leaves(updates), jax.tree.leaves(want_updates)):
        assert isinstance(g, jax.Array), "global batch statistics come back replicated"
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


def test_linen_dropout_with_replica_key_differs_per_replica():
    strategy = ts.TPUStrategy()
    layer = linen.Dropout(0.5, deterministic=False)
    ones = strategy.experimental_distribute_values_from_function(lambda ctx: np.ones(64))

    def step(key, x):
        key = ts.get_replica_context().replica_key(key)
        return layer.apply({}, x, rngs={"dropout": key})

    first = np.asarray(strategy.run(step, args=(jax.random.key(3), ones)).stacked)
    again = np.asarray(strategy.run(step, args=(jax.random.key(3), ones)).stacked)
    assert len({row.tobytes() for row in first}) == 8
    np.testing.assert_array_equal(first, again)
    assert jnp.issubdtype(jax.random.key(3).dtype, jax.dtypes.prng_key)


def _steps_step(state, batch):
    """An run_steps step over (model, optimizer, metrics): updates them in place."""
    model, optimizer, metrics = state
    return state, train_step(model, optimizer, metrics, batch)


@pytest.mark.parametrize("donate", [False, True], ids=["kept", "donated"])
def test_run_steps_updates_nnx_objects_in_place_as_run_does(donate):
    image, label = _data()
    strategy = ts.TPUStrategy(num_logical_cores=2)
    options = ts.RunOptions(donate_argnums=(0,) if donate else ())
    dataset = [{"image": image[t], "label": label[t]} for t in range(4)]
    reference = strategy.replicate(_objects())
    for batch in strategy.experimental_distribute_dataset(dataset):
        last_loss = strategy.run(train_step, args=(*reference, batch), options=options)
    objects = strategy.replicate(_objects())
    batches = iter(strategy.experimental_distribute_dataset(dataset))
    result = strategy.run_steps(_steps_step, objects, batches, 4, options=options)
    assert result.num_steps == 4
    assert all(got is want for got, want in zip(result.state, objects)), "the caller's objects"
    model, optimizer, metrics = objects
    assert int(optimizer.step[...]) == 4
    np.testing.assert_allclose(float(result.outputs), float(last_loss), rtol=2e-5)
    got, want = nnx.state(model, nnx.Param), nnx.state(reference[0], nnx.Param)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    for name, value in metrics.compute().items():
        np.testing.assert_allclose(
            float(value), float(reference[2].compute()[name]), rtol=2e-5, err_msg=name
        )


def test_run_steps_keeps_array_leaves_next_to_nnx_objects():
    strategy = ts.TPUStrategy()
    model = strategy.replicate(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
    kernel = np.asarray(model.kernel[...])

    def step(state, x):
        model, count = state
        model.kernel[...] = model.kernel[...] + ts.get_replica_context().all_reduce("sum", x)
        return (model, count + 1), count

    batches = iter([ts.PerReplica([np.float32(1)] * 8)] * 3)
    result = strategy.run_steps(step, (model, np.int32(0)), batches, 3)
    assert result.state[0] is model and int(result.state[1]) == 3 and int(result.outputs) == 2
    np.testing.assert_allclose(np.asarray(model.kernel[...]), kernel + 24.0)


@pytest.mark.parametrize("shape", SEVERAL_REPLICAS, ids=mesh_id)
def test_an_nnx_argument_means_the_same_plain_and_inside_nnx_jit(shape):
    strategy = ts.TPUStrategy(num_logical_cores=shape[1])
    n = strategy.num_replicas_in_sync

    def step(model, x):
        ctx = ts.get_replica_context()
        model.kernel[...] = model.kernel[...] + ctx.all_reduce("sum", x.sum())
        return model(x)

    x = ts.PerReplica([np.full((1, 2), i, np.float32) for i in range(n)])
    plain = strategy.replicate(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
    jitted = strategy.replicate(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
    out_plain = strategy.run(step, args=(plain, x))
    out_jitted = nnx.jit(lambda m, x: strategy.run(step, args=(m, x)))(jitted, x)
    np.testing.assert_allclose(np.asarray(jitted.kernel[...]), np.asarray(plain.kernel[...]))
    np.testing.assert_allclose(np.asarray(out_jitted.stacked), np.asarray(out_plain.stacked))
    kernel = np.asarray(nnx.Linear(2, 1, rngs=nnx.Rngs(0)).kernel[...])
    np.testing.assert_allclose(np.asarray(plain.kernel[...]), kernel + n * (n - 1))


def test_a_step_that_changes_a_closed_over_object_is_told_to_pass_it():
    strategy = ts.TPUStrategy()
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    x = ts.PerReplica([np.ones((2, 3), np.float32)] * 8)

    def step(x):
        with warnings.catch_warnings():  # newer Flax deprecates .value; older lacks [...] =
            warnings.simplefilter("ignore", DeprecationWarning)
            model.kernel.value = model.kernel.value + 1  # the object is not an argument of run
        return x.sum()

    with pytest.raises(ValueError, match="Pass the object to run as an argument"):
        strategy.run(step, args=(x,))
    np.testing.assert_array_equal(  # the argument form updates it in place
        strategy.run(lambda model, x: model(x).sum(), args=(model, x)).stacked,
        np.full(8, np.asarray(model(np.ones((2, 3), np.float32)).sum())),
    )


class Stack(nnx.Module):
    """Layers in an nnx.List and in a plain list, dropout, and a scalar static attribute."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(2)])
        self.extras = nnx.data([nnx.Linear(3, 3, rngs=rngs)])
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.scale = 2.0


def _bump_every_variable(model):
    """Adds 1 to every Param and BatchStat: a step that reads the whole graph."""
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    nnx.update(model, jax.tree.map(lambda v: v + 1, state))


# Changes to the objects between calls, each done to the model run by strategy.run and to its
# twin run by nnx.jit (which splits on every call). Each must reach the step as on the twin.
CHANGES = {
    "nothing": lambda m: None,
    "a value set in place": lambda m: m.layers[0].bias.set_value(jnp.full(3, 7.0)),
    "a new attribute": lambda m: setattr(m, "extra", nnx.Param(jnp.zeros(3))),
    "an attribute deleted": lambda m: delattr(m, "extras"),
    "a variable replaced by an equal one": lambda m: setattr(
        m.layers[0], "bias", nnx.Param(jnp.zeros(3))
    ),
    "a variable of another shape": lambda m: setattr(m.layers[0], "bias", nnx.Param(jnp.zeros(5))),
    "a variable of another type": lambda m: setattr(
        m.layers[0], "bias", nnx.BatchStat(jnp.zeros(3))
    ),
    "a variable's metadata": lambda m: m.layers[1].kernel.set_metadata("tag", "frozen"),
    "a module replaced": lambda m: m.layers.__setitem__(1, nnx.Linear(3, 3, rngs=nnx.Rngs(5))),
    "an nnx.List grown": lambda m: m.layers.append(nnx.Linear(3, 3, rngs=nnx.Rngs(6))),
    "a plain list grown": lambda m: m.extras.append(nnx.Linear(3, 3, rngs=nnx.Rngs(7))),
    "a plain list item replaced": lambda m: m.extras.__setitem__(
        0, nnx.Linear(3, 3, rngs=nnx.Rngs(8))
    ),
    "a static attribute": lambda m: setattr(m, "scale", 3.0),
    "eval mode": lambda m: m.eval(),
}


def _signature(model):
    """What a program is compiled for: the graph definition and each leaf's abstract value
    (shape, dtype, and whether the dtype is weak: a Python number's)."""
    graphdef, state = nnx.split(model)
    return graphdef, jax.tree.map(jax.typeof, state)


@pytest.mark.parametrize("change", list(CHANGES), ids=lambda c: c.replace(" ", "-"))
def test_changes_between_calls_reach_the_step_and_compile_only_when_the_graph_changed(change):
    """The cached graph of the last call is used only while it holds: a change made to the
    objects between calls reaches the step as under nnx.jit, and compiles again exactly when
    the graph definition or a leaf's type changed."""
    strategy = ts.TPUStrategy()
    model, twin = Stack(nnx.Rngs(0)), Stack(nnx.Rngs(0))
    strategy.replicate(model)
    jitted = nnx.jit(_bump_every_variable)
    for _ in range(2):
        strategy.run(_bump_every_variable, args=(model,))
        jitted(twin)
    before, signature = strategy.compile_stats().num_compiles, _signature(model)
    for m in (model, twin):
        CHANGES[change](m)
    for _ in range(2):
        strategy.run(_bump_every_variable, args=(model,))
        jitted(twin)
    compiles = strategy.compile_stats().num_compiles - before
    assert compiles == int(_signature(model) != signature)
    got, want = nnx.state(model), nnx.state(twin)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_the_cached_graph_does_not_keep_a_dropped_model_alive():
    strategy = ts.TPUStrategy()
    model = Stack(nnx.Rngs(0))
    for _ in range(2):
        strategy.run(_bump_every_variable, args=(model,))
    watched = weakref.ref(model)
    del model
    gc.collect()
    assert watched() is None


class Counter(nnx.Module):
    """A plain array as data next to a variable: a leaf that is not an nnx.Variable."""

    def __init__(self):
        self.count = nnx.data(jnp.zeros((), jnp.int32))
        self.total = nnx.Param(jnp.zeros(3))


def _count(m):
    m.count = m.count + 1
    m.total[...] = m.total[...] + 1.0


def test_a_plain_array_attribute_is_written_back_on_every_call():
    strategy = ts.TPUStrategy()
    model, twin = Counter(), Counter()
    jitted = nnx.jit(_count)
    for _ in range(3):
        strategy.run(_count, args=(model,))
        jitted(twin)
    assert int(model.count) == int(twin.count) == 3
    np.testing.assert_allclose(np.asarray(model.total[...]), np.asarray(twin.total[...]))
    assert strategy.compile_stats().num_compiles == 1


def test_a_flax_too_old_for_nnx_support_is_refused_with_the_versions(monkeypatch):
    import flax

    strategy = ts.TPUStrategy()
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    monkeypatch.setattr(flax, "__version__", "0.11.0")
    with pytest.raises(
        RuntimeError, match=r"needs flax >= 0\.12\.6, and flax 0\.11\.0 is installed"
    ):
        strategy.run(lambda m: m(jnp.ones((1, 2))), args=(model,))
    monkeypatch.undo()
    assert strategy.run(lambda m: m(jnp.ones((1, 2))), args=(model,)).shape == (1, 3)
