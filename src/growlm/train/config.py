"""Typed configuration of a training run: where the model comes from, AdamW and its schedule, growth
during training, regularisers and the loop; plus the comparison that decides whether a run may resume.

`TrainConfig.to_dict()` is what every checkpoint saves as `train_config.json`; `TrainConfig.from_dict`
reads it back (and YAML recipes), building typed `GrowthSpec` objects for the growth operators.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from growlm.distill.objectives import ObjectiveConfig
from growlm.distill.prune import StudentSpec
from growlm.errors import GrowlmError
from growlm.growth import GrowthSpec
from growlm.models.config import check_keys
from growlm.train.data import DataConfig


# -- configuration ------------------------------------------------------------------------------------
@dataclass
class ModelSource:
    """Which model to start from."""

    name: str = "smollm2-135m"
    """With init=pretrained: a spec for growlm.models.hf.load_model (smollm2-135m, a HF/growlm dir, a .gguf, a hub id).
    With init=scratch: a ModelConfig preset name (tiny-llama, tiny-gpt2, gpt2, smollm2-135m)."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """Load pretrained weights, or build a randomly initialised model from a preset."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields changed on the preset (scratch only), e.g. {n_layer: 2, vocab_size: 257}."""
    tokenizer: str | None = None
    """None = the model's own tokenizer; 'bytes' = UTF-8 bytes + EOS (257 ids, no files); or a tokenizer dir."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 6e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay (0 = decay to zero)."""
    warmup_steps: int = 0
    """Linear warmup from lr/warmup_steps to lr."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape after warmup, down to min_lr at max_steps ('constant' keeps lr)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (>= 2-D); norms, biases and nothing else decay-free."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise GrowlmError(f"optim: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0:
            raise GrowlmError("optim.warmup_steps must be >= 0")
        _finite("optim", lr=self.lr, min_lr=self.min_lr, eps=self.eps, weight_decay=self.weight_decay,
                grad_clip=self.grad_clip)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise GrowlmError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            raise GrowlmError(f"optim.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise GrowlmError(f"optim: need weight_decay >= 0 and grad_clip >= 0 (0 = off), got "
                              f"weight_decay={self.weight_decay}, grad_clip={self.grad_clip}")


@dataclass
class GrowthConfig:
    """When and how the model grows during training."""

    trigger: Literal["none", "schedule", "steps", "plateau"] = "none"
    """'schedule' = start + k*every; 'steps' = the explicit list; 'plateau' = validation loss stalls."""
    start: int | None = None
    """First scheduled event (None = every). 0 grows before the first step."""
    every: int = 500
    """Steps between scheduled events."""
    max_events: int = 3
    """At most this many growth events (all triggers)."""
    steps: list[int] = field(default_factory=list)
    """Explicit event steps for trigger=steps (0 = before the first step)."""
    patience: int = 3
    """Plateau: fire after this many evaluations without an improvement of min_delta."""
    min_delta: float = 0.0
    """Plateau: an improvement must lower the best validation loss by more than this."""
    cooldown: int = 0
    """Plateau: evaluations ignored after an event."""
    operators: list[GrowthSpec] = field(default_factory=lambda: [GrowthSpec("depth")])
    """The growth step of each event (cycled), e.g. [{operator: depth, n: 2}, {operator: width, factor: 2}].
    operator keys: depth (identity blocks: n, where, layers, init), stack (G_stack copies, not exact: n, where),
    width (factor, or n_embd / n_head / n_kv_head / ffn_size / head_dim), vocab (vocab_size, tokenizer);
    every field: --growth.operators.help GrowthSpec."""
    old_params: Literal["train", "freeze", "freeze_base", "decay"] = "train"
    """What was learned before an event: keep training ('train'), freeze every older generation ('freeze':
    only the newest elements train), freeze only the original model ('freeze_base': everything grown
    trains), or decay the update per generation ('decay')."""
    gen_lr_mult: float = 0.1
    """old_params=decay: generation g moves gen_lr_mult ** (G - g) times its AdamW update (G = newest)."""
    new_warmup_steps: int = 0
    """Warm the update of the newest elements up linearly over this many steps after an event."""
    lr_rewarm_steps: int = 0
    """Re-warm the learning rate of every trainable parameter after each event: times (s + 1) / k at the k steps
    s = 0..k-1 after it, on top of the schedule (0 = off; new_warmup_steps warms the newest elements only)."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.max_events < 0 or self.patience < 1 or self.cooldown < 0:
            raise GrowlmError("growth: need every >= 1, max_events >= 0, patience >= 1, cooldown >= 0")
        if not self.operators and self.trigger != "none":
            raise GrowlmError("growth.operators is empty: give at least one operator, e.g. [{operator: depth}]")
        if not 0 <= self.gen_lr_mult <= 1:
            raise GrowlmError(f"growth.gen_lr_mult must be in [0, 1], got {self.gen_lr_mult}")
        if (self.start is not None and self.start < 0) or any(s < 0 for s in self.steps) or self.new_warmup_steps < 0:
            raise GrowlmError("growth: start, steps and new_warmup_steps must be >= 0")
        if self.lr_rewarm_steps < 0:
            raise GrowlmError(f"growth.lr_rewarm_steps must be >= 0 (0 = off), got {self.lr_rewarm_steps}")
        _finite("growth", min_delta=self.min_delta)
        # mappings (YAML, JSON, Python callers) become typed specs here: bad ones fail before training
        self.operators = [_spec(op) for op in self.operators]


