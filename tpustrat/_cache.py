"""Caches keyed by user functions that forget them, as ``jax.jit``'s caches do.

A strategy compiles one program per step function. A loop that passes a new lambda on every
call would otherwise keep every lambda, and every program compiled for it, alive for the life
of the strategy. Here an entry goes when its function is garbage collected, and the least
recently used entry goes once there are more than ``max_size``.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

Options = TypeVar("Options", bound=Hashable)
Value = TypeVar("Value")


class FunctionCache(Generic[Options, Value]):
    """Maps ``(fn, options)`` to a value built on first use, without keeping ``fn`` alive.

    ``build(weak_fn, options)`` makes the value; ``weak_fn`` calls ``fn`` through a weak
    reference, so a value that keeps it does not keep ``fn`` alive. A function that cannot be
    referenced weakly (a builtin) is held until the least-recently-used bound evicts it; a bound
    method is referenced through its object, so ``obj.step`` finds its entry on every call.

    Args:
      build: makes the value for a new ``(weak_fn, options)``.
      max_size: the most entries kept.
      on_evict: called with each value that leaves the cache.

    Example:
      >>> cache = FunctionCache(lambda fn, options: fn(options), max_size=2)
      >>> double = lambda x: 2 * x
      >>> cache.get(double, 3), cache.get(double, 3), len(cache)
      (6, 6, 1)
      >>> del double
      >>> len(cache)  # the lambda is gone, and its entry with it
      0
    """

    def __init__(
        self,
        build: Callable[[Callable[..., Any], Options], Value],
        max_size: int = 64,
        on_evict: Callable[[Value], None] | None = None,
    ):
        self._build = build
        self._max_size = max_size
        self._on_evict = on_evict
        self._entries: dict[tuple[Any, Options], Value] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, fn: Callable[..., Any], options: Options) -> Value:
        """The value for ``(fn, options)``, built on first use; marks it most recently used."""
        key = (reference(fn, self._forget), options)
        value = self._entries.pop(key, None)
        if value is None:
            value = self._build(WeakCallable(key[0]), options)
        self._entries[key] = value
        while len(self._entries) > self._max_size:
            self._evict(next(iter(self._entries)))
        return value

    def _forget(self, reference: weakref.ref) -> None:
        for key in list(self._entries):
            if key[0] is reference:
                self._evict(key)

    def _evict(self, key: tuple[Any, Options]) -> None:
        value = self._entries.pop(key)
        if self._on_evict is not None:
            self._on_evict(value)


class _Strong:
    """A strong reference with the interface of a weak one, for functions without weakrefs."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]):
        self._fn = fn

    def __call__(self) -> Callable[..., Any]:
        return self._fn

    def __hash__(self) -> int:
        return hash(self._fn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Strong) and self._fn == other._fn


def reference(
    fn: Callable[..., Any], on_death: Callable[[weakref.ref], None] | None = None
) -> Callable[[], Callable[..., Any] | None]:
    """A hashable reference to ``fn`` that is equal for equal functions, weak where possible.

    Calling it gives ``fn`` back, or None once ``fn`` is gone; ``on_death`` is then called
    with the reference.
    """
    try:
        if inspect.ismethod(fn):
            reference = weakref.WeakMethod(fn, on_death)
        else:
            reference = weakref.ref(fn, on_death)
        hash(reference)  # a bound method hashes its object, which may not be hashable
        return reference
    except TypeError:
        return _Strong(fn)


def origin(fn: Callable[..., Any]) -> Hashable | None:
    """What ``fn`` runs, apart from the function object; None when that is not known.

    Two functions made by one ``lambda`` or ``def`` (a closure made on each call), two
    ``functools.partial`` s of one function, and one method bound to two objects have the same
    origin: its qualified name and code. A callable that stands for another (the weak callable
    a cache builds with, a lifted NNX step) says its origin in ``step_origin``.
    """
    known = getattr(fn, "step_origin", None)
    if known is not None:
        return known
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)  # a bound method's function
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    return getattr(fn, "__qualname__", None), code


class WeakCallable:
    """Calls the function behind a reference; carries its name and origin for messages."""

    def __init__(self, reference: Any):
        fn = reference()
        self._reference = reference
        self.__qualname__ = getattr(fn, "__qualname__", None) or repr(fn)
        self.__name__ = getattr(fn, "__name__", self.__qualname__)
        self.step_origin = origin(fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._reference()(*args, **kwargs)

    def target(self) -> Callable[..., Any] | None:
        """The function called, or None once it is gone."""
        return self._reference()
