"""The training loop: continued pretraining with growth during training.

One `Trainer` runs AdamW (Loshchilov & Hutter 2019) with warmup then cosine/linear decay (to zero by
default) or a constant rate, gradient accumulation, clipping, bf16 autocast with float32 weights,
periodic evaluation, `metrics.jsonl`, atomic checkpoints and exact resume, under torchrun/DDP or not.

Growth during training (the seed model card's design; operators in `growlm.growth`):
- triggers: a fixed schedule (`start + k * every`, at most `max_events`), an explicit list of steps, or a
  validation plateau (`PlateauTrigger`: `patience` evaluations without an improvement of `min_delta`,
  then `cooldown` evaluations of rest);
- each event evaluates just before, grows, rebuilds AdamW and carries its moments over
  (`growlm.growth.transfer_adamw_state`, the Adam-state rule documented in growlm.growth), evaluates just after and logs the
  validation-loss delta (0 up to rounding for function-preserving operators);
- what was learned before: `old_params="freeze"` (whole old tensors get requires_grad=False, old elements
  of grown tensors a zero update; "freeze_base" freezes only the original model), `"decay"` (generation g trains at `gen_lr_mult ** (G - g)` times the
  update while the schedule goes on) or `"train"`. Multipliers act on the AdamW UPDATE,
  p = p_before + m * (p_after - p_before), because Adam normalises gradient scale away (fact 6); the
  operators' own per-element `update_scale` (x n width cloning) multiplies in the same way; new
  elements can be warmed up linearly over `new_warmup_steps`;
- regularisers (`growlm.train.regularize`): KD from the frozen pre-growth snapshot and EWC anchored at growth.

Non-finite loss policy: a step whose loss (or gradient norm) is NaN/inf is skipped (no update, its batch
is consumed, the schedule advances); more than `max_nan_skips` consecutive skips stop the run with a
GrowlmError (nothing is saved from the non-finite state).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from growlm.errors import GrowlmError
from growlm.growth import GrowthSpec, grow, transfer_adamw_state
from growlm.models.config import ModelConfig, check_keys
from growlm.models.hf import load_model, save_hf
from growlm.models.model import GPT
from growlm.train import checkpoint as ckpt
from growlm.train.data import (BlockSampler, ByteTokenizer, DataConfig, PackedData, prepare_data, retention_text,
                               stack_blocks, text_blocks)
from growlm.train.flops import executed_flops_per_token, matmul_peak
from growlm.train.regularize import EWC, build_ewc, kd_loss


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
    operators: list[dict[str, Any]] = field(default_factory=lambda: [{"operator": "depth"}])
    """GrowthSpec fields of each event (cycled): e.g. [{operator: depth, ...}, {operator: width, ...}]."""
    old_params: Literal["train", "freeze", "freeze_base", "decay"] = "train"
    """What was learned before an event: keep training ('train'), freeze every older generation ('freeze':
    only the newest elements train), freeze only the original model ('freeze_base': everything grown
    trains), or decay the update per generation ('decay')."""
    gen_lr_mult: float = 0.1
    """old_params=decay: generation g moves gen_lr_mult ** (G - g) times its AdamW update (G = newest)."""
    new_warmup_steps: int = 0
    """Warm the update of the newest elements up linearly over this many steps after an event."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.max_events < 0 or self.patience < 1 or self.cooldown < 0:
            raise GrowlmError("growth: need every >= 1, max_events >= 0, patience >= 1, cooldown >= 0")
        if not self.operators and self.trigger != "none":
            raise GrowlmError("growth.operators is empty: give at least one operator, e.g. [{operator: depth}]")
        if not 0 <= self.gen_lr_mult <= 1:
            raise GrowlmError(f"growth.gen_lr_mult must be in [0, 1], got {self.gen_lr_mult}")
        for op in self.operators:  # fail before training, not at the first growth event
            if not isinstance(op, dict):
                raise GrowlmError(f"growth.operators entries must be mappings, got {op!r}")
            GrowthSpec.from_dict(dict(op))


