"""The teacher side of a distillation run (`growlm distill`): the frozen teacher, the objective and the
cached targets, used by the one `Trainer`.

The loss is `growlm.distill.objectives.Objective` (CE + logits + hidden-state + attention terms) between the
student and the teacher run on the same batch (online), or the teacher's top-k predictions read from a
memory-mapped cache built once (`growlm.distill.targets`; logits terms only). The teacher is never saved in
checkpoints: the fingerprint of its weights is (`TrainState.teacher`), and a resume with another teacher
is refused. The objective's projectors train with the student (same AdamW) and are checkpointed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch.distributed.fsdp import FSDPModule

from growlm.distill.objectives import Objective, next_token_loss
from growlm.distill.targets import SparseTargets, TeacherTargets, build_targets, teacher_fingerprint
from growlm.errors import GrowlmError
from growlm.models.model import GPT
from growlm.train.config import TrainConfig
from growlm.train.data import PackedData
from growlm.train.flops import flops_per_token

RECORD_KEYS = ("init", "spec", "kept_layers", "dropped_layers", "layer_importance")
"""What of `growlm.distill.prune.make_student`'s record goes into the kind=distill metrics line."""


class Distillation:
    """A frozen teacher on the student's device and dtype, the objective, and (distill.targets=cached) the cache."""

    def __init__(self, cfg: TrainConfig, student: GPT, teacher: GPT, data: PackedData, device: str,
                 dtype: torch.dtype, progress: Callable[[int, int], None] | None = None,
                 notify: Callable[[str], None] | None = None) -> None:
        d, seq = cfg.distill, cfg.data.seq_len
        if teacher.config.vocab_size > student.config.vocab_size:
            raise GrowlmError(f"the teacher's vocabulary ({teacher.config.vocab_size}) is larger than the student's "
                              f"({student.config.vocab_size}): they must share one tokenizer")
        if seq > teacher.config.block_size:
            raise GrowlmError(f"data.seq_len={seq} exceeds the teacher's context length {teacher.config.block_size}")
        self.cfg, self.device = cfg, device
        self.teacher = teacher.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.fingerprint = teacher_fingerprint(self.teacher)
        self.objective = Objective(d.objective, student.config, teacher.config).to(device=device, dtype=dtype)
        self.targets: TeacherTargets | None = None
        if d.targets == "cached":
            reads = cfg.run.max_steps * cfg.run.micro_batch * cfg.run.grad_accum
            n = data.n_blocks("train", seq)
            if notify is not None and reads < n:
                notify(f"teacher targets: caching all {n:,} training blocks; this run reads {reads:,} block visits "
                       "(the cache pays off across epochs and runs; distill.targets=online costs only what is read)")
            self.targets = build_targets(self.teacher, data, seq, d.top_k, d.targets_dir, d.targets_dtype,
                                         batch_size=cfg.run.micro_batch, progress=progress, teacher_hash=self.fingerprint)

    def loss(self, student: Callable[..., Any], x: torch.Tensor, y: torch.Tensor, blocks: list[int] | None,
             autocast: Callable[[], Any] = contextlib.nullcontext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective between `student(x)` (the model or its DDP wrapper) and the teacher on the same
        batch, or the cached targets of the training blocks `blocks`. parts["ce"] is always there (logged).

        With run.loss_chunk > 0, a single-process student (no DDP / FSDP wrapper: those see the head only
        inside forward()) and logits terms only, the loss is `Objective.chunked_loss` on the final hidden
        states: neither the student's nor the teacher's B x T x V logits are built at once."""
        o = self.objective
        rich = o.needs_hidden_states or bool(o.student_attention_layers)
        chunk = self.cfg.run.loss_chunk
        if chunk > 0 and not rich and isinstance(student, GPT) and not isinstance(student, FSDPModule):
            with autocast():
                h = student.hidden(x)
                t: Any = None
                if self.targets is not None and o.needs_teacher:
                    t = SparseTargets(*self.targets.get(self._blocks(blocks), self.device))
                elif o.needs_teacher:
                    with torch.no_grad():
                        t = (self.teacher.hidden(x), self.teacher.head_weight)
                return o.chunked_loss(h, student.head_weight, t, y, chunk_size=chunk)
        with autocast():
            out = student(x, output_hidden_states=o.needs_hidden_states,
                          attention_layers=o.student_attention_layers) if rich else student(x)
            if not o.needs_teacher:
                t_out = None
            elif self.targets is not None:
                t_out: Any = SparseTargets(*self.targets.get(self._blocks(blocks), self.device))
            else:
                with torch.no_grad():
                    t_out = self.teacher(x, output_hidden_states=o.needs_hidden_states,
                                         attention_layers=o.teacher_attention_layers) if rich else self.teacher(x)
        loss, parts = o(out, t_out, y)
        if "ce" not in parts:  # logged whatever the weights: the quantity the validation loss is comparable to
            logits = out if isinstance(out, torch.Tensor) else out.logits
            parts["ce"] = next_token_loss(logits.detach(), y)
        return loss, parts

    @staticmethod
    def _blocks(blocks: list[int] | None) -> list[int]:
        if blocks is None:
            raise GrowlmError("cached teacher targets need the block indices of the batch")
        return blocks

    def extra_flops_per_token(self) -> float:
        """The teacher's forward FLOPs per token when it runs every step (0 with cached targets or no teacher term)."""
        if self.targets is not None or not self.objective.needs_teacher:
            return 0.0
        return flops_per_token(self.teacher.config, self.cfg.data.seq_len, training=False)

    def record(self, student: GPT, teacher_val: float, student_record: dict[str, Any] | None) -> dict[str, Any]:
        """kind=distill: the teacher, the student's shape against it and how it was cut (for reports)."""
        d = self.cfg.distill
        how = {k: v for k, v in (student_record or {}).items() if k in RECORD_KEYS}
        return {"kind": "distill", "step": 0, "teacher": d.teacher, "teacher_fingerprint": self.fingerprint,
                "targets": d.targets, "top_k": d.top_k if d.targets == "cached" else None,
                "teacher_config": self.teacher.config.to_dict(), "student_config": student.config.to_dict(),
                "teacher_params": self.teacher.num_params(), "student_params": student.num_params(),
                "teacher_val_loss": teacher_val, "student": how}
