"""Step caches forget step functions that are gone, and stay bounded, as jax.jit's do."""

import gc
import operator

import numpy as np

import tpustrat as ts
from tpustrat._cache import FunctionCache
from tpustrat._compile import Step


def _live_steps():
    gc.collect()
    return sum(isinstance(o, Step) for o in gc.get_objects())


def test_fifty_lambdas_do_not_keep_fifty_programs_alive():
    strategy = ts.TPUStrategy()
    before = _live_steps()
    for i in range(50):
        strategy.run(lambda x, i=i: x + i, args=(np.float32(1),))
    assert _live_steps() - before <= 1  # at most the last lambda's, until it is collected
    stats = strategy.compile_stats()
    assert (stats.num_compiles, stats.num_cache_hits, len(stats.recompiles)) == (50, 0, 49)
    assert all("new function object of the same code" in r.reasons[0] for r in stats.recompiles)


def test_live_functions_and_bound_methods_hit_the_cache():
    class Model:
        def step(self, x):
            return x * 2

    strategy = ts.TPUStrategy()
    model, step = Model(), lambda x: x - 1
    for _ in range(3):
        strategy.run(model.step, args=(np.float32(1),))  # a new bound method object each time
        strategy.run(step, args=(np.float32(1),))
    stats = strategy.compile_stats()
    assert (stats.num_compiles, stats.num_cache_hits) == (2, 4)
    strategy.run(step, args=(np.zeros(3, np.float32),))
    (recompile,) = strategy.compile_stats().recompiles  # accounting still knows the step
    assert "args[0] changed shape from () to (3,)" in recompile.reasons[0]


def test_least_recently_used_entry_goes_past_the_bound():
    evicted = []
    cache = FunctionCache(lambda fn, options: (fn, options), max_size=2, on_evict=evicted.append)
    functions = [operator.neg, operator.pos, operator.abs]  # builtins: no weak references
    cache.get(functions[0], "a")
    cache.get(functions[1], "a")
    cache.get(functions[0], "a")  # now the most recently used
    cache.get(functions[2], "a")
    assert len(cache) == 2
    ((weak_fn, options),) = evicted
    assert (weak_fn(-4), options) == (-4, "a")  # operator.pos went, not operator.neg
    assert cache.get(functions[0], "a")[0](4) == -4


def test_entry_goes_with_its_function():
    evicted = []
    cache = FunctionCache(lambda fn, options: fn(options), on_evict=evicted.append)

    def triple(x):
        return 3 * x

    assert cache.get(triple, 2) == cache.get(triple, 2) == 6
    del triple
    gc.collect()
    assert (len(cache), evicted) == (0, [6])
