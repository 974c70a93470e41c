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

Mode `leaderboard`: the default model's Open LLM Leaderboard row (`growlm.eval.evaluate_suite`: ARC-Challenge
25-shot, HellaSwag 10, MMLU 5, TruthfulQA MC2 0, WinoGrande 5, GSM8K 5) on the first N items of each task
(MMLU: of each of the 57 subjects), with item counts and standard errors, beside the seed model card's row.

Mode `leaderboard-compare`: throughput against the harness on the same items. MMLU: the same 5-shot
(context, " A".." D") requests of the first N questions of --subjects, growlm's `evaluate_mmlu` (each
subject's few-shot preamble once into a KV cache, one row per question) against `HFLM.loglikelihood` (which
already runs one forward per question for one-token choices); GSM8K: the same seeded 5-shot contexts of the
first --gsm8k-n test items, growlm's `generate_until` against `HFLM.generate_until` (same stop sequences,
256 new tokens at most, same batch size). Subjects / chunks alternate the order of the two sides. It checks
the log-likelihoods (max abs difference), acc agreement, and that the generated strings and both extracted
answers are identical.

Data: ../shared/data (override with --data-dir). Results: bench/results/eval.json (compare),
bench/results/eval_scores.json (scores), eval_leaderboard.json, eval_leaderboard_compare.json.

Run: python bench/eval.py --n 500                 (compare; 500 items take ~20 min on 2 shared cores)
     python bench/eval.py --mode scores --n 200
     python bench/eval.py --mode leaderboard --n 20 --gsm8k-n 10
     python bench/eval.py --mode leaderboard-compare --n 5 --gsm8k-n 8
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


def leaderboard(args) -> dict:
    from growlm.eval import evaluate_suite

    model, tok, _ = load_models(args.model)
    row, results, t = {}, {}, {}
    for name in args.suite_tasks.split(","):
        n = args.gsm8k_n if name == "gsm8k" else args.mmlu_n if name == "mmlu" else args.n
        t0 = time.perf_counter()
        out = evaluate_suite(model, tok, args.data_dir, "leaderboard", [name], limit=n, batch_size=args.batch_size)
        t[name] = round(time.perf_counter() - t0, 1)
        row.update(out["row"])
        results[name] = {k: v for k, v in out["results"][name].items() if k != "subjects"}
        print(f"{name}: {row[name]['value']:.2f} ± {row[name]['stderr']:.2f} (n={row[name]['n']}, {t[name]} s)",
              file=sys.stderr, flush=True)
    from growlm.eval import SEED_CARD_ROW

    avg = statistics.mean(r["value"] for r in row.values())
    return {"mode": "leaderboard", "model": args.model, "dtype": "float32", "seconds": t, "row": row,
            "average": avg, "seed_card": SEED_CARD_ROW,
            "seed_card_average_same_tasks": statistics.mean(SEED_CARD_ROW[n] for n in row), "results": results,
            "note": "ARC/HellaSwag/WinoGrande few-shot examples come from the evaluated file (no train split here)"}


def leaderboard_compare(args) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from growlm.eval import benchmarks as B
    from growlm.eval import generate_until
    from growlm.eval.leaderboard import evaluate_mmlu, gsm8k_contexts

    model, tok, d = load_models(args.model)
    hflm = HFLM(pretrained=str(d), device="cpu", dtype="float32", batch_size=args.batch_size)
    data = Path(args.data_dir)
    out: dict = {"mode": "leaderboard-compare", "model": args.model, "dtype": "float32",
                 "batch_size": args.batch_size, "torch_threads": torch.get_num_threads()}
    # -- MMLU
    subjects = args.subjects.split(",")
    t_ours, t_theirs, diffs, agree, n_q = 0.0, 0.0, [], 0, 0
    evaluate_mmlu(model, tok, str(data), subjects[:1], limit=1)  # warm-up
    for k, s in enumerate(subjects):
        docs = B.read_mmlu_csv(data / "mmlu" / "test" / f"{s}_test.csv")[: args.n]
        pre = B.mmlu_fewshot(s, B.read_mmlu_csv(data / "mmlu" / "dev" / f"{s}_dev.csv")[:5])
        reqs = [(pre + B.mmlu_prompt(x), " " + c) for x in docs for c in B.MMLU_CHOICES]
        times = {}
        for side in (("growlm", "harness") if k % 2 == 0 else ("harness", "growlm")):
            t0 = time.perf_counter()
            if side == "growlm":
                _, ours = evaluate_mmlu(model, tok, str(data), [s], limit=args.n, batch_size=args.batch_size)
            else:
                theirs = hflm.loglikelihood([Instance("loglikelihood", {}, r, 0) for r in reqs], disable_tqdm=True)
            times[side] = time.perf_counter() - t0
        t_ours += times["growlm"]
        t_theirs += times["harness"]
        for q, o in enumerate(ours):
            h = [x[0] for x in theirs[4 * q: 4 * q + 4]]
            diffs.append(max(abs(a - b) for a, b in zip(o["loglikelihoods"], h)))
            agree += o["acc"] == float(max(range(4), key=lambda i: h[i]) == o["gold"])
            n_q += 1
        print(f"mmlu {s}: growlm {times['growlm']:.1f}s harness {times['harness']:.1f}s", file=sys.stderr, flush=True)
    out["mmlu"] = {"subjects": subjects, "questions": n_q, "num_fewshot": 5, "growlm_seconds": round(t_ours, 2),
                   "harness_seconds": round(t_theirs, 2), "speedup": round(t_theirs / t_ours, 2),
                   "max_abs_loglikelihood_diff": max(diffs), "acc_agreement": f"{agree}/{n_q}"}
    # -- GSM8K
    docs = B.read_gsm8k(data / "gsm8k" / "test.jsonl")[: args.gsm8k_n]
    contexts = gsm8k_contexts(docs, B.read_gsm8k(data / "gsm8k" / "train.jsonl"), 5, 1234)
    gen_kwargs = {"until": list(B.GSM8K_UNTIL), "do_sample": False, "temperature": 0.0}
    chunks = [list(range(i, min(i + args.batch_size, len(docs)))) for i in range(0, len(docs), args.batch_size)]
    ours_g, theirs_g, t_ours, t_theirs = {}, {}, 0.0, 0.0
    # warm-up both sides (allocator, thread pools) on one short generation
    generate_until(model, tok, contexts[:1], B.GSM8K_UNTIL, 4, 1)
    hflm.generate_until([Instance("generate_until", {}, (contexts[0], {**gen_kwargs, "max_gen_toks": 4}), 0)],
                        disable_tqdm=True)
    for k, chunk in enumerate(chunks):
        ctx = [contexts[i] for i in chunk]
        for side in (("growlm", "harness") if k % 2 == 0 else ("harness", "growlm")):
            t0 = time.perf_counter()
            if side == "growlm":
                res = generate_until(model, tok, ctx, B.GSM8K_UNTIL, B.GSM8K_MAX_GEN_TOKS, args.batch_size)
                ours_g.update(zip(chunk, res))
                t_ours += time.perf_counter() - t0
            else:
                res = hflm.generate_until([Instance("generate_until", {}, (c, dict(gen_kwargs)), 0) for c in ctx],
                                          disable_tqdm=True)
                theirs_g.update(zip(chunk, res))
                t_theirs += time.perf_counter() - t0
        print(f"gsm8k chunk {k + 1}/{len(chunks)} done", file=sys.stderr, flush=True)
    same = [i for i in range(len(docs)) if ours_g[i] == theirs_g[i]]
    same_answers = [i for i in range(len(docs)) if B.gsm8k_extract(ours_g[i]) == B.gsm8k_extract(theirs_g[i])]
    out["gsm8k"] = {"items": len(docs), "num_fewshot": 5, "growlm_seconds": round(t_ours, 2),
                    "harness_seconds": round(t_theirs, 2), "speedup": round(t_theirs / t_ours, 2),
                    "identical_generations": f"{len(same)}/{len(docs)}",
                    "identical_extracted_answers": f"{len(same_answers)}/{len(docs)}",
                    "generations": [{"growlm": ours_g[i], "harness": theirs_g[i]} for i in range(len(docs))]}
    return out


