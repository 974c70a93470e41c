"""Everything a training run changes as it goes, in one place: `TrainState` (and the plateau trigger it holds).

A checkpoint stores `TrainState.to_dict()` as `state.json` and `TrainState.tensors()` as safetensors
groups; `TrainState.from_dict` reads both back. Each field is named once, in the dataclass below: the
JSON keys are the field names, so save and load cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from growlm.growth.factored import Factored, Op, pack, unpack
from growlm.train import checkpoint as ckpt
from growlm.train.data import BlockSampler


@dataclass
class PlateauTrigger:
    """Fires when `patience` consecutive evaluations fail to beat the best loss by more than `min_delta`.

    The first evaluation only sets the reference. After firing, the counter restarts, the reference
    becomes the next evaluation (the grown model's), and `cooldown` evaluations are ignored.
    """

    patience: int
    min_delta: float = 0.0
    cooldown: int = 0
    best: float | None = None
    bad: int = 0
    cooldown_left: int = 0

    def update(self, loss: float) -> bool:
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.best = loss if self.best is None else min(self.best, loss)
            return False
        if self.best is None or loss < self.best - self.min_delta:
            self.best, self.bad = loss, 0
            return False
        self.bad += 1
        if self.bad >= self.patience:
            self.bad, self.best, self.cooldown_left = 0, None, self.cooldown
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, s: dict[str, Any]) -> None:
        for k, v in s.items():
            setattr(self, k, v)


# The tensor fields (saved as safetensors groups) and the op that combines each one's factors.
TENSOR_FIELDS: dict[str, Op] = {"generations": "max", "update_scale": "mul"}


@dataclass
class TrainState:
    """The mutable state of a run. `sampler` and `plateau` are objects with their own state dicts;
    `generations` (growth generation of every element, op max) and `update_scale` (the operators'
    per-element update multipliers, op mul; absent name = 1) are kept factored."""

    sampler: BlockSampler
    plateau: PlateauTrigger
    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    generation: int = 0
    last_growth_step: int = 0
    generations: dict[str, Factored] = field(default_factory=dict)
    update_scale: dict[str, Factored] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    nan_consecutive: int = 0
    nan_skips: int = 0
    best_val: float | None = None
    last_val: float | None = None
    base_val: float | None = None
    retention: dict[str, float] = field(default_factory=dict)
    teacher: str | None = None
    """Distillation: the fingerprint of the teacher's weights (the teacher is not saved, its identity is)."""

    def to_dict(self, world: int = 1) -> dict[str, Any]:
        """JSON-ready: every plain field, the sampler and plateau state, the host RNG states and `world`."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in TENSOR_FIELDS:
                continue
            out[f.name] = v.state_dict() if f.name in ("sampler", "plateau") else v
        return {**out, **ckpt.capture_host_rng(), "world": world}

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The factored fields as flat tensor groups (`factored.pack`, prefix = parameter name)."""
        return {name: pack(getattr(self, name)) for name in TENSOR_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]], sampler: BlockSampler,
                  plateau: PlateauTrigger) -> "TrainState":
        """The inverse of `to_dict` + `tensors`. `sampler` and `plateau` are fresh objects for the current
        data and config; their saved positions are loaded into them (a sampler refuses different data)."""
        sampler.load_state_dict(d["sampler"])
        plateau.load_state_dict(d["plateau"])
        kw: dict[str, Any] = {"sampler": sampler, "plateau": plateau}
        for f in dataclasses.fields(cls):
            if f.name in TENSOR_FIELDS:
                kw[f.name] = unpack(tensors.get(f.name, {}), TENSOR_FIELDS[f.name])
            elif f.name not in kw and f.name in d:  # a field a checkpoint lacks keeps its default
                kw[f.name] = d[f.name]
        return cls(**kw)
