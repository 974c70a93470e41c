import pytest
import torch

from growlm.models.config import ModelConfig
from growlm.models.model import GPT, KVCache, sample_next
from tests.conftest import tiny_config


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_matches_full_forward(family):
    m = GPT(tiny_config(family)).eval()
    x = torch.randint(0, 96, (3, 14))
    full = m(x)
    cache = KVCache()
    parts = [m(x[:, :5], cache=cache), m(x[:, 5:6], cache=cache), m(x[:, 6:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    assert cache.length == 14


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_greedy_generation_equals_uncached(family):
    m = GPT(tiny_config(family, init_std=0.2)).eval()
    x = torch.randint(0, 96, (2, 4))
    a = m.generate(x, 20, use_cache=True)
    b = m.generate(x, 20, use_cache=False)
    assert a.shape == (2, 24)
    assert torch.equal(a, b)
    assert len(set(a[0, 4:].tolist())) > 1  # not a degenerate constant sequence


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    # top_p: p(3)=0.64 alone reaches 0.5
    draws = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(100)}
    assert draws == {3}


def test_param_count_counts_tied_head_once():
    cfg = tiny_config("gpt2")
    m = GPT(cfg)
    d, L, V, T, F = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size, cfg.ffn_size
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * F + F) + (F * d + d)
    assert m.num_params() == V * d + T * d + L * per_block + 2 * d
    untied = GPT(cfg.replace(tie_embeddings=False))
    assert untied.num_params() == m.num_params() + V * d


def test_bf16_autocast_close_to_fp32():
    m = GPT(tiny_config("llama")).eval()
    x = torch.randint(0, 96, (2, 16))
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_context_length_enforced():
    m = GPT(tiny_config("gpt2", block_size=8))
    with pytest.raises(ValueError, match="context length"):
        m(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    "changes, msg",
    [
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(n_head=4, n_kv_head=3), "must divide"),
        (dict(norm="batchnorm"), "norm must be"),
        (dict(position="rope", head_dim=7, n_head=4, n_embd=28), "even head_dim"),
        (dict(n_layer=0), "positive"),
    ],
)
def test_config_validation(changes, msg):
    base = dict(vocab_size=96, block_size=16, n_layer=2, n_embd=32, n_head=4)
    with pytest.raises(ValueError, match=msg):
        ModelConfig(**{**base, **changes})


