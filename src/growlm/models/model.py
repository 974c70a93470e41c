"""One decoder-only transformer for the GPT-2 and Llama families.

GPT-2 (Radford et al. 2019): learned positions, LayerNorm, GELU(tanh) MLP, biases, tied head.
Llama (Touvron et al. 2023): RoPE (Su et al. 2021), RMSNorm, SwiGLU MLP, grouped-query attention
(Ainslie et al. 2023). Which one is built is decided by `ModelConfig` fields only.

Every forward pass goes through `GPT.hidden(idx, pos, mask, cache)` (final-normed hidden states) and
`GPT.forward` (the same plus the output head): explicit positions and a boolean attention mask let callers
pack several sequences into one row (shared-context scoring) without re-implementing a block.
Attention runs through SDPA, except in the layers whose attention probabilities a caller asks for
(`GPT.forward(..., attention_layers=[...])`, for attention-map distillation): those compute
softmax(Q K^T / sqrt(hs) + mask) explicitly, with the same result to float rounding.

Parameter names (used by the HF weight maps and by the growth operators):
  wte, wpe, blocks.{i}.norm_1, blocks.{i}.attn.{q,k,v,o}, blocks.{i}.norm_2,
  blocks.{i}.mlp.{gate,up,down}, norm_f, lm_head (absent when tied).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from growlm.models.config import ModelConfig
from growlm.models.head import chunked_cross_entropy


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm computed in (at least) float32 and cast back, as transformers' LlamaRMSNorm does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _lean(x, self.weight):
            return _RMSNorm.apply(x, self.weight, self.eps)
        return _rms_norm(x, self.weight, self.eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.to(torch.promote_types(dtype, torch.float32))  # float32 for half types, float64 stays float64
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.n_embd
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return LayerNorm(dim, cfg.norm_eps, cfg.norm_bias)


def rope_cache(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (*positions.shape, head_dim), half-split layout (transformers' rotate_half convention).

    RoPE (Su et al. 2021, eq. 34): the pair (x_i, x_{i + d/2}) is rotated by angle pos * theta^(-2i/d).
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d))
    freqs = positions.float()[..., None] * inv_freq  # (..., d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., d)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hs); cos/sin: (T, hs) or (B, 1, T, hs)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos.to(x.dtype)) + (rotated * sin.to(x.dtype))


@dataclass
class KVCache:
    """Per-layer keys and values of the tokens seen so far; grows by concatenation."""

    k: list[torch.Tensor | None] = field(default_factory=list)
    v: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.k or self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.k) <= layer:
            self.k.append(None)
            self.v.append(None)
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=2)
            v = torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def expand(self, batch: int) -> "KVCache":
        """A copy whose batch-1 entries are broadcast to `batch` rows (shared-context scoring)."""
        return KVCache([t.expand(batch, -1, -1, -1) for t in self.k], [t.expand(batch, -1, -1, -1) for t in self.v])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hs = cfg.head_dim
        self.q = nn.Linear(cfg.n_embd, cfg.n_head * hs, bias=cfg.attn_bias)
        self.k = nn.Linear(cfg.n_embd, cfg.n_kv_head * hs, bias=cfg.attn_bias)
        self.v = nn.Linear(cfg.n_embd, cfg.n_kv_head * hs, bias=cfg.attn_bias)
        self.o = nn.Linear(cfg.n_head * hs, cfg.n_embd, bias=cfg.proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        causal: bool,
        cache: KVCache | None,
        layer: int,
        probs: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """probs: when given, attention is computed explicitly and its probabilities (B, nh, T, S) are
        stored in probs[layer]; otherwise SDPA (same values to float rounding, no (T, S) matrix kept)."""
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs)
        if probs is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=cfg.n_kv_head != cfg.n_head)
        else:
            y, probs[layer] = explicit_attention(q, k, v, mask, causal)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim)
        return self.o(y)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA written out: P = softmax(q k^T / sqrt(hs) + mask), y = P v; returns (y, P).

    q: (B, nh, T, hs); k, v: (B, nkv, S, hs), each KV head shared by nh / nkv consecutive query heads
    (GQA, as SDPA's enable_gqa). `causal` is SDPA's is_causal (query i sees keys 0..i); `mask` is a boolean
    mask broadcastable to (B, nh, T, S), True where a query may attend. The softmax runs in at least float32.
    """
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, S, hs)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, T, S)
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = scores.softmax(-1)
    return p.to(v.dtype) @ v, p


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.gate = nn.Linear(cfg.n_embd, cfg.ffn_size, bias=cfg.mlp_bias) if self.swiglu else None
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.ffn_size, cfg.n_embd, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down
        if self.swiglu:
            g, u = self.gate(x), self.up(x)
        else:
            g, u = self.up(x), None
        if _lean(g, down.weight) and type(down) is nn.Linear and not (down._forward_hooks or down._forward_pre_hooks):
            return _MLPOut.apply(g, u, down.weight, down.bias)  # the hooks check: pruning reads down's input
        return down(_mlp_act(g, u))


