"""Which outputs of a replica's step are provably the same on every replica.

``strategy.run`` returns such outputs replicated and the rest per replica. The proof is a
forward pass over the step's jaxpr that finds, for each value, the manual mesh axes along which
it may *vary*: those of the per-replica inputs it depends on and of the ``axis_index`` it
reads, less the axes a collective combined (psum, pmean, pmax, pmin, all_gather). The replica
axis is manual; so are the logical-core axes of a step that calls the host, and a value of
such a step must vary along none of them to be replicated. The rules are keyed on JAX's
primitive objects and fail closed: a primitive passes its inputs' axes through only if it is
on the allow-list below (a deterministic function of its inputs: elementwise math, reshapes,
dots, reductions over local axes, slicing, sorting, linear algebra, counter-based random bits)
and any computation it applies (``lax.reduce``'s, say) is made of such primitives too; control
flow and calls are followed exactly (a ``cond`` on a varying predicate varies, loop carries
reach a fixed point); the markers of ``_jaxpr`` are read as they say (``mark_varying``: varies
along its axes; ``mark_invariant``: one of tpustrat's collectives combined its axes);
everything else (``rng_uniform``, host callbacks, ``ppermute``, ``all_to_all``,
``psum_scatter``, unknown or new primitives) varies along every axis. A replicated result is
never wrong, only sometimes missed. The proof assumes, as tf.distribute's Mirrored values do,
that one program given the same inputs computes the same outputs on every device.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Primitive

from tpustrat import _jaxpr
from tpustrat._jaxpr import primitives as prim
from tpustrat._mesh import REPLICA_AXIS

# Deterministic functions of their inputs: the output varies exactly when an input does.
PRESERVING: frozenset[Primitive] = frozenset(
    {
        # elementwise arithmetic, comparisons, logic and special functions
        *(
            prim.abs_p, prim.acos_p, prim.acosh_p, prim.add_jaxvals_p, prim.add_p,
            prim.and_p, prim.asin_p, prim.asinh_p, prim.atan2_p, prim.atan_p,
            prim.atanh_p, prim.bessel_i0e_p, prim.bessel_i1e_p, prim.cbrt_p,
            prim.ceil_p, prim.clamp_p, prim.clz_p, prim.complex_p, prim.conj_p,
            prim.cos_p, prim.cosh_p, prim.digamma_p, prim.div_p, prim.eq_p,
            prim.eq_to_p, prim.erf_inv_p, prim.erf_p, prim.erfc_p, prim.exp2_p,
            prim.exp_p, prim.expm1_p, prim.floor_p, prim.ge_p, prim.gt_p,
            prim.igamma_grad_a_p, prim.igamma_p, prim.igammac_p, prim.imag_p,
            prim.integer_pow_p, prim.is_finite_p, prim.le_p, prim.le_to_p,
            prim.lgamma_p, prim.log1p_p, prim.log_p, prim.logistic_p, prim.lt_p,
            prim.lt_to_p, prim.max_p, prim.min_p, prim.mul_p, prim.ne_p,
            prim.neg_p, prim.nextafter_p, prim.not_p, prim.or_p, prim.polygamma_p,
            prim.population_count_p, prim.pow_p, prim.real_p,
            prim.regularized_incomplete_beta_p, prim.rem_p, prim.round_p, prim.rsqrt_p,
            prim.select_n_p, prim.shift_left_p, prim.shift_right_arithmetic_p,
            prim.shift_right_logical_p, prim.sign_p, prim.sin_p, prim.sinh_p,
            prim.sqrt_p, prim.square_p, prim.sub_p, prim.tan_p, prim.tanh_p,
            prim.xor_p, prim.zeta_p, prim.mulhi_p,
        ),
        # types, layout and identities
        *(
            prim.bitcast_convert_type_p, prim.broadcast_in_dim_p, prim.concatenate_p,
            prim.convert_element_type_p, prim.copy_p, prim.device_put_p, prim.iota_p,
            prim.pad_p, prim.reduce_precision_p, prim.reshape_p, prim.rev_p,
            prim.sharding_constraint_p, prim.squeeze_p, prim.stop_gradient_p,
            prim.transpose_p, prim.optimization_barrier_p, prim.split_p, prim.tile_p,
            prim.pvary_p, prim.reshard_p, prim.layout_constraint_p,
            prim.shard_alike_p,
        ),
        # indexing, reductions over local axes, scans, sorting, windows
        *(
            prim.approx_top_k_p, prim.argmax_p, prim.argmin_p, prim.cumlogsumexp_p,
            prim.cummax_p, prim.cummin_p, prim.cumprod_p, prim.cumsum_p,
            prim.dynamic_slice_p, prim.dynamic_update_slice_p, prim.gather_p,
            prim.reduce_and_p, prim.reduce_max_p, prim.reduce_min_p, prim.reduce_or_p,
            prim.reduce_p, prim.reduce_prod_p, prim.reduce_sum_p, prim.reduce_xor_p,
            prim.reduce_window_max_p, prim.reduce_window_min_p, prim.reduce_window_p,
            prim.reduce_window_sum_p, prim.scatter_add_p, prim.scatter_max_p,
            prim.scatter_min_p, prim.scatter_mul_p, prim.scatter_p,
            prim.select_and_gather_add_p, prim.select_and_scatter_add_p,
            prim.select_and_scatter_p, prim.slice_p, prim.sort_p, prim.top_k_p,
            prim.scatter_sub_p,
        ),
        # dots, convolutions, FFTs and linear algebra
        *(
            prim.conv_general_dilated_p, prim.dot_general_p, prim.fft_p,
            prim.cholesky_p, prim.eig_p, prim.eigh_p, prim.hessenberg_p,
            prim.householder_product_p, prim.lu_p, prim.qr_p, prim.schur_p,
            prim.svd_p, prim.triangular_solve_p, prim.tridiagonal_p,
            prim.tridiagonal_solve_p, prim.ragged_dot_general_p,
            prim.lu_pivots_to_permutation_p, prim.geqrf_p, prim.geqp3_p,
            prim.ormqr_p, prim.cholesky_update_p, prim.symmetric_product_p,
        ),
        # counter-based random numbers: a function of the key (rng_uniform is not: it varies)
        *(
            prim.random_bits_p, prim.random_fold_in_p, prim.random_gamma_p,
            prim.random_seed_p, prim.random_split_p, prim.rng_bit_generator_p,
            prim.threefry2x32_p, prim.random_wrap_p, prim.random_unwrap_p,
            prim.iota_2x32_shape_p,
        ),
        # collectives that give each replica the value it had (pbroadcast keeps it, to be safe)
        # and the ends of asynchronous collectives, which pass on what their start produced
        *(
            prim.pbroadcast_p, prim.pbroadcast_start_p, prim.all_gather_done_p,
            prim.psum_done_p, prim.reduce_scatter_done_p,
            prim.all_to_all_done_p, prim.pbroadcast_done_p,
            prim.ppermute_done_p,
        ),
    }
    - {None}
)  # fmt: skip

# Collectives whose result every replica receives whole, when they combine the replica axis.
COMBINING: frozenset[Primitive] = frozenset(
    {
        prim.psum_p, prim.pmax_p, prim.pmin_p, prim.all_gather_p,
        prim.psum_invariant_p, prim.all_gather_invariant_p,
        prim.psum_start_p, prim.psum_invariant_start_p,
        prim.all_gather_start_p,
    }
    - {None}
)  # fmt: skip

# Primitives reviewed and left to vary, by name: the default for every primitive without a rule,
# listed so that the census test (tests/test_replication.py) can tell them from new ones.
REVIEWED_AS_VARYING: frozenset[str] = frozenset(
    {
        # different on each replica by design
        "rng_uniform", "ppermute", "ppermute_start", "all_to_all",
        "all_to_all_start", "ragged_all_to_all", "reduce_scatter", "reduce_scatter_start",
        "psend", "precv",
        # host code may answer differently on each device
        "pure_callback", "io_callback", "debug_callback", "debug_print", "inspect_sharding",
        "buffer_callback", "ffi_call", "compute_on",
        # sharding-type casts and collectives of unreduced or reduced values
        "all_gather_reduced", "all_gather_reduced_start", "unreduced_psum",
        "unreduced_psum_start", "unreduced_reduce_scatter", "unreduced_reduce_scatter_start",
        "preduced", "reduced_vary_cast_p", "vary_unreduced_cast_p",
        # higher-order primitives the proof does not enter
        "custom_linear_solve", "custom_lin", "custom_vmap_call", "custom_jvp_call_jaxpr",
        "custom_partitioning", "linear_call", "remat_opt", "composite", "eval_jaxpr",
        "platform_index", "run_state", "call_exported", "fused_call", "xla_metadata_call",
        "cudnn_fusion", "check", "core_map",
        # references, effects, tokens and staging
        "get", "swap", "addupdate", "broadcast_to", "create_linear", "pin", "unpin",
        "new_ref", "empty_ref", "free_ref", "freeze", "accum_grad_in_ref", "box_get",
        "box_set", "new_box", "new_log", "log_extend", "log_read", "call_hi_primitive",
        "call_hi_primitive_linearized", "create_token", "after_all", "stage", "tie",
        "dce_sink", "name", "unreachable", "zeros_like", "consume", "assert_consumed_value",
        "xla_metadata_value", "shape_assertion", "dim_as_value", "dimension_size",
        # uninitialised buffers and extended dtypes
        "empty", "empty2", "to_edtype", "from_edtype", "stack", "unstack", "random_clone",
        # other random-number generators, GPU kernels, sparse arrays and host transfers
        "threefry4x32", "philox2x32", "philox4x32", "scaled_dot", "scaled_matmul",
        "scaled_matmul_wrapper", "dot_product_attention_fwd", "dot_product_attention_bwd",
        "dot_product_attention_fwd_wrapper", "dot_product_attention_bwd_wrapper",
        "dot_product_attention_fp8_fwd", "dot_product_attention_fp8_bwd",
        "dot_product_attention_fp8_fwd_wrapper", "dot_product_attention_fp8_bwd_wrapper",
        "rnn_fwd", "rnn_bwd", "global_array_to_host_local_array",
        "host_local_array_to_global_array", "bcoo_dot_general", "bcoo_dot_general_sampled",
        "bcoo_extract", "bcoo_fromdense", "bcoo_sort_indices", "bcoo_spdot_general",
        "bcoo_sum_duplicates", "bcoo_todense", "bcoo_transpose", "bcsr_dot_general",
        "bcsr_extract", "bcsr_fromdense", "bcsr_todense", "coo_fromdense", "coo_matmat",
        "coo_matvec", "coo_todense", "csr_fromdense", "csr_matmat", "csr_matvec",
        "csr_todense", "todense", "coo_spmm", "coo_spmv", "csr_spmm", "csr_spmv", "spsolve",
        # primitives of older JAX (0.7) that later releases removed or renamed
        "bias_bwd", "bias_fwd", "custom_dce_call", "custom_transpose_call", "dce_sential",
        "eigh_jacobi", "for", "full_to_shard", "shard_to_full", "mesh_cast", "mutable_array",
        "pgather", "sparse_dense_matmul", "sparse_pack_nm", "xla_pmap",
    }
)  # fmt: skip


def _only_preserving(jaxpr: Jaxpr | ClosedJaxpr) -> bool:
    """Whether every primitive of ``jaxpr``, inner jaxprs included, is in PRESERVING."""
    return _jaxpr.primitives_in(jaxpr) <= PRESERVING


def is_classified(primitive: Primitive) -> bool:
    """Whether the proof has a rule for ``primitive`` or it was reviewed and left to vary."""
    return (
        primitive in PRESERVING
        or primitive in COMBINING
        or primitive in _jaxpr.HIGHER_ORDER
        or primitive in (prim.axis_index_p, _jaxpr.VARYING, _jaxpr.INVARIANT)
        or primitive.name in REVIEWED_AS_VARYING
    )


Axes = frozenset[str]  # the mesh axes along which a value may differ
_NONE: Axes = frozenset()


def varying_outputs(
    jaxpr: Jaxpr | ClosedJaxpr,
    varying_inputs: Sequence[bool | Collection[str]],
    combined_axes: Collection[str] = (REPLICA_AXIS,),
) -> list[bool]:
    """For each output of ``jaxpr``, whether it may differ between replicas.

    The proof tracks, for each value, the manual mesh axes along which it may differ: a
    collective over some axes removes them (a sum over the replica axis of a value that
    differs only between replicas is the same everywhere, even where the logical cores are
    manual axes too), and ``axis_index`` adds its axis.

    Args:
      jaxpr: the body of the per-replica step (inside ``shard_map``).
      varying_inputs: for each input, the mesh axes along which it differs (its in_spec's), or
        a bool: True for every axis of ``combined_axes``, False for none.
      combined_axes: the mesh axes a collective must combine for its result to be the same on
        every device: the replica axis, and any logical-core axis the step sees as manual.

    Returns:
      One bool per output; False means provably identical on every replica.

    Example:
      >>> step = lambda x, w: (jax.lax.psum(x, "replica") * w, x * w)
      >>> jaxpr = jax.make_jaxpr(step, axis_env=[("replica", 8)])(1.0, 2.0)
      >>> varying_outputs(jaxpr, [True, False])
      [False, True]
    """
    combined_axes = frozenset(combined_axes)
    jaxpr, _ = _jaxpr.open_jaxpr(jaxpr)
    if len(varying_inputs) != len(jaxpr.invars):
        raise ValueError(f"{len(varying_inputs)} flags for {len(jaxpr.invars)} inputs")
    inputs = [
        frozenset(f) & combined_axes
        if isinstance(f, (set, frozenset, tuple, list))
        else (combined_axes if f else _NONE)
        for f in varying_inputs
    ]
    return [bool(axes) for axes in _varying_axes(jaxpr, inputs, combined_axes)]


def _varying_axes(jaxpr: Jaxpr | ClosedJaxpr, inputs: list[Axes], every: Axes) -> list[Axes]:
    """The axes along which each output of ``jaxpr`` may differ (``every``: all of them)."""
    jaxpr, _ = _jaxpr.open_jaxpr(jaxpr)
    return _jaxpr.walk(
        jaxpr,
        inputs,
        lambda eqn, ins: _equation(eqn, ins, every),
        constants=[_NONE] * len(jaxpr.constvars),
        literal=lambda _: _NONE,
    )


def _union(sets) -> Axes:
    return frozenset().union(*sets)


def _equation(eqn: JaxprEqn, inputs: list[Axes], every: Axes) -> list[Axes]:
    primitive = eqn.primitive
    n_out = len(eqn.outvars)
    if primitive in PRESERVING:
        if not all(map(_only_preserving, _jaxpr.inner_jaxprs(eqn))):
            return [every] * n_out  # it applies a computation (lax.reduce's) that may vary
        return [_union(inputs)] * n_out
    if primitive in COMBINING:
        if eqn.params.get("axis_index_groups") is not None:
            return [every] * n_out  # combines groups of devices, not whole axes
        # Every device of a group along the named axes receives the same result.
        return [_union(inputs) - _named_axes(eqn.params)] * n_out
    if primitive is prim.axis_index_p:
        return [_named_axes(eqn.params) & every] * n_out
    if primitive is _jaxpr.VARYING:
        return [(_union(inputs) | _jaxpr.marked_axes(eqn)) & every]
    if primitive is _jaxpr.INVARIANT:
        # tpustrat's own collectives (the hierarchical all-reduce) vouch for their result
        return [inputs[1] - _jaxpr.marked_axes(eqn)]
    if primitive is prim.cond_p:
        if inputs[0]:
            return [every] * n_out  # devices may take different branches
        branches = [_varying_axes(b, inputs[1:], every) for b in eqn.params["branches"]]
        return [_union(column) for column in zip(*branches)]
    if primitive is prim.scan_p:
        return _scan(eqn, inputs, every)
    if primitive is prim.while_p:
        return _while(eqn, inputs, every)
    body = _jaxpr.call_body(eqn, per_device=True)
    if body is not None:
        return _varying_axes(body[0], inputs, every)
    return [every] * n_out  # callbacks, ppermute, rng_uniform, unknown primitives, ...


def _scan(eqn: JaxprEqn, inputs: list[Axes], every: Axes) -> list[Axes]:
    n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    consts, carry, xs = (
        inputs[:n_consts],
        inputs[n_consts : n_consts + n_carry],
        inputs[n_consts + n_carry :],
    )
    while True:
        out = _varying_axes(eqn.params["jaxpr"], consts + carry + xs, every)
        new_carry = [a | b for a, b in zip(carry, out[:n_carry])]
        if new_carry == carry:
            return out
        carry = new_carry


def _while(eqn: JaxprEqn, inputs: list[Axes], every: Axes) -> list[Axes]:
    n_cond, n_body = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    cond_consts, body_consts = inputs[:n_cond], inputs[n_cond : n_cond + n_body]
    carry = inputs[n_cond + n_body :]
    while True:
        if any(_varying_axes(eqn.params["cond_jaxpr"], cond_consts + carry, every)):
            return [every] * len(carry)  # devices may stop after different trip counts
        out = _varying_axes(eqn.params["body_jaxpr"], body_consts + carry, every)
        new_carry = [a | b for a, b in zip(carry, out)]
        if new_carry == carry:
            return carry
        carry = new_carry


def _named_axes(params) -> frozenset:
    """The axis names a collective's parameters name (``axes`` or ``axis_name``)."""
    names = set()
    for key in ("axes", "axis_name"):
        value = params.get(key)
        if value is not None:
            names.update(value if isinstance(value, (tuple, list, frozenset, set)) else (value,))
    return frozenset(names)
