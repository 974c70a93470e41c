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

MFU = achieved model FLOP/s / peak matmul FLOP/s. The peak is measured once per machine, dtype and
thread count (a large square matmul, best of a few runs) and cached in the growlm cache directory,
because a data-sheet peak for a shared 2-core CPU does not exist.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from growlm.io import atomic_write
from growlm.models.config import ModelConfig
from growlm.models.assets import cache_dir


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


def measure_matmul_peak(dtype: torch.dtype = torch.bfloat16, device: str = "cpu", n: int = 2048, repeats: int = 10) -> float:
    """Best observed FLOP/s of an n x n x n matmul (2 n^3 FLOPs); the best of several runs, because on a
    shared machine other processes only ever make a run slower."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up kernels and caches
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def matmul_peak(dtype: torch.dtype = torch.bfloat16, device: str = "cpu", cache: Path | None = None) -> float:
    """The matmul peak for (device name, dtype, threads): $GROWLM_MATMUL_PEAK (FLOP/s) when set, else
    measured on first use and cached (delete the cache file to measure again on a quiet machine)."""
    env = os.environ.get("GROWLM_MATMUL_PEAK")
    if env:
        return float(env)
    if cache is None:

        cache = cache_dir() / "matmul_peak.json"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"cpu-{torch.get_num_threads()}threads"
    key = f"v2|{name}|{str(dtype).removeprefix('torch.')}"
    table = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in table:
        table[key] = measure_matmul_peak(dtype, device)
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, json.dumps(table, indent=1))
    return float(table[key])


def mfu(flops_per_second: float, peak: float) -> float:
    return flops_per_second / peak if peak > 0 else 0.0
