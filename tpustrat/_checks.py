"""Argument checks shared by the modules: TypeError for a wrong type, ValueError for a wrong value.

Every module checks its arguments through these, so the same mistake reads the same everywhere.
"""

from __future__ import annotations

import collections.abc
import operator
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

_INT32 = np.iinfo(np.int32)


def check_int(name: str, value: Any, minimum: int) -> int:
    """Returns ``value`` as an int; a TypeError unless an integer, a ValueError below ``minimum``.

    Python and numpy integers (and concrete integer scalars) are accepted; booleans are refused,
    since ``True`` is an int to Python but never a count a user meant.

    Example:
      >>> check_int("steps_per_run", 4, minimum=1)
      4
      >>> check_int("max_steps_in_flight", "2", minimum=1)
      Traceback (most recent call last):
      TypeError: max_steps_in_flight must be an int, got str '2'; pass a whole number such as 2
    """
    number = _as_int(name, value)
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number}")
    return number


def check_bool(name: str, value: Any) -> bool:
    """Returns ``value`` as a bool; a TypeError unless a Python or numpy bool.

    Example:
      >>> check_bool("drop_remainder", True)
      True
      >>> check_bool("drop_remainder", "yes")
      Traceback (most recent call last):
      TypeError: drop_remainder must be a bool, got str 'yes'; pass True or False
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {describe(value)}; pass True or False")


def describe(value: Any) -> str:
    """A short description of any value for an error message: its type and a short repr.

    It never raises: a deleted ``jax.Array`` (whose repr raises) reads as deleted, and a value
    whose repr fails reads as its type alone.

    Example:
      >>> describe("avg")
      "str 'avg'"
      >>> import jax.numpy as jnp
      >>> x = jnp.ones(3)
      >>> x.delete()
      >>> describe(x)
      'a deleted jax.Array float32[3] (donated to an earlier call?)'
    """
    if _is_deleted(value):
        shape = ",".join(str(d) for d in value.shape)
        return f"a deleted jax.Array {value.dtype}[{shape}] (donated to an earlier call?)"
    try:
        text = repr(value)
    except Exception:  # any repr may fail; the type still describes the value
        return type(value).__name__
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def check_tree(name: str, tree: Any, *, opaque: Callable[[Any], bool] | None = None) -> None:
    """Refuses a pytree of arrays holding a leaf no array can be made of, naming the leaf's path.

    Each leaf must pass ``check_leaf`` and be an array or a number (not an array of strings or
    objects): a TypeError otherwise. Nodes for which ``opaque`` is true are not looked into.

    Example:
      >>> check_tree("value", {"w": [1.0, 2.0]})
      >>> check_tree("value", {"w": "x"})
      Traceback (most recent call last):
      TypeError: value['w'] is str 'x', not an array or a number; pass arrays, numbers and ...
    """
    for where, leaf in _leaves(name, tree, opaque):
        if opaque is not None and opaque(leaf) and not is_iterator(leaf):
            continue
        check_leaf(where, leaf)
        if isinstance(leaf, (np.ndarray, np.generic)) and leaf.dtype.kind in "OSU":
            raise TypeError(
                f"{where} is an array of dtype {leaf.dtype}; only numeric and bool arrays can go "
                "to the devices (map strings to integer ids)"
            )
        if not isinstance(leaf, (int, float, complex, np.ndarray, np.generic, jax.Array)):
            raise TypeError(
                f"{where} is {describe(leaf)}, not an array or a number; pass arrays, numbers "
                "and pytrees of them"
            )


def check_array(name: str, value: Any) -> None:
    """Refuses anything but one array or number (not a pytree), naming ``name``.

    A TypeError for another type or an array of strings or objects, and ``check_leaf``'s
    errors (an iterator, a deleted array, a Python int beyond int32).

    Example:
      >>> check_array("per_example_loss", [0.5, 1.0])
      Traceback (most recent call last):
      TypeError: per_example_loss must be an array, got list [0.5, 1.0]; pass a jax or numpy array
    """
    if not isinstance(value, (int, float, complex, np.ndarray, np.generic, jax.Array)):
        raise TypeError(
            f"{name} must be an array, got {describe(value)}; pass a jax or numpy array"
        )
    check_tree(name, value)


def check_leaf(where: str, leaf: Any) -> None:
    """Refuses a pytree leaf that JAX would mistake or fail on, naming it by ``where``.

    A TypeError for an iterator or generator (JAX takes it as one opaque leaf); a ValueError
    for a deleted ``jax.Array`` (donated to an earlier call) and for a Python int outside the
    int32 range while JAX's 64-bit types are off (it would not fit the array JAX makes of it).

    Example:
      >>> check_leaf("value['w']", iter([1.0]))
      Traceback (most recent call last):
      TypeError: value['w'] is an iterator (list_iterator); pass an array, or a list of the ...
    """
    if is_iterator(leaf):
        raise TypeError(
            f"{where} is an iterator ({type(leaf).__name__}); pass an array, or a list of the "
            "values it yields"
        )
    if _is_deleted(leaf):
        raise ValueError(
            f"{where} is {describe(leaf)}; its buffer is gone, so pass the array that call "
            "returned instead"
        )
    if (
        isinstance(leaf, int)
        and not isinstance(leaf, bool)
        and not jax.config.read("jax_enable_x64")
        and not _INT32.min <= leaf <= _INT32.max
    ):
        raise ValueError(
            f"{where} is the Python int {leaf}, outside the int32 range [{_INT32.min}, "
            f"{_INT32.max}] that JAX uses while 64-bit types are off; pass a float, or turn on "
            "jax_enable_x64"
        )


def check_no_iterator(name: str, tree: Any, *, live: bool = False) -> None:
    """Refuses a pytree holding an iterator or generator (JAX takes one as an opaque leaf).

    For pytrees whose other leaves are checked elsewhere (a checkpoint's target may hold
    ``jax.ShapeDtypeStruct`` leaves). With ``live=True`` a deleted ``jax.Array`` is refused
    too (a ValueError).

    Example:
      >>> check_no_iterator("target", {"w": jax.ShapeDtypeStruct((2,), "float32")})
      >>> check_no_iterator("target", [(x for x in "ab")])
      Traceback (most recent call last):
      TypeError: target[0] is an iterator (generator); pass an array, or a list of the ...
    """
    for where, leaf in _leaves(name, tree, None):
        if is_iterator(leaf) or (live and _is_deleted(leaf)):
            check_leaf(where, leaf)


def is_iterator(x: Any) -> bool:
    """Whether ``x`` is an iterator or generator, which JAX would take as one opaque leaf."""
    return isinstance(x, collections.abc.Iterator)


def _leaves(name: str, tree: Any, opaque: Callable[[Any], bool] | None) -> list[tuple[str, Any]]:
    """``tree``'s leaves with their paths, iterators and ``opaque`` nodes taken as leaves."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        tree,
        is_leaf=lambda x: is_iterator(x) or (opaque is not None and opaque(x)),
    )
    return [(name + jax.tree_util.keystr(path), leaf) for path, leaf in leaves]


