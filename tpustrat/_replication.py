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
reach a fixed point); everything else (``rng_uniform``, host callbacks, ``ppermute``,
``all_to_all``, ``psum_scatter``, unknown or new primitives) varies along every axis. A
replicated result is never wrong, only sometimes missed. The proof assumes, as tf.distribute's
Mirrored values do, that one program given the same inputs computes the same outputs on every
device.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from types import ModuleType
from typing import Any

import jax.lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Primitive
from jax.extend.core import primitives as _public

# isort: split
# JAX has no public name for these primitives (jax.extend.core.primitives lists most others):
# the varying-type cast, resharding, the invariant and asynchronous collectives, shard_map,
# typed random keys and some linear algebra. This is tpustrat's only import from jax._src.
from jax._src import ad_checkpoint as _ad_checkpoint_module
from jax._src import core as _core_module
from jax._src import pjit as _pjit_module
from jax._src import shard_alike as _shard_alike_module
from jax._src import shard_map as _shard_map_module
from jax._src.lax import lax as _lax_module
from jax._src.lax import linalg as _linalg_module
from jax._src.lax import parallel as _parallel_module
from jax._src.random import prng as _prng_module

# isort: split
from tpustrat._collectives import HIERARCHICAL_ALL_REDUCE
from tpustrat._mesh import REPLICA_AXIS


class _Present:
    """The primitives a module of this JAX has, and None for those it lacks.

    The tables name primitives of the newest JAX; an older one (down to the 0.7 that
    pyproject.toml claims) lacks a few, and what it lacks cannot occur in its jaxprs.
    """

    def __init__(self, module: ModuleType):
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name, None)


public, lax = _Present(_public), _Present(jax.lax)
_core, _pjit = _Present(_core_module), _Present(_pjit_module)
_shard_alike, _shard_map = _Present(_shard_alike_module), _Present(_shard_map_module)
_lax, _linalg = _Present(_lax_module), _Present(_linalg_module)
_parallel, _prng = _Present(_parallel_module), _Present(_prng_module)
_ad_checkpoint = _Present(_ad_checkpoint_module)

