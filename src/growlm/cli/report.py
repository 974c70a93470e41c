"""`growlm report RUN_DIR [RUN_B ...] [--out DIR] [--eval TASKS --data-dir DIR --limit N]`.

One run: a model card (README.md with plots) in the run directory and its exported `hf/` (or in --out).
Several runs: a comparison page with overlaid curves on a shared FLOPs axis in --out (default: the first
run's `compare/` folder). Reports read the run directories only (`growlm.report`); --eval first scores
the exported model with `growlm.eval` and keeps the scores in the run directory (`eval_results.json`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console

from growlm.cli.eval import task_progress
from growlm.cli.progress import ProgressDisplay, make_console
from growlm.errors import GrowlmError
from growlm.eval import evaluate
from growlm.io import atomic_write
from growlm.models.hf import load_model
from growlm.report import EVAL_FILE, load_run, write_card, write_comparison

OPTIONS_WITH_VALUE = ("--out", "--eval", "--data_dir", "--limit", "--batch_size", "--config", "--runs")


def report(
    runs: list[str],
    out: str | None = None,
    eval: str | None = None,  # noqa: A002 - the option is called --eval
    data_dir: str = ".",
    limit: int | None = None,
    batch_size: int = 16,
) -> None:
    """Write a run's model card and plots, or a comparison page of several runs, from their run directories.

    Args:
        runs: one or more run directories (each holding metrics.jsonl; given as positional arguments).
        out: folder for the card or comparison page; default: the run directory and its hf/ (one run), or
            RUN_A/compare (several).
        eval: comma-separated eval tasks (hellaswag, piqa, ...) to score the final exported model on first;
            the scores go into the card and its model-index.
        data_dir: folder holding the task files for --eval.
        limit: score only the first N documents of each --eval task.
        batch_size: sequences per forward pass for --eval.
    """
    console = Console(soft_wrap=True)
    loaded = [load_run(r) for r in runs]
    if not loaded:
        raise GrowlmError("report: name at least one run directory")
    if eval:
        for r in loaded:
            if r.hf_dir is None:
                raise GrowlmError(f"{r.path}: --eval needs the exported model (hf/), which this run lacks")
            run_eval(r.path, r.hf_dir, eval, data_dir, limit, batch_size)
        loaded = [load_run(r) for r in runs]  # re-read: the scores are part of the run directory now
    for r in loaded:
        for m in r.missing:
            console.print(f"report: {r.path}: {m}", highlight=False)
    if len(loaded) == 1:
        for p in write_card(loaded[0], Path(out) if out else None):
            console.print(f"wrote {p}", highlight=False)
    else:
        console.print(f"wrote {write_comparison(loaded, Path(out) if out else loaded[0].path / 'compare')}", highlight=False)


def run_eval(run_dir: Path, hf_dir: Path, tasks: str, data_dir: str, limit: int | None, batch_size: int) -> None:
    """Score the exported model and keep the scores (without per-document samples) in the run directory."""
    if not Path(data_dir).expanduser().exists():
        raise GrowlmError(f"{data_dir}: no such data directory (pass --data_dir with the task files)")
    model, tok = load_model(str(hf_dir), torch.float32)
    if tok is None:
        raise GrowlmError(f"{hf_dir}: has no tokenizer; eval tasks need one")
    t0 = time.time()
    with ProgressDisplay(make_console()) as display:
        res = evaluate(model, tok, tasks, data_dir, limit=limit, batch_size=batch_size,
                       progress=task_progress(display, [t.strip() for t in tasks.split(",")]))
    payload = {"model": str(hf_dir), "tasks": tasks, "limit": limit, "eval_seconds": round(time.time() - t0, 2),
               "results": res["results"]}
    atomic_write(run_dir / EVAL_FILE, json.dumps(payload, indent=1) + "\n")


def positional_runs(argv: list[str]) -> list[str]:
    """`report A B --out D` -> `report --runs '["A", "B"]' --out D` (the CLI's options are all named)."""
    if not argv or argv[0] != "report" or any(a in ("-h", "--help") for a in argv):
        return argv
    runs, rest, i = [], [argv[0]], 1
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            rest.append(a)
            if "=" not in a and a in OPTIONS_WITH_VALUE and i + 1 < len(argv):
                rest.append(argv[i + 1])
                i += 1
        else:
            runs.append(a)
        i += 1
    return rest + (["--runs", json.dumps(runs)] if runs else [])

