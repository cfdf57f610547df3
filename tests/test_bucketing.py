"""Shape bucketing: varying batch sizes compile one program per power-of-two bucket."""

import math

import numpy as np
import pytest

import tpustrat as ts
from tpustrat._bucketing import bucket_size

BUCKETED = ts.RunOptions(experimental_bucketizing_dynamic_shape=True)


def _masked_sum(x):
    ctx = ts.get_replica_context()
    mask = ctx.row_mask
    local = (x.sum(axis=1) * mask).sum()
    return ctx.all_reduce("sum", local), mask.sum()


def _batch(n, rows, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, rows, 3)).astype(np.float32)
    return x, ts.PerReplica.from_stacked(x)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 31, 32, 33])
def test_bucket_size(rows):
    size = bucket_size(rows)
    assert size >= rows and size & (size - 1) == 0 and size < 2 * rows + 1


def test_varying_sizes_compile_one_program_per_bucket(strategy, compile_count):
    n = strategy.num_replicas_in_sync
    sizes = list(range(1, 21))
    before = compile_count()
    for rows in sizes:
        x, batch = _batch(n, rows, seed=rows)
        total, count = strategy.run(_masked_sum, args=(batch,), options=BUCKETED)
        np.testing.assert_allclose(float(total), x.sum(), rtol=1e-4, atol=1e-4)
        assert int(np.asarray(count)) == rows
    programs = compile_count() - before
    assert programs <= math.ceil(math.log2(max(sizes))) + 1
    stats = strategy.compile_stats()
    assert stats.num_compiles == 6  # buckets 1, 2, 4, 8, 16, 32
    assert stats.num_compiles + stats.num_cache_hits == len(sizes)
    assert stats.recompiles == ()  # a new bucket is what bucketing is for, not a recompile


def test_other_changes_under_bucketing_are_recompiles():
    strategy = ts.TPUStrategy()
    strategy.run(_masked_sum, args=(_batch(8, 3)[1],), options=BUCKETED)
    as_int = ts.PerReplica.from_stacked(np.ones((8, 3, 3), np.int32))
    strategy.run(_masked_sum, args=(as_int,), options=BUCKETED)
    (recompile,) = strategy.compile_stats().recompiles
    assert recompile.reasons == ("args[0] changed dtype from float32 to int32; cast it once",)


def test_without_bucketing_every_size_compiles(compile_count):
    strategy = ts.TPUStrategy()
    step = lambda x: ts.get_replica_context().all_reduce("sum", x.sum())
    before = compile_count()
    for rows in (3, 5, 6, 7):
        strategy.run(step, args=(_batch(8, rows)[1],))
    assert compile_count() - before == 4
    assert strategy.compile_stats().num_compiles == 4


def test_row_mask_is_none_without_bucketing():
    strategy = ts.TPUStrategy()
    seen = []
    strategy.run(lambda x: seen.append(ts.get_replica_context().row_mask) or x, args=(1.0,))
    assert seen == [None]  # traced once


def test_padded_rows_are_zero_and_outputs_keep_them():
    strategy = ts.TPUStrategy()
    x, batch = _batch(8, 5)
    out = strategy.run(lambda v: v, args=(batch,), options=BUCKETED)
    got = np.asarray(out.stacked)
    assert got.shape == (8, 8, 3)
    np.testing.assert_array_equal(got[:, :5], x)
    np.testing.assert_array_equal(got[:, 5:], 0)


def test_mismatched_leading_dimensions_are_an_error():
    strategy = ts.TPUStrategy()
    a = ts.PerReplica.from_stacked(np.zeros((8, 3, 2), np.float32))
    b = ts.PerReplica.from_stacked(np.zeros((8, 5, 2), np.float32))
    with pytest.raises(ValueError, match=r"leading dimensions are \[3, 5\]"):
        strategy.run(lambda a, b: a, args=(a, b), options=BUCKETED)


def test_a_per_replica_scalar_argument_is_left_alone():
    strategy = ts.TPUStrategy()
    ids = strategy.experimental_distribute_values_from_function(
        lambda ctx: np.float32(ctx.replica_id_in_sync_group)
    )
    x, batch = _batch(8, 3)
    out = strategy.run(
        lambda i, b: (b.sum(axis=1) * ts.get_replica_context().row_mask).sum() + i,
        args=(ids, batch),
        options=BUCKETED,
    )
    want = x.sum(axis=(1, 2)) + np.arange(8)
    np.testing.assert_allclose([float(v) for v in out.values], want, rtol=1e-5)
