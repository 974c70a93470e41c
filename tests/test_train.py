"""The training engine: accumulation, exact resume across growth, growth deltas, freezing and per-generation
update multipliers, the plateau trigger, EWC and KD, the non-finite-loss policy, FLOPs and bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from growlm.train.data import DataConfig, PackedData
from growlm.errors import GrowlmError
from growlm.growth import GrowthSpec
from growlm.train.flops import flops_per_token, matmul_params
from growlm.models.model import GPT
from growlm.train.regularize import build_ewc, kd_loss, per_sample_fisher, sample_labels
from growlm.train import (
    GrowthConfig,
    OptimConfig,
    PlateauTrigger,
    RegConfig,
    RunConfig,
    TrainConfig,
    Trainer,
    lr_at,
)
from tests.conftest import tiny_config

SEQ = 8


def packed(vocab: int = 96, n_train: int = 2000, n_val: int = 200, seed: int = 0) -> PackedData:
    """A random token stream with some structure (a noisy cycle), so losses move when training."""
    rng = np.random.default_rng(seed)
    base = np.arange(n_train + n_val) % 17
    noise = rng.integers(0, vocab, n_train + n_val)
    stream = np.where(rng.random(n_train + n_val) < 0.7, base, noise).astype(np.uint16)
    return PackedData(stream[:n_train], stream[n_train:], "test", 1, 1, vocab)


def config(tmp_path, name: str = "run", **sections) -> TrainConfig:
    run = dict(max_steps=6, micro_batch=2, grad_accum=1, eval_every=2, log_every=1, out_dir=str(tmp_path / name),
               peak_flops=1e12, export_hf=False, save_every=0)
    run.update(sections.pop("run", {}))
    data = dict(seq_len=SEQ, val_blocks=4)
    data.update(sections.pop("data", {}))
    optim = dict(lr=1e-2, warmup_steps=1, weight_decay=0.1)
    optim.update(sections.pop("optim", {}))
    growth = sections.pop("growth", {})
    reg = sections.pop("reg", {})
    assert not sections
    return TrainConfig(data=DataConfig(**data), optim=OptimConfig(**optim), growth=GrowthConfig(**growth),
                       reg=RegConfig(**reg), run=RunConfig(**run))


def trainer(cfg: TrainConfig, model: GPT, **kw) -> Trainer:
    return Trainer(cfg, model=copy.deepcopy(model), data=packed(), **kw)


def params(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def metrics(path) -> list[dict]:
    drop = {"tok_s", "mfu", "peak_mem_mb", "elapsed_s"}  # wall-clock and memory: not part of the computation
    recs = [json.loads(ln) for ln in path.read_text().splitlines()]
    # kind=run lines (machine, versions, wall time; one start line per segment) describe the run, not its numbers
    return [{k: v for k, v in r.items() if k not in drop} for r in recs if r.get("kind") != "run"]


# -- 1. accumulation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_micro1_accum4_equals_micro4_accum1(tmp_path, dtype):
    # float32: summation order differs, and Adam divides by sqrt(v), so an element whose gradient is
    # ~0 (a rare token's embedding row) can turn a 1e-9 gradient difference into a visible update
    # difference; a larger eps keeps the float32 comparison about accumulation, not about Adam at 0/0.
    eps = 1e-8 if dtype == "float64" else 1e-6
    model = GPT(tiny_config("llama"))
    a = trainer(config(tmp_path, "a", run=dict(micro_batch=1, grad_accum=4, max_steps=3, dtype=dtype), optim=dict(eps=eps)), model)
    b = trainer(config(tmp_path, "b", run=dict(micro_batch=4, grad_accum=1, max_steps=3, dtype=dtype), optim=dict(eps=eps)), model)
    ra, rb = a.fit(), b.fit()
    la = [r["loss"] for r in metrics(tmp_path / "a" / "metrics.jsonl") if r.get("loss") is not None]
    lb = [r["loss"] for r in metrics(tmp_path / "b" / "metrics.jsonl") if r.get("loss") is not None]
    assert len(la) == 3
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=0, atol=1e-6)
    for n, p in params(ra.model).items():
        torch.testing.assert_close(p, params(rb.model)[n], rtol=0, atol=1e-6)
    assert not torch.equal(params(ra.model)["wte.weight"], model.wte.weight)  # it did train


# -- 2. exact resume --------------------------------------------------------------------------------------
RESUME_SECTIONS = dict(
    run=dict(max_steps=8, save_every=1, keep_last=3),
    growth=dict(trigger="steps", steps=[3, 6], operators=[{"operator": "depth", "n": 1}, {"operator": "width", "ffn_size": 96}],
                old_params="decay", gen_lr_mult=0.5, new_warmup_steps=2),
    reg=dict(kd_weight=0.5, ewc_lambda=10.0, ewc_samples=3),
)


@pytest.mark.parametrize("kill_at", ["random", "after_growth"])
def test_resume_after_kill_is_exact(tmp_path, kill_at):
    model = GPT(tiny_config("llama"))
    full = trainer(config(tmp_path, "full", **copy.deepcopy(RESUME_SECTIONS)), model).fit()
    k = random.Random(7).randint(1, 7) if kill_at == "random" else 3  # 3: the checkpoint right after event 1
    cfg = config(tmp_path, "killed", **copy.deepcopy(RESUME_SECTIONS))
    first = trainer(cfg, model)
    first.fit(stop_after=k)
    assert first.state.step == k
    resumed_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=True))
    resumed = Trainer(resumed_cfg, model=copy.deepcopy(model), data=packed())
    assert resumed.state.step == k
    res = resumed.fit()
    assert [e["step"] for e in res.events] == [3, 6]
    for n, p in params(full.model).items():
        assert torch.equal(p, params(res.model)[n]), n
    assert metrics(tmp_path / "full" / "metrics.jsonl") == metrics(tmp_path / "killed" / "metrics.jsonl")


def test_resume_with_a_different_config_is_refused_and_overwrites_nothing(tmp_path):
    model = GPT(tiny_config("llama"))
    cfg = config(tmp_path, "r", run=dict(max_steps=2, save_every=1))
    trainer(cfg, model).fit()
    ckpts = tmp_path / "r" / "checkpoints"
    before = {p: p.read_bytes() for p in sorted(ckpts.rglob("*")) if p.is_file()}
    changed = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, weight_decay=0.5),
                                  run=dataclasses.replace(cfg.run, resume=True, max_steps=4))
    with pytest.raises(GrowlmError, match="config differs.*optim.weight_decay"):
        trainer(changed, model)
    with pytest.raises(GrowlmError, match="already holds checkpoints"):
        trainer(cfg, model)  # a fresh run into a folder with checkpoints
    after = {p: p.read_bytes() for p in sorted(ckpts.rglob("*")) if p.is_file()}
    assert after == before


# -- 3. function-preserving growth events -------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logged_val_loss_delta_at_function_preserving_growth(tmp_path, family):
    ops = [{"operator": "depth", "n": 1}, {"operator": "width", "ffn_size": 160, "n_head": 6},
           {"operator": "depth", "n": 2, "where": "top"}]
    cfg = config(tmp_path, growth=dict(trigger="schedule", start=1, every=2, max_events=3, operators=ops))
    res = trainer(cfg, GPT(tiny_config(family))).fit()
    events = [r for r in metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "growth"]
    assert [e["step"] for e in events] == [1, 3, 5] and len(res.events) == 3
    for e in events:
        assert e["function_preserving"] is True
        assert abs(e["val_loss_delta"]) <= 1e-6, e
        assert e["params_added"] > 0
    assert res.model.config.n_layer == 5 and res.model.config.n_head == 6


# -- 4. freezing and per-generation multipliers ----------------------------------------------------------------
@pytest.mark.parametrize("policy,frozen_below", [("freeze", 2), ("freeze_base", 1)])
def test_frozen_params_are_bit_identical_after_training(tmp_path, policy, frozen_below):
    cfg = config(tmp_path, run=dict(max_steps=5), growth=dict(
        trigger="steps", steps=[0, 2], old_params=policy,
        operators=[{"operator": "depth", "n": 1}, {"operator": "width", "ffn_size": 80}]))
    snaps = {}

    def on(kind, rec):
        if kind == "growth":
            snaps[rec["event"]] = (params(t.model), {n: g.dense() for n, g in t.state.generations.items()})

    t = trainer(cfg, GPT(tiny_config("llama")), callback=on)
    res = t.fit()
    final = params(res.model)
    after_last, gens = snaps[2]
    n_old = n_new = 0
    for n, p in final.items():
        old = (gens.get(n, torch.tensor(0)) < frozen_below).expand(p.shape)
        assert torch.equal(p[old], after_last[n][old]), n  # bit-identical, weight decay included
        n_old += int(old.sum())
        n_new += int((~old).sum())
        if (~old).any() and n.endswith(("mlp.down.weight", "mlp.up.weight")):
            assert not torch.equal(p[~old], after_last[n][~old]), n
    assert n_old > 0 and n_new > 0
    assert not t.model.wte.weight.requires_grad  # whole old tensors are not even in the optimizer


def test_generation_multiplier_scales_the_adamw_update(tmp_path):
    m = 0.25
    # float64 so that p_after - p_before is not dominated by the rounding of p (float32 ulp ~ 4e-9)
    cfg = config(tmp_path, run=dict(dtype="float64"), growth=dict(trigger="steps", steps=[0], old_params="decay", gen_lr_mult=m,
                                       operators=[{"operator": "width", "ffn_size": 80}]))
    t = trainer(cfg, GPT(tiny_config("llama")))
    t.grow_now()
    t.train_step()  # one ordinary step so that the moments are not trivially fresh
    t.state.step += 1
    p0, opt0, sampler0 = params(t.model), copy.deepcopy(t.optimizer.state_dict()), t.state.sampler.state_dict()
    t.train_step()
    p_m = params(t.model)
    # the same step again with every multiplier 1
    with torch.no_grad():
        for n, p in t.model.named_parameters():
            p.copy_(p0[n])
    t.optimizer.load_state_dict(opt0)
    t.state.sampler.load_state_dict(sampler0)
    t.cfg = dataclasses.replace(t.cfg, growth=dataclasses.replace(t.cfg.growth, old_params="train"))
    t.train_step()
    p_1 = params(t.model)
    gens = {n: g.dense() for n, g in t.state.generations.items()}
    checked = 0
    for n in p0:
        gen = gens[n].expand(p0[n].shape)
        # p_1 already carries the operator's own update_scale (x n width cloning); decay multiplies in
        want = torch.where(gen == 0, m, 1.0) * (p_1[n] - p0[n])
        torch.testing.assert_close(p_m[n] - p0[n], want, rtol=1e-9, atol=1e-15)
        checked += int(((gen == 0) & (p_1[n] != p0[n])).sum())
    assert checked > 1000


# -- 5. plateau trigger --------------------------------------------------------------------------------------
def test_plateau_fires_after_exactly_patience_evaluations():
    t = PlateauTrigger(patience=3, min_delta=0.01)
    fired = [t.update(v) for v in [5.0, 4.0, 3.995, 4.1, 3.999]]
    assert fired == [False, False, False, False, True]  # 3.995 is not a min_delta improvement
    # after firing: the next evaluation is the new reference, then `patience` more are needed
    fired = [t.update(v) for v in [3.9, 3.9, 3.9, 3.9]]
    assert fired == [False, False, False, True]
    # cooldown: the 2 evaluations after an event only set the reference; then `patience` more fire again
    c = PlateauTrigger(patience=1, cooldown=2)
    assert [c.update(v) for v in [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]] == [False, True, False, False, True, False, False]


def test_plateau_growth_in_the_loop(tmp_path):
    # lr ~ 0: the validation loss never improves, so growth fires at eval 1 + patience (steps 1..)
    cfg = config(tmp_path, optim=dict(lr=1e-12, warmup_steps=0, decay="constant"),
                 run=dict(max_steps=7, eval_every=1),
                 growth=dict(trigger="plateau", patience=2, max_events=2, operators=[{"operator": "depth"}]))
    res = trainer(cfg, GPT(tiny_config("llama"))).fit()
    assert [e["step"] for e in res.events] == [3, 6]


# -- 6. EWC and KD ---------------------------------------------------------------------------------------------
def test_ewc_fisher_is_the_mean_of_per_sample_squared_gradients():
    model = GPT(tiny_config("gpt2")).double()
    x, y = torch.randint(0, 96, (5, 8)), torch.randint(0, 96, (5, 8))
    fisher = per_sample_fisher(model, x, y, chunk=2)
    names = [n for n, _ in model.named_parameters()]
    direct = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b in range(5):  # the definition, one sample at a time
        model.zero_grad()
        logits = model(x[b : b + 1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 96), y[b].reshape(-1)).backward()
        for n, p in model.named_parameters():
            direct[n] += p.grad**2 / 5
    for n in names:
        torch.testing.assert_close(fisher[n].double(), direct[n], rtol=1e-5, atol=1e-12)
    loop = per_sample_fisher(model, x, y, method="loop")  # the library's reference path agrees as well
    for n in names:
        torch.testing.assert_close(loop[n].double(), direct[n], rtol=1e-5, atol=1e-12)
    # the known bug: squaring the batch-mean gradient gives (mean g)^2 <= mean(g^2), and depends on the batch size
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x).reshape(-1, 96), y.reshape(-1)).backward()
    batch_grad_sq = sum(float((p.grad**2).sum()) for p in model.parameters())
    assert sum(float(f.sum()) for f in fisher.values()) > 2 * batch_grad_sq


def test_ewc_penalty_zero_at_anchor_and_zero_fisher_for_new_elements():
    model = GPT(tiny_config("llama")).double()
    x, y = torch.randint(0, 96, (3, 8)), torch.randint(0, 96, (3, 8))
    new = {"blocks.1.mlp.up.weight": torch.zeros_like(model.blocks[1].mlp.up.weight, dtype=torch.bool)}
    new["blocks.1.mlp.up.weight"][:5] = True
    ewc = build_ewc(model, x, y, lam=3.0, new_elements=new)
    assert float(ewc.penalty(model).detach()) == 0.0
    assert float(ewc.fisher["blocks.1.mlp.up.weight"][:5].abs().sum()) == 0.0
    assert float(ewc.fisher["blocks.1.mlp.up.weight"][5:].abs().sum()) > 0.0
    with torch.no_grad():
        model.blocks[0].attn.q.weight.add_(0.1)
    want = 0.5 * 3.0 * float((ewc.fisher["blocks.0.attn.q.weight"] * 0.01).sum())
    torch.testing.assert_close(float(ewc.penalty(model).detach()), want, rtol=1e-6, atol=0)


def _fisher_loop(model: GPT, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The definition, one sequence at a time: mean over b of (d mean-token-CE_b / d theta)^2, in float64."""
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b in range(x.shape[0]):
        model.zero_grad()
        logits = model(x[b : b + 1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[b].reshape(-1)).backward()
        for n, p in model.named_parameters():
            out[n] += p.grad**2 / x.shape[0]
    model.zero_grad()
    return out


def test_true_fisher_equals_the_per_sample_loop_on_sampled_labels():
    model = GPT(tiny_config("llama")).double()
    x, y = torch.randint(0, 96, (5, 8)), torch.randint(0, 96, (5, 8))
    new = {"blocks.0.mlp.up.weight": torch.zeros_like(model.blocks[0].mlp.up.weight, dtype=torch.bool)}
    new["blocks.0.mlp.up.weight"][:3] = True
    true_f = build_ewc(model, x, y, lam=1.0, new_elements=new, fisher="true", generator=torch.Generator().manual_seed(3))
    labels = sample_labels(model, x, torch.Generator().manual_seed(3))  # the labels build_ewc drew
    assert not torch.equal(labels, y)
    want = _fisher_loop(model, x, labels)
    want["blocks.0.mlp.up.weight"][:3] = 0.0  # new elements anchor nothing
    assert set(true_f.fisher) == set(want)
    for n, f in true_f.fisher.items():
        torch.testing.assert_close(f.double(), want[n], rtol=1e-5, atol=1e-12, msg=n)  # F is kept in float32
    empirical = build_ewc(model, x, y, lam=1.0)
    gold = _fisher_loop(model, x, y)
    for n, f in empirical.fisher.items():
        torch.testing.assert_close(f.double(), gold[n], rtol=1e-5, atol=1e-12, msg=n)
    # the two Fishers differ (the labels matter): a test that would pass with either one could not fail
    assert any(not torch.allclose(true_f.fisher[n], empirical.fisher[n], rtol=1e-2) for n in want)


def test_kd_loss_formula_and_zero_right_after_growth(tmp_path):
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    T = 2.0
    p = (t / T).softmax(-1)
    want = T**2 * (p * ((t / T).log_softmax(-1) - (s / T).log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, T), want, rtol=1e-6, atol=0)
    assert float(kd_loss(t, t, T)) == 0.0
    cfg = config(tmp_path, reg=dict(kd_weight=1.0, ewc_lambda=1.0, ewc_samples=2),
                 growth=dict(trigger="steps", steps=[0], operators=[{"operator": "depth", "n": 1}]))
    tr = trainer(cfg, GPT(tiny_config("llama")))
    tr.train_step()
    tr.state.step += 1
    tr.grow_now()
    x, y = packed().block("train", 0, SEQ)[None, :-1], packed().block("train", 0, SEQ)[None, 1:]
    _, parts = tr._loss(x, y)
    assert float(parts["kd"]) == 0.0 and float(parts["ewc"]) == 0.0


# -- non-finite loss policy ------------------------------------------------------------------------------------
def test_nan_step_is_skipped_and_persistent_nan_stops_without_saving(tmp_path):
    cfg = config(tmp_path, run=dict(max_steps=6, save_every=1, max_nan_skips=2, keep_last=10))
    t = trainer(cfg, GPT(tiny_config("llama")))
    real = t._loss
    nan_steps = {2}  # 0-based step index: the third step (logged as step 3)

    def flaky(x, y, *rest):
        loss, parts = real(x, y, *rest)
        return (loss * float("nan"), parts) if t.state.step in nan_steps else (loss, parts)

    t._loss = flaky
    t.fit(stop_after=3)
    ckpt = tmp_path / "run" / "checkpoints"
    log = metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r.get("skipped", False) for r in log if r["step"] in (1, 2, 3)] == [False, False, True]
    from safetensors.torch import load_file

    saved2 = load_file(str(ckpt / "step_000002" / "model.safetensors"))
    assert all(torch.equal(saved2[n], p) for n, p in t.model.state_dict().items())  # the skipped step changed nothing
    assert not (ckpt / "step_000003").exists()  # nothing is saved during a non-finite streak
    before = params(t.model)
    nan_steps.update({3, 4, 5})
    # the streak starts at step 3, so the weights saved after step 2 led into it: step 1 is what a resume takes
    with pytest.raises(GrowlmError, match=r"not finite at step 5 \(3 steps in a row\).*kept: .*step_000001"):
        t.fit()
    assert all(torch.equal(before[n], p) for n, p in params(t.model).items())
    assert json.loads((ckpt / "latest.json").read_text())["step"] == 1
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_000001", "step_000002"]


