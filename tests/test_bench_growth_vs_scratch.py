"""bench/growth_vs_scratch.py: its curve arithmetic, and its --quick mode end to end on a few schedules."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("growth_vs_scratch", REPO / "bench" / "growth_vs_scratch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_curve_interpolation():
    b = _bench()
    c = [(0.0, 8.0), (10.0, 6.0), (20.0, 5.0), (30.0, 4.5)]
    assert b.flops_to_reach(c, 5.5) == pytest.approx(15.0)  # halfway between the 2nd and 3rd evaluation
    assert b.flops_to_reach(c, 9.0) == 0.0
    assert b.flops_to_reach(c, 4.0) is None  # never reached
    assert b.loss_at(c, 25.0) == pytest.approx(4.75)
    assert b.loss_at(c, 31.0) is None
    assert b.event_steps(12, 3) == [4, 8, 12] and b.event_steps(2, 3) == [1, 2, 3]  # distinct, never step 0


def test_progressive_schedules_differ_only_in_their_re_warm():
    b = _bench()
    args = b.parse_args(["--quick"])
    (shape, plain), (_, warm), (_, rewarm) = (b.schedule(n, args, 12, 3) for n in
                                              ("progressive", "progressive_warm", "progressive_rewarm"))
    assert shape["n_layer"] == args.layers // 4 and plain.steps == [4, 8, 12]
    assert (plain.new_warmup_steps, plain.lr_rewarm_steps) == (0, 0)
    assert (warm.new_warmup_steps, warm.lr_rewarm_steps) == (3, 0)  # the newest blocks' update only
    assert (rewarm.new_warmup_steps, rewarm.lr_rewarm_steps) == (0, 3)  # every parameter's learning rate
    assert rewarm.steps == plain.steps and rewarm.operators == plain.operators


def test_quick_run(tmp_path):
    b = _bench()
    args = b.parse_args(["--quick", "--schedules", "depth_interleave", "width", "stack", "--event-frac", "0.5",
                         "--plots", str(tmp_path / "plots"), "--keep", str(tmp_path / "runs")])
    out = b.run_benchmark(args)
    json.dumps(out)  # what main() writes
    assert set(out["speedup"]) == {"scratch", "depth_interleave", "width", "stack"}
    assert {r["seed"] for r in out["runs"]} == {0}
    rows = {r["schedule"]: r for r in out["runs"]}
    assert rows["scratch"]["speedup"] == pytest.approx(1.0) and rows["scratch"]["events"] == []
    for name in ("depth_interleave", "width"):  # function-preserving: the loss moves by float32 rounding only
        (ev,) = rows[name]["events"]
        assert ev["function_preserving"] and abs(ev["val_loss_delta"]) <= 1e-6 and rows[name]["fp_ok"]
        assert ev["step"] == 12 and rows[name]["flops_ratio"] < 1  # the smaller model ran half the steps
    (ev,) = rows["stack"]["events"]
    assert not ev["function_preserving"] and abs(ev["val_loss_delta"]) > 1e-6  # G_stack copies change the function
    assert out["fp_ok"]
    for r in out["runs"]:  # the loss at equal FLOPs is read off the scratch curve
        assert r["loss_at_equal_flops"] is not None and math.isfinite(r["loss_at_equal_flops"])
    assert (tmp_path / "plots" / "README.md").is_file() and (tmp_path / "runs" / "width-s0" / "metrics.jsonl").is_file()