# Deterministic functions of their inputs: the output varies exactly when an input does.
PRESERVING: frozenset[Primitive] = frozenset(
    {
        # elementwise arithmetic, comparisons, logic and special functions
        *(
            public.abs_p, public.acos_p, public.acosh_p, public.add_jaxvals_p, public.add_p,
            public.and_p, public.asin_p, public.asinh_p, public.atan2_p, public.atan_p,
            public.atanh_p, public.bessel_i0e_p, public.bessel_i1e_p, public.cbrt_p,
            public.ceil_p, public.clamp_p, public.clz_p, public.complex_p, public.conj_p,
            public.cos_p, public.cosh_p, public.digamma_p, public.div_p, public.eq_p,
            public.eq_to_p, public.erf_inv_p, public.erf_p, public.erfc_p, public.exp2_p,
            public.exp_p, public.expm1_p, public.floor_p, public.ge_p, public.gt_p,
            public.igamma_grad_a_p, public.igamma_p, public.igammac_p, public.imag_p,
            public.integer_pow_p, public.is_finite_p, public.le_p, public.le_to_p,
            public.lgamma_p, public.log1p_p, public.log_p, public.logistic_p, public.lt_p,
            public.lt_to_p, public.max_p, public.min_p, public.mul_p, public.ne_p,
            public.neg_p, public.nextafter_p, public.not_p, public.or_p, public.polygamma_p,
            public.population_count_p, public.pow_p, public.real_p,
            public.regularized_incomplete_beta_p, public.rem_p, public.round_p, public.rsqrt_p,
            public.select_n_p, public.shift_left_p, public.shift_right_arithmetic_p,
            public.shift_right_logical_p, public.sign_p, public.sin_p, public.sinh_p,
            public.sqrt_p, public.square_p, public.sub_p, public.tan_p, public.tanh_p,
            public.xor_p, public.zeta_p, lax.mulhi_p,
        ),
        # types, layout and identities
        *(
            public.bitcast_convert_type_p, public.broadcast_in_dim_p, public.concatenate_p,
            public.convert_element_type_p, public.copy_p, public.device_put_p, public.iota_p,
            public.pad_p, public.reduce_precision_p, public.reshape_p, public.rev_p,
            public.sharding_constraint_p, public.squeeze_p, public.stop_gradient_p,
            public.transpose_p, lax.optimization_barrier_p, lax.split_p, lax.tile_p,
            _core.pvary_p, _pjit.reshard_p, _pjit.layout_constraint_p,
            _shard_alike.shard_alike_p,
        ),
        # indexing, reductions over local axes, scans, sorting, windows
        *(
            public.approx_top_k_p, public.argmax_p, public.argmin_p, public.cumlogsumexp_p,
            public.cummax_p, public.cummin_p, public.cumprod_p, public.cumsum_p,
            public.dynamic_slice_p, public.dynamic_update_slice_p, public.gather_p,
            public.reduce_and_p, public.reduce_max_p, public.reduce_min_p, public.reduce_or_p,
            public.reduce_p, public.reduce_prod_p, public.reduce_sum_p, public.reduce_xor_p,
            public.reduce_window_max_p, public.reduce_window_min_p, public.reduce_window_p,
            public.reduce_window_sum_p, public.scatter_add_p, public.scatter_max_p,
            public.scatter_min_p, public.scatter_mul_p, public.scatter_p,
            public.select_and_gather_add_p, public.select_and_scatter_add_p,
            public.select_and_scatter_p, public.slice_p, public.sort_p, public.top_k_p,
            lax.scatter_sub_p,
        ),
        # dots, convolutions, FFTs and linear algebra
        *(
            public.conv_general_dilated_p, public.dot_general_p, public.fft_p,
            public.cholesky_p, public.eig_p, public.eigh_p, public.hessenberg_p,
            public.householder_product_p, public.lu_p, public.qr_p, public.schur_p,
            public.svd_p, public.triangular_solve_p, public.tridiagonal_p,
            public.tridiagonal_solve_p, _lax.ragged_dot_general_p,
            _linalg.lu_pivots_to_permutation_p, _linalg.geqrf_p, _linalg.geqp3_p,
            _linalg.ormqr_p, _linalg.cholesky_update_p, _linalg.symmetric_product_p,
        ),
        # counter-based random numbers: a function of the key (rng_uniform is not: it varies)
        *(
            public.random_bits_p, public.random_fold_in_p, public.random_gamma_p,
            public.random_seed_p, public.random_split_p, public.rng_bit_generator_p,
            public.threefry2x32_p, _prng.random_wrap_p, _prng.random_unwrap_p,
            _prng.iota_2x32_shape_p,
        ),
        # collectives that give each replica the value it had (pbroadcast keeps it, to be safe)
        # and the ends of asynchronous collectives, which pass on what their start produced
        *(
            _parallel.pbroadcast_p, _parallel.pbroadcast_start_p, _parallel.all_gather_done_p,
            _parallel.psum_done_p, _parallel.reduce_scatter_done_p,
            _parallel.all_to_all_done_p, _parallel.pbroadcast_done_p,
            _parallel.ppermute_done_p,
        ),
    }
    - {None}
)  # fmt: skip

# Collectives whose result every replica receives whole, when they combine the replica axis.
COMBINING: frozenset[Primitive] = frozenset(
    {
        public.psum_p, public.pmax_p, public.pmin_p, public.all_gather_p,
        _parallel.psum_invariant_p, _parallel.all_gather_invariant_p,
        _parallel.psum_start_p, _parallel.psum_invariant_start_p,
        _parallel.all_gather_start_p,
    }
    - {None}
)  # fmt: skip

# Calls whose single inner jaxpr (under this parameter) takes the call's inputs and gives its
# outputs; the proof follows them.
_CALL_PARAMETERS: dict[Any, str] = {
    public.jit_p: "jaxpr",
    public.closed_call_p: "call_jaxpr",
    public.call_p: "call_jaxpr",
    public.remat_p: "jaxpr",
    _ad_checkpoint.remat_p: "jaxpr",  # named "remat2" in older JAX, where it is not public
    public.custom_jvp_call_p: "call_jaxpr",
    public.custom_vjp_call_p: "call_jaxpr",
    _shard_map.shard_map_p: "jaxpr",
}
CALLS: dict[Primitive, str] = {p: name for p, name in _CALL_PARAMETERS.items() if p is not None}

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


# Host callbacks, which JAX runs only where every mesh axis is manual, and the layout annotations
# that need an axis left to the partitioner (by name: this only picks how ``run`` traces).
HOST_CALLBACKS = frozenset(
    {"pure_callback", "io_callback", "debug_callback", "debug_print", "buffer_callback"}
)
LAYOUT_ANNOTATIONS = frozenset({"sharding_constraint", "reshard", "layout_constraint"})