def test_config_roundtrip_and_unknown_keys(tmp_path):
    cfg = tiny_config("llama")
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown model config keys: bogus"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_from_state_dict_builds_the_same_model_without_init():
    for family in ("tiny-llama", "tiny-gpt2"):
        m = GPT(ModelConfig.from_preset(family))
        m2 = GPT.from_state_dict(m.config, m.state_dict())
        x = torch.randint(0, 96, (2, 8))
        assert torch.equal(m(x), m2(x))
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hidden_is_forward_without_the_head(family):
    m = GPT(tiny_config(family, tie_embeddings=family == "gpt2")).eval()
    x = torch.randint(0, 96, (2, 12))
    h = m.hidden(x)
    assert h.shape == (2, 12, m.config.n_embd)
    assert torch.equal(torch.nn.functional.linear(h, m.head_weight), m(x))
    out = m(x, output_hidden_states=True)
    assert torch.equal(out.logits, m(x)) and len(out.hidden_states) == m.config.n_layer + 1
    assert torch.equal(out.hidden_states[0], m.wte(x) + (m.wpe(torch.arange(12)) if m.wpe is not None else 0))
    assert torch.equal(m.norm_f(out.hidden_states[-1]), h)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_explicit_positions_and_causal_mask_equal_the_defaults(family):
    m = GPT(tiny_config(family, init_std=0.2)).eval()  # large weights: attention patterns matter
    x = torch.randint(0, 96, (2, 10))
    ref = m(x)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    torch.testing.assert_close(m(x, pos=torch.arange(10)), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(m(x, pos=torch.arange(10).expand(2, 10)), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(m(x, mask=causal), ref, atol=1e-6, rtol=0)
    # positions matter: spreading them changes the output (RoPE sees only differences, so not a shift)
    assert (m(x, pos=2 * torch.arange(10)) - ref).abs().max() > 1e-3
    # a mask without the causal part lets early tokens see later ones
    assert (m(x, mask=torch.ones(10, 10, dtype=torch.bool))[:, 0] - ref[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_row_equals_each_sequence_alone(family):
    """[context | a | b] with a block mask and positions restarting after the context == ctx+a and ctx+b alone."""
    m = GPT(tiny_config(family, n_kv_head=2, init_std=0.2)).eval()
    ctx, a, b = torch.randint(0, 96, (5,)), torch.randint(0, 96, (4,)), torch.randint(0, 96, (3,))
    row = torch.cat((ctx, a, b))[None]  # (1, 12)
    pos = torch.cat((torch.arange(5), torch.arange(5, 9), torch.arange(5, 8)))[None]
    seg = torch.tensor([-1] * 5 + [0] * 4 + [1] * 3)
    mask = ((seg[None, :] == -1) | (seg[None, :] == seg[:, None])) & torch.ones(12, 12, dtype=torch.bool).tril()
    packed = m(row, pos=pos, mask=mask[None, None])[0]
    alone_a, alone_b = m(torch.cat((ctx, a))[None])[0], m(torch.cat((ctx, b))[None])[0]
    torch.testing.assert_close(packed[:9], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[9:], alone_b[5:], atol=1e-5, rtol=0)


def test_cache_with_explicit_mask_and_positions():
    m = GPT(tiny_config("llama")).eval()
    x = torch.randint(0, 96, (1, 9))
    ref = m(x)
    cache = KVCache()
    first = m(x[:, :4], cache=cache)
    # the next 5 tokens against 4 cached keys: explicit (T, S) causal mask and positions 4..8
    mask = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=4)
    rest = m(x[:, 4:], pos=torch.arange(4, 9), mask=mask, cache=cache)
    torch.testing.assert_close(torch.cat((first, rest), 1), ref, atol=1e-5, rtol=0)


def test_positions_beyond_the_context_are_rejected():
    m = GPT(tiny_config("gpt2", block_size=8))
    with pytest.raises(ValueError, match="context length"):
        m(torch.zeros(1, 3, dtype=torch.long), pos=torch.tensor([0, 1, 8]))
    # a packed row may be longer than the context when its positions are not
    assert m(torch.zeros(1, 12, dtype=torch.long), pos=torch.arange(12) % 6).shape == (1, 12, 96)


def _perturbed(family: str, dtype=torch.float32) -> GPT:
    torch.manual_seed(0)
    m = GPT(tiny_config(family)).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))  # norm weights away from 1, biases away from 0
    return m


def _loss_and_grads(m: GPT, x: torch.Tensor):
    m.zero_grad(set_to_none=True)
    loss = m(x, targets=x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("frozen", [(), ("norm", "mlp.down")])
def test_memory_lean_norm_and_mlp_equal_the_plain_expressions(monkeypatch, family, dtype, frozen):
    """RMSNorm and the MLP's activation + down projection keep only their inputs for the backward; loss and every
    gradient equal autograd on the plain expressions, also with those weights frozen (the main job's base)."""
    from growlm.models import model as M

    m = _perturbed(family, dtype)
    for n, p in m.named_parameters():
        p.requires_grad_(not any(f in n for f in frozen))
    x = torch.randint(0, 96, (2, 12))
    loss, grads = _loss_and_grads(m, x)
    monkeypatch.setattr(M, "_lean", lambda *a: False)
    ref_loss, ref_grads = _loss_and_grads(m, x)
    assert torch.equal(loss, ref_loss)  # the forward is the same expression
    assert grads.keys() == ref_grads.keys()
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=tol * ref_grads[n].abs().max().item(), rtol=0, msg=n)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_memory_lean_path_keeps_fewer_activations(monkeypatch, family):
    """Per token and layer the lean path keeps 2 * n_embd (the two normalised inputs) + 2 * ffn_size (silu(g) and
    its product with u) fewer floats (SwiGLU + RMSNorm), ffn_size fewer (GELU's output; LayerNorm is native)."""
    from growlm.models import model as M

    m = _perturbed(family)
    cfg = m.config
    x = torch.randint(0, 96, (2, 12))
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}

    def kept_bytes() -> int:
        seen: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x, targets=x)
        return sum(seen.values())

    lean = kept_bytes()
    monkeypatch.setattr(M, "_lean", lambda *a: False)
    plain = kept_bytes()
    per_layer = 2 * cfg.n_embd + 2 * cfg.ffn_size if family == "llama" else cfg.ffn_size
    final_norm = cfg.n_embd if family == "llama" else 0
    assert plain - lean == (cfg.n_layer * per_layer + final_norm) * x.numel() * 4


def test_memory_lean_path_under_torch_func_per_sample_gradients():
    """EWC's Fisher takes per-sample gradients with torch.func (vmap over grad): the lean Functions compose."""
    from torch.func import functional_call, grad, vmap

    m = _perturbed("llama")
    x = torch.randint(0, 96, (3, 8))
    params = {n: p.detach() for n, p in m.named_parameters()}

    def loss_one(p, xi):
        return functional_call(m, (p,), (xi[None],), {"targets": xi[None]})

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA's vmap fallback
        per_sample = vmap(grad(loss_one), in_dims=(None, 0))(params, x)
    for i in range(3):
        m.zero_grad(set_to_none=True)
        m(x[i : i + 1], targets=x[i : i + 1]).backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(per_sample[n][i], p.grad, atol=1e-6, rtol=1e-4, msg=n)
