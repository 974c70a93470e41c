"""A memory planner: bytes per process for training a model (or each stage of a growth schedule) with DDP
or FSDP2, and the smallest process count whose per-device memory holds it.

The plan predicts the peak of live tensor bytes of one training step (`growlm.train.trainer`: zero_grad
with set_to_none, the loss inside forward `run.loss_chunk` tokens at a time, backward, AdamW) from a
step's timeline, plus a per-process runtime given as an input. Notation, per rank: P parameters (counted
exactly on a meta-device model), P_r of them in the root (embeddings, final norm, untied head), P_b per
block, L blocks, N processes, w bytes per weight (run.dtype: master weights, gradients, AdamW moments),
a bytes per activation (2 under bf16 autocast, else w), n = micro_batch x seq_len tokens, d = n_embd,
V = vocab, c = min(loss_chunk, n) (n when loss_chunk is 0).

Components (Rajbhandari et al. 2020, "ZeRO", section 3; Zhao et al. 2023, "PyTorch FSDP"):

    weights  W = sum_p ceil(r_p / S) (numel_p / r_p) w       S = N for fsdp (FSDP2 pads dim 0 to a multiple
    grads    G = W                                            of N), 1 for ddp; G exists from the backward to
    AdamW    M = 2 W                                          the next step's zero_grad
    buckets  B = P w                        ddp, N > 1: DDP's flat all-reduce buffers beside the gradients
                                            (gradient_as_bucket_view off, PyTorch's default)
    root     U_r = P_r a_p                  fsdp, N > 1: the root group gathered from the forward to the end
                                            of the backward (FSDP2 keeps the root unsharded after forward);
                                            a_p = 2 with a bf16 MixedPrecisionPolicy, else w
    blocks   U_b = 2 P_b a_p                fsdp, N > 1, in a block's backward: the current and the prefetched
                                            block gathered (0 otherwise)
             R_b = P_b (a_p + w)            at the end of a block's backward: its unsharded gradients and their
                                            reduce-scatter input (fsdp), or its gradients R_b = P_b w
             X_mlp = f d g + k n f a        in the first MLP backward: the down projection's weight gradient and
                                            the gradients of the MLP's hidden activations alive at once (SwiGLU
                                            k = 2: the gate's and the up projection's; GELU k = 1; one more
                                            in eager float32/64, where the lean backward recomputes the activation)
    activ.   A = L n e a + n d a            what autograd saves, e elements per token and block (below), plus
                                            the embedding output
    head     H_f = V d 4 + n d a + 2 c V 4  forward of the chunked cross-entropy (`growlm.models.head`): the
                                            head's gradient formed in fp32 while the logits are at hand, the
                                            hidden states' gradient, one chunk's logits and log-probabilities
             H_b = V d 4 + 2 n d a + V d w  its backward: both scaled by the incoming gradient (new tensors)
                                            while the saved ones are alive
             loss_chunk 0 (the plain path): H_f = 2 n V 4 (logits, log-softmax), H_b = 3 n V 4 (+ gradient)
    g_head   V d g                          the head weight's gradient, alive from the loss's backward to the
                                            end (tied: it waits for the embedding's; fsdp: unsharded until
                                            the root's reduce-scatter); g = a_p under fsdp, else w
    g_embed  V d g                          the embedding's gradient beside it at the end of the backward: a
                                            tied head's dense gradient before the two are summed, or under
                                            fsdp the unsharded one until the root's reduce-scatter (ddp,
                                            untied: 0, it is part of G)

Per token and block, autograd saves (Korthikanti et al. 2022, "Reducing Activation Recomputation",
section 4, for the method; counted against `torch.autograd.graph.saved_tensors_hooks` in the tests): the
residual input and the two norm outputs and inputs (5 d), q, k, v (d_q + 2 d_kv; twice with RoPE, before
and after the rotation), the attention output (d_q) and its log-sum-exp (n_head, flash-style SDPA), the
MLP's hidden activations (SwiGLU: gate, up, SiLU(gate), product = 4 f; GELU: fc, GELU = 2 f). In eager
float32/64 training RMSNorm keeps only its input (2 d less per block) and the MLP output only its inputs
(SwiGLU: gate, up = 2 f; GELU: fc = f): `growlm.models.model._RMSNorm`, `_MLPOut`. With
activation checkpointing each block keeps its input (n d a) and one block's activations are recomputed at
a time: A_ckpt = L n d a + n e a + n d a.

The peak is the largest of these moments (activations shrink as gradients grow during the backward, so the
extremes sit at its ends):

    forward, head      W + M + E + A + H_f                        E = B (ddp) or U_r (fsdp)
    backward, head     W + M + E + A + H_b
    backward, MLP      W + M + E + A + g_head + U_b + X_mlp       (the first block's MLP)
    backward, block    W + M + E + A - n e a + g_head + U_b + R_b (the end of the first block's backward)
    backward, end      W + M + G + B + g_embed                    (ddp)
                       W + M + G + U_r + g_head + g_embed         (fsdp: before the root's reduce-scatter)

plus `runtime`: the process's memory before any model (Python, torch, the communication library; on a GPU
the CUDA context, ~0.5-1 GiB), an input measured once per machine. bench/scale.py measures each
component on SmolLM2-135M with 2 gloo processes.

What it leaves out, reported separately by bench/scale.py: the allocator's retention (memory freed but not
returned: glibc's arenas on CPU, where peak RSS under default settings reached 2.5x the live bytes;
MALLOC_MMAP_THRESHOLD_=131072 returns large blocks to the OS; the CUDA caching allocator's reserved minus
allocated on a GPU), non-tensor memory allocated during training (Python objects, autograd nodes,
~60-90 MiB per process measured), gloo's staging copies of a gathered or reduced group (CPU only, never at
the peak in the measured runs), and the moment of growth (`growlm.train.sharded.gather_full` holds a full
fp32 copy of the weights and moments per rank); leave headroom (`headroom`).
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
    """Bytes per rank of one model under one parallelism and process count (formulas: the module docstring)."""

    name: str
    params: int
    parallel: str
    world: int
    weights: float
    grads: float
    adam: float
    buckets: float
    """DDP's gradient buckets (0 for fsdp or one process)."""
    root: float
    """FSDP's gathered root group, U_r (0 for ddp or one process)."""
    blocks: float
    """FSDP's gathered blocks in the backward, U_b (0 for ddp or one process)."""
    block_grads: float
    """One block's fresh gradients at the end of its backward, R_b."""
    mlp_temps: float
    """The gradients alive in the first MLP backward, X_mlp."""
    block_act: float
    """One block's saved activations, n e a."""
    activations: float
    activations_ckpt: float
    """With activation checkpointing."""
    head_forward: float
    head_backward: float
    head_grad: float
    """The head weight's gradient alive through the backward (g_head)."""
    embed_grad: float
    """The embedding's gradient beside the head's at the end of the backward (g_embed)."""
    runtime: float = 0.0
    """The process's memory before any model (an input)."""

    def moments(self, checkpointing: bool = False) -> dict[str, float]:
        """Live tensor bytes at each candidate peak of a step (without `runtime`)."""
        act = self.activations_ckpt if checkpointing else self.activations
        state = self.weights + self.adam
        engine = self.buckets + self.root
        out = {"forward, head": state + engine + act + self.head_forward,
               "backward, head": state + engine + act + self.head_backward}
        live = state + engine + act + self.head_grad + self.blocks
        out["backward, MLP"] = live + self.mlp_temps
        out["backward, block"] = live - self.block_act + self.block_grads
        if self.parallel == "fsdp" and self.world > 1:
            out["backward, end"] = state + self.grads + self.root + self.head_grad + self.embed_grad
        else:
            out["backward, end"] = state + self.grads + self.buckets + self.embed_grad
        return out

    @property
    def tensors(self) -> float:
        """Peak live tensor bytes of a step."""
        return max(self.moments().values())

    @property
    def total(self) -> float:
        return self.runtime + self.tensors

    @property
    def total_ckpt(self) -> float:
        return self.runtime + max(self.moments(True).values())

    def as_dict(self) -> dict[str, float]:
        """Every component, the moments and the totals, in bytes."""
        keys = ("weights", "grads", "adam", "buckets", "root", "blocks", "block_grads", "mlp_temps", "block_act", "activations", "activations_ckpt",
                "head_forward", "head_backward", "head_grad", "embed_grad", "runtime")
        return {**{k: float(getattr(self, k)) for k in keys}, "moments": self.moments(), "tensors": self.tensors,
                "total": self.total, "total_ckpt": self.total_ckpt}


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