def primitive_names(jaxpr: Jaxpr | ClosedJaxpr) -> frozenset[str]:
    """The names of every primitive in ``jaxpr``, inner jaxprs (calls, control flow) included."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for inner in inner_jaxprs(eqn.params):
            names |= primitive_names(inner)
    return frozenset(names)


def reads_axis_index_in_loop(jaxpr: Jaxpr | ClosedJaxpr, in_loop: bool = False) -> bool:
    """Whether ``jaxpr`` reads ``axis_index`` inside a ``while`` or ``scan`` body, at any depth."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    for eqn in jaxpr.eqns:
        if in_loop and eqn.primitive is public.axis_index_p:
            return True
        inner_in_loop = in_loop or eqn.primitive in (public.while_p, public.scan_p)
        if any(
            reads_axis_index_in_loop(inner, inner_in_loop) for inner in inner_jaxprs(eqn.params)
        ):
            return True
    return False


def inner_jaxprs(params: dict[str, Any]) -> list[Jaxpr | ClosedJaxpr]:
    """The jaxprs among an equation's parameters (branches, bodies, reduction computations)."""
    return [
        inner
        for value in params.values()
        for inner in (value if isinstance(value, (tuple, list)) else (value,))
        if isinstance(inner, (Jaxpr, ClosedJaxpr))
    ]


def _only_preserving(jaxpr: Jaxpr | ClosedJaxpr) -> bool:
    """Whether every primitive of ``jaxpr``, inner jaxprs included, is in PRESERVING."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    return all(
        eqn.primitive in PRESERVING and all(map(_only_preserving, inner_jaxprs(eqn.params)))
        for eqn in jaxpr.eqns
    )


def is_classified(primitive: Primitive) -> bool:
    """Whether the proof has a rule for ``primitive`` or it was reviewed and left to vary."""
    return (
        primitive in PRESERVING
        or primitive in COMBINING
        or primitive in CALLS
        or primitive in (public.cond_p, public.scan_p, public.while_p, public.axis_index_p)
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
    """
    combined_axes = frozenset(combined_axes)
    if isinstance(jaxpr, ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
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
    if isinstance(jaxpr, ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    varies: dict[Any, Axes] = dict(zip(jaxpr.invars, inputs))
    varies.update({v: _NONE for v in jaxpr.constvars})

    def read(atom) -> Axes:
        return _NONE if isinstance(atom, Literal) else varies.get(atom, every)

    for eqn in jaxpr.eqns:
        varies.update(zip(eqn.outvars, _equation(eqn, [read(v) for v in eqn.invars], every)))
    return [read(v) for v in jaxpr.outvars]


def _union(sets) -> Axes:
    return frozenset().union(*sets)


def _equation(eqn, inputs: list[Axes], every: Axes) -> list[Axes]:
    primitive = eqn.primitive
    n_out = len(eqn.outvars)
    if primitive in PRESERVING:
        if not all(map(_only_preserving, inner_jaxprs(eqn.params))):
            return [every] * n_out  # it applies a computation (lax.reduce's) that may vary
        return [_union(inputs)] * n_out
    if primitive in COMBINING:
        if eqn.params.get("axis_index_groups") is not None:
            return [every] * n_out  # combines groups of devices, not whole axes
        # Every device of a group along the named axes receives the same result.
        return [_union(inputs) - _named_axes(eqn.params)] * n_out
    if primitive is public.axis_index_p:
        return [_named_axes(eqn.params) & every] * n_out
    if primitive is public.jit_p and eqn.params.get("name") == HIERARCHICAL_ALL_REDUCE:
        # tpustrat's own all-reduce over every replica, by slices: it combines the replica axis
        return [_union(inputs) - {REPLICA_AXIS}] * n_out
    if primitive is public.cond_p:
        if inputs[0]:
            return [every] * n_out  # devices may take different branches
        branches = [_varying_axes(b, inputs[1:], every) for b in eqn.params["branches"]]
        return [_union(column) for column in zip(*branches)]
    if primitive is public.scan_p:
        return _scan(eqn, inputs, every)
    if primitive is public.while_p:
        return _while(eqn, inputs, every)
    if primitive in CALLS:
        inner = eqn.params[CALLS[primitive]]
        if _arity(inner) == (len(inputs), n_out):
            return _varying_axes(inner, inputs, every)
    return [every] * n_out  # callbacks, ppermute, rng_uniform, unknown primitives, ...


def _scan(eqn, inputs: list[Axes], every: Axes) -> list[Axes]:
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


def _while(eqn, inputs: list[Axes], every: Axes) -> list[Axes]:
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


def _arity(jaxpr: Jaxpr | ClosedJaxpr) -> tuple[int, int]:
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    return len(jaxpr.invars), len(jaxpr.outvars)


def _named_axes(params) -> frozenset:
    """The axis names a collective's parameters name (``axes`` or ``axis_name``)."""
    names = set()
    for key in ("axes", "axis_name"):
        value = params.get(key)
        if value is not None:
            names.update(value if isinstance(value, (tuple, list, frozenset, set)) else (value,))
    return frozenset(names)
