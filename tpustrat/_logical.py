"""Logical-core annotations: split, replicate or assign a tensor across one replica's cores.

Inside ``strategy.run`` the replica axis is manual and the logical-core axes are left to the
partitioner, so each annotation is a sharding constraint on those axes: numerically the
identity (gradients included), it tells XLA how to lay the tensor out over the replica's cores.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tpustrat import _mesh
from tpustrat._checks import check_int, describe
from tpustrat._context import Strategy, check_in_step_tree, get_replica_context


def split_to_logical_devices(
    strategy: Strategy, mesh: Mesh, tensor: jax.Array, partition_dimensions: Sequence[int]
) -> jax.Array:
    """Tiles ``tensor`` over a replica's logical cores: ``experimental_split_to_logical_devices``.

    Args:
      strategy: the strategy whose method was called; it must be the one running the step.
      mesh: its mesh, whose logical cores are factored into prime-sized sub-axes.
      tensor: a value inside the step function.
      partition_dimensions: one positive int per dimension of ``tensor``, multiplying to the
        number of logical cores; each must divide its dimension.

    Returns:
      ``tensor``, annotated.
    """
    _check_in_replica("experimental_split_to_logical_devices", strategy)
    check_in_step_tree("tensor", tensor)
    cores = _mesh.num_cores(mesh)
    shape = np.shape(tensor)
    if not isinstance(partition_dimensions, (list, tuple, np.ndarray)) or (
        isinstance(partition_dimensions, np.ndarray) and partition_dimensions.ndim != 1
    ):
        raise TypeError(
            f"partition_dimensions must be a list of ints, got "
            f"{describe(partition_dimensions)}; pass one int per "
            "dimension of the tensor, e.g. [1, 2]"
        )
    dims = [
        check_int(f"partition_dimensions[{i}]", d, minimum=1)
        for i, d in enumerate(partition_dimensions)
    ]
    if len(dims) != len(shape):
        raise ValueError(
            f"partition_dimensions {dims} has {len(dims)} entries but the tensor has rank "
            f"{len(shape)} (shape {shape}); give one entry per dimension, 1 for no split"
        )
    if int(np.prod(dims)) != cores:
        raise ValueError(
            f"partition_dimensions {dims} multiply to {int(np.prod(dims))} but each replica "
            f"has {cores} logical cores; make their product {cores}"
        )
    for axis, (size, parts) in enumerate(zip(shape, dims)):
        if size % parts:
            raise ValueError(
                f"dimension {axis} of the tensor has size {size}, which is not divisible by "
                f"partition_dimensions[{axis}]={parts}; pad the tensor or choose a divisor of "
                f"{size}"
            )
    return _constrain(mesh, tensor, P(*_spec_entries(mesh, dims)))


def replicate_to_logical_devices(strategy: Strategy, mesh: Mesh, tensor: jax.Array) -> jax.Array:
    """Keeps ``tensor`` whole on every core of ``mesh``'s replica (``strategy``'s, checked)."""
    _check_in_replica("experimental_replicate_to_logical_devices", strategy)
    check_in_step_tree("tensor", tensor)
    return _constrain(mesh, tensor, P())


def assign_to_logical_device(
    strategy: Strategy, mesh: Mesh, tensor: jax.Array, logical_device_id: int, spmd: bool
) -> jax.Array:
    """Checks TF's placement on one logical core and keeps ``tensor`` whole on every core.

    ``spmd`` is the strategy's flag: True refuses the call, as in TF.
    """
    _check_in_replica("experimental_assign_to_logical_device", strategy)
    check_in_step_tree("tensor", tensor)
    if spmd:
        raise ValueError(
            "experimental_assign_to_logical_device is not available with spmd=True (TF's "
            "experimental_spmd_xla_partitioning); use experimental_split_to_logical_devices, "
            "or build the strategy with spmd=False"
        )
    cores = _mesh.num_cores(mesh)
    if check_int("logical_device_id", logical_device_id, minimum=0) >= cores:
        raise ValueError(
            f"logical_device_id {logical_device_id!r} is out of range: each replica has "
            f"{cores} logical cores, numbered 0 to {cores - 1}"
        )
    return _constrain(mesh, tensor, P())


def _spec_entries(mesh: Mesh, dims: list[int]) -> list[tuple[str, ...] | None]:
    """Gives each split dimension the next sub-axes of the cores, major first."""
    axes = _mesh.core_axes(mesh)
    entries, next_axis = [], 0
    for parts in dims:
        taken, product = [], 1
        while product < parts and next_axis < len(axes):
            taken.append(axes[next_axis])
            product *= mesh.shape[axes[next_axis]]
            next_axis += 1
        if product != parts:
            sizes = [mesh.shape[a] for a in axes]
            raise ValueError(
                f"partition_dimensions {dims} cannot be laid out on logical cores factored as "
                f"{sizes} (row-major): each split must be a product of consecutive factors"
            )
        entries.append(tuple(taken) or None)
    return entries


def _constrain(mesh: Mesh, tensor: jax.Array, spec: P) -> jax.Array:
    # From JAX 0.8 on, named on the mesh of the trace (``mesh`` with the replica axis manual
    # inside ``run``), so that the constraint's transpose under jax.grad agrees with the
    # context it runs in; JAX 0.7 lowers only a concrete mesh here.
    context = jax.sharding.get_abstract_mesh()
    if _NAMES_CONTEXT_MESH and context.axis_names == mesh.axis_names:
        if set(context.manual_axes) == set(mesh.axis_names):
            # Every axis manual: the replica's block is already one device's, laid out by
            # nothing; JAX 0.8.1 asserts on a constraint naming only manual axes.
            return tensor
        return jax.lax.with_sharding_constraint(tensor, NamedSharding(context, spec))
    return jax.lax.with_sharding_constraint(tensor, NamedSharding(mesh, spec))


_NAMES_CONTEXT_MESH = tuple(int(part) for part in jax.__version__.split(".")[:2]) >= (0, 8)


def _check_in_replica(what: str, strategy: Strategy) -> None:
    context = get_replica_context()
    if context is None:
        raise RuntimeError(
            f"{what} annotates a tensor inside a replica's step; call it inside the function "
            "you pass to strategy.run"
        )
    if context.strategy is not strategy:
        raise ValueError(
            f"{what} was called on {strategy!r} inside a step run by {context.strategy!r}; "
            "annotate with the strategy that runs the step"
        )
