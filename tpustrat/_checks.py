"""Argument checks shared by the modules: TypeError for a wrong type, ValueError for a wrong value.

Every module checks its arguments through these, so the same mistake reads the same everywhere.
"""

from __future__ import annotations

import operator
from typing import Any


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
                f"{name} must be a whole number of seconds, got {type(value).__name__} "
                f"{value!r}; pass an int such as {max(1, _rounded(value))}"
            )
        if value < 1:
            raise ValueError(f"{name} must be a whole number of seconds >= 1, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__} {value!r}")
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
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got the bool {value!r}; pass a whole number")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an int, got {type(value).__name__} {value!r}; pass a whole number "
            f"such as {_rounded(value)}"
        ) from None


def _rounded(value: Any) -> int:
    """A whole number near ``value`` for an error message's example, else 1."""
    try:
        return round(float(value))
    except (TypeError, ValueError, OverflowError):
        return 1
