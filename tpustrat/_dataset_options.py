"""The input vocabulary: the options of a distributed dataset and what an input pipeline is told.

Both the distributed datasets (``_input``) and the host batching under them (``_batching``) read
these records, so they live a floor below either.
"""

from __future__ import annotations

import dataclasses

from tpustrat._checks import check_bool, check_int


@dataclasses.dataclass(frozen=True)
class InputContext:
    """What ``distribute_datasets_from_function`` tells ``dataset_fn`` about its input pipeline.

    There is one input pipeline per process; pipeline ``input_pipeline_id`` feeds that process's
    replicas, so its dataset should yield per-replica batches of
    ``get_per_replica_batch_size(global_batch_size)`` rows, one per replica and step (and read
    only its share of the files, e.g. shard ``input_pipeline_id`` of ``num_input_pipelines``).

    Attributes:
      num_input_pipelines: how many pipelines (processes) feed the replicas.
      input_pipeline_id: this pipeline's index in ``[0, num_input_pipelines)``.
      num_replicas_in_sync: how many replicas run each step together.

    Example:
      >>> ctx = InputContext(num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=8)
      >>> ctx.get_per_replica_batch_size(64)
      8
    """

    num_input_pipelines: int = 1
    input_pipeline_id: int = 0
    num_replicas_in_sync: int = 1

    def __post_init__(self):
        for name in ("num_input_pipelines", "num_replicas_in_sync"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("input_pipeline_id", self.input_pipeline_id, minimum=0)
        if self.input_pipeline_id >= self.num_input_pipelines:
            raise ValueError(
                f"input_pipeline_id {self.input_pipeline_id} is out of range for "
                f"{self.num_input_pipelines} input pipelines; use an id in "
                f"[0, {self.num_input_pipelines})"
            )

    def get_per_replica_batch_size(self, global_batch_size: int) -> int:
        """The rows each replica gets of a global batch of ``global_batch_size`` rows.

        Raises:
          ValueError: if ``global_batch_size`` is not a multiple of ``num_replicas_in_sync``.
        """
        check_int("global_batch_size", global_batch_size, minimum=1)
        if global_batch_size % self.num_replicas_in_sync:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by "
                f"{self.num_replicas_in_sync} replicas; use a global batch size that is a "
                f"multiple of {self.num_replicas_in_sync}"
            )
        return global_batch_size // self.num_replicas_in_sync


@dataclasses.dataclass(frozen=True)
class InputOptions:
    """How a distributed dataset moves batches onto the replicas.

    Attributes:
      experimental_fetch_to_device: True puts each batch on the devices in the background
        thread; False leaves host numpy arrays in the PerReplica values (one process only), and
        ``strategy.run`` copies them when it is called.
      experimental_per_replica_buffer_size: how many batches the background thread keeps ready
        ahead of the step; 0 reads and places each batch synchronously in ``next`` (no thread).
      mask: make every element ``(batch, mask)`` and pad a partial batch to the
        static shape; ``mask`` marks the real rows (the module docstring of ``tpustrat._input``
        gives the recipe).
      drop_remainder: drop a batch with fewer rows than the static shape, as tf.data does.
      global_batch_size: the static global batch every batch is padded to; default the first
        batch's size. Set it when the first batch may itself be partial.
      shard_by_process: for ``experimental_distribute_dataset`` in a job of ``P`` processes,
        TF's ``AutoShardPolicy.DATA``: each element of the dataset is one process's batch
        (``global_batch_size / P`` rows), and process ``p`` places only elements ``p``,
        ``p + P``, ``p + 2P``, ... on its replicas, so no process converts or copies another's
        rows. Step ``k`` trains on elements ``kP`` to ``kP + P - 1``, which is what one
        process would train on with those elements joined into one global batch. An epoch
        whose element count is not a multiple of ``P`` is an error at its end, unless
        ``drop_remainder=True`` drops the incomplete last step. In one process it changes
        nothing.

    Example:
      >>> InputOptions(mask=True).experimental_per_replica_buffer_size
      2
    """

    experimental_fetch_to_device: bool = True
    experimental_per_replica_buffer_size: int = 2
    mask: bool = False
    drop_remainder: bool = False
    global_batch_size: int | None = None
    shard_by_process: bool = False

    def __post_init__(self):
        # Each field is stored in one form (a Python bool or int), whatever numpy scalar it got.
        for name in _BOOL_FIELDS:
            object.__setattr__(self, name, check_bool(name, getattr(self, name)))
        size = check_int(
            "experimental_per_replica_buffer_size",
            self.experimental_per_replica_buffer_size,
            minimum=0,
        )
        object.__setattr__(self, "experimental_per_replica_buffer_size", size)
        if self.global_batch_size is not None:
            size = check_int("global_batch_size", self.global_batch_size, minimum=1)
            object.__setattr__(self, "global_batch_size", size)
        if self.mask and self.drop_remainder:
            raise ValueError(
                "InputOptions got mask=True and drop_remainder=True: a partial "
                "batch is either padded and masked or dropped; choose one"
            )


_BOOL_FIELDS = (
    "experimental_fetch_to_device",
    "mask",
    "drop_remainder",
    "shard_by_process",
)
