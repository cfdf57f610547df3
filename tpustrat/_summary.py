"""Summaries for TensorBoard, written every N steps by one process, through tensorboardX."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tpustrat._checks import check_int, check_leaf, check_tree, describe, is_iterator
from tpustrat._values import PerReplica, is_key, is_per_replica


def writes_summaries() -> bool:
    """Whether this process writes summaries: process 0 of the job, as TF's chief."""
    return jax.process_index() == 0


class SummaryWriter:
    """Scalars and histograms for TensorBoard, every ``every_n_steps`` steps, from process 0.

    Every process may call ``scalars`` and ``histogram`` with the same arguments (the loop is
    the same everywhere); only process 0 (``strategy.should_save_summary``) copies the values
    to the host and writes the event files, and only on steps that are a multiple of
    ``every_n_steps``, so the steps in between cost nothing and wait for nothing. The event
    files are tensorboardX's (``pip install "tpustrat[summary]"``); point TensorBoard at
    ``logdir``.

    Args:
      logdir: the folder for the event files (created if missing).
      every_n_steps: write on steps ``0, n, 2n, ...``; other steps are skipped.

    Example:
      >>> import tempfile
      >>> strategy = ts.TPUStrategy()
      >>> loss = strategy.reduce("mean", ts.PerReplica([np.float32(i) for i in range(8)]))
      >>> with ts.SummaryWriter(tempfile.mkdtemp(), every_n_steps=10) as writer:
      ...     writer.scalars(0, {"loss": loss}), writer.scalars(5, {"loss": loss})
      (True, False)
    """

    def __init__(self, logdir: str | pathlib.Path, *, every_n_steps: int = 1) -> None:
        if not isinstance(logdir, (str, pathlib.Path)):
            raise TypeError(
                f"SummaryWriter logdir must be a folder path (str or pathlib.Path), got "
                f"{describe(logdir)}"
            )
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        self.logdir = pathlib.Path(logdir)
        self._writer: Any = None
        self._closed = False
        if writes_summaries():
            try:
                import tensorboardX
            except ImportError as error:
                raise ImportError(
                    "ts.SummaryWriter writes TensorBoard event files with tensorboardX, which is "
                    'not installed; pip install "tpustrat[summary]" (or tensorboardX)'
                ) from error
            self._writer = tensorboardX.SummaryWriter(str(self.logdir))

    def should_write(self, step: int) -> bool:
        """Whether this process writes at ``step``: process 0, on a multiple of every_n_steps."""
        step = check_int("step", step, minimum=0)
        if self._closed:
            raise ValueError(
                f"this SummaryWriter of {str(self.logdir)!r} is closed; make a new one"
            )
        return self._writer is not None and step % self.every_n_steps == 0

    def scalars(self, step: int, values: Mapping[str, Any]) -> bool:
        """Writes each ``name: value`` as a scalar at ``step``, when this process writes then.

        Args:
          step: the training step, an int >= 0.
          values: names to scalars: numbers, or one-element arrays replicated over the mesh
            (``strategy.reduce`` results, ``run`` outputs that are all-reduced).

        Returns:
          Whether anything was written.
        """
        if not isinstance(values, Mapping):
            raise TypeError(
                f"SummaryWriter.scalars values must be a mapping of names to scalars, got "
                f"{describe(values)}; e.g. writer.scalars(step, {{'loss': loss}})"
            )
        if not self.should_write(step):
            return False
        for name, value in values.items():
            if not isinstance(name, str):
                raise TypeError(f"SummaryWriter.scalars: names must be str, got {describe(name)}")
            array = _host_value("scalars", f"values[{name!r}]", value)
            if array.size != 1:
                raise ValueError(
                    f"SummaryWriter.scalars: values[{name!r}] has shape {array.shape}, not one "
                    "value; "
                    "reduce it first (e.g. strategy.reduce('mean', value, axis=0)) or write it "
                    "with histogram"
                )
            self._writer.add_scalar(name, float(array.reshape(())), global_step=step)
        return True

    def histogram(self, step: int, name: str, values: Any) -> bool:
        """Writes the distribution of ``values`` (an array, replicated) at ``step``.

        Returns:
          Whether anything was written.
        """
        if not isinstance(name, str):
            raise TypeError(f"SummaryWriter.histogram name must be a str, got {describe(name)}")
        if not self.should_write(step):
            return False
        array = _host_value("histogram", "values", values)
        if array.size == 0:
            raise ValueError(
                f"SummaryWriter.histogram: values of {name!r} is {array.dtype}"
                f"{list(array.shape)}; pass a non-empty numeric array"
            )
        if not np.isfinite(array).all():
            raise ValueError(
                f"SummaryWriter.histogram: values of {name!r} holds nan or inf; write only "
                "finite values (e.g. drop them with values[np.isfinite(values)])"
            )
        self._writer.add_histogram(name, array.astype(np.float64), global_step=step)
        return True

    def flush(self) -> None:
        """Writes what is buffered to the event files."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event files; later writes are refused."""
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _host_value(method: str, where: str, value: Any) -> np.ndarray:
    """``value`` (named ``where``) copied to this host, refusing distributed values that are
    not one value and anything that is not one real number or array of them."""
    leaves = jax.tree.leaves(value, is_leaf=lambda x: is_per_replica(x) or is_iterator(x))
    if any(isinstance(leaf, PerReplica) for leaf in leaves):
        raise TypeError(
            f"SummaryWriter.{method}: {where} is a PerReplica, one value per replica; combine "
            "it first with strategy.reduce('mean', value) (or 'sum')"
        )
    if isinstance(value, (list, tuple)):  # a list of numbers, for a histogram
        check_tree(f"SummaryWriter.{method}: {where}", value)
    elif isinstance(value, (int, float, np.ndarray, np.generic, jax.Array)) and not is_key(value):
        check_leaf(f"SummaryWriter.{method}: {where}", value)
    else:
        raise TypeError(
            f"SummaryWriter.{method}: {where} is {describe(value)}, not a number or a numeric array"
        )
    if isinstance(value, jax.Array) and not value.is_fully_replicated:
        raise ValueError(
            f"SummaryWriter.{method}: {where} is an array split over the devices "
            f"({value.sharding}); pass a replicated value, e.g. strategy.reduce's result"
        )
    array = np.asarray(jax.device_get(value))
    real = (jnp.floating, jnp.integer, jnp.bool_)  # bfloat16 too, which numpy calls no float
    if not any(jnp.issubdtype(array.dtype, kind) for kind in real):
        raise TypeError(
            f"SummaryWriter.{method}: {where} is {describe(value)}, not a real number or an "
            "array of them"
        )
    return array
