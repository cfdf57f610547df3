"""tpustrat: tf.distribute.TPUStrategy for JAX, built on jax.sharding and jax.shard_map."""

from tpustrat import compat, testing
from tpustrat._accounting import CompileStats, Recompile
from tpustrat._checkpoint import CheckpointError, CheckpointManager
from tpustrat._cluster import ClusterError, ClusterInfo, initialize_cluster
from tpustrat._context import (
    ReduceOp,
    ReplicaContext,
    get_replica_context,
)
from tpustrat._dataset_options import InputContext, InputOptions
from tpustrat._dispatch import RunOptions
from tpustrat._input import DistributedDataset
from tpustrat._layout import LayoutRules
from tpustrat._loss import compute_average_loss
from tpustrat._mesh import REPLICA_AXIS
from tpustrat._multistep import StepsResult
from tpustrat._params import gather_on_use, gather_params, shard_params
from tpustrat._preemption import PreemptionCheckpointHandler
from tpustrat._prefetch import DistributedIterator
from tpustrat._profiler import StepProfiler
from tpustrat._sharded_update import (
    ReplicaShard,
    ShardedUpdate,
    reshard_update_state,
    shard_update,
)
from tpustrat._strategy import TPUStrategy, get_strategy, has_strategy
from tpustrat._summary import SummaryWriter
from tpustrat._values import PerReplica, ValueContext
from tpustrat.compat import DeviceAssignment, Mirrored, Topology

__version__ = "0.1.0"

__all__ = [
    "REPLICA_AXIS",
    "CheckpointError",
    "CheckpointManager",
    "ClusterError",
    "ClusterInfo",
    "CompileStats",
    "DeviceAssignment",
    "DistributedDataset",
    "DistributedIterator",
    "InputContext",
    "InputOptions",
    "LayoutRules",
    "Mirrored",
    "PerReplica",
    "PreemptionCheckpointHandler",
    "Recompile",
    "ReduceOp",
    "ReplicaContext",
    "ReplicaShard",
    "RunOptions",
    "ShardedUpdate",
    "StepProfiler",
    "StepsResult",
    "SummaryWriter",
    "TPUStrategy",
    "Topology",
    "ValueContext",
    "compat",
    "compute_average_loss",
    "gather_on_use",
    "gather_params",
    "get_replica_context",
    "get_strategy",
    "has_strategy",
    "initialize_cluster",
    "reshard_update_state",
    "shard_params",
    "shard_update",
    "testing",
]
