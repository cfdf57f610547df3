"""Distributed input: batches from a host dataset onto the replicas, prefetched onto the devices.

``strategy.experimental_distribute_dataset(dataset)`` takes any iterable of global batches (a
list, a generator, a ``tf.data.Dataset``, a grain loader): each element is a pytree of arrays
whose leaves share a leading batch axis of size ``B``, and replica ``i`` receives rows
``[i * B / R, (i + 1) * B / R)``. Each element of the distributed dataset is the same pytree with
every leaf a ``ts.PerReplica``, so ``for x, y in dist`` and ``batch["image"]`` work as in
tf.distribute; inside ``strategy.run`` a leaf is the replica's ``(B / R, ...)`` slice. A
background thread keeps ``InputOptions.experimental_per_replica_buffer_size`` batches already on
the devices while the current step runs.

Every batch has one static shape, the first batch's (or ``InputOptions.global_batch_size``), so
a step compiles once. A last batch with fewer rows is never dropped silently: by default it
raises a ValueError; with ``InputOptions(drop_remainder=True)`` it is dropped; with
``InputOptions(mask=True)`` it is padded to the static shape, with copies of its
first row so that the step computes nothing NaN, and every element becomes ``(batch, mask)``
where ``mask`` is a PerReplica bool of shape ``(B / R,)`` per replica, True on real rows. Full
batches carry an all-True mask, so the structure never changes and nothing recompiles.

The recipe for exact epoch metrics and gradients: weight each example by its mask, sum across
replicas, divide by the number of real examples::

  def step(params, batch, mask):
      ctx = ts.get_replica_context()
      weight = mask.astype(jnp.float32)
      per_example = loss_fn(params, batch)                    # shape (B / R,)
      loss_sum = ctx.all_reduce("sum", jnp.sum(per_example * weight))
      count = ctx.all_reduce("sum", jnp.sum(weight))
      return loss_sum / count     # or return both and sum them over the epoch on the host

  for batch, mask in strategy.experimental_distribute_dataset(
          dataset, ts.InputOptions(mask=True)):
      loss = strategy.run(step, args=(params, batch, mask))

For gradients, differentiate ``jnp.sum(per_example * weight) / count`` (``count`` being the
all-reduced number of real rows) and all-reduce SUM the gradients.

Several processes: each process reads the whole global batch but places only the rows of the
replicas whose devices it addresses (``jax.make_array_from_process_local_data``). With
``distribute_datasets_from_function``, as in tf.distribute, each process's dataset yields
per-replica batches of ``ctx.get_per_replica_batch_size(global_batch_size)`` rows, and each of
the process's replicas takes one of them per step, in replica order. A per-replica batch lands
whole on its replica: a last step with fewer per-replica batches than replicas (or whose last
one has fewer rows) is a partial step, padded slice by slice and masked, dropped, or refused as
a partial batch is. Every process must yield the same number of batches.

Each batch keeps the first one's structure, dtypes and shapes (a change is a ValueError naming
the leaf and both shapes), and a leaf whose values JAX's dtype would not hold (an int64 above
2**31 with ``jax_enable_x64`` off) is a ValueError naming the leaf and its range.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from tpustrat import _mesh
from tpustrat._batching import (
    Batcher,
    Layout,
    host_iterator,
    positioned_elements,
    set_source_state,
    skip_reads,
    steps_of_per_replica_batches,
)
from tpustrat._checks import describe
from tpustrat._dataset_options import InputContext, InputOptions
from tpustrat._prefetch import DistributedIterator
from tpustrat._types import PyTree
from tpustrat._values import local_replicas


class DistributedDataset:
    """A dataset whose elements are pytrees of PerReplica values, one slice per replica.

    Made by ``strategy.experimental_distribute_dataset`` or
    ``strategy.distribute_datasets_from_function``. Each ``iter(dist)`` starts an epoch over
    the underlying dataset; a dataset that is itself an iterator (a generator) can be iterated
    only once.

    Example:
      >>> strategy = ts.TPUStrategy()
      >>> dist = strategy.experimental_distribute_dataset([np.zeros((16, 3))] * 2)
      >>> len(dist), dist.element_spec.shape
      (2, (2, 3))
    """

    def __init__(
        self,
        dataset: Iterable[PyTree],
        layout: Layout,
        options: InputOptions,
        elements_per_step: int = 1,
        process_share: tuple[int, int] | None = None,
    ) -> None:
        self._dataset = dataset
        self._layout = layout
        self._options = options
        self._elements_per_step = elements_per_step
        self._process_share = process_share
        self._one_shot = isinstance(dataset, Iterator)
        self._started = False
        self._element_spec = None

    def __iter__(self) -> DistributedIterator:
        if self._one_shot:
            if self._started:
                raise ValueError(
                    f"this distributed dataset reads a one-shot {type(self._dataset).__name__} "
                    "that an earlier iter() already consumed; to iterate once per epoch pass a "
                    "re-iterable dataset (a list, a tf.data.Dataset, a grain loader, or an "
                    "object whose __iter__ starts a new epoch)"
                )
            self._started = True
        return self._iterator(self._options.experimental_per_replica_buffer_size)

    def __len__(self) -> int:
        """The number of steps per epoch, when the underlying dataset has a length.

        With ``drop_remainder=True`` the count leaves out the partial batches (and the partial
        steps of per-replica batches), which needs each batch's size: a dataset that is a
        sequence (a list or tuple of batches) shows it without reading any data; for any other
        dataset ``len()`` raises a TypeError.
        """
        elements = self._dataset
        if self._process_share is not None:
            if not isinstance(elements, Sequence):
                raise TypeError(
                    f"len() of a dataset sharded by process counts every P-th element, which a "
                    f"{type(elements).__name__} cannot pick without reading; pass a list of "
                    "batches, or count the steps of one epoch yourself"
                )
            index, count = self._process_share  # this process's elements of the full steps
            elements = elements[index : len(elements) // count * count : count]
        if not isinstance(elements, Sized):
            raise TypeError(
                f"the dataset ({type(elements).__name__}) has no len(), so the steps per epoch "
                "are unknown (an endless dataset has none); count the steps of one epoch "
                "yourself, or pass a dataset with a length (a list of batches, a sized loader)"
            )
        group = self._elements_per_step
        if not self._options.drop_remainder:
            return -(-len(elements) // group)
        if not isinstance(elements, Sequence):
            raise TypeError(
                "len() of a distributed dataset with drop_remainder=True needs the size of "
                f"every batch, which a {type(elements).__name__} does not show without "
                "reading it; pass a list of batches, or count the steps of one epoch yourself"
            )
        sizes = [_rows(element) for element in elements]
        if not sizes:
            return 0
        # A full step has ``group`` elements, each of the static rows per element.
        static_size = self._layout.static_size
        rows = static_size // group if static_size else sizes[0]
        steps = [sizes[i : i + group] for i in range(0, len(sizes), group)]
        return sum(step == [rows] * group for step in steps)

    @property
    def element_spec(self) -> PyTree:
        """The shapes and dtypes one replica sees in the step: ``jax.ShapeDtypeStruct`` leaves.

        Computed once, from the first batch of a fresh pass over the dataset.
        """
        if self._element_spec is None:
            if self._one_shot:
                raise TypeError(
                    "element_spec of a dataset that is a one-shot iterator would consume its "
                    "first batch; read it from the iterator instead: iter(dist).element_spec"
                )
            with self._iterator(buffer_size=0) as iterator:
                self._element_spec = iterator.element_spec
        return self._element_spec

    def _iterator(self, buffer_size: int) -> DistributedIterator:
        return DistributedIterator(
            _DatasetInput(
                self._dataset,
                self._layout,
                self._options,
                self._elements_per_step,
                self._process_share,
            ),
            buffer_size,
        )


class _DatasetInput:
    """One pass over a distributed dataset, opened at an input position (a PositionedInput)."""

    start: dict[str, Any] = {"batches": 0, "reads": 0}  # noqa: RUF012 (never mutated)

    def __init__(
        self,
        dataset: Iterable[PyTree],
        layout: Layout,
        options: InputOptions,
        elements_per_step: int,
        process_share: tuple[int, int] | None,
    ):
        self._dataset = dataset
        self._layout = layout
        self._options = options
        self._elements_per_step = elements_per_step
        self._process_share = process_share

    def open(self, position: dict[str, Any]) -> Iterator[tuple[PyTree, dict[str, Any]]]:
        source = host_iterator(self._dataset)
        # The dataset's own iterator state, when saved, puts it just after the last batch used;
        # otherwise the batches already used are read again and skipped.
        has_state = "source" in position or "source_bytes" in position
        if has_state:
            set_source_state(source, position)
        raw = source
        if self._process_share is not None:
            source = _process_share(source, *self._process_share, self._options.drop_remainder)
        if self._elements_per_step > 1:
            per_replica = self._layout.static_size and (
                self._layout.static_size // self._elements_per_step
            )
            source = steps_of_per_replica_batches(source, self._elements_per_step, per_replica)
        if not has_state:
            skip_reads(source, position["reads"])
        batcher = Batcher(self._layout, self._options, first_index=position["reads"])
        return positioned_elements(source, batcher, position, state_of=raw)

    def check(self, position: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(position, Mapping):
            raise TypeError(
                f"an input position is a dict from get_state(), got {describe(position)}"
            )
        for key in ("batches", "reads"):
            value = position.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"input position {describe(dict(position))} has {key}={describe(value)}; "
                    "pass a dict returned by DistributedIterator.get_state()"
                )
        return dict(position)


def distribute_dataset(
    mesh: Mesh, dataset: Iterable[PyTree], options: InputOptions | None = None
) -> DistributedDataset:
    """Splits each global batch of ``dataset`` over the replicas of ``mesh``.

    Args:
      mesh: the mesh the strategy places values on (its replica axis first).
      dataset: an iterable of pytrees whose leaves share a leading global-batch axis.
      options: a ``ts.InputOptions``; default ``InputOptions()``.

    Returns:
      A DistributedDataset; replica ``i`` of ``R`` gets rows ``[i * B / R, (i + 1) * B / R)``.
    """
    options = _check_options(options, mesh)
    _check_dataset(dataset, "experimental_distribute_dataset")
    num_replicas = mesh.shape[_mesh.REPLICA_AXIS]
    processes = sorted({d.process_index for d in mesh.devices.flat})
    if options.shard_by_process and len(processes) > 1:
        layout = _process_layout(mesh, options, "per-process batch")
        share = (processes.index(jax.process_index()), len(processes))
        return DistributedDataset(dataset, layout, options, process_share=share)
    layout = Layout(
        mesh=mesh,
        positions=tuple(local_replicas(mesh)),
        num_slices=num_replicas,
        static_size=_static_size(options, num_replicas, num_replicas),
        batch_name="global batch",
        slices_name="replicas",
    )
    return DistributedDataset(dataset, layout, options)


def distribute_datasets_from_function(
    mesh: Mesh,
    dataset_fn: Callable[[InputContext], Iterable[PyTree]],
    options: InputOptions | None = None,
) -> DistributedDataset:
    """Calls ``dataset_fn`` once per process; each local replica takes one element per step.

    Args:
      mesh: the mesh the strategy places values on (its replica axis first).
      dataset_fn: takes a ``ts.InputContext`` and returns this process's dataset, whose
        elements are per-replica batches of ``ctx.get_per_replica_batch_size(global_batch)``
        rows.
      options: a ``ts.InputOptions``; its ``global_batch_size`` is the global one.

    Returns:
      A DistributedDataset; at each step the process's ``L`` replicas take the next ``L``
      elements, in replica order. Only the last element may be partial.
    """
    if not callable(dataset_fn):
        raise TypeError(
            f"distribute_datasets_from_function needs a callable dataset_fn, got "
            f"{type(dataset_fn).__name__}; pass a function taking a ts.InputContext"
        )
    options = _check_options(options, mesh)
    num_replicas = mesh.shape[_mesh.REPLICA_AXIS]
    local = local_replicas(mesh)
    for replica in local:
        processes = sorted({d.process_index for d in mesh.devices[replica].flat})
        if len(processes) > 1:
            raise ValueError(
                f"replica {replica} spans processes {processes}, so no single input pipeline "
                "can feed it; use strategy.experimental_distribute_dataset, which gives every "
                "process the whole global batch"
            )
    processes = sorted({d.process_index for d in mesh.devices.flat})
    context = InputContext(
        num_input_pipelines=len(processes),
        input_pipeline_id=processes.index(jax.process_index()),
        num_replicas_in_sync=num_replicas,
    )
    dataset = dataset_fn(context)
    _check_dataset(dataset, "the dataset_fn of distribute_datasets_from_function")
    layout = _process_layout(mesh, options, "step of per-replica batches")
    return DistributedDataset(dataset, layout, options, elements_per_step=len(local))


def _process_layout(mesh: Mesh, options: InputOptions, batch_name: str) -> Layout:
    """The rows of one host batch go to this process's replicas, in order."""
    local = local_replicas(mesh)
    return Layout(
        mesh=mesh,
        positions=tuple(range(len(local))),
        num_slices=len(local),
        static_size=_static_size(options, mesh.shape[_mesh.REPLICA_AXIS], len(local)),
        batch_name=batch_name,
        slices_name="replicas of this process",
    )


