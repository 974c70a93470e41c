"""Peak memory and output size of `growlm grow` (default: SmolLM2-135M, width x2, 134.5M -> 481.4M params).

The CLI runs in a child process; its peak resident set is `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`
read after it exits (this parent imports neither torch nor growlm, so the child starts small). The output
directory is compared with its model weights file(s): the growth side state (generation tags, update
scales) should add little. Targets (issue 10): peak RSS <= 2x the grown model's float32 size, output
directory <= 1.1x the weights.

Run: python bench/grow_memory.py                          (~1-2 min; prints a table, writes JSON)
     python bench/grow_memory.py --label before --args "--depth 2"
Rows are merged by `--label` into bench/results/grow_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def measure(model: str, grow_args: list[str], fmt: str, workdir: Path) -> dict:
    out = workdir / "grown"
    cmd = [sys.executable, "-m", "growlm", "grow", "--model", model, *grow_args, "--format", fmt, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"growlm grow failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    files = sorted(out.iterdir())
    side = [p for p in files if p.name.startswith("growth_")]
    weights = [p for p in files if p.suffix == ".safetensors" and p not in side]
    rec = json.loads((out / "growth.json").read_text())
    params = rec["steps"][-1]["params_after"]
    fp32 = params * 4
    total = _size(files)
    return {
        "model": model, "args": grow_args, "format": fmt, "params_after": params,
        "fp32_bytes": fp32, "peak_rss_bytes": peak, "peak_over_fp32": peak / fp32,
        "weights_bytes": _size(weights), "side_state_bytes": _size(side), "out_dir_bytes": total,
        "out_over_weights": total / _size(weights), "seconds": wall,
        "files": {p.name: p.stat().st_size for p in files},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--args", default="--factor 2", help="growth options passed to `growlm grow`")
    ap.add_argument("--format", default="hf", choices=("hf", "growlm"))
    ap.add_argument("--label", default="current")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "grow_memory.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="grow_memory.") as d:
        r = measure(a.model, shlex.split(a.args), a.format, Path(d))
    r["label"] = a.label
    gb = 1e9
    print(f"growlm grow --model {a.model} {a.args} --format {a.format}: {r['params_after']:,} params, "
          f"float32 {r['fp32_bytes'] / gb:.2f} GB")
    print(f"{'label':10s} {'peak RSS GB':>11s} {'x fp32':>7s} {'weights GB':>10s} {'side GB':>8s} {'dir GB':>7s} "
          f"{'x weights':>9s} {'time s':>7s}")
    print(f"{a.label:10s} {r['peak_rss_bytes'] / gb:>11.2f} {r['peak_over_fp32']:>7.2f} {r['weights_bytes'] / gb:>10.2f} "
          f"{r['side_state_bytes'] / gb:>8.3f} {r['out_dir_bytes'] / gb:>7.2f} {r['out_over_weights']:>9.3f} "
          f"{r['seconds']:>7.1f}")
    path = Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [x for x in rows if x.get("label") != a.label] + [r]
    path.write_text(json.dumps({"targets": {"peak_over_fp32": 2.0, "out_over_weights": 1.1}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