def check_seconds(name: str, value: Any, *, whole: bool) -> float:
    """Returns ``value``, a duration; a TypeError unless a number, a ValueError unless positive.

    With ``whole=True`` (the timeouts JAX's distributed runtime takes) it must be an int >= 1;
    otherwise any real number > 0.

    Example:
      >>> check_seconds("timeout", 2.5, whole=False)
      2.5
    """
    if whole:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"{name} must be a whole number of seconds, got {describe(value)}; pass an int "
                f"such as {max(1, _rounded(value))}"
            )
        if value < 1:
            raise ValueError(f"{name} must be a whole number of seconds >= 1, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {describe(value)}")
    if not value > 0:
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    return value


def check_axis(what: str, axis: Any, ndim: int, value: str) -> int:
    """Returns ``axis`` as an index in ``[0, ndim)``; a TypeError unless an int, else a ValueError.

    ``what`` names the operation and ``value`` the value whose axis it is, in the message
    (e.g. ``"a value of shape (3,)"``); negative axes count from the end.

    Example:
      >>> check_axis("gather", -1, 2, "per-replica values of rank 2")
      1
    """
    index = _as_int(f"{what} axis", axis)
    if not -ndim <= index < ndim:
        raise ValueError(
            f"{what} axis {index} is out of range for {value}; use an axis in [{-ndim}, {ndim})"
            + (" (a scalar has no axis: reshape it to (1,) first)" if ndim == 0 else "")
        )
    return index % ndim


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got the bool {bool(value)}; pass a whole number")
    try:
        return operator.index(value)
    except Exception:  # whatever index() raises, the user passed no int
        raise TypeError(
            f"{name} must be an int, got {describe(value)}; pass a whole number "
            f"such as {_rounded(value)}"
        ) from None


def _is_deleted(value: Any) -> bool:
    try:
        return isinstance(value, jax.Array) and value.is_deleted()
    except Exception:  # an array that cannot say is treated as live
        return False


def _rounded(value: Any) -> int:
    """A whole number near ``value`` for an error message's example, else 1."""
    if _is_deleted(value):
        return 1
    try:
        return max(1, round(float(value)))
    except Exception:  # any value that is no number gets the example 1
        return 1