def _process_share(
    source: Iterator[PyTree], index: int, count: int, drop_remainder: bool
) -> Iterator[PyTree]:
    """Element ``index`` of every ``count`` consecutive elements of ``source`` (see
    ``InputOptions.shard_by_process``); the other processes' elements are passed over unread.
    """
    while True:
        group = list(itertools.islice(source, count))
        if len(group) == count:
            yield group[index]
            continue
        if group and not drop_remainder:
            raise ValueError(
                f"with shard_by_process each step takes one element per process, but the "
                f"dataset ended with {len(group)} element(s) for {count} processes; give it a "
                f"multiple of {count} elements, or pass drop_remainder=True to drop them"
            )
        return


def _static_size(options: InputOptions, num_replicas: int, num_slices: int) -> int | None:
    """The rows of one host batch of ``num_slices`` replicas, from the global batch option."""
    if options.global_batch_size is None:
        return None
    context = InputContext(num_replicas_in_sync=num_replicas)
    return context.get_per_replica_batch_size(options.global_batch_size) * num_slices


def _rows(element: PyTree) -> int:
    leaves = jax.tree.leaves(element)
    return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 0


def _check_options(options: InputOptions | None, mesh: Mesh) -> InputOptions:
    if options is None:
        return InputOptions()
    if not isinstance(options, InputOptions):
        raise TypeError(f"options must be a ts.InputOptions, got {type(options).__name__}")
    processes = {d.process_index for d in mesh.devices.flat}
    if not options.experimental_fetch_to_device and len(processes) > 1:
        raise ValueError(
            "experimental_fetch_to_device=False keeps batches as host arrays, which works only "
            f"when one process drives every device; this mesh spans {len(processes)} processes, "
            "so leave it True"
        )
    return options


def _check_dataset(dataset: Any, what: str) -> None:
    if isinstance(dataset, (np.ndarray, jax.Array)):
        raise TypeError(
            f"{what} got a single array of shape {np.shape(dataset)}, not a dataset; pass an "
            "iterable of batches, e.g. [x[i:i + B] for i in range(0, len(x), B)]"
        )
    if isinstance(dataset, Mapping):
        raise TypeError(
            f"{what} got a {type(dataset).__name__}, not a dataset; pass an iterable of "
            "batches, e.g. a list of dicts of arrays"
        )
    if not (isinstance(dataset, Iterable) or hasattr(dataset, "as_numpy_iterator")):
        raise TypeError(
            f"{what} needs an iterable of batches (a list, a generator, a tf.data.Dataset, a "
            f"grain loader), got {type(dataset).__name__}"
        )
