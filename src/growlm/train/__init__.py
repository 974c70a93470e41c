"""Training: the Trainer and its state, optimizer rule, data, checkpoints, FLOPs, regularisers.

May import `growlm.models`, `growlm.growth` and `growlm.eval`; nothing above (never `growlm.cli`).
"""

from growlm.train.trainer import (
    GrowthConfig,
    ModelSource,
    OptimConfig,
    PlateauTrigger,
    RegConfig,
    RunConfig,
    TrainConfig,
    Trainer,
    TrainResult,
    lr_at,
    train,
)

__all__ = ["GrowthConfig", "ModelSource", "OptimConfig", "PlateauTrigger", "RegConfig", "RunConfig",
           "TrainConfig", "TrainResult", "Trainer", "lr_at", "train"]
