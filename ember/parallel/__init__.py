"""Native parallelism: devices, meshes, sharded arrays, communicators and runtimes.

``docs/parallel.md`` explains the concepts, ``docs/partitioning.md`` the partitioner. The
runtimes and communicators are reached as submodules (``ember.parallel.runtime``,
``ember.parallel.communicator``...).
"""

from ember.ir.sharding import Sharding, ShardingError
from ember.parallel import (
    checkpoint,  # checkpoint.save / checkpoint.load: sharded checkpoints
    eager,  # noqa: F401  (eager operations on sharded arrays)
    jit,  # noqa: F401  (ember.jit with shardings: partitioned, run on every device)
    plans,
)
from ember.parallel.array import (
    Shard,
    ShardedArray,
    ShardingGatherWarning,
    device_put,
    process_allgather,
    with_sharding_constraint,
)
from ember.parallel.explain import Collective, Explanation, Overlap
from ember.parallel.mesh import (
    Device,
    Mesh,
    device_count,
    devices,
    local_devices,
    process_count,
    process_index,
)
from ember.parallel.partition import Partitioned, partition
from ember.parallel.plans import Plan, shard
from ember.parallel.reshard import CostModel
from ember.parallel.shard_map import (
    all_gather,
    all_to_all,
    axis_index,
    pmax,
    pmean,
    pmin,
    ppermute,
    psum,
    psum_scatter,
    shard_map,
)
from ember.parallel.sharding import NamedSharding, PartitionSpec
from ember.parallel.simulate import run_spmd, simulate

__all__ = [
    "Device", "Mesh", "devices", "local_devices", "device_count", "process_index",
    "process_count", "PartitionSpec", "NamedSharding", "Sharding", "ShardingError",
    "ShardedArray", "Shard", "ShardingGatherWarning", "device_put", "process_allgather",
    "with_sharding_constraint", "shard_map", "psum", "pmean", "pmax", "pmin", "all_gather",
    "psum_scatter", "all_to_all", "ppermute", "axis_index", "partition", "Partitioned",
    "Explanation", "Collective", "Overlap", "CostModel", "simulate", "run_spmd", "plans", "Plan",
    "shard", "checkpoint",
]
