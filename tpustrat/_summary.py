"""Summaries for TensorBoard, written every N steps by one process, through tensorboardX."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from tpustrat._checks import check_int
from tpustrat._values import PerReplica, is_per_replica


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

    def __init__(self, logdir: str | pathlib.Path, *, every_n_steps: int = 1):
        if not isinstance(logdir, (str, pathlib.Path)):
            raise TypeError(
                f"SummaryWriter logdir must be a folder path (str or pathlib.Path), got "
                f"{type(logdir).__name__} {logdir!r}"
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
                f"SummaryWriter.scalars takes a mapping of names to scalars, got "
                f"{type(values).__name__}; e.g. writer.scalars(step, {{'loss': loss}})"
            )
        if not self.should_write(step):
            return False
        for name, value in values.items():
            array = _host_value("scalars", name, value)
            if array.size != 1:
                raise ValueError(
                    f"SummaryWriter.scalars: {name!r} has shape {array.shape}, not one value; "
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
        if not self.should_write(step):
            return False
        array = _host_value("histogram", name, values)
        if not np.issubdtype(array.dtype, np.number) or array.size == 0:
            raise ValueError(
                f"SummaryWriter.histogram: {name!r} is {array.dtype}{list(array.shape)}; pass "
                "a non-empty numeric array"
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


def _host_value(method: str, name: Any, value: Any) -> np.ndarray:
    """``value`` copied to this host, refusing distributed values that are not one value."""
    if not isinstance(name, str):
        raise TypeError(f"SummaryWriter.{method}: names must be str, got {type(name).__name__}")
    if isinstance(value, PerReplica) or any(
        isinstance(leaf, PerReplica) for leaf in jax.tree.leaves(value, is_leaf=is_per_replica)
    ):
        raise TypeError(
            f"SummaryWriter.{method}: {name!r} is a PerReplica, one value per replica; combine "
            "it first with strategy.reduce('mean', value) (or 'sum')"
        )
    if isinstance(value, jax.Array) and not value.is_fully_replicated:
        raise ValueError(
            f"SummaryWriter.{method}: {name!r} is an array split over the devices "
            f"({value.sharding}); pass a replicated value, e.g. strategy.reduce's result"
        )
    array = np.asarray(jax.device_get(value))
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise TypeError(
            f"SummaryWriter.{method}: {name!r} is {type(value).__name__} {value!r}, not a number "
            "or a numeric array"
        )
    return array