# -- schedule and FLOPs ----------------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_decay_to_zero():
    o = OptimConfig(lr=1.0, warmup_steps=4, decay="cosine")
    lrs = [lr_at(s, o, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and 0 < lrs[-1] < 0.01
    lin = [lr_at(s, OptimConfig(lr=1.0, decay="linear"), 10) for s in range(10)]
    torch.testing.assert_close(torch.tensor(lin, dtype=torch.float64), torch.linspace(1.0, 0.1, 10, dtype=torch.float64), rtol=0, atol=1e-12)
    assert lr_at(7, OptimConfig(lr=0.5, warmup_steps=2, decay="constant"), 10) == 0.5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_flops_per_token_counts_every_matmul(family):
    cfg = tiny_config(family, n_layer=3)
    model = GPT(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = 0 if model.lm_head is not None else cfg.vocab_size * cfg.n_embd  # a tied head is still a matmul
    assert matmul_params(cfg) == linear + head
    attn = 12 * cfg.n_layer * 16 * cfg.n_head * cfg.head_dim
    assert flops_per_token(cfg, 16) == 6 * (linear + head) + attn
    assert flops_per_token(cfg, 16, training=False) == pytest.approx((6 * (linear + head) + attn) / 3)


def test_tokens_per_second_leaves_out_evaluation_growth_and_saving(tmp_path, monkeypatch):
    # tok/s and MFU are the training steps' rate: the time of an evaluation, growth event or checkpoint must not
    # lower them (the main job's MFU read 43-56% on the intervals that held a validation pass, 77-97% elsewhere).
    # A fake clock in the trainer: a step takes 1 s, every evaluation, save and growth 100 s.
    import types

    from growlm.train import trainer as trainer_mod
    clock = [0.0]
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0],
                                                                   strftime=trainer_mod.time.strftime))

    def taking(seconds, f):
        def run(*a, **k):
            clock[0] += seconds
            return f(*a, **k)
        return run
    monkeypatch.setattr(Trainer, "train_step", taking(1.0, Trainer.train_step))
    for name in ("evaluate", "save", "grow_now"):
        monkeypatch.setattr(Trainer, name, taking(100.0, getattr(Trainer, name)))
    cfg = config(tmp_path, run=dict(eval_every=1, save_every=1),
                 growth=dict(trigger="steps", steps=[2, 4], operators=[{"operator": "depth", "n": 1}]))
    trainer(cfg, GPT(tiny_config())).fit()
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r.get("kind") == "train" and r["step"] > 0]
    assert len(steps) == 6 and sum(r.get("kind") == "growth" for r in recs) == 2
    # one step of 2 x 8 tokens per logged interval, 1 s each: 16 tokens/s exactly, whatever ran between the steps
    assert [r["tok_s"] for r in steps] == [16.0] * 6


