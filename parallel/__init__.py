"""jaxscale parallel: meshes, the logical-axis rules table, sharding helpers, multi-process set-up, pipeline."""

from parallel.distributed import any_process, global_batch_from_local, initialize, is_primary, process_rows
from parallel.mesh import AXES, make_mesh
from parallel.pipeline import gpipe
from parallel.rules import ACTIVATION_RULES, PARAM_RULES, constrain, logical_to_spec, use_rules
from parallel.sharding import (
                               abstract_sharded,
                               batch_sharding,
                               create_sharded,
                               init_optimizer,
                               logical_shardings,
                               shard_batch,
                               shard_state,
)

__all__ = ["ACTIVATION_RULES", "AXES", "PARAM_RULES", "abstract_sharded", "any_process", "batch_sharding", "constrain",
           "create_sharded", "global_batch_from_local", "gpipe", "init_optimizer", "initialize", "is_primary",
           "logical_shardings", "logical_to_spec", "make_mesh", "process_rows", "shard_batch", "shard_state",
           "use_rules"]
