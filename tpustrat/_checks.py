"""Argument checks shared by the modules, with one wording for every error they raise."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_int(name: str, value: Any, minimum: int) -> int:
    """Returns ``value`` as an int, or raises a ValueError unless it is an int >= ``minimum``.

    Booleans are refused: ``True`` is an int to Python, but never a count a user meant.

    Example:
      >>> check_int("steps_per_run", 4, minimum=1)
      4
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)
