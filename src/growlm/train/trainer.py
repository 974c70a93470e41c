"""The training loop: continued pretraining with growth during training.

One `Trainer` runs AdamW (Loshchilov & Hutter 2019) with warmup then cosine/linear decay (to zero by
default) or a constant rate, gradient accumulation, clipping, bf16 autocast with float32 weights,
periodic evaluation, `metrics.jsonl`, atomic checkpoints and exact resume, under torchrun/DDP or not.
It takes a built model and packed data; `train(cfg)` builds them (`growlm.train.build.setup`) and runs.

Growth during training (operators in `growlm.growth`):
- triggers: a fixed schedule (`start + k * every`, at most `max_events`), an explicit list of steps, or a
  validation plateau (`PlateauTrigger`: `patience` evaluations without an improvement of `min_delta`,
  then `cooldown` evaluations of rest);
- each event evaluates just before, grows, rebuilds AdamW and carries its moments over
  (`growlm.train.optim.transfer_adamw_state`), evaluates just after and logs the validation-loss delta
  (0 up to rounding for function-preserving operators);
- what was learned before: `old_params="freeze"` (whole old tensors get requires_grad=False, old elements
  of grown tensors a zero update; "freeze_base" freezes only the original model), `"decay"` (generation g
  trains at `gen_lr_mult ** (G - g)` times the update while the schedule goes on) or `"train"`. These
  multipliers, the operators' own update scales and the warm-up of new elements act on the AdamW update,
  p = p_before + m * (p_after - p_before), written once in `growlm.train.optim` (Adam normalises the
  gradient's scale away, so scaling the gradient would not change the step);
- after each event the learning rate of everything may re-warm (`growth.lr_rewarm_steps`, `optim.rewarm_factor`);
- regularisers (`growlm.train.regularize`): KD from a frozen teacher (the pre-growth snapshot, re-taken at each
  event, or the base model before the first: reg.kd_teacher) and EWC anchored at growth. The executed FLOPs
  count the KD teacher's forward passes and the EWC Fisher (`growlm.train.flops`).

Distillation (`growlm distill`, a config with distill.teacher) is the same loop with a teacher and its
objective (`growlm.train.distillation.Distillation`); the teacher's identity is checked on resume.

Non-finite loss policy: a step whose loss (or gradient norm) is NaN/inf is skipped (no update, its batch
is consumed, the schedule advances); more than `max_nan_skips` consecutive skips stop the run with a
GrowlmError. Nothing is saved during a non-finite streak, and since a skipped step leaves the weights as
they were, the weights saved just before the streak are the ones that led into it: latest.json is pointed
at the newest checkpoint before them, which the error names and a resume (with a lower lr) starts from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from growlm.errors import GrowlmError
from growlm.growth import grow, with_vocab_sources
from growlm.io import parse_dtype, remove_stale_temporaries
from growlm.models.hf import save_hf
from growlm.models.model import GPT
from growlm.train import checkpoint as ckpt
from growlm.train import parallel, sharded
from growlm.train.build import RUN_OUTPUTS, check_inputs, resume_point, setup
from growlm.train.config import TrainConfig, comparable
from growlm.train.distillation import Distillation
from growlm.train.data import BlockSampler, PackedData, prepare_data, retention_text, stack_blocks, text_blocks
from growlm.train.flops import executed_flops_per_token, fisher_flops, flops_per_token
from growlm.train.optim import (build_optimizer, freeze_zero_update, lr_at, multiplied_step, rewarm_factor,
                                transfer_adamw_state, update_multipliers)
from growlm.train.precision import choose_autocast, choose_compile
from growlm.train.regularize import EWC, build_ewc, kd_loss
from growlm.train.state import PlateauTrigger, TrainState


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
"""on(kind, record): kind is 'log' (a metrics line), 'growth' (an event), 'eval', 'info' or 'progress'
({"task": "tokenise" | "eval", "done": n, "total": N}: for progress bars, never logged)."""


class Trainer:
    """Runs one TrainConfig on a built model and data; `fit()` trains to max_steps (resuming when asked)."""

    def __init__(self, cfg: TrainConfig, model: GPT, data: PackedData, tokenizer: Any = None,
                 callback: Callback | None = None, teacher: GPT | None = None,
                 student_record: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.callback = callback or (lambda kind, rec: None)
        r = cfg.run
        self.device = parallel.resolve_device(r.device)
        self.rank, self.world = parallel.init_distributed(self.device)
        self.dtype = parse_dtype(r.dtype, ("float32", "float64"))
        self.out_dir = Path(r.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        notes: list[str] = []
        resume_from = resume_point(cfg, notes)
        check_inputs(cfg, model, tokenizer)
        if self.rank == 0:
            self._clean_run_folder(fresh=resume_from is None)
        for n in notes:
            self.callback("info", {"message": n})
        self.tokenizer, self.data = tokenizer, data
        self.model = model.to(device=self.device, dtype=self.dtype)
        n_val = data.n_blocks("val", cfg.data.seq_len)
        self.val_indices = list(range(n_val if cfg.data.val_blocks == 0 else min(n_val, cfg.data.val_blocks)))
        self.state = self._fresh_state()
        self.teacher: GPT | None = None  # the pre-growth snapshot of reg.kd_weight (saved in checkpoints)
        self.ewc: EWC | None = None
        self.distill: Distillation | None = None  # the teacher of a distillation (distill.teacher; never saved)
        self.student_record = student_record  # how the student was cut from the teacher (metrics: kind=distill)
        if cfg.distill.teacher is not None:
            if teacher is None:
                raise GrowlmError("distill.teacher is set but no teacher model was given")
            progress = lambda done, n: self.callback("progress", {"task": "targets", "done": done, "total": n})  # noqa: E731
            self.distill = Distillation(cfg, self.model, teacher, data, self.device, self.dtype, progress,
                                        lambda m: self.callback("info", {"message": m}))
            self.state.teacher = self.distill.fingerprint
        tokens = r.micro_batch * cfg.data.seq_len
        prec = choose_autocast(r.autocast, model.config, tokens, self.dtype, self.device)
        bf16 = parallel.from_rank0(float(prec.autocast == "bf16"), self.world, self.device)  # timed per process:
        self.autocast = "bf16" if bf16 else "none"  # what run.autocast resolves to, rank 0's choice on every rank
        if prec.warning:
            self.callback("info", {"message": prec.warning})
        compute = torch.bfloat16 if self.autocast == "bf16" else self.dtype
        self.peak, self.peak_source = parallel.peak_flops(r, compute, self.device, model.config, tokens)
        self._t_last, self._tokens_last = time.perf_counter(), 0
        self._rebuild_optimizer()
        if resume_from is not None:
            self._load(resume_from)
        self._compile = choose_compile(r.compile, self.device, r.parallel if self.world > 1 else None,
                                       r.max_steps * self._flops_per_token() * tokens * r.grad_accum * self.world,
                                       self.peak)  # 'none' | 'blocks' | 'model'
        self._compile_s = 0.0  # compile time not yet logged
        self._wrap()

    def _wrap(self) -> None:
        """The module the loop calls: DDP around the model (world > 1), compiled where run.compile says so
        (again after each growth event: a grown model has other shapes; never again after a failure)."""
        def failed(message: str) -> None:
            self._compile = "none"
            self.callback("info", {"message": message})
        self.model.activation_checkpointing = self.cfg.run.activation_checkpointing
        self.model.block_call = parallel.CompiledBlocks(failed) if self._compile == "blocks" else None
        self.ddp = parallel.wrap(self.model, self.world, self.device)
        self.step_model = parallel.Compiled(self.ddp, self._compile == "model", failed)

    def _clean_run_folder(self, fresh: bool) -> None:
        """Remove what interrupted writes left (`.step_*.tmp*`, `.hf.tmp*`, ...); on an overwrite, the old run."""
        remove_stale_temporaries(self.ckpt_dir)
        remove_stale_temporaries(self.out_dir, names=RUN_OUTPUTS)
        if fresh and self.cfg.run.overwrite:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            if self.metrics_path.exists():
                self.metrics_path.unlink()

    def _fresh_state(self) -> TrainState:
        g = self.cfg.growth
        return TrainState(BlockSampler(self.data.n_blocks("train", self.cfg.data.seq_len), self.cfg.data.seed),
                          PlateauTrigger(g.patience, g.min_delta, g.cooldown))

    # -- the update rule (growlm.train.optim) ---------------------------------------------------------
    def multipliers(self) -> dict[str, float | torch.Tensor]:
        """Every parameter's update multiplier at the current step (from the config and the state alone)."""
        s = self.state
        m = update_multipliers(self.model, s.generations, s.update_scale, s.generation, self.cfg.growth,
                               s.step - s.last_growth_step)
        return sharded.shard_multipliers(self.model, m)  # sharded parameters: placed like them

    def _rebuild_optimizer(self) -> None:
        """Freeze what has a zero update everywhere, then a fresh AdamW over the rest (and the objective's projectors)."""
        freeze_zero_update(self.model, self.multipliers())
        self.model = sharded.shard(self.model, self.world, self.device,  # run.parallel fsdp
                                   dataclasses.replace(self.cfg.run, autocast=self.autocast))
        self.optimizer = build_optimizer(self.model, self.cfg.optim, self.distill and self.distill.objective)

    def _autocast(self):
        if self.autocast == "bf16":
            return torch.autocast(device_type="cuda" if self.device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- one step -------------------------------------------------------------------------------------
    def _loss(self, x: torch.Tensor, y: torch.Tensor, blocks: list[int] | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.distill is not None:
            return self.distill.loss(self.ddp, x, y, blocks, self._autocast)
        reg = self.cfg.reg
        kd = self.teacher is not None and reg.kd_weight > 0
        with self._autocast():  # KD needs the student's logits; else the loss inside forward, loss_chunk at a time
            logits = self.ddp(x) if kd else self.step_model(x, targets=y, loss_chunk=self.cfg.run.loss_chunk)
        ce = F.cross_entropy(logits.to(_loss_dtype(logits)).reshape(-1, logits.shape[-1]), y.reshape(-1)) if kd else logits
        loss, parts = ce, {"ce": ce.detach()}
        if kd:
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

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over micro_batch * grad_accum * world sequences."""
        r, seq, st = self.cfg.run, self.cfg.data.seq_len, self.state
        lr = lr_at(st.step, self.cfg.optim, r.max_steps) * rewarm_factor(
            st.step - st.last_growth_step, st.generation, self.cfg.growth.lr_rewarm_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        idx = st.sampler.next_indices(r.micro_batch * r.grad_accum * self.world)
        chunks = [idx[i * r.micro_batch : (i + 1) * r.micro_batch] for i in range(r.grad_accum * self.world)]
        mine = [chunks[a * self.world + self.rank] for a in range(r.grad_accum)]  # rank r: every world-th chunk
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.float64)
        for a, c in enumerate(mine):
            x, y = stack_blocks(self.data, "train", c, seq)
            x, y = x.to(self.device), y.to(self.device)
            sync = self.world == 1 or a == r.grad_accum - 1
            with contextlib.nullcontext() if sync else sharded.no_sync(self.ddp):
                loss, parts = self._loss(x, y, c)
                (loss / r.grad_accum).backward()
            total += loss.detach().double().cpu() / r.grad_accum
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v.double().cpu() / r.grad_accum
        extra = [] if self.distill is None else list(self.distill.objective.parameters())
        for p in extra:  # the projectors sit outside the DDP/FSDP wrapper: average their gradients here
            if p.grad is not None and self.world > 1:
                p.grad = parallel.all_mean(p.grad, self.world, self.device).to(p.grad.device)
        params = [p for p in [*self.model.parameters(), *extra] if p.requires_grad]
        gnorm = sharded.clip_grad_norm_(params, self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf"))
        finite = torch.tensor([float(torch.isfinite(total)) * float(torch.isfinite(gnorm.detach().cpu()))], dtype=torch.float64)
        finite = parallel.all_mean(finite, self.world, self.device)
        n_tokens = len(idx) * seq
        st.tokens += n_tokens
        st.flops += self._flops_per_token() * n_tokens
        rec: dict[str, Any] = {"lr": lr}
        if float(finite) < 1.0:  # the policy: skip, then stop after max_nan_skips in a row
            self.optimizer.zero_grad(set_to_none=True)
            st.nan_consecutive += 1
            st.nan_skips += 1
            rec["skipped"] = True
            if st.nan_consecutive > r.max_nan_skips:
                first_bad = st.step + 2 - st.nan_consecutive  # the streak's first step; the weights it used came
                raise GrowlmError(f"loss is not finite at step {st.step + 1} ({st.nan_consecutive} steps in a row); "
                                  f"{self._keep_checkpoint_before(first_bad - 1)}")  # from the step before
            return rec
        st.nan_consecutive = 0
        multiplied_step(self.optimizer, self.model, self.multipliers())
        for k, v in sums.items():
            rec[k] = float(parallel.all_mean(v, self.world, self.device))
        rec["loss"] = rec.pop("ce")
        rec["grad_norm"] = float(gnorm)
        return rec

    def _flops_per_token(self) -> float:
        """Executed training FLOPs per token: the student's step, plus the teacher's forward when it runs online
        (distillation's teacher, or the KD teacher of reg.kd_weight: its own config, forward only)."""
        seq = self.cfg.data.seq_len
        f = executed_flops_per_token(self.model, seq)
        if self.teacher is not None and self.cfg.reg.kd_weight > 0:  # the condition under which _loss runs it
            f += flops_per_token(self.teacher.config, seq, training=False)
        return f + (self.distill.extra_flops_per_token() if self.distill is not None else 0.0)

    # -- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, blocks: torch.Tensor | None = None, model: GPT | None = None) -> float:
        """Mean token cross-entropy of the model (or `model`: the teacher) on the validation blocks (or on
        given (n, seq_len + 1) blocks)."""
        model, mb, seq = model or self.model, self.cfg.run.micro_batch, self.cfg.data.seq_len
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
            with self._autocast():  # through forward() (FSDP gathers its shards there), loss_chunk at a time
                total += float(model(x, targets=y, loss_chunk=self.cfg.run.loss_chunk)) * y.numel()
            count += y.numel()
            self.callback("progress", {"task": "eval", "done": min(s + mb, n), "total": n})
        model.train(was_training)
        return total / count

    # -- growth ---------------------------------------------------------------------------------------
    def growth_due(self, evaluated: float | None) -> bool:
        g = self.cfg.growth
        if g.trigger == "none" or len(self.state.events) >= g.max_events or self.state.step >= self.cfg.run.max_steps:
            return False
        if g.trigger == "schedule":
            start = g.every if g.start is None else g.start
            return self.state.step >= start and (self.state.step - start) % g.every == 0
        if g.trigger == "steps":
            return self.state.step in g.steps
        return evaluated is not None and self.state.plateau.update(evaluated)

    def grow_now(self, val_before: float | None = None) -> dict[str, Any]:
        """One growth event: evaluate, grow, rebuild AdamW with transferred moments, evaluate, log."""
        g, reg = self.cfg.growth, self.cfg.reg
        k = len(self.state.events)
        spec = g.operators[k % len(g.operators)]
        before = self.evaluate() if val_before is None else val_before
        old_model, old_opt = self.model, self.optimizer
        if sharded.is_sharded(old_model):  # grow the full model and state (every rank alike), shard it again
            old_model, old_opt = sharded.gather_full(old_model, old_opt, self.cfg.optim)
        if reg.kd_weight > 0 and (reg.kd_teacher == "snapshot" or self.teacher is None):  # base: the first one, kept
            self.teacher = copy.deepcopy(old_model).eval().requires_grad_(False)
        n_before = old_model.num_params()
        st = self.state
        spec = with_vocab_sources(spec, old_model.config.vocab_size)  # a vocab spec may name a tokenizer dir
        res = grow(old_model, spec, generations=st.generations, generation=st.generation + 1,
                   seed=self.cfg.run.seed * 1000 + k + 1, update_scale=st.update_scale)
        self.model = res.model.to(device=self.device, dtype=self.dtype)
        st.generation += 1
        st.generations, st.update_scale = res.generations, res.update_scale
        st.last_growth_step = st.step
        self._rebuild_optimizer()
        transfer_adamw_state(old_model, old_opt, res, self.optimizer)
        sharded.shard_optimizer_state(self.optimizer)
        del old_opt
        self._wrap()
        compute = torch.bfloat16 if self.autocast == "bf16" else self.dtype  # the grown shapes' own peak
        self.peak, self.peak_source = parallel.peak_flops(self.cfg.run, compute, self.device, self.model.config,
                                                          self.cfg.run.micro_batch * self.cfg.data.seq_len)
        fisher = 0.0
        if reg.ewc_lambda > 0:
            self.ewc, fisher = self._build_ewc()
            self.state.flops += fisher
        after = self.evaluate()
        self.state.last_val = after
        r = res.record
        rec = {"kind": "growth", "step": self.state.step, "event": k + 1, "generation": self.state.generation,
               "operator": r.get("operator", spec.operator), "spec": _jsonable(r.get("spec", {})),
               "before": _jsonable(r.get("config_before", {})), "after": _jsonable(r.get("config_after", {})),
               "function_preserving": r.get("function_preserving"), "max_abs_logit_diff": r.get("max_abs_logit_diff"),
               "params_before": n_before, "params_after": self.model.num_params(),
               "params_added": self.model.num_params() - n_before,
               "trainable_params": self.model.num_params(trainable_only=True),
               "val_loss_before": before, "val_loss_after": after, "val_loss_delta": after - before,
               "fisher_flops": fisher}
        self.state.events.append(rec)
        self._write_metrics(rec)
        self.callback("growth", rec)
        return rec

    def _build_ewc(self) -> tuple[EWC, float]:
        """EWC anchored at the current (just grown) model, and the executed FLOPs of its Fisher."""
        reg = self.cfg.reg
        n = min(reg.ewc_samples, self.state.sampler.n_blocks)
        rng = np.random.default_rng([self.cfg.data.seed, self.state.generation, 17])
        idx = sorted(int(i) for i in rng.choice(self.state.sampler.n_blocks, size=n, replace=False))
        x, y = stack_blocks(self.data, "train", idx, self.cfg.data.seq_len)
        new = {nm: f.dense(device=self.device) >= self.state.generation for nm, f in self.state.generations.items()}
        gen = torch.Generator().manual_seed(self.cfg.run.seed + self.state.generation)
        ewc = build_ewc(self.model, x.to(self.device), y.to(self.device), reg.ewc_lambda, new, reg.ewc_fisher, gen)
        return ewc, fisher_flops(self.model, n, self.cfg.data.seq_len, reg.ewc_fisher == "true")

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
        tok_s = (self.state.tokens - self._tokens_last) / dt
        self._t_last, self._tokens_last = now, self.state.tokens
        fpt = self._flops_per_token()
        rec = {"kind": "train", "step": self.state.step, "tokens": self.state.tokens, "flops": self.state.flops,
               "lr": step_rec.get("lr"), "loss": step_rec.get("loss"),
               "val_loss": val, "val_ppl": math.exp(val) if val is not None and val < 700 else None,
               "tok_s": tok_s, "mfu": (tok_s * fpt / self.peak) if self.peak > 0 else None,
               "params": self.model.num_params(), "trainable_params": self.model.num_params(trainable_only=True),
               "peak_mem_mb": parallel.peak_memory_mb(self.device), "generation": self.state.generation, "nan_skips": self.state.nan_skips,
               "elapsed_s": now - self._t_start}  # this segment's wall time so far: the report's time of a killed one
        for k in ("kd", "hidden", "attn", "ewc", "grad_norm", "skipped"):
            if k in step_rec:
                rec[k] = step_rec[k]
        if self._compile_s:
            rec["compile_s"], self._compile_s = self._compile_s, 0.0
        return rec

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to run.max_steps. `stop_after` ends early after that step (simulates a killed run)."""
        r = self.cfg.run
        t_start = self._t_start = time.perf_counter()  # also the origin of the train lines' elapsed_s
        if self.state.step == 0 and self.rank == 0 and self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run (checked in __init__: no checkpoints here)
        self._write_metrics({"kind": "run", "event": "start", "step": self.state.step,
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "growlm_version": _version(),
                             "dtype": r.dtype, "autocast": r.autocast, "autocast_used": self.autocast,
                             "peak_flops": self.peak, "peak_source": self.peak_source,
                             **parallel.machine_info(self.device, self.world), "config": _jsonable(self.cfg.to_dict())})
        if self.state.step == 0:
            self.state.base_val = self.evaluate()
            self.state.last_val = self.state.base_val
            if r.retention_blocks > 0:
                self.state.retention["base"] = self._retention()
            rec = {"kind": "train", "step": 0, "tokens": 0, "flops": 0.0, "val_loss": self.state.base_val,
                   "val_ppl": math.exp(self.state.base_val), "params": self.model.num_params(),
                   "trainable_params": self.model.num_params(trainable_only=True)}
            if "base" in self.state.retention:
                rec["retention_loss"] = self.state.retention["base"]
            if self.distill is not None:
                rec["teacher_val_loss"] = self.evaluate(model=self.distill.teacher)
                self._write_metrics(self.distill.record(self.model, rec["teacher_val_loss"], self.student_record))
            self._write_metrics(rec)
            self.callback("log", rec)
            if self.growth_due(None):
                self.grow_now(self.state.base_val)
        self._t_last, self._tokens_last = time.perf_counter(), self.state.tokens
        while self.state.step < r.max_steps:
            tokens_before, graphs, t0 = self.state.tokens, parallel.compiled_graphs(), time.perf_counter()
            step_rec = self.train_step()
            self.state.step += 1
            if parallel.compiled_graphs() > graphs:  # a step that compiled is the compile's time: left out of tok_s
                dt = time.perf_counter() - t0
                self._compile_s, self._t_last = self._compile_s + dt, self._t_last + dt
                self._tokens_last += self.state.tokens - tokens_before
            val, t_aside = None, time.perf_counter()  # evaluation, growth and saving: left out of tok_s and MFU
            if self.state.step % r.eval_every == 0 or self.state.step == r.max_steps:
                val = self.evaluate()
                self.state.last_val = val
                if self.state.best_val is None or val < self.state.best_val:
                    self.state.best_val = val
            self._t_last += time.perf_counter() - t_aside
            if self.state.step % r.log_every == 0 or val is not None or self.state.step == r.max_steps:
                rec = self._log_record(step_rec, val)
                self._write_metrics(rec)
                self.callback("log", rec)
            t_aside = time.perf_counter()
            if self.growth_due(val):
                self.grow_now(val)
            finite = self.state.nan_consecutive == 0 and (val is None or math.isfinite(val))
            if self.state.step == r.max_steps and not finite:
                # streak: its first step used the weights of the step before; else (a non-finite val loss) this step's
                bad = self.state.step - self.state.nan_consecutive
                raise GrowlmError(f"the run ended with a non-finite loss at step {self.state.step}; "
                                  f"{self._keep_checkpoint_before(bad)}")
            if finite and ((r.save_every and self.state.step % r.save_every == 0) or self.state.step == r.max_steps):
                self.save(val)  # never from a non-finite streak: the last checkpoint before it is kept
            self._t_last += time.perf_counter() - t_aside
            if stop_after is not None and self.state.step >= stop_after:
                break
        if self.state.step == r.max_steps and r.retention_blocks > 0:
            self.state.retention["final"] = self._retention()
            self._write_metrics({"kind": "retention", "step": self.state.step, **{f"retention_loss_{k}": v for k, v in self.state.retention.items()}})
        if self.state.step == r.max_steps:  # a finished segment: what the report needs beyond the step lines
            self._write_metrics({"kind": "run", "event": "end", "step": self.state.step,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": time.perf_counter() - t_start,
                                 "tokens": self.state.tokens, "flops": self.state.flops,
                                 "peak_mem_mb": parallel.peak_memory_mb(self.device), "val_loss": self.state.last_val,
                                 "best_val_loss": self.state.best_val})
        return TrainResult(self.model, self.state.step, self.state.last_val, self.state.base_val, self.state.events, self.state.retention, self.out_dir)

    def _keep_checkpoint_before(self, bad_from: int) -> str:
        """After a non-finite streak: the weights from step `bad_from` on led into it (a skipped step does
        not change them), so the newest checkpoint before that step becomes latest.json, what a resume takes."""
        keep, _ = ckpt.usable_checkpoint(self.ckpt_dir, before=bad_from)
        if keep is None:
            return "lower optim.lr or check the data (no checkpoint was written before it)"
        if self.rank == 0:
            ckpt.point_latest(self.ckpt_dir, keep)
        return (f"the last checkpoint before it is kept: {keep}; resume from it with a lower optim.lr "
                "(run.resume=true), or check the data")

    def _retention(self) -> float:
        blocks = text_blocks(retention_text(), self.tokenizer, self.cfg.data.seq_len, self.cfg.run.retention_blocks)
        return self.evaluate(blocks)

    # -- checkpoints ----------------------------------------------------------------------------------
    def save(self, val: float | None = None) -> Path | None:
        if self.cfg.run.parallel == "fsdp":  # DCP: every rank writes its shards
            return sharded.save_checkpoint(
                self.ckpt_dir, self.state.step, self.model, self.optimizer, self.state.to_dict(self.world),
                comparable(self.cfg.to_dict()), self.rank, self.world, tensors=self.state.tensors(), teacher=self.teacher,
                keep_last=self.cfg.run.keep_last, val_loss=val)
        if self.rank != 0:
            parallel.barrier(self.world)
            return None
        tensors = self.state.tensors()
        if self.ewc is not None:
            tensors["ewc"] = self.ewc.tensors()
        if self.distill is not None and len(self.distill.objective.state_dict()):
            tensors["objective"] = self.distill.objective.state_dict()
        path = ckpt.save_checkpoint(
            self.ckpt_dir, self.state.step, self.model, self.optimizer, self.state.to_dict(self.world),
            comparable(self.cfg.to_dict()), tensors=tensors, teacher=self.teacher, keep_last=self.cfg.run.keep_last,
            val_loss=val,
        )
        parallel.barrier(self.world)
        return path

    def _load(self, path: Path) -> None:
        try:
            c = (sharded.load_checkpoint if sharded.is_sharded_checkpoint(path) else ckpt.load_checkpoint)(path, device=self.device)
        except GrowlmError:
            raise
        except Exception as e:  # noqa: BLE001 - a checkpoint without a manifest (older growlm) read badly
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GrowlmError(f"cannot read checkpoint {path} ({msg}); move it aside to resume from an older one") from None
        s = c["state"]
        if s.get("world", 1) != self.world and not c.get("sharded"):  # DCP re-shards
            raise GrowlmError(f"cannot resume {path}: it was written by {s.get('world')} processes, now {self.world}")
        self.model = c["model"].to(device=self.device, dtype=self.dtype)
        fresh = self._fresh_state()
        teacher = self.state.teacher
        self.state = TrainState.from_dict(s, c["tensors"], fresh.sampler, fresh.plateau)
        if self.state.teacher != teacher:
            raise GrowlmError(f"cannot resume {path}: it was distilled from another teacher (weights "
                              f"{self.state.teacher} vs now {teacher})")
        if "objective" in c["tensors"] and self.distill is not None:
            self.distill.objective.load_state_dict(c["tensors"]["objective"])
        ckpt.restore_rng(s, c["rng"])
        if c["teacher"] is not None:
            self.teacher = c["teacher"].to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        if "ewc" in c["tensors"]:
            self.ewc = EWC.from_tensors({k: v.to(self.device) for k, v in c["tensors"]["ewc"].items()}, self.cfg.reg.ewc_lambda)
        self._rebuild_optimizer()
        if c.get("sharded"):
            sharded.load_state(path, self.model, self.optimizer)
        else:
            self.optimizer.load_state_dict(c["optimizer"])
        if self.rank == 0:
            note = ckpt.truncate_metrics(self.metrics_path, self.state.step)
            if note:
                self.callback("info", {"message": note})


def _loss_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # bf16 -> fp32, fp64 stays


def _version() -> str:
    try:
        return importlib.metadata.version("growlm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _jsonable(d: Any) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str)) if isinstance(d, dict) else {"record": str(d)}


def train(cfg: TrainConfig, callback: Callback | None = None, model: GPT | None = None, tokenizer: Any = None,
          data: PackedData | None = None, teacher: GPT | None = None,
          student_record: dict[str, Any] | None = None) -> TrainResult:
    """Run a TrainConfig to the end and export the final model (rank 0) as a Hugging Face directory.
    Builds the model, tokenizer, data (and the teacher of a distillation) from the config unless the model is given."""
    record = student_record
    if model is None:
        resume_point(cfg)  # a config that cannot resume (or a run folder it may not write) fails before loading
        progress = None if callback is None else (lambda d, n: callback("progress", {"task": "tokenise", "done": d, "total": n}))
        built = setup(cfg, progress)
        model, tokenizer, data, teacher, record = built.model, built.tokenizer, built.data, built.teacher, built.student_record
    elif data is None:
        if tokenizer is None:
            raise GrowlmError("no tokenizer: set model.tokenizer")
        data = prepare_data(cfg.data, tokenizer)
    trainer = Trainer(cfg, model, data, tokenizer, callback, teacher, record)
    result = trainer.fit()
    full = sharded.full_model(trainer.model) if cfg.run.export_hf else None  # collective when sharded
    if cfg.run.export_hf and trainer.rank == 0:
        tok = trainer.tokenizer if hasattr(trainer.tokenizer, "save_pretrained") else None
        save_hf(full, Path(cfg.run.out_dir) / "hf", tok)
    return result
