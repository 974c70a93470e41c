"""Training: the Trainer and its state, optimizer rule, data, checkpoints, FLOPs, regularisers.

May import `growlm.models`, `growlm.growth` and `growlm.eval`; nothing above (never `growlm.cli`).
"""

from growlm.train.build import setup
from growlm.train.config import GrowthConfig, ModelSource, OptimConfig, RegConfig, RunConfig, TrainConfig
from growlm.train.optim import lr_at, multiplied_step, transfer_adamw_state, update_multipliers
from growlm.train.state import PlateauTrigger, TrainState
from growlm.train.trainer import Trainer, TrainResult, train

__all__ = ["GrowthConfig", "ModelSource", "OptimConfig", "PlateauTrigger", "RegConfig", "RunConfig",
           "TrainConfig", "TrainResult", "TrainState", "Trainer", "lr_at", "multiplied_step", "setup", "train",
           "transfer_adamw_state", "update_multipliers"]
