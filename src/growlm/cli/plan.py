"""`growlm plan`: memory per process for a model or a growth schedule under DDP or FSDP2, and how many
devices each stage needs (`growlm.train.plan`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from growlm.errors import GrowlmError
from growlm.train.plan import GIB, SCHEDULE_55M_7B, model_config, plan as plan_memory, smallest_world

console = Console(width=200)


def plan(
    models: list[str] | None = None,
    parallel: str = "fsdp",
    world: int = 8,
    device_gib: float = 80.0,
    micro_batch: int = 1,
    seq_len: int = 2048,
    dtype: str = "float32",
    autocast: str = "bf16",
    headroom: float = 0.9,
    loss_chunk: int = 1024,
    runtime_gib: float = 1.0,
) -> None:
    """Print the bytes per rank (weights, gradients, AdamW moments, engine buffers, activations with and
    without activation checkpointing) of each model, and the fewest devices it fits on.

    Args:
        models: stages of a growth schedule, in order: preset names, 'preset:key=value,...' or model
            directories (default: a 55M -> 7B Llama progression on SmolLM2's tokenizer).
        parallel: 'ddp' (full copy per process) or 'fsdp' (sharded), for the per-rank columns.
        world: processes for the per-rank columns.
        device_gib: memory of one device in GiB (80 for an A100/H100 80GB, 141 for an H200).
        micro_batch: sequences per forward/backward per process.
        seq_len: tokens per sequence.
        dtype: float32 or float64: weights, gradients and AdamW moments.
        autocast: 'bf16' (activations and gathered weights in bf16) or 'none'.
        headroom: fraction of device memory a plan may use (the rest: the allocator's fragmentation, buffers).
        loss_chunk: tokens per chunk of the output head and cross-entropy (run.loss_chunk; 0 = all at once).
        runtime_gib: memory of a process before any model, per rank: CUDA context, kernels and libraries
            (about 0.5-1 GiB on a GPU; 0.27 GiB of RSS for torch + gloo on CPU, bench/scale.py).
    """
    if dtype not in ("float32", "float64") or autocast not in ("bf16", "none"):
        raise GrowlmError("dtype must be float32 or float64 and autocast bf16 or none")
    if device_gib <= 0 or not 0 < headroom <= 1 or runtime_gib < 0 or loss_chunk < 0:
        raise GrowlmError("device_gib must be > 0, headroom in (0, 1], runtime_gib and loss_chunk >= 0")
    kw = dict(micro_batch=micro_batch, seq_len=seq_len, dtype_bytes=4 if dtype == "float32" else 8, bf16=autocast == "bf16",
              loss_chunk=loss_chunk, runtime=runtime_gib * GIB)
    t = Table(title=f"growlm plan: GiB per rank, {parallel} x {world}, micro_batch {micro_batch} x {seq_len} tokens, "
                    f"{dtype} weights, autocast {autocast}; devices of {device_gib:g} GiB ({headroom:.0%} usable)")
    engine = "buckets" if parallel == "ddp" else "gathered"
    for col in ("stage", "model", "params", "weights", "grads", "AdamW", engine, "activ.", "activ. ckpt", "head",
                "runtime", "total", "total ckpt", "peak at", "devices ddp", "devices fsdp", "fsdp ckpt"):
        t.add_column(col, justify="left" if col in ("stage", "model", "peak at") else "right")
    dev = device_gib * GIB
    for i, spec in enumerate(models or SCHEDULE_55M_7B):
        cfg = model_config(spec)
        p = plan_memory(cfg, parallel, world, **kw)
        fits = [smallest_world(cfg, par, dev, ck, headroom=headroom, **kw) for par, ck in
                (("ddp", False), ("fsdp", False), ("fsdp", True))]
        shape = f"L{cfg.n_layer} d{cfg.n_embd} h{cfg.n_head}/{cfg.n_kv_head} f{cfg.ffn_size}"
        moments = p.moments()
        t.add_row(str(i + 1), shape, _count(p.params), *(f"{x / GIB:.2f}" for x in
                  (p.weights, p.grads, p.adam, p.buckets + p.root + p.blocks, p.activations, p.activations_ckpt,
                   max(p.head_forward, p.head_backward) + p.head_grad, p.runtime, p.total, p.total_ckpt)),
                  max(moments, key=moments.get), *("-" if n is None else str(n) for n in fits))
    console.print(t)
    console.print("total: runtime + the largest of the step's moments (growlm.train.plan); weights, grads and AdamW "
                  "are this rank's shards; gathered = FSDP's unsharded root + two blocks; head = the output head and "
                  "cross-entropy's tensors with the head's gradient. devices: the fewest processes whose rank fits "
                  "(DDP does not shard: 1 or '-'). Not planned: the allocator's retention (headroom), and growth, "
                  "which gathers a full fp32 copy of weights and moments per rank for a moment.")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
