"""Chunked distillation losses (Objective.chunked_loss on growlm.models.head.chunked_head_terms): the same
values and gradients as the plain path on full logits, for every logits kind, dense and cached top-k teachers,
with padding / document masks and temperature scaling; never more than one chunk of logits at once; and a
distillation run with run.loss_chunk equal to one without."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from growlm.distill.objectives import LOGITS_KINDS, TEMPERATURE_POWER, Objective, ObjectiveConfig, logits_divergence, next_token_loss
from growlm.distill.targets import SparseTargets, teacher_topk
from growlm.errors import GrowlmError
from growlm.models.head import chunked_head_terms
from growlm.models.model import GPT
from tests.conftest import tiny_config
from tests.test_distill import distill_cfg, run, student_of, teacher_model
from tests.test_train import metrics

B, T = 3, 7  # 21 positions: chunks of 4 leave a remainder of 1


def models(tied: bool = True) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    teacher = GPT(tiny_config("llama", n_layer=3, n_embd=48, n_head=4, n_kv_head=2)).eval()
    student = GPT(tiny_config("llama", tie_embeddings=tied))  # other width and depth; same vocabulary (96)
    return student, teacher


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 96, (B, T), generator=g)
    y = torch.randint(0, 96, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False  # right padding
    mask[1, 0] = False  # a document boundary
    mask[2, 2:4] = False
    return x, y, mask


def grads(student: GPT, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    student.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def assert_same(plain, chunked, tol: float = 1e-6) -> None:
    (la, pa, ga), (lb, pb, gb) = plain, chunked
    torch.testing.assert_close(lb, la, atol=tol, rtol=tol)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=tol, rtol=tol)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=tol, rtol=tol, msg=k)


def plain_and_chunked(cfg: ObjectiveConfig, teacher_side: str, chunk: int = 4, tied: bool = True, k: int = 16):
    """(loss, parts, student grads) of forward() on full logits and of chunked_loss(), fp32, same batch."""
    student, teacher = models(tied)
    obj = Objective(cfg, student.config, teacher.config)
    x, y, mask = batch()
    with torch.no_grad():
        t_logits = teacher(x)
        sparse = SparseTargets(*teacher_topk(t_logits, k))
        t_side = {"sparse": sparse, "logits": t_logits, "hidden": (teacher.hidden(x), teacher.head_weight)}[teacher_side]
    out = []
    for c in (None, chunk):
        if c is None:
            loss, parts = obj(student(x), sparse if teacher_side == "sparse" else t_logits, y, mask)
        else:
            loss, parts = obj.chunked_loss(student.hidden(x), student.head_weight, t_side, y, mask, chunk_size=c)
        if "ce" not in parts:  # ce_weight 0: the chunked path still reports the CE (logged), as the trainer does
            with torch.no_grad():
                parts["ce"] = next_token_loss(student(x), y, mask)
        out.append((loss.detach(), parts, grads(student, loss)))
    return out


@pytest.mark.parametrize("kind", LOGITS_KINDS)
@pytest.mark.parametrize("teacher_side", ["hidden", "logits"])
def test_chunked_dense_kd_equals_the_plain_path(kind, teacher_side):
    cfg = ObjectiveConfig(logits=kind, temperature=2.0, beta=0.3, alpha=0.2, ce_weight=0.7, kd_weight=1.3)
    plain, chunked = plain_and_chunked(cfg, teacher_side)
    assert_same(plain, chunked)
    assert float(plain[1]["kd"]) > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("logits", ["forward_kl", "soft_ce"])
@pytest.mark.parametrize("tied", [True, False])
def test_chunked_sparse_kd_equals_the_plain_path(temperature, logits, tied):
    cfg = ObjectiveConfig(logits=logits, temperature=temperature, ce_weight=0.5, kd_weight=1.0)
    plain, chunked = plain_and_chunked(cfg, "sparse", tied=tied)
    assert_same(plain, chunked)


@pytest.mark.parametrize("chunk", [1, 5, 21, 1000, 0])
def test_chunk_sizes_pure_kd_and_ce_only(chunk):
    pure = ObjectiveConfig(ce_weight=0.0, kd_weight=1.0, temperature=1.5)
    plain, chunked = plain_and_chunked(pure, "sparse", chunk=chunk)
    assert_same(plain, chunked)
    ce_only = ObjectiveConfig(ce_weight=1.0, kd_weight=0.0)
    student, teacher = models()
    obj = Objective(ce_only, student.config, teacher.config)
    x, y, mask = batch()
    a, pa = obj(student(x), None, y, mask)
    b, pb = obj.chunked_loss(student.hidden(x), student.head_weight, None, y, mask, chunk_size=chunk)
    assert_same((a.detach(), pa, grads(student, a)), (b.detach(), pb, grads(student, b)))


def test_temperature_scaling_and_masked_garbage_in_the_chunked_path():
    """T^p times the divergence as documented, and NaN at excluded positions reaches neither value nor gradient."""
    student, teacher = models()
    x, y, mask = batch()
    with torch.no_grad():
        t_logits = teacher(x)
    t_logits[~mask] = float("nan")
    h = student.hidden(x).detach().requires_grad_()
    for kind in ("forward_kl", "tv", "mse"):
        vals = []
        for temp in (1.0, 3.0):
            obj = Objective(ObjectiveConfig(logits=kind, temperature=temp, ce_weight=0.0), student.config, teacher.config)
            loss, parts = obj.chunked_loss(h, student.head_weight, t_logits, y, mask, chunk_size=4)
            assert torch.isfinite(loss)
            vals.append(float(parts["kd"]))
            if temp == 3.0:
                h.grad = None
                loss.backward()
                assert torch.isfinite(h.grad).all() and float(h.grad[~mask].abs().max()) == 0.0
        z = F.linear(h.detach(), student.head_weight.detach())
        d = logits_divergence(z[mask], t_logits[mask], kind, 3.0).mean()
        assert vals[1] == pytest.approx(3.0 ** TEMPERATURE_POWER[kind] * float(d), rel=1e-5)


def test_never_more_than_one_chunk_of_logits():
    torch.manual_seed(0)
    h = torch.randn(23, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    y = torch.randint(0, 50, (23,))
    seen = []

    def row_terms(z, s, e):
        seen.append((z.shape[0], s, e))
        return torch.stack([F.cross_entropy(z, y[s:e], reduction="sum") / 23, z.square().sum() / 1000])

    total, terms = chunked_head_terms(h, w, row_terms, (1.0, 0.5), chunk_size=5)
    assert max(n for n, _, _ in seen) == 5 and [s for _, s, _ in seen] == [0, 5, 10, 15, 20] and seen[-1][2] == 23
    assert not terms.requires_grad
    gh, gw = torch.autograd.grad(total, (h, w))
    z = F.linear(h, w)
    ref = F.cross_entropy(z, y) + 0.5 * z.square().sum() / 1000
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(total, ref.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gh, rh, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # evaluation: the forward alone, same value
        v, _ = chunked_head_terms(h, w, row_terms, (1.0, 0.5), chunk_size=5)
    torch.testing.assert_close(v, ref.detach(), atol=1e-6, rtol=1e-6)


def test_chunked_loss_refuses_hidden_terms_and_bad_masks():
    student, teacher = models()
    x, y, mask = batch()
    obj = Objective(ObjectiveConfig(hidden_weight=1.0), student.config, teacher.config)
    with pytest.raises(GrowlmError, match="hidden-state and attention terms need forward"):
        obj.chunked_loss(student.hidden(x), student.head_weight, None, y, mask)
    obj = Objective(ObjectiveConfig(), student.config, teacher.config)
    with pytest.raises(GrowlmError, match="mask of shape"):
        obj.chunked_loss(student.hidden(x), student.head_weight, teacher(x), y, mask[:, :3])
    with pytest.raises(GrowlmError, match="teacher's outputs"):
        obj.chunked_loss(student.hidden(x), student.head_weight, None, y, mask)


@pytest.mark.parametrize("targets", ["online", "cached"])
def test_distillation_run_with_loss_chunk_equals_one_without(tmp_path, targets, monkeypatch):
    """The Trainer's distillation step through the chunked path (run.loss_chunk 5) follows the plain one (0)."""
    calls = []
    real = Objective.chunked_loss
    monkeypatch.setattr(Objective, "chunked_loss", lambda self, *a, **kw: calls.append(kw["chunk_size"]) or real(self, *a, **kw))
    t = teacher_model()
    s = student_of(t)
    obj = ObjectiveConfig(ce_weight=0.5, kd_weight=1.0, temperature=2.0)
    out = {}
    for chunk in (0, 5):
        cfg = distill_cfg(tmp_path, f"c{chunk}", objective=obj, targets=targets, top_k=16)
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, loss_chunk=chunk, compile=False))
        run(cfg, s, t)
        out[chunk] = metrics(tmp_path / f"c{chunk}" / "metrics.jsonl")
    steps = 0
    for ra, rb in zip(out[0], out[5]):
        for k in ("loss", "kd", "val_loss", "grad_norm"):
            if ra.get(k) is not None:
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (k, ra["step"])
                steps += k == "kd"
    assert steps == 6 and calls == [5] * 6  # six training steps through the chunked path, none with loss_chunk 0


def test_chunked_head_terms_under_bf16_autocast():
    """bf16 autocast: the chunk's logits from a bf16 matmul, as F.linear under autocast, the terms in float32."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(30, 32, generator=g, requires_grad=True)
    w = (torch.randn(90, 32, generator=g) * 0.3).requires_grad_()
    zt = torch.randn(30, 90, generator=g)

    def row_terms(z, s, e):
        assert z.dtype == torch.float32
        return (F.log_softmax(zt[s:e], -1).exp() * (F.log_softmax(zt[s:e], -1) - F.log_softmax(z, -1))).sum().unsqueeze(0) / 30

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = chunked_head_terms(h, w, row_terms, (1.0,), chunk_size=0)
        got, _ = chunked_head_terms(h, w, row_terms, (1.0,), chunk_size=7)
    rg = torch.autograd.grad(ref, (h, w))
    gg = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)  # the same bf16 logits, fp32 loss
    for r, o in zip(rg, gg):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o, r, atol=2e-3, rtol=2e-2)  # bf16 gradient matmuls, summed in another order
    fp32, _ = chunked_head_terms(h, w, row_terms, (1.0,), chunk_size=7)
    assert (got - fp32).abs() > 1e-6  # the check above would fail if autocast were ignored