@dataclass
class RegConfig:
    """Regularisers against forgetting, active after the first growth event."""

    kd_weight: float = 0.0
    """Weight of T^2 * KL(pre-growth snapshot || model) added to the loss (0 = off)."""
    kd_temperature: float = 2.0
    """Distillation temperature T."""
    ewc_lambda: float = 0.0
    """EWC strength lambda in (lambda/2) sum F (theta - theta*)^2 (0 = off)."""
    ewc_samples: int = 16
    """Training sequences used for the Fisher at each growth event."""
    ewc_fisher: Literal["empirical", "true"] = "empirical"
    """'empirical' = gold next tokens; 'true' = labels sampled from the model."""


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
    autocast: Literal["none", "bf16"] = "none"
    """Mixed precision: bf16 autocast for matmuls, float32 weights and loss."""
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
    peak_flops: float | None = None
    """Matmul peak for MFU in FLOP/s; None = measure once and cache, 0 = no MFU."""


@dataclass
class TrainConfig:
    """Everything a training run needs; saved with every checkpoint."""

    model: ModelSource = field(default_factory=ModelSource)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        r = self.run
        if r.max_steps < 1 or r.micro_batch < 1 or r.grad_accum < 1 or r.eval_every < 1 or r.log_every < 1:
            raise GrowlmError("run: max_steps, micro_batch, grad_accum, eval_every and log_every must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        parts = {f.name: f.type for f in dataclasses.fields(cls)}
        types = {"model": ModelSource, "data": DataConfig, "optim": OptimConfig, "growth": GrowthConfig,
                 "reg": RegConfig, "run": RunConfig}
        unknown = set(d) - set(parts)
        if unknown:
            raise GrowlmError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        kw = {}
        for k, v in d.items():
            t = types[k]
            check_keys(t, v, "config key(s)", prefix=f"{k}.")
            if k == "optim" and "betas" in v:
                v = dict(v, betas=tuple(v["betas"]))
            kw[k] = t(**v)
        return cls(**kw)


# Fields that may differ when resuming (they do not change the computation).
RESUME_MAY_DIFFER = {("run", "resume"), ("run", "log_every"), ("run", "peak_flops"), ("run", "export_hf"),
                     ("run", "keep_last"), ("run", "save_every"), ("data", "cache_dir"), ("run", "device")}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for sec in sorted(set(saved) | set(current)):
        a, b = saved.get(sec, {}), current.get(sec, {})
        for k in sorted(set(a) | set(b)):
            if (sec, k) in RESUME_MAY_DIFFER:
                continue
            va, vb = a.get(k), b.get(k)
            if isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)):
                va, vb = list(va), list(vb)
            if va != vb:
                out.append(f"{sec}.{k}: checkpoint {va!r} vs now {vb!r}")
    return out


# -- schedule and triggers ----------------------------------------------------------------------------
def lr_at(step: int, o: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.decay == "constant":
        return o.lr
    span = max(1, max_steps - o.warmup_steps)
    frac = min(1.0, (step - o.warmup_steps) / span)  # peak right after warmup, min_lr just after the last step
    if o.decay == "linear":
        return o.min_lr + (o.lr - o.min_lr) * (1 - frac)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * frac))


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


