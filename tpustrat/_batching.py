"""Host batches: checking each global batch and cutting it into the rows of each replica."""

from __future__ import annotations

import atexit
import base64
import dataclasses
import threading
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from tpustrat import _mesh
from tpustrat._dataset_options import InputOptions
from tpustrat._types import PyTree
from tpustrat._values import PerReplica

# How long the interpreter's exit waits for batches being checked or placed to finish.
_EXIT_WAIT_S = 10.0


class _ExitGate:
    """Admits JAX work on batches (flattening, checking, placing) until the interpreter exits.

    A prefetch thread is a daemon, and one reading a stalled dataset can wake at any moment. A
    daemon thread that is inside JAX's C++ code when Python finalizes (placing a batch, or
    freeing a JAX array, whose destructor lets go of the GIL) is killed there, which aborts the
    process ("terminate called after throwing"). So at exit (an ``atexit`` hook, which runs
    before JAX's own) the gate closes: it waits for the work already inside, and any later
    ``with EXIT_GATE`` raises a RuntimeError instead of touching JAX. Outside the gate a thread
    keeps no reference to the dataset's elements or the arrays it placed, so it never frees
    the last one.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._inside = 0
        self._closed = False

    def __enter__(self) -> None:
        with self._condition:
            if self._closed:
                raise RuntimeError(
                    "the interpreter is exiting, so tpustrat's distributed input places no "
                    "more batches; finish reading the dataset before the program ends"
                )
            self._inside += 1

    def __exit__(self, *exc_info: Any) -> None:
        with self._condition:
            self._inside -= 1
            self._condition.notify_all()

    def close(self, timeout_s: float) -> None:
        """Lets nothing more in and waits up to ``timeout_s`` for the work inside to finish."""
        with self._condition:
            self._closed = True
            self._condition.wait_for(lambda: self._inside == 0, timeout=timeout_s)


EXIT_GATE = _ExitGate()
atexit.register(EXIT_GATE.close, _EXIT_WAIT_S)


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


class HostBatch(NamedTuple):
    """One host batch, checked: its leaves as numpy arrays, and where each came from.

    A typed PRNG key leaf (``jax.random.key``) travels as its key data; its entry in
    ``key_impls`` is the key implementation to wrap it back with (None for other leaves).
    """

    arrays: list[np.ndarray]
    key_impls: list[Any]
    structure: Any
    paths: list[str]
    rows: int

    @property
    def signature(self) -> list[tuple[tuple[int, ...], np.dtype, Any]]:
        """Each leaf's shape after the batch axis, dtype and key implementation."""
        return [(a.shape[1:], a.dtype, impl) for a, impl in zip(self.arrays, self.key_impls)]


class HostStep(NamedTuple):
    """The per-replica batches of one step, joined into one host batch of equal slices.

    Each per-replica batch fills one slice (padded with copies of its first row when it is
    short); a slice without a per-replica batch holds copies of the step's first row. ``real``
    marks the rows that came from the dataset; ``short`` says what is missing, None when nothing.
    """

    batch: HostBatch
    real: np.ndarray
    short: str | None