def _finite(section: str, **values: float) -> None:
    for k, v in values.items():
        if not math.isfinite(v):
            raise GrowlmError(f"{section}.{k} must be a finite number, got {v}")


def _spec(op: Any) -> GrowthSpec:
    if isinstance(op, GrowthSpec):
        return op
    if not isinstance(op, dict):
        raise GrowlmError(f"growth.operators entries must be mappings, got {op!r}")
    return GrowthSpec.from_dict(dict(op))


@dataclass
class RegConfig:
    """Regularisers against forgetting, active after the first growth event."""

    kd_weight: float = 0.0
    """Weight of T^2 * KL(teacher || model) added to the loss after the first growth event (0 = off)."""
    kd_temperature: float = 2.0
    """Distillation temperature T."""
    kd_teacher: Literal["snapshot", "base"] = "snapshot"
    """The KD teacher: 'snapshot' = a frozen copy of the model just before each growth event (re-taken at every
    event); 'base' = the model as it was before the first event, for the whole run."""
    ewc_lambda: float = 0.0
    """EWC strength lambda in (lambda/2) sum F (theta - theta*)^2 (0 = off)."""
    ewc_samples: int = 16
    """Training sequences used for the Fisher at each growth event."""
    ewc_fisher: Literal["empirical", "true"] = "empirical"
    """'empirical' = gold next tokens; 'true' = labels sampled from the model."""

    def __post_init__(self) -> None:
        _finite("reg", kd_weight=self.kd_weight, kd_temperature=self.kd_temperature, ewc_lambda=self.ewc_lambda)
        if self.kd_weight < 0 or self.ewc_lambda < 0:
            raise GrowlmError(f"reg: kd_weight and ewc_lambda must be >= 0, got {self.kd_weight}, {self.ewc_lambda}")
        if self.kd_temperature <= 0:
            raise GrowlmError(f"reg.kd_temperature must be > 0, got {self.kd_temperature}")
        if self.ewc_samples < 1:
            raise GrowlmError(f"reg.ewc_samples must be >= 1, got {self.ewc_samples}")
        if self.kd_teacher not in ("snapshot", "base"):
            raise GrowlmError(f"reg.kd_teacher must be 'snapshot' or 'base', got {self.kd_teacher!r}")


@dataclass
class DistillConfig:
    """Distillation from a teacher model (growlm distill): where the student comes from, the objective, the targets."""

    teacher: str | None = None
    """The teacher (a spec as for model.name with init=pretrained: smollm2-135m, a HF/growlm dir, a .gguf);
    None = no teacher (KD from the pre-growth snapshot is reg.kd_weight)."""
    student: StudentSpec | None = None
    """Cut the student from the teacher (layers, n_layer / depth_by, every, n_head, n_kv_head, ffn_size, n_embd,
    init pruned|random); None = the student is the model section (pretrained or scratch)."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The loss: ce_weight CE + kd_weight logits objective + hidden_weight hidden states + attn_weight attention maps."""
    targets: Literal["online", "cached"] = "online"
    """'online' runs the teacher every step; 'cached' reads its top-k log-probabilities from a memory-mapped cache
    built once per (teacher, data, tokenizer, seq_len, top_k) (logits objectives forward_kl / soft_ce only)."""
    top_k: int = 64
    """Cached targets: teacher tokens kept per position (the rest is one merged outcome)."""
    targets_dtype: Literal["float16", "float32"] = "float16"
    """Cached targets: storage dtype of the log-probabilities."""
    targets_dir: str | None = None
    """Cached targets: folder of the caches; None = $GROWLM_CACHE/targets or ~/.cache/growlm/targets."""

    def __post_init__(self) -> None:
        if isinstance(self.objective, dict):
            check_keys(ObjectiveConfig, self.objective, "config key(s)", prefix="distill.objective.")
            self.objective = ObjectiveConfig(**self.objective)
        if isinstance(self.student, dict):
            self.student = StudentSpec.from_dict(self.student)
        if self.top_k < 1:
            raise GrowlmError(f"distill.top_k must be >= 1, got {self.top_k}")
        o = self.objective
        if self.teacher is None and (self.student is not None or self.targets == "cached"):
            raise GrowlmError("distill.student and distill.targets=cached need a teacher: set distill.teacher")
        if self.targets == "cached":
            if o.logits not in ("forward_kl", "soft_ce"):
                raise GrowlmError(f"distill.targets=cached supports the logits objectives forward_kl and soft_ce, "
                                  f"not {o.logits}; use distill.targets=online")
            if o.hidden_weight > 0 or o.attn_weight > 0:
                raise GrowlmError("hidden-state and attention objectives need the teacher's activations: "
                                  "use distill.targets=online")


