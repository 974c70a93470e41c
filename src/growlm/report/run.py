"""A run directory, read back for a report: `metrics.jsonl`, the saved config and the exported model.

Nothing here probes the machine or the model's weights: a report is made from what the run wrote, so it
can be made again after the fact and for old runs (a run killed mid-write, or one without an export,
still reads; what is missing is listed in `RunData.missing`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from growlm.errors import GrowlmError

EVAL_FILE = "eval_results.json"
"""Scores of `growlm report --eval` on the final model, kept in the run directory beside metrics.jsonl."""
DISTILL_FILE = "distill_results.json"
"""`growlm distill`'s end-of-run comparison of teacher and student (parameters, perplexity, speed, eval tasks)."""


@dataclass
class Segment:
    """One `growlm train` process of a run: from a kind=run start line to its end line (a finished segment)
    or to the next start (a killed one, resumed later) or the end of the file (killed, or still running)."""

    start_step: int
    last_step: int
    """The last step the segment logged (its end line's step when it finished)."""
    wall_s: float | None
    """Its wall time: the end line's wall_s; without one, the last elapsed_s it logged (a killed segment's
    time up to that line: what it did after the line, and lines a resume cut off, are not counted); None
    when it logged neither (an older run, or killed before its first logged step)."""
    finished: bool


@dataclass
class RunData:
    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    """kind=train lines in order (step 0 = the starting model, evaluated before any update)."""
    growth: list[dict[str, Any]] = field(default_factory=list)
    retention: dict[str, float] = field(default_factory=dict)
    starts: list[dict[str, Any]] = field(default_factory=list)
    """kind=run event=start lines: machine, versions and the TrainConfig (one per started segment)."""
    ends: list[dict[str, Any]] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    """The run's processes in order (a resumed run has several)."""
    config: dict[str, Any] | None = None
    hf_dir: Path | None = None
    evals: dict[str, Any] | None = None
    distill: dict[str, Any] | None = None
    """The kind=distill line of a distillation: teacher, its config and the student's, how it was cut."""
    distill_results: dict[str, Any] | None = None
    """DISTILL_FILE: teacher and student measured side by side at the end of `growlm distill`."""
    missing: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        return [r for r in self.train if r.get("val_loss") is not None]

    @property
    def initial(self) -> dict[str, Any] | None:
        ev = self.evaluated
        return ev[0] if ev and ev[0].get("step") == 0 else None

    @property
    def final(self) -> dict[str, Any] | None:
        ev = self.evaluated
        return ev[-1] if ev else None

    @property
    def best(self) -> dict[str, Any] | None:
        ev = [r for r in self.evaluated if r.get("step", 0) > 0] or self.evaluated
        return min(ev, key=lambda r: r["val_loss"]) if ev else None

    @property
    def last(self) -> dict[str, Any] | None:
        return self.train[-1] if self.train else None

    @property
    def machine(self) -> dict[str, Any]:
        return self.starts[-1] if self.starts else {}

    @property
    def finished(self) -> bool:
        return bool(self.ends)

    @property
    def wall_s(self) -> float | None:
        """Training wall time: the sum over segments of each one's `Segment.wall_s` (None if none is known)."""
        known = [g.wall_s for g in self.segments if g.wall_s is not None]
        return sum(known) if known else None

    def wall_note(self) -> str:
        """What the wall time counts, when that is not simply every segment's end line ('' then)."""
        notes = []
        for k, g in enumerate(self.segments, 1):
            if g.finished:
                continue
            if g.wall_s is None:
                notes.append(f"segment {k} (from step {g.start_step}) logged no time and is not counted")
            else:
                notes.append(f"segment {k} (steps {g.start_step}-{g.last_step}) was interrupted; "
                             "counted to its last logged step")
        return "; ".join(notes)

    def value(self, key: str, default: Any = None) -> Any:
        """The config value at a dotted key (`run.max_steps`), or default."""
        d: Any = self.config or {}
        for k in key.split("."):
            if not isinstance(d, dict) or k not in d:
                return default
            d = d[k]
        return d


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir())


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The parsed lines of a metrics.jsonl and a note for each line that is not a JSON object (a run
    killed mid-write leaves a truncated last line)."""
    recs, notes = [], []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            notes.append(f"metrics.jsonl line {i} is truncated or not JSON (run killed mid-write?); skipped")
            continue
        if isinstance(rec, dict):
            recs.append(rec)
    return recs, notes


def load_run(path: str | Path) -> RunData:
    """Read a run directory; raises GrowlmError when `path` is not one."""
    p = Path(path)
    if not is_run_dir(p):
        raise GrowlmError(f"{path}: not a run directory (no metrics.jsonl or checkpoints/ in it)")
    run = RunData(p)
    mpath = p / "metrics.jsonl"
    recs: list[dict[str, Any]] = []
    if mpath.is_file():
        recs, run.missing = read_metrics(mpath)
    else:
        run.missing.append("metrics.jsonl is absent: no curves or metrics")
    run.segments = segments(recs)
    for rec in recs:
        kind = rec.get("kind")
        if kind == "train":
            run.train.append(rec)
        elif kind == "growth":
            run.growth.append(rec)
        elif kind == "retention":
            run.retention.update({k.removeprefix("retention_loss_"): v for k, v in rec.items()
                                  if k.startswith("retention_loss_") and _finite(v)})
        elif kind == "distill":
            run.distill = rec
        elif kind == "run":
            (run.starts if rec.get("event") == "start" else run.ends).append(rec)
    if run.starts and isinstance(run.starts[-1].get("config"), dict):
        run.config = run.starts[-1]["config"]
    else:
        run.config = _checkpoint_config(p)
        if run.config is None:
            run.missing.append("no training configuration (no kind=run line and no checkpoint)")
    if not run.starts:
        run.missing.append("no kind=run line (older run): device, CPU and versions unknown")
    if not run.ends and recs:
        run.missing.append("no end-of-run line: the run did not finish (killed or still running); wall time counted "
                           "to its last logged step")
    hf = p / "hf"
    if (hf / "config.json").is_file():
        run.hf_dir = hf
    else:
        run.missing.append("no exported model (hf/): no usage snippet")
    for name, attr in ((EVAL_FILE, "evals"), (DISTILL_FILE, "distill_results")):
        if (p / name).is_file():
            try:
                setattr(run, attr, json.loads((p / name).read_text()))
            except json.JSONDecodeError:
                run.missing.append(f"{name} is not valid JSON; its scores are left out")
    return run


def segments(recs: list[dict[str, Any]]) -> list[Segment]:
    """The segments of a run from its metrics lines in file order: each kind=run start line opens one (lines
    before the first start, from runs older than these lines, form one of their own)."""
    out: list[Segment] = []
    for rec in recs:
        kind, step = rec.get("kind"), rec.get("step", 0)
        step = step if isinstance(step, int) else 0
        if kind == "run" and rec.get("event") == "start" or not out:
            out.append(Segment(step, step, None, False))
            if kind == "run" and rec.get("event") == "start":
                continue
        g = out[-1]
        g.last_step = max(g.last_step, step)
        if kind == "train" and _finite(rec.get("elapsed_s")) and not g.finished:
            g.wall_s = rec["elapsed_s"]
        elif kind == "run" and rec.get("event") == "end":
            g.finished = True
            g.wall_s = rec["wall_s"] if _finite(rec.get("wall_s")) else g.wall_s
    return out


def _checkpoint_config(p: Path) -> dict[str, Any] | None:
    for c in sorted((p / "checkpoints").glob("step_*/train_config.json"), reverse=True):
        try:
            return json.loads(c.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