# -- helpers ------------------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int]:
    """Initialise the process group under torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return _dist_info()


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _loss_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # bf16 -> fp32, fp64 stays


def load_tokenizer(spec: str | None, fallback: Any) -> Any:
    if spec is None:
        if fallback is None:
            raise GrowlmError("the model has no tokenizer; set model.tokenizer (e.g. 'bytes' or a tokenizer dir)")
        return fallback
    if spec == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # noqa: BLE001 - any failure to find a tokenizer is the same user error
        raise GrowlmError(f"could not load tokenizer {spec!r} ({type(e).__name__})") from None


def build_model(src: ModelSource, dtype: torch.dtype, seed: int) -> tuple[GPT, Any]:
    """The starting model and its tokenizer (None for a scratch model)."""
    if src.init == "scratch":
        try:
            cfg = ModelConfig.from_preset(src.name).replace(**src.overrides)
        except (ValueError, TypeError) as e:
            raise GrowlmError(f"model: {e}") from None
        torch.manual_seed(seed)
        return GPT(cfg).to(dtype), None
    if src.overrides:
        raise GrowlmError("model.overrides only applies to init=scratch")
    return load_model(src.name, dtype=dtype)


@dataclass
class TrainResult:
    model: GPT
    step: int
    val_loss: float | None
    base_val_loss: float | None
    events: list[dict[str, Any]]
    retention: dict[str, float] = field(default_factory=dict)
    out_dir: Path | None = None


Callback = Callable[[str, dict[str, Any]], None]
"""on(kind, record): kind is 'log' (a metrics line), 'growth' (an event), 'eval' or 'info'."""


# -- the trainer --------------------------------------------------------------------------------------
class Trainer:
    """Runs one TrainConfig; `fit()` trains to max_steps (resuming when asked) and returns a TrainResult."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: GPT | None = None,
        tokenizer: Any = None,
        data: PackedData | None = None,
        callback: Callback | None = None,
    ) -> None:
        self.cfg = cfg
        self.callback = callback or (lambda kind, rec: None)
        r = cfg.run
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if r.device == "auto" else r.device
        self.rank, self.world = init_distributed(self.device)
        self.dtype = torch.float64 if r.dtype == "float64" else torch.float32
        self.out_dir = Path(r.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"

        resume_from = None
        if r.resume:
            resume_from = ckpt.latest(self.ckpt_dir)
            if resume_from is None:
                raise GrowlmError(f"run.resume is set but {self.ckpt_dir} holds no checkpoint")
            saved = ckpt.read_train_config(resume_from)
            diff = config_differences(saved, _comparable(cfg.to_dict()))
            if diff:
                raise GrowlmError(f"cannot resume {resume_from}: config differs ({'; '.join(diff[:3])})")
        elif ckpt.latest(self.ckpt_dir) is not None:
            raise GrowlmError(f"{self.ckpt_dir} already holds checkpoints; set run.resume=true or choose another run.out_dir")

        if model is None:
            model, tok0 = build_model(cfg.model, self.dtype, r.seed)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model.tokenizer, tok0)
        self.tokenizer = tokenizer
        self.model = model.to(device=self.device, dtype=self.dtype)
        vocab = self.model.config.vocab_size
        if tokenizer is not None and len(tokenizer) > vocab:
            raise GrowlmError(f"the tokenizer has {len(tokenizer)} ids but the model only {vocab} embeddings")
        if cfg.data.seq_len > self.model.config.block_size:
            raise GrowlmError(f"data.seq_len={cfg.data.seq_len} exceeds the model's context length {self.model.config.block_size}")
        if data is None:
            if tokenizer is None:
                raise GrowlmError("no tokenizer: set model.tokenizer")
            data = prepare_data(cfg.data, tokenizer)
        self.data = data
        self.sampler = BlockSampler(data.n_blocks("train", cfg.data.seq_len), cfg.data.seed)
        n_val = data.n_blocks("val", cfg.data.seq_len)
        self.val_indices = list(range(n_val if cfg.data.val_blocks == 0 else min(n_val, cfg.data.val_blocks)))

        # training state (all of it goes into checkpoints)
        self.step = 0
        self.tokens = 0
        self.flops = 0.0
        self.generation = 0
        self.generations: dict[str, torch.Tensor] = {}
        self.update_scale: dict[str, torch.Tensor] = {}
        self.last_growth_step = 0
        self.events: list[dict[str, Any]] = []
        self.plateau = PlateauTrigger(cfg.growth.patience, cfg.growth.min_delta, cfg.growth.cooldown)
        self.nan_consecutive = 0
        self.nan_skips = 0
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.base_val: float | None = None
        self.retention: dict[str, float] = {}
        self.teacher: GPT | None = None
        self.ewc: EWC | None = None
        self.peak = self._peak()
        self._mult_cache: dict[str, torch.Tensor | float] | None = None
        self._t_last = time.perf_counter()
        self._tokens_last = 0

        self._apply_freeze()
        self.optimizer = self._build_optimizer()
        if resume_from is not None:
            self._load(resume_from)
        self._wrap()

    # -- setup pieces ---------------------------------------------------------------------------------
    def _peak(self) -> float:
        r = self.cfg.run
        if r.peak_flops is not None:
            return float(r.peak_flops)
        dt = torch.bfloat16 if r.autocast == "bf16" else self.dtype
        return matmul_peak(dt, self.device)

    def _autocast(self):
        if self.cfg.run.autocast == "bf16":
            return torch.autocast(device_type="cuda" if self.device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _wrap(self) -> None:
        """(Re)build the DDP wrapper; called at start and after every growth event."""
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.model, device_ids=[torch.cuda.current_device()] if self.device.startswith("cuda") else None)
        else:
            self.ddp = self.model

    def _multipliers(self) -> dict[str, torch.Tensor | float]:
        """Per-parameter update multiplier: a float when uniform, else a tensor (REFERENCE fact 6).

        Cached between growth events; recomputed every step only while new elements warm up."""
        g = self.cfg.growth
        G = self.generation
        warming = G > 0 and g.new_warmup_steps > 0 and self.step - self.last_growth_step < g.new_warmup_steps
        if self._mult_cache is not None and not warming:
            return self._mult_cache
        frac = min(1.0, (self.step - self.last_growth_step + 1) / g.new_warmup_steps) if warming else 1.0
        out: dict[str, torch.Tensor | float] = {}
        for n, p in self.model.named_parameters():
            gen = self.generations.get(n, torch.zeros((), dtype=torch.int64))
            if gen.dim() == 0 and n not in self.update_scale:  # uniform: a float is enough
                gi = int(gen)
                m = 1.0
                if G > 0 and g.old_params == "freeze":
                    m = float(gi >= G)
                elif G > 0 and g.old_params == "freeze_base":
                    m = float(gi >= 1)
                elif G > 0 and g.old_params == "decay":
                    m = g.gen_lr_mult ** (G - gi)
                if warming and gi >= G:
                    m *= frac
                out[n] = m
                continue
            gen = gen.to(p.device)
            m = torch.ones_like(p)
            if G > 0 and g.old_params == "freeze":
                m = m * (gen >= G).to(p.dtype)
            elif G > 0 and g.old_params == "freeze_base":
                m = m * (gen >= 1).to(p.dtype)
            elif G > 0 and g.old_params == "decay":
                m = m * torch.pow(torch.full_like(p, g.gen_lr_mult), (G - gen).to(p.dtype))
            if n in self.update_scale:
                m = m * self.update_scale[n].to(device=p.device, dtype=p.dtype)
            if warming:
                m = torch.where(gen >= G, m * frac, m)
            if bool((m == 1).all()):
                out[n] = 1.0
            elif bool((m == 0).all()):
                out[n] = 0.0
            else:
                out[n] = m
        if not warming:
            self._mult_cache = out
        return out

    def _apply_freeze(self) -> None:
        """requires_grad=False for parameters whose whole update is zero (nothing to compute or store)."""
        self._mult_cache = None
        for n, p in self.model.named_parameters():
            p.requires_grad_(True)
        mult = self._multipliers()
        for n, p in self.model.named_parameters():
            if isinstance(mult[n], float) and mult[n] == 0.0:
                p.requires_grad_(False)

    def _build_optimizer(self) -> torch.optim.AdamW:
        o = self.cfg.optim
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise GrowlmError("no trainable parameters (everything is frozen)")
        # fused: one kernel for all tensors (4x faster than the per-tensor loop on SmolLM2, bench/train_throughput.py)
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)

    # -- one step -------------------------------------------------------------------------------------
    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self._autocast():
            logits = self.ddp(x)
        ce = F.cross_entropy(logits.to(_loss_dtype(logits)).reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss, parts = ce, {"ce": ce.detach()}
        reg = self.cfg.reg
        if self.teacher is not None and reg.kd_weight > 0:
            with torch.no_grad(), self._autocast():
                t = self.teacher(x)
            kd = kd_loss(logits, t, reg.kd_temperature)
            loss = loss + reg.kd_weight * kd
            parts["kd"] = kd.detach()
        if self.ewc is not None and reg.ewc_lambda > 0:
            pen = self.ewc.penalty(self.model)
            loss = loss + pen.to(loss.dtype)
            parts["ewc"] = pen.detach()
        return loss, parts

    def _all_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.to(self.device, copy=True)
            torch.distributed.all_reduce(t)
            t = (t / self.world).cpu()
        return t

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over micro_batch * grad_accum * world sequences."""
        r, seq = self.cfg.run, self.cfg.data.seq_len
        lr = lr_at(self.step, self.cfg.optim, r.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        idx = self.sampler.next_indices(r.micro_batch * r.grad_accum * self.world)
        chunks = [idx[i * r.micro_batch : (i + 1) * r.micro_batch] for i in range(r.grad_accum * self.world)]
        mine = [chunks[a * self.world + self.rank] for a in range(r.grad_accum)]  # rank r: every world-th chunk
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.float64)
        for a, c in enumerate(mine):
            x, y = stack_blocks(self.data, "train", c, seq)
            x, y = x.to(self.device), y.to(self.device)
            sync = self.world == 1 or a == r.grad_accum - 1
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                loss, parts = self._loss(x, y)
                (loss / r.grad_accum).backward()
            total += loss.detach().double().cpu() / r.grad_accum
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v.double().cpu() / r.grad_accum
        params = [p for p in self.model.parameters() if p.requires_grad]
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf"))
        finite = torch.tensor([float(torch.isfinite(total)) * float(torch.isfinite(gnorm.detach().cpu()))], dtype=torch.float64)
        finite = self._all_mean(finite)
        n_tokens = len(idx) * seq
        fpt = executed_flops_per_token(self.model, seq)
        self.tokens += n_tokens
        self.flops += fpt * n_tokens
        rec: dict[str, Any] = {"lr": lr}
        if float(finite) < 1.0:  # the policy: skip, then stop after max_nan_skips in a row
            self.optimizer.zero_grad(set_to_none=True)
            self.nan_consecutive += 1
            self.nan_skips += 1
            rec["skipped"] = True
            if self.nan_consecutive > r.max_nan_skips:
                raise GrowlmError(
                    f"loss is not finite at step {self.step + 1} ({self.nan_consecutive} steps in a row); "
                    f"lower optim.lr or check the data (last good checkpoint kept in {self.ckpt_dir})"
                )
            return rec
        self.nan_consecutive = 0
        mult = self._multipliers()
        scaled = {n: p for n, p in self.model.named_parameters() if p.requires_grad and not (isinstance(mult[n], float) and mult[n] == 1.0)}
        before = {n: p.detach().clone() for n, p in scaled.items()}
        self.optimizer.step()
        with torch.no_grad():
            for n, p in scaled.items():
                m = mult[n]
                w = m if isinstance(m, torch.Tensor) else torch.full_like(p, m)
                p.copy_(torch.lerp(before[n], p, w))  # p_before + m (p_after - p_before), exact at m = 0 and 1
        for k, v in sums.items():
            rec[k] = float(self._all_mean(v))
        rec["loss"] = rec.pop("ce")
        rec["grad_norm"] = float(gnorm)
        return rec

    # -- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, blocks: torch.Tensor | None = None) -> float:
        """Mean token cross-entropy on the validation blocks (or on given (n, seq_len + 1) blocks)."""
        model, mb, seq = self.model, self.cfg.run.micro_batch, self.cfg.data.seq_len
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        n = len(self.val_indices) if blocks is None else blocks.shape[0]
        for s in range(0, n, mb):
            if blocks is None:
                x, y = stack_blocks(self.data, "val", self.val_indices[s : s + mb], seq)
            else:
                x, y = blocks[s : s + mb, :-1], blocks[s : s + mb, 1:]
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = model(x)
            total += float(F.cross_entropy(logits.to(_loss_dtype(logits)).reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
            count += y.numel()
        model.train(was_training)
        return total / count

    # -- growth ---------------------------------------------------------------------------------------
    def growth_due(self, evaluated: float | None) -> bool:
        g = self.cfg.growth
        if g.trigger == "none" or len(self.events) >= g.max_events or self.step >= self.cfg.run.max_steps:
            return False
        if g.trigger == "schedule":
            start = g.every if g.start is None else g.start
            return self.step >= start and (self.step - start) % g.every == 0
        if g.trigger == "steps":
            return self.step in g.steps
        return evaluated is not None and self.plateau.update(evaluated)

    def grow_now(self, val_before: float | None = None) -> dict[str, Any]:
        """One growth event: evaluate, grow, rebuild AdamW with transferred moments, evaluate, log."""
        g, reg = self.cfg.growth, self.cfg.reg
        k = len(self.events)
        spec = GrowthSpec.from_dict(dict(g.operators[k % len(g.operators)]))
        before = self.evaluate() if val_before is None else val_before
        old_model, old_opt = self.model, self.optimizer
        if reg.kd_weight > 0:
            self.teacher = copy.deepcopy(old_model).eval().requires_grad_(False)
        n_before = old_model.num_params()
        shapes = dict(old_model.named_parameters())
        gens = {n: t.to(torch.int32).expand(shapes[n].shape) for n, t in self.generations.items()} or None
        res = grow(old_model, spec, generations=gens, generation=self.generation + 1,
                           seed=self.cfg.run.seed * 1000 + k + 1, update_scale=self.update_scale or None)
        self.model = res.model.to(device=self.device, dtype=self.dtype)
        self.generation += 1
        self.generations = {n: _compact_generations(t) for n, t in res.generations.items()}
        self.update_scale = {n: t.detach().clone() for n, t in (res.update_scale or {}).items()}
        self.last_growth_step = self.step
        self._apply_freeze()
        self.optimizer = self._build_optimizer()
        transfer_adamw_state(old_model, old_opt, res, self.optimizer)
        del old_opt
        self._wrap()
        if reg.ewc_lambda > 0:
            self.ewc = self._build_ewc()
        after = self.evaluate()
        self.last_val = after
        r = res.record
        rec = {"kind": "growth", "step": self.step, "event": k + 1, "generation": self.generation,
               "operator": r.get("operator", spec.operator), "spec": _jsonable(r.get("spec", {})),
               "before": _jsonable(r.get("config_before", {})), "after": _jsonable(r.get("config_after", {})),
               "function_preserving": r.get("function_preserving"), "max_abs_logit_diff": r.get("max_abs_logit_diff"),
               "params_before": n_before, "params_after": self.model.num_params(),
               "params_added": self.model.num_params() - n_before,
               "trainable_params": self.model.num_params(trainable_only=True),
               "val_loss_before": before, "val_loss_after": after, "val_loss_delta": after - before}
        self.events.append(rec)
        self._write_metrics(rec)
        self.callback("growth", rec)
        return rec

    def _build_ewc(self) -> EWC:
        reg = self.cfg.reg
        n = min(reg.ewc_samples, self.sampler.n_blocks)
        rng = np.random.default_rng([self.cfg.data.seed, self.generation, 17])
        idx = sorted(int(i) for i in rng.choice(self.sampler.n_blocks, size=n, replace=False))
        x, y = stack_blocks(self.data, "train", idx, self.cfg.data.seq_len)
        new = {nm: (t.to(self.device) >= self.generation) for nm, t in self.generations.items()}
        gen = torch.Generator().manual_seed(self.cfg.run.seed + self.generation)
        return build_ewc(self.model, x.to(self.device), y.to(self.device), reg.ewc_lambda, new, reg.ewc_fisher, gen)

    # -- logging --------------------------------------------------------------------------------------
    def _write_metrics(self, rec: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def _log_record(self, step_rec: dict[str, Any], val: float | None) -> dict[str, Any]:
        now = time.perf_counter()
        dt = max(now - self._t_last, 1e-9)
        tok_s = (self.tokens - self._tokens_last) / dt
        self._t_last, self._tokens_last = now, self.tokens
        fpt = executed_flops_per_token(self.model, self.cfg.data.seq_len)
        rec = {"kind": "train", "step": self.step, "tokens": self.tokens, "flops": self.flops,
               "lr": step_rec.get("lr"), "loss": step_rec.get("loss"),
               "val_loss": val, "val_ppl": math.exp(val) if val is not None and val < 700 else None,
               "tok_s": tok_s, "mfu": (tok_s * fpt / self.peak) if self.peak > 0 else None,
               "params": self.model.num_params(), "trainable_params": self.model.num_params(trainable_only=True),
               "peak_mem_mb": peak_memory_mb(self.device), "generation": self.generation, "nan_skips": self.nan_skips}
        for k in ("kd", "ewc", "grad_norm", "skipped"):
            if k in step_rec:
                rec[k] = step_rec[k]
        return rec

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to run.max_steps. `stop_after` ends early after that step (simulates a killed run)."""
        r = self.cfg.run
        if self.step == 0:
            if self.rank == 0 and self.metrics_path.exists():
                self.metrics_path.unlink()  # a fresh run (checked in __init__: no checkpoints here)
            self.base_val = self.evaluate()
            self.last_val = self.base_val
            if r.retention_blocks > 0:
                self.retention["base"] = self._retention()
            rec = {"kind": "train", "step": 0, "tokens": 0, "flops": 0.0, "val_loss": self.base_val,
                   "val_ppl": math.exp(self.base_val), "params": self.model.num_params(),
                   "trainable_params": self.model.num_params(trainable_only=True)}
            if "base" in self.retention:
                rec["retention_loss"] = self.retention["base"]
            self._write_metrics(rec)
            self.callback("log", rec)
            if self.growth_due(None):
                self.grow_now(self.base_val)
        self._t_last, self._tokens_last = time.perf_counter(), self.tokens
        while self.step < r.max_steps:
            step_rec = self.train_step()
            self.step += 1
            val = None
            if self.step % r.eval_every == 0 or self.step == r.max_steps:
                val = self.evaluate()
                self.last_val = val
                if self.best_val is None or val < self.best_val:
                    self.best_val = val
            if self.step % r.log_every == 0 or val is not None or self.step == r.max_steps:
                rec = self._log_record(step_rec, val)
                self._write_metrics(rec)
                self.callback("log", rec)
            if self.growth_due(val):
                self.grow_now(val)
            if (r.save_every and self.step % r.save_every == 0) or self.step == r.max_steps:
                self.save(val)
            if stop_after is not None and self.step >= stop_after:
                break
        if self.step == r.max_steps and r.retention_blocks > 0:
            self.retention["final"] = self._retention()
            self._write_metrics({"kind": "retention", "step": self.step, **{f"retention_loss_{k}": v for k, v in self.retention.items()}})
        return TrainResult(self.model, self.step, self.last_val, self.base_val, self.events, self.retention, self.out_dir)

    def _retention(self) -> float:
        blocks = text_blocks(retention_text(), self.tokenizer, self.cfg.data.seq_len, self.cfg.run.retention_blocks)
        return self.evaluate(blocks)

    # -- checkpoints ----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "flops": self.flops, "generation": self.generation,
                "last_growth_step": self.last_growth_step, "events": self.events, "plateau": self.plateau.state_dict(),
                "nan_consecutive": self.nan_consecutive, "nan_skips": self.nan_skips, "best_val": self.best_val,
                "last_val": self.last_val, "base_val": self.base_val, "retention": self.retention,
                "sampler": self.sampler.state_dict(), "python_rng": _py_rng(), "numpy_rng": _np_rng(),
                "world": self.world}

    def save(self, val: float | None = None) -> Path | None:
        if self.rank != 0:
            self._barrier()
            return None
        tensors = {"generations": self.generations, "update_scale": self.update_scale}
        if self.ewc is not None:
            tensors["ewc"] = self.ewc.tensors()
        path = ckpt.save_checkpoint(
            self.ckpt_dir, self.step, self.model, self.optimizer, self.state(), _comparable(self.cfg.to_dict()),
            tensors=tensors, teacher=self.teacher, keep_last=self.cfg.run.keep_last, val_loss=val,
        )
        self._barrier()
        return path

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def _load(self, path: Path) -> None:
        c = ckpt.load_checkpoint(path, device=self.device)
        s = c["state"]
        if s.get("world", 1) != self.world:
            raise GrowlmError(f"cannot resume {path}: it was written by {s.get('world')} processes, now {self.world}")
        self.model = c["model"].to(device=self.device, dtype=self.dtype)
        self.generations = c["tensors"].get("generations", {})
        self.update_scale = c["tensors"].get("update_scale", {})
        for k in ("step", "tokens", "flops", "generation", "last_growth_step", "nan_consecutive", "nan_skips",
                  "best_val", "last_val", "base_val", "retention"):
            setattr(self, k, s[k])
        self.events = s["events"]
        self.plateau.load_state_dict(s["plateau"])
        self.sampler.load_state_dict(s["sampler"])
        _set_py_rng(s["python_rng"])
        _set_np_rng(s["numpy_rng"])
        torch.set_rng_state(c["rng"]["torch"])
        self.teacher = c["teacher"].to(device=self.device, dtype=self.dtype).eval().requires_grad_(False) if c["teacher"] is not None else None
        if "ewc" in c["tensors"]:
            self.ewc = EWC.from_tensors({k: v.to(self.device) for k, v in c["tensors"]["ewc"].items()}, self.cfg.reg.ewc_lambda)
        self._apply_freeze()
        self.optimizer = self._build_optimizer()
        self.optimizer.load_state_dict(c["optimizer"])
        if self.rank == 0 and self.metrics_path.exists():  # drop lines written after the checkpoint
            keep = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            tmp = self.metrics_path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.metrics_path)


def _compact_generations(t: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor when every element has the same generation (no full-size copy), else int16."""
    t = t.detach()
    if t.numel() > 0 and bool((t == t.flatten()[0]).all()):
        return t.flatten()[0].to(torch.int64).clone()
    return t.to(torch.int16).clone()


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    """The config as JSON would give it back (tuples become lists)."""
    return json.loads(json.dumps(d))


def _jsonable(d: Any) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str)) if isinstance(d, dict) else {"record": str(d)}


def _py_rng() -> list:
    v, state, gauss = random.getstate()
    return [v, list(state), gauss]


def _set_py_rng(s: list) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))


def _np_rng() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_np_rng(s: list) -> None:
    np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4]))


def train(cfg: TrainConfig, callback: Callback | None = None, **kw: Any) -> TrainResult:
    """Run a TrainConfig to the end and export the final model (rank 0) as a Hugging Face directory."""
    trainer = Trainer(cfg, callback=callback, **kw)
    result = trainer.fit()
    if cfg.run.export_hf and trainer.rank == 0:
        tok = trainer.tokenizer if hasattr(trainer.tokenizer, "save_pretrained") else None
        save_hf(trainer.model, Path(cfg.run.out_dir) / "hf", tok)
    return result
