"""MMLU, TruthfulQA MC1/MC2, GSM8K and the Open LLM Leaderboard (v1) suite, scored as lm-eval 0.4.13 does.

`evaluate` takes every task name: the zero-shot/few-shot log-likelihood tasks of `growlm.eval.tasks` go to
`growlm.eval.scoring.evaluate_loglikelihood_tasks`; the ones here are:
- `mmlu` (all 57 subjects) or `mmlu_<subject>`: the default template, choices " A".." D", few-shot = the first
  `num_fewshot` rows of the subject's dev file after the subject's description (sampler first_n); acc per
  subject, and per category and overall weighted by size (the harness's group score), with the harness's
  pooled standard errors. Each subject's few-shot preamble runs once into a KV cache and each question is
  one row after it (the four choices are single tokens scored at its last position).
- `truthfulqa_mc1` / `truthfulqa_mc2`: the fixed six-question QA preamble, 0-shot; mc1 = the first (true)
  answer has the highest log-likelihood; mc2 = the normalised probability mass of the true answers.
- `gsm8k`: `num_fewshot` train examples drawn with `random.Random(seed)` per document in order (the
  harness's default sampler), greedy generation until "Question:", "</s>", "<|im_end|>" or EOS, at most 256
  new tokens; exact match of the strict-match ('#### n') and flexible-extract (last number) answers.

`evaluate_suite(..., "leaderboard")` runs the leaderboard's row: ARC-Challenge 25-shot acc_norm,
HellaSwag 10-shot acc_norm, MMLU 5-shot acc, TruthfulQA MC2 0-shot, WinoGrande 5-shot acc, GSM8K 5-shot
strict-match. ARC, HellaSwag and WinoGrande draw their few-shot examples from the evaluated file itself
(the evaluated item left out): the leaderboard draws them from train splits, which are not read here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from growlm.errors import GrowlmError
from growlm.eval import benchmarks as B
from growlm.eval import scoring
from growlm.eval.generate import generate_until
from growlm.eval.scoring import encode_pair, loglikelihood, loglikelihood_tokens, mean_stderr
from growlm.eval.tasks import TASKS
from growlm.models.model import GPT

OWN_TASKS = ("mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k")
GSM8K_FILTERS = ("strict-match", "flexible-extract")

# (task, few-shot, metric) of the Open LLM Leaderboard v1 row (DROP has no local data and is left out)
SUITES: dict[str, list[tuple[str, int, str]]] = {
    "leaderboard": [("arc_challenge", 25, "acc_norm"), ("hellaswag", 10, "acc_norm"), ("mmlu", 5, "acc"),
                    ("truthfulqa_mc2", 0, "acc"), ("winogrande", 5, "acc"), ("gsm8k", 5, "strict-match")],
}
# the seed model card's leaderboard row (percent)
SEED_CARD_ROW = {"arc_challenge": 21.93, "hellaswag": 31.6, "mmlu": 25.05, "truthfulqa_mc2": 40.71,
                 "winogrande": 50.12, "gsm8k": 0.3, "drop": 4.73}


def is_task(name: str) -> bool:
    return name in TASKS or name in OWN_TASKS or (name.startswith("mmlu_") and name[5:] in B.MMLU_SUBJECTS)


def all_task_names() -> list[str]:
    return [*TASKS, *OWN_TASKS, "mmlu_<subject>"]


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """lm_eval.api.metrics.pooled_sample_stderr: a size-weighted group's stderr from its members'."""
    if sum(sizes) - len(sizes) <= 0:
        return float("nan")
    var = sum((n - 1) * se ** 2 * n for se, n in zip(stderrs, sizes)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


# -- MMLU ------------------------------------------------------------------------------------------
def evaluate_mmlu(model: GPT, tokenizer, data_dir: str, subjects: Sequence[str], limit: int | None = None,
                  num_fewshot: int = 5, batch_size: int = 16, dtype: str = "float32",
                  max_length: int | None = None, progress: Callable[[int, int], None] | None = None
                  ) -> tuple[dict, list]:
    files = [B.mmlu_subject_files(data_dir, s) for s in subjects]
    for test, dev in files:  # every file is checked before the first forward pass
        if not test.is_file():
            raise GrowlmError(f"{test}: missing MMLU subject file")
        if num_fewshot and not dev.is_file():
            raise GrowlmError(f"{dev}: missing MMLU subject file (the few-shot pool)")
    per_subject, samples, work = {}, [], []
    for subject, (test, dev) in zip(subjects, files):  # every subject's requests first: progress spans them all
        docs = B.read_mmlu_csv(test)[:limit] if limit else B.read_mmlu_csv(test)
        shots = B.read_mmlu_csv(dev) if num_fewshot else []
        if num_fewshot > len(shots) and num_fewshot:
            raise GrowlmError(f"{dev}: num_fewshot={num_fewshot} needs {num_fewshot} rows, the file has {len(shots)}")
        pre = B.mmlu_fewshot(subject, shots[:num_fewshot])
        work.append((subject, docs, [encode_pair(tokenizer, pre + B.mmlu_prompt(d), " " + c)
                                     for d in docs for c in B.MMLU_CHOICES]))
    total, done = sum(len(r) for _, _, r in work), 0
    for subject, docs, reqs in work:
        tick = None if progress is None else (lambda d, _, base=done: progress(base + d, total))
        scores = loglikelihood_tokens(model, reqs, batch_size, dtype, max_length, share_context="prefix", progress=tick)
        done += len(reqs)
        accs = []
        for k, d in enumerate(docs):
            lls = [s[0] for s in scores[4 * k: 4 * k + 4]]
            acc = float(scoring._argmax(lls) == d["answer"])
            accs.append(acc)
            samples.append({"subject": subject, "loglikelihoods": lls, "gold": d["answer"], "acc": acc})
        per_subject[subject] = {"n": len(docs), "acc": _mean(accs), "acc_stderr": mean_stderr(accs)}
    res: dict = {"num_fewshot": num_fewshot, "file": str(B.mmlu_dir(data_dir))}
    if len(subjects) > 1:
        cats: dict = {}
        for cat in dict.fromkeys(B.MMLU_SUBJECTS[s] for s in subjects):
            members = [per_subject[s] for s in subjects if B.MMLU_SUBJECTS[s] == cat]
            sizes = [m["n"] for m in members]
            cats[cat] = {"n": sum(sizes), "acc": sum(m["acc"] * m["n"] for m in members) / sum(sizes),
                         "acc_stderr": pooled_stderr([m["acc_stderr"] for m in members], sizes)}
        groups = list(cats.values())
        res["categories"] = cats
        res["subjects"] = per_subject
        sizes = [g["n"] for g in groups]
        res.update(n=sum(sizes), acc=sum(g["acc"] * g["n"] for g in groups) / sum(sizes),
                   acc_stderr=pooled_stderr([g["acc_stderr"] for g in groups], sizes))
    else:
        res.update(per_subject[subjects[0]])
    return res, samples


# -- TruthfulQA ------------------------------------------------------------------------------------
def evaluate_truthfulqa(model: GPT, tokenizer, data_dir: str, which: str, limit: int | None = None,
                        num_fewshot: int = 0, batch_size: int = 16, dtype: str = "float32",
                        max_length: int | None = None, progress: Callable[[int, int], None] | None = None
                        ) -> tuple[dict, list]:
    if num_fewshot:
        raise GrowlmError(f"{which}: the task is 0-shot (its prompt carries a fixed six-question preamble)")
    path = B.truthfulqa_file(data_dir)
    docs = B.read_truthfulqa(path)
    docs = docs[:limit] if limit else docs
    key = "mc1_targets" if which == "truthfulqa_mc1" else "mc2_targets"
    reqs, spans = [], []
    for d in docs:
        ctx = B.truthfulqa_prompt(d)
        spans.append((len(reqs), len(reqs) + len(d[key]["choices"])))
        reqs += [(ctx, " " + c) for c in d[key]["choices"]]
    scores = loglikelihood(model, tokenizer, reqs, batch_size, dtype, max_length, progress=progress)
    samples = []
    for d, (a, b) in zip(docs, spans):
        lls = [s[0] for s in scores[a:b]]
        if which == "truthfulqa_mc1":
            acc = float(scoring._argmax(lls) == 0)
        else:  # utils.process_results_mc2: probability mass of the true answers, normalised over all
            top = max(lls)
            probs = [math.exp(x - top) for x in lls]
            acc = sum(p for p, lab in zip(probs, d[key]["labels"]) if lab == 1) / sum(probs)
        samples.append({"loglikelihoods": lls, "labels": d[key]["labels"], "acc": acc})
    accs = [s["acc"] for s in samples]
    return {"n": len(docs), "num_fewshot": 0, "file": str(path), "acc": _mean(accs),
            "acc_stderr": mean_stderr(accs)}, samples


# -- GSM8K -----------------------------------------------------------------------------------------
def gsm8k_contexts(docs: Sequence[dict], pool: Sequence[dict], num_fewshot: int, seed: int) -> list[str]:
    """Few-shot prompts: per document in order, random.Random(seed).sample(train, n) (ContextSampler)."""
    rnd = random.Random(seed)
    out = []
    for d in docs:
        shots = rnd.sample(list(pool), num_fewshot) if num_fewshot else []
        out.append("".join(B.gsm8k_example(s) for s in shots) + B.gsm8k_prompt(d))
    return out


def evaluate_gsm8k(model: GPT, tokenizer, data_dir: str, limit: int | None = None, num_fewshot: int = 5,
                   batch_size: int = 16, dtype: str = "float32", seed: int = 1234,
                   max_length: int | None = None, max_gen_toks: int = B.GSM8K_MAX_GEN_TOKS,
                   progress: Callable[[int, int], None] | None = None) -> tuple[dict, list]:
    test, train = B.gsm8k_files(data_dir)
    docs = B.read_gsm8k(test)
    docs = docs[:limit] if limit else docs
    pool = B.read_gsm8k(train) if num_fewshot else []
    if num_fewshot > len(pool) and num_fewshot:
        raise GrowlmError(f"{train}: num_fewshot={num_fewshot} needs {num_fewshot} rows, the file has {len(pool)}")
    contexts = gsm8k_contexts(docs, pool, num_fewshot, seed)
    gens = generate_until(model, tokenizer, contexts, B.GSM8K_UNTIL, max_gen_toks, batch_size, dtype, max_length,
                          progress)
    samples = []
    for d, g in zip(docs, gens):
        answers = B.gsm8k_extract(g)
        samples.append({"generation": g, "answers": answers, "target": d["answer"].split("#### ")[-1],
                        **{f: B.gsm8k_exact_match(answers[f], d["answer"]) for f in GSM8K_FILTERS}})
    res: dict = {"n": len(docs), "num_fewshot": num_fewshot, "file": str(test), "max_gen_toks": max_gen_toks}
    for f in GSM8K_FILTERS:
        xs = [s[f] for s in samples]
        res[f] = _mean(xs)
        res[f"{f}_stderr"] = mean_stderr(xs)
    return res, samples


# -- every task --------------------------------------------------------------------------------------
def evaluate(
    model: GPT,
    tokenizer,
    tasks: str | Sequence[str],
    data_dir: str,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 16,
    dtype: str = "float32",
    seed: int = 1234,
    max_length: int | None = None,
    share_context: str = "packed",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Score tasks read from local files the way lm-evaluation-harness does
    (`growlm.eval.scoring.evaluate_loglikelihood_tasks` for the log-likelihood tasks, this module for mmlu,
    truthfulqa_mc1/mc2 and gsm8k).

    `progress(done, total)` after each batch, per task in the order given: each task counts from 0 to its
    own total (requests scored; rolling windows for perplexity tasks; prompts completed for gsm8k).

    Returns {"results": {task: metrics}, "samples": {task: per-document scores}}.
    """
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    for name in names:
        if not is_task(name):
            raise GrowlmError(f"unknown task {name!r}; choose from: {', '.join(all_task_names())}")
    if num_fewshot < 0:
        raise GrowlmError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and limit < 1:
        raise GrowlmError(f"limit must be a positive number of documents, got {limit}")
    results, samples = {}, {}
    for name in names:
        if name in TASKS:
            out = scoring.evaluate_loglikelihood_tasks(model, tokenizer, [name], data_dir, limit, num_fewshot,
                                                       batch_size, dtype, seed, max_length, share_context, progress)
            res, smp = out["results"][name], out["samples"][name]
        elif name == "mmlu" or name.startswith("mmlu_"):
            subjects = list(B.MMLU_SUBJECTS) if name == "mmlu" else [name[5:]]
            res, smp = evaluate_mmlu(model, tokenizer, data_dir, subjects, limit, num_fewshot, batch_size, dtype,
                                     max_length, progress)
        elif name.startswith("truthfulqa"):
            res, smp = evaluate_truthfulqa(model, tokenizer, data_dir, name, limit, num_fewshot, batch_size,
                                           dtype, max_length, progress)
        else:
            res, smp = evaluate_gsm8k(model, tokenizer, data_dir, limit, num_fewshot, batch_size, dtype, seed,
                                      max_length, progress=progress)
        results[name], samples[name] = res, smp
    return {"results": results, "samples": samples}


