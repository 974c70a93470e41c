"""Training FLOPs per token and model FLOPs utilisation (MFU).

FLOPs per trained token (Kaplan et al. 2020, sec. 2.1; PaLM, Chowdhery et al. 2022, appendix B):

    flops/token = 6 * N_matmul + 12 * L * T * (n_head * head_dim)

- N_matmul counts the weights of every matrix multiply a token goes through: q, k, v, o and the MLP
  projections of each block, plus the output head (V x d, counted even when tied to the embedding, since
  the head is a real matmul while the embedding lookup is not). Biases, norms and the embedding lookups
  are left out (they are O(d) per token). The factor 6 = 2 (multiply-add) x 3 (forward, backward wrt
  activations, backward wrt weights).
- The attention term: QK^T and AV cost 2 * 2 * T * d_attn multiply-adds per token per layer forward,
  times 3 for training = 12 * T * d_attn per layer, counting the full T x T score matrix as PaLM does
  (a causal mask halves the useful work; MFU conventionally ignores that).

`flops_per_token` is the standard model-FLOPs convention and ignores freezing. A training step with a
frozen base executes less: no weight gradients for frozen matrices and no backward at all below the
lowest trainable block. `executed_flops_per_token` counts what a step on a given model really runs
(forward 2n per weight matrix; input gradient 2n where backward passes through; weight gradient 2n where
the weight requires grad), and the trainer uses it for its FLOP totals and MFU, so MFU never exceeds 100%
with a frozen base (with the model convention the grow-smollm2 job printed "MFU 200%").

MFU = achieved model FLOP/s / peak matmul FLOP/s; the peak is measured on the model's own matmul shapes in
the compute dtype (`growlm.train.precision`), because a data-sheet peak for a shared 2-core CPU does not exist.

A teacher that runs beside training (distillation, KD against forgetting) adds its forward per trained token,
`flops_per_token(teacher_config, T, training=False)`; EWC adds its Fisher once per growth event (`fisher_flops`).
The executed total in metrics.jsonl counts both (not the EWC penalty's few FLOPs per parameter and step).
"""

from __future__ import annotations

import torch

from growlm.models.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Weights of all matrix multiplies per token (blocks + output head)."""
    d, hs = cfg.n_embd, cfg.head_dim
    attn = d * cfg.n_head * hs * 2 + d * cfg.n_kv_head * hs * 2  # q, o + k, v
    mlp = d * cfg.ffn_size * (3 if cfg.mlp == "swiglu" else 2)
    return cfg.n_layer * (attn + mlp) + cfg.vocab_size * d


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """FLOPs for one token of a length-`seq_len` sequence: 6N + 12 L T d_attn (training) or a third of it."""
    total = 6 * matmul_params(cfg) + 12 * cfg.n_layer * seq_len * cfg.n_head * cfg.head_dim
    return float(total if training else total / 3)


def executed_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token that a step on `model` executes, given which weights require gradients.

    Walks the network bottom-up: a block is back-propagated through when it or anything below it
    (embeddings included) is trainable. Within such a block every matmul is counted with its input
    gradient (a slight over-count for the lowest trainable block's first projections).
    """
    cfg = model.config
    d_attn = cfg.n_head * cfg.head_dim
    below = any(p.requires_grad for n, p in model.named_parameters() if n.startswith(("wte.", "wpe.")))
    total = 0
    for block in model.blocks:
        backward = below or any(p.requires_grad for p in block.parameters())
        for mod in block.modules():
            if isinstance(mod, torch.nn.Linear):
                n = mod.weight.numel()
                total += 2 * n + (2 * n if backward else 0) + (2 * n if mod.weight.requires_grad else 0)
        total += 4 * seq_len * d_attn * (3 if backward else 1)  # QK^T and AV; backward costs twice forward
        below = backward
    below = below or any(p.requires_grad for p in model.norm_f.parameters())
    head = model.head_weight
    n = head.numel()
    total += 2 * n + (2 * n if below else 0) + (2 * n if head.requires_grad else 0)
    return float(total)


def fisher_flops(model: torch.nn.Module, n_sequences: int, seq_len: int, true_fisher: bool = False) -> float:
    """Executed FLOPs of the diagonal Fisher (`growlm.train.regularize.per_sample_fisher`) on `n_sequences`
    sequences: per token one forward and one backward with weight gradients for the trainable parameters,
    what a training step executes (`executed_flops_per_token`; per-sample gradients cost the same matmuls as a
    batch gradient), plus for the true Fisher the forward that samples its labels."""
    per_token = executed_flops_per_token(model, seq_len)
    if true_fisher:
        per_token += flops_per_token(model.config, seq_len, training=False)
    return per_token * n_sequences * seq_len


def mfu(flops_per_second: float, peak: float) -> float:
    return flops_per_second / peak if peak > 0 else 0.0
