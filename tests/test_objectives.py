"""Distillation objectives (growlm.distill.objectives): loss properties, masks, layer maps, projectors,
attention maps from the model's explicit path, and the KD-from-snapshot path unchanged."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from growlm.distill.objectives import (
    LOGITS_KINDS,
    TEMPERATURE_POWER,
    Objective,
    ObjectiveConfig,
    attention_loss,
    group_heads,
    hidden_loss,
    layer_map,
    logits_loss,
    make_projector,
    next_token_loss,
)
from growlm.errors import GrowlmError
from growlm.models.model import GPT
from growlm.train.regularize import kd_loss

from tests.conftest import tiny_config

D = torch.float64


def _logits(*shape, scale=3.0):
    return scale * torch.randn(*shape, dtype=D)


def _kl(p, q):  # direct KL(p || q) over the last dim from probabilities
    return (p * (p.log() - q.log())).sum(-1)


# -- identical inputs give 0 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LOGITS_KINDS)
def test_identical_logits_give_zero_and_zero_gradient(kind):
    z = _logits(2, 5, 11)
    s = z.clone().requires_grad_()
    loss = logits_loss(s, z, kind, temperature=2.0, beta=0.3, alpha=0.2)
    loss.backward()
    if kind == "soft_ce":  # H(p_t, p_t) = H(p_t): the minimum, not 0 (the one kind that keeps the teacher entropy)
        p = (z / 2).softmax(-1)
        want = 4.0 * -(p * p.log()).sum(-1).mean()
        torch.testing.assert_close(loss.detach(), want, rtol=1e-12, atol=0)
    else:
        assert abs(float(loss.detach())) < 1e-12, kind
    assert float(s.grad.abs().max()) < 1e-12, kind  # a minimum for every kind


def test_identical_hidden_and_attention_give_zero():
    h = torch.randn(2, 5, 8, dtype=D)
    for kind in ("mse", "cosine"):
        assert abs(float(hidden_loss(h, h.clone(), kind))) < 1e-12
    p = torch.randn(2, 3, 5, 5, dtype=D).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -math.inf).softmax(-1)
    for kind in ("kl", "mse"):
        assert float(attention_loss(p, p.clone(), kind)) == 0.0
    # and the whole Objective on one model against itself, every term on
    model = GPT(tiny_config("llama")).double()
    cfg = ObjectiveConfig(ce_weight=0.0, kd_weight=1.0, hidden_weight=1.0, attn_weight=1.0, attn_layers="uniform",
                          projector="identity", hidden_norm=True)
    obj = Objective(cfg, model.config, model.config)
    x = torch.randint(0, 96, (2, 9))
    out = model(x, output_hidden_states=True, attention_layers=obj.student_attention_layers)
    loss, parts = obj(out, out)
    assert set(parts) == {"kd", "hidden", "attn"} and abs(float(loss.detach())) < 1e-12


# -- limits and formulas -------------------------------------------------------------------------------------
def test_jsd_limits_are_forward_and_reverse_kl():
    zs, zt, T = _logits(2, 4, 13), _logits(2, 4, 13), 1.5
    ps, pt = (zs / T).softmax(-1), (zt / T).softmax(-1)
    fkl, rkl = T**2 * _kl(pt, ps).mean(), T**2 * _kl(ps, pt).mean()
    torch.testing.assert_close(logits_loss(zs, zt, "jsd", T, beta=0.0), fkl, rtol=1e-12, atol=0)
    torch.testing.assert_close(logits_loss(zs, zt, "jsd", T, beta=1.0), rkl, rtol=1e-12, atol=0)
    torch.testing.assert_close(logits_loss(zs, zt, "forward_kl", T), fkl, rtol=1e-12, atol=0)
    torch.testing.assert_close(logits_loss(zs, zt, "reverse_kl", T), rkl, rtol=1e-12, atol=0)
    # continuous at the ends: the divergence is divided by beta (1 - beta), so the limits are the KLs
    torch.testing.assert_close(logits_loss(zs, zt, "jsd", T, beta=1e-6), fkl, rtol=1e-4, atol=0)
    torch.testing.assert_close(logits_loss(zs, zt, "jsd", T, beta=1 - 1e-6), rkl, rtol=1e-4, atol=0)
    # and in between it is GKD's eq. 1 over beta (1 - beta)
    b = 0.3
    m = b * pt + (1 - b) * ps
    want = T**2 * ((b * _kl(pt, m) + (1 - b) * _kl(ps, m)) / (b * (1 - b))).mean()
    torch.testing.assert_close(logits_loss(zs, zt, "jsd", T, beta=b), want, rtol=1e-12, atol=0)


def test_skew_tv_mse_soft_ce_formulas():
    zs, zt, T, a = _logits(3, 2, 7), _logits(3, 2, 7), 2.0, 0.25
    ps, pt = (zs / T).softmax(-1), (zt / T).softmax(-1)
    cases = {
        "skew_kl": T**2 * _kl(pt, a * pt + (1 - a) * ps).mean(),
        "skew_reverse_kl": T**2 * _kl(ps, a * ps + (1 - a) * pt).mean(),
        "tv": T * 0.5 * (pt - ps).abs().sum(-1).mean(),
        "mse": ((zs - zt) ** 2).mean(),
        "soft_ce": T**2 * -(pt * ps.log()).sum(-1).mean(),
    }
    for kind, want in cases.items():
        torch.testing.assert_close(logits_loss(zs, zt, kind, T, alpha=a), want, rtol=1e-12, atol=0, msg=kind)
    torch.testing.assert_close(logits_loss(zs, zt, "skew_kl", T, alpha=0.0), logits_loss(zs, zt, "forward_kl", T))
    torch.testing.assert_close(logits_loss(zs, zt, "skew_reverse_kl", T, alpha=0.0), logits_loss(zs, zt, "reverse_kl", T))


@pytest.mark.parametrize("kind", LOGITS_KINDS)
def test_temperature_scaling_is_as_documented(kind):
    """loss(z, T) = T^p * divergence(softmax(z/T)) with p = TEMPERATURE_POWER[kind] (mse ignores T)."""
    zs, zt, T = _logits(2, 3, 9), _logits(2, 3, 9), 4.0
    at_t = logits_loss(zs, zt, kind, T, beta=0.4, alpha=0.2)
    scaled_inputs = (zs, zt) if kind == "mse" else (zs / T, zt / T)
    at_1 = logits_loss(*scaled_inputs, kind, 1.0, beta=0.4, alpha=0.2)
    torch.testing.assert_close(at_t, T ** TEMPERATURE_POWER[kind] * at_1, rtol=1e-12, atol=0)


def test_t2_scaled_kl_gradient_and_high_temperature_limit():
    """Hinton et al. 2015, sec. 2: d(T^2 KL)/dz_s = T (p_s - p_t) per position, and at high T the
    T^2-scaled KL tends to logit matching, (1/2V) sum (dz - mean dz)^2: the T^2 keeps it O(1)."""
    zs, zt, T = _logits(2, 3, 9), _logits(2, 3, 9), 3.0
    s = zs.clone().requires_grad_()
    logits_loss(s, zt, "forward_kl", T).backward()
    want = T * ((zs / T).softmax(-1) - (zt / T).softmax(-1)) / 6  # 6 positions averaged
    torch.testing.assert_close(s.grad, want, rtol=1e-10, atol=1e-14)
    dz = zs - zt
    limit = ((dz - dz.mean(-1, keepdim=True)) ** 2).mean(-1).mean() / 2
    torch.testing.assert_close(logits_loss(zs, zt, "forward_kl", 1e3), limit, rtol=1e-2, atol=0)
    assert float(logits_loss(zs, zt, "forward_kl", 1e3)) > 0.5 * float(limit)


def test_student_vocab_restricted_to_teacher_and_dtypes():
    zs, zt = _logits(2, 3, 12), _logits(2, 3, 9)
    torch.testing.assert_close(logits_loss(zs, zt, "jsd"), logits_loss(zs[..., :9], zt, "jsd"), rtol=0, atol=0)
    assert logits_loss(zs, zt).dtype == torch.float64
    assert logits_loss(zs.half(), zt.bfloat16()).dtype == torch.float32
    with pytest.raises(GrowlmError, match="fewer than the teacher"):
        logits_loss(zt, zs)


# -- KD from the snapshot: the same numbers as before ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kd_from_snapshot_same_numbers_as_before(dtype):
    """The formula regularize.kd_loss had before it moved here, computed inline (student restricted to the
    teacher's vocabulary, float32 as before)."""
    s, t, T = 3 * torch.randn(3, 6, 20, dtype=dtype), 3 * torch.randn(3, 6, 17, dtype=dtype), 2.0
    ls, lt = F.log_softmax(s[..., :17].float() / T, -1), F.log_softmax(t.float() / T, -1)
    old = T**2 * (lt.exp() * (lt - ls)).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, T).float(), old, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(logits_loss(s, t, "forward_kl", T).float(), old, rtol=1e-7, atol=1e-7)