# -- bad input through the CLI -----------------------------------------------------------------------------------
def _yaml(tmp_path, name: str, text: str):
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return str(p)


BASE = """
model: {{name: tiny-llama, init: scratch, overrides: {{vocab_size: 257}}, tokenizer: bytes}}
data: {{path: {data}, seq_len: {seq}, val_fraction: 0.3, cache_dir: {cache}}}
optim: {{lr: {lr}}}
run: {{max_steps: 3, micro_batch: 2, eval_every: 2, out_dir: {out}, save_every: 1, peak_flops: 0, export_hf: false}}
"""


def _cli(argv, capsys):
    from growlm.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return code, lines


@pytest.fixture()
def textdir(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    for i in range(4):
        (d / f"t{i}.txt").write_text(" ".join(f"word{j % 13}" for j in range(400 + i)))
    return d


def test_cli_bad_input_is_one_line_exit_2(tmp_path, textdir, capsys):
    fmt = dict(data=textdir, seq=16, cache=tmp_path / "cache", lr=1e-3, out=tmp_path / "out")
    # unknown config key
    cfg = _yaml(tmp_path, "unknown", BASE.format(**fmt) + "growth: {triger: schedule}\n")
    code, lines = _cli(["train", "--config", cfg], capsys)
    assert code == 2 and len(lines) == 1 and "triger" in lines[0], lines
    # missing / empty data
    for bad, needle in ((tmp_path / "nope.txt", "does not exist"), (tmp_path / "empty", "holds no")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        code, lines = _cli(["train", "--config", _yaml(tmp_path, "m", BASE.format(**{**fmt, "data": bad}))], capsys)
        assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    # sequence length beyond the model's context (tiny-llama: 64)
    code, lines = _cli(["train", "--config", _yaml(tmp_path, "s", BASE.format(**{**fmt, "seq": 65}))], capsys)
    assert code == 2 and len(lines) == 1 and "exceeds the model's context length 64" in lines[0], lines
    # a good run, then a resume with a different config: refused, checkpoints untouched
    good = _yaml(tmp_path, "good", BASE.format(**fmt))
    code, _ = _cli(["train", "--config", good], capsys)
    assert code == 0
    ckpts = tmp_path / "out" / "checkpoints"
    before = {p: p.read_bytes() for p in sorted(ckpts.rglob("*")) if p.is_file()}
    code, lines = _cli(["train", "--config", good, "--run.resume", "true", "--optim.weight_decay", "0.5"], capsys)
    assert code == 2 and len(lines) == 1 and "config differs" in lines[0], lines
    code, lines = _cli(["train", "--config", good], capsys)  # fresh run into a used folder
    assert code == 2 and len(lines) == 1 and "already holds checkpoints" in lines[0], lines
    assert {p: p.read_bytes() for p in sorted(ckpts.rglob("*")) if p.is_file()} == before
    # a diverging run (absurd learning rate): non-finite loss -> skipped steps -> one line, exit 2
    code, lines = _cli(["train", "--config", _yaml(tmp_path, "nan", BASE.format(**{**fmt, "lr": 1e30, "out": tmp_path / "nan"})),
                        "--run.max_steps", "8", "--run.max_nan_skips", "1"], capsys)
    assert code == 2 and len(lines) == 1 and "not finite" in lines[0], lines


# -- checkpoints ---------------------------------------------------------------------------------------------
def test_checkpoints_keep_last_and_best_and_writes_are_atomic(tmp_path, monkeypatch):
    from growlm.train import checkpoint

    cfg = config(tmp_path, run=dict(max_steps=6, save_every=1, keep_last=2, eval_every=1))
    t = trainer(cfg, GPT(tiny_config("llama")))
    t.fit()
    ckpts = tmp_path / "run" / "checkpoints"
    best = json.loads((ckpts / "best.json").read_text())
    names = sorted(p.name for p in checkpoint.list_checkpoints(ckpts))
    assert names == sorted({"step_000005", "step_000006", best["name"]})
    vals = [r["val_loss"] for r in metrics(tmp_path / "run" / "metrics.jsonl") if r.get("val_loss") is not None and r["step"] > 0]
    assert best["val_loss"] == min(vals)
    # a write that fails half-way leaves the previous checkpoints as they were and no partial folder
    before = sorted(p.name for p in ckpts.iterdir())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", boom)
    with pytest.raises(OSError):
        t.save()
    assert sorted(p.name for p in ckpts.iterdir()) == before
    monkeypatch.undo()
    # loading never unpickles code: a tampered optimizer file is refused
    last = checkpoint.latest(ckpts)
    import fractions

    torch.save({"state": {}, "param_groups": [], "x": fractions.Fraction(1, 3)}, last / "optimizer.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        checkpoint.load_checkpoint(last)


def test_train_exports_a_hugging_face_directory(tmp_path):
    from transformers import AutoModelForCausalLM

    from growlm.train import train

    cfg = config(tmp_path, run=dict(max_steps=2, export_hf=True),
                 growth=dict(trigger="steps", steps=[1], operators=[{"operator": "depth", "n": 1}]))
    res = train(cfg, model=GPT(tiny_config("llama")), data=packed())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf").eval()
    x = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, res.model(x), rtol=1e-5, atol=1e-5)
    assert hf.config.num_hidden_layers == 3


@pytest.mark.parametrize("name", ["grow-smollm2-shakespeare", "grow-tiny-scratch", "continue-pretrain", "distill-smollm2",
                                  "distill-smollm2-width"])
def test_recipes_parse(name):
    import yaml

    from tests.conftest import REPO

    d = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    cfg = TrainConfig.from_dict(d)
    assert cfg.run.max_steps >= 1
    if cfg.growth.trigger != "none":
        assert cfg.growth.operators and all(isinstance(op, GrowthSpec) for op in cfg.growth.operators)
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # train_config.json round-trips
    if cfg.distill.teacher:
        assert cfg.distill.student is not None and TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(GrowlmError, match="run.bogus"):
        TrainConfig.from_dict({**d, "run": {**d["run"], "bogus": 1}})


def test_executed_flops_account_for_freezing():
    from growlm.train.flops import executed_flops_per_token

    cfg = tiny_config("llama")  # untied head
    model = GPT(cfg)
    T = 16
    assert executed_flops_per_token(model, T) == flops_per_token(cfg, T)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(f"blocks.{cfg.n_layer - 1}."))
    per_block = sum(m.weight.numel() for m in model.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    attn = 4 * T * cfg.n_head * cfg.head_dim
    head = cfg.vocab_size * cfg.n_embd
    expected = (cfg.n_layer - 1) * (2 * per_block + attn) + (6 * per_block + 3 * attn) + 4 * head
    assert executed_flops_per_token(model, T) == expected
    assert expected < flops_per_token(cfg, T)


def test_bad_growth_operator_is_refused_before_training(tmp_path, textdir, capsys):
    fmt = dict(data=textdir, seq=16, cache=tmp_path / "cache", lr=1e-3, out=tmp_path / "out")
    cfg = _yaml(tmp_path, "badop", BASE.format(**fmt))
    code, lines = _cli(["train", "--config", cfg, "--growth.trigger", "steps", "--growth.steps", "[2]",
                        "--growth.operators", "[{operator: depth, nn: 2}]"], capsys)
    assert code == 2 and len(lines) == 1 and "'nn'" in lines[0], lines  # jsonargparse parses GrowthSpec typed
    assert not (tmp_path / "out").exists()
    # the same flag, well formed: typed specs reach the trainer and the event happens
    code, _ = _cli(["train", "--config", cfg, "--growth.trigger", "steps", "--growth.steps", "[2]",
                    "--growth.operators", "[{operator: depth, n: 2, where: top}]"], capsys)
    assert code == 0
    events = [r for r in metrics(tmp_path / "out" / "metrics.jsonl") if r["kind"] == "growth"]
    assert [(e["step"], e["after"]["n_layer"]) for e in events] == [(2, 4)]
    saved = json.loads((tmp_path / "out" / "checkpoints" / "step_000003" / "train_config.json").read_text())
    assert TrainConfig.from_dict(saved).growth.operators == [GrowthSpec("depth", n=2, where="top")]
