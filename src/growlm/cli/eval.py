"""`growlm eval`: lm-evaluation-harness-compatible benchmark scores from local task files, with a progress
bar per task under a terminal and periodic plain lines (elapsed, ETA) otherwise (`growlm.cli.progress`)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from growlm.cli.progress import ProgressDisplay, make_console
from growlm.errors import GrowlmError
from growlm.eval import SUITES, evaluate, evaluate_suite, suite_tasks
from growlm.eval.tasks import TASKS
from growlm.io import atomic_write, check_output
from growlm.models.hf import load_model
from growlm.train.precision import choose_autocast

METRIC_ORDER = ("acc", "acc_norm", "strict-match", "flexible-extract", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte",
                "token_perplexity")


def task_progress(display: ProgressDisplay, names: Sequence[str]) -> Callable[[int, int], None]:
    """The `progress(done, total)` of one `evaluate` call over `names`: a bar (or plain lines) per task, in
    the unit its evaluator counts: rolling windows (perplexity tasks), prompts (gsm8k) or requests."""
    def unit(name: str) -> str:
        if name == "gsm8k":
            return "prompts"
        return "windows" if name in TASKS and TASKS[name].output_type == "loglikelihood_rolling" else "requests"
    return display.parts([(n, unit(n)) for n in names])


def eval(  # noqa: A001 - the subcommand is called `eval`
    model: str = "smollm2-135m",
    tasks: str | None = None,
    data_dir: str = ".",
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 16,
    dtype: str = "auto",
    seed: int = 1234,
    out: str | None = None,
    suite: str | None = None,
    overwrite: bool = False,
) -> None:
    """Score a model on benchmark tasks the way lm-evaluation-harness does; print a table, write JSON.

    Tasks: hellaswag, piqa, arc_easy, arc_challenge, sciq, winogrande, lambada_openai, wikitext, wsc273,
    mmlu (57 subjects; or mmlu_<subject>), truthfulqa_mc1, truthfulqa_mc2, gsm8k. Each is read from
    --data-dir (or its subfolder named after the task family) in the Hugging Face schema (jsonl/json/parquet)
    or the original release format. `--suite leaderboard` runs the Open LLM Leaderboard row (ARC-Challenge
    25-shot, HellaSwag 10, MMLU 5, TruthfulQA MC2 0, WinoGrande 5, GSM8K 5; --tasks picks a subset) and
    prints it beside the seed model card's row.

    Args:
        model: preset name (smollm2-135m), model directory, .gguf file or hub id.
        tasks: comma-separated task names (default hellaswag,piqa; with --suite, the whole suite).
        data_dir: folder holding the task files (or one task file).
        limit: score only the first N documents of each task.
        num_fewshot: examples prepended to each prompt: drawn (seeded) from the task's own file; MMLU takes the
            first rows of each subject's dev file, GSM8K samples its train file. Ignored with --suite.
        batch_size: sequences per forward pass.
        dtype: float32, bfloat16 (autocast; log-softmax stays float32), or auto: bfloat16 only where its matmuls
            on this model's shapes are measured faster here (once per machine and thread count, cached).
        seed: few-shot sampling seed (the harness's default is 1234).
        out: JSON file for results and per-document scores; default: print only.
        suite: 'leaderboard': each task with the leaderboard's few-shot count; --tasks (if given) a subset.
        overwrite: replace an existing --out file (without it an existing one is refused before scoring).
    """
    if dtype not in ("auto", "float32", "bfloat16"):  # the compute dtype: weights stay float32
        raise GrowlmError(f"dtype must be one of auto, float32, bfloat16, got {dtype!r}")
    if not Path(data_dir).expanduser().exists():
        raise GrowlmError(f"{data_dir}: no such data directory (pass --data_dir with the task files)")
    if batch_size < 1:
        raise GrowlmError(f"batch_size must be >= 1, got {batch_size}")
    if suite is not None and suite not in SUITES:
        raise GrowlmError(f"unknown suite {suite!r}; choose from: {', '.join(SUITES)}")
    if out:
        check_output(out, overwrite, kind="file")
    t0 = time.time()
    m, tok = load_model(model, torch.float32)
    if tok is None:
        raise GrowlmError(f"{model}: has no tokenizer; save one beside the weights")
    t_load = time.time() - t0
    if dtype != "float32":  # the precision choice of training (growlm.train.precision), on eval-sized batches
        tokens = batch_size * min(m.config.block_size, 512)
        prec = choose_autocast("auto" if dtype == "auto" else "bf16", m.config, tokens, torch.float32,
                               str(next(m.parameters()).device))
        if prec.warning:
            print(f"warning: {prec.warning.replace('run.autocast=bf16', '--dtype bfloat16')}", file=sys.stderr)
        dtype = "bfloat16" if prec.autocast == "bf16" else "float32"
    console = make_console()
    t0 = time.time()
    with ProgressDisplay(console) as display:
        if suite is not None:
            names = [e[0] for e in suite_tasks(suite, tasks)]
            res = evaluate_suite(m, tok, data_dir, suite, tasks, limit=limit, batch_size=batch_size, dtype=dtype,
                                 seed=seed, progress=task_progress(display, names))
        else:
            tasks = tasks or "hellaswag,piqa"
            names = [t.strip() for t in tasks.split(",")]
            res = evaluate(m, tok, tasks, data_dir, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                           dtype=dtype, seed=seed, progress=task_progress(display, names))
    elapsed = time.time() - t0
    if suite is not None:
        _print_row(console, model, res, elapsed)

    shots = "suite few-shot" if suite else f"{num_fewshot}-shot"
    table = Table(title=f"{model} | {shots} | {dtype} | {elapsed:.1f} s", box=_box(console))
    for col in ("task", "n", "metric", "value", "stderr"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, r in res["results"].items():
        for metric in METRIC_ORDER:
            if metric in r:
                se = r.get(f"{metric}_stderr")
                label = f"{metric} ({r['tokenizer']})" if metric == "token_perplexity" else metric
                table.add_row(name, str(r["n"]), label, f"{r[metric]:.4f}",
                              "" if se is None or math.isnan(se) else f"{se:.4f}")
        for group, g in r.get("categories", {}).items():  # MMLU's categories
            se = g["acc_stderr"]
            table.add_row(f"{name}/{group}", str(g["n"]), "acc", f"{g['acc']:.4f}",
                          "" if math.isnan(se) else f"{se:.4f}")
    console.print(table)
    if out:
        payload = {"model": model, "tasks": tasks, "data_dir": str(data_dir), "limit": limit,
                   "num_fewshot": num_fewshot, "batch_size": batch_size, "dtype": dtype, "seed": seed,
                   "load_seconds": round(t_load, 2), "eval_seconds": round(elapsed, 2), **res}
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, json.dumps(payload, indent=1) + "\n")
        console.print(f"wrote {p}")


def _box(console: Console) -> box.Box:
    """Heavy rules on a terminal; ASCII in files and CI logs (no bar glyphs outside a terminal)."""
    return box.HEAVY_HEAD if console.is_terminal else box.ASCII


def _print_row(console: Console, model: str, res: dict, elapsed: float) -> None:
    """The suite's row (percent) beside the seed model card's."""
    row = res["row"]
    table = Table(title=f"{model} | {res['suite']} | {elapsed:.1f} s", box=_box(console))
    table.add_column("", justify="left")
    for name, r in row.items():
        table.add_column(f"{name} ({r['num_fewshot']}-shot)", justify="right")
    table.add_column("average", justify="right")
    table.add_row(model, *(f"{r['value']:.2f} ± {r['stderr']:.2f}" if not math.isnan(r["stderr"])
                           else f"{r['value']:.2f}" for r in row.values()), f"{res['average']:.2f}")
    table.add_row("items", *(str(r["n"]) for r in row.values()), "")
    table.add_row("seed card", *(f"{res['seed_card'][n]:.2f}" for n in row), f"{res['seed_card_average']:.2f}")
    console.print(table)
