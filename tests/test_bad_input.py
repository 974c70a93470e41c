"""Bad input, command by command: exit code 2, exactly one line on stderr, no traceback, and every file that
existed before the command unchanged (hashed before and after). Run in-process through `growlm.cli.main`
(a few as real subprocesses, to see what a user's terminal sees).

Each case is (name, files to create, argv, expected substring); paths in argv and files are relative to the
case's own folder. Files: "PATH/" makes a folder, "PATH" = bytes writes a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from growlm.cli import main
from growlm.errors import GrowlmError
from growlm.models.hf import save_hf
from growlm.models.model import GPT
from growlm.models.tokenizer import train_bpe
from growlm.train import GrowthConfig, OptimConfig, RegConfig, RunConfig, TrainConfig
from growlm.train.data import DataConfig
from tests.conftest import tiny_config

WORDS = " ".join(f"word{j % 13} thing{j % 7}" for j in range(600))
TEXTS = {f"texts/t{i}.txt": (WORDS + f" end{i}").encode() for i in range(4)}
BINARY = bytes(range(256)) * 8
LATIN1 = ("caf\xe9 na\xefve \xfc" * 200).encode("latin-1")  # mostly invalid UTF-8, no NUL bytes


def _yaml(**sections) -> bytes:
    base = {
        "model": {"name": "tiny-llama", "init": "scratch", "overrides": {"vocab_size": 257}, "tokenizer": "bytes"},
        "data": {"path": "texts", "seq_len": 16, "val_fraction": 0.3, "cache_dir": "cache"},
        "run": {"max_steps": 2, "micro_batch": 2, "eval_every": 1, "out_dir": "out", "save_every": 1,
                "peak_flops": 0, "export_hf": False},
    }
    for sec, kv in sections.items():
        base.setdefault(sec, {}).update(kv)
    return json.dumps(base).encode()  # JSON is YAML


FINISHED_RUN = {"out/metrics.jsonl": b'{"kind": "train", "step": 0}\n', "out/hf/config.json": b"{}"}
HF_CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64}


def _cfg(**changes) -> bytes:
    return json.dumps({**HF_CFG, **changes}).encode()


CASES = [
    # -- convert: outputs
    ("convert-out-is-file", {"target": b"precious"}, ["convert", "--model", "@good", "--out", "target"], "is not a folder"),
    ("convert-out-exists", {"target/keep.txt": b"precious"}, ["convert", "--model", "@good", "--out", "target"], "--overwrite"),
    ("convert-out-under-file", {"f": b"x"}, ["convert", "--model", "@good", "--out", "f/sub"], "is a file"),
    ("convert-format", {}, ["convert", "--model", "@good", "--out", "o", "--format", "onnx"], "format must be"),
    ("convert-missing-model", {}, ["convert", "--model", "nope", "--out", "o"], "no such file"),
    # -- grow
    ("grow-out-is-file", {"target": b"precious"}, ["grow", "--model", "@good", "--depth", "1", "--out", "target"], "is not a folder"),
    ("grow-out-exists", {"target/model.safetensors": b"old model"}, ["grow", "--model", "@good", "--depth", "1", "--out", "target"], "--overwrite"),
    ("grow-depth-negative", {}, ["grow", "--model", "@good", "--depth", "-1", "--out", "o"], "--depth must be >= 0"),
    ("grow-factor-zero", {}, ["grow", "--model", "@good", "--factor", "0", "--out", "o"], "--factor must be"),
    ("grow-width-negative", {}, ["grow", "--model", "@good", "--width", "-4", "--out", "o"], "--width must be"),
    ("grow-heads-negative", {}, ["grow", "--model", "@good", "--heads", "-2", "--out", "o"], "--heads must be"),
    ("grow-nothing", {}, ["grow", "--model", "@good", "--out", "o"], "nothing to grow"),
    ("grow-dtype", {}, ["grow", "--model", "@good", "--depth", "1", "--out", "o", "--dtype", "bfloat16"], "dtype must be"),
    ("grow-where", {}, ["grow", "--model", "@good", "--depth", "1", "--where", "middle", "--out", "o"], "where="),
    ("grow-format", {}, ["grow", "--model", "@good", "--depth", "1", "--format", "onnx", "--out", "o"], "format must be"),
    ("grow-noise", {}, ["grow", "--model", "@good", "--factor", "2", "--noise", "-1", "--out", "o"], "noise must be"),
    ("grow-missing-model", {}, ["grow", "--model", "nope", "--depth", "1", "--out", "o"], "no such file"),
    # -- prune: every target is checked against the teacher before any calibration or writing
    ("prune-missing-layer", {}, ["prune", "--model", "@good", "--layers", "0,5", "--out", "o"], "do not exist"),
    ("prune-larger-target", {}, ["prune", "--model", "@good", "--ffn-size", "128", "--out", "o"], "larger than the teacher"),
    ("prune-more-layers", {}, ["prune", "--model", "@good", "--n-layer", "3", "--out", "o"], "larger than the teacher"),
    ("prune-not-gqa", {}, ["prune", "--model", "@good", "--n-head", "3", "--out", "o"], "GQA-consistent"),
    ("prune-group-gains-heads", {}, ["prune", "--model", "@good", "--n-head", "4", "--n-kv-head", "1", "--out", "o"], "cannot gain heads"),
    ("prune-out-exists", {"target/model.safetensors": b"old model"}, ["prune", "--model", "@good", "--layers", "0", "--out", "target"], "--overwrite"),
    ("prune-nothing", {}, ["prune", "--model", "@good", "--out", "o"], "nothing to prune"),
    ("prune-depth-by", {}, ["prune", "--model", "@good", "--n-layer", "1", "--depth-by", "random", "--out", "o"], "depth_by must be"),
    ("prune-missing-calibration", {}, ["prune", "--model", "@good", "--layers", "0", "--calibration", "nope.txt", "--seq-len", "16", "--out", "o"], "does not exist"),
    ("prune-seq-len", {}, ["prune", "--model", "@good", "--layers", "0", "--seq-len", "128", "--out", "o"], "context length 64"),
    # -- tokenizer
    ("tokenizer-out-exists", {"tok/tokenizer.json": b"{}", "a.txt": WORDS.encode()},
     ["tokenizer", "--out", "tok", "--vocab_size", "300", "--files", "[a.txt]"], "--overwrite"),
    ("tokenizer-out-is-file", {"tok": b"precious", "a.txt": WORDS.encode()},
     ["tokenizer", "--out", "tok", "--vocab_size", "300", "--files", "[a.txt]"], "is not a folder"),
    ("tokenizer-empty-file", {"a.txt": b""}, ["tokenizer", "--out", "tok", "--vocab_size", "300", "--files", "[a.txt]"], "empty"),
    ("tokenizer-binary-file", {"a.txt": BINARY}, ["tokenizer", "--out", "tok", "--vocab_size", "300", "--files", "[a.txt]"], "not a text file"),
    ("tokenizer-latin1-file", {"a.txt": LATIN1}, ["tokenizer", "--out", "tok", "--vocab_size", "300", "--files", "[a.txt]"], "invalid UTF-8"),
    ("tokenizer-vocab-too-small", {"a.txt": WORDS.encode()}, ["tokenizer", "--out", "tok", "--vocab_size", "10", "--files", "[a.txt]"], "vocab_size must be"),
    ("tokenizer-missing-file", {}, ["tokenizer", "--out", "tok", "--vocab_size", "300", "--files", "[nope.txt]"], "no such file"),
    ("tokenizer-nested-too-big", {"a.txt": WORDS.encode()},
     ["tokenizer", "--out", "tok", "--vocab_size", "300", "--files", "[a.txt]", "--nested", "[400]"], "nested sizes"),
    ("tokenizer-text-too-small", {"a.txt": b"ab ab ab"}, ["tokenizer", "--out", "tok", "--vocab_size", "5000", "--files", "[a.txt]"], "only supports"),
    # -- generate
    ("generate-negative-tokens", {}, ["generate", "--model", "@good", "--max_new_tokens", "-1"], "max_new_tokens must be"),
    ("generate-zero-tokens", {}, ["generate", "--model", "@good", "--max_new_tokens", "0"], "max_new_tokens must be"),
    ("generate-negative-temperature", {}, ["generate", "--model", "@good", "--temperature", "-1"], "temperature must be"),
    ("generate-top-p-above-1", {}, ["generate", "--model", "@good", "--top_p", "1.5", "--temperature", "1"], "top_p must be"),
    ("generate-top-p-zero", {}, ["generate", "--model", "@good", "--top_p", "0", "--temperature", "1"], "top_p must be"),
    ("generate-top-k-zero", {}, ["generate", "--model", "@good", "--top_k", "0", "--temperature", "1"], "top_k must be"),
    ("generate-beyond-context", {}, ["generate", "--model", "@good", "--max_new_tokens", "100"], "context length 64"),
    ("generate-dtype", {}, ["generate", "--model", "@good", "--dtype", "int8"], "dtype must be"),
    ("generate-missing-model", {}, ["generate", "--model", "nope/"], "no such file"),
    ("generate-pickled-bin", {"pk/config.json": _cfg(), "pk/pytorch_model.bin": b"@pickle"},
     ["generate", "--model", "pk"], "cannot read weights"),
    ("generate-config-non-numeric", {"nn/config.json": _cfg(hidden_size="big"), "nn/model.safetensors": b"x"},
     ["generate", "--model", "nn"], "config.json"),
    ("generate-config-negative", {"neg/config.json": _cfg(num_hidden_layers=-2), "neg/model.safetensors": b"x"},
     ["generate", "--model", "neg"], "config.json"),
    # -- info / perplexity
    ("info-missing", {}, ["info", "--model", "nope"], "no such file"),
    ("info-empty-dir", {"empty/": None}, ["info", "--model", "empty"], "not a model directory"),
    ("info-bad-json", {"bj/config.json": b"{nope"}, ["info", "--model", "bj"], "not valid JSON"),
    ("perplexity-missing-text", {}, ["perplexity", "--model", "@good", "--text", "nope.txt"], "no such file"),
    ("perplexity-binary-text", {"b.txt": BINARY}, ["perplexity", "--model", "@good", "--text", "b.txt"], "not a text file"),
    ("perplexity-window-zero", {"a.txt": WORDS.encode()}, ["perplexity", "--model", "@good", "--text", "a.txt", "--window", "0"], "window >= 2"),
    ("perplexity-max-chars-negative", {"a.txt": WORDS.encode()}, ["perplexity", "--model", "@good", "--text", "a.txt", "--max_chars", "-5"], "max_chars >= 1"),
    ("eval-batch-size-zero", {"tasks/": None}, ["eval", "--model", "@good", "--data_dir", "tasks", "--batch_size", "0"], "batch_size must be"),
    ("perplexity-empty-text", {"e.txt": b"  \n"}, ["perplexity", "--model", "@good", "--text", "e.txt"], "empty text"),
    # -- eval: the output is checked before any scoring
    ("eval-out-exists", {"res.json": b'{"old": 1}', "tasks/": None},
     ["eval", "--model", "@good", "--tasks", "piqa", "--data_dir", "tasks", "--out", "res.json"], "--overwrite"),
    ("eval-out-is-folder", {"res/keep": b"x", "tasks/": None},
     ["eval", "--model", "@good", "--tasks", "piqa", "--data_dir", "tasks", "--out", "res"], "is a folder"),
    ("eval-out-under-file", {"f": b"x", "tasks/": None},
     ["eval", "--model", "@good", "--tasks", "piqa", "--data_dir", "tasks", "--out", "f/res.json"], "is a file"),
    ("eval-missing-data", {}, ["eval", "--model", "@good", "--tasks", "piqa", "--data_dir", "nope"], "no such data directory"),
    ("eval-dtype", {"tasks/": None}, ["eval", "--model", "@good", "--data_dir", "tasks", "--dtype", "float64"], "dtype must be"),
    # -- train: options, each checked where its dataclass is built
    ("train-betas-one", {"c.yaml": _yaml(optim={"betas": [0.9, 1.0]})}, ["train", "--config", "c.yaml"], "betas"),
    ("train-betas-negative", {"c.yaml": _yaml()}, ["train", "--config", "c.yaml", "--optim.betas", "[-0.1, 0.9]"], "betas"),
    ("train-eps-negative", {"c.yaml": _yaml(optim={"eps": -1e-8})}, ["train", "--config", "c.yaml"], "optim.eps"),
    ("train-lr-zero", {"c.yaml": _yaml()}, ["train", "--config", "c.yaml", "--optim.lr", "0"], "lr > 0"),
    ("train-lr-nan", {"c.yaml": _yaml()}, ["train", "--config", "c.yaml", "--optim.lr", "nan"], "optim.lr"),
    ("train-weight-decay", {"c.yaml": _yaml(optim={"weight_decay": -0.1})}, ["train", "--config", "c.yaml"], "weight_decay"),
    ("train-kd-temperature-zero", {"c.yaml": _yaml(reg={"kd_temperature": 0})}, ["train", "--config", "c.yaml"], "kd_temperature"),
    ("train-kd-weight-negative", {"c.yaml": _yaml(reg={"kd_weight": -1})}, ["train", "--config", "c.yaml"], "kd_weight"),
    ("train-ewc-samples", {"c.yaml": _yaml(reg={"ewc_samples": 0})}, ["train", "--config", "c.yaml"], "ewc_samples"),
    ("train-keep-last", {"c.yaml": _yaml()}, ["train", "--config", "c.yaml", "--run.keep_last", "0"], "keep_last"),
    ("train-nan-skips", {"c.yaml": _yaml(run={"max_nan_skips": -1})}, ["train", "--config", "c.yaml"], "max_nan_skips"),
    ("train-save-every", {"c.yaml": _yaml()}, ["train", "--config", "c.yaml", "--run.save_every", "-1"], "save_every"),
    ("train-max-steps", {"c.yaml": _yaml()}, ["train", "--config", "c.yaml", "--run.max_steps", "0"], "max_steps"),
    ("train-seq-len", {"c.yaml": _yaml(data={"seq_len": 0})}, ["train", "--config", "c.yaml"], "seq_len"),
    ("train-val-fraction", {"c.yaml": _yaml(data={"val_fraction": 1.5})}, ["train", "--config", "c.yaml"], "val_fraction"),
    ("train-growth-every", {"c.yaml": _yaml(growth={"trigger": "schedule", "every": 0})}, ["train", "--config", "c.yaml"], "every >= 1"),
    ("train-growth-steps", {"c.yaml": _yaml(growth={"trigger": "steps", "steps": [-1]})}, ["train", "--config", "c.yaml"], "steps"),
    ("train-gen-lr-mult", {"c.yaml": _yaml(growth={"gen_lr_mult": 2})}, ["train", "--config", "c.yaml"], "gen_lr_mult"),
    ("train-unknown-key", {"c.yaml": _yaml(run={"max_step": 3})}, ["train", "--config", "c.yaml"], "max_step"),
    ("train-resume-and-overwrite", {"c.yaml": _yaml(run={"resume": True, "overwrite": True})}, ["train", "--config", "c.yaml"], "exclude"),
    # -- train: data
    ("train-binary-corpus", {"c.yaml": _yaml(data={"path": "b.bin.txt"}), "b.bin.txt": BINARY}, ["train", "--config", "c.yaml"], "not a text file"),
    ("train-latin1-corpus", {"c.yaml": _yaml(data={"path": "l.txt"}), "l.txt": LATIN1}, ["train", "--config", "c.yaml"], "invalid UTF-8"),
    ("train-binary-jsonl", {"c.yaml": _yaml(data={"path": "b.jsonl"}), "b.jsonl": BINARY}, ["train", "--config", "c.yaml"], "not a text file"),
    ("train-missing-data", {"c.yaml": _yaml(data={"path": "nope.txt"})}, ["train", "--config", "c.yaml"], "does not exist"),
    # -- train: growth without forgetting (re-warm, KD teacher, replay)
    ("train-lr-rewarm", {"c.yaml": _yaml()}, ["train", "--config", "c.yaml", "--growth.lr_rewarm_steps", "-1"], "lr_rewarm_steps"),
    ("train-kd-teacher", {"c.yaml": _yaml(reg={"kd_teacher": "teacher"})}, ["train", "--config", "c.yaml"], "kd_teacher"),
    ("train-replay-fraction", {"c.yaml": _yaml(data={"replay": "texts", "replay_fraction": 1.0})}, ["train", "--config", "c.yaml"],
     "replay_fraction must be in [0, 1)"),
    ("train-replay-alone", {"c.yaml": _yaml()}, ["train", "--config", "c.yaml", "--data.replay", "texts"], "go together"),
    ("train-replay-missing", {"c.yaml": _yaml(data={"replay": "nope.txt", "replay_fraction": 0.2})}, ["train", "--config", "c.yaml"],
     "data.replay: data path nope.txt does not exist"),
    ("train-replay-empty", {"c.yaml": _yaml(data={"replay": "e.txt", "replay_fraction": 0.2}), "e.txt": b" \n"},
     ["train", "--config", "c.yaml"], "data.replay: no text found"),
    # -- train: the run folder
    ("train-out-is-file", {"c.yaml": _yaml(), "out": b"precious"}, ["train", "--config", "c.yaml"], "is not a folder"),
    ("train-finished-run-without-checkpoints", {"c.yaml": _yaml(), **FINISHED_RUN}, ["train", "--config", "c.yaml"], "run.overwrite"),
    ("train-into-checkpoints", {"c.yaml": _yaml(), "out/checkpoints/step_000001/train_config.json": b"{}"},
     ["train", "--config", "c.yaml"], "already holds checkpoints"),
    ("train-resume-nothing", {"c.yaml": _yaml(run={"resume": True})}, ["train", "--config", "c.yaml"], "no usable checkpoint"),
    ("train-out-under-file", {"c.yaml": _yaml(run={"out_dir": "f/run"}), "f": b"x"}, ["train", "--config", "c.yaml"], "is a file"),
    # -- distill: teacher and student must fit each other before anything is trained or written
    ("distill-no-teacher", {"c.yaml": _yaml()}, ["distill", "--config", "c.yaml"], "needs a teacher"),
    ("distill-other-tokenizer", {"c.yaml": _yaml(distill={"student": {"layers": [0]}})},
     ["distill", "--config", "c.yaml", "--distill.teacher", "@good"], "differs from the teacher's"),
    ("distill-missing-layer", {"c.yaml": _yaml(model={"tokenizer": None}, distill={"student": {"layers": [0, 5]}})},
     ["distill", "--config", "c.yaml", "--distill.teacher", "@good"], "do not exist"),
    ("distill-larger-target", {"c.yaml": _yaml(model={"tokenizer": None}, distill={"student": {"ffn_size": 128}})},
     ["distill", "--config", "c.yaml", "--distill.teacher", "@good"], "larger than the teacher"),
    ("distill-not-gqa", {"c.yaml": _yaml(model={"tokenizer": None}, distill={"student": {"n_head": 3}})},
     ["distill", "--config", "c.yaml", "--distill.teacher", "@good"], "GQA-consistent"),
    ("distill-layer-map", {"c.yaml": _yaml(model={"tokenizer": None}, distill={
        "student": {"layers": [0]}, "objective": {"hidden_weight": 1.0, "hidden_layers": [[0, 7]]}})},
     ["distill", "--config", "c.yaml", "--distill.teacher", "@good"], "layer 7"),
    ("distill-cached-hidden", {"c.yaml": _yaml(distill={"targets": "cached", "objective": {"hidden_weight": 1.0}})},
     ["distill", "--config", "c.yaml", "--distill.teacher", "@good"], "activations"),
    ("distill-out-exists", {"c.yaml": _yaml(model={"tokenizer": None}, distill={"student": {"layers": [0]}}), **FINISHED_RUN},
     ["distill", "--config", "c.yaml", "--distill.teacher", "@good"], "run.overwrite"),
]


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    """A tiny Llama (context 64) with a 300-id BPE tokenizer."""
    d = tmp_path_factory.mktemp("good")
    tok = train_bpe([WORDS], 300, d / "tok")
    save_hf(GPT(tiny_config("llama", vocab_size=300)), d / "model", tok)
    return d / "model"


def _make(root: Path, files: dict) -> None:
    for rel, data in {**TEXTS, **files}.items():
        p = root / rel
        if rel.endswith("/"):
            p.mkdir(parents=True, exist_ok=True)
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        if data == b"@pickle":
            p.write_bytes(pickle.dumps({"weight": _Evil()}))
        else:
            p.write_bytes(data)


class _Evil:
    """A pickled object that weights_only loading must refuse."""


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "cache" not in p.parts}


def _argv(argv: list[str], good: Path) -> list[str]:
    return [str(good) if a == "@good" else a for a in argv]


@pytest.mark.parametrize("name, files, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, files, argv, needle, good_model, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GROWLM_CACHE", str(tmp_path / "cache"))
    _make(tmp_path, files)
    before = _hashes(tmp_path)
    code = main(_argv(argv, good_model))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("growlm: error:") and needle in lines[0], lines[0]
    after = _hashes(tmp_path)
    assert {k: after.get(k) for k in before} == before  # every pre-existing file is unchanged
    assert not [k for k in after if ".tmp" in k or ".old" in k]  # and nothing half-written is left


def _read_only_dir() -> Path | None:
    """A folder that cannot be written even by root (sysfs), or None."""
    for cand in (Path("/sys"), Path("/proc/sys")):
        try:
            fd, p = tempfile.mkstemp(dir=cand)
            os.close(fd)
            os.unlink(p)
        except OSError:
            return cand
    return None


@pytest.mark.parametrize("argv", [
    ["convert", "--model", "@good", "--out", "@ro/growlm-out"],
    ["grow", "--model", "@good", "--depth", "1", "--out", "@ro/growlm-out"],
    ["prune", "--model", "@good", "--layers", "0", "--out", "@ro/growlm-out"],
    ["eval", "--model", "@good", "--tasks", "piqa", "--data_dir", ".", "--out", "@ro/res.json"],
    ["tokenizer", "--out", "@ro/tok", "--vocab_size", "300"],
    ["train", "--model.name", "tiny-llama", "--model.init", "scratch", "--model.tokenizer", "bytes", "--run.out_dir", "@ro/run"],
], ids=["convert", "grow", "prune", "eval", "tokenizer", "train"])
def test_an_unwritable_output_is_refused_before_any_work(argv, good_model, tmp_path, capsys, monkeypatch):
    ro = _read_only_dir()
    if ro is None:
        pytest.skip("no read-only folder on this machine")
    monkeypatch.chdir(tmp_path)
    code = main([a.replace("@ro", str(ro)) for a in _argv(argv, good_model)])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "cannot write" in lines[0], lines


@pytest.mark.parametrize("name", ["convert-out-is-file", "generate-pickled-bin", "train-kd-temperature-zero"])
def test_as_a_subprocess(name, good_model, tmp_path):
    _, files, argv, needle = next(c for c in CASES if c[0] == name)
    _make(tmp_path, files)
    before = _hashes(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "GROWLM_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "growlm.cli", *_argv(argv, good_model)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
    assert _hashes(tmp_path) == before


def test_case_count_covers_every_command():
    assert len(CASES) >= 60
    assert {c[2][0] for c in CASES} >= {"convert", "grow", "tokenizer", "generate", "info", "perplexity", "eval", "train"}


@pytest.mark.parametrize("section, key, value", [
    ("optim", "betas", [0.9, 1.0]), ("optim", "eps", -1e-8), ("reg", "kd_temperature", 0.0),
    ("run", "keep_last", 0), ("data", "seq_len", 0), ("growth", "gen_lr_mult", 2.0),
])
def test_library_yaml_and_cli_give_the_same_error(section, key, value, tmp_path, capsys, monkeypatch):
    classes = {"optim": OptimConfig, "reg": RegConfig, "run": RunConfig, "data": DataConfig, "growth": GrowthConfig}
    with pytest.raises(GrowlmError) as lib:
        classes[section](**{key: tuple(value) if isinstance(value, list) else value})
    with pytest.raises(GrowlmError) as yml:
        TrainConfig.from_dict({section: {key: value}})
    monkeypatch.chdir(tmp_path)
    _make(tmp_path, {"c.yaml": _yaml(**{section: {key: value}})})
    assert main(["train", "--config", "c.yaml"]) == 2
    cli = capsys.readouterr().err.strip()
    assert str(lib.value) == str(yml.value) and str(lib.value) in cli, (str(lib.value), cli)
