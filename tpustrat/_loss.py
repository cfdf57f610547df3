"""The mean loss over the global batch, computed on each replica (tf.nn.compute_average_loss)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from tpustrat._checks import check_array, check_int
from tpustrat._context import get_replica_context


def compute_average_loss(
    per_example_loss: ArrayLike,
    sample_weight: ArrayLike | None = None,
    global_batch_size: int | None = None,
    *,
    mask: ArrayLike | None = None,
) -> jax.Array:
    """This replica's share of the mean loss over the global batch.

    Inside ``strategy.run`` each replica sees ``B / R`` of the ``B`` examples. The loss to
    differentiate is ``sum(per_example_loss * sample_weight) / B`` on every replica; the sum of
    the replicas' gradients (``ctx.all_reduce("sum", grads)``) is then the gradient of the mean
    over the global batch, as on one device (with ``ts.shard_update``, pass
    ``reduce_op="sum"`` for the same reason). Outside ``run`` the call sees the whole batch and
    returns its mean.

    With ``mask`` (the ``(B / R,)`` bool mask of ``ts.InputOptions(mask=True)``),
    padding rows contribute nothing and the divisor is the number of real rows over all
    replicas (one all-reduce of a count), so a partial last batch gives the gradient of the mean
    over its real examples alone.

    Args:
      per_example_loss: the replica's per-example losses, shape ``(B / R, ...)``; every element
        counts (a per-token loss of shape ``(B / R, T)`` is summed over tokens too).
      sample_weight: weights broadcastable to ``per_example_loss``, or None.
      global_batch_size: the divisor ``B``; default ``per_example_loss.shape[0]`` times the
        number of replicas. Not allowed with ``mask``, whose real rows are the divisor.
      mask: True for the real rows (shape ``(B / R,)``), or None.

    Returns:
      A float scalar: this replica's sum of weighted losses divided by the global batch size.

    Example:
      >>> strategy = ts.TPUStrategy()
      >>> losses = ts.PerReplica([np.full(2, i, np.float32) for i in range(8)])
      >>> share = strategy.run(ts.compute_average_loss, args=(losses,))
      >>> float(strategy.reduce("sum", share))  # the mean of all 16 losses
      3.5
    """
    loss = _array("per_example_loss", per_example_loss)
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise TypeError(
            f"compute_average_loss: per_example_loss has dtype {loss.dtype}; pass floating-point "
            "losses, e.g. per_example_loss.astype(jnp.float32)"
        )
    if loss.ndim == 0:
        raise ValueError(
            "compute_average_loss: per_example_loss is a scalar; pass one loss per example "
            "(shape (per_replica_batch, ...)), or divide an already summed loss yourself"
        )
    if sample_weight is not None:
        weight = _array("sample_weight", sample_weight, kinds="real numbers").astype(loss.dtype)
        try:
            loss = loss * jnp.broadcast_to(weight, loss.shape)
        except ValueError:
            raise ValueError(
                f"compute_average_loss: sample_weight of shape {weight.shape} does not broadcast "
                f"to per_example_loss of shape {loss.shape}; pass one weight per example"
            ) from None
    context = get_replica_context()
    if mask is None:
        if global_batch_size is None:
            replicas = 1 if context is None else context.num_replicas_in_sync
            return jnp.sum(loss) / (loss.shape[0] * replicas)
        # A float divisor: an int beyond int32 would not fit the int32 JAX makes of it.
        return jnp.sum(loss) / float(check_int("global_batch_size", global_batch_size, minimum=1))
    if global_batch_size is not None:
        raise ValueError(
            f"compute_average_loss got mask and global_batch_size={global_batch_size!r}; with a "
            "mask the divisor is the number of real rows over all replicas: drop one of them"
        )
    rows = _array("mask", mask, kinds="real numbers")
    if rows.shape != loss.shape[:1]:
        raise ValueError(
            f"compute_average_loss: mask has shape {rows.shape} but per_example_loss has "
            f"{loss.shape[0]} rows; pass the batch's (per_replica_batch,) mask"
        )
    real = rows.astype(loss.dtype)
    loss = loss * real.reshape(real.shape + (1,) * (loss.ndim - 1))
    count = jnp.sum(real)
    if context is not None:
        count = context.all_reduce("sum", count)
    return jnp.sum(loss) / jnp.maximum(count, 1)


_KINDS: dict[str, tuple[Any, ...]] = {
    "numbers": (jnp.bool_, jnp.number),
    "real numbers": (jnp.bool_, jnp.integer, jnp.floating),
}


def _array(name: str, value: Any, kinds: str = "numbers") -> jax.Array:
    """``value`` as a ``jax.Array``; a TypeError naming ``name`` unless an array of ``kinds``
    (a key of ``_KINDS``; bfloat16 and the other ml_dtypes floats count as floating)."""
    check_array(name, value)
    array = jnp.asarray(value)
    if not any(jnp.issubdtype(array.dtype, kind) for kind in _KINDS[kinds]):
        raise TypeError(
            f"compute_average_loss: {name} has dtype {array.dtype}; pass an array of {kinds}"
        )
    return array
