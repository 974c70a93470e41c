"""Resume survives what happens to real run folders: another spelling of the path, a moved folder, a
damaged newest checkpoint, a torn metrics line, stale temporaries, and a diverged run resumed with a lower
learning rate. Each compares against the uninterrupted run bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from growlm.errors import GrowlmError
from growlm.models.model import GPT
from growlm.train import Trainer
from growlm.train import checkpoint as ckpt
from tests.conftest import tiny_config
from tests.test_train import RESUME_SECTIONS, config, metrics, packed, params


def _resume(cfg, out_dir, model, notes=None, **run):
    c = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(out_dir), resume=True, **run))
    on = (lambda kind, rec: notes.append(rec["message"]) if kind == "info" else None) if notes is not None else None
    return Trainer(c, model=copy.deepcopy(model), data=packed(), callback=on)


def _losses(path):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in metrics(path) if r.get("kind") == "train"]


@pytest.fixture()
def full_run(tmp_path):
    model = GPT(tiny_config("llama"))
    cfg = config(tmp_path, "full", **copy.deepcopy(RESUME_SECTIONS))
    res = Trainer(cfg, model=copy.deepcopy(model), data=packed()).fit()
    return model, res, tmp_path / "full" / "metrics.jsonl"


def test_resume_by_another_path_spelling_and_after_a_move_is_exact(tmp_path, monkeypatch, full_run):
    model, full, full_metrics = full_run
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, "x", **copy.deepcopy(RESUME_SECTIONS))
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir="runs/x"))  # started relative
    Trainer(cfg, model=copy.deepcopy(model), data=packed()).fit(stop_after=2)
    notes: list[str] = []
    t = _resume(cfg, f"{tmp_path}/runs/../runs/./x", model, notes)  # resumed by an absolute, odd spelling
    assert t.state.step == 2
    t.fit(stop_after=5)
    assert any("run.out_dir 'runs/x' ->" in n for n in notes), notes
    shutil.move(tmp_path / "runs" / "x", tmp_path / "moved")  # then the folder moves
    notes.clear()
    t = _resume(cfg, "moved", model, notes)
    assert t.state.step == 5 and any("-> 'moved'" in n for n in notes), notes
    res = t.fit()
    assert _losses(tmp_path / "moved" / "metrics.jsonl") == _losses(full_metrics)
    assert metrics(tmp_path / "moved" / "metrics.jsonl") == metrics(full_metrics)
    for n, p in params(full.model).items():
        assert torch.equal(p, params(res.model)[n]), n


def test_damaged_newest_checkpoint_and_torn_metrics_fall_back_and_finish_exact(tmp_path, full_run):
    model, full, full_metrics = full_run
    cfg = config(tmp_path, "d", **copy.deepcopy(RESUME_SECTIONS))
    Trainer(cfg, model=copy.deepcopy(model), data=packed()).fit(stop_after=5)
    out = tmp_path / "d"
    newest = out / "checkpoints" / "step_000005" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated weights
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 6, "lo')  # killed mid-line
    (out / "checkpoints" / ".step_000006.tmp12345-abcd").mkdir()  # interrupted writes
    (out / "checkpoints" / ".step_000006.tmp12345-abcd" / "model.safetensors").write_bytes(b"partial")
    (out / ".hf.tmp999").mkdir()
    (out / "checkpoints" / ".latest.json.tmp77").write_text("{")
    notes: list[str] = []
    t = _resume(cfg, out, model, notes)
    assert t.state.step == 4  # the previous intact checkpoint
    assert any("skipped checkpoint step_000005: model.safetensors has" in n for n in notes), notes
    assert any("dropped a torn last line" in n for n in notes), notes
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name or ".old" in p.name]
    res = t.fit()
    assert metrics(out / "metrics.jsonl") == metrics(full_metrics)
    for n, p in params(full.model).items():
        assert torch.equal(p, params(res.model)[n]), n
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name or ".old" in p.name]
    assert ckpt.verify_checkpoint(out / "checkpoints" / "step_000008") is None


def test_every_checkpoint_damaged_is_one_line(tmp_path):
    model = GPT(tiny_config("llama"))
    cfg = config(tmp_path, "e", run=dict(max_steps=2, save_every=1))
    Trainer(cfg, model=copy.deepcopy(model), data=packed()).fit()
    for p in ckpt.list_checkpoints(tmp_path / "e" / "checkpoints"):
        (p / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(GrowlmError, match="no usable checkpoint.*optimizer.pt has 7 bytes"):
        _resume(cfg, tmp_path / "e", model)


def test_a_diverged_run_keeps_a_finite_checkpoint_and_resumes_with_a_lower_lr(tmp_path):
    # Adam at lr 30 without clipping on the tiny model: the loss rises, then is non-finite from step 34 on
    model = GPT(tiny_config("llama"))
    cfg = config(tmp_path, "div", run=dict(max_steps=60, save_every=1, eval_every=1, max_nan_skips=2, keep_last=3),
                 optim=dict(lr=30.0, warmup_steps=0, decay="constant", grad_clip=0))
    with pytest.raises(GrowlmError, match=r"not finite at step (\d+).*kept: .*step_(\d+); resume from it") as ei:
        Trainer(cfg, model=copy.deepcopy(model), data=packed()).fit()
    out = tmp_path / "div"
    kept = ckpt.latest(out / "checkpoints")
    assert kept is not None and str(kept) in str(ei.value)
    recs = metrics(out / "metrics.jsonl")
    streak = [r["step"] for r in recs if r.get("skipped")]
    # the weights after step streak[0] - 1 gave the first non-finite loss (a skipped step keeps them), so the
    # checkpoint kept is the one before: its weights are finite and so was the training loss computed on them
    assert streak and int(kept.name[5:]) == streak[0] - 2
    weights = load_file(str(kept / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    val_at = {r["step"]: r["val_loss"] for r in recs if r.get("val_loss") is not None}
    state = json.loads((kept / "state.json").read_text())
    assert state["last_val"] == val_at[streak[0] - 2] and math.isfinite(state["last_val"])
    assert all(int(p.name[5:]) < streak[0] for p in ckpt.list_checkpoints(out / "checkpoints"))  # none from the streak
    # the advice of the message: resume with a lower learning rate
    notes: list[str] = []
    t = _resume(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-3)), out, model, notes,
                max_steps=streak[0] + 4)
    assert t.state.step == streak[0] - 2
    assert any("optim.lr 30.0 -> 0.001" in n for n in notes) and any("run.max_steps 60 ->" in n for n in notes), notes
    res = t.fit()
    assert res.step == streak[0] + 4 and math.isfinite(res.val_loss)
    after = [r for r in metrics(out / "metrics.jsonl") if r["step"] > streak[0] - 2 and r.get("kind") == "train"]
    assert len(after) == 6 and all(r["skipped"] if r.get("loss") is None else math.isfinite(r["loss"]) for r in after)
    assert sum(1 for r in after if r.get("skipped")) <= cfg.run.max_nan_skips  # it trains on to the end
