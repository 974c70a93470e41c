"""What commands write: the explicit way to replace an output (--overwrite, run.overwrite), and files and
folders created with the user's umask (as save_pretrained does), never 0700/0600 temporaries."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from growlm.cli import main
from growlm.io import atomic_dir, atomic_write
from growlm.models.hf import save_hf
from growlm.models.model import GPT
from tests.conftest import tiny_config


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_writes_follow_the_umask(tmp_path, umask_022):
    atomic_write(tmp_path / "f.json", "{}")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("x")
    assert _mode(tmp_path / "f.json") == 0o644
    assert _mode(tmp_path / "d") == 0o755 and _mode(tmp_path / "d" / "x") == 0o644
    os.umask(0o077)
    atomic_write(tmp_path / "g.json", "{}")
    assert _mode(tmp_path / "g.json") == 0o600


def test_overwrite_replaces_an_output_and_its_absence_refuses(tmp_path, capsys, monkeypatch, umask_022):
    monkeypatch.chdir(tmp_path)
    save_hf(GPT(tiny_config("llama")), tmp_path / "m")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    assert main(["convert", "--model", "m", "--out", "out", "--format", "growlm"]) == 2
    assert (tmp_path / "out" / "stale.txt").read_text() == "old"
    assert main(["convert", "--model", "m", "--out", "out", "--format", "growlm", "--overwrite", "true"]) == 0
    assert not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()
    assert _mode(tmp_path / "out") == 0o755 and _mode(tmp_path / "out" / "model.safetensors") == 0o644
    assert main(["grow", "--model", "m", "--depth", "1", "--out", "out", "--format", "growlm", "--overwrite", "true"]) == 0
    assert json.loads((tmp_path / "out" / "growth.json").read_text())["steps"][0]["operator"] == "depth"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left beside it


def test_run_overwrite_replaces_a_finished_run(tmp_path, capsys, monkeypatch, umask_022):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts").mkdir()
    for i in range(3):
        (tmp_path / "texts" / f"t{i}.txt").write_text(" ".join(f"word{j % 11}" for j in range(150 + i)))
    cfg = {"model": {"name": "tiny-llama", "init": "scratch", "overrides": {"vocab_size": 257}, "tokenizer": "bytes"},
           "data": {"path": "texts", "seq_len": 8, "val_fraction": 0.3, "cache_dir": "cache"},
           "run": {"max_steps": 2, "micro_batch": 2, "eval_every": 1, "save_every": 1, "out_dir": "run",
                   "peak_flops": 0, "export_hf": True}}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    assert main(["train", "--config", "c.yaml"]) == 0
    assert _mode(tmp_path / "run" / "checkpoints" / "step_000002" / "model.safetensors") == 0o644
    assert _mode(tmp_path / "run" / "hf") == 0o755
    first = (tmp_path / "run" / "metrics.jsonl").read_text()
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # a finished run whose checkpoints are gone
    capsys.readouterr()
    assert main(["train", "--config", "c.yaml"]) == 2
    assert "run.overwrite" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == first
    assert main(["train", "--config", "c.yaml", "--run.overwrite", "true", "--run.max_steps", "3"]) == 0
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [0, 1, 2, 3]  # replaced, not appended
    assert [r["kind"] for r in recs].count("run") == 2  # one start and one end line: a single segment