# -- padding and masks ---------------------------------------------------------------------------------------
def _pad(x, n, garbage):
    """x (B, T, ...) with n extra positions of garbage appended on dim 1."""
    return torch.cat((x, garbage(x.shape[0], n, *x.shape[2:]).to(x.dtype)), dim=1)


@pytest.mark.parametrize("kind", LOGITS_KINDS)
def test_padded_logits_same_loss_and_gradient(kind):
    zs, zt = _logits(2, 4, 9), _logits(2, 4, 9)

    def nan_garbage(*shape):
        g = 1e4 * torch.randn(*shape)
        g[..., 0] = math.nan
        return g

    ps, pt = _pad(zs, 3, nan_garbage), _pad(zt, 3, nan_garbage)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, :4] = True
    a, b = zs.clone().requires_grad_(), ps.clone().requires_grad_()
    la, lb = logits_loss(a, zt, kind, 2.0, mask=None), logits_loss(b, pt, kind, 2.0, mask=mask)
    torch.testing.assert_close(lb, la, rtol=1e-12, atol=0)
    la.backward(), lb.backward()
    torch.testing.assert_close(b.grad[:, :4], a.grad, rtol=1e-12, atol=0)
    assert float(b.grad[:, 4:].abs().max()) == 0.0
    # ragged rows: the mask-weighted mean over every counted position, not a mean of row means
    mask2 = mask.clone()
    mask2[1, 2:] = False
    want = logits_loss(torch.cat((zs[0], zs[1, :2]))[None], torch.cat((zt[0], zt[1, :2]))[None], kind, 2.0)
    torch.testing.assert_close(logits_loss(ps, pt, kind, 2.0, mask=mask2), want, rtol=1e-12, atol=0)
    assert float(logits_loss(ps, pt, kind, mask=torch.zeros_like(mask))) == 0.0  # nothing counts: 0, not NaN


