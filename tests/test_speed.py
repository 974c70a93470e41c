"""Speed features that must not change the numbers: the chunked head + cross-entropy, the measured precision
choice, the MFU peak on the model's shapes, torch.compile in the loop and activation checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from growlm.models.head import chunked_cross_entropy
from growlm.models.model import GPT
from growlm.train import precision
from tests.conftest import tiny_config
from tests.test_train import config, metrics, params, trainer


# -- chunked head + cross-entropy -----------------------------------------------------------------------
def _plain(h, w, y, reduction="mean"):
    logits = F.linear(h, w)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y, reduction=reduction)


def _grads(fn, h, w, y, **kw):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(h, w, y, **kw)
    (loss if loss.dim() == 0 else (loss * torch.linspace(0.5, 2, loss.numel(), dtype=loss.dtype)).sum()).backward()
    return loss.detach(), h.grad, w.grad


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    """max |got - ref| <= tol * max(1, max |ref|): float rounding of sums taken in another order, relative to the scale."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    got, ref = got.detach(), ref.detach()
    err, scale = float((got - ref).abs().max()), max(1.0, float(ref.abs().max()))
    assert err <= tol * scale, f"{what}: max abs diff {err:.3g} > {tol:g} x {scale:.3g}"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_equals_the_plain_path(dtype, tol, reduction, chunk):
    g = torch.Generator().manual_seed(0)
    N, C, V = 45, 16, 97
    h = torch.randn(N, C, generator=g, dtype=dtype)
    w = torch.randn(V, C, generator=g, dtype=dtype) * 0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[[0, 5, 6, 44]] = -100  # ignored positions: no loss, no gradient, not in the mean
    ref = _grads(_plain, h, w, y, reduction=reduction)
    got = _grads(lambda a, b, c, reduction: chunked_cross_entropy(a, b, c, chunk, reduction=reduction), h, w, y,
                 reduction=reduction)
    for r, o, name in zip(ref, got, ("loss", "grad hidden", "grad weight")):
        _close(o, r, tol, name)
    assert got[1][[0, 5, 6, 44]].abs().max() == 0  # an ignored row gets no gradient


def test_chunked_cross_entropy_frozen_head_and_no_grad():
    """A frozen head gets no gradient (and none is formed); under no_grad only the loss is computed."""
    h = torch.randn(20, 8, requires_grad=True)
    w = torch.randn(50, 8)
    y = torch.randint(0, 50, (20,))
    loss = chunked_cross_entropy(h, w, y, 6)
    loss.backward()
    torch.testing.assert_close(loss, _plain(h, w, y), atol=1e-6, rtol=1e-6)
    h2 = h.detach().requires_grad_(True)
    _plain(h2, w, y).backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        out = chunked_cross_entropy(h, w, y, 6)
    assert not out.requires_grad
    torch.testing.assert_close(out, loss.detach())


