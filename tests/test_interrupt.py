"""Ctrl-C during `growlm train`: one line naming the checkpoint kept and the command that resumes it."""

from __future__ import annotations

import json
import shlex

import growlm.cli.train as cli_train
from growlm.cli import main


def test_ctrl_c_names_the_checkpoint_and_a_resume_command_that_works(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts").mkdir()
    for i in range(3):
        (tmp_path / "texts" / f"t{i}.txt").write_text(" ".join(f"word{j % 13}" for j in range(200 + i)))
    cfg = {"model": {"name": "tiny-llama", "init": "scratch", "overrides": {"vocab_size": 257}, "tokenizer": "bytes"},
           "data": {"path": "texts", "seq_len": 8, "val_fraction": 0.3, "cache_dir": "cache"},
           "run": {"max_steps": 5, "micro_batch": 2, "eval_every": 1, "save_every": 1, "out_dir": "run",
                   "peak_flops": 0, "export_hf": False}}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    real = cli_train.run_training

    def interrupted_at_step_3(c, callback):
        def cb(kind, rec):
            callback(kind, rec)
            if kind == "log" and rec.get("step") == 3:
                raise KeyboardInterrupt  # as Ctrl-C would, between the log line and the step's checkpoint
        return real(c, callback=cb)

    argv = ["train", "--config", "c.yaml", "--run.resume", "false"]
    monkeypatch.setattr(cli_train, "run_training", interrupted_at_step_3)
    monkeypatch.setattr("sys.argv", ["growlm", *argv])
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kept run/checkpoints/step_000002" in err[0], err
    resume = shlex.split(err[0].split("resume with: ", 1)[1])
    assert resume[0] == "growlm" and resume[-2:] == ["--run.resume", "true"] and "false" not in resume

    monkeypatch.setattr(cli_train, "run_training", real)
    assert main(resume[1:]) == 0
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps[-1] == 5 and steps.count(3) == 1  # continued from step 2; the interrupted step 3 logged once
