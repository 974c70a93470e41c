"""Growing without forgetting, the Trainer's side: the learning-rate re-warm after growth, the KD teacher
(per-event snapshot or the base model), honest executed FLOPs (KD teacher and EWC Fisher counted), replay
mixed into the training stream; each exact across a kill and resume."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from growlm.train import trainer as trainer_mod
from growlm.errors import GrowlmError
from growlm.models.model import GPT
from growlm.train import GrowthConfig, RegConfig, Trainer, lr_at, setup, train
from growlm.train.config import TrainConfig, config_differences, comparable
from growlm.train.data import BlockSampler, ByteTokenizer, DataConfig, prepare_data
from growlm.train.flops import flops_per_token
from tests.conftest import tiny_config
from tests.test_train import SEQ, config, metrics, packed, params, trainer


def _train_lines(path) -> list[dict]:
    return [r for r in metrics(path) if r.get("kind") == "train" and r["step"] > 0]


# -- 1. learning-rate re-warm ------------------------------------------------------------------------------
def test_lr_rewarm_ramps_every_parameter_after_each_event(tmp_path, monkeypatch):
    k, events = 3, [2, 4]  # the second event comes mid-ramp: it restarts the ramp
    cfg = config(tmp_path, run=dict(max_steps=9), optim=dict(warmup_steps=1, decay="cosine"),
                 growth=dict(trigger="steps", steps=events, operators=[{"operator": "depth", "n": 1}],
                             lr_rewarm_steps=k))
    used: list[float] = []
    real = trainer_mod.multiplied_step

    def spy(optimizer, model, m):  # the rate the optimizer really steps with, every group
        rates = {g["lr"] for g in optimizer.param_groups}
        assert len(rates) == 1
        used.append(rates.pop())
        return real(optimizer, model, m)

    monkeypatch.setattr(trainer_mod, "multiplied_step", spy)
    trainer(cfg, GPT(tiny_config("llama"))).fit()
    logged = [r["lr"] for r in _train_lines(tmp_path / "run" / "metrics.jsonl")]
    want = []
    for i in range(9):  # optimizer step i (0-based) runs after the events at steps <= i
        last = max((e for e in events if e <= i), default=None)
        f = 1.0 if last is None or i - last >= k else (i - last + 1) / k
        want.append(lr_at(i, cfg.optim, 9) * f)
    assert want[2] == pytest.approx(lr_at(2, cfg.optim, 9) / 3) and want[4] == pytest.approx(lr_at(4, cfg.optim, 9) / 3)
    assert logged == pytest.approx(want, rel=1e-12, abs=0)
    assert used == pytest.approx(want, rel=1e-12, abs=0)


def test_lr_rewarm_off_and_validation():
    assert GrowthConfig().lr_rewarm_steps == 0
    with pytest.raises(GrowlmError, match="lr_rewarm_steps must be >= 0"):
        GrowthConfig(lr_rewarm_steps=-1)


# -- exact resume of all four together ------------------------------------------------------------------------
REGROWTH_SECTIONS = dict(
    run=dict(max_steps=8, save_every=1, keep_last=3),
    growth=dict(trigger="steps", steps=[2, 5], operators=[{"operator": "depth", "n": 1}], lr_rewarm_steps=3),
    reg=dict(kd_weight=0.5, kd_teacher="base", ewc_lambda=10.0, ewc_samples=3),
)


@pytest.mark.parametrize("kill_at", [3, 6])  # mid-ramp after event 1 (snapshot taken) and after event 2
def test_resume_mid_rewarm_with_base_teacher_is_exact(tmp_path, kill_at):
    model = GPT(tiny_config("llama"))
    full = trainer(config(tmp_path, "full", **copy.deepcopy(REGROWTH_SECTIONS)), model)
    full_res = full.fit()
    cfg = config(tmp_path, "killed", **copy.deepcopy(REGROWTH_SECTIONS))
    trainer(cfg, model).fit(stop_after=kill_at)
    resumed = Trainer(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=True)),
                      model=copy.deepcopy(model), data=packed())
    assert resumed.state.step == kill_at
    assert resumed.teacher.config.n_layer == 2  # the checkpoint kept the model before event 1 as the teacher
    for n, p in params(resumed.teacher).items():
        assert torch.equal(p, params(full.teacher)[n]), n
    res = resumed.fit()
    for n, p in params(full_res.model).items():
        assert torch.equal(p, params(res.model)[n]), n
    assert metrics(tmp_path / "full" / "metrics.jsonl") == metrics(tmp_path / "killed" / "metrics.jsonl")


def test_a_checkpoint_without_the_new_keys_resumes_with_their_defaults():
    saved = comparable(TrainConfig().to_dict())
    for sec, key in (("growth", "lr_rewarm_steps"), ("reg", "kd_teacher"), ("data", "replay"), ("data", "replay_fraction")):
        del saved[sec][key]  # a checkpoint written before these fields existed
    assert config_differences(saved, comparable(TrainConfig().to_dict())) == []
    now = comparable(TrainConfig(reg=RegConfig(kd_weight=1.0, kd_teacher="base")).to_dict())
    assert any("reg.kd_teacher" in d for d in config_differences(saved, now))


# -- 2. the KD teacher -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kd_teacher", ["base", "snapshot"])
def test_kd_teacher_base_is_the_model_before_the_first_event(tmp_path, kd_teacher):
    base = GPT(tiny_config("llama"))
    cfg = config(tmp_path, run=dict(max_steps=5),  # the first event before any step: the base is the given model
                 growth=dict(trigger="steps", steps=[0, 3], operators=[{"operator": "depth", "n": 1}]),
                 reg=dict(kd_weight=1.0, kd_teacher=kd_teacher))
    t = trainer(cfg, base)
    res = t.fit()
    assert [e["step"] for e in res.events] == [0, 3]
    x = packed().block("val", 0, SEQ)[None, :-1]
    with torch.no_grad():
        got, want = t.teacher(x), base(x)
    if kd_teacher == "base":
        assert t.teacher.config.n_layer == 2
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:  # the snapshot before event 2: one more layer, and trained for 3 steps
        assert t.teacher.config.n_layer == 3 and not torch.allclose(got, want)


def test_kd_teacher_validation():
    with pytest.raises(GrowlmError, match="kd_teacher"):
        RegConfig(kd_teacher="teacher")


# -- 3. honest FLOPs ---------------------------------------------------------------------------------------------
def _flops(path) -> float:
    return _train_lines(path)[-1]["flops"]


@pytest.mark.parametrize("kd_teacher", ["snapshot", "base"])
def test_kd_adds_exactly_the_teachers_forward_flops(tmp_path, kd_teacher):
    model = GPT(tiny_config("llama"))
    growth = dict(trigger="steps", steps=[2, 4], operators=[{"operator": "depth", "n": 1}])
    trainer(config(tmp_path, "plain", growth=growth), model).fit()
    trainer(config(tmp_path, "kd", growth=growth, reg=dict(kd_weight=1.0, kd_teacher=kd_teacher)), model).fit()
    tokens_per_step = 2 * SEQ  # micro_batch 2
    layers = [2, 2] if kd_teacher == "base" else [2, 3]  # the teacher after event 1 (steps 3-4), event 2 (steps 5-6)
    want = sum(2 * tokens_per_step * flops_per_token(tiny_config("llama", n_layer=n), SEQ, training=False) for n in layers)
    assert want > 0
    assert _flops(tmp_path / "kd" / "metrics.jsonl") - _flops(tmp_path / "plain" / "metrics.jsonl") == want


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_ewc_adds_exactly_its_fisher_flops_at_each_event(tmp_path, fisher):
    model = GPT(tiny_config("llama"))
    growth = dict(trigger="steps", steps=[2, 4], operators=[{"operator": "depth", "n": 1}])
    trainer(config(tmp_path, "plain", growth=growth), model).fit()
    res = trainer(config(tmp_path, "ewc", growth=growth, reg=dict(ewc_lambda=1.0, ewc_samples=3, ewc_fisher=fisher)), model).fit()
    # every parameter trains (old_params=train): one forward + backward of the grown model per Fisher token
    # (6N + 12 L T d_attn), and the true Fisher's label-sampling forward on top
    per_token = {n: flops_per_token(tiny_config("llama", n_layer=n), SEQ) * (4 / 3 if fisher == "true" else 1) for n in (3, 4)}
    want = sum(3 * SEQ * per_token[n] for n in (3, 4))
    assert [e["fisher_flops"] for e in res.events] == pytest.approx([3 * SEQ * per_token[n] for n in (3, 4)], rel=1e-12)
    got = _flops(tmp_path / "ewc" / "metrics.jsonl") - _flops(tmp_path / "plain" / "metrics.jsonl")
    assert got == pytest.approx(want, rel=1e-12)


# -- 4. replay -----------------------------------------------------------------------------------------------------
def _texts(tmp_path):
    main = tmp_path / "main"
    main.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # lower-case letters only
        (main / f"doc{i}.txt").write_text("".join(rng.choice(list("abcdefgh "), 3000)))
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps({"text": "ZYX" * 40 + str(i)}) + "\n" for i in range(3)))
    return str(main), str(replay)


def test_replay_takes_its_fraction_of_the_training_stream_and_of_the_sampled_blocks(tmp_path):
    main, replay = _texts(tmp_path)
    tok, seq = ByteTokenizer(), 16
    common = dict(path=main, seq_len=seq, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    plain = prepare_data(DataConfig(**common), tok)
    mixed = prepare_data(DataConfig(**common, replay=replay, replay_fraction=0.25), tok)
    np.testing.assert_array_equal(mixed.val, plain.val)  # validation unchanged
    n_main = len(plain.train)
    np.testing.assert_array_equal(mixed.train[:n_main], plain.train)
    assert plain.n_replay == 0 and mixed.n_replay == len(mixed.train) - n_main
    assert abs(mixed.n_replay / len(mixed.train) - 0.25) < 1e-3
    assert set(np.asarray(mixed.train[n_main:]).tolist()) <= set(b"ZYX0123456789") | {256}  # replay text and EOS
    sampler = BlockSampler(mixed.n_blocks("train", seq), seed=3)
    drawn = sampler.next_indices(600)  # part of an epoch: about 25% replay, not exactly
    from_replay = [bool((mixed.block("train", i, seq) == ord("Z")).any()) for i in drawn]
    assert abs(sum(from_replay) / len(drawn) - 0.25) < 0.05
    # the cache key names the replay text and its fraction: a change is a new cache, never a stale one
    other = prepare_data(DataConfig(**common, replay=replay, replay_fraction=0.5), tok)
    assert len({plain.key, mixed.key, other.key}) == 3
    assert abs(other.n_replay / len(other.train) - 0.5) < 1e-3


def _replay_config(tmp_path, out: str, **run) -> TrainConfig:
    main, replay = str(tmp_path / "main"), str(tmp_path / "replay.jsonl")  # written by _texts
    return TrainConfig.from_dict({  # what `growlm train --config` reads
        "model": {"name": "tiny-llama", "init": "scratch", "overrides": {"vocab_size": 257}, "tokenizer": "bytes"},
        "data": {"path": main, "seq_len": 16, "val_fraction": 0.2, "cache_dir": str(tmp_path / "cache"),
                 "replay": replay, "replay_fraction": 0.3},
        "run": {"max_steps": 4, "micro_batch": 2, "eval_every": 2, "log_every": 1, "save_every": 1, "out_dir": str(tmp_path / out),
                "peak_flops": 0, "export_hf": False, "dtype": "float64", **run},
    })


def test_replay_run_resumes_exactly(tmp_path):
    _texts(tmp_path)
    full = train(_replay_config(tmp_path, "full"))
    assert full.step == 4 and math.isfinite(full.val_loss)
    cfg = _replay_config(tmp_path, "killed")
    built = setup(cfg)
    assert built.data.n_replay > 0
    Trainer(cfg, built.model, built.data, built.tokenizer).fit(stop_after=2)
    res = train(_replay_config(tmp_path, "killed", resume=True))  # rebuilds the replay stream from the config
    for n, p in params(full.model).items():
        assert torch.equal(p, params(res.model)[n]), n
    assert metrics(tmp_path / "full" / "metrics.jsonl") == metrics(tmp_path / "killed" / "metrics.jsonl")


@pytest.mark.parametrize("kw, needle", [
    (dict(replay="r.txt", replay_fraction=1.0), r"replay_fraction must be in \[0, 1\)"),
    (dict(replay="r.txt", replay_fraction=-0.1), r"replay_fraction must be in \[0, 1\)"),
    (dict(replay="r.txt", replay_fraction=float("nan")), r"replay_fraction must be in \[0, 1\)"),
    (dict(replay="r.txt"), "go together"),
    (dict(replay_fraction=0.2), "go together"),
])
def test_replay_config_validation(kw, needle):
    with pytest.raises(GrowlmError, match=needle):
        DataConfig(**kw)


def test_missing_or_empty_replay_is_one_error(tmp_path):
    main, _ = _texts(tmp_path)
    (tmp_path / "empty.txt").write_text("  \n")
    for path, needle in ((tmp_path / "nope.txt", "does not exist"), (tmp_path / "empty.txt", "no text found")):
        cfg = DataConfig(path=main, seq_len=16, cache_dir=str(tmp_path / "cache"), replay=str(path), replay_fraction=0.2)
        with pytest.raises(GrowlmError, match=f"data.replay: .*{needle}") as e:
            prepare_data(cfg, ByteTokenizer())
        assert "\n" not in str(e.value)
