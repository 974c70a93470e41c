"""`growlm train --config configs/X.yaml [--run.max_steps 50 ...]`: continued pretraining with growth.

Prints one fixed-order line per logging interval (nanochat style), a progress bar, each growth event,
and at the end: base vs final validation perplexity, the growth-events table and the retention measure.
The library (`growlm.train`) never prints; this module does.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path
import time

from rich import box
from rich.table import Table

from growlm.cli.progress import ProgressDisplay, hms, make_console
from growlm.report import load_run, write_card
from growlm.train import GrowthConfig, ModelSource, OptimConfig, RegConfig, RunConfig, TrainConfig
from growlm.train import checkpoint as ckpt
from growlm.train import train as run_training
from growlm.train.trainer import TrainResult
from growlm.train.data import DataConfig
from growlm.train.parallel import dist_info

console = make_console()


def format_line(rec: dict, max_steps: int, elapsed: float | None = None, eta: float | None = None) -> str:
    """`step 00100/02000 | loss 3.4120 | lr 6.0e-04 | tok/s 9,800 | mfu 41% | elapsed 1m40s | eta 31m40s`
    (+ val loss when evaluated)."""
    w = max(5, len(str(max_steps)))
    parts = [f"step {rec['step']:0{w}d}/{max_steps:0{w}d}"]
    if rec.get("loss") is not None:
        parts.append(f"loss {rec['loss']:.4f}")
    if rec.get("lr") is not None:
        parts.append(f"lr {rec['lr']:.1e}")
    if rec.get("tok_s") is not None:
        parts.append(f"tok/s {rec['tok_s']:,.0f}")
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.0f}%")
    if rec.get("val_loss") is not None:
        parts.append(f"val {rec['val_loss']:.4f} (ppl {math.exp(rec['val_loss']):.2f})")
    if rec.get("skipped"):
        parts.append("SKIPPED (non-finite loss)")
    if elapsed is not None:
        parts.append(f"elapsed {hms(elapsed)}" + ("" if eta is None else f" | eta {hms(eta)}"))
    return " | ".join(parts)


def growth_table(events: list[dict]) -> Table:
    t = Table(title="growth events", box=box.HEAVY_HEAD if console.is_terminal else box.ASCII)
    for c in ("step", "operator", "layers", "n_embd", "params", "added", "trainable", "val before", "val after", "delta"):
        t.add_column(c, justify="right")
    for e in events:
        b, a = e.get("before", {}), e.get("after", {})
        t.add_row(str(e["step"]), str(e["operator"]), f"{b.get('n_layer')}->{a.get('n_layer')}",
                  f"{b.get('n_embd')}->{a.get('n_embd')}", f"{e['params_before']:,}->{e['params_after']:,}",
                  f"{e['params_added']:,}", f"{e['trainable_params']:,}", f"{e['val_loss_before']:.6f}",
                  f"{e['val_loss_after']:.6f}", f"{e['val_loss_delta']:+.2e}")
    return t


def interrupted_message(cfg: TrainConfig, argv: list[str]) -> str:
    """What a Ctrl-C kept and the command that continues from it (one line)."""
    kept = ckpt.latest(Path(cfg.run.out_dir) / "checkpoints")
    if kept is None:
        return f"interrupted before the first checkpoint; nothing to resume in {cfg.run.out_dir}"
    args, skip = [], False
    for a in argv:  # drop any --run.resume VALUE / --run.resume=VALUE: the command below sets it
        if skip or a.startswith("--run.resume="):
            skip = False
            continue
        skip = a == "--run.resume"
        if not skip:
            args.append(a)
    return f"interrupted; kept {kept}; resume with: {shlex.join(['growlm', *args, '--run.resume', 'true'])}"


def train(
    model: ModelSource = ModelSource(),
    data: DataConfig = DataConfig(),
    optim: OptimConfig = OptimConfig(),
    growth: GrowthConfig = GrowthConfig(),
    reg: RegConfig = RegConfig(),
    run: RunConfig = RunConfig(),
) -> None:
    """Continue pretraining (or train from scratch), growing the model during training.

    Args:
        model: the starting model and its tokenizer.
        data: training text, sequence length and validation split.
        optim: AdamW and the learning-rate schedule.
        growth: when and how the model grows (operators: typed GrowthSpec fields), and what happens to
            what it already learned.
        reg: KD from the pre-growth snapshot and EWC.
        run: batch, precision, evaluation, logging, checkpoints, resume.
    """
    run_config(TrainConfig(model=model, data=data, optim=optim, growth=growth, reg=reg, run=run))


def run_config(cfg: TrainConfig) -> TrainResult | None:
    """Run a training (or distillation) config with progress bars and the end-of-run tables and card;
    the result on rank 0, None elsewhere."""
    run = cfg.run
    rank0 = int(os.environ.get("RANK", "0")) == 0  # torchrun sets RANK; the process group starts in the Trainer
    display = ProgressDisplay(console, enabled=rank0)
    t0 = time.perf_counter()
    first: list[tuple[int, float]] = []  # (step, time) of the first logged step: the base of the ETA (setup excluded)

    def on(kind: str, rec: dict) -> None:
        if dist_info()[0] != 0:
            return
        if kind == "progress":  # tokenising the corpus, building a teacher cache (bar, or plain lines); evaluating
            unit = {"tokenise": "docs", "targets": "blocks"}.get(rec["task"], "batches")  # (bar only: the step line has val)
            display.update(rec["task"], rec["done"], rec["total"], unit, log=unit != "batches")
        elif kind == "log":
            now = time.perf_counter()
            first[:] = first or [(rec["step"], now)]
            done = rec["step"] - first[0][0]
            eta = (now - first[0][1]) / done * (run.max_steps - rec["step"]) if done > 0 else None
            rate = f"{rec['tok_s']:,.0f} tok/s" if rec.get("tok_s") else ""
            display.update("train", rec["step"], run.max_steps, "steps", rate=rate, log=False)
            display.print(format_line(rec, run.max_steps, now - t0, eta))
        elif kind == "info":  # what a resume changed, which checkpoint it skipped: one line each
            display.print(rec["message"])
        elif kind == "growth":
            display.console.print(
                f"[bold green]growth[/] step {rec['step']}: {rec['operator']} "
                f"{rec['params_before']:,} -> {rec['params_after']:,} params (+{rec['params_added']:,}), "
                f"val loss {rec['val_loss_before']:.6f} -> {rec['val_loss_after']:.6f} (delta {rec['val_loss_delta']:+.2e})"
            )

    try:
        with display:
            res = run_training(cfg, callback=on)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted_message(cfg, sys.argv[1:])) from None
    if not rank0:
        return None
    elapsed = time.perf_counter() - t0
    if res.events:
        console.print(growth_table(res.events))
    who = f"student of {cfg.distill.teacher}" if cfg.distill.teacher else cfg.model.name
    t = Table(title=f"{who}: {res.step} steps in {elapsed:.0f} s", box=box.HEAVY_HEAD if console.is_terminal else box.ASCII)
    t.add_column("measure")
    t.add_column("base", justify="right")
    t.add_column("final", justify="right")
    if res.base_val_loss is not None and res.val_loss is not None:
        t.add_row("validation perplexity (held-out documents)", f"{math.exp(res.base_val_loss):.3f}", f"{math.exp(res.val_loss):.3f}")
    if "base" in res.retention and "final" in res.retention:
        t.add_row("retention perplexity (Python language reference)", f"{math.exp(res.retention['base']):.3f}",
                  f"{math.exp(res.retention['final']):.3f}")
    console.print(t)
    console.print(f"metrics: {cfg.run.out_dir}/metrics.jsonl" + (f"; model: {cfg.run.out_dir}/hf" if cfg.run.export_hf else ""))
    try:
        cards = write_card(load_run(cfg.run.out_dir))
        console.print("report: " + ", ".join(str(c) for c in cards), highlight=False)
    except Exception as e:  # noqa: BLE001 - the run itself succeeded: say so, and how to retry the report
        console.print(f"report: not written ({type(e).__name__}: {e}); retry with: growlm report {cfg.run.out_dir}", highlight=False)
    return res
