"""The type vocabulary every module shares: `PyTree`."""

from typing import Any, TypeAlias

PyTree: TypeAlias = Any
"""A JAX pytree: nested tuples, lists, dicts, dataclasses and registered nodes, with arrays
(or any other leaves) at the ends. `Any` because JAX has no static pytree type."""