@dataclass
class RunConfig:
    """The loop: batch, length, precision, evaluation, logging, checkpoints."""

    max_steps: int = 100
    """Optimizer steps."""
    micro_batch: int = 8
    """Sequences per forward/backward (per process)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (per process)."""
    dtype: Literal["float32", "float64"] = "float32"
    """Dtype of the weights and optimizer state."""
    autocast: Literal["auto", "none", "bf16"] = "auto"
    """Mixed precision: 'bf16' = bf16 autocast for matmuls, float32 weights and loss; 'none' = the weights' dtype;
    'auto' = bf16 only where its matmuls on this model's shapes are measured faster than float32 (once per
    machine and thread count, cached; growlm.train.precision)."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""
    eval_every: int = 50
    """Evaluate validation loss every N steps (and at the last step)."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    out_dir: str = "runs/default"
    """Run folder: metrics.jsonl, checkpoints/, hf/."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept (the best one is kept in addition)."""
    resume: bool = False
    """Continue from the latest checkpoint in out_dir (its config must match)."""
    seed: int = 0
    """Seed of initialisation and growth noise."""
    max_nan_skips: int = 3
    """Consecutive non-finite steps skipped before stopping with an error."""
    export_hf: bool = True
    """Write the final model as a Hugging Face directory out_dir/hf."""
    retention_blocks: int = 0
    """Blocks of held-out non-Shakespeare text (Python's language reference) scored at start and end (0 = off)."""
    loss_chunk: int = 1024
    """Tokens per chunk of the output head + cross-entropy: the (tokens, vocab) logits and their gradient are
    never built for more than this many tokens at once (0 = all at once). Same loss and gradients."""
    compile: bool | Literal["auto", "blocks"] = "auto"
    """torch.compile inside the loop. blocks = each transformer block through one shared compiled graph (compiled
    once per run: blocks added by depth growth reuse it); true = the whole model and loss (recompiled after each
    growth event); false = eager. Compile time is logged as compile_s and left out of tok_s; eager with one
    warning where compiling fails. auto = true on CUDA; on CPU blocks where the run's FLOPs at the measured matmul
    peak need at least 10 minutes (a cold compile costs 30-50 s and saves 2-8% of a step there), else false."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward instead of keeping them (less memory, ~1/3 more compute)."""
    peak_flops: float | None = None
    """Matmul peak for MFU in FLOP/s; None = measure once and cache, 0 = no MFU."""
    overwrite: bool = False
    """Start afresh in an out_dir that already holds a run (its metrics, checkpoints and hf/ are replaced)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: 'ddp' (a full copy per process) or 'fsdp' (FSDP2: weights, gradients and AdamW state
    sharded across processes; DCP checkpoints that resume on another process count)."""

    def __post_init__(self) -> None:
        if min(self.max_steps, self.micro_batch, self.grad_accum, self.eval_every, self.log_every, self.keep_last) < 1:
            raise GrowlmError("run: max_steps, micro_batch, grad_accum, eval_every, log_every and keep_last must be >= 1")
        if min(self.save_every, self.max_nan_skips, self.retention_blocks, self.loss_chunk) < 0:
            raise GrowlmError("run: save_every, max_nan_skips, retention_blocks and loss_chunk must be >= 0")
        if self.peak_flops is not None and not (self.peak_flops >= 0 and math.isfinite(self.peak_flops)):
            raise GrowlmError(f"run.peak_flops must be >= 0, got {self.peak_flops}")
        if self.compile not in (True, False, "auto", "blocks"):
            raise GrowlmError(f"run.compile must be true, false, auto or blocks, got {self.compile!r}")
        if self.resume and self.overwrite:
            raise GrowlmError("run.resume and run.overwrite exclude each other: continue the run or replace it")


