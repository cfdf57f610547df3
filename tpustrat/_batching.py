"""Host batches: checking each global batch and cutting it into the rows of each replica."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from tpustrat import _mesh
from tpustrat._dataset_options import InputOptions
from tpustrat._values import PerReplica

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the rows of a host batch go.

    A host batch is cut into ``num_slices`` equal slices of rows; this process keeps the slices
    at ``positions``, which feed its replicas in order.
    """

    mesh: Mesh
    positions: tuple[int, ...]
    num_slices: int
    static_size: int | None
    batch_name: str
    slices_name: str

    def local_rows(self, array: np.ndarray, slice_size: int) -> np.ndarray:
        """This process's rows of ``array``, shaped ``(local replicas, slice_size, ...)``.

        Always a new array: on CPU, JAX may alias host memory it is given, and a loader may
        reuse its buffers.
        """
        if self.positions == tuple(range(self.num_slices)):
            rows = np.array(array)
        else:
            rows = np.concatenate(
                [array[p * slice_size : (p + 1) * slice_size] for p in self.positions]
            )
        return rows.reshape(len(self.positions), slice_size, *array.shape[1:])


class Batcher:
    """Checks each host batch against the first and places it on the replicas; one per epoch."""

    def __init__(self, layout: Layout, options: InputOptions, first_index: int = 0):
        self._layout = layout
        self._options = options
        self._static_size = layout.static_size
        self._first = None  # the first batch's structure and (shape[1:], dtype) of each leaf
        self._index = first_index  # the host batch's index in the dataset, for messages

    def __call__(self, element: PyTree) -> PyTree | None:
        """The distributed element for one host batch, or None if the batch is dropped."""
        index, self._index = self._index, self._index + 1
        arrays, key_impls, structure, size = host_arrays(element, index)
        signature = [(a.shape[1:], a.dtype, impl) for a, impl in zip(arrays, key_impls)]
        if self._first is None:
            self._first = (structure, signature, index)
        elif (structure, signature) != self._first[:2]:
            raise ValueError(
                f"batch {index} has structure {_describe(structure, signature)} but batch "
                f"{self._first[2]} had {_describe(*self._first[:2])}; every batch needs the same "
                "structure, dtypes and shapes (only a partial batch may have fewer rows)"
            )
        static_size = self._static_size
        if static_size is None:  # the first batch sets the static size unless the options do
            static_size = self._static_size = size
            self._check_static_size(index, static_size)
        if size > static_size:
            raise ValueError(
                f"batch {index} has {size} rows, more than the static {self._layout.batch_name} of "
                f"{static_size}; pass InputOptions(global_batch_size=...) set to the largest "
                "global batch, with experimental_mask=True to pad the smaller ones"
            )
        if size < static_size:
            if self._options.drop_remainder:
                return None
            if not self._options.experimental_mask:
                raise ValueError(
                    f"batch {index} has {size} rows, fewer than the static "
                    f"{self._layout.batch_name} of {static_size}: a partial batch. Pass "
                    "InputOptions(experimental_mask=True) to pad it and get (batch, mask) "
                    "elements, or InputOptions(drop_remainder=True) to drop it"
                )
            arrays = [_pad(a, static_size) for a in arrays]
        masked = self._options.experimental_mask
        if masked:
            arrays = [*arrays, np.arange(static_size) < size]
        placed = [
            PerReplica.from_stacked(x if impl is None else jax.random.wrap_key_data(x, impl=impl))
            for x, impl in zip(self._place(arrays, static_size), [*key_impls, None])
        ]
        if masked:
            return structure.unflatten(placed[:-1]), placed[-1]
        return structure.unflatten(placed)

    def _check_static_size(self, index: int, static_size: int) -> None:
        layout = self._layout
        if static_size == 0:
            raise ValueError(f"batch {index} is empty; every batch needs at least one row")
        if static_size % layout.num_slices:
            raise ValueError(
                f"{layout.batch_name} {static_size} (batch {index}) is not divisible by "
                f"{layout.num_slices} {layout.slices_name}; use a batch size that is a multiple "
                f"of {layout.num_slices}, or, if this batch is partial, pass "
                "InputOptions(global_batch_size=...) and experimental_mask=True"
            )

    def _place(self, arrays: list[np.ndarray], static_size: int) -> list[Any]:
        layout = self._layout
        local = [layout.local_rows(a, static_size // layout.num_slices) for a in arrays]
        if not self._options.experimental_fetch_to_device:
            return local
        sharding = _mesh.per_replica_sharding(layout.mesh)
        if jax.process_count() == 1:  # the local rows are the whole batch: one transfer for all
            return jax.device_put(local, sharding)
        num_replicas = layout.mesh.shape[_mesh.REPLICA_AXIS]
        shapes = [(num_replicas, *a.shape[1:]) for a in local]
        return [  # one call per leaf: jax < 0.8 takes no pytrees here
            jax.make_array_from_process_local_data(sharding, rows, shape)
            for rows, shape in zip(local, shapes)
        ]


def positioned_elements(
    source: Iterator[PyTree], batcher: Batcher, position: dict[str, Any], state_of: Any
) -> Iterator[tuple[PyTree, dict[str, Any]]]:
    """Each distributed element with the input position just after it.

    A position counts the elements returned (``batches``) and the elements of ``source`` read
    (``reads``, which also counts dropped partial batches); when ``state_of`` (the dataset's
    own iterator, which ``source`` reads) has ``get_state`` (a grain iterator), it holds that
    state as ``source``, or as base64 text ``source_bytes`` if the state is bytes.
    """
    batches, reads = position["batches"], position["reads"]
    stateful = callable(getattr(state_of, "get_state", None))
    for element in source:
        reads += 1
        distributed = batcher(element)
        if distributed is None:
            continue
        batches += 1
        after = {"batches": batches, "reads": reads}
        if stateful:
            state = state_of.get_state()
            if isinstance(state, bytes):
                after["source_bytes"] = base64.b64encode(state).decode("ascii")
            else:
                after["source"] = state
        yield distributed, after


def set_source_state(source: Iterator[PyTree], position: dict[str, Any]) -> None:
    """Gives the dataset's iterator ``source`` the state saved in ``position``."""
    set_state = getattr(source, "set_state", None)
    if not callable(set_state):
        raise ValueError(
            f"the input position holds a dataset iterator's state but this dataset's iterator "
            f"({type(source).__name__}) has no set_state; restore it with the dataset it was "
            "saved from (a grain loader)"
        )
    if "source_bytes" in position:
        set_state(base64.b64decode(position["source_bytes"]))
    else:
        set_state(position["source"])


def skip_reads(source: Iterator[PyTree], reads: int) -> None:
    """Reads and drops the first ``reads`` elements of ``source``, a new pass over the data."""
    for read in range(reads):
        try:
            next(source)
        except StopIteration:
            raise ValueError(
                f"the input position is after {reads} batches but the dataset ended after "
                f"{read}; restore with the dataset the checkpoint was saved with (a generator "
                "must start from its beginning)"
            ) from None


def host_iterator(dataset: Iterable[PyTree]) -> Iterator[PyTree]:
    """A new pass over ``dataset``; a tf.data.Dataset yields numpy through as_numpy_iterator."""
    if type(dataset).__module__.startswith("tensorflow") and hasattr(dataset, "as_numpy_iterator"):
        return dataset.as_numpy_iterator()
    return iter(dataset)


def host_arrays(element: PyTree, index: int) -> tuple[list[np.ndarray], list[Any], Any, int]:
    """The leaves of one host batch as numpy arrays, its structure and its number of rows.

    A typed PRNG key leaf (``jax.random.key``) travels as its key data; its entry in the
    second list is the key implementation to wrap it back with (None for other leaves).
    """
    paths_leaves, structure = jax.tree_util.tree_flatten_with_path(element)
    if not paths_leaves:
        raise ValueError(f"batch {index} has no arrays; each element must be a pytree of arrays")
    arrays, key_impls, sizes = [], [], {}
    for path, leaf in paths_leaves:
        where = f"batch {index} leaf {jax.tree_util.keystr(path) or '(the whole batch)'}"
        impl = None
        if isinstance(leaf, jax.Array) and jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            impl, leaf = jax.random.key_impl(leaf), jax.random.key_data(leaf)
        key_impls.append(impl)
        try:
            array = np.asarray(leaf)
        except ValueError as error:
            raise ValueError(
                f"{where} is ragged ({error}); pad its rows to one length, e.g. with a mask"
            ) from None
        if array.dtype.kind in "OUSV":
            raise ValueError(
                f"{where} has dtype {array.dtype}; only numeric and bool arrays can go to the "
                "devices: map strings to integer ids, and pad ragged rows to one length"
            )
        if array.ndim == 0:
            raise ValueError(
                f"{where} is a scalar ({array.dtype}) with no batch axis; give it a leading "
                "batch axis (one value per example) or close over it in the step function"
            )
        arrays.append(array)
        sizes[jax.tree_util.keystr(path)] = array.shape[0]
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{path} {size}" for path, size in sizes.items())
        raise ValueError(
            f"batch {index} has leaves with different leading sizes ({listed}); the first axis "
            "of every leaf must be the batch axis, with the same number of rows"
        )
    return arrays, key_impls, structure, arrays[0].shape[0]


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    """``array`` with rows appended up to ``size``: copies of its first row, or zeros if empty."""
    missing = size - array.shape[0]
    if array.shape[0] == 0:
        return np.zeros((size, *array.shape[1:]), array.dtype)
    return np.concatenate([array, np.repeat(array[:1], missing, axis=0)])


def _describe(structure: Any, signature: list[tuple[tuple[int, ...], np.dtype, Any]]) -> str:
    leaves = [
        _Text(f"{'key data ' if impl else ''}{dtype}[{', '.join(['B', *map(str, shape)])}]")
        for shape, dtype, impl in signature
    ]
    return str(structure.unflatten(leaves))


class _Text(str):
    """A string that shows without quotes inside a container's repr."""

    __repr__ = str.__str__