def print_table(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if out["mode"] == "leaderboard":
        t = Table(title=f"{out['model']}, Open LLM Leaderboard tasks (percent), float32")
        t.add_column("")
        for name, r in out["row"].items():
            t.add_column(f"{name} ({r['num_fewshot']}-shot)", justify="right")
        t.add_column("average", justify="right")
        t.add_row("growlm", *(f"{r['value']:.2f} ± {r['stderr']:.2f}" for r in out["row"].values()),
                  f"{out['average']:.2f}")
        t.add_row("items", *(str(r["n"]) for r in out["row"].values()), "")
        t.add_row("seed card", *(f"{out['seed_card'][n]:.2f}" for n in out["row"]),
                  f"{out['seed_card_average_same_tasks']:.2f}")
        con.print(t)
        return
    if out["mode"] == "leaderboard-compare":
        m, g = out["mmlu"], out["gsm8k"]
        con.print(f"MMLU 5-shot, {m['questions']} questions: growlm {m['growlm_seconds']} s, harness "
                  f"{m['harness_seconds']} s, speed-up {m['speedup']}x, max |LL diff| {m['max_abs_loglikelihood_diff']:.1e}, "
                  f"acc agreement {m['acc_agreement']}")
        con.print(f"GSM8K 5-shot, {g['items']} items: growlm {g['growlm_seconds']} s, harness {g['harness_seconds']} s, "
                  f"speed-up {g['speedup']}x, identical generations {g['identical_generations']}, "
                  f"identical answers {g['identical_extracted_answers']}")
        return
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
    p.add_argument("--mode", choices=("compare", "scores", "leaderboard", "leaderboard-compare"), default="compare")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m or a Hugging Face directory")
    p.add_argument("--n", type=int, default=500, help="items (compare) or items per task (scores)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=25, help="items per timed chunk (compare)")
    p.add_argument("--tasks", default="hellaswag,piqa,arc_easy,winogrande,lambada_openai")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--mmlu-n", type=int, default=2, help="questions per MMLU subject (leaderboard)")
    p.add_argument("--gsm8k-n", type=int, default=8, help="GSM8K items (leaderboard, leaderboard-compare)")
    p.add_argument("--suite-tasks", default="arc_challenge,hellaswag,mmlu,truthfulqa_mc2,winogrande,gsm8k")
    p.add_argument("--subjects", default="abstract_algebra,high_school_physics,marketing,world_religions",
                   help="MMLU subjects (leaderboard-compare)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not Path(args.data_dir).exists():
        sys.exit(f"bench/eval.py: data directory {args.data_dir} is absent (pass --data-dir)")
    run = {"compare": compare, "scores": scores, "leaderboard": leaderboard, "leaderboard-compare": leaderboard_compare}
    out = run[args.mode](args)
    default = {"compare": "eval.json", "scores": "eval_scores.json", "leaderboard": "eval_leaderboard.json",
               "leaderboard-compare": "eval_leaderboard_compare.json"}[args.mode]
    path = Path(args.out) if args.out else RESULTS / default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print_table(out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
