"""Prefetch: the distributed iterator, whose thread keeps batches ready on the devices."""

from __future__ import annotations

import itertools
import queue
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax

from tpustrat._checks import check_int
from tpustrat._values import PerReplica, is_distributed

PyTree = Any

THREAD_NAME_PREFIX = "tpustrat-prefetch"

# How long ``close`` waits for the thread to finish the element it is reading.
_JOIN_TIMEOUT_S = 10.0
# How often a producer waiting for room in the buffer checks whether it was stopped.
_POLL_S = 0.05

_END = object()
_NOTHING = object()
_thread_ids = itertools.count()


class _Failure(NamedTuple):
    """An exception raised by the source, carried to the consumer."""

    error: BaseException


class DistributedIterator:
    """One epoch of a distributed dataset, read ahead by a background thread.

    Returned by ``iter(dist)``. ``next(elements)`` runs in a thread named
    ``tpustrat-prefetch-<n>``, so whatever producing an element costs (reading the dataset,
    checking the batch, copying it to the devices) overlaps with the step. The thread keeps up to
    ``buffer_size`` elements ready or in preparation. An exception raised while producing an
    element is raised again, the same object with its traceback, by the ``next`` call that would
    have returned that element. After the end of the data, an error or ``close()``, ``next``
    raises StopIteration. The thread holds no reference to the iterator, so dropping the iterator
    stops the thread; ``close()`` or leaving a ``with`` block stops it at once.

    Args:
      elements: the distributed elements to read ahead; only the thread advances it.
      buffer_size: how many elements may be ready ahead of the consumer; 0 reads synchronously
        in ``next`` (no thread).

    Example:
      >>> with DistributedIterator(iter(range(3)), buffer_size=2) as numbers:
      ...     list(numbers)
      [0, 1, 2]
    """

    def __init__(self, elements: Iterator[PyTree], buffer_size: int):
        check_int("buffer_size", buffer_size, minimum=0)
        self._elements: Iterator[PyTree] = iter(())
        self._channel: _Channel | None = None
        self._finished = False
        self._peeked = _NOTHING
        self._element_spec = None
        if buffer_size == 0:
            self._elements = elements
            return
        name = f"{THREAD_NAME_PREFIX}-{next(_thread_ids)}"
        channel = _Channel(buffer_size, elements, name)
        self._channel = channel
        self._finalizer = weakref.finalize(self, channel.shut_down)
        channel.thread.start()

    def __iter__(self) -> DistributedIterator:
        return self

    def __next__(self) -> PyTree:
        if self._peeked is not _NOTHING:
            element, self._peeked = self._peeked, _NOTHING
            return element
        if self._finished:
            raise StopIteration
        if self._channel is None:
            try:
                return next(self._elements)
            except BaseException:
                self.close()
                raise
        item = self._channel.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            error = item.error
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(
                    f"(raised while reading the dataset in thread {self._channel.thread.name}; "
                    "tpustrat's prefetch re-raised it here)"
                )
            raise error
        return item

    @property
    def element_spec(self) -> PyTree:
        """The shapes and dtypes one replica sees in the step: ``jax.ShapeDtypeStruct`` leaves.

        Reads ahead one element if none has been seen yet; ``next`` still returns it.
        """
        if self._element_spec is None:
            if self._peeked is _NOTHING:
                try:
                    self._peeked = next(self)
                except StopIteration:
                    raise ValueError(
                        "element_spec needs one batch but this iterator has none left; read it "
                        "from a fresh iterator, iter(dist).element_spec"
                    ) from None
            self._element_spec = _per_replica_spec(self._peeked)
        return self._element_spec

    def close(self) -> None:
        """Stops the thread and drops the read-ahead elements; ``next`` then raises StopIteration.

        Waits for the thread to finish reading the element it is on, if any.
        """
        self._finished = True
        self._elements = iter(())
        self._peeked = _NOTHING
        if self._channel is not None:
            self._finalizer()

    def __enter__(self) -> DistributedIterator:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class _Channel:
    """What the producer thread and the consumer share: a queue, free slots and a stop flag.

    Also the producer thread itself (not yet started), which reads ``source``.
    """

    def __init__(self, buffer_size: int, source: Iterator[Any], name: str):
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.slots = threading.Semaphore(buffer_size)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=_produce, args=(source, self), name=name, daemon=True)

    def get(self) -> Any:
        item = self.queue.get()
        self.slots.release()
        return item

    def wait_for_slot(self) -> bool:
        """Blocks until the buffer has room; False once the consumer has stopped the channel."""
        while not self.slots.acquire(timeout=_POLL_S):
            if self.stopped.is_set():
                return False
        return not self.stopped.is_set()

    def shut_down(self) -> None:
        self.stopped.set()
        thread = self.thread
        if thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT_S)
            if thread.is_alive():
                warnings.warn(
                    f"{thread.name} is still reading an element from the dataset after "
                    f"{_JOIN_TIMEOUT_S:.0f} s; it will exit once that read returns",
                    RuntimeWarning,
                    stacklevel=2,
                )
        while not self.queue.empty():
            self.queue.get_nowait()


def _produce(source: Iterator[Any], channel: _Channel) -> None:
    """The thread's loop: one element per free slot until the end, an error or a stop."""
    try:
        while channel.wait_for_slot():
            try:
                element = next(source)
            except StopIteration:
                channel.queue.put(_END)
                return
            channel.queue.put(element)
    except BaseException as error:  # every failure, even SystemExit, must reach the consumer
        channel.queue.put(_Failure(error))


def _per_replica_spec(element: PyTree) -> PyTree:
    def spec(value):
        if not isinstance(value, PerReplica):
            return value
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), value.stacked)

    return jax.tree.map(spec, element, is_leaf=is_distributed)
