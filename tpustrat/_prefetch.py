"""Prefetch: the distributed iterator, whose thread keeps batches ready on the devices."""

from __future__ import annotations

import itertools
import queue
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax

from tpustrat._checks import check_int
from tpustrat._types import PyTree
from tpustrat._values import PerReplica, is_distributed

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


@runtime_checkable
class PositionedInput(Protocol):
    """An input that opens at a saved position: what a distributed dataset gives its iterator
    so that the iterator's position can be checkpointed."""

    start: dict[str, Any]

    def open(self, position: dict[str, Any]) -> Iterator[tuple[PyTree, dict[str, Any]]]:
        """The elements from ``position`` on, each with the position just after it."""
        ...

    def check(self, position: Mapping[str, Any]) -> dict[str, Any]:
        """``position`` as a dict if it is a position of this input; else a ValueError."""
        ...


class DistributedIterator:
    """One epoch of a distributed dataset, read ahead by a background thread.

    Returned by ``iter(dist)``. ``next(elements)`` runs in a thread named
    ``tpustrat-prefetch-<n>``, so whatever producing an element costs (reading the dataset,
    checking the batch, copying it to the devices) overlaps with the step. The thread keeps up to
    ``buffer_size`` elements ready or in preparation. An exception raised while producing an
    element is raised again, the same object with its traceback, by the ``next`` call that would
    have returned that element. After the end of the data or an error, ``next`` raises
    StopIteration; after ``close()`` (or a ``with`` block), a ValueError. The thread holds no
    reference to the iterator, so dropping the iterator stops the thread; ``close()`` or leaving
    a ``with`` block stops it at once. The thread starts at the first ``next`` (or
    ``element_spec``), so ``set_state`` can first move the iterator to a checkpointed input
    position.

    Args:
      elements: the distributed elements to read ahead (only the thread advances it), or a
        ``PositionedInput`` (what ``iter(dist)`` passes), whose position ``get_state`` reports.
      buffer_size: how many elements may be ready ahead of the consumer; 0 reads synchronously
        in ``next`` (no thread).

    Example:
      >>> with DistributedIterator(iter(range(3)), buffer_size=2) as numbers:
      ...     list(numbers)
      [0, 1, 2]
    """

    def __init__(self, elements: Iterator[PyTree] | PositionedInput, buffer_size: int) -> None:
        check_int("buffer_size", buffer_size, minimum=0)
        self._buffer_size = buffer_size
        self._input: PositionedInput | None = None
        self._elements: Iterator[Any] = iter(())
        self._position: dict[str, Any] = {}
        if isinstance(elements, PositionedInput):
            self._input, self._position = elements, dict(elements.start)
        else:
            self._elements = elements
        self._started = False
        self._channel: _Channel | None = None
        self._finished = False
        self._closed = False
        self._peeked: Any = _NOTHING
        self._element_spec = None

    def _start(self) -> None:
        """Opens the input at its position and starts the thread; runs on the first read."""
        self._started = True
        if self._input is not None:
            self._elements = self._input.open(self._position)
        if self._buffer_size == 0:
            return
        name = f"{THREAD_NAME_PREFIX}-{next(_thread_ids)}"
        channel = _Channel(self._buffer_size, self._elements, name)
        self._elements = iter(())  # only the thread advances it
        self._channel = channel
        self._finalizer = weakref.finalize(self, channel.shut_down)
        # At exit nothing waits for the thread (a stalled dataset would hold the exit up): it is
        # a daemon, and tpustrat._batching's exit gate keeps it out of JAX from then on.
        self._finalizer.atexit = False
        channel.thread.start()

    def __iter__(self) -> DistributedIterator:
        return self

    def __next__(self) -> PyTree:
        if self._peeked is not _NOTHING:
            item, self._peeked = self._peeked, _NOTHING
            return self._advance(item)
        return self._advance(self._read())

    def _read(self) -> Any:
        """The next item from the source or the thread: an element, or (element, position)."""
        if self._closed:
            raise ValueError(
                "this DistributedIterator was closed (by close() or the end of its with block); "
                "start a new pass with iter(dist)"
            )
        if self._finished:
            raise StopIteration
        if not self._started:
            self._start()
        if self._channel is None:
            try:
                return next(self._elements)
            except BaseException:
                self._finish()
                raise
        item = self._channel.get()
        if item is _END:
            self._finish()
            raise StopIteration
        if isinstance(item, _Failure):
            self._finish()
            error = item.error
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(
                    f"(raised while reading the dataset in thread {self._channel.thread.name}; "
                    "tpustrat's prefetch re-raised it here)"
                )
            raise error
        return item

    def _advance(self, item: Any) -> PyTree:
        """The element of ``item``; the input position moves past it."""
        if self._input is None:
            return item
        element, self._position = item
        return element

    def get_state(self) -> dict[str, Any]:
        """The input position after the last element ``next`` returned, as a JSON-able dict.

        ``ts.CheckpointManager`` saves it with the training state. It counts the batches
        returned (elements the thread has read ahead do not count) and, when the dataset's own
        iterator has ``get_state`` (a grain loader), holds that iterator's state too.

        Raises:
          TypeError: if this iterator was made from a plain iterator rather than by
            ``iter(dist)`` of a distributed dataset, so it has no position to save.

        Example:
          >>> dist = ts.TPUStrategy().experimental_distribute_dataset([np.zeros((8, 2))] * 3)
          >>> iterator = iter(dist)
          >>> _ = next(iterator)
          >>> iterator.get_state()["batches"]
          1
        """
        self._positioned()
        return dict(self._position)

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Moves a fresh iterator to a position from ``get_state``: ``next`` continues there.

        A list, sequence or generator dataset skips the batches already read (a generator must
        be a new one, from its start); a dataset whose iterator has ``set_state`` (a grain
        loader) is given its saved state instead.

        Args:
          state: a dict returned by ``get_state`` of an iterator over the same dataset.

        Raises:
          ValueError: if this iterator has already read an element, or ``state`` is not a
            position of this kind of dataset.

        Example:
          >>> dist = ts.TPUStrategy().experimental_distribute_dataset(
          ...     [np.full((8, 1), i) for i in range(3)])
          >>> iterator = iter(dist)
          >>> iterator.set_state({"batches": 2, "reads": 2})
          >>> float(next(iterator).values[0][0, 0])
          2.0
        """
        positioned = self._positioned()
        if self._started:
            raise ValueError(
                "set_state moves a fresh iterator, but this one has already read elements; "
                "call it right after iter(dist), before next() or element_spec"
            )
        self._position = positioned.check(state)

    def _positioned(self) -> PositionedInput:
        """The input whose position this iterator tracks; a TypeError if it tracks none."""
        if self._input is None:
            raise TypeError(
                "this DistributedIterator reads a plain iterator and has no input position to "
                "save; checkpoint an iterator made by iter(dist) of a ts.DistributedDataset"
            )
        return self._input

    @property
    def element_spec(self) -> PyTree:
        """The shapes and dtypes one replica sees in the step: ``jax.ShapeDtypeStruct`` leaves.

        Reads ahead one element if none has been seen yet; ``next`` still returns it.
        """
        if self._element_spec is None:
            if self._peeked is _NOTHING:
                try:
                    self._peeked = self._read()
                except StopIteration:
                    raise ValueError(
                        "element_spec needs one batch but this iterator has none left; read it "
                        "from a fresh iterator, iter(dist).element_spec"
                    ) from None
            element = self._peeked if self._input is None else self._peeked[0]
            self._element_spec = _per_replica_spec(element)
        return self._element_spec

    def close(self) -> None:
        """Stops the thread and drops the read-ahead elements; ``next`` then raises a ValueError.

        Waits for the thread to finish reading the element it is on, if any.
        """
        self._finish()
        self._closed = True

    def _finish(self) -> None:
        """Stops the thread and drops the read-ahead elements; ``next`` raises StopIteration."""
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
            # Only the consumer may free the element's device arrays: this daemon thread could
            # be doing it as the interpreter finalizes, which aborts the process.
            del element
    except BaseException as error:  # every failure, even SystemExit, must reach the consumer
        channel.queue.put(_Failure(error))


def _per_replica_spec(element: PyTree) -> PyTree:
    def spec(value):
        if not isinstance(value, PerReplica):
            return value
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), value.stacked)

    return jax.tree.map(spec, element, is_leaf=is_distributed)
