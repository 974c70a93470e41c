"""A memory planner: bytes per process for training a model (or each stage of a growth schedule) with DDP
or FSDP2, and the smallest process count whose per-device memory holds it.

Per rank, with P parameters (counted exactly on a meta-device model), w bytes per weight (run.dtype:
4 for float32, 8 for float64; the master weights, gradients and AdamW moments all use it), N processes:

    weights = P w / S,  gradients = P w / S,  AdamW moments = 2 P w / S        S = N for fsdp, 1 for ddp

plus what each engine holds on top (Rajbhandari et al. 2020, "ZeRO", section 3; Zhao et al. 2023,
"PyTorch FSDP"): DDP's gradient buckets (a second copy of the gradients, `gradient_as_bucket_view`
off), FSDP's unsharded working set (the root group - embeddings, final norm, head - and two blocks, the
current one and the prefetched one, in the compute dtype, with one block's unsharded gradients).

Activations saved for the backward pass, per token and block of a Llama/GPT-2 block (counted from the
tensors autograd keeps; Korthikanti et al. 2022, "Reducing Activation Recomputation", section 4, for
the method): the residual input and the two norm outputs and inputs (5 d), q, k, v (d_q + 2 d_kv; twice with RoPE,
before and after the rotation), the attention output (d_q) and its log-sum-exp (n_head, flash-style attention), the
MLP's hidden activations (SwiGLU: gate, up, SiLU(gate), product = 4 f; GELU: fc, GELU = 2 f). Times
micro_batch x seq_len x n_layer, in the compute dtype (bf16 autocast: 2 bytes), plus the logits and
their gradient in float32 (2 x B T V x 4). With activation checkpointing only each block's input is
kept (B T d per block) and one block's activations are recomputed at a time.

What it leaves out: the allocator's fragmentation, communication buffers, the CUDA context (~0.5-1 GB
per GPU), and the moment of growth (`growlm.train.sharded.gather_full` holds a full fp32 copy of the
weights and moments per rank); leave headroom (`headroom`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from growlm.errors import GrowlmError
from growlm.models.config import ModelConfig
from growlm.models.hf import config_from_hf
from growlm.models.model import GPT

GIB = 2**30

SCHEDULE_55M_7B = [
    "smollm2-135m:n_layer=8,n_embd=512,n_head=8,n_kv_head=8,head_dim=64,ffn_size=1536",
    "smollm2-135m:n_layer=16,n_embd=1024,n_head=16,n_kv_head=16,head_dim=64,ffn_size=3072",
    "smollm2-135m:n_layer=24,n_embd=2048,n_head=32,n_kv_head=32,head_dim=64,ffn_size=5504",
    "smollm2-135m:n_layer=32,n_embd=4096,n_head=32,n_kv_head=32,head_dim=128,ffn_size=11008",
]
"""A 55M -> 7B progression on SmolLM2's tokenizer (49,152 tokens, tied embeddings): depth x2 and width x2
(then x1.5 depth, x2 width) per stage, ending at a Llama-2-7B-shaped body."""


@dataclass
class MemoryPlan:
    """Bytes per rank of one model under one parallelism and process count."""

    name: str
    params: int
    parallel: str
    world: int
    weights: float
    grads: float
    adam: float
    engine: float
    """DDP's gradient buckets, or FSDP's unsharded working set."""
    activations: float
    activations_ckpt: float
    """With activation checkpointing."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.adam + self.engine + self.activations

    @property
    def total_ckpt(self) -> float:
        return self.weights + self.grads + self.adam + self.engine + self.activations_ckpt


def model_config(spec: str) -> ModelConfig:
    """A config from a preset name ('smollm2-135m'), 'preset:key=value,...' (overrides, integers), or a
    growlm / Hugging Face model directory."""
    base, _, over = spec.partition(":")
    p = Path(base).expanduser()
    try:
        if p.is_dir():
            if (p / "growlm_config.json").is_file():
                cfg = ModelConfig.load(p / "growlm_config.json")
            elif (p / "config.json").is_file():
                from transformers import AutoConfig

                cfg = config_from_hf(AutoConfig.from_pretrained(p))
            else:
                raise GrowlmError(f"{p} holds no growlm_config.json or config.json")
        else:
            cfg = ModelConfig.from_preset(base)
        if over:
            kv = dict(item.split("=", 1) for item in over.split(","))
            cfg = cfg.replace(**{k: int(v) for k, v in kv.items()}, name=spec)
    except (ValueError, TypeError) as e:
        raise GrowlmError(f"model {spec!r}: {e}") from None
    return cfg


def count(cfg: ModelConfig) -> tuple[int, int, int]:
    """(all parameters, one block's, the root's: embeddings, final norm, head), exact, on the meta device."""
    with torch.device("meta"):
        m = GPT(cfg)
    total = m.num_params()
    block = sum(p.numel() for p in m.blocks[0].parameters())
    return total, block, total - cfg.n_layer * block


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, act_bytes: int) -> tuple[float, float]:
    """(saved activations without, with activation checkpointing) of one micro-batch, in bytes."""
    d, dq, dkv, f = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.ffn_size
    qkv = (dq + 2 * dkv) * (2 if cfg.position == "rope" else 1)  # RoPE saves q, k before and after rotation
    per_token_block = 5 * d + qkv + dq + cfg.n_head + (4 * f if cfg.mlp == "swiglu" else 2 * f)
    tokens = micro_batch * seq_len
    logits = 2 * tokens * cfg.vocab_size * 4
    full = tokens * cfg.n_layer * per_token_block * act_bytes + logits
    ckpt = tokens * cfg.n_layer * d * act_bytes + tokens * per_token_block * act_bytes + logits
    return float(full), float(ckpt)


def plan(cfg: ModelConfig, parallel: str, world: int, micro_batch: int = 1, seq_len: int = 2048,
         dtype_bytes: int = 4, bf16: bool = False) -> MemoryPlan:
    """The memory of one rank; `dtype_bytes` = bytes per weight (run.dtype), `bf16` = run.autocast bf16."""
    if parallel not in ("ddp", "fsdp"):
        raise GrowlmError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    if world < 1 or micro_batch < 1 or seq_len < 1:
        raise GrowlmError("world, micro_batch and seq_len must be >= 1")
    total, block, root = count(cfg)
    s = world if parallel == "fsdp" else 1
    w = dtype_bytes
    compute = 2 if bf16 else w
    if parallel == "ddp":
        engine = total * w if world > 1 else 0.0  # gradient buckets
    else:  # root group and two blocks gathered, one block's full gradients before the reduce-scatter
        engine = (root + 2 * block) * compute + block * w if world > 1 else 0.0
    act, act_ckpt = activation_bytes(cfg, micro_batch, seq_len, compute)
    return MemoryPlan(cfg.name, total, parallel, world, total * w / s, total * w / s, 2 * total * w / s,
                      float(engine), act, act_ckpt)


def smallest_world(cfg: ModelConfig, parallel: str, device_bytes: float, checkpointing: bool, max_world: int = 4096,
                   headroom: float = 0.9, **kw) -> int | None:
    """The fewest processes whose per-rank memory fits in headroom x device_bytes (None: none up to max_world;
    DDP fits on 1 or never, since it does not shard)."""
    worlds = [1, 2] if parallel == "ddp" else [2**i for i in range(int(math.log2(max_world)) + 1)]
    for n in worlds:
        p = plan(cfg, parallel, n, **kw)
        if (p.total_ckpt if checkpointing else p.total) <= headroom * device_bytes:
            return n
    return None
