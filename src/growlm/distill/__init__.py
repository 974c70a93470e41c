"""Distillation: objectives (losses between a student and a teacher)."""

from growlm.distill.objectives import (
    TEMPERATURE_POWER,
    Objective,
    ObjectiveConfig,
    attention_loss,
    hidden_loss,
    layer_map,
    logits_divergence,
    logits_loss,
    make_projector,
    next_token_loss,
)

__all__ = [
    "TEMPERATURE_POWER",
    "Objective",
    "ObjectiveConfig",
    "attention_loss",
    "hidden_loss",
    "layer_map",
    "logits_divergence",
    "logits_loss",
    "make_projector",
    "next_token_loss",
]
