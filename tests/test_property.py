"""Property: whatever training config and CLI flag values a user gives, `growlm train` either finishes a
run with finite losses (exit 0) or refuses in one line (exit 2); never a traceback, never exit 0 with a
run whose losses are all non-finite. Hypothesis draws the values (25 tiny runs of a few steps)."""

from __future__ import annotations

import itertools
import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from growlm.cli import main

COUNTER = itertools.count()

FLAGS = {
    "optim.lr": st.sampled_from([-1.0, 0.0, 1e-4, 1e-2, 3.0, 1e30, float("inf")]),
    "optim.min_lr": st.sampled_from([-1.0, 0.0, 1e-5, 5.0]),
    "optim.betas": st.sampled_from(["[0.9, 0.95]", "[0.9, 1.0]", "[-0.1, 0.9]", "[0.0, 0.5]", "[0.9]"]),
    "optim.eps": st.sampled_from([-1e-8, 0.0, 1e-8, 1.0]),
    "optim.weight_decay": st.sampled_from([-0.1, 0.0, 0.1, 10.0]),
    "optim.grad_clip": st.sampled_from([-1.0, 0.0, 1.0]),
    "optim.warmup_steps": st.integers(-1, 3),
    "optim.decay": st.sampled_from(["cosine", "linear", "constant", "exponential"]),
    "reg.kd_weight": st.sampled_from([-1.0, 0.0, 0.5]),
    "reg.kd_temperature": st.sampled_from([-1.0, 0.0, 1e-6, 2.0]),
    "reg.ewc_lambda": st.sampled_from([-1.0, 0.0, 10.0]),
    "reg.ewc_samples": st.integers(-1, 3),
    "run.max_steps": st.integers(-1, 3),
    "run.micro_batch": st.integers(0, 3),
    "run.grad_accum": st.integers(0, 2),
    "run.eval_every": st.integers(0, 2),
    "run.save_every": st.integers(-1, 2),
    "run.keep_last": st.integers(0, 2),
    "run.max_nan_skips": st.integers(-1, 4),
    "data.seq_len": st.sampled_from([0, 8, 16, 100]),
    "data.val_fraction": st.sampled_from([0.0, 0.3, 1.0]),
    "data.val_blocks": st.integers(-1, 3),
    "growth.trigger": st.sampled_from(["none", "steps", "plateau", "sometimes"]),
    "growth.patience": st.integers(0, 2),
}


def _base(tmp, textdir) -> str:
    cfg = {
        "model": {"name": "tiny-llama", "init": "scratch", "overrides": {"vocab_size": 257}, "tokenizer": "bytes"},
        "data": {"path": str(textdir), "seq_len": 8, "val_fraction": 0.3, "cache_dir": str(tmp / "cache")},
        "growth": {"steps": [1], "operators": [{"operator": "depth", "n": 1}]},
        "run": {"max_steps": 2, "micro_batch": 2, "eval_every": 1, "peak_flops": 0, "export_hf": False},
    }
    p = tmp / "base.yaml"
    p.write_text(json.dumps(cfg))
    return str(p)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)
@given(st.sets(st.sampled_from(sorted(FLAGS)), max_size=4), st.data())
def test_train_finishes_or_refuses_in_one_line(tmp_path_factory, capsys, keys, data):
    flags = {k: data.draw(FLAGS[k], label=k) for k in sorted(keys)}
    tmp = tmp_path_factory.getbasetemp() / "property"
    textdir = tmp / "texts"
    if not textdir.exists():
        textdir.mkdir(parents=True)
        for i in range(3):
            (textdir / f"t{i}.txt").write_text(" ".join(f"word{j % 11}" for j in range(150 + i)))
    out = tmp / f"run{next(COUNTER)}"
    argv = ["train", "--config", _base(tmp, textdir), "--run.out_dir", str(out)]
    for k, v in flags.items():
        argv.append(f"--{k}={v}")
    capsys.readouterr()
    code = main(argv)  # an unexpected exception fails the test here
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("growlm: error:"), err
        return
    assert code == 0, (code, err)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r.get("loss") is not None]
    assert losses and all(math.isfinite(x) for x in losses), recs
    vals = [r["val_loss"] for r in recs if r.get("val_loss") is not None]
    assert math.isfinite(vals[-1]), recs
