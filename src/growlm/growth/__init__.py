"""Growth: pure, function-preserving operators on models (depth, width, vocabulary) and their typed specs.

May import `growlm.models` (and `growlm.errors`, `growlm.io`); nothing above.
"""

from growlm.growth.ops import (
    GrowthResult,
    GrowthSpec,
    ParamMap,
    depth_positions,
    grow,
    grow_many,
    transfer_adamw_state,
    width_config,
)

__all__ = ["GrowthResult", "GrowthSpec", "ParamMap", "depth_positions", "grow", "grow_many",
           "transfer_adamw_state", "width_config"]