def test_chunked_cross_entropy_under_bf16_autocast():
    """bf16 autocast: the matmuls in bf16 as F.linear would, loss in float32; same numbers up to bf16 rounding."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=g)
    w = torch.randn(120, 32, generator=g) * 0.3
    y = torch.randint(0, 120, (40,), generator=g)
    y[3] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(_plain, h, w, y)
        got = _grads(lambda a, b, c: chunked_cross_entropy(a, b, c, 16), h, w, y)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)  # the same bf16 logits, fp32 loss
    for r, o in zip(ref[1:], got[1:]):
        torch.testing.assert_close(o, r, atol=2e-3, rtol=2e-2)  # bf16 gradients, summed in another order
    fp32 = _grads(_plain, h, w, y)
    assert (got[0] - fp32[0]).abs() > 1e-6  # the check above would fail if autocast were ignored


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_with_targets_equals_logits_path_and_grads_flow_into_a_tied_head(family, tied):
    cfg = tiny_config(family, tie_embeddings=tied)
    model = GPT(cfg).double()
    x = torch.randint(0, cfg.vocab_size, (3, 10))
    y = torch.randint(0, cfg.vocab_size, (3, 10))
    logits = model(x)
    ref = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = model(x, targets=y, loss_chunk=7)
    loss.backward()
    _close(loss, ref, 1e-12, "loss")
    for n, p in model.named_parameters():
        _close(p.grad, ref_grads[n], 1e-12, n)
    assert model.head_weight.grad.abs().max() > 0


def test_trainer_with_chunked_loss_trains_exactly_like_the_plain_path(tmp_path):
    """run.loss_chunk changes memory, not the run: float64 losses, validation and weights agree to 1e-10."""
    model = GPT(tiny_config("llama"))
    runs = {}
    for chunk in (0, 5):
        cfg = config(tmp_path, f"c{chunk}", run=dict(max_steps=3, micro_batch=2, dtype="float64", loss_chunk=chunk))
        res = trainer(cfg, model).fit()
        runs[chunk] = (metrics(tmp_path / f"c{chunk}" / "metrics.jsonl"), params(res.model))
    (ma, pa), (mb, pb) = runs[0], runs[5]
    la = [(r.get("loss"), r.get("val_loss")) for r in ma]
    lb = [(r.get("loss"), r.get("val_loss")) for r in mb]
    assert len(la) == len(lb) >= 4
    for a, b in zip(la, lb):
        for u, v in zip(a, b):
            assert (u is None) == (v is None) and (u is None or abs(u - v) < 1e-10), (a, b)
    for n in pa:
        _close(pb[n], pa[n], 1e-10, n)
    assert not torch.equal(pa["wte.weight"], model.wte.weight.double())  # it did train


# -- precision: measured once, bf16 only where faster ---------------------------------------------------
def fake_timer(bf16_rate: float, calls: list | None = None):
    """A matmul 'timer' for which float32 runs at 100 GFLOP/s and bf16 at `bf16_rate`."""
    def timer(m, k, n, dtype, device):
        if calls is not None:
            calls.append((m, k, n, dtype))
        return {torch.float32: 100e9, torch.bfloat16: bf16_rate, torch.float64: 50e9}[dtype]
    return timer


@pytest.mark.parametrize("bf16_rate,expected", [(60e9, "none"), (105e9, "none"), (400e9, "bf16")])
def test_autocast_auto_picks_bf16_only_where_measured_faster(tmp_path, bf16_rate, expected):
    cfg = tiny_config("llama")
    p = precision.choose_autocast("auto", cfg, 64, torch.float32, "cpu", tmp_path / "p.json", fake_timer(bf16_rate))
    assert p.autocast == expected and p.warning is None
    assert p.ratio == pytest.approx(bf16_rate / 100e9)
    explicit = precision.choose_autocast("bf16", cfg, 64, torch.float32, "cpu", tmp_path / "p.json", fake_timer(1.0))
    assert explicit.autocast == "bf16"  # from the cache: the timer above would say 1e-11x
    assert (explicit.warning is not None) == (bf16_rate < 100e9)
    if explicit.warning:
        assert f"{bf16_rate / 100e9:.2f}x" in explicit.warning
    assert precision.choose_autocast("auto", cfg, 64, torch.float64, "cpu", tmp_path / "p.json", fake_timer(400e9)).autocast == "none"


def test_precision_cache_is_reused_and_keyed_by_shapes(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_load", lambda: 0.1)
    cache, calls = tmp_path / "p.json", []
    cfg = tiny_config("gpt2")
    a = precision.measure(precision.model_shapes(cfg, 32), ("float32", "bfloat16"), "cpu", cache, fake_timer(200e9, calls))
    n = len(calls)
    assert n > 0 and cache.exists()
    b = precision.measure(precision.model_shapes(cfg, 32), ("float32", "bfloat16"), "cpu", cache, fake_timer(1.0, calls))
    assert b == a and len(calls) == n  # nothing measured again
    precision.measure(precision.model_shapes(cfg, 48), ("float32",), "cpu", cache, fake_timer(200e9, calls))
    assert len(calls) > n  # other shapes: measured
    key = next(iter(json.loads(cache.read_text())))
    assert f"{torch.get_num_threads()}threads" in key and torch.__version__ in key


def test_a_rate_measured_busy_is_measured_again_when_quieter(tmp_path, monkeypatch):
    """A peak cached under load (MFU would read > 100% ever after) is re-measured once the load halves; the faster
    rate is kept, and a quiet measurement is never redone."""
    cache, calls, shapes = tmp_path / "p.json", [], precision.model_shapes(tiny_config("gpt2"), 32)

    def flat(rate, calls):  # every matmul at `rate` FLOP/s
        return lambda m, k, n, dtype, device: calls.append((m, k, n, dtype)) or rate
    load = {"now": 1.5}
    monkeypatch.setattr(precision, "cpu_load", lambda: load["now"])
    busy = precision.measure(shapes, ("float32",), "cpu", cache, flat(50e9, calls))
    assert busy["float32"]["flops"] == pytest.approx(50e9)
    load["now"] = 1.0  # still busy, not half as busy: the entry stands
    n = len(calls)
    assert precision.measure(shapes, ("float32",), "cpu", cache, flat(200e9, calls)) == busy and len(calls) == n
    load["now"] = 0.2
    quiet = precision.measure(shapes, ("float32",), "cpu", cache, flat(200e9, calls))
    assert quiet["float32"]["flops"] == pytest.approx(200e9) and len(calls) > n
    n = len(calls)
    assert precision.measure(shapes, ("float32",), "cpu", cache, flat(10e9, calls)) == quiet and len(calls) == n
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["load"] == 0.2
    entry.pop("load")  # written before loads were recorded: measured once more, the faster rate kept
    cache.write_text(json.dumps({next(iter(json.loads(cache.read_text()))): entry}))
    again = precision.measure(shapes, ("float32",), "cpu", cache, flat(10e9, calls))
    assert again["float32"]["flops"] == pytest.approx(200e9) and len(calls) > n


def test_slow_bf16_is_probed_small_and_not_measured_in_full(tmp_path):
    """An AVX2-only machine (bf16 ~0.02x): only the cut-down probe runs in bf16, the full shapes never do."""
    calls = []
    cfg = tiny_config("llama", vocab_size=50_000)
    shapes = precision.model_shapes(cfg, 1024)
    r = precision.measure(shapes, ("float32", "bfloat16"), "cpu", tmp_path / "p.json", fake_timer(2e9, calls))
    bf16 = [c for c in calls if c[3] == torch.bfloat16]
    assert bf16 and all(m <= precision.PROBE_ROWS and n <= precision.PROBE_COLS for m, k, n, _ in bf16)
    assert r["bfloat16"]["estimated"] and r["bfloat16"]["flops"] == pytest.approx(2e9)
    assert any(m == 1024 for m, k, n, dt in calls if dt == torch.float32)


def test_trainer_resolves_autocast_warns_once_and_logs_the_peak_source(tmp_path, monkeypatch):
    monkeypatch.setenv("GROWLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GROWLM_MATMUL_PEAK", raising=False)
    monkeypatch.setattr(precision, "time_matmul", fake_timer(30e9))
    model = GPT(tiny_config("llama"))
    infos = []
    for setting in ("auto", "bf16"):
        cfg = config(tmp_path, setting, run=dict(max_steps=1, autocast=setting, peak_flops=None))
        t = trainer(cfg, model, callback=lambda kind, rec: infos.append((setting, rec)) if kind == "info" else None)
        t.fit()
        start = json.loads((tmp_path / setting / "metrics.jsonl").read_text().splitlines()[0])
        assert start["autocast"] == setting and start["autocast_used"] == t.autocast
        assert "model's shapes" in start["peak_source"]
        assert start["peak_flops"] == pytest.approx(100e9 if setting == "auto" else 30e9)
    assert [s for s, _ in infos] == ["bf16"] and "0.30x" in infos[0][1]["message"]


# -- torch.compile in the loop, activation checkpointing -------------------------------------------------
GROW_AT_2 = dict(trigger="steps", steps=[2], operators=[{"operator": "width", "ffn_size": 160}])


def _losses(path) -> list[tuple]:
    return [(r.get("loss"), r.get("val_loss")) for r in metrics(path)]


def _assert_same_losses(a: list[tuple], b: list[tuple], tol: float) -> None:
    assert len(a) == len(b) >= 4
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert (u is None) == (v is None) and (u is None or abs(u - v) <= tol), (x, y)


def test_compiled_training_equals_eager_across_a_growth_event(tmp_path):
    """run.compile=true: same losses to 1e-5 as eager over 4 steps with a width growth at step 2 (which
    recompiles: other shapes); the compile time is logged as compile_s, twice."""
    model = GPT(tiny_config("llama"))
    for name, comp in (("eager", False), ("compiled", True)):
        cfg = config(tmp_path, name, run=dict(max_steps=4, compile=comp, autocast="none"), growth=GROW_AT_2)
        trainer(cfg, model).fit()
    _assert_same_losses(_losses(tmp_path / "eager" / "metrics.jsonl"), _losses(tmp_path / "compiled" / "metrics.jsonl"), 1e-5)
    recs = [json.loads(ln) for ln in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "compile_s" in r] == [1, 3] and all(r["compile_s"] > 0 for r in recs if "compile_s" in r)
    assert not any("compile_s" in json.loads(ln) for ln in (tmp_path / "eager" / "metrics.jsonl").read_text().splitlines())


GROW_DEPTH_AT_2 = dict(trigger="steps", steps=[2], operators=[{"operator": "depth", "n": 2, "where": "top"}])


def test_block_compiled_training_equals_eager_across_a_depth_growth_event(tmp_path):
    """run.compile=blocks: same losses to 1e-5 as eager over 4 steps with 2 blocks added at step 2; the added
    blocks (same shapes) reuse the compiled graphs, so the only training step that compiles is the first one."""
    model = GPT(tiny_config("llama"))
    for name, comp in (("eager", False), ("blocks", "blocks")):
        cfg = config(tmp_path, name, run=dict(max_steps=4, compile=comp, autocast="none"), growth=GROW_DEPTH_AT_2)
        t = trainer(cfg, model)
        assert t._compile == ("blocks" if comp else "none")
        t.fit()
    assert t.model.config.n_layer == 4 and t.model.block_call is not None  # grown, and still compiled
    _assert_same_losses(_losses(tmp_path / "eager" / "metrics.jsonl"), _losses(tmp_path / "blocks" / "metrics.jsonl"), 1e-5)
    recs = [json.loads(ln) for ln in (tmp_path / "blocks" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "compile_s" in r] == [1]


def test_one_compiled_graph_serves_every_block():
    """The premise of run.compile=blocks: blocks of one shape share a graph; their own weights are used."""
    from growlm.train.parallel import CompiledBlocks, compiled_graphs

    torch._dynamo.reset()
    model = GPT(tiny_config("llama", n_layer=5, n_embd=40))  # shapes no other test compiles
    x = torch.randint(0, 96, (2, 12))
    ref = model(x, targets=x)
    ref.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.block_call = CompiledBlocks(lambda m: pytest.fail(m))
    before = compiled_graphs()
    loss = model(x, targets=x)
    loss.backward()
    assert compiled_graphs() - before == 1  # one graph for 5 blocks
    _close(loss, ref, 1e-6, "loss")
    for n, p in model.named_parameters():
        _close(p.grad, grads[n], 1e-5, n)


def test_compiled_blocks_under_activation_checkpointing_give_the_same_loss_and_gradients():
    """The checkpoint is traced inside the compiled block (a compiled block inside a checkpoint would break the
    checkpoint's recomputation)."""
    from growlm.train.parallel import CompiledBlocks

    model = GPT(tiny_config("llama", n_layer=3)).double()
    x = torch.randint(0, 96, (2, 12))
    out = []
    for ckpt, compiled in ((False, False), (True, True)):
        model.zero_grad()
        model.activation_checkpointing = ckpt
        model.block_call = CompiledBlocks(lambda m: pytest.fail(m)) if compiled else None
        loss = model(x, targets=x)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    _close(out[1][0], out[0][0], 1e-12, "loss")
    for n, g in out[0][1].items():
        _close(out[1][1][n], g, 1e-12, n)


def test_generation_does_not_go_through_the_block_caller():
    """A KV cache grows every token (a compiled block would recompile each time): generate calls blocks directly."""
    model = GPT(tiny_config("llama")).eval()
    x = torch.randint(0, 96, (1, 5))
    ref = model.generate(x, 4)
    model.block_call = lambda *a: pytest.fail("block_call used with a KV cache")
    torch.testing.assert_close(model.generate(x, 4), ref)


@pytest.mark.parametrize("setting,device,parallel,seconds,expected", [
    (True, "cpu", None, 0, "model"), (False, "cuda", None, 1e6, "none"), ("blocks", "cpu", None, 0, "blocks"),
    ("auto", "cuda", None, 0, "model"), ("auto", "cpu", None, precision.COMPILE_MIN_SECONDS, "blocks"),
    ("auto", "cpu", None, precision.COMPILE_MIN_SECONDS * 0.99, "none"), ("auto", "cpu", "ddp", 1e6, "blocks"),
    ("auto", "cpu", "fsdp", 1e6, "none")])
def test_compile_auto_rule(setting, device, parallel, seconds, expected):
    assert precision.choose_compile(setting, device, parallel, seconds * 1e9, 1e9) == expected
    if setting == "auto" and device == "cpu":
        assert precision.choose_compile(setting, device, parallel, seconds * 1e9, 0.0) == "none"  # peak unknown


@pytest.mark.parametrize("mode", [True, "blocks"])
def test_a_failed_compile_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch, mode):
    def broken_compile(module, **kw):
        def fail(*a, **k):
            raise RuntimeError("inductor: no C++ compiler found\nmore lines")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = GPT(tiny_config("gpt2"))
    infos = []
    cfg = config(tmp_path, "broken", run=dict(max_steps=4, compile=mode), growth=GROW_AT_2)
    trainer(cfg, model, callback=lambda kind, rec: infos.append(rec["message"]) if kind == "info" else None).fit()
    trainer(config(tmp_path, "eager", run=dict(max_steps=4, compile=False), growth=GROW_AT_2), model).fit()
    assert len(infos) == 1 and "torch.compile failed (RuntimeError: inductor: no C++ compiler found)" in infos[0]
    _assert_same_losses(_losses(tmp_path / "broken" / "metrics.jsonl"), _losses(tmp_path / "eager" / "metrics.jsonl"), 0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(family):
    model = GPT(tiny_config(family)).double()
    x = torch.randint(0, 96, (2, 12))
    y = torch.randint(0, 96, (2, 12))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ckpt
        loss = model(x, targets=y, loss_chunk=8)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    _close(grads[1][0], grads[0][0], 1e-12, "loss")
    for n, g in grads[0][1].items():
        _close(grads[1][1][n], g, 1e-12, n)


def test_activation_checkpointing_saves_memory_in_the_graph():
    """What checkpointing is for: fewer tensors kept for the backward (counted through saved-tensor hooks)."""
    model = GPT(tiny_config("llama", n_layer=4))
    x = torch.randint(0, 96, (2, 16))
    saved = {}
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        n = [0]

        def pack(t):
            n[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, targets=x).backward()
        saved[ckpt] = n[0]
    assert saved[True] < 0.7 * saved[False], saved


def test_trainer_with_activation_checkpointing_trains_the_same(tmp_path):
    model = GPT(tiny_config("gpt2"))
    for name, on in (("off", False), ("on", True)):
        res = trainer(config(tmp_path, name, run=dict(max_steps=3, dtype="float64", activation_checkpointing=on)), model).fit()
        assert res.model.activation_checkpointing is on  # the switch reached the model (the saving: test above)
    _assert_same_losses(_losses(tmp_path / "off" / "metrics.jsonl"), _losses(tmp_path / "on" / "metrics.jsonl"), 1e-10)
