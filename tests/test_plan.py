"""The memory planner: exact parameter counts, activation estimates against the tensors autograd saves, the
predicted peak of a training step against the live tensor bytes the allocator reports, sharding arithmetic,
the CLI table."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from growlm.cli.main import main
from growlm.models.config import ModelConfig
from growlm.models.model import GPT
from growlm.train.config import OptimConfig
from growlm.train.optim import build_optimizer
from growlm.train.plan import GIB, SCHEDULE_55M_7B, activation_bytes, count, model_config, plan, smallest_world


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2", "smollm2-135m:n_layer=3"])
def test_counts_are_exact(spec):
    cfg = model_config(spec)
    m = GPT(cfg)
    total, block, root = count(cfg)
    assert total == m.num_params() and block == sum(p.numel() for p in m.blocks[1].parameters())
    assert root == total - cfg.n_layer * block


def _saved_bytes(cfg: ModelConfig, B: int, T: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for the backward of forward + loss."""
    torch.manual_seed(0)
    m = GPT(cfg)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = m(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1))
    return sum(v for k, v in seen.items() if k not in params)


@pytest.mark.parametrize("spec", ["smollm2-135m:n_layer=2,vocab_size=512", "gpt2:n_layer=2,vocab_size=512"])
def test_activation_estimate_matches_what_autograd_saves(spec):
    cfg = model_config(spec)
    B, T = 1, 128
    full, ckpt = activation_bytes(cfg, B, T, 4)
    log_softmax = B * T * cfg.vocab_size * 4  # the head's, planned apart (head_bytes)
    got = _saved_bytes(cfg, B, T) - log_softmax
    assert abs(full - got) <= 0.05 * got
    assert ckpt < full


def _live_peak(cfg: ModelConfig, B: int, T: int, loss_chunk: int, checkpointing: bool) -> tuple[int, int]:
    """(peak, final) CPU tensor bytes allocated and not freed over two training steps as the trainer runs them
    (zero_grad set_to_none, the loss inside forward, backward, clipping, fused AdamW), from the profiler's
    allocator accounting, counted from before the model is built."""
    gc.collect()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        m = GPT(cfg)
        m.activation_checkpointing = checkpointing
        opt = build_optimizer(m, OptimConfig(lr=1e-3))
        for _ in range(2):
            x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
            opt.zero_grad(set_to_none=True)
            m(x[:, :-1], targets=x[:, 1:], loss_chunk=loss_chunk).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
    events = []

    def walk(n):
        if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu":
            events.append((n.start_time_ns, n.extra_fields.total_allocated, n.extra_fields.alloc_size))
        for c in n.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    events.sort()
    base = events[0][1] - events[0][2]  # the allocator's running total is process-wide: start from this run's
    return max(t for _, t, _ in events) - base, events[-1][1] - base


@pytest.mark.parametrize("spec, B, T, chunk, ckpt, tol", [
    ("smollm2-135m:n_layer=2,vocab_size=2048", 2, 512, 256, False, 0.03),  # peak in the first MLP backward
    ("smollm2-135m:n_layer=2,vocab_size=2048", 2, 512, 0, False, 0.03),  # plain loss: the head's backward
    ("smollm2-135m:n_layer=2,vocab_size=8192", 2, 256, 128, False, 0.03),  # chunked head's backward
    ("smollm2-135m:n_layer=2,vocab_size=2048", 1, 64, 32, False, 0.03),  # end of the backward (state-bound)
    ("gpt2:n_layer=2,vocab_size=2048,n_embd=256,n_head=4,n_kv_head=4", 2, 512, 256, False, 0.03),
    ("smollm2-135m:n_layer=2,vocab_size=2048", 2, 512, 256, True, 0.06),  # activation checkpointing
])
def test_plan_matches_live_tensor_bytes(spec, B, T, chunk, ckpt, tol):
    """One process (ddp x 1): the planned peak of a step against the measured peak of live tensor bytes, and
    the state after the step (weights + gradients + AdamW moments) exactly."""
    cfg = model_config(spec)
    peak, end = _live_peak(cfg, B, T, chunk, ckpt)
    p = plan(cfg, "ddp", 1, micro_batch=B, seq_len=T, loss_chunk=chunk)
    assert abs(end - (p.weights + p.grads + p.adam)) < 16 * 1024  # a few scalars (AdamW's steps, the loss)
    predicted = p.total_ckpt if ckpt else p.total
    assert abs(predicted - peak) <= tol * peak, (predicted / peak, p.moments(ckpt))


def test_plan_components():
    """The engines' buffers: DDP's buckets are a full gradient copy; FSDP gathers the root and two blocks;
    the runtime is added as given; one process gathers and buckets nothing."""
    cfg = model_config("smollm2-135m")
    total, block, root = count(cfg)
    ddp, fsdp = plan(cfg, "ddp", 2, seq_len=256), plan(cfg, "fsdp", 2, seq_len=256, runtime=GIB)
    assert ddp.buckets == total * 4 and ddp.root == ddp.blocks == 0
    assert fsdp.buckets == 0 and fsdp.root == root * 4 and fsdp.blocks == 2 * block * 4
    assert fsdp.total == GIB + fsdp.tensors and fsdp.tensors == max(fsdp.moments().values())
    assert plan(cfg, "fsdp", 2, seq_len=256, bf16=True).root == root * 2  # gathered in the compute dtype
    one = plan(cfg, "fsdp", 1, seq_len=256)
    assert one.buckets == one.root == one.blocks == 0
    assert count(cfg, 2)[0] * 4 == fsdp.weights and 2 * fsdp.weights == ddp.weights  # SmolLM2's rows are even
    # FSDP2 pads dim 0 to a multiple of the world: 97 and 100 vocabulary rows take 25 rows per rank on 4
    assert count(model_config("tiny-llama:vocab_size=97"), 4)[0] == count(model_config("tiny-llama:vocab_size=100"), 4)[0]
    assert count(model_config("tiny-llama:vocab_size=97"))[0] < count(model_config("tiny-llama:vocab_size=100"))[0]


def test_plan_cli(capsys):
    assert main(["plan", "--models", '["tiny-llama", "tiny-llama:n_layer=4"]', "--world", "2", "--device_gib", "1"]) == 0
    out = capsys.readouterr().out
    assert "L4 d32" in out and "fsdp x 2" in out and "peak at" in out and "gathered" in out and "runtime" in out
    assert main(["plan", "--models", '["no-such-preset"]']) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["plan", "--runtime_gib", "-1"]) == 2
