"""Cached teacher targets: exact at k = V, within the derived bound at k < V, reused, refused when stale."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from growlm.distill.objectives import sparse_kd_gap_bound, sparse_kd_loss
from growlm.distill.targets import (
    build_targets,
    open_targets,
    targets_fingerprint,
    teacher_fingerprint,
    teacher_topk,
)
from growlm.errors import GrowlmError
from growlm.models.model import GPT
from growlm.train.data import ByteTokenizer, DataConfig, PackedData, prepare_data, stack_blocks
from tests.conftest import tiny_config

V, T = 257, 16  # byte vocabulary: larger than k = 64


def packed(n_blocks: int = 6, seed: int = 0, key: str = "d0-tok0") -> PackedData:
    rng = np.random.default_rng(seed)
    n = n_blocks * T + 1
    stream = np.where(rng.random(n) < 0.6, np.arange(n) % 23, rng.integers(0, V, n)).astype(np.uint16)
    return PackedData(stream, stream[:T + 1].copy(), key, 1, 1, V)


def model(seed: int, head_scale: float = 1.0) -> GPT:
    """A tiny Llama; head_scale > 1 makes it peaked, like a trained teacher (most mass in a few tokens)."""
    torch.manual_seed(seed)
    m = GPT(tiny_config("llama", vocab_size=V, block_size=32)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(head_scale)
    return m


def dense_forward_kl(student_logits, teacher_logits, temperature=1.0, mask=None):
    log_p = (teacher_logits.float() / temperature).log_softmax(-1)
    log_q = (student_logits.float() / temperature).log_softmax(-1)
    per = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is not None:
        per = (per * mask).sum() / mask.sum()
    return temperature**2 * per.mean()


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.fixture
def teacher():
    return model(0, head_scale=20.0)


def _x(data, idx):
    return stack_blocks(data, "train", idx, T)[0]


# -- exactness ----------------------------------------------------------------------------------------
def test_k_equals_vocab_reproduces_the_online_teacher_loss(teacher, tmp_path):
    data = packed()
    tt = build_targets(teacher, data, T, k=V, cache_dir=tmp_path, dtype="float32", batch_size=4)
    idx = [4, 1, 5]
    x = _x(data, idx)
    with torch.no_grad():
        t_logits = teacher(x)
    lp, ids, rest = tt.get(idx)
    assert torch.isneginf(rest).all()  # nothing left outside the top V
    mask = (torch.rand(x.shape) > 0.3).float()
    for seed in (1, 2):
        s_logits = model(seed, head_scale=5.0)(x).detach().requires_grad_(True)
        for temp in (1.0, 2.0):
            for m in (None, mask):
                cached = sparse_kd_loss(s_logits, lp, ids, rest, temperature=temp, mask=m)
                online = dense_forward_kl(s_logits, t_logits, temp, m)
                torch.testing.assert_close(cached, online, atol=1e-5, rtol=0)
        # gradients match too (the trainer differentiates this), and soft-target CE = KL + H(p)
        g_cached, = torch.autograd.grad(sparse_kd_loss(s_logits, lp, ids, rest), s_logits)
        g_online, = torch.autograd.grad(dense_forward_kl(s_logits, t_logits), s_logits)
        assert torch.isfinite(g_cached).all()
        torch.testing.assert_close(g_cached, g_online, atol=1e-7, rtol=1e-4)
        log_p = t_logits.log_softmax(-1)
        dense_ce = -(log_p.exp() * s_logits.log_softmax(-1)).sum(-1).mean()
        torch.testing.assert_close(sparse_kd_loss(s_logits, lp, ids, rest, kind="ce"), dense_ce, atol=1e-5, rtol=0)
    # identical logits: 0, at any temperature
    for temp in (1.0, 3.0):
        assert sparse_kd_loss(t_logits, lp, ids, rest, temperature=temp).abs() < 1e-5


def test_top64_loss_error_is_within_the_derived_bound(teacher, tmp_path):
    data = packed()
    tt = build_targets(teacher, data, T, k=64, cache_dir=tmp_path, dtype="float32")
    idx = list(range(len(tt)))
    x = _x(data, idx)
    with torch.no_grad():
        t_logits = teacher(x)
    lp, ids, rest = tt.get(idx)
    r = rest.exp()
    assert 0.01 < r.mean() < 0.2  # a peaked teacher, but the tail is not negligible
    mask = (torch.rand(x.shape) > 0.25).float()
    for seed, scale in [(1, 1.0), (2, 5.0), (3, 20.0), (4, 40.0)]:
        s_logits = model(seed, head_scale=scale)(x).detach()
        for m in (None, mask):
            dense = dense_forward_kl(s_logits, t_logits, mask=m)
            sparse = sparse_kd_loss(s_logits, lp, ids, rest, mask=m)
            bound = sparse_kd_gap_bound(s_logits, lp, ids, rest, mask=m)
            gap = dense - sparse
            assert -1e-5 <= gap <= bound + 1e-5, (seed, float(gap), float(bound))  # lower bound, bounded gap
            assert bound < 0.25 * dense, (seed, float(bound), float(dense))  # not vacuous
    # the student equal to the teacher: the sparse loss is 0 and so is the true gap; the bound stays >= 0
    assert sparse_kd_loss(t_logits, lp, ids, rest).abs() < 1e-5
    assert sparse_kd_gap_bound(t_logits, lp, ids, rest) >= 0


def test_the_bound_is_needed_dropping_the_rest_bucket_breaks_it(teacher, tmp_path):
    """Negative control: the k-outcome loss that ignores the remainder (renormalised top-k) is not a lower
    bound of the dense KL within the gap bound: the rest bucket is what makes the bound hold."""
    data = packed()
    tt = build_targets(teacher, data, T, k=64, cache_dir=tmp_path, dtype="float32")
    idx = list(range(len(tt)))
    x = _x(data, idx)
    with torch.no_grad():
        t_logits = teacher(x)
    lp, ids, rest = tt.get(idx)
    s_logits = model(3, head_scale=20.0)(x).detach()
    no_rest = sparse_kd_loss(s_logits, lp, ids, torch.full_like(rest, -torch.inf))
    dense = dense_forward_kl(s_logits, t_logits)
    bound = sparse_kd_gap_bound(s_logits, lp, ids, rest)
    assert not (-1e-5 <= dense - no_rest <= bound + 1e-5)


def test_the_remaining_mass_keeps_its_precision_when_tiny():
    z = torch.randn(3, 5, V, dtype=torch.float64) * 2
    z[..., 7] += 80.0  # one token holds all but ~1e-30 of the mass
    lp, ids, rest = teacher_topk(z.float(), 4)
    ref = z.log_softmax(-1).scatter(-1, z.topk(4, dim=-1).indices, -torch.inf).logsumexp(-1)
    assert (ref < -60).all()
    torch.testing.assert_close(rest.double(), ref, rtol=1e-5, atol=1e-4)
    assert (1 - lp.double().exp().sum(-1) <= 1e-12).all()  # what 1 - sum p would have given: nothing


def test_float16_storage_is_close_to_float32(teacher, tmp_path):
    data = packed()
    a = build_targets(teacher, data, T, k=64, cache_dir=tmp_path)  # float16 by default
    b = build_targets(teacher, data, T, k=64, cache_dir=tmp_path, dtype="float32")
    assert a.path != b.path and a.logprobs.dtype == np.float16 and a.ids.dtype == np.uint16
    x = _x(data, [0, 1, 2])
    s_logits = model(1, head_scale=5.0)(x).detach()
    la, lb = (sparse_kd_loss(s_logits, *t.get([0, 1, 2])) for t in (a, b))
    torch.testing.assert_close(la, lb, rtol=2e-3, atol=1e-4)


# -- the cache ----------------------------------------------------------------------------------------
def test_get_reads_memory_mapped_rows_that_match_the_live_teacher(teacher, tmp_path, capsys):
    data = packed()
    calls = []
    tt = build_targets(teacher, data, T, k=64, cache_dir=tmp_path, dtype="float32", batch_size=4,
                       progress=lambda d, n: calls.append((d, n)))
    assert calls == [(4, 6), (6, 6)]
    assert capsys.readouterr() == ("", "")  # library code never prints
    for arr in (tt.logprobs, tt.ids, tt.rest_logmass):
        assert isinstance(arr, np.memmap) and arr.mode == "r"
    assert tt.logprobs.shape == (6, T, 64) and tt.rest_logmass.shape == (6, T)
    lp, ids, rest = tt.get([5, 0])
    assert lp.dtype == torch.float32 and ids.dtype == torch.int64 and lp.shape == (2, T, 64)
    with torch.no_grad():
        ref = teacher(_x(data, [5, 0])).float().log_softmax(-1)
    vals, top = ref.topk(64, dim=-1)
    torch.testing.assert_close(lp, vals, atol=1e-5, rtol=0)
    assert torch.equal(ids, top)
    # the remainder: exact where 1 - sum p would cancel
    log_rest = ref.scatter(-1, top, -torch.inf).logsumexp(-1)
    torch.testing.assert_close(rest, log_rest, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest.exp() + lp.exp().sum(-1), torch.ones(2, T), atol=1e-5, rtol=0)
    with pytest.raises(IndexError):
        tt.get([6])


def test_second_build_reuses_the_cache_without_running_the_teacher(teacher, tmp_path):
    data = packed()
    forwards = []
    hook = teacher.register_forward_hook(lambda *_: forwards.append(1))
    a = build_targets(teacher, data, T, k=64, cache_dir=tmp_path, batch_size=2)
    assert len(forwards) == 3
    mtimes = {f.name: f.stat().st_mtime_ns for f in a.path.iterdir()}
    b = build_targets(teacher, data, T, k=64, cache_dir=tmp_path, batch_size=2)  # another epoch or run
    assert len(forwards) == 3 and b.path == a.path
    assert {f.name: f.stat().st_mtime_ns for f in b.path.iterdir()} == mtimes
    assert sorted(p.name for p in tmp_path.iterdir()) == [a.path.name]  # no temporaries left behind
    c = build_targets(teacher, data, T, k=64, cache_dir=tmp_path, batch_size=2, rebuild=True)
    assert len(forwards) == 6 and c.path == a.path
    hook.remove()


def test_a_stale_cache_is_refused_with_one_line_naming_the_difference(teacher, tmp_path):
    data = packed()
    tt = build_targets(teacher, data, T, k=64, cache_dir=tmp_path)
    other_teacher = model(0, head_scale=20.0)
    with torch.no_grad():
        other_teacher.blocks[1].mlp.down.weight[0, 0] += 1e-3
    assert teacher_fingerprint(other_teacher) != teacher_fingerprint(teacher)
    cases = {
        "teacher weights": targets_fingerprint(other_teacher, data, T, 64),
        "data": targets_fingerprint(teacher, packed(seed=1, key="d1-tok0"), T, 64),
        "tokenizer": targets_fingerprint(teacher, packed(key="d0-tok1"), T, 64),
        "seq_len": targets_fingerprint(teacher, data, T // 2, 64, max_blocks=6),
        "k": targets_fingerprint(teacher, data, T, 32),
    }
    for what, expect in cases.items():
        with pytest.raises(GrowlmError) as e:
            open_targets(tt.path, expect)
        msg = one_line(e)
        assert "stale" in msg and msg.split("stale: ")[1].startswith(what), msg
        others = [w for w in cases if w != what]
        assert not any(f"{w} (" in msg for w in others), msg  # only what differs is named
    assert open_targets(tt.path, targets_fingerprint(teacher, data, T, 64)).path == tt.path


def test_a_truncated_or_corrupt_cache_is_refused_with_one_line(teacher, tmp_path):
    data = packed()
    fp = targets_fingerprint(teacher, data, T, 64)
    tt = build_targets(teacher, data, T, k=64, cache_dir=tmp_path)
    path = tt.path
    del tt
    f = path / "logprobs.npy"
    good = f.read_bytes()
    for bad in (good[: len(good) // 2], good[:40], b"not a numpy file", good + b"\0" * 64):
        f.write_bytes(bad)
        with pytest.raises(GrowlmError) as e:
            open_targets(path, fp)
        assert "corrupt" in one_line(e) and "logprobs.npy" in str(e.value)
        with pytest.raises(GrowlmError):  # build_targets does not silently trust it either
            build_targets(teacher, data, T, k=64, cache_dir=tmp_path)
    f.write_bytes(good)
    os.remove(path / "ids.npy")
    with pytest.raises(GrowlmError) as e:
        open_targets(path, fp)
    assert "ids.npy is missing" in one_line(e)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(GrowlmError) as e:
        open_targets(path, fp)
    assert "meta.json" in one_line(e)
    with pytest.raises(GrowlmError) as e:
        open_targets(tmp_path / "nowhere")
    assert "no teacher-target cache" in one_line(e)


def test_fingerprint_of_prepared_data_names_data_and_tokenizer(teacher, tmp_path):
    (tmp_path / "a.txt").write_text("to be or not to be, that is the question. " * 40)
    (tmp_path / "b.txt").write_text("whether 'tis nobler in the mind to suffer. " * 40)
    data = prepare_data(DataConfig(path=str(tmp_path), seq_len=T, cache_dir=str(tmp_path / "c"), val_fraction=0.4),
                        ByteTokenizer())
    fp = targets_fingerprint(teacher, data, T, 8)
    assert fp.tokenizer == "growlm-bytes-v1" and f"{fp.data}-{fp.tokenizer}" == data.key
    tt = build_targets(teacher, data, T, k=8, cache_dir=tmp_path / "t")
    meta = json.loads((tt.path / "meta.json").read_text())
    assert meta["fingerprint"]["n_blocks"] == data.n_blocks("train", T) == len(tt)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(k=0), "top-k"), (dict(k=V + 1), "top-k"), (dict(dtype="int8"), "dtype"),
    (dict(seq_len=64), "context length"), (dict(max_blocks=0), "max_blocks"), (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments_are_refused_before_any_work(teacher, tmp_path, kwargs, needle):
    args = dict(seq_len=T, k=64, cache_dir=tmp_path) | kwargs
    with pytest.raises(GrowlmError) as e:
        build_targets(teacher, packed(), **args)
    assert needle in one_line(e)
    assert not any(tmp_path.iterdir())
