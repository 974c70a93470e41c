"""Learning new text without forgetting: SmolLM2-135M learns Shakespeare at equal steps by fourteen recipes, and
each is scored on what it gained (Shakespeare) and what it kept (general text it never trained on).

Every variant runs growlm's own `Trainer` from the same base weights, with the main job's settings
(configs/grow-smollm2-shakespeare.yaml: AdamW lr 3e-4, cosine to 0, no weight decay, clip 1.0, three growth
events of 2 identity blocks each, evenly spaced from step 0) scaled to the step budget: by default 30 steps of
4 x 128 tokens instead of 90 of 8 x 128, the same for every variant, so that 14 variants x 2 seeds fit ~60
minutes on 2 quiet cores. The data split is the main job's (held-out plays); a seed sets the block order (data.seed),
the same for every variant but e, g, h, j, k, l and n, whose stream holds the replay blocks too. Variants:

  a_full         full fine-tuning: no growth, every parameter trains
  b_top          identity blocks on top, base frozen (depth where=top init=copy, old_params=freeze_base): the main job
  c_interleave   identity blocks interleaved, base frozen (LLaMA-Pro, Wu et al. 2024)
  d_top_kd       b + KD from the base model (reg.kd_weight, T = 2; reg.kd_teacher=base: the model before the
                 first event, here the pretrained base, is the teacher for the whole run)
  e_top_replay   b + replay: a small buffer of general text (whole enwiki2015 articles) repeated into the
                 training stream so that a fixed fraction of the sampled blocks is general text
                 (data.replay, data.replay_fraction)
  f_full_ewc     a + EWC (reg.ewc_lambda; Kirkpatrick et al. 2017) anchored at the base. growlm builds EWC at
                 growth events only, so with no growth the bench anchors it at step 0 itself
                 (`regularize.build_ewc`), the Fisher taken on general-text blocks (the old task's data)
  g_full_replay  a + the replay of e: full fine-tuning that keeps seeing general text
  h_top_kd_replay b + KD from the base + replay (d and e together: the base teaches on the replayed text too)
  i_interleave_lr c at lr 1e-3 instead of 3e-4: with the base frozen the rate moves only the new blocks
  j_interleave_lr_kd_replay  i + KD from the base + replay
  k_interleave_lr_replay     i + replay
  l_interleave_lr_kd03_replay  i + KD from the base at weight 0.3 + replay
  m_interleave_lr_kd03         i + KD from the base at weight 0.3, no replay (needs no text beyond the new domain)
  n_interleave_lr_kd04_replay  l with KD weight 0.4 (between l and j on the gain/retention line)

Measures, on fixed block sets shared by all variants and computed with `growlm.distill.prune.block_loss`
(mean token cross-entropy, the Trainer's own evaluation): Shakespeare validation perplexity (blocks spread evenly
over the held-out plays; the main job scores the first 48, which start with a cast list), retention perplexity on WikiText-2 test (the first blocks of
../shared/data/corpus/wikitext-2-raw/wiki.test.raw; its 62 article titles are disjoint from the enwiki2015
train slice the replay buffer comes from) and on Python's language reference (`growlm.train.data.retention_text`,
what run.retention_blocks scores). Per variant: fraction of full fine-tuning's Shakespeare perplexity drop
(paired per seed), retention change in percent vs the base, executed FLOPs (the Trainer's count, which includes
the KD teacher's forward passes, plus the bench's own EWC Fisher for f; not the EWC penalty's few FLOPs per
parameter per step) and wall time. EWC's lambda comes from `auto_lambda`. A variant is
flagged when it keeps both retention perplexities within +3% of the base and gains >= 80% of full
fine-tuning's improvement (issue 13, must-show 2).

Run: python bench/forgetting.py            (~20-25 min on 2 quiet cores; writes bench/results/forgetting.json)
     python bench/forgetting.py --quick    (~2.5 min on a busy machine: 1 thread, 2 steps of 2 x 64 tokens, 2 eval
                                            blocks per measure; checks the script, not the claim; writes nothing)
"""

from __future__ import annotations