class Batcher:
    """Checks each host batch against the first and places it on the replicas; one per epoch."""

    def __init__(self, layout: Layout, options: InputOptions, first_index: int = 0):
        self._layout = layout
        self._options = options
        self._static_size = layout.static_size
        self._first: tuple[HostBatch, int] | None = None  # the first batch and its index
        self._index = first_index  # the host batch's index in the dataset, for messages

    def __call__(self, element: PyTree | HostStep) -> PyTree | None:
        """The distributed element for one host batch (or step), or None if it is dropped."""
        index, self._index = self._index, self._index + 1
        if isinstance(element, HostStep):
            batch, real, short, noun = element.batch, element.real, element.short, "step"
        else:
            batch, real, short, noun = host_arrays(element, index), None, None, "batch"
        if self._first is None:
            self._first = (_layout_only(batch), index)
        else:
            check_same_layout(batch, index, *self._first, noun)
        size, static_size = batch.rows, self._static_size
        if static_size is None:  # the first batch sets the static size unless the options do
            static_size = self._static_size = size
            self._check_static_size(index, static_size)
        if size > static_size:
            raise ValueError(
                f"batch {index} has {size} rows, more than the static {self._layout.batch_name} of "
                f"{static_size}; pass InputOptions(global_batch_size=...) set to the largest "
                "global batch, with mask=True to pad the smaller ones"
            )
        if size < static_size or short is not None:
            if self._options.drop_remainder:
                return None
            if not self._options.mask:
                what = short or (
                    f"batch {index} has {size} rows, fewer than the static "
                    f"{self._layout.batch_name} of {static_size}"
                )
                raise ValueError(
                    f"{what}: a partial {noun}. Pass InputOptions(mask=True) to pad "
                    "it and get (batch, mask) elements, or InputOptions(drop_remainder=True) to "
                    "drop it"
                )
        arrays = [_pad(a, static_size) for a in batch.arrays]
        masked = self._options.mask
        if masked:
            arrays.append(np.arange(static_size) < size if real is None else real)
        placed = [
            PerReplica.from_stacked(x if impl is None else jax.random.wrap_key_data(x, impl=impl))
            for x, impl in zip(self._place(arrays, static_size), [*batch.key_impls, None])
        ]
        if masked:
            return batch.structure.unflatten(placed[:-1]), placed[-1]
        return batch.structure.unflatten(placed)

    def _check_static_size(self, index: int, static_size: int) -> None:
        layout = self._layout
        if static_size == 0:
            raise ValueError(f"batch {index} is empty; every batch needs at least one row")
        if static_size % layout.num_slices:
            raise ValueError(
                f"{layout.batch_name} {static_size} (batch {index}) is not divisible by "
                f"{layout.num_slices} {layout.slices_name}; use a batch size that is a multiple "
                f"of {layout.num_slices}, or, if this batch is partial, pass "
                "InputOptions(global_batch_size=...) and mask=True"
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


def check_same_layout(
    batch: HostBatch, index: int, first: HostBatch, first_index: int, noun: str
) -> None:
    """A ValueError unless ``batch`` has the structure, dtypes and shapes of ``first``.

    The message names the first leaf that differs, with both of its shapes.
    """
    if batch.structure != first.structure:
        raise ValueError(
            f"{noun} {index} has structure {_describe(batch.structure, batch.signature)} but "
            f"{noun} {first_index} had {_describe(first.structure, first.signature)}; every "
            f"{noun} needs the same structure, dtypes and shapes (only a partial batch may have "
            "fewer rows)"
        )
    for path, now, then in zip(batch.paths, batch.signature, first.signature):
        if now != then:
            raise ValueError(
                f"{noun} {index} leaf {path} is {_leaf_text(*now)} but in {noun} {first_index} "
                f"it is {_leaf_text(*then)} (B: the rows); every {noun} needs the same "
                "structure, dtypes and shapes (only a partial batch may have fewer rows): pad "
                "or cast the leaf to one shape and dtype"
            )


def steps_of_per_replica_batches(
    source: Iterator[PyTree], group: int, per_replica_rows: int | None
) -> Iterator[HostStep]:
    """Joins each ``group`` consecutive per-replica batches into one step, one slice each.

    A per-replica batch belongs whole to its replica: a short step (the last, with fewer than
    ``group`` per-replica batches, or whose last per-replica batch has fewer rows) is padded
    slice by slice, so its rows still land on their own replicas. Only the last per-replica
    batch may have fewer rows than ``per_replica_rows`` (default the first batch's).
    """
    step: list[HostBatch] = []
    first: HostBatch | None = None
    index, rows, partial = -1, 0, None
    for element in source:  # no enumerate: its tuples would keep the last element alive
        index += 1
        with EXIT_GATE:  # the thread lets go of the dataset's arrays inside the gate
            batch = host_arrays(element, index, noun="per-replica batch")
            del element
            if first is None:
                first, rows = _layout_only(batch), per_replica_rows or batch.rows
            else:
                check_same_layout(batch, index, first, 0, "per-replica batch")
            if partial is not None or batch.rows > rows:
                at, size = partial or (index, batch.rows)
                raise ValueError(
                    f"per-replica batch {at} has {size} rows but a per-replica batch has "
                    f"{rows} (ctx.get_per_replica_batch_size(global_batch_size)); only "
                    "the last batch may have fewer (batch the dataset with that size)"
                )
            if batch.rows < rows:
                partial = (index, batch.rows)
            step.append(batch)
            del batch
            joined = None
            if len(step) == group:
                joined, step = _join(step, group, rows, index + 1 - group), []
        if joined is not None:
            yield joined
    if step:
        with EXIT_GATE:
            joined, step = _join(step, group, rows, index + 1 - len(step)), []
        yield joined


def _layout_only(batch: HostBatch) -> HostBatch:
    """``batch`` without its rows: what later batches are checked against, holding none of the
    dataset's arrays (which may be JAX's)."""
    return batch._replace(arrays=[np.empty((0, *a.shape[1:]), a.dtype) for a in batch.arrays])


def _join(step: list[HostBatch], group: int, rows: int, first_index: int) -> HostStep:
    """The step of per-replica batches ``step`` (numbered from ``first_index``), one slice each
    of ``rows`` rows, ``group`` slices."""
    first = step[0]
    arrays = []
    for leaves in zip(*(batch.arrays for batch in step)):
        padded = [_pad(leaf, rows) for leaf in leaves]
        filler = np.repeat(padded[0][:1], rows * (group - len(step)), axis=0)
        arrays.append(np.concatenate([*padded, filler]))
    real = np.zeros((group, rows), bool)
    for slot, batch in enumerate(step):
        real[slot, : batch.rows] = True
    last = first_index + len(step) - 1
    shorts = []
    if len(step) < group:
        shorts.append(
            f"the step of per-replica batches {first_index} to {last} has only {len(step)} of "
            f"them for the {group} replicas of this process"
        )
    if step[-1].rows < rows:
        shorts.append(f"per-replica batch {last} has {step[-1].rows} of {rows} rows")
    joined = HostBatch(arrays, first.key_impls, first.structure, first.paths, group * rows)
    return HostStep(joined, real.reshape(-1), "; ".join(shorts) or None)


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
        # A prefetch thread must not free arrays JAX holds as the interpreter exits (see
        # _ExitGate): it drops the dataset's element inside the gate, and yields the distributed
        # one from a list it pops it from, so that this frame keeps no reference to it.
        with EXIT_GATE:
            distributed = [batcher(element)]
            del element
        if distributed[0] is None:
            continue
        batches += 1
        after = {"batches": batches, "reads": reads}
        if stateful:
            state = state_of.get_state()
            if isinstance(state, bytes):
                after["source_bytes"] = base64.b64encode(state).decode("ascii")
            else:
                after["source"] = state
        yield distributed.pop(), after


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


def host_arrays(element: PyTree, index: int, noun: str = "dataset batch") -> HostBatch:
    """The leaves of one host batch as numpy arrays, checked, with its structure and rows.

    ``noun`` and ``index`` name the batch in error messages (``"dataset batch 3 leaf ['x'] ..."``).
    """
    paths_leaves, structure = jax.tree_util.tree_flatten_with_path(element)
    if not paths_leaves:
        raise ValueError(f"{noun} {index} has no arrays; each element must be a pytree of arrays")
    arrays, key_impls, paths = [], [], []
    for path, leaf in paths_leaves:
        name = jax.tree_util.keystr(path) or "(the whole batch)"
        where = f"{noun} {index} leaf {name}"
        impl = None
        if isinstance(leaf, jax.Array) and jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            impl, leaf = jax.random.key_impl(leaf), jax.random.key_data(leaf)
        try:
            array = np.asarray(leaf)
        except ValueError as error:
            raise ValueError(
                f"{where} is ragged ({error}); pad its rows to one length, e.g. with a mask"
            ) from None
        if array.dtype.kind in "OUS" or (
            array.dtype.kind == "V" and not jax.numpy.issubdtype(array.dtype, jax.numpy.number)
        ):  # kind V: a record or raw bytes, but also ml_dtypes' bfloat16 and float8, numbers
            raise ValueError(
                f"{where} has dtype {array.dtype}; only numeric and bool arrays can go to the "
                "devices: map strings to integer ids, and pad ragged rows to one length"
            )
        if array.ndim == 0:
            in_list = path and isinstance(path[-1], jax.tree_util.SequenceKey)
            raise ValueError(
                f"{where} is a scalar ({array.dtype}) with no batch axis; give it a leading "
                "batch axis (one value per example) or close over it in the step function"
                + (
                    " (a Python list or tuple is a pytree of its items, not an array: make "
                    "each leaf a numpy array with np.asarray, padding ragged rows to one length)"
                    if in_list
                    else ""
                )
            )
        _check_fits_jax_dtype(array, where)
        arrays.append(array)
        key_impls.append(impl)
        paths.append(name)
    sizes = [a.shape[0] for a in arrays]
    if len(set(sizes)) > 1:
        listed = ", ".join(f"{path} {size}" for path, size in zip(paths, sizes))
        raise ValueError(
            f"{noun} {index} has leaves with different leading sizes ({listed}); the first axis "
            "of every leaf must be the batch axis, with the same number of rows"
        )
    return HostBatch(arrays, key_impls, structure, paths, sizes[0])


# The dtypes JAX narrows while jax_enable_x64 is off.
_WIDE_DTYPES = frozenset(map(np.dtype, (np.int64, np.uint64, np.float64, np.complex128)))


def _check_fits_jax_dtype(array: np.ndarray, where: str) -> None:
    """A ValueError if JAX's dtype for ``array`` (int32 for int64 with jax_enable_x64 off) cannot
    hold its values: JAX would wrap integers and turn large floats into inf without a word.

    Rounding a float64 to float32 loses precision, as JAX users expect; only values beyond
    float32's range, which become inf, are refused. Costs one min and one max over a leaf that
    JAX narrows, nothing for the others.
    """
    dtype = array.dtype
    if dtype not in _WIDE_DTYPES or array.size == 0:
        return
    target = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
    if target == dtype:  # x64 is on
        return
    values, parts = array, ""
    if dtype.kind == "c":  # its real and imaginary parts, as floats
        values, parts = np.stack([array.real, array.imag]), " with real and imaginary parts"
        target = np.empty(0, target).real.dtype
    lo, hi = values.min(), values.max()
    if dtype.kind in "iu":
        info = np.iinfo(target)
        if info.min <= lo and hi <= info.max:
            return
        lost = f"{target} holds [{info.min}, {info.max}], so they would wrap"
        fix = f"cast the leaf to a dtype that holds them (float32, or ids offset into {target})"
    else:
        if not (np.isfinite(lo) and np.isfinite(hi)):  # inf and nan stay what they are
            values = values[np.isfinite(values)]
            if values.size == 0:
                return
            lo, hi = values.min(), values.max()
        finfo = np.finfo(target)
        rounds_to_inf = float(finfo.max) + 2.0 ** (finfo.maxexp - finfo.nmant - 2)  # + ulp / 2
        if -rounds_to_inf < lo and hi < rounds_to_inf:
            return
        lost = f"{target}'s largest is {float(finfo.max):.7g}, so they would become inf"
        fix = f"scale the leaf into {target}'s range"
    raise ValueError(
        f"{where} has {dtype} values{parts} in [{lo}, {hi}], but with jax_enable_x64 off JAX "
        f"converts it to {np.dtype(jax.dtypes.canonicalize_dtype(dtype))} and {lost}; {fix}, "
        "or turn x64 on: jax.config.update('jax_enable_x64', True)"
    )


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    """``array`` with rows appended up to ``size``: copies of its first row, or zeros if empty."""
    missing = size - array.shape[0]
    if missing == 0:
        return array
    if array.shape[0] == 0:
        return np.zeros((size, *array.shape[1:]), array.dtype)
    return np.concatenate([array, np.repeat(array[:1], missing, axis=0)])


def _describe(structure: Any, signature: list[tuple[tuple[int, ...], np.dtype, Any]]) -> str:
    leaves = [_Text(_leaf_text(*leaf)) for leaf in signature]
    return str(structure.unflatten(leaves))


def _leaf_text(shape: tuple[int, ...], dtype: np.dtype, impl: Any) -> str:
    return f"{'key data ' if impl else ''}{dtype}[{', '.join(['B', *map(str, shape)])}]"


class _Text(str):
    """A string that shows without quotes inside a container's repr."""

    __repr__ = str.__str__