def test_padded_batch_same_loss_every_term():
    """Right-padded rows (random tokens after the real ones, masked out): every term of the Objective,
    with real models (causal: real positions never see padding), equals the unpadded batch."""
    student = GPT(tiny_config("llama")).double()
    teacher = GPT(tiny_config("llama", n_layer=4, n_embd=48, n_head=8, n_kv_head=4)).double()
    for hidden_loss_kind, attn_kind in (("mse", "kl"), ("cosine", "mse")):
        cfg = ObjectiveConfig(logits="jsd", temperature=2.0, ce_weight=1.0, kd_weight=1.0, hidden_weight=1.0,
                              attn_weight=1.0, hidden_loss=hidden_loss_kind, attn_loss=attn_kind, hidden_layers="uniform",
                              attn_layers=[[0, 1], [1, 3]], projector="orthogonal", hidden_norm=True)
        obj = Objective(cfg, student.config, teacher.config).double()
        x = torch.randint(0, 96, (2, 7))
        y = torch.randint(0, 96, (2, 7))
        xp = torch.cat((x, torch.randint(0, 96, (2, 4))), 1)
        yp = torch.cat((y, torch.randint(0, 96, (2, 4))), 1)
        mask = torch.arange(11)[None, :].expand(2, -1) < 7

        def run(inp, tgt, m):
            so = student(inp, output_hidden_states=True, attention_layers=obj.student_attention_layers)
            with torch.no_grad():
                to = teacher(inp, output_hidden_states=True, attention_layers=obj.teacher_attention_layers)
            return obj(so, to, tgt, m)

        loss, parts = run(x, y, None)
        loss_p, parts_p = run(xp, yp, mask)
        assert set(parts) == {"ce", "kd", "hidden", "attn"}
        for k in parts:
            torch.testing.assert_close(parts_p[k], parts[k], rtol=1e-10, atol=1e-14, msg=k)
            assert float(parts[k]) > 0, k  # not a vacuous equality
        torch.testing.assert_close(loss_p, loss, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(loss, sum(parts.values()), rtol=1e-12, atol=0)


def test_padded_attention_maps_same_loss():
    """Padding keys (zero in both maps) and garbage padding queries change nothing."""
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    ps = torch.randn(2, 3, 5, 5, dtype=D).masked_fill(~causal, -math.inf).softmax(-1)
    pt = torch.randn(2, 3, 5, 5, dtype=D).masked_fill(~causal, -math.inf).softmax(-1)

    def pad(p):
        out = torch.rand(2, 3, 8, 8, dtype=D)  # garbage rows for padding queries
        out[:, :, :5, :] = 0
        out[:, :, :5, :5] = p
        return out

    mask = torch.arange(8)[None, :].expand(2, -1) < 5
    for kind in ("kl", "mse"):
        torch.testing.assert_close(attention_loss(pad(ps), pad(pt), kind, mask), attention_loss(ps, pt, kind),
                                   rtol=1e-12, atol=0)
        assert float(attention_loss(ps, pt, kind)) > 0


def test_next_token_loss_is_cross_entropy_on_counted_positions():
    z, y = _logits(2, 5, 10), torch.randint(0, 10, (2, 5))
    torch.testing.assert_close(next_token_loss(z, y), F.cross_entropy(z.reshape(-1, 10), y.reshape(-1)))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(next_token_loss(z, y, mask), F.cross_entropy(z[mask], y[mask]))


# -- layer maps ----------------------------------------------------------------------------------------------
def test_layer_map_specs():
    assert layer_map(6, 12, "last") == [(5, 11)]
    assert layer_map(6, 12, "uniform") == [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]
    assert layer_map(10, 30, "uniform") == [(i, 3 * i + 2) for i in range(10)]
    assert layer_map(3, 4, "uniform") == [(0, 1), (1, 2), (2, 3)]
    assert layer_map(4, 2, "uniform") == [(0, 0), (1, 0), (2, 1), (3, 1)]  # a deeper student: no index -1
    assert layer_map(6, 12, "every-2") == [(1, 3), (3, 7), (5, 11)]
    assert layer_map(6, 12, "every-1") == layer_map(6, 12, "uniform")
    assert layer_map(6, 12, [[0, 0], [5, 11]]) == [(0, 0), (5, 11)]


@pytest.mark.parametrize("spec, match", [
    ([[0, 12]], "teacher layer 12 does not exist"),
    ([[6, 0]], "student layer 6 does not exist"),
    ([[-1, 0]], "student layer -1 does not exist"),
    ([[0, 1, 2]], "two integers"),
    ([], "non-empty list"),
    ([[0, True]], "two integers"),
    ("every-7", "only 6 layers"),
    ("every-0", "expected 'last'"),
    ("middle", "expected 'last'"),
])
def test_layer_map_errors(spec, match):
    with pytest.raises(GrowlmError, match=match):
        layer_map(6, 12, spec)


def test_config_validation_one_line_errors():
    bad = [dict(logits="kl"), dict(temperature=0.0), dict(beta=1.5), dict(alpha=1.0), dict(kd_weight=-1.0),
           dict(ce_weight=0.0, kd_weight=0.0), dict(hidden_loss="l1"), dict(projector="random"), dict(attn_loss="js"),
           dict(hidden_layers="every-x"), dict(attn_layers=[[0]]), dict(attn_heads=[0, 0])]
    for kw in bad:
        with pytest.raises(GrowlmError) as e:
            ObjectiveConfig(**kw)
        assert "\n" not in str(e.value), kw
    small, big = tiny_config("llama"), tiny_config("llama", n_layer=4, n_embd=48, n_head=6, n_kv_head=2)
    with pytest.raises(GrowlmError, match="teacher layer 9 does not exist"):
        Objective(ObjectiveConfig(hidden_weight=1.0, hidden_layers=[[0, 9]]), small, big)
    with pytest.raises(GrowlmError, match="equal widths"):
        Objective(ObjectiveConfig(hidden_weight=1.0, projector="identity"), small, big)
    with pytest.raises(GrowlmError, match="6 heads do not split"):
        Objective(ObjectiveConfig(attn_weight=1.0), small, big)
    with pytest.raises(GrowlmError, match="head 4 does not exist"):
        Objective(ObjectiveConfig(attn_weight=1.0, attn_heads=[4]), small, small)
    with pytest.raises(GrowlmError, match="vocabulary"):
        Objective(ObjectiveConfig(), small, tiny_config("llama", vocab_size=200))


# -- projectors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_student, d_teacher", [(16, 24), (24, 16), (16, 16)])
def test_orthogonal_projector_stays_orthogonal_after_training(d_student, d_teacher):
    proj = make_projector("orthogonal", d_student, d_teacher)
    w0 = proj.weight.detach().clone()
    opt = torch.optim.AdamW(proj.parameters(), lr=1e-2, weight_decay=0.1)  # decay as growlm's optimizer has it
    hs, ht = torch.randn(4, 6, d_student), torch.randn(4, 6, d_teacher)
    losses = []
    for _ in range(20):
        loss = hidden_loss(proj(hs), ht, "mse")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    w = proj.weight.detach()
    assert not torch.allclose(w, w0, atol=1e-3) and losses[-1] < losses[0]  # it did train
    gram = w @ w.T if d_teacher <= d_student else w.T @ w  # the smaller side
    torch.testing.assert_close(gram, torch.eye(min(d_student, d_teacher)), rtol=0, atol=1e-5)
    fresh = make_projector("orthogonal", d_student, d_teacher)  # a checkpoint round trip keeps the trained map
    fresh.load_state_dict(proj.state_dict())
    torch.testing.assert_close(fresh.weight, w, rtol=0, atol=1e-6)


def test_linear_and_identity_projectors():
    assert torch.equal(make_projector("linear", 4, 6).weight, torch.eye(6, 4))
    h = torch.randn(2, 3, 5)
    assert torch.equal(make_projector("identity", 5, 5)(h), h)


def test_objective_parts_weights_and_projector_gradients():
    student, teacher = GPT(tiny_config("llama")), GPT(tiny_config("llama", n_layer=4, n_embd=48, n_head=8, n_kv_head=4))
    cfg = ObjectiveConfig(ce_weight=0.5, kd_weight=2.0, hidden_weight=3.0, attn_weight=4.0, projector="linear")
    obj = Objective(cfg, student.config, teacher.config)
    assert obj.hidden_pairs == [(0, 1), (1, 3)] and obj.attn_pairs == [(1, 3)] and len(obj.projectors) == 2
    assert obj.student_attention_layers == (1,) and obj.teacher_attention_layers == (3,) and obj.needs_hidden_states
    x, y = torch.randint(0, 96, (2, 8)), torch.randint(0, 96, (2, 8))
    so = student(x, output_hidden_states=True, attention_layers=obj.student_attention_layers)
    to = teacher(x, output_hidden_states=True, attention_layers=obj.teacher_attention_layers)
    loss, parts = obj(so, to, y)
    want = 0.5 * parts["ce"] + 2.0 * parts["kd"] + 3.0 * parts["hidden"] + 4.0 * parts["attn"]
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(parts["ce"], F.cross_entropy(so.logits.reshape(-1, 96), y.reshape(-1)))
    torch.testing.assert_close(parts["attn"], attention_loss(so.attentions[1], group_heads(to.attentions[3], 4)))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.parameters())
    assert all(p.grad is None for p in teacher.parameters())  # the teacher side is detached
    with pytest.raises(GrowlmError, match="attention maps of student layer 1"):
        obj(so, teacher(x, output_hidden_states=True), y)


