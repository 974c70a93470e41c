"""Typed model configuration covering the GPT-2 and Llama families.

One config, one model class: the families differ only in the switches below
(norm, MLP, positions, biases, tied head, KV heads), as in litgpt's `Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from growlm.errors import GrowlmError

def check_keys(cls: type, d: dict[str, Any], what: str, prefix: str = "") -> None:
    """Raise a GrowlmError naming every key of `d` that is not a field of the dataclass `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise GrowlmError(f"unknown {what}: {', '.join(prefix + k for k in unknown)} (known: {', '.join(sorted(names))})")


NormType = Literal["layernorm", "rmsnorm"]
MLPType = Literal["gelu", "swiglu"]
PositionType = Literal["learned", "rope"]


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer."""

    vocab_size: int = 50257
    """Number of token embeddings (rows of the embedding and the output head)."""
    block_size: int = 1024
    """Context length: the longest sequence the model accepts."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_embd: int = 768
    """Hidden (residual stream) size."""
    n_head: int = 12
    """Number of query heads."""
    n_kv_head: int | None = None
    """Number of key/value heads (grouped-query attention); None means n_head."""
    head_dim: int | None = None
    """Size of one attention head; None means n_embd // n_head."""
    ffn_size: int | None = None
    """Hidden size of the MLP; None means 4 * n_embd."""
    norm: NormType = "layernorm"
    """Normalisation: 'layernorm' (GPT-2) or 'rmsnorm' (Llama)."""
    norm_eps: float = 1e-5
    """Epsilon inside the normalisation."""
    mlp: MLPType = "gelu"
    """MLP type: 'gelu' (fc -> GELU(tanh) -> proj, GPT-2) or 'swiglu' (Llama)."""
    position: PositionType = "learned"
    """Position scheme: 'learned' absolute embeddings (GPT-2) or 'rope' (Llama)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    attn_bias: bool = True
    """Biases on the q/k/v projections."""
    proj_bias: bool = True
    """Biases on the attention output projection."""
    mlp_bias: bool = True
    """Biases on the MLP projections."""
    norm_bias: bool = True
    """LayerNorm has a bias (RMSNorm never has one)."""
    tie_embeddings: bool = True
    """Output head shares its weight with the token embedding."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id (kept for export)."""
    eos_token_id: int | None = None
    """End-of-sequence token id (kept for export)."""
    init_std: float = 0.02
    """Standard deviation of the random initialisation."""
    name: str = "custom"
    """Free-form name of the preset or source."""

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_head <= 0 or self.n_embd % self.n_head != 0:
                raise ValueError(
                    f"n_embd={self.n_embd} is not divisible into n_head={self.n_head} heads; "
                    "set head_dim explicitly or choose n_head dividing n_embd"
                )
            self.head_dim = self.n_embd // self.n_head
        if self.ffn_size is None:
            self.ffn_size = 4 * self.n_embd
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "ffn_size")
        for k in positive:
            v = getattr(self, k)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (each KV group serves a whole number of query heads)"
            )
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.position not in ("learned", "rope"):
            raise ValueError(f"position must be 'learned' or 'rope', got {self.position!r}")
        if self.position == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")

    # -- helpers ---------------------------------------------------------
    @property
    def family(self) -> str:
        """'gpt2', 'llama' or 'custom' (a mix that no Hugging Face class implements)."""
        if self.norm == "layernorm" and self.mlp == "gelu" and self.position == "learned":
            return "gpt2"
        if self.norm == "rmsnorm" and self.mlp == "swiglu" and self.position == "rope":
            return "llama"
        return "custom"

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (derived fields are kept unless changed)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        check_keys(cls, d, "model config keys")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name], name=name)


def module_lines(c: dict[str, Any]) -> list[str]:
    """A module outline of a config dict (`ModelConfig.to_dict()` or a growth record's shape dict): one line per
    shape that growth or pruning can change. SwiGLU models (`mlp: swiglu`) list the gate projection too."""
    if not c:
        return []
    e, f, v = c.get("n_embd"), c.get("ffn_size"), c.get("vocab_size")
    hd = c.get("head_dim") or (c.get("n_embd", 0) // max(c.get("n_head", 1), 1))
    nq, nkv = c.get("n_head", 0), c.get("n_kv_head") or c.get("n_head", 0)
    head = "tied to embed" if c.get("tie_embeddings") else f"Linear({e}, {v})"
    if c.get("mlp") == "swiglu":
        mlp = [f"  mlp.gate: Linear({e}, {f}); mlp.up: Linear({e}, {f}) -> silu(gate) * up",
               f"  mlp.down: Linear({f}, {e})"]
    else:
        mlp = [f"  mlp: Linear({e}, {f}) -> Linear({f}, {e})"]
    return [f"embed: Embedding({v}, {e})",
            f"blocks: {c.get('n_layer')} x Block",
            f"  attn: {nq} query heads, {nkv} KV heads, head_dim {hd}",
            f"  attn.q: Linear({e}, {nq * hd}); attn.kv: 2 x Linear({e}, {nkv * hd})",
            f"  attn.o: Linear({nq * hd}, {e})",
            *mlp,
            f"norm: ({e})", f"head: {head}"]


def module_diff(before: dict[str, Any], after: dict[str, Any], names: tuple[str, str] = ("before", "after")) -> list[str]:
    """Unified diff (difflib, whole outline as context) of `module_lines(before)` -> `module_lines(after)`;
    empty when the outlines are equal."""
    a, b = module_lines(before), module_lines(after)
    return list(difflib.unified_diff(a, b, names[0], names[1], lineterm="", n=max(len(a), len(b))))


_GPT2 = dict(norm="layernorm", mlp="gelu", position="learned", attn_bias=True, proj_bias=True,
             mlp_bias=True, norm_bias=True, tie_embeddings=True, norm_eps=1e-5)
_LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope", attn_bias=False, proj_bias=False,
              mlp_bias=False, norm_bias=False)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2, vocab_size=50257, block_size=1024, n_layer=12, n_embd=768, n_head=12,
                 bos_token_id=50256, eos_token_id=50256),
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, block_size=8192, n_layer=30, n_embd=576, n_head=9,
                         n_kv_head=3, head_dim=64, ffn_size=1536, rope_theta=100000.0, norm_eps=1e-5,
                         tie_embeddings=True, bos_token_id=1, eos_token_id=2),
    "tiny-gpt2": dict(_GPT2, vocab_size=96, block_size=64, n_layer=2, n_embd=32, n_head=4),
    "tiny-llama": dict(_LLAMA, vocab_size=96, block_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                       ffn_size=64, rope_theta=10000.0, norm_eps=1e-6, tie_embeddings=False),
}
