"""Evaluation speed and scores: growlm vs lm-evaluation-harness's HF backend (HFLM) on the same model.

Mode `compare` (default): the same model (default: the embedded SmolLM2-135M-Instruct, exported once as a
Hugging Face directory), the same N HellaSwag validation items, the same (context, continuation) requests
built by growlm.eval.tasks (lm-eval's hellaswag prompt). growlm scores them with `growlm.eval.loglikelihood`
(shared-context packing, head only at scored positions); the harness with `HFLM.loglikelihood`, same batch
size, float32 on both sides. The items are cut into chunks scored alternately (A B, B A, ...) so that load
from other users of this shared CPU hits both sides alike; the speed-up is the median of per-chunk ratios.
It checks the per-item log-likelihoods (max abs difference) and that acc / acc_norm are identical, listing
items whose top two choices are closer than 1e-4 (where float noise may flip the argmax).

Mode `scores`: the default model's 0-shot acc / acc_norm on subsets of HellaSwag, PIQA, ARC-Easy,
WinoGrande and LAMBADA (first N items each) next to the published GPT-2 124M row (../shared/REFERENCE.md).

Data: ../shared/data (override with --data-dir). Results: bench/results/eval.json (compare) and
bench/results/eval_scores.json (scores).

Run: python bench/eval.py --n 500                 (compare; 500 items take ~20 min on 2 shared cores)
     python bench/eval.py --mode scores --n 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
# published GPT-2 124M (lm-evaluation-harness, 0-shot), ../shared/REFERENCE.md "Evaluation"
GPT2_124M = {"hellaswag": {"acc_norm": 0.311}, "piqa": {"acc": 0.625}, "winogrande": {"acc": 0.516},
             "lambada_openai": {"acc": 0.3256, "perplexity": 40.06}, "arc_easy": {}}


def load_models(spec: str):
    from growlm.models.hf import default_model_dir, load_model

    d = default_model_dir() if spec == "smollm2-135m" else Path(spec)
    model, tok = load_model(str(d) if spec != "smollm2-135m" else spec, torch.float32)
    return model.eval(), tok, d


def hellaswag_requests(data: Path, n: int):
    from growlm.eval.tasks import TASKS

    task = TASKS["hellaswag"]
    docs = task.load(task.find_file(data))[:n]
    return task, docs, [task.requests(d) for d in docs]


def compare(args) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from growlm.eval.scoring import _argmax, loglikelihood

    model, tok, d = load_models(args.model)
    hflm = HFLM(pretrained=str(d), device="cpu", dtype="float32", batch_size=args.batch_size)
    task, docs, per_doc = hellaswag_requests(Path(args.data_dir), args.n)
    chunks = [list(range(i, min(i + args.chunk, len(docs)))) for i in range(0, len(docs), args.chunk)]
    ours: dict[int, list] = {}
    theirs: dict[int, list] = {}
    t_ours, t_theirs, ratios = [], [], []
    c_ours, c_theirs, cpu_ratios = [], [], []
    # warm-up both sides on a few items (allocator, thread pools)
    warm = [r for i in chunks[0][:2] for r in per_doc[i]]
    loglikelihood(model, tok, warm, batch_size=args.batch_size)
    hflm.loglikelihood([Instance("loglikelihood", {}, r, 0) for r in warm], disable_tqdm=True)
    for k, chunk in enumerate(chunks):
        reqs = [r for i in chunk for r in per_doc[i]]
        times, cpu = {}, {}
        for side in (("growlm", "harness") if k % 2 == 0 else ("harness", "growlm")):
            c0 = time.process_time()
            t0 = time.perf_counter()
            if side == "growlm":
                out = loglikelihood(model, tok, reqs, batch_size=args.batch_size)
            else:
                out = hflm.loglikelihood([Instance("loglikelihood", {}, r, 0) for r in reqs], disable_tqdm=True)
            times[side] = time.perf_counter() - t0
            cpu[side] = time.process_time() - c0
            store = ours if side == "growlm" else theirs
            pos = 0
            for i in chunk:
                store[i] = out[pos: pos + len(per_doc[i])]
                pos += len(per_doc[i])
        t_ours.append(times["growlm"])
        t_theirs.append(times["harness"])
        ratios.append(times["harness"] / times["growlm"])
        c_ours.append(cpu["growlm"])
        c_theirs.append(cpu["harness"])
        cpu_ratios.append(cpu["harness"] / cpu["growlm"])
        print(f"chunk {k + 1}/{len(chunks)}: growlm {times['growlm']:.1f}s harness {times['harness']:.1f}s "
              f"ratio {ratios[-1]:.2f} | cpu ratio {cpu_ratios[-1]:.2f}", file=sys.stderr, flush=True)

    max_diff, mismatches, close = 0.0, [], []
    acc = {"growlm": [0, 0], "harness": [0, 0]}
    for i, doc in enumerate(docs):
        gold, choices = task.gold(doc), task.doc_to_choice(doc)
        a, b = [x[0] for x in ours[i]], [x[0] for x in theirs[i]]
        max_diff = max(max_diff, max(abs(x - y) for x, y in zip(a, b)))
        res = {}
        for side, lls in (("growlm", a), ("harness", b)):
            res[side] = (_argmax(lls) == gold, _argmax([ll / len(c) for ll, c in zip(lls, choices)]) == gold)
            acc[side][0] += res[side][0]
            acc[side][1] += res[side][1]
        top = sorted(b, reverse=True)
        norm = sorted((ll / len(c) for ll, c in zip(b, choices)), reverse=True)
        if top[0] - top[1] < 1e-4 or norm[0] - norm[1] < 1e-4:
            close.append(i)
        if res["growlm"] != res["harness"]:
            mismatches.append(i)
    n = len(docs)
    n_tokens = sum(len(tok.encode(c + x)) for reqs in per_doc for c, x in reqs)
    out = {
        "mode": "compare", "model": args.model, "task": "hellaswag", "items": n, "requests": sum(map(len, per_doc)),
        "request_tokens": n_tokens, "batch_size": args.batch_size, "dtype": "float32", "chunk": args.chunk,
        "growlm_seconds": round(sum(t_ours), 2), "harness_seconds": round(sum(t_theirs), 2),
        "growlm_items_per_s": round(n / sum(t_ours), 3), "harness_items_per_s": round(n / sum(t_theirs), 3),
        "speedup_median": round(statistics.median(ratios), 3), "speedup_total": round(sum(t_theirs) / sum(t_ours), 3),
        "chunk_ratios": [round(r, 3) for r in ratios],
        "growlm_cpu_seconds": round(sum(c_ours), 2), "harness_cpu_seconds": round(sum(c_theirs), 2),
        "cpu_speedup_median": round(statistics.median(cpu_ratios), 3),
        "chunk_cpu_ratios": [round(r, 3) for r in cpu_ratios],
        "acc": {s: acc[s][0] / n for s in acc}, "acc_norm": {s: acc[s][1] / n for s in acc},
        "max_abs_loglikelihood_diff": max_diff, "argmax_mismatches": mismatches, "close_call_items": close,
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }
    return out


def scores(args) -> dict:
    from growlm.eval import evaluate

    model, tok, _ = load_models(args.model)
    tasks = args.tasks.split(",")
    t0 = time.perf_counter()
    res = evaluate(model, tok, tasks, args.data_dir, limit=args.n, batch_size=args.batch_size)["results"]
    return {"mode": "scores", "model": args.model, "items_per_task": args.n, "num_fewshot": 0, "dtype": "float32",
            "seconds": round(time.perf_counter() - t0, 1), "results": res, "gpt2_124m_published": GPT2_124M}


def print_table(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if out["mode"] == "compare":
        t = Table(title=f"HellaSwag, {out['items']} items, {out['model']}, float32, batch {out['batch_size']}")
        for c in ("side", "seconds", "items/s", "acc", "acc_norm"):
            t.add_column(c, justify="right")
        for side in ("growlm", "harness"):
            t.add_row(side, f"{out[side + '_seconds']:.1f}", f"{out[side + '_items_per_s']:.2f}",
                      f"{out['acc'][side]:.4f}", f"{out['acc_norm'][side]:.4f}")
        con.print(t)
        con.print(f"speed-up (median of chunk ratios): wall {out['speedup_median']:.2f}x, "
                  f"CPU time {out['cpu_speedup_median']:.2f}x | "
                  f"max |LL diff| {out['max_abs_loglikelihood_diff']:.2e} | argmax mismatches "
                  f"{out['argmax_mismatches']} | close calls {out['close_call_items']}")
    else:
        t = Table(title=f"{out['model']} 0-shot, first {out['items_per_task']} items per task ({out['seconds']} s)")
        for c in ("task", "n", "acc", "acc_norm", "perplexity", "GPT-2 124M (published)"):
            t.add_column(c, justify="right")
        for name, r in out["results"].items():
            pub = GPT2_124M.get(name, {})
            t.add_row(name, str(r["n"]), f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}",
                      f"{r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}" if "acc_norm" in r else "",
                      f"{r['perplexity']:.2f}" if "perplexity" in r else "",
                      ", ".join(f"{k} {v}" for k, v in pub.items()))
        con.print(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("compare", "scores"), default="compare")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m or a Hugging Face directory")
    p.add_argument("--n", type=int, default=500, help="items (compare) or items per task (scores)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=25, help="items per timed chunk (compare)")
    p.add_argument("--tasks", default="hellaswag,piqa,arc_easy,winogrande,lambada_openai")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not Path(args.data_dir).exists():
        sys.exit(f"bench/eval.py: data directory {args.data_dir} is absent (pass --data-dir)")
    out = compare(args) if args.mode == "compare" else scores(args)
    path = Path(args.out) if args.out else RESULTS / ("eval.json" if args.mode == "compare" else "eval_scores.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print_table(out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
