"""Preemption: save at a step boundary every process agrees on when the job is told to stop.

In the spirit of ``tf.distribute.experimental.PreemptionCheckpointHandler``. A Cloud TPU VM
(or any scheduler) sends SIGTERM some time before it stops a process. The handler notices it,
lets the current step finish, saves a checkpoint of the state after that step at a step every
process reaches, waits for the save to commit, and exits with ``EXIT_CODE``; the restarted job
constructs the handler again, which restores that checkpoint and the input position.

One process: the handler installs a SIGTERM handler (and puts the previous one back on
``close``). Several processes (``jax.distributed``): JAX's preemption service catches SIGTERM on
whichever process receives it and the processes agree through the coordination service on the
first step all of them can still reach (orbax's ``reached_preemption``), so each saves the same
step even when only one was signalled.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import jax

from tpustrat._checkpoint import CheckpointManager
from tpustrat._checks import check_no_iterator, describe
from tpustrat._prefetch import DistributedIterator
from tpustrat._types import PyTree


class PreemptionCheckpointHandler:
    """Restores the latest checkpoint, then saves and stops when the job is preempted.

    Construct it before the training loop: ``state`` is the restored state (or the initial
    one when there is no checkpoint yet), ``completed_steps`` the number of steps it has done,
    and ``iterator`` has been moved to the first batch not trained on. Call ``step_done`` after
    every step: it saves on the manager's interval, and once a preemption notice has come it
    saves that step, waits for the write and exits with status ``exit_code`` (``EXIT_CODE``,
    42, by default), so that a supervisor restarts the job; with ``exit_code=None`` it returns
    True instead and training may go on.

    Args:
      manager: the ``ts.CheckpointManager`` to restore from and save to.
      state: the initial training state; also the restore target (same structure and
        shardings as what is saved).
      iterator: a fresh ``ts.DistributedIterator`` whose position is saved and restored.
      exit_code: the status to exit with after the preemption save; None keeps running.

    Example:
      >>> import tempfile
      >>> strategy = ts.TPUStrategy()
      >>> manager = ts.CheckpointManager(tempfile.mkdtemp(), strategy, save_interval_steps=2)
      >>> handler = ts.PreemptionCheckpointHandler(manager, {"w": np.float32(0)})
      >>> state = handler.state
      >>> for step in range(handler.completed_steps, 3):
      ...     state = {"w": state["w"] + 1}
      ...     preempted = handler.step_done(state)
      >>> handler.close()
      >>> manager.latest_step(), float(manager.restore(state)["w"])
      (2, 2.0)
    """

    EXIT_CODE = 42

    def __init__(
        self,
        manager: CheckpointManager,
        state: PyTree,
        *,
        iterator: DistributedIterator | None = None,
        exit_code: int | None = EXIT_CODE,
    ) -> None:
        if not isinstance(manager, CheckpointManager):
            raise TypeError(f"manager must be a ts.CheckpointManager, got {type(manager).__name__}")
        if exit_code is not None and (
            isinstance(exit_code, bool) or not isinstance(exit_code, int)
        ):
            raise TypeError(f"exit_code must be an int or None, got {describe(exit_code)}")
        check_no_iterator("state", state, live=True)
        self._manager = manager
        self._iterator = iterator
        self._exit_code = exit_code
        self._notice = threading.Event()
        self._previous_handler = None
        latest = manager.latest_step()
        if latest is None:
            self.state, self.completed_steps = state, 0
        else:
            self.state = manager.restore(state, step=latest, iterator=iterator)
            self.completed_steps = latest
        self.saved_step: int | None = None
        # Several processes: JAX's preemption service owns SIGTERM and syncs the step.
        self._watch_signal = jax.process_count() == 1
        if self._watch_signal:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        self._notice.set()

    def reached_preemption(self, step: int) -> bool:
        """Whether the job saves and stops at ``step`` (every process agrees on the answer)."""
        if self._watch_signal:
            return self._notice.is_set()
        return self._manager.reached_preemption(step)

    def step_done(self, state: PyTree) -> bool:
        """Records one finished step with its new ``state``; saves as due; stops if preempted.

        Args:
          state: the training state after the step.

        Returns:
          True if this step was saved because of a preemption notice (only with
          ``exit_code=None``; otherwise the process exits with ``exit_code`` after the save).

        Raises:
          CheckpointError: if the save cannot be written; ``state`` is untouched.
        """
        self.completed_steps += 1
        self.state = state
        step = self.completed_steps
        if not self.reached_preemption(step):
            self._manager.save(step, state, iterator=self._iterator)
            return False
        self._manager.save(step, state, iterator=self._iterator, force=True)
        self._manager.wait_until_finished()
        self.saved_step = step
        self._notice.clear()
        if self._exit_code is not None:
            self.close()
            sys.exit(self._exit_code)
        return True

    def close(self) -> None:
        """Waits for the last save and puts back the SIGTERM handler that was there before."""
        self._manager.wait_until_finished()
        if self._watch_signal and self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def __enter__(self) -> PreemptionCheckpointHandler:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
