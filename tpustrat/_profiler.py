"""Tracing chosen training steps with ``jax.profiler``, each step marked for TensorBoard."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Generator

import jax

from tpustrat._checks import check_int, describe


class StepProfiler:
    """Traces steps ``first`` to ``last`` of a loop with ``jax.profiler``, step by step.

    Wrap each step of the loop in ``profiler.step(i)``: every step is marked with
    ``jax.profiler.StepTraceAnnotation`` (so TensorBoard's profile plugin and XProf show step
    boundaries and step times), the trace starts when the first step in ``[first, last]``
    begins (a resumed loop may start past ``first``) and stops when step ``last`` ends, after
    every program dispatched until then has finished, so the last traced step's device work is
    in the trace. The trace lands in ``logdir/plugins/profile/<run>/``: an ``.xplane.pb`` for
    ``tensorboard --logdir LOGDIR`` (with the ``tensorboard-plugin-profile`` package) or XProf,
    and a ``.trace.json.gz`` that ui.perfetto.dev opens. Outside the traced range a step costs
    only its annotation.

    Args:
      logdir: the folder the trace is written under.
      first: the first step to trace.
      last: the last step to trace (inclusive); default ``first``.
      name: the name of the step annotation.

    Example:
      >>> import tempfile
      >>> strategy = ts.TPUStrategy()
      >>> profiler = ts.StepProfiler(tempfile.mkdtemp(), first=2, last=3)
      >>> x = np.float32(0)
      >>> for i in range(5):
      ...     with profiler.step(i):
      ...         x = strategy.run(lambda x: x + 1, args=(x,))
      >>> float(x), profiler.traced_steps
      (5.0, [2, 3])
    """

    def __init__(
        self, logdir: str | pathlib.Path, first: int, last: int | None = None, name: str = "train"
    ) -> None:
        if not isinstance(logdir, (str, pathlib.Path)):
            raise TypeError(
                f"StepProfiler logdir must be a folder path (str or pathlib.Path), got "
                f"{describe(logdir)}"
            )
        if not isinstance(name, str) or not name:
            raise TypeError(f"StepProfiler name must be a non-empty str, got {describe(name)}")
        self.logdir = pathlib.Path(logdir)
        self.first = check_int("first", first, minimum=0)
        self.last = self.first if last is None else check_int("last", last, minimum=0)
        if self.last < self.first:
            raise ValueError(
                f"last {self.last} comes before first {self.first}; pass first <= last (the "
                "steps first to last are traced)"
            )
        self.name = name
        self.traced_steps: list[int] = []
        self._tracing = False

    @contextlib.contextmanager
    def step(self, step: int) -> Generator[None, None, None]:
        """Marks ``step`` for the profiler, and starts or stops the trace at the range's ends."""
        step = check_int("step", step, minimum=0)
        if self.first <= step <= self.last and not self._tracing and not self.traced_steps:
            jax.profiler.start_trace(str(self.logdir), create_perfetto_trace=True)
            self._tracing = True
        try:
            with jax.profiler.StepTraceAnnotation(self.name, step_num=step):
                yield
        finally:
            if self._tracing:
                self.traced_steps.append(step)
                if step >= self.last:
                    self.stop()

    def stop(self) -> None:
        """Ends the trace now (if running), once every dispatched program has finished.

        ``step`` calls it after the last traced step; call it yourself when the loop ends
        early, e.g. in a ``finally`` block.
        """
        if not self._tracing:
            return
        self._tracing = False
        try:
            jax.block_until_ready(jax.live_arrays())
        finally:
            jax.profiler.stop_trace()
