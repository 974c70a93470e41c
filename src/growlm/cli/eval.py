"""`growlm eval`: lm-evaluation-harness-compatible benchmark scores from local task files."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from growlm.errors import GrowlmError
from growlm.eval import evaluate
from growlm.io import atomic_write, check_output, parse_dtype
from growlm.models.hf import load_model

METRIC_ORDER = ("acc", "acc_norm", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte",
                "token_perplexity")


def eval(  # noqa: A001 - the subcommand is called `eval`
    model: str = "smollm2-135m",
    tasks: str = "hellaswag,piqa",
    data_dir: str = ".",
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 16,
    dtype: str = "float32",
    seed: int = 1234,
    out: str | None = None,
    overwrite: bool = False,
) -> None:
    """Score a model on benchmark tasks the way lm-evaluation-harness does; print a table, write JSON.

    Tasks: hellaswag, piqa, arc_easy, arc_challenge, sciq, winogrande, lambada_openai, wikitext, wsc273.
    Each is read from --data-dir (or its subfolder named after the task family) in the Hugging Face
    schema (jsonl/json/parquet) or the original release format.

    Args:
        model: preset name (smollm2-135m), model directory, .gguf file or hub id.
        tasks: comma-separated task names.
        data_dir: folder holding the task files (or one task file).
        limit: score only the first N documents of each task.
        num_fewshot: examples drawn (seeded) from the task's own file and prepended to each prompt.
        batch_size: sequences per forward pass.
        dtype: float32, or bfloat16 (autocast; log-softmax stays float32).
        seed: few-shot sampling seed (the harness's default is 1234).
        out: JSON file for results and per-document scores; default: print only.
        overwrite: replace an existing --out file (without it an existing one is refused before scoring).
    """
    parse_dtype(dtype, ("float32", "bfloat16"))  # the compute dtype: weights stay float32
    if not Path(data_dir).expanduser().exists():
        raise GrowlmError(f"{data_dir}: no such data directory (pass --data_dir with the task files)")
    if batch_size < 1:
        raise GrowlmError(f"batch_size must be >= 1, got {batch_size}")
    if out:
        check_output(out, overwrite, kind="file")
    t0 = time.time()
    m, tok = load_model(model, torch.float32)
    if tok is None:
        raise GrowlmError(f"{model}: has no tokenizer; save one beside the weights")
    t_load = time.time() - t0
    t0 = time.time()
    res = evaluate(m, tok, tasks, data_dir, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                   dtype=dtype, seed=seed)
    elapsed = time.time() - t0

    table = Table(title=f"{model} | {num_fewshot}-shot | {dtype} | {elapsed:.1f} s")
    for col in ("task", "n", "metric", "value", "stderr"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, r in res["results"].items():
        for metric in METRIC_ORDER:
            if metric in r:
                se = r.get(f"{metric}_stderr")
                label = f"{metric} ({r['tokenizer']})" if metric == "token_perplexity" else metric
                table.add_row(name, str(r["n"]), label, f"{r[metric]:.4f}",
                              "" if se is None or math.isnan(se) else f"{se:.4f}")
    Console().print(table)
    if out:
        payload = {"model": model, "tasks": tasks, "data_dir": str(data_dir), "limit": limit,
                   "num_fewshot": num_fewshot, "batch_size": batch_size, "dtype": dtype, "seed": seed,
                   "load_seconds": round(t_load, 2), "eval_seconds": round(elapsed, 2), **res}
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, json.dumps(payload, indent=1) + "\n")
        Console().print(f"wrote {p}")