def count(cfg: ModelConfig, world: int = 1) -> tuple[int, int, int]:
    """(all parameters, one block's, the root's: embeddings, final norm, head), exact, on the meta device;
    with world > 1 the elements one rank holds when each tensor's dim 0 is split in `world` padded rows
    (FSDP2's Shard(0): ceil(rows / world) rows per rank)."""
    with torch.device("meta"):
        m = GPT(cfg)

    def local(p: torch.Tensor) -> int:
        rows = p.shape[0] if p.dim() else 1
        return math.ceil(rows / world) * (p.numel() // max(rows, 1))

    block = sum(local(p) for p in m.blocks[0].parameters())
    total = sum(local(p) for p in m.parameters())
    return total, block, total - cfg.n_layer * block


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, act_bytes: int) -> tuple[float, float]:
    """(saved activations without, with activation checkpointing) of one micro-batch, in bytes: A and A_ckpt
    of the module docstring (the head's tensors are separate, `head_bytes`)."""
    d, dq, dkv, f = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.ffn_size
    qkv = (dq + 2 * dkv) * (2 if cfg.position == "rope" else 1)  # RoPE saves q, k before and after rotation
    per_token_block = 5 * d + qkv + dq + cfg.n_head + (4 * f if cfg.mlp == "swiglu" else 2 * f)
    if act_bytes >= 4:  # eager float32/64 training: RMSNorm and the MLP output keep only their inputs
        # (growlm.models.model._RMSNorm, _MLPOut; off under bf16 autocast)
        per_token_block -= (2 * d if cfg.norm == "rmsnorm" else 0) + (2 * f if cfg.mlp == "swiglu" else f)
    n = micro_batch * seq_len
    full = (cfg.n_layer * per_token_block + d) * n * act_bytes
    ckpt = (cfg.n_layer * d + per_token_block + d) * n * act_bytes
    return float(full), float(ckpt)


