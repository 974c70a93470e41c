"""Distillation runs (the Trainer with a teacher): online and cached teachers, exact resume, the teacher's
identity in checkpoints, the student cut from the teacher, and bad input."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from growlm.distill.objectives import ObjectiveConfig
from growlm.distill.prune import StudentSpec
from growlm.errors import GrowlmError
from growlm.models.model import GPT
from growlm.train import Trainer
from growlm.train.config import DistillConfig, TrainConfig
from tests.conftest import tiny_config
from tests.test_train import config, metrics, packed


def teacher_model(seed: int = 1, n_layer: int = 4) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config("llama", n_layer=n_layer)).eval()


def distill_cfg(tmp_path, name="run", **distill) -> TrainConfig:
    cfg = config(tmp_path, name, run=dict(max_steps=6, save_every=2))
    d = dict(teacher="in-memory", targets_dir=str(tmp_path / "targets"))
    d.update(distill)
    return dataclasses.replace(cfg, distill=DistillConfig(**d))


def student_of(teacher: GPT, n_layer: int = 2) -> GPT:
    from growlm.distill.prune import make_student

    s, _ = make_student(teacher, StudentSpec(layers=list(range(n_layer))))
    return s


def run(cfg: TrainConfig, student: GPT, teacher: GPT, stop_after: int | None = None):
    tr = Trainer(cfg, copy.deepcopy(student), packed(), teacher=copy.deepcopy(teacher))
    return tr, tr.fit(stop_after=stop_after)


def test_logit_kd_run_logs_every_term_and_the_teacher(tmp_path):
    t = teacher_model()
    cfg = distill_cfg(tmp_path, objective=ObjectiveConfig(ce_weight=0.5, kd_weight=1.0, hidden_weight=0.3,
                                                          hidden_layers="uniform", projector="orthogonal"))
    tr, res = run(cfg, student_of(t), t)
    recs = metrics(tmp_path / "run" / "metrics.jsonl")
    dist = [r for r in recs if r.get("kind") == "distill"]
    first = next(r for r in recs if r.get("kind") == "train")
    assert first["step"] == 0 and first["teacher_val_loss"] == pytest.approx(tr.evaluate(model=tr.distill.teacher))
    assert len(dist) == 1 and dist[0]["teacher_params"] == t.num_params() and dist[0]["student_params"] == tr.model.num_params()
    assert dist[0]["teacher_config"]["n_layer"] == 4 and dist[0]["student_config"]["n_layer"] == 2
    steps = [r for r in recs if r.get("kind") == "train" and r["step"] > 0]
    assert all({"loss", "kd", "hidden"} <= set(r) for r in steps)
    # the logged total is ce_weight CE + kd_weight KD + hidden_weight H (the loss a step minimises)
    assert res.val_loss < first["val_loss"]
    # projectors trained with the student and stayed orthogonal
    w = tr.distill.objective.projectors[0].weight
    assert torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=1e-5)
    assert tr.state.teacher and len(tr.state.teacher) >= 16


def test_cached_targets_with_full_vocab_equal_the_online_teacher(tmp_path):
    """k = V in float32: the cached run follows the online run step for step."""
    t = teacher_model()
    s = student_of(t)
    obj = ObjectiveConfig(ce_weight=1.0, kd_weight=1.0, temperature=2.0)
    _, a = run(distill_cfg(tmp_path, "online", objective=obj), s, t)
    _, b = run(distill_cfg(tmp_path, "cached", objective=obj, targets="cached", top_k=96, targets_dtype="float32"), s, t)
    ma, mb = metrics(tmp_path / "online" / "metrics.jsonl"), metrics(tmp_path / "cached" / "metrics.jsonl")
    for ra, rb in zip(ma, mb):
        for k in ("loss", "kd", "val_loss"):
            if ra.get(k) is not None:
                assert rb[k] == pytest.approx(ra[k], abs=2e-5), (k, ra["step"])
    # the online run counts the teacher's forward in its FLOPs; the cached one does not
    assert ma[-1]["flops"] > mb[-1]["flops"]


@pytest.mark.parametrize("targets", ["online", "cached"])
def test_killed_distillation_resumes_exactly(tmp_path, targets):
    t = teacher_model()
    s = student_of(t)
    obj = ObjectiveConfig(ce_weight=1.0, kd_weight=1.0, hidden_weight=0.0 if targets == "cached" else 0.5)
    full = distill_cfg(tmp_path, "full", objective=obj, targets=targets)
    run(full, s, t)
    part = distill_cfg(tmp_path, "part", objective=obj, targets=targets)
    run(part, s, t, stop_after=3)  # killed after step 3; the checkpoint of step 2 survives
    resumed = dataclasses.replace(part, run=dataclasses.replace(part.run, resume=True))
    run(resumed, s, t)
    a, b = metrics(tmp_path / "full" / "metrics.jsonl"), metrics(tmp_path / "part" / "metrics.jsonl")
    assert a == b


def test_resume_with_another_teacher_is_refused(tmp_path):
    t = teacher_model()
    s = student_of(t)
    cfg = distill_cfg(tmp_path)
    run(cfg, s, t, stop_after=2)
    resumed = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=True))
    with pytest.raises(GrowlmError, match="another teacher"):
        run(resumed, s, teacher_model(seed=7))


def test_config_round_trip_and_bad_combinations(tmp_path):
    cfg = distill_cfg(tmp_path, student=StudentSpec(n_layer=2), objective=ObjectiveConfig(kd_weight=0.5))
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.distill == cfg.distill and isinstance(back.distill.student, StudentSpec)
    with pytest.raises(GrowlmError, match="forward_kl and soft_ce"):
        DistillConfig(teacher="x", targets="cached", objective=ObjectiveConfig(logits="reverse_kl"))
    with pytest.raises(GrowlmError, match="activations"):
        DistillConfig(teacher="x", targets="cached", objective=ObjectiveConfig(hidden_weight=1.0))
    with pytest.raises(GrowlmError, match="need a teacher"):
        DistillConfig(student=StudentSpec(n_layer=2))
    with pytest.raises(GrowlmError, match="exclude each other"):
        TrainConfig.from_dict({"distill": {"teacher": "x"}, "reg": {"kd_weight": 1.0}})
    with pytest.raises(GrowlmError, match="distill.objective.bogus"):
        TrainConfig.from_dict({"distill": {"teacher": "x", "objective": {"bogus": 1}}})


def test_teacher_with_a_larger_vocabulary_is_refused(tmp_path):
    t = GPT(tiny_config("llama", vocab_size=128))
    with pytest.raises(GrowlmError, match="one tokenizer"):
        run(distill_cfg(tmp_path), GPT(tiny_config("llama")), t)


# -- growlm distill end to end ---------------------------------------------------------------------------
def _teacher_dir(tmp_path) -> str:
    from growlm.models.hf import save_hf

    torch.manual_seed(3)
    save_hf(GPT(tiny_config("llama", vocab_size=257, n_layer=4)), tmp_path / "teacher", None)
    return str(tmp_path / "teacher")


def _distill_argv(tmp_path, teacher: str, *extra: str) -> list[str]:
    (tmp_path / "texts").mkdir(exist_ok=True)
    for i in range(4):
        (tmp_path / "texts" / f"t{i}.txt").write_text(" ".join(f"word{j % (5 + i)} thing{j % 7}" for j in range(300)))
    return ["distill", "--distill.teacher", teacher, "--model.tokenizer", "bytes",
            "--distill.student", "{n_layer: 2, depth_by: importance, calibration_batches: 2, calibration_seq_len: 16}",
            "--data.path", str(tmp_path / "texts"), "--data.seq_len", "16", "--data.val_fraction", "0.3",
            "--data.cache_dir", str(tmp_path / "cache"), "--run.max_steps", "4", "--run.eval_every", "2",
            "--run.micro_batch", "2", "--run.peak_flops", "0", "--run.out_dir", str(tmp_path / "out"),
            "--gen_tokens", "4", "--distill.targets_dir", str(tmp_path / "targets"), *extra]


def test_growlm_distill_writes_student_comparison_and_card(tmp_path, capsys):
    from huggingface_hub import ModelCard

    from growlm.cli import main

    teacher = _teacher_dir(tmp_path)
    assert main(_distill_argv(tmp_path, teacher, "--distill.targets", "cached", "--distill.top_k", "32")) == 0
    out = capsys.readouterr().out
    assert "teacher vs student" in out and "-blocks: 4 x Block" in (tmp_path / "out" / "README.md").read_text()
    res = json.loads((tmp_path / "out" / "distill_results.json").read_text())
    recs = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    dist = next(r for r in recs if r.get("kind") == "distill")
    assert res["teacher"]["params"] == dist["teacher_params"] and res["student"]["params"] == dist["student_params"]
    assert dist["student"]["init"] == "pruned" and len(dist["student"]["kept_layers"]) == 2
    assert dist["top_k"] == 32 and res["student"]["gen_tok_s"] > 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "knowledge-distillation" in card.data.tags and "pruning" in card.data.tags
    assert "## Teacher vs student" in card.text and "top-32 cache" in card.text
    # the student saved in hf/ loads and is the 2-layer student
    from growlm.models.hf import load_model

    student, _ = load_model(str(tmp_path / "out" / "hf"))
    assert student.config.n_layer == 2


def test_a_stale_teacher_cache_is_refused_with_one_line(tmp_path, capsys):
    from growlm.cli import main

    teacher = _teacher_dir(tmp_path)
    argv = _distill_argv(tmp_path, teacher, "--distill.targets", "cached", "--run.export_hf", "false")
    assert main(argv) == 0
    meta = next((tmp_path / "targets").glob("*/meta.json"))
    m = json.loads(meta.read_text())
    m["fingerprint"]["teacher"] = "0" * 16  # the folder now holds another teacher's predictions
    meta.write_text(json.dumps(m))
    capsys.readouterr()
    before = meta.read_bytes()
    assert main([*argv, "--run.overwrite", "true"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "stale" in err[0] and "teacher" in err[0]
    assert meta.read_bytes() == before
