"""Waits that outlast a limit: which call each process of a job is stuck in, said in its log.

In a job of several processes every process must make the same ``run``, ``reduce``, ``gather``
and checkpoint calls in the same order. A process that makes one the others skip waits for
them, silently, for ever. ``ts.initialize_cluster`` starts one daemon thread per process (the
watchdog); the calls that block mark their wait (``with waiting("run"):`` around the wait
itself), and when one outlasts the limit the watchdog logs, on the ``"tpustrat"`` logger at
WARNING, which call this process waits in and how many calls of each kind it has made. Every
stuck process says it, so comparing the processes' logs shows the one that went its own way.

Marking a wait updates three attributes (no lock, clock or allocation), so ``run`` can mark
its dispatch window's waits. The marks of all threads are one stream: a wait opened by another
thread while one lasts restarts the clock.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import Any

logger = logging.getLogger("tpustrat")

# What a process can wait in, in the order the counts are reported; "shutdown" is JAX's
# end-of-job barrier, which a process whose program ended waits in for the others.
KINDS = ("run", "reduce", "gather", "checkpoint save", "shutdown")

calls: dict[str, int] = dict.fromkeys(KINDS, 0)
"""How many calls of each kind this process has made; the blocking points count them."""

_POLL_SECONDS = 1.0  # the watchdog looks this often, or four times per limit if that is sooner


class _Marks:
    """What this process waits in: the kind of its latest wait, how many waits are open, and
    how many were ever opened (which tells one wait from the next)."""

    __slots__ = ("kind", "open", "opened")

    def __init__(self):
        self.kind, self.open, self.opened = "", 0, 0


_marks = _Marks()


class _Watchdog:
    """The thread that reports a wait that lasts, and what it needs to say it."""

    def __init__(self, process_id: int, num_processes: int, limit: float):
        self.process_id, self.num_processes, self.limit = process_id, num_processes, limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tpustrat-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        """Polls the marks; a wait seen open on two polls ``limit`` seconds apart is reported.

        A wait is timed from the first poll that sees it, so it is reported between ``limit``
        and ``limit`` plus two polls after it began, once.
        """
        seen, since, reported = -1, 0.0, -1
        poll = min(_POLL_SECONDS, self.limit / 4)
        while not self._stop.wait(poll):
            opened, is_open, kind = _marks.opened, _marks.open > 0, _marks.kind
            now = time.monotonic()
            if not is_open or opened != seen:
                seen, since = (opened, now) if is_open else (-1, 0.0)
            elif opened != reported and now - since >= self.limit:
                logger.warning(self.describe(kind))
                reported = opened

    def describe(self, kind: str) -> str:
        """The warning for a wait in ``kind`` that outlasted the limit."""
        who = f"process {self.process_id} of {self.num_processes}"
        if kind == "shutdown":
            where = "the job's shutdown: its program ended, and JAX waits for the other processes"
        elif kind == "run":
            where = f"run (run call {calls['run']} waits for an earlier step to finish)"
        else:
            where = f"{kind} (its {kind} call {calls[kind]})"
        counts = ", ".join(f"{name} {calls[name]}" for name in KINDS if name != "shutdown")
        return (
            f"tpustrat: {who} has waited {self.limit:g} s or more in {where}; its calls so "
            f"far: {counts}. Every process must make the same run, reduce, gather and "
            "checkpoint calls in the same order: compare this line with the other processes' "
            "logs; the process whose counts differ made a call the others did not (often a "
            "call under `if jax.process_index() == 0:`)"
        )


_watchdog: _Watchdog | None = None


class _Wait:
    """``with`` marks a wait in one kind: three attribute updates, nothing else."""

    __slots__ = ("kind",)

    def __init__(self, kind: str):
        self.kind = kind

    def __enter__(self) -> None:
        marks = _marks
        marks.kind = self.kind
        marks.open += 1
        marks.opened += 1

    def __exit__(self, error_type: Any, error: Any, trace: Any) -> None:
        _marks.open -= 1


class _Call(_Wait):
    """``with`` counts a call of one kind and marks its body as a wait."""

    __slots__ = ()

    def __enter__(self) -> None:
        calls[self.kind] += 1
        marks = _marks
        marks.kind = self.kind
        marks.open += 1
        marks.opened += 1


_WAITS = {kind: _Wait(kind) for kind in KINDS}
_CALLS = {kind: _Call(kind) for kind in KINDS}


def waiting(kind: str) -> _Wait:
    """Marks a wait in ``kind``, whose calls are counted elsewhere (``run``'s window).

    Example:
      >>> with waiting("run"):
      ...     pass  # a block_until_ready of an earlier step
    """
    return _WAITS[kind]


def calling(kind: str) -> _Wait:
    """Counts one call of ``kind`` and marks its whole body as a wait (``reduce``).

    Example:
      >>> before = calls["gather"]
      >>> with calling("gather"):
      ...     pass  # reading every replica's value
      >>> calls["gather"] - before
      1
    """
    return _CALLS[kind]


def start(process_id: int, num_processes: int, limit: float | None) -> None:
    """Watches this process's waits from now on, reporting those over ``limit`` seconds.

    ``limit=None`` stops watching. JAX's end-of-job barrier is watched too: the program's end
    opens a wait in ``"shutdown"`` (an ``atexit`` handler that runs before JAX's own, which
    was registered when jax was imported).
    """
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
        atexit.unregister(_mark_shutdown)
    if limit is not None:
        _watchdog = _Watchdog(process_id, num_processes, limit)
        atexit.register(_mark_shutdown)


def _mark_shutdown() -> None:
    _WAITS["shutdown"].__enter__()
