"""The shared argument checks: a TypeError for a wrong type, a ValueError for a wrong value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import deleted_array

from tpustrat._checks import (
    check_array,
    check_axis,
    check_bool,
    check_int,
    check_no_iterator,
    check_seconds,
    check_tree,
    describe,
)


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


def test_describe_never_raises():
    assert describe("avg") == "str 'avg'"
    assert describe(deleted_array()) == (
        "a deleted jax.Array float32[3] (donated to an earlier call?)"
    )

    class BadRepr:
        def __repr__(self):
            raise RuntimeError("no repr")

    assert describe(BadRepr()) == "BadRepr"
    assert describe("x" * 200).endswith("...") and len(describe("x" * 200)) == 4 + 80


def test_check_int_names_the_argument_for_any_value():
    name = "max_steps_in_flight"
    with pytest.raises(TypeError, match=rf"{name} must be an int, got a deleted jax\.Array"):
        check_int(name, deleted_array(), minimum=1)
    with pytest.raises(TypeError, match=rf"{name} must be an int, got ndarray array\(\[1, 2\]\)"):
        check_int(name, np.array([1, 2]), minimum=1)
    with pytest.raises(TypeError, match=rf"{name} must be an int, got the bool True"):
        check_int(name, np.bool_(True), minimum=1)


def test_check_bool():
    assert check_bool("force", np.bool_(False)) is False
    for value in ("yes", 1, None, np.array([True, False]), deleted_array()):
        with pytest.raises(TypeError, match=r"force must be a bool, got .*; pass True or False"):
            check_bool("force", value)


@pytest.mark.parametrize(
    ("tree", "error", "message"),
    [
        ({"w": iter([1.0])}, TypeError, r"value\['w'\] is an iterator \(list_iterator\)"),
        ([(x for x in "ab")], TypeError, r"value\[0\] is an iterator \(generator\)"),
        ({"w": deleted_array()}, ValueError, r"value\['w'\] is a deleted jax\.Array float32\[3\]"),
        ({"n": 2**40}, ValueError, r"value\['n'\] is the Python int 1099511627776, outside"),
        ({"s": "x"}, TypeError, r"value\['s'\] is str 'x', not an array or a number"),
        ({"s": np.array(["a"])}, TypeError, r"value\['s'\] is an array of dtype <U1"),
        ({"o": object()}, TypeError, r"value\['o'\] is object <object object at"),
    ],
)
def test_check_tree_names_the_leaf(tree, error, message):
    with pytest.raises(error, match=message):
        check_tree("value", tree)


def test_check_tree_accepts_arrays_numbers_and_opaque_nodes():
    check_tree("value", {"a": jnp.ones(2), "b": [1, 2.5, True], "c": np.float32(1), "d": None})
    check_tree("value", {"a": "opaque"}, opaque=lambda x: isinstance(x, str))
    with pytest.raises(TypeError, match="is an iterator"):  # an iterator is never opaque
        check_tree("value", iter([1]), opaque=lambda x: True)


def test_check_array_refuses_pytrees_and_lists():
    check_array("per_example_loss", np.ones(2))
    with pytest.raises(TypeError, match=r"per_example_loss must be an array, got list \[0\.5\]"):
        check_array("per_example_loss", [0.5])
    with pytest.raises(ValueError, match=r"per_example_loss is a deleted jax\.Array"):
        check_array("per_example_loss", deleted_array())


def test_check_no_iterator():
    check_no_iterator("target", {"w": jax.ShapeDtypeStruct((2,), np.float32), "d": deleted_array()})
    with pytest.raises(TypeError, match=r"target\['w'\] is an iterator"):
        check_no_iterator("target", {"w": iter([])})
    with pytest.raises(ValueError, match=r"state\['d'\] is a deleted jax\.Array"):
        check_no_iterator("state", {"d": deleted_array()}, live=True)


def test_check_tree_accepts_ml_dtypes_floats():
    """bfloat16 and the other ml_dtypes floats are numpy kind 'V', and arrays all the same."""
    check_tree("value", {"w": np.ones(2, jnp.bfloat16), "f8": np.ones(2, jnp.float8_e4m3fn)})