# -- attention maps from the model ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_explicit_attention_path(family):
    """Rows sum to 1, causal zeros, and the explicit layers give the SDPA path's outputs (fp64, 1e-10)."""
    model = GPT(tiny_config(family, n_layer=3)).double()
    x = torch.randint(0, 96, (2, 10))
    ref = model(x, output_hidden_states=True)
    out = model(x, output_hidden_states=True, attention_layers=[0, 2])
    assert sorted(out.attentions) == [0, 2] and ref.attentions is None
    for p in (a.detach() for a in out.attentions.values()):
        assert p.shape == (2, model.config.n_head, 10, 10)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, model.config.n_head, 10, dtype=D), rtol=0, atol=1e-12)
        assert float(p.masked_select(~torch.ones(10, 10, dtype=torch.bool).tril()).abs().max()) == 0.0
        assert float(p.masked_select(torch.ones(10, 10, dtype=torch.bool).tril()).min()) > 0
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-10)
    # an explicit boolean mask (packed rows) takes the same path
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    mask[5:, :5] = False
    pos = torch.cat((torch.arange(5), torch.arange(5)))
    got = model(x, pos=pos, mask=mask, attention_layers=[1])
    torch.testing.assert_close(got.logits, model(x, pos=pos, mask=mask), rtol=0, atol=1e-10)
    assert float(got.attentions[1].detach()[..., 5:, :5].abs().max()) == 0.0
    assert torch.equal(model(x, attention_layers=[1]).attentions[1], got.attentions[1]) is False  # the mask mattered
    with pytest.raises(ValueError, match="attention layer 3 is out of range"):
        model(x, attention_layers=[3])


def test_group_heads_average_consecutive_teacher_heads():
    p = torch.rand(1, 6, 2, 3)
    g = group_heads(p, 2)
    torch.testing.assert_close(g[:, 0], p[:, :3].mean(1))
    torch.testing.assert_close(g[:, 1], p[:, 3:].mean(1))
    with pytest.raises(GrowlmError, match="do not split"):
        group_heads(p, 4)