import argparse
import bz2
import copy
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from growlm.distill.prune import block_loss  # noqa: E402
from growlm.growth import GrowthSpec  # noqa: E402
from growlm.models.hf import load_model  # noqa: E402
from growlm.train import GrowthConfig, OptimConfig, RegConfig, RunConfig, TrainConfig, Trainer  # noqa: E402
from growlm.train.data import DataConfig, Document, prepare_data, retention_text, text_blocks  # noqa: E402
from growlm.train.flops import fisher_flops, flops_per_token  # noqa: E402
from growlm.train.regularize import EWC, build_ewc  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "corpus"
ENWIKI = SHARED / "enwiki2015" / "enwiki2015.train.txt.bz2"
WIKITEXT = SHARED / "wikitext-2-raw" / "wiki.test.raw"
MAIN_JOB_STEPS = 60  # configs/grow-smollm2-shakespeare.yaml: 60 steps of 8 x 128, growth every 20 from 0, warmup 5 (90 / 30 until 2026-12-03)

VARIANTS = {
    "a_full": dict(growth=None, kd=0.0, ewc=False, replay=False),
    "b_top": dict(growth="top", kd=0.0, ewc=False, replay=False),
    "c_interleave": dict(growth="interleave", kd=0.0, ewc=False, replay=False),
    "d_top_kd": dict(growth="top", kd=1.0, ewc=False, replay=False),
    "e_top_replay": dict(growth="top", kd=0.0, ewc=False, replay=True),
    "f_full_ewc": dict(growth=None, kd=0.0, ewc=True, replay=False),
    "g_full_replay": dict(growth=None, kd=0.0, ewc=False, replay=True),
    "h_top_kd_replay": dict(growth="top", kd=1.0, ewc=False, replay=True),
    "i_interleave_lr": dict(growth="interleave", kd=0.0, ewc=False, replay=False, lr=1e-3),
    "j_interleave_lr_kd_replay": dict(growth="interleave", kd=1.0, ewc=False, replay=True, lr=1e-3),
    "k_interleave_lr_replay": dict(growth="interleave", kd=0.0, ewc=False, replay=True, lr=1e-3),
    "l_interleave_lr_kd03_replay": dict(growth="interleave", kd=0.3, ewc=False, replay=True, lr=1e-3),
    "m_interleave_lr_kd03": dict(growth="interleave", kd=0.3, ewc=False, replay=False, lr=1e-3),
    "n_interleave_lr_kd04_replay": dict(growth="interleave", kd=0.4, ewc=False, replay=True, lr=1e-3),
}