def head_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, loss_chunk: int, w: int, a: int) -> tuple[float, float, float]:
    """(H_f, H_b, g_head) of the module docstring: the output head and cross-entropy's tensors in the forward
    and in the backward, and the head weight's gradient that lives through the backward; `w` = bytes of the
    head weight as the loss sees it (the gathered dtype under fsdp), `a` = activation bytes."""
    n, d, V = micro_batch * seq_len, cfg.n_embd, cfg.vocab_size
    g_head = V * d * w
    if loss_chunk <= 0:  # F.cross_entropy on the full logits: logits and log-softmax saved, their gradients
        return float(2 * n * V * 4), float(3 * n * V * 4), float(g_head)
    c = min(loss_chunk, n)
    grad_w = V * d * max(w, 4)  # formed in fp32 (float64 stays float64)
    return float(grad_w + n * d * a + 2 * c * V * 4), float(grad_w + 2 * n * d * a + g_head), float(g_head)


def plan(cfg: ModelConfig, parallel: str, world: int, micro_batch: int = 1, seq_len: int = 2048,
         dtype_bytes: int = 4, bf16: bool = False, loss_chunk: int = 1024, runtime: float = 0.0) -> MemoryPlan:
    """The memory of one rank; `dtype_bytes` = bytes per weight (run.dtype), `bf16` = run.autocast bf16,
    `loss_chunk` = run.loss_chunk, `runtime` = bytes of the process before any model."""
    if parallel not in ("ddp", "fsdp"):
        raise GrowlmError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    if world < 1 or micro_batch < 1 or seq_len < 1 or loss_chunk < 0 or runtime < 0:
        raise GrowlmError("world, micro_batch and seq_len must be >= 1, loss_chunk and runtime >= 0")
    total, block, root = count(cfg)
    w = dtype_bytes
    a = 2 if bf16 else w
    sharded = parallel == "fsdp" and world > 1
    local = count(cfg, world)[0] if sharded else total
    buckets = total * w if parallel == "ddp" and world > 1 else 0.0
    u_root = root * a if sharded else 0.0
    g = a if sharded else w  # gradients of gathered parameters come in the gathered dtype
    u_blocks = 2 * block * a if sharded else 0.0  # the current block and the prefetched one
    r_block = block * (a + w) if sharded else block * w  # unsharded gradients + reduce-scatter input, or the gradients
    n, f, d = micro_batch * seq_len, cfg.ffn_size, cfg.n_embd
    lean = a >= 4  # eager float32/64: the MLP output's own backward (models.model._MLPOut) holds one more (n, f)
    mlp_temps = f * d * g + ((2 if cfg.mlp == "swiglu" else 1) + lean) * n * f * a
    act, act_ckpt = activation_bytes(cfg, micro_batch, seq_len, a)
    block_act = (act - n * d * a) / cfg.n_layer
    h_f, h_b, g_head = head_bytes(cfg, micro_batch, seq_len, loss_chunk, g, a)
    embed = cfg.vocab_size * cfg.n_embd * g if sharded or cfg.tie_embeddings else 0.0
    return MemoryPlan(cfg.name, total, parallel, world, local * w, local * w, 2 * local * w, float(buckets),
                      float(u_root), float(u_blocks), float(r_block), float(mlp_temps), float(block_act), act, act_ckpt, h_f, h_b, g_head, float(embed), float(runtime))


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