# -- memory-lean autograd for the element-wise parts --------------------------------------------------
# Autograd on the plain expressions keeps more than the backward needs: RMSNorm keeps its normalised input
# besides the input, SwiGLU keeps silu(g) and its product with u, GELU its output. The two Functions below
# compute exactly the same forward and keep only the inputs (and 1/rms), recomputing the rest in the backward
# (element-wise work, no matmul): 11,147 -> 6,923 floats kept per token and SmolLM2 layer, 38% less activation
# memory. Used in eager training in float32 (`_lean`); under autocast, torch.compile (whose partitioner makes its
# own recompute choice) or when no gradient is wanted the plain expressions run.


def _lean(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and x.dtype == weight.dtype
            and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling())


class _RMSNorm(torch.autograd.Function):
    """`_rms_norm` keeping x and 1/rms (not the normalised x). With n = x r, r = mean(x^2 + eps)^-1/2, y = w n:
    dx = r (dn - n mean(dn n)), dn = dy w; dw = sum over tokens of dy n."""

    generate_vmap_rule = True  # torch.func (EWC's per-sample gradients) composes with it

    @staticmethod
    def forward(x, weight, eps):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * (xf * rstd).to(x.dtype), rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, dy, _):
        x, weight, rstd = ctx.saved_tensors
        n = x.to(rstd.dtype) * rstd
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dn = (dy * weight).to(x.dtype).to(rstd.dtype)
            dx = (rstd * (dn - n * (dn * n).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (dy * n.to(x.dtype)).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None

    @classmethod
    def apply(cls, x, weight, eps):  # type: ignore[override]
        return super().apply(x, weight, eps)[0]


def _mlp_act(g: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """silu(g) * u (SwiGLU) or gelu_tanh(g) (u = None)."""
    return F.gelu(g, approximate="tanh") if u is None else F.silu(g) * u


class _MLPOut(torch.autograd.Function):
    """down(_mlp_act(g, u)) keeping g, u and down's weight: the activation is recomputed in the backward for
    down's weight gradient, instead of kept (4 x ffn_size floats per token for SwiGLU, 1 x for GELU)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g, u, weight, bias):
        return F.linear(_mlp_act(g, u), weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, u, weight, bias = inputs
        ctx.save_for_backward(g, u, weight)
        ctx.has_u = u is not None

    @staticmethod
    def backward(ctx, dy):
        g, u, weight = ctx.saved_tensors
        u = u if ctx.has_u else None
        need_g, need_u, need_w, need_b = ctx.needs_input_grad
        dg = du = dw = db = None
        dy2 = dy.reshape(-1, dy.shape[-1])
        if need_w:
            dw = dy2.t() @ _mlp_act(g, u).reshape(-1, g.shape[-1])
        if need_b:
            db = dy2.sum(0)
        if need_g or need_u:
            dh = dy @ weight
            if u is None:
                dg = torch.ops.aten.gelu_backward(dh, g, approximate="tanh")
            else:
                if need_u:
                    du = dh * F.silu(g)
                if need_g:
                    dh = dh * u  # dL/dsilu(g); the old dh is freed here, never more than 3 (n, ffn) tensors at once
                    dg = torch.ops.aten.silu_backward(dh, g)
        return dg, du, dw, db


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, causal, cache, layer, probs=None):
        x = x + self.attn(self.norm_1(x), rope, mask, causal, cache, layer, probs)
        x = x + self.mlp(self.norm_2(x))
        return x


def call_block(block: Block, *args) -> torch.Tensor:
    """`block(*args)`. A function of the block rather than a method, so that one `torch.compile(call_block)`
    serves every block: with nn.Module inlining (torch >= 2.5) the block's parameters are graph inputs, so all
    blocks of one shape share one graph, and blocks added by depth growth reuse it (`GPT.block_call`,
    growlm.train.parallel.CompiledBlocks)."""
    return block(*args)


def checkpointed_block(block: Block, *args) -> torch.Tensor:
    """`block(*args)` keeping only its input for the backward; its activations are recomputed there."""
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


@dataclass
class ModelOutput:
    logits: torch.Tensor
    hidden_states: list[torch.Tensor] | None = None
    """Residual stream: the embedding output, then after each block (n_layer + 1 tensors, before norm_f)."""
    attentions: dict[int, torch.Tensor] | None = None
    """Attention probabilities (B, n_head, T, S) of the layers asked for, by block index."""


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False  # recompute each block in the backward (training only)
        # block_call(fn, block, *args) runs fn(block, *args), fn = call_block or checkpointed_block (a compiled
        # runner, growlm.train.parallel.CompiledBlocks); not with a KV cache (generation: a cache that grows every
        # token would recompile) nor in a layer whose attention probabilities are returned
        self.block_call: Callable[..., torch.Tensor] | None = None
        self.reset_parameters()

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> "GPT":
        """The one model builder from weights: built on the meta device (no random init, no second copy),
        then the tensors are assigned. Every key must match (a tied head has no lm_head key)."""
        with torch.device("meta"):
            model = cls(cfg)
        sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None).contiguous() for k, v in state_dict.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        return model

    # -- init ------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layer)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    # -- forward ---------------------------------------------------------
    @property
    def head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        attention_layers: Sequence[int] = (),
        targets: torch.Tensor | None = None,
        loss_chunk: int = 0,
    ) -> torch.Tensor | ModelOutput:
        """Logits (B, T, vocab) for token ids (B, T); a ModelOutput when hidden states or attentions are asked for.

        `pos`, `mask` and `cache` mean what they mean in `hidden`. attention_layers: block indices whose
        attention probabilities are returned in ModelOutput.attentions; only those blocks leave SDPA.
        With `targets` (B, T) (-100 = ignored): the mean cross-entropy instead, `loss_chunk` tokens at a time
        (growlm.models.head; 0 = all logits at once).
        """
        if targets is not None:  # inside forward(), so that a DDP wrapper sees the head's use
            h = self._trunk(idx, pos, mask, cache, None)
            return chunked_cross_entropy(h, self.head_weight, targets, loss_chunk)
        bad = [i for i in attention_layers if not 0 <= i < self.config.n_layer]
        if bad:
            raise ValueError(f"attention layer {bad[0]} is out of range 0..{self.config.n_layer - 1}")
        states: list[torch.Tensor] | None = [] if output_hidden_states else None
        attns: dict[int, torch.Tensor] | None = {} if attention_layers else None
        logits = F.linear(self._trunk(idx, pos, mask, cache, states, attns, set(attention_layers)), self.head_weight)
        return ModelOutput(logits, states, attns) if output_hidden_states or attention_layers else logits

    def hidden(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, C), the input of the output head.

        pos: positions (B, T) or (T,) of the tokens, for the learned embeddings and RoPE alike; default
            past..past + T - 1, where past is the number of cached tokens. Every position must be below
            block_size.
        mask: boolean attention mask, True where a query may attend to a key, broadcastable to (B, 1, T, S)
            with S = past + T keys (cached ones first). It replaces the causal mask: pass the whole pattern.
            Default: causal. With `pos`, several sequences packed in one row (a shared context followed by
            each continuation) run as if alone: a block mask and positions that restart per sequence.
        cache: a KVCache holding the keys and values of earlier tokens; `idx` continues them and the cache
            is extended in place.
        """
        return self._trunk(idx, pos, mask, cache, None)

    def _trunk(self, idx, pos, mask, cache, states: list[torch.Tensor] | None,
               attns: dict[int, torch.Tensor] | None = None, attn_layers: frozenset[int] | set[int] = frozenset()) -> torch.Tensor:
        cfg = self.config
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if pos is None:
            if past + T > cfg.block_size:
                raise ValueError(f"sequence of {past + T} tokens exceeds the context length {cfg.block_size}")
            pos = torch.arange(past, past + T, device=idx.device)
        elif pos.numel() and int(pos.max()) >= cfg.block_size:
            raise ValueError(f"position {int(pos.max())} is beyond the context length {cfg.block_size}")
        causal = False
        if mask is None:
            if past > 0 and T > 1:  # query i (absolute position past + i) sees keys 0..past + i
                mask = torch.ones(T, past + T, dtype=torch.bool, device=idx.device).tril(diagonal=past)
            else:
                causal = past == 0 and T > 1
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            cos, sin = rope_cache(cfg, pos)  # (T, hs) or (B, T, hs)
            rope = (cos, sin) if pos.dim() == 1 else (cos[:, None], sin[:, None])  # broadcast over heads
        if states is not None:
            states.append(x)
        ckpt = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.blocks):
            attn = attns if i in attn_layers else None
            fn = checkpointed_block if ckpt and attn is None else call_block
            if self.block_call is not None and cache is None and attn is None:
                x = self.block_call(fn, block, x, rope, mask, causal, cache, i, None)
            else:
                x = fn(block, x, rope, mask, causal, cache, i, attn)
            if states is not None:
                states.append(x)
        return self.norm_f(x)

    # -- utilities -------------------------------------------------------
    def num_params(self, trainable_only: bool = False, embeddings: bool = True) -> int:
        """Unique parameter count (a tied head is counted once)."""
        n = 0
        for name, p in self.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            if not embeddings and name in ("wte.weight", "wpe.weight"):
                continue
            n += p.numel()
        return n

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        prompt_lengths: list[int] | None = None,
        stop: Callable[[int, list[int]], bool] | None = None,
    ) -> torch.Tensor:
        """Extend `idx` (B, T) by up to `max_new_tokens`; temperature 0 is greedy.

        prompt_lengths: the rows of `idx` are left-padded to T and row b's prompt is its last
            prompt_lengths[b] tokens; position ids start at 0 at each row's first real token and padding
            is masked out, so every row continues exactly as it would alone.
        stop: stop(row, new_tokens) -> True ends that row (stop strings); like EOS, an ended row is padded
            with `eos_token_id` (or 0) and the loop ends when every row has ended.
        """
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        B, T = idx.shape
        lengths = torch.tensor(prompt_lengths if prompt_lengths is not None else [T] * B, device=idx.device)
        if int(lengths.min()) < 1 or int(lengths.max()) > T:
            raise ValueError(f"prompt lengths must be in 1..{T}, got {lengths.tolist()}")
        if int(lengths.max()) + max_new_tokens > self.config.block_size:
            max_new_tokens = max(0, self.config.block_size - int(lengths.max()))
        padded = prompt_lengths is not None and bool((lengths < T).any())
        pad = T - lengths  # (B,)
        valid = torch.arange(T, device=idx.device)[None, :] >= pad[:, None]  # (B, T): real tokens
        cache = KVCache() if use_cache else None
        out = idx
        step_in = idx
        fill = eos_token_id if eos_token_id is not None else 0
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        new: list[list[int]] = [[] for _ in range(B)]
        for step in range(max_new_tokens):
            inp = step_in if use_cache else out
            pos = mask = None
            if padded:
                n = inp.shape[1]
                S = out.shape[1]
                first = S - n  # absolute column of step_in's first token
                pos = (torch.arange(first, S, device=idx.device)[None, :] - pad[:, None]).clamp(min=0)
                keys = valid if S == T else torch.cat((valid, valid.new_ones(B, S - T)), 1)  # (B, S)
                causal = torch.ones(n, S, dtype=torch.bool, device=idx.device).tril(diagonal=first)
                # a padding query attends to itself only, so no attention row is empty
                diag = torch.arange(first, S, device=idx.device)[:, None] == torch.arange(S, device=idx.device)
                mask = (causal[None] & keys[:, None, :]) | diag[None]
                mask = mask[:, None]  # (B, 1, n, S)
            h = self.hidden(inp, pos=pos, mask=mask, cache=cache)[:, -1]
            logits = F.linear(h, self.head_weight).float()  # the head on the last position only
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, fill), nxt)
            if eos_token_id is not None:
                done |= nxt == eos_token_id
            if stop is not None:
                for b, t in enumerate(nxt.tolist()):
                    if not done[b]:
                        new[b].append(t)
                        if stop(b, new[b]):
                            done[b] = True
            out = torch.cat((out, nxt[:, None]), dim=1)
            step_in = nxt[:, None]
            if (eos_token_id is not None or stop is not None) and bool(done.all()):
                break
        return out


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
