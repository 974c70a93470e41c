"""A comparison page for several runs: overlaid loss curves on a shared executed-FLOPs axis and a table
of final metrics (e.g. grown vs from scratch, KD vs CE only), from each run's metrics.jsonl alone."""

from __future__ import annotations

import os
from pathlib import Path

from growlm.io import atomic_write
from growlm.report import plots
from growlm.report.card import _table, fmt_int, fmt_loss, fmt_ppl, fmt_sci, ppl
from growlm.report.run import RunData


def compare_rows(runs: list[RunData]) -> list[list[str]]:
    rows = []
    for r in runs:
        f, last = r.final or {}, r.last or {}
        wall = r.wall_s
        rows.append([r.name, str(last.get("step", "—")), fmt_int(last.get("params")), str(len(r.growth)),
                     fmt_int(last.get("tokens")), fmt_sci(last.get("flops")), fmt_loss(f.get("val_loss")),
                     fmt_ppl(f.get("val_ppl")), fmt_loss((r.best or {}).get("val_loss")),
                     fmt_ppl(ppl(r.retention.get("final"))), "—" if wall is None else f"{wall:.1f}"])
    return rows


def comparison_text(runs: list[RunData], plot_file: str | None, out_dir: Path) -> str:
    head = ["run", "steps", "params", "growth events", "tokens", "executed FLOPs", "final val loss",
            "final val ppl", "best val loss", "retention ppl", "wall s"]
    out = ["# Run comparison", "", "Runs: " + ", ".join(f"[{r.name}]({os.path.relpath(r.path, out_dir)})" for r in runs), "",
           _table(head, compare_rows(runs))]
    if plot_file:
        out += ["", "Loss against executed FLOPs (the fair axis for runs of different sizes and lengths); dotted lines "
                "are growth events, in each run's colour:", "", f"![loss vs FLOPs]({plot_file})"]
    for r in runs:
        out += [f"- {r.name}: {m}" for m in r.missing]
    return "\n".join(out) + "\n"


def write_comparison(runs: list[RunData], out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_file = None
    if any(r.train for r in runs):
        plots.save(plots.compare_figure(runs), out_dir / "compare_loss.png")
        plot_file = "compare_loss.png"
    path = out_dir / "README.md"
    atomic_write(path, comparison_text(runs, plot_file, out_dir))
    return path
