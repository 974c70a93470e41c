"""What a run starts from, built from its config: the model (pretrained or scratch), the tokenizer, the data.

`setup(cfg)` is the one place that loads them; the `Trainer` takes them built, so tests and callers can
hand it any model and any packed data.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from growlm.errors import GrowlmError
from growlm.io import parse_dtype
from growlm.models.config import ModelConfig
from growlm.models.hf import load_model
from growlm.models.model import GPT
from growlm.train.config import ModelSource, TrainConfig
from growlm.train.data import ByteTokenizer, PackedData, prepare_data


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


def setup(cfg: TrainConfig, progress: Callable[[int, int], None] | None = None) -> tuple[GPT, Any, PackedData]:
    """The model, tokenizer and packed data of `cfg` (weights in run.dtype, on the CPU); `progress(done,
    total)` follows the tokenisation of the corpus (documents)."""
    model, tok0 = build_model(cfg.model, parse_dtype(cfg.run.dtype, ("float32", "float64")), cfg.run.seed)
    tokenizer = load_tokenizer(cfg.model.tokenizer, tok0)
    check_inputs(cfg, model, tokenizer)  # before tokenising the corpus
    return model, tokenizer, prepare_data(cfg.data, tokenizer, progress)


def check_inputs(cfg: TrainConfig, model: GPT, tokenizer: Any) -> None:
    """The tokenizer fits the embeddings and data.seq_len the context length."""
    vocab = model.config.vocab_size
    if tokenizer is not None and len(tokenizer) > vocab:
        raise GrowlmError(f"the tokenizer has {len(tokenizer)} ids but the model only {vocab} embeddings")
    if cfg.data.seq_len > model.config.block_size:
        raise GrowlmError(f"data.seq_len={cfg.data.seq_len} exceeds the model's context length {model.config.block_size}")
