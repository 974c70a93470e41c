"""The memory planner: exact parameter counts, activation estimates against the tensors autograd saves,
sharding arithmetic, the CLI table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from growlm.cli.main import main
from growlm.models.config import ModelConfig
from growlm.models.model import GPT
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
    logits = B * T * cfg.vocab_size * 4  # the plan adds the logits' gradient (allocated in backward, not saved)
    got = _saved_bytes(cfg, B, T)
    assert abs((full - logits) - got) <= 0.05 * got
    assert ckpt < full


def test_fsdp_shards_the_state_and_ddp_does_not():
    cfg = model_config(SCHEDULE_55M_7B[-1])
    d1, d8, f8 = plan(cfg, "ddp", 1), plan(cfg, "ddp", 8), plan(cfg, "fsdp", 8)
    assert 6.6e9 < d1.params < 6.8e9
    assert d8.weights + d8.grads + d8.adam == d1.weights + d1.grads + d1.adam == 16 * d1.params
    assert f8.weights + f8.grads + f8.adam == pytest.approx(16 * d1.params / 8)
    assert plan(cfg, "fsdp", 1).total == d1.total  # one process: nothing to shard, nothing to gather
    assert smallest_world(cfg, "ddp", 80 * GIB, True) is None  # 107 GB of state does not fit an 80 GB GPU
    n = smallest_world(cfg, "fsdp", 80 * GIB, True)
    assert n is not None and plan(cfg, "fsdp", n).total_ckpt <= 0.9 * 80 * GIB < plan(cfg, "fsdp", n // 2).total_ckpt
    assert smallest_world(model_config(SCHEDULE_55M_7B[0]), "ddp", 80 * GIB, False) == 1


def test_plan_cli(capsys):
    assert main(["plan", "--models", '["tiny-llama", "tiny-llama:n_layer=4"]', "--world", "2", "--device_gib", "1"]) == 0
    out = capsys.readouterr().out
    assert "L4 d32" in out and "fsdp x 2" in out
    assert main(["plan", "--models", '["no-such-preset"]']) == 2
    assert "unknown preset" in capsys.readouterr().err
