"""Typed growth specs and results: what to grow (`GrowthSpec`) and what growing produced (`GrowthResult`).

    spec = GrowthSpec(operator="depth", n=2, where="interleave")      # or GrowthSpec.from_dict(yaml_dict)
    spec = with_vocab_sources(GrowthSpec("vocab", tokenizer=dir), model.config.vocab_size)  # reads `dir`

Specs are plain data. The one function here that touches the disk is `with_vocab_sources`, which turns a
tokenizer directory into the merge table the vocabulary operator needs, so that the operators themselves
(growlm.growth.depth, .width, .vocab) are pure functions of a model and a spec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from growlm.errors import GrowlmError
from growlm.growth.factored import Factored
from growlm.models.config import ModelConfig, check_keys
from growlm.models.model import GPT
from growlm.models.tokenizer import merge_sources

Operator = Literal["depth", "stack", "width", "vocab"]
OPERATORS = ("depth", "stack", "width", "vocab")
WHERE = ("top", "after", "interleave")


@dataclass
class GrowthSpec:
    """One growth step: an operator and its arguments (parseable from YAML/CLI with `from_dict`)."""

    operator: Operator = "depth"
    """'depth' (identity blocks), 'stack' (G_stack copies, not exact), 'width' (hidden/heads/FFN), 'vocab'."""
    n: int = 1
    """depth/stack: number of new blocks."""
    where: str = "interleave"
    """depth/stack: 'top' (append), 'after' (after each index in `layers`), 'interleave' (every L/n layers)."""
    layers: list[int] | None = None
    """depth/stack with where='after': old layer indices; one new block after each entry (repeats allowed)."""
    init: str = "copy"
    """depth: new block is a 'copy' of the old block below it, or 'random'; o/down are zeroed either way."""
    factor: int | None = None
    """width: multiply n_embd, n_head, n_kv_head and ffn_size by this integer (HyperCloning style)."""
    n_embd: int | None = None
    """width: new hidden size (None: unchanged, or from `factor`)."""
    n_head: int | None = None
    """width: new number of query heads (head_dim fixed). None: unchanged, or n_embd / head_dim when the
    attention width equals the hidden size and n_embd grows."""
    n_kv_head: int | None = None
    """width: new number of KV heads; must be a multiple of the old one and divide n_head. None: unchanged,
    or scaled with n_head when n_head is derived from n_embd."""
    ffn_size: int | None = None
    """width: new FFN hidden size."""
    head_dim: int | None = None
    """width: new head size (learned positions only: RoPE frequencies depend on head_dim). None: unchanged."""
    ffn_init: str = "clone"
    """width: new FFN units 'clone' old ones (exact, all trainable) or are 'zero' (fresh, down columns zero)."""
    noise: float = 0.01
    """width: symmetry-breaking noise in cancelling pairs, relative to each weight's std (0 disables)."""
    vocab_size: int | None = None
    """vocab: new vocabulary size."""
    vocab_sources: list[list[int]] | None = None
    """vocab: for each new token id V..V'-1, the old token ids it merges (see growlm.models.tokenizer.merge_sources)."""
    tokenizer: str | None = None
    """vocab: directory of the bigger nested tokenizer; `with_vocab_sources` derives `vocab_sources` from it."""

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise GrowlmError(f"unknown growth operator {self.operator!r}; choose one of: {', '.join(OPERATORS)}")
        if self.operator in ("depth", "stack"):
            if self.where not in WHERE:
                raise GrowlmError(f"unknown position where={self.where!r}; choose one of: {', '.join(WHERE)}")
            if self.where == "after":
                if not self.layers:
                    raise GrowlmError("where='after' needs layers=[i, ...] (old layer indices to insert after)")
                self.layers = [int(i) for i in self.layers]
                self.n = len(self.layers)
            if not isinstance(self.n, int) or self.n < 1:
                raise GrowlmError(f"depth growth needs n >= 1 new blocks, got n={self.n!r}")
            if self.init not in ("copy", "random"):
                raise GrowlmError(f"init must be 'copy' or 'random', got {self.init!r}")
        if self.ffn_init not in ("clone", "zero"):
            raise GrowlmError(f"ffn_init must be 'clone' or 'zero', got {self.ffn_init!r}")
        if self.noise < 0:
            raise GrowlmError(f"noise must be >= 0, got {self.noise}")
        if self.factor is not None and (not isinstance(self.factor, int) or self.factor < 1):
            raise GrowlmError(f"width factor must be a positive integer, got {self.factor!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GrowthSpec":
        check_keys(cls, d, "growth spec keys")
        return cls(**d)


def with_vocab_sources(spec: GrowthSpec, vocab_size: int) -> GrowthSpec:
    """`spec` with `vocab_sources` (and `vocab_size`) read from `spec.tokenizer` for a model of `vocab_size` tokens.

    Specs that are not vocabulary growth, or that already list their sources, come back unchanged."""
    if spec.operator != "vocab" or spec.vocab_sources is not None or spec.tokenizer is None:
        return spec
    sources = merge_sources(spec.tokenizer, vocab_size)
    return dataclasses.replace(spec, vocab_sources=sources, vocab_size=spec.vocab_size or vocab_size + len(sources))


@dataclass
class ParamMap:
    """Where the elements of one new parameter come from.

    `source` is the old parameter's name (None: a new parameter, optimizer moments start at zero). `index`
    has one entry per dimension: None (identity) or a LongTensor new index -> old index, -1 for fresh
    elements (zero moments). `grad_scale` (beta, 0 on fresh elements) maps old moments:
    m' = beta m[src], v' = beta^2 v[src]; it is kept as per-axis factors (`grad_factors`) and built
    at full size only when read.
    """

    source: str | None
    index: tuple[torch.Tensor | None, ...] = ()
    grad_factors: Factored | None = None
    dtype: torch.dtype = torch.float32
    """dtype of `grad_scale` (the parameter's)."""

    @property
    def grad_scale(self) -> torch.Tensor | None:
        """beta at full size (a new tensor on every read: read it once per parameter)."""
        return None if self.grad_factors is None else self.grad_factors.dense().to(self.dtype)


@dataclass
class GrowthResult:
    """What `grow` returns; see growlm.growth.core for the meaning of each field."""

    model: GPT
    record: dict[str, Any]
    generations: dict[str, Factored]
    update_scale: dict[str, Factored] = field(default_factory=dict)
    param_map: dict[str, ParamMap] = field(default_factory=dict)


@dataclass
class Step:
    """What one operator (depth, width, vocab) hands back to `grow` (internal)."""

    config: ModelConfig
    values: dict[str, torch.Tensor]
    param_map: dict[str, ParamMap]
    function_preserving: bool
    record: dict[str, Any] = field(default_factory=dict)
    alpha: dict[str, Factored] = field(default_factory=dict)
    """update multipliers this step introduces (op 'mul'); absent: 1."""
    new_axes: dict[str, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)
    """(dim, bool vector) per parameter: elements on a True position are new (duplicates, fresh units)."""
    copied_from: dict[str, str] = field(default_factory=dict)
    """new parameter -> the old one it copies (depth), so that it inherits its update multipliers."""