def enwiki_articles(max_chars: int) -> list[Document]:
    """The first whole articles of the enwiki2015 train slice (blank-line separated), about max_chars in all."""
    docs, cur, total = [], [], 0
    with bz2.open(ENWIKI, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                cur.append(line.rstrip("\n"))
                continue
            if cur:
                docs.append(Document(f"enwiki:{len(docs)}", "\n".join(cur)))
                total += len(docs[-1].text)
                cur = []
            if total >= max_chars:
                break
    return docs


def warmup(steps: int) -> int:
    """The main job's 5 warm-up steps (they tame Adam's first, sign-like updates of the zeroed o/down
    projections), fewer only in runs too short for them."""
    return min(5, max(1, steps // 6))


def make_config(name: str, v: dict, args, seed: int, work: Path, replay: str | None = None) -> TrainConfig:
    s = args.steps
    every = args.growth_every or max(1, s // 3)  # the main job: events at 0, 30, 60 of 90
    growth = GrowthConfig()
    if v["growth"]:
        growth = GrowthConfig(trigger="schedule", start=0, every=every, max_events=3, old_params="freeze_base",
                              operators=[GrowthSpec("depth", n=2, where=v["growth"], init="copy")])
    return TrainConfig(
        data=DataConfig(path=None, seq_len=args.seq_len, val_blocks=1, seed=1234 + seed,  # order per seed
                        replay=replay if v["replay"] else None, replay_fraction=args.replay_fraction if v["replay"] else 0.0),
        optim=OptimConfig(lr=v.get("lr", 3e-4), min_lr=0.0, warmup_steps=warmup(s), decay="cosine",
                          weight_decay=0.0, grad_clip=1.0),
        growth=growth,
        reg=RegConfig(kd_weight=v["kd"], kd_temperature=2.0, kd_teacher="base",
                      ewc_lambda=args.ewc_lambda if v["ewc"] else 0.0, ewc_samples=args.ewc_samples),
        run=RunConfig(max_steps=s, micro_batch=args.micro_batch, eval_every=s, log_every=1, seed=seed,
                      out_dir=str(work / f"{name}-s{seed}"), export_hf=False, peak_flops=0, keep_last=1,
                      retention_blocks=0),
    )


def measure(model, evals: dict[str, torch.Tensor], batch: int) -> dict[str, float]:
    return {k: block_loss(model, b, batch) for k, b in evals.items()}


def auto_lambda(fisher: dict[str, torch.Tensor], lr: float, steps: int, target: float) -> float:
    """lambda = 2 * target / (sum F * lr^2 * steps): the EWC penalty (lambda/2) sum F (theta - theta*)^2 equals
    `target` nats when every parameter has random-walked by Adam's step size lr for the whole run, i.e.
    (theta - theta*)^2 = lr^2 * steps. (A drift that keeps one sign, (lr * steps)^2, would pay `steps` times
    more; the bench's probe measured 13.7 nats of penalty after a single step with lambda = 1 / (sqrt(mean F)
    * lr), so a per-parameter gradient-balance rule locks the model.)"""
    return 2 * target / (sum(float(f.sum()) for f in fisher.values()) * lr**2 * steps)


def run_variant(name: str, v: dict, base, tok, data: dict, evals, ewc: EWC | None, args, seed: int, work: Path) -> dict:
    cfg = make_config(name, v, args, seed, work, data.get("replay_path"))
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = Trainer(cfg, copy.deepcopy(base), data["replay" if v["replay"] else "plain"], tok)
    if v["ewc"]:  # anchored at the base (growlm anchors EWC at growth events; full fine-tuning has none)
        trainer.ewc = ewc
    res = trainer.fit()
    train_s = time.perf_counter() - t0
    te = time.perf_counter()
    loss = measure(res.model, evals, args.eval_batch)
    eval_s = time.perf_counter() - te
    cpu_s = time.process_time() - c0
    recs = [json.loads(ln) for ln in (Path(cfg.run.out_dir) / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(cfg.run.out_dir, ignore_errors=True)  # a checkpoint of up to 2 GB per run
    steps = [r for r in recs if r.get("kind") == "train" and r.get("step", 0) > 0]
    tok_step = args.micro_batch * args.seq_len
    grown_at = {e["step"] for e in res.events}
    # a step's log interval also holds a growth event taken at the end of the step before: leave those out
    all_s = [tok_step / r["tok_s"] for r in steps]
    step_s = [t for r, t in zip(steps[1:], all_s[1:]) if r["step"] - 1 not in grown_at] or all_s[1:] or all_s
    flops = steps[-1]["flops"]  # the KD teacher's forward passes included (growlm.train.flops)
    extra = 0.0
    if v["ewc"]:  # one forward and backward per Fisher sequence (computed once, counted in every run)
        extra += fisher_flops(base, args.ewc_samples, args.seq_len)
    row = {"variant": name, "seed": seed, **{f"loss_{k}": l for k, l in loss.items()},
           **{f"ppl_{k}": math.exp(l) for k, l in loss.items()},
           "flops_trainer": flops, "flops": flops + extra, "wall_s": train_s + eval_s, "train_s": train_s,
           "eval_s": eval_s, "cpu_s": cpu_s, "grad_norm": [r.get("grad_norm") for r in steps],
           "loss": [r.get("loss") for r in steps], "ewc_penalty": [r["ewc"] for r in steps if "ewc" in r] or None,
           "median_step_s": statistics.median(step_s) if step_s else None,
           "step_s": all_s, "params": res.model.num_params(),
           "trainable_params": steps[-1]["trainable_params"], "n_layer": res.model.config.n_layer,
           "growth_max_abs_val_delta": max((abs(e["val_loss_delta"]) for e in res.events), default=None)}
    print(f"  {name:<26} seed {seed}: shakespeare {row['ppl_shakespeare']:7.2f}  wikitext {row['ppl_wikitext']:7.2f}  "
          f"pydoc {row['ppl_pydoc']:7.2f}  step {row['median_step_s'] or 0:5.2f} s  ({row['wall_s']:.0f} s)", flush=True)
    return row


def _spread(vals: list[float]) -> dict:
    return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def _ratio(gain: float, full_gain: float) -> float:
    return gain / full_gain if full_gain > 0 else float("nan")  # full fine-tuning did not improve: no reference


def summarise(rows: list[dict], base_ppl: dict[str, float], retention_max_pct: float, min_fraction: float) -> dict:
    """Per variant: the measures with their spread over seeds, the fraction of a_full's Shakespeare perplexity
    drop (paired per seed), the retention change in percent vs the base, and the must-show flag."""
    full = {r["seed"]: r for r in rows if r["variant"] == "a_full"}
    out = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        s = {k: _spread([r[k] for r in rs]) for k in
             ("ppl_shakespeare", "ppl_wikitext", "ppl_pydoc", "flops", "wall_s", "train_s")}
        if full:
            b = base_ppl["shakespeare"]
            s["fraction_of_full"] = _spread([_ratio(b - r["ppl_shakespeare"], b - full[r["seed"]]["ppl_shakespeare"])
                                             for r in rs if r["seed"] in full])
            bl = math.log(b)
            s["fraction_of_full_loss"] = _spread([_ratio(bl - r["loss_shakespeare"], bl - full[r["seed"]]["loss_shakespeare"])
                                                  for r in rs if r["seed"] in full])
        for k in ("wikitext", "pydoc"):
            s[f"retention_{k}_pct"] = _spread([100 * (r[f"ppl_{k}"] / base_ppl[k] - 1) for r in rs])
        keeps = all(s[f"retention_{k}_pct"]["mean"] <= retention_max_pct for k in ("wikitext", "pydoc"))
        gains = "fraction_of_full" in s and s["fraction_of_full"]["mean"] >= min_fraction
        s["keeps_retention"], s["gains_enough"], s["meets_must_show"] = keeps, gains, keeps and gains
        out[name] = s
    return out


def tradeoff_figure(summary: dict, retention_max_pct: float, min_fraction: float):
    """Gain (share of full fine-tuning's Shakespeare drop) against the worse of the two retention changes, one
    point per variant with its min-max over seeds; the issue's target is the shaded corner."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 5.5))
    ax = fig.add_subplot()
    ax.axhline(retention_max_pct, color="#2ca02c", lw=1, ls="--", label=f"retention +{retention_max_pct:g}%")
    ax.axvline(min_fraction, color="#2ca02c", lw=1, ls=":", label=f"{min_fraction:.0%} of full fine-tuning's gain")
    for name, v in summary.items():
        if "fraction_of_full" not in v:
            continue
        fr = v["fraction_of_full"]
        worse = max(("wikitext", "pydoc"), key=lambda k: v[f"retention_{k}_pct"]["mean"])
        rt = v[f"retention_{worse}_pct"]
        ax.errorbar(fr["mean"], rt["mean"], xerr=[[fr["mean"] - fr["min"]], [fr["max"] - fr["mean"]]],
                    yerr=[[rt["mean"] - rt["min"]], [rt["max"] - rt["mean"]]], fmt="o", ms=4, capsize=2,
                    color="#d62728" if v["meets_must_show"] else "#1f77b4")
        ax.annotate(name.split("_")[0], (fr["mean"], rt["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=9)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    ax.fill_between([min_fraction, x1], y0, retention_max_pct, color="#2ca02c", alpha=0.08, lw=0)
    ax.set_xlim(x0, x1), ax.set_ylim(y0, y1)
    ax.set_xlabel("Shakespeare gain: share of full fine-tuning's perplexity drop")
    ax.set_ylabel("retention: worse of WikiText-2 / Python docs, % vs base")
    ax.set_title("Learning Shakespeare without forgetting (SmolLM2-135M, mean and min-max over seeds)")
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def estimate_full_s(rows: list[dict], args, eval_flops: float, d: argparse.Namespace, rate: float) -> float:
    """Wall time of the default run on cores of `rate` FLOP/s: each variant's executed FLOPs per trained token
    (from these rows) times the default token budget, the Fisher and the evaluations, plus 8 s per run of
    work that is not counted in FLOPs (model copy, optimizer builds, the end-of-run checkpoint)."""
    total, runs = 0.0, 0
    for name in dict.fromkeys(r["variant"] for r in rows):
        r = next(x for x in rows if x["variant"] == name)
        trained, extra = args.steps * args.micro_batch * args.seq_len, r["flops"] - r["flops_trainer"]
        if VARIANTS[name]["ewc"]:  # the extra is the Fisher, once per run
            per_token, fisher = r["flops_trainer"] / trained, extra * d.ewc_samples * d.seq_len / (args.ewc_samples * args.seq_len)
        else:  # the extra (KD's teacher) runs every step
            per_token, fisher = r["flops"] / trained, 0.0
        total += len(d.seeds) * (per_token * d.steps * d.micro_batch * d.seq_len + fisher)
        runs += len(d.seeds)
    evals = eval_flops * (d.eval_blocks * (d.seq_len + 1)) / max(1, args.eval_blocks * (args.seq_len + 1))
    return (total + (runs + 1) * evals) / rate + 8 * runs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help=f"optimizer steps per run (main job: {MAIN_JOB_STEPS})")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per step (main job: 8)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--growth-every", type=int, default=0, help="steps between growth events (0 = steps // 3: three events)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="data-order seeds (the split is fixed)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--eval-blocks", type=int, default=16, help="blocks of seq_len in each of the three measures")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--replay-fraction", type=float, default=0.25, help="share of training blocks that are replay")
    p.add_argument("--replay-chars", type=int, default=200_000, help="size of the replay buffer (whole articles)")
    p.add_argument("--ewc-lambda", type=float, default=None, help="EWC strength (default: auto_lambda from the Fisher)")
    p.add_argument("--ewc-target", type=float, default=0.5, help="auto_lambda: nats of penalty after a random-walk drift")
    p.add_argument("--ewc-samples", type=int, default=16, help="general-text sequences for the EWC Fisher")
    p.add_argument("--retention-max-pct", type=float, default=3.0)
    p.add_argument("--min-fraction", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--rate", type=float, default=1.2e11, help="FLOP/s of 2 quiet cores for the time estimate "
                   "(the main job's quiet run: 3.9e13 training + ~1.7e13 evaluation FLOPs in 436 s)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="only summarise the rows of these runs' outputs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "forgetting.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "forgetting" / "tradeoff.png"),
                   help="gain vs retention scatter of the variants ('' = none)")
    return p


def main() -> None:
    p = parser()
    args, defaults = p.parse_args(), p.parse_args([])
    if args.quick:
        args.steps, args.micro_batch, args.seq_len, args.seeds, args.eval_blocks, args.ewc_samples = 2, 2, 64, [0], 2, 2
        args.replay_chars, args.threads = 20_000, args.threads or 1  # one thread: a shared machine's cores stay usable
    if args.merge:
        return merge(args.merge, args, defaults)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    base, tok = load_model("smollm2-135m", dtype=torch.float32)
    work = Path(tempfile.mkdtemp(prefix="growlm-forgetting-bench-"))
    shakespeare = prepare_data(DataConfig(path=None, seq_len=args.seq_len, val_fraction=0.05, seed=1234), tok)
    n_val = shakespeare.n_blocks("val", args.seq_len)
    spread = np.linspace(0, n_val - 1, min(n_val, args.eval_blocks)).round().astype(int)  # across the held-out plays
    evals = {"shakespeare": torch.stack([shakespeare.block("val", int(i), args.seq_len) for i in spread]),
             "pydoc": text_blocks(retention_text(), tok, args.seq_len, args.eval_blocks)}
    notes = []
    if WIKITEXT.is_file():
        head = WIKITEXT.read_text(encoding="utf-8")[: args.eval_blocks * args.seq_len * 8]
        evals["wikitext"] = text_blocks(head, tok, args.seq_len, args.eval_blocks)
    else:
        notes.append(f"{WIKITEXT} is absent: no WikiText-2 retention measure")
    data = {"plain": shakespeare}
    if ENWIKI.is_file():
        arts = enwiki_articles(args.replay_chars)
        replay_path = work / "replay.jsonl"  # read by data.replay as any jsonl corpus
        replay_path.write_text("".join(json.dumps({"text": a.text}) + "\n" for a in arts))
        data["replay"] = prepare_data(DataConfig(path=None, seq_len=args.seq_len, val_fraction=0.05, seed=1234,
                                                 replay=str(replay_path), replay_fraction=args.replay_fraction), tok)
        data["replay_path"] = str(replay_path)
        ewc_blocks = text_blocks("\n\n".join(a.text for a in arts), tok, args.seq_len, args.ewc_samples)
        args.ewc_samples = ewc_blocks.shape[0]
        notes.append(f"replay buffer and EWC Fisher: the first {len(arts)} enwiki2015 train articles "
                     f"({sum(len(a.text) for a in arts):,} characters), repeated to {args.replay_fraction:.0%} of the "
                     f"training stream ({data['replay'].n_replay:,} of {len(data['replay'].train):,} tokens)")
    else:
        names = [n for n in names if not VARIANTS[n]["replay"]]
        ewc_blocks = torch.stack([shakespeare.block("train", i, args.seq_len) for i in range(args.ewc_samples)])
        notes.append(f"{ENWIKI} is absent: no replay variant; EWC Fisher on Shakespeare training blocks")
    if "wikitext" not in evals:
        evals["wikitext"] = evals["pydoc"]  # keeps the table's shape; said in notes
    ewc, fisher_s = None, 0.0
    if any(VARIANTS[n]["ewc"] for n in names):  # the base's Fisher: the same for every seed, computed once
        tf = time.perf_counter()
        ewc = build_ewc(base, ewc_blocks[:, :-1], ewc_blocks[:, 1:], 1.0, fisher="empirical", chunk=2)
        fisher_s = time.perf_counter() - tf
        if args.ewc_lambda is None:
            args.ewc_lambda = auto_lambda(ewc.fisher, 3e-4, args.steps, args.ewc_target)
        ewc.lam = args.ewc_lambda
        notes.append(f"EWC: Fisher of {ewc_blocks.shape[0]} general-text sequences in {fisher_s:.0f} s, lambda {ewc.lam:.3g}")
    base_loss = measure(base, evals, args.eval_batch)
    eval_flops = sum(b.shape[0] for b in evals.values()) * args.seq_len * flops_per_token(base.config, args.seq_len, training=False)
    base_ppl = {k: math.exp(v) for k, v in base_loss.items()}
    print(f"SmolLM2-135M ({base.num_params():,} params); {shakespeare.n_blocks('train', args.seq_len):,} Shakespeare "
          f"training blocks; {args.steps} steps of {args.micro_batch} x {args.seq_len} tokens; seeds {args.seeds}", flush=True)
    for n in notes:
        print(f"  {n}", flush=True)
    print("base: " + "  ".join(f"{k} ppl {v:.2f}" for k, v in base_ppl.items()), flush=True)
    rows = []
    for seed in args.seeds:
        for name in names:
            rows.append(run_variant(name, VARIANTS[name], base, tok, data, evals, ewc, args, seed, work))
            if not args.quick:  # a part file after every run: a run killed later keeps what it measured
                part = {"partial": True, "base_ppl": base_ppl, "rows": rows, "notes": notes, "eval_flops": eval_flops,
                        "fisher_s": fisher_s, "wall_s": time.perf_counter() - t_start, "settings": vars(args)}
                Path(args.out).write_text(json.dumps(part, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    finish(rows, base_ppl, notes, eval_flops, fisher_s, time.perf_counter() - t_start, args, defaults)


def merge(paths: list[str], args, defaults) -> None:
    """One table from the rows of several runs of this script (e.g. one process per seed: `--seeds 0 --out A`,
    `--seeds 1 --out B`, then `--merge A B`): the base perplexities must agree, rows of the same (variant, seed)
    must not repeat."""
    parts = [json.loads(Path(x).read_text()) for x in paths]
    base_ppl = parts[0]["base_ppl"]
    if any(p["base_ppl"] != base_ppl for p in parts):
        sys.exit("forgetting --merge: the parts measured different base perplexities (other settings or data)")
    rows = [r for p in parts for r in p["rows"]]
    keys = [(r["variant"], r["seed"]) for r in rows]
    if len(set(keys)) != len(keys):
        sys.exit("forgetting --merge: a (variant, seed) appears in two parts")
    for k in ("steps", "micro_batch", "seq_len", "eval_blocks", "replay_fraction", "ewc_lambda", "ewc_samples"):
        setattr(args, k, parts[0]["settings"][k])
    args.seeds = sorted({r["seed"] for r in rows})
    notes = parts[0]["notes"] + [f"merged from {len(parts)} runs: " + ", ".join(paths)]
    finish(rows, base_ppl, notes, parts[0]["eval_flops"], max(p["fisher_s"] for p in parts),
           sum(p["wall_s"] for p in parts), args, defaults)


def finish(rows: list[dict], base_ppl: dict, notes: list[str], eval_flops: float, fisher_s: float, wall_s: float,
           args, defaults) -> None:
    summary = summarise(rows, base_ppl, args.retention_max_pct, args.min_fraction)
    scaled = args.steps != MAIN_JOB_STEPS or args.micro_batch != 8
    out = {
        "base_ppl": base_ppl, "variants": summary, "rows": rows,
        "meets_must_show": sorted(n for n, s in summary.items() if s["meets_must_show"]),
        "scaled_down": (f"{args.steps} steps of {args.micro_batch} x {args.seq_len} tokens instead of the main job's "
                        f"{MAIN_JOB_STEPS} x 8 x 128, uniformly for every variant (growth every {args.growth_every or max(1, args.steps // 3)} "
                        f"steps from 0, warmup {warmup(args.steps)}), to fit ~30 minutes "
                        "on 2 cores") if scaled else None,
        "notes": notes + ["d_top_kd: KD from the base model for the whole run (reg.kd_teacher=base)",
                          "f_full_ewc: EWC anchored at the base by the bench (growlm anchors at growth events only)",
                          "flops = the Trainer's executed FLOPs (KD teacher's forward passes included) + the bench's EWC Fisher",
                          "wall_s = Trainer set-up, steps, the end-of-run checkpoint it always writes (weights, AdamW "
                          "state, KD snapshot, EWC Fisher and anchor) and the three measures; the Fisher (fisher_s) "
                          "is computed once for all seeds"],
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "loadavg": os.getloadavg(), "torch": torch.__version__},
        "fisher_s": fisher_s, "wall_s": wall_s, "eval_flops": eval_flops,
    }
    print(f"\n{'variant':<26} {'shakespeare ppl':>22} {'of full':>8} {'wikitext %':>16} {'pydoc %':>16} "
          f"{'FLOPs':>8} {'wall s':>7}  must-show")
    print(f"{'base':<26} {base_ppl['shakespeare']:22.2f} {'':>8} {base_ppl['wikitext']:16.2f} {base_ppl['pydoc']:16.2f}")
    for name, s in summary.items():
        sp, fr = s["ppl_shakespeare"], s.get("fraction_of_full")
        wt, pd = s["retention_wikitext_pct"], s["retention_pydoc_pct"]
        print(f"{name:<26} {sp['mean']:8.2f} [{sp['min']:5.2f},{sp['max']:5.2f}] "
              f"{(fr['mean'] if fr else float('nan')):8.2f} {wt['mean']:+6.1f} [{wt['min']:+.1f},{wt['max']:+.1f}] "
              f"{pd['mean']:+6.1f} [{pd['min']:+.1f},{pd['max']:+.1f}] {s['flops']['mean']:8.2e} "
              f"{s['wall_s']['mean']:7.0f}  {'yes' if s['meets_must_show'] else 'no'}")
    if out["scaled_down"]:
        print(f"scaled down: {out['scaled_down']}")
    est = estimate_full_s(rows, args, eval_flops, defaults, args.rate)
    cpu_rate = sum(r["flops"] + eval_flops for r in rows) / sum(r["cpu_s"] for r in rows)
    out["estimated_default_wall_s"], out["flops_per_cpu_second"] = est, cpu_rate
    print(f"{out['wall_s']:.0f} s in all; this run executed {cpu_rate / 1e9:.0f} GFLOP per CPU second "
          f"({torch.get_num_threads()} threads, load average now {os.getloadavg()[0]:.1f}); the default run "
          f"({defaults.steps} x {defaults.micro_batch} x {defaults.seq_len}, seeds {defaults.seeds}) executes what "
          f"takes ~{est / 60:.0f} min at {args.rate / 1e9:.0f} GFLOP/s")
    if not args.quick:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")
        if args.plot:
            from growlm.report.plots import save
            print(f"wrote {save(tradeoff_figure(summary, args.retention_max_pct, args.min_fraction), Path(args.plot))}")


if __name__ == "__main__":
    main()