def suite_tasks(suite: str, tasks: str | Sequence[str] | None = None) -> list[tuple[str, int, str]]:
    """(task, few-shot, metric) of `suite` in its order; `tasks` (names or comma-separated) picks a subset."""
    if suite not in SUITES:
        raise GrowlmError(f"unknown suite {suite!r}; choose from: {', '.join(SUITES)}")
    entries = SUITES[suite]
    if tasks:
        wanted = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
        known = [e[0] for e in entries]
        bad = [t for t in wanted if t not in known]
        if bad:
            raise GrowlmError(f"{', '.join(bad)}: not in the {suite} suite ({', '.join(known)})")
        entries = [e for e in entries if e[0] in wanted]
    return entries


def evaluate_suite(
    model: GPT,
    tokenizer,
    data_dir: str,
    suite: str = "leaderboard",
    tasks: str | Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    dtype: str = "float32",
    seed: int = 1234,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """A suite's tasks, each with its own few-shot count, and its row: {task: score in percent, average};
    `progress(done, total)` per task, as `evaluate` (the tasks in `suite_tasks` order)."""
    results, samples, row = {}, {}, {}
    for name, shots, metric in suite_tasks(suite, tasks):
        out = evaluate(model, tokenizer, [name], data_dir, limit, shots, batch_size, dtype, seed, progress=progress)
        results[name], samples[name] = out["results"][name], out["samples"][name]
        row[name] = {"num_fewshot": shots, "metric": metric, "value": 100 * results[name][metric],
                     "stderr": 100 * results[name][f"{metric}_stderr"], "n": results[name]["n"]}
    avg = _mean([r["value"] for r in row.values()])
    seed_avg = _mean([SEED_CARD_ROW[n] for n in row])
    return {"suite": suite, "row": row, "average": avg, "seed_card": {n: SEED_CARD_ROW[n] for n in row},
            "seed_card_average": seed_avg, "results": results, "samples": samples}