@dataclass
class TrainConfig:
    """Everything a training run needs; saved with every checkpoint."""

    model: ModelSource = field(default_factory=ModelSource)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    run: RunConfig = field(default_factory=RunConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if self.distill.teacher is not None and self.reg.kd_weight > 0:
            raise GrowlmError("reg.kd_weight (KD from the pre-growth snapshot) and distill.teacher exclude each other: "
                              "the teacher already anchors the student")
        o = self.distill.objective
        if self.distill.teacher is not None and self.growth.trigger != "none" and (o.hidden_weight > 0 or o.attn_weight > 0):
            raise GrowlmError("growth during distillation supports the logits and CE objectives only (the hidden-state "
                              "and attention maps are fixed to the student's shape): set hidden_weight and attn_weight to 0")
        if self.run.parallel == "fsdp" and self.reg.ewc_lambda > 0:
            raise GrowlmError("reg.ewc_lambda > 0 is not supported with run.parallel fsdp yet; use run.parallel ddp")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """The inverse of `to_dict` (also reads YAML recipes): unknown keys raise, operators become GrowthSpecs."""
        types = {"model": ModelSource, "data": DataConfig, "optim": OptimConfig, "growth": GrowthConfig,
                 "reg": RegConfig, "run": RunConfig, "distill": DistillConfig}
        unknown = set(d) - set(types)
        if unknown:
            raise GrowlmError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        kw = {}
        for k, v in d.items():
            t = types[k]
            check_keys(t, v, "config key(s)", prefix=f"{k}.")
            if k == "optim" and "betas" in v:
                v = dict(v, betas=tuple(v["betas"]))
            if k == "growth" and "operators" in v:
                v = dict(v, operators=[_spec(op) for op in v["operators"]])
            kw[k] = t(**v)
        return cls(**kw)


# Fields that may differ when resuming without a word (they do not change the computation).
RESUME_MAY_DIFFER = {("run", "resume"), ("run", "peak_flops"), ("run", "export_hf"), ("run", "overwrite"),
                     ("run", "keep_last"), ("data", "cache_dir"), ("run", "device"),
                     ("run", "loss_chunk"), ("run", "compile"), ("run", "activation_checkpointing")}
# Fields that may change on resume, each reported in one line: the run's location (folders move), the learning
# rate and schedule length (the way out of a diverged run), and the eval / save / log cadence.
RESUME_MAY_CHANGE = {("run", "out_dir"), ("optim", "lr"), ("optim", "min_lr"), ("run", "max_steps"),
                     ("run", "eval_every"), ("run", "save_every"), ("run", "log_every")}


def resume_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'section.key X -> Y' for every RESUME_MAY_CHANGE field that differs (a checkpoint found under out_dir
    is this run, wherever the folder lies now, so out_dir only changes with a note)."""
    out = []
    for sec, k in sorted(RESUME_MAY_CHANGE):
        va, vb = saved.get(sec, {}).get(k), current.get(sec, {}).get(k)
        if va != vb:
            out.append(f"{sec}.{k} {va!r} -> {vb!r}")
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'section.key: checkpoint X vs now Y' for every setting that changes the computation."""
    out = []
    defaults = comparable(TrainConfig().to_dict())  # a section or key a checkpoint lacks predates it: its defaults applied
    for sec in sorted(set(saved) | set(current)):
        a, b = saved.get(sec, defaults.get(sec, {})), current.get(sec, {})
        for k in sorted(set(a) | set(b)):
            if (sec, k) in RESUME_MAY_DIFFER or (sec, k) in RESUME_MAY_CHANGE:
                continue
            va, vb = a.get(k, defaults.get(sec, {}).get(k)), b.get(k)
            if (sec, k) == ("growth", "operators"):  # given keys or all fields: the same specs compare equal
                va, vb = _specs_as_dicts(va), _specs_as_dicts(vb)
            if isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)):
                va, vb = list(va), list(vb)
            if va != vb:
                out.append(f"{sec}.{k}: checkpoint {va!r} vs now {vb!r}")
    return out


def _specs_as_dicts(ops: Any) -> Any:
    try:
        return [comparable(_spec(op).to_dict()) for op in ops]
    except (GrowlmError, TypeError):
        return ops


def comparable(d: dict[str, Any]) -> dict[str, Any]:
    """The config as JSON would give it back (tuples become lists)."""
    return json.loads(json.dumps(d))
