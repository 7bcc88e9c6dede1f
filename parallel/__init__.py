"""jaxscale parallel: meshes, the logical-axis rules table, and sharding helpers."""

from parallel.mesh import AXES, make_mesh
from parallel.rules import ACTIVATION_RULES, PARAM_RULES, constrain, logical_to_spec, use_rules
from parallel.sharding import (
                               batch_sharding,
                               create_sharded,
                               init_optimizer,
                               logical_shardings,
                               shard_batch,
                               shard_state,
)

__all__ = ["ACTIVATION_RULES", "AXES", "PARAM_RULES", "batch_sharding", "constrain", "create_sharded", "init_optimizer",
           "logical_shardings", "logical_to_spec", "make_mesh", "shard_batch", "shard_state", "use_rules"]
