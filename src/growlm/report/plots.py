"""Training curves of a run (or several) as matplotlib figures, from `metrics.jsonl` alone.

Every figure is built from series that `series()` returns, so tests check the plotted data rather than
pixels; growth events are vertical lines whose `gid` is `growth-<event>`, one per event and panel.
Figures have an opaque white background so they read the same in a dark or a light viewer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from growlm.report.run import RunData

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
EVENT_COLOR = "#7f7f7f"


def series(run: RunData) -> dict[str, tuple[list[float], list[float]]]:
    """Named (x, y) series: train/val loss against step and against executed FLOPs, parameters, lr."""
    tr = [r for r in run.train if r.get("loss") is not None]
    # validation points: the logged evaluations and the one just after each growth event
    ev = sorted([(r["step"], r["flops"], r["val_loss"]) for r in run.evaluated]
                + [(e["step"], x, e["val_loss_after"]) for e, x in zip(run.growth, event_x(run, "flops"))
                   if e.get("val_loss_after") is not None and not any(r["step"] == e["step"] for r in run.evaluated)])
    out = {
        "train_loss_step": ([r["step"] for r in tr], [r["loss"] for r in tr]),
        "val_loss_step": ([v[0] for v in ev], [v[2] for v in ev]),
        "train_loss_flops": ([r["flops"] for r in tr], [r["loss"] for r in tr]),
        "val_loss_flops": ([v[1] for v in ev], [v[2] for v in ev]),
        "lr_step": ([r["step"] for r in run.train if r.get("lr") is not None],
                    [r["lr"] for r in run.train if r.get("lr") is not None]),
    }
    for key in ("params", "trainable_params"):
        pts = [(r["step"], 0, r[key]) for r in run.train if r.get(key) is not None]
        for e in run.growth:  # the jump at each event: before, then after, at the same step
            pts += [(e["step"], -1, e["params_before"] if key == "params" else None),
                    (e["step"], 1, e["params_after"] if key == "params" else e.get("trainable_params"))]
        pts = sorted((p for p in pts if p[2] is not None), key=lambda p: (p[0], p[1]))
        out[f"{key}_step"] = ([p[0] for p in pts], [p[2] for p in pts])
    return out


def event_x(run: RunData, axis: str) -> list[float]:
    """Each growth event's position on the step or the executed-FLOPs axis (FLOPs interpolated between
    the logged steps around it)."""
    steps = [float(e["step"]) for e in run.growth]
    if axis == "step":
        return steps
    pts = [(r["step"], r["flops"]) for r in run.train if r.get("flops") is not None]
    if not pts:
        return [float("nan")] * len(steps)
    xs, ys = zip(*pts)
    return [float(v) for v in np.interp(steps, xs, ys)]


def _mark_events(ax, run: RunData, axis: str, color: str = EVENT_COLOR, label: bool = True) -> None:
    for e, x in zip(run.growth, event_x(run, axis)):
        if x != x:  # NaN: no FLOPs logged
            continue
        ax.axvline(x, color=color, linestyle=":", linewidth=1.2, gid=f"growth-{e.get('event', '?')}")
        if label:
            ax.annotate(f"{e.get('operator', 'growth')} #{e.get('event', '?')}", (x, 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=8, color="#404040")


def _new(n: int, width: float = 11.0) -> Figure:
    fig = Figure(figsize=(width, 3.8), facecolor="white", layout="constrained")
    fig.subplots(1, n, squeeze=False)
    for ax in fig.axes:
        ax.set_facecolor("white")
        ax.grid(True, color="#dddddd", linewidth=0.6)
    return fig


def loss_figure(run: RunData) -> Figure:
    """Train and validation loss against steps (left) and executed FLOPs (right), growth events marked."""
    s = series(run)
    fig = _new(2)
    for ax, axis in zip(fig.axes, ("step", "flops")):
        ax.plot(*s[f"train_loss_{axis}"], color=COLORS[0], linewidth=1.0, alpha=0.8, label="train loss", gid="train")
        ax.plot(*s[f"val_loss_{axis}"], color=COLORS[1], marker="o", markersize=3, label="validation loss", gid="val")
        _mark_events(ax, run, axis)
        ax.set_xlabel("step" if axis == "step" else "executed FLOPs")
        ax.set_ylabel("loss (nats/token)")
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{run.name}: loss")
    return fig


def params_figure(run: RunData) -> Figure:
    s = series(run)
    fig = _new(1, 7.0)
    ax = fig.axes[0]
    ax.plot(*s["params_step"], color=COLORS[0], label="total", gid="params")
    ax.plot(*s["trainable_params_step"], color=COLORS[2], linestyle="--", label="trainable", gid="trainable_params")
    _mark_events(ax, run, "step")
    ax.set_xlabel("step")
    ax.set_ylabel("parameters")
    ax.yaxis.set_major_formatter(EngFormatter())
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{run.name}: parameters")
    return fig


def lr_figure(run: RunData) -> Figure:
    s = series(run)
    fig = _new(1, 7.0)
    ax = fig.axes[0]
    ax.plot(*s["lr_step"], color=COLORS[3], gid="lr")
    _mark_events(ax, run, "step")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    fig.suptitle(f"{run.name}: learning rate")
    return fig


def compare_figure(runs: list[RunData]) -> Figure:
    """Train (left) and validation (right) loss of several runs on a shared executed-FLOPs axis; each
    run's growth events marked in its colour."""
    fig = _new(2)
    left, right = fig.axes
    for i, run in enumerate(runs):
        s, c = series(run), COLORS[i % len(COLORS)]
        left.plot(*s["train_loss_flops"], color=c, linewidth=1.0, label=run.name, gid=f"train:{run.name}")
        right.plot(*s["val_loss_flops"], color=c, marker="o", markersize=3, label=run.name, gid=f"val:{run.name}")
        for ax in (left, right):
            _mark_events(ax, run, "flops", color=c, label=False)
    right.sharex(left)
    for ax, what in ((left, "train"), (right, "validation")):
        ax.set_xlabel("executed FLOPs")
        ax.set_ylabel(f"{what} loss (nats/token)")
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle("loss against executed FLOPs (dotted: growth events)")
    return fig


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, facecolor="white")
    return path


def run_figures(run: RunData) -> dict[str, Figure]:
    """The figures a run card embeds, by file stem (empty when nothing was logged)."""
    if not run.train:
        return {}
    return {"loss": loss_figure(run), "params": params_figure(run), "lr": lr_figure(run)}


def growth_marks(fig: Figure) -> list[list[str]]:
    """The growth-event gids drawn on each panel of a figure (for tests and checks)."""
    return [[a.get_gid() for a in ax.get_lines() if str(a.get_gid()).startswith("growth-")] for ax in fig.axes]

