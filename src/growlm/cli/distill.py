"""`growlm distill --config configs/distill-smollm2.yaml [--eval hellaswag --data-dir DIR --limit 200]`.

The training loop of `growlm train` with a teacher (`distill.teacher`): the student is cut from it
(`distill.student`) or given by the model section; the loss is `distill.objective`. At the end, teacher and
student side by side: parameters, validation perplexity, generation tokens/s and any --eval tasks; the
comparison goes to `RUN_DIR/distill_results.json`, the student's scores to `eval_results.json`, and the
model card is written again with both.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from rich import box
from rich.table import Table

from growlm.cli.train import console, run_config
from growlm.errors import GrowlmError
from growlm.eval import evaluate
from growlm.io import atomic_write
from growlm.models.hf import load_model
from growlm.models.model import GPT
from growlm.report import DISTILL_FILE, EVAL_FILE, load_run, write_card
from growlm.train import ModelSource, OptimConfig, RunConfig, TrainConfig
from growlm.train.build import load_tokenizer
from growlm.train.config import DistillConfig
from growlm.train.data import DataConfig


def distill(
    distill: DistillConfig = DistillConfig(),  # noqa: A002 - the section is called distill
    model: ModelSource = ModelSource(),
    data: DataConfig = DataConfig(),
    optim: OptimConfig = OptimConfig(),
    run: RunConfig = RunConfig(),
    eval: str | None = None,  # noqa: A002 - the option is called --eval
    data_dir: str = ".",
    limit: int | None = 200,
    gen_tokens: int = 64,
) -> None:
    """Distil a teacher into a smaller student: cut the student from the teacher, train it on the teacher's
    predictions (online or from a cache) and the data, and compare the two.

    Args:
        distill: the teacher, how the student is cut from it, the objective and the teacher targets.
        model: the student when distill.student is not set (pretrained or scratch); its tokenizer must be the teacher's.
        data: training text, sequence length and validation split.
        optim: AdamW and the learning-rate schedule.
        run: batch, precision, evaluation, logging, checkpoints, resume.
        eval: comma-separated eval tasks (e.g. hellaswag) scored on teacher and student at the end.
        data_dir: folder holding the task files for --eval.
        limit: score only the first N documents of each --eval task.
        gen_tokens: tokens generated (greedy) to measure generation speed of teacher and student (0 = skip).
    """
    if distill.teacher is None:
        raise GrowlmError("growlm distill needs a teacher: set distill.teacher (e.g. smollm2-135m)")
    if eval and not Path(data_dir).expanduser().exists():
        raise GrowlmError(f"{data_dir}: no such data directory (pass --data_dir with the task files for --eval)")
    cfg = TrainConfig(model=model, data=data, optim=optim, run=run, distill=distill)
    res = run_config(cfg)
    if res is None or not run.export_hf:
        return
    out = Path(run.out_dir)
    teacher, tok = load_model(distill.teacher, dtype=torch.float32)
    tok = load_tokenizer(model.tokenizer, tok)
    student, _ = load_model(str(out / "hf"), dtype=torch.float32)
    rows = {"teacher": _measure(teacher, tok, gen_tokens), "student": _measure(student, tok, gen_tokens)}
    runs = load_run(out)
    dist = runs.distill or {}
    rows["teacher"]["val_loss"] = dist.get("teacher_val_loss")
    rows["student"]["val_loss"] = res.val_loss
    rows["student"]["val_loss_start"] = res.base_val_loss
    if eval:
        for name, m in (("teacher", teacher), ("student", student)):
            t0 = time.time()
            rows[name]["results"] = evaluate(m, tok, eval, data_dir, limit=limit)["results"]
            rows[name]["eval_seconds"] = round(time.time() - t0, 2)
        payload = {"model": str(out / "hf"), "tasks": eval, "limit": limit, "eval_seconds": rows["student"]["eval_seconds"],
                   "results": rows["student"]["results"]}
        atomic_write(out / EVAL_FILE, json.dumps(payload, indent=1) + "\n")
    atomic_write(out / DISTILL_FILE, json.dumps({"teacher_name": distill.teacher, "eval_tasks": eval, "limit": limit,
                                                 **rows}, indent=1) + "\n")
    console.print(comparison_table(rows))
    try:
        cards = write_card(load_run(out))
        console.print("report: " + ", ".join(str(c) for c in cards), highlight=False)
    except Exception as e:  # noqa: BLE001 - the run itself succeeded: say so, and how to retry the report
        console.print(f"report: not written ({type(e).__name__}: {e}); retry with: growlm report {out}", highlight=False)


@torch.no_grad()
def _measure(model: GPT, tokenizer, n: int) -> dict:
    """Parameters and greedy generation speed (tokens/s, n new tokens after a short prompt, KV cache)."""
    row: dict = {"params": model.num_params()}
    if n > 0:
        ids = torch.tensor(tokenizer(["To be, or not to be, that is the question:"])["input_ids"][:1])
        model.eval().generate(ids, 4)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, n)
        row["gen_tok_s"] = n / (time.perf_counter() - t0)
    return row


def comparison_table(rows: dict) -> Table:
    t = Table(title="teacher vs student", box=box.HEAVY_HEAD if console.is_terminal else box.ASCII)
    t.add_column("measure")
    t.add_column("teacher", justify="right")
    t.add_column("student", justify="right")
    te, st = rows["teacher"], rows["student"]
    t.add_row("parameters", f"{te['params']:,}", f"{st['params']:,}")
    if te.get("val_loss") is not None and st.get("val_loss") is not None:
        t.add_row("validation perplexity", f"{math.exp(te['val_loss']):.3f}", f"{math.exp(st['val_loss']):.3f}")
    if "gen_tok_s" in te:
        t.add_row("generation tokens/s (greedy, batch 1)", f"{te['gen_tok_s']:.1f}", f"{st['gen_tok_s']:.1f}")
    for task, r in (te.get("results") or {}).items():
        for m in ("acc_norm", "acc"):
            if m in r:
                t.add_row(f"{task} {m} (n={r.get('n')})", f"{r[m]:.4f}", f"{st['results'][task][m]:.4f}")
    return t
