"""Growth: pure, function-preserving operators on models (depth, width, vocabulary) and their typed specs.

spec.py (GrowthSpec, results, `with_vocab_sources`), depth.py, width.py, vocab.py (the operators),
core.py (`grow`, `grow_many`: run an operator, carry the side state), factored.py (per-axis side state).
May import `growlm.models` (and `growlm.errors`, `growlm.io`); nothing above.
"""

from growlm.growth.core import generation_counts, grow, grow_many
from growlm.growth.depth import depth_positions
from growlm.growth.factored import Factored
from growlm.growth.spec import GrowthResult, GrowthSpec, ParamMap, with_vocab_sources
from growlm.growth.width import width_config

__all__ = ["Factored", "GrowthResult", "GrowthSpec", "ParamMap", "depth_positions", "generation_counts", "grow",
           "grow_many", "width_config", "with_vocab_sources"]
