"""What a run starts from, built from its config: the model (pretrained, scratch, or cut from a teacher), the
tokenizer, the data, the teacher of a distillation, and the checkpoint it resumes from (`resume_point`).

`setup(cfg)` is the one place that loads them; the `Trainer` takes them built, so tests and callers can
hand it any model, any packed data and any teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from growlm.distill.prune import make_student
from growlm.errors import GrowlmError
from growlm.io import check_writable, parse_dtype
from growlm.models.config import ModelConfig
from growlm.models.hf import load_model
from growlm.models.model import GPT
from growlm.train import checkpoint as ckpt
from growlm.train import sharded
from growlm.train.config import ModelSource, TrainConfig, comparable, config_differences, resume_changes
from growlm.train.data import ByteTokenizer, PackedData, prepare_data, tokenizer_fingerprint


def load_tokenizer(spec: str | None, fallback: Any) -> Any:
    """The tokenizer `spec` names: None = `fallback` (the model's own), 'bytes', or a tokenizer dir."""
    if spec is None:
        if fallback is None:
            raise GrowlmError("the model has no tokenizer; set model.tokenizer (e.g. 'bytes' or a tokenizer dir)")
        return fallback
    if spec == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer  # heavy: only when a tokenizer directory is named

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
class Setup:
    """A run's inputs: the model it trains (the student of a distillation), its tokenizer and data, the teacher."""

    model: GPT
    tokenizer: Any
    data: PackedData
    teacher: GPT | None = None
    student_record: dict[str, Any] | None = None
    """How the student was cut from the teacher (growlm.distill.prune.make_student's record)."""


def setup(cfg: TrainConfig, progress: Callable[[int, int], None] | None = None) -> Setup:
    """The model, tokenizer and packed data of `cfg` (weights in run.dtype, on the CPU), and with
    distill.teacher the teacher, the student cut from it (distill.student) or built from the model section;
    `progress(done, total)` follows the tokenisation of the corpus (documents)."""
    dtype = parse_dtype(cfg.run.dtype, ("float32", "float64"))
    d = cfg.distill
    if d.teacher is None:
        model, tok0 = build_model(cfg.model, dtype, cfg.run.seed)
        tokenizer = load_tokenizer(cfg.model.tokenizer, tok0)
        check_inputs(cfg, model, tokenizer)  # before tokenising the corpus
        return Setup(model, tokenizer, prepare_data(cfg.data, tokenizer, progress))
    teacher, ttok = load_model(d.teacher, dtype=dtype)
    teacher.eval().requires_grad_(False)
    if d.student is None:
        model, tok0 = build_model(cfg.model, dtype, cfg.run.seed)
        tokenizer = load_tokenizer(cfg.model.tokenizer, tok0 if tok0 is not None else ttok)
        check_same_tokenizer(tokenizer, ttok)
        record = None
    else:
        tokenizer = load_tokenizer(cfg.model.tokenizer, ttok)
        check_same_tokenizer(tokenizer, ttok)
        model = None
    check_inputs(cfg, teacher, tokenizer)
    data = prepare_data(cfg.data, tokenizer, progress)
    if model is None:
        model, record = make_student(teacher, d.student, calibration_blocks(data, d.student.calibration_batches,
                                                                            d.student.calibration_seq_len))
    check_inputs(cfg, model, tokenizer)
    if model.config.vocab_size < teacher.config.vocab_size:
        raise GrowlmError(f"the student has {model.config.vocab_size} embeddings, fewer than the teacher's "
                          f"vocabulary ({teacher.config.vocab_size}): they must share one tokenizer")
    return Setup(model, tokenizer, data, teacher, record)


def calibration_blocks(data: PackedData, n: int, seq_len: int) -> torch.Tensor:
    """The first `n` training blocks of `seq_len` tokens (fewer if the data is short): pruning's calibration ids."""
    m = min(n, data.n_blocks("train", seq_len - 1))
    if seq_len < 2 or m < 1:
        raise GrowlmError(f"the training data holds no block of {seq_len} tokens for calibration; lower "
                          "distill.student.calibration_seq_len")
    return torch.stack([data.block("train", i, seq_len - 1) for i in range(m)])


def check_same_tokenizer(student: Any, teacher: Any) -> None:
    """Teacher and student must read text the same way: one tokenizer (by fingerprint)."""
    if student is None or teacher is None:
        return
    a, b = tokenizer_fingerprint(student), tokenizer_fingerprint(teacher)
    if a != b:
        raise GrowlmError(f"the student's tokenizer ({len(student)} ids) differs from the teacher's ({len(teacher)} "
                          "ids): distillation needs one tokenizer (set model.tokenizer to the teacher's or leave it unset)")


def check_inputs(cfg: TrainConfig, model: GPT, tokenizer: Any) -> None:
    """The tokenizer fits the embeddings and data.seq_len the context length."""
    vocab = model.config.vocab_size
    if tokenizer is not None and len(tokenizer) > vocab:
        raise GrowlmError(f"the tokenizer has {len(tokenizer)} ids but the model only {vocab} embeddings")
    if cfg.data.seq_len > model.config.block_size:
        raise GrowlmError(f"data.seq_len={cfg.data.seq_len} exceeds the model's context length {model.config.block_size}")


RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "hf")
"""What a run writes into run.out_dir; a fresh run refuses a folder holding any of them (run.overwrite)."""


def resume_point(cfg: TrainConfig, notes: list[str] | None = None) -> Path | None:
    """The checkpoint to resume from (run.resume): the newest one whose manifest verifies, after checking
    that its config matches (location and the fields `resume_changes` lists may differ; `notes` gets one
    line per skipped checkpoint and per changed field). None for a fresh run, which must not write into a
    folder that already holds a run unless run.overwrite is set."""
    out = Path(cfg.run.out_dir)
    ckpt_dir = out / "checkpoints"
    if out.exists() and not out.is_dir():
        raise GrowlmError(f"run.out_dir {out} exists and is not a folder; choose another run.out_dir")
    check_writable(ckpt_dir)
    if not cfg.run.resume:
        held = [n for n in RUN_OUTPUTS if (out / n).exists()]
        if held and not cfg.run.overwrite:
            what = "checkpoints" if ckpt.list_checkpoints(ckpt_dir) else " and ".join(held)
            raise GrowlmError(f"{out} already holds {what} of a run; set run.resume=true to continue it, "
                              "run.overwrite=true to replace it, or choose another run.out_dir")
        return None
    path, skipped = ckpt.usable_checkpoint(ckpt_dir)
    if path is None:
        why = f" ({skipped[0]})" if skipped else ""
        raise GrowlmError(f"run.resume is set but {ckpt_dir} holds no usable checkpoint{why}")
    saved, now = ckpt.read_train_config(path), comparable(cfg.to_dict())
    now, relaid = sharded.relayout(path, saved, now)  # a sharded checkpoint may resume on another process count
    diff = config_differences(saved, now)
    if diff:
        raise GrowlmError(f"cannot resume {path}: config differs ({'; '.join(diff[:3])})")
    if notes is not None:
        notes.extend(skipped)
        notes.extend(relaid)
        notes.extend(f"resuming {path.name} with {c}" for c in resume_changes(saved, now))
    return path
