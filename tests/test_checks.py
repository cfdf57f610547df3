"""The shared argument checks: a TypeError for a wrong type, a ValueError for a wrong value."""

import jax.numpy as jnp
import numpy as np
import pytest

from tpustrat._checks import check_axis, check_int, check_seconds


@pytest.mark.parametrize("value", [2, np.int32(2), np.int64(2), jnp.int32(2)])
def test_check_int_accepts_integers(value):
    result = check_int("max_steps_in_flight", value, minimum=1)
    assert result == 2 and type(result) is int


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2", r"max_steps_in_flight must be an int, got str '2'; pass a whole number such as 2"),
        (2.0, r"max_steps_in_flight must be an int, got float 2.0"),
        (None, r"max_steps_in_flight must be an int, got NoneType None"),
        (True, r"max_steps_in_flight must be an int, got the bool True"),
    ],
)
def test_check_int_wrong_type_is_a_type_error(value, message):
    with pytest.raises(TypeError, match=message):
        check_int("max_steps_in_flight", value, minimum=1)


@pytest.mark.parametrize("value", [0, -3, np.int64(0)])
def test_check_int_too_small_is_a_value_error(value):
    with pytest.raises(ValueError, match=rf"max_steps_in_flight must be an int >= 1, got {value}"):
        check_int("max_steps_in_flight", value, minimum=1)


def test_check_seconds():
    assert check_seconds("timeout", 2.5, whole=False) == 2.5
    assert check_seconds("heartbeat_timeout", 10, whole=True) == 10
    with pytest.raises(TypeError, match="heartbeat_timeout must be a whole number of seconds"):
        check_seconds("heartbeat_timeout", 2.5, whole=True)
    with pytest.raises(ValueError, match="heartbeat_timeout must be a whole number of seconds >="):
        check_seconds("heartbeat_timeout", 0, whole=True)
    with pytest.raises(TypeError, match="timeout must be a number of seconds, got str '5'"):
        check_seconds("timeout", "5", whole=False)
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0, got 0"):
        check_seconds("timeout", 0, whole=False)


@pytest.mark.parametrize(("axis", "ndim", "expected"), [(0, 1, 0), (-1, 3, 2), (np.int64(1), 2, 1)])
def test_check_axis_counts_negative_axes_from_the_end(axis, ndim, expected):
    assert check_axis("gather", axis, ndim, f"a value of rank {ndim}") == expected


def test_check_axis_errors():
    with pytest.raises(TypeError, match=r"gather axis must be an int, got float 0\.0"):
        check_axis("gather", 0.0, 2, "a value of shape (2, 2)")
    with pytest.raises(ValueError, match=r"gather axis 2 is out of range for a value of shape"):
        check_axis("gather", 2, 2, "a value of shape (2, 2)")
    with pytest.raises(ValueError, match=r"a scalar has no axis"):
        check_axis("gather", 0, 0, "a value of shape ()")
