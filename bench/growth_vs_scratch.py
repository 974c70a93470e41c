"""Growth vs training from scratch at equal data: executed FLOPs to reach the scratch run's final loss.

One final architecture (a small Llama: RMSNorm, SwiGLU, RoPE, grouped KV heads, untied head) is trained
from scratch, and grown into by several schedules; every run has the same token budget (steps x batch),
the same data order and validation set for a given seed, and growth runs reach the final size at their
last event. Operators (growlm.growth):

  scratch           the final architecture from step 0
  depth_top         L/2 layers, + L/2 identity blocks on top (copy init, o/down zeroed; LLaMA-Pro style)
  depth_interleave  L/2 layers, + L/2 identity blocks, one after every old layer
  stack             L/2 layers, + copies of all L/2 on top (G_stack, Du et al. 2024; not function-preserving)
  width             hidden, heads, KV heads and FFN halved, then x2 (HyperCloning-style clones + cancelling noise)
  depth_width       L/2 layers at half width: depth at event/2, width at the event
  progressive       L/4 layers, + L/4 identity blocks (interleaved) three times, at event/3, 2 event/3, event
                    (several small early expansions, in the style of Deep Progressive Training, Bu 2025)
  progressive_warm  progressive with growth.new_warmup_steps: the new blocks' update warms up linearly after
                    each event (old blocks keep the scheduled rate)
  progressive_rewarm  progressive with growth.lr_rewarm_steps: the learning rate of every parameter re-warms
                    linearly after each event (on top of the cosine schedule), as after a fresh start
  one_layer         1 layer, + L-1 identity blocks on top at the event (Bu 2025's one-layer expansion)

Per grown run against the scratch run of the same seed (curves = the periodic validation losses against
the trainer's executed FLOPs, `growlm.train.flops`, which counts the smaller model's steps before growth):
- `speedup` = FLOPs for the scratch run to reach its final validation loss / FLOPs for the grown run to
  reach it (linear interpolation between evaluations); None when the grown run does not reach it within the
  budget. `speedup - 1` is how G_stack states its gain.
- `speedup_common`: the same ratio at the lowest loss both runs reach (= `speedup` when the grown run
  reaches the scratch final loss; otherwise at the grown run's final loss, where the scratch curve is read
  before its learning rate has decayed, which favours the grown run a little: a cosine run's loss
  mid-way is above what a shorter cosine run would reach).
- loss at equal FLOPs: the grown run's final loss minus the scratch curve at the grown run's total FLOPs.
- the validation-loss change at every growth event; for function-preserving events it must be
  <= 1e-6 in absolute value (`fp_ok`; the table flags violations).

Growth timing is measured, not taken from a formula: with `--event-frac auto` (the default) the first seed
first runs `--sweep-schedule` with its event at each of `--sweep-fracs` of the steps, and the fraction with
the highest `speedup_common` is used by every schedule and seed (multi-event schedules place their events
at fractions of it). `--sweep` runs only that sweep (one seed) and writes growth_vs_scratch_sweep.json.

Data: whole articles of the enwiki2015 train slice (../shared/data/corpus), a byte-level BPE of
`--vocab` ids trained with growlm.models.tokenizer.train_bpe on the articles just before them (not on
the training or validation text); the embedded Shakespeare plays when the corpus is absent (said in the
output; the BPE then sees the validation plays too).

Run: python bench/growth_vs_scratch.py            (~25 min (20-30), 1 thread, on a machine without other heavy jobs:
                                                   bench/results/growth_vs_scratch.json; comparison page and plot
                                                   of the seed-0 runs in docs/growth-vs-scratch/)
     python bench/growth_vs_scratch.py --quick    (~30 s: tiny model, 24 steps, 1 seed; checks the script, not the claim)
     python bench/growth_vs_scratch.py --sweep    (the event-timing sweep alone)
     growlm report RUN_A RUN_B --out DIR          (with --keep DIR: overlay any runs on a shared FLOPs axis)
"""

from __future__ import annotations

import argparse
import bz2
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
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from growlm.growth import GrowthSpec  # noqa: E402
from growlm.models.assets import shakespeare_files  # noqa: E402
from growlm.models.tokenizer import train_bpe  # noqa: E402
from growlm.report import load_run, write_comparison  # noqa: E402
from growlm.train import train  # noqa: E402
from growlm.train.build import build_model  # noqa: E402
from growlm.train.config import GrowthConfig, ModelSource, OptimConfig, RunConfig, TrainConfig  # noqa: E402
from growlm.train.data import DataConfig, prepare_data  # noqa: E402

CORPUS = ROOT.parent / "shared" / "data" / "corpus" / "enwiki2015" / "enwiki2015.train.txt.bz2"
SCHEDULES = ("scratch", "depth_top", "depth_interleave", "stack", "width", "depth_width", "progressive",
             "progressive_warm", "progressive_rewarm", "one_layer")
FP_TOL = 1e-6  # |validation-loss change| allowed at a function-preserving growth event


# -- data ---------------------------------------------------------------------------------------------
def read_articles(tok_chars: int, data_chars: int, max_chars: int) -> tuple[list[str], list[str]]:
    """Articles of the enwiki2015 train slice (title line, one paragraph per line, a blank line between),
    each cut after the paragraph that passes max_chars: about tok_chars of them for the tokenizer, then
    about data_chars for training and validation. The cut keeps one article per document (the split is by
    document, so no article is half in validation) while giving the validation blocks many articles."""
    tok, data, cur, total = [], [], [], 0
    with bz2.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                if sum(map(len, cur)) < max_chars:
                    cur.append(line.rstrip("\n"))
                continue
            if cur:
                art = "\n".join(cur)
                (tok if total < tok_chars else data).append(art)
                total += len(art)
                cur = []
            if total >= tok_chars + data_chars:
                break
    return tok, data


def prepare_corpus(work: Path, args: argparse.Namespace) -> tuple[str | None, Any, str]:
    """(data path or None for Shakespeare, the BPE tokenizer, a one-line note on the corpus)."""
    if CORPUS.is_file():
        tok_arts, arts = read_articles(args.tok_chars, args.chars, args.article_chars)
        path = work / "articles.jsonl"
        with path.open("w") as f:
            for a in arts:
                f.write(json.dumps({"text": a}) + "\n")
        tok = train_bpe(tok_arts, args.vocab, args.tok_dir)
        note = (f"enwiki2015 train slice: {len(arts)} articles (each cut after {args.article_chars:,} characters), "
                f"{sum(map(len, arts)):,} characters; BPE {args.vocab} "
                f"trained on the {len(tok_arts)} articles before them")
        return str(path), tok, note
    tok = train_bpe(shakespeare_files(), args.vocab, args.tok_dir)
    return None, tok, (f"{CORPUS} is absent: the embedded Shakespeare plays are used instead (BPE {args.vocab} trained "
                       "on all plays, validation ones included)")


# -- schedules ----------------------------------------------------------------------------------------
def final_shape(args: argparse.Namespace) -> dict[str, int]:
    """The final architecture's ModelConfig overrides (head_dim explicit: the tiny-llama preset fixes its own)."""
    if args.n_embd % (2 * args.n_head) or args.n_head % (2 * args.n_kv_head) or args.ffn % 2:
        raise SystemExit("--n-embd must be a multiple of 2 x --n-head, --n-head of 2 x --n-kv-head, --ffn even "
                         "(the width schedules start at half of each)")
    return dict(n_layer=args.layers, n_embd=args.n_embd, n_head=args.n_head, n_kv_head=args.n_kv_head,
                head_dim=args.n_embd // args.n_head, ffn_size=args.ffn)


def half_width(shape: dict[str, int]) -> dict[str, int]:
    """Hidden size, heads, KV heads and FFN halved at the same head_dim (width factor 2 restores them)."""
    return dict(shape, **{k: shape[k] // 2 for k in ("n_embd", "n_head", "n_kv_head", "ffn_size")})


def event_steps(event: int, k: int) -> list[int]:
    """k increasing event steps ending at `event`, evenly spaced (at least one step apart, never step 0)."""
    out: list[int] = []
    for i in range(1, k + 1):
        out.append(max(round(event * i / k), out[-1] + 1 if out else 1))
    return out


def schedule(name: str, args: argparse.Namespace, event: int, warm: int) -> tuple[dict[str, int], GrowthConfig]:
    """The starting shape and the growth config of a schedule that ends in `final_shape(args)` at `event`."""
    final, L = final_shape(args), args.layers
    half = dict(final, n_layer=L // 2)
    if name == "scratch":
        return final, GrowthConfig()
    if name in ("depth_top", "depth_interleave", "stack"):
        op = "stack" if name == "stack" else "depth"
        where = "interleave" if name == "depth_interleave" else "top"
        return half, GrowthConfig(trigger="steps", steps=[event], max_events=1,
                                  operators=[GrowthSpec(op, n=L - L // 2, where=where)])
    if name == "width":
        return half_width(final), GrowthConfig(trigger="steps", steps=[event], max_events=1,
                                               operators=[GrowthSpec("width", factor=2, noise=args.noise)])
    if name == "depth_width":
        return half_width(half), GrowthConfig(trigger="steps", steps=event_steps(event, 2), max_events=2, operators=[
            GrowthSpec("depth", n=L - L // 2, where="interleave"), GrowthSpec("width", factor=2, noise=args.noise)])
    if name in ("progressive", "progressive_warm", "progressive_rewarm"):
        q = L // 4
        if q < 1 or L % 4:
            raise SystemExit(f"--layers must be a multiple of 4 for the progressive schedules, got {L}")
        return dict(final, n_layer=q), GrowthConfig(
            trigger="steps", steps=event_steps(event, 3), max_events=3,
            operators=[GrowthSpec("depth", n=q, where="interleave")],
            new_warmup_steps=warm if name == "progressive_warm" else 0,
            lr_rewarm_steps=warm if name == "progressive_rewarm" else 0)
    if name == "one_layer":
        return dict(final, n_layer=1), GrowthConfig(trigger="steps", steps=[event], max_events=1,
                                                    operators=[GrowthSpec("depth", n=L - 1, where="top")])
    raise SystemExit(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")


# -- one run ------------------------------------------------------------------------------------------
def run_one(name: str, seed: int, event_frac: float, args: argparse.Namespace, tok: Any, data: Any,
            data_cfg: DataConfig, runs_dir: Path, tag: str = "") -> Path:
    """Train one schedule for one seed; returns its run directory (metrics.jsonl)."""
    event = max(1, round(event_frac * args.steps))
    warmup = max(1, round(args.warmup_frac * args.steps))
    shape, growth = schedule(name, args, event, warmup)
    src = ModelSource(name="tiny-llama", init="scratch", tokenizer=str(args.tok_dir),
                      overrides=dict(shape, vocab_size=args.vocab, block_size=args.seq_len))
    out = runs_dir / f"{name}{tag}-s{seed}"
    cfg = TrainConfig(
        model=src, data=data_cfg, growth=growth,
        optim=OptimConfig(lr=args.lr, min_lr=args.lr / 10, warmup_steps=warmup, decay="cosine", weight_decay=0.1),
        run=RunConfig(max_steps=args.steps, micro_batch=args.micro_batch, eval_every=args.eval_every,
                      log_every=args.eval_every, out_dir=str(out), seed=seed, export_hf=False, peak_flops=0,
                      overwrite=True),
    )
    model, _ = build_model(src, torch.float32, seed)  # the trainer's own scratch initialisation (seeded)
    t0 = time.perf_counter()
    train(cfg, model=model, tokenizer=tok, data=data)
    print(f"  {out.name:<28} {time.perf_counter() - t0:6.1f} s", flush=True)
    return out


# -- curves -------------------------------------------------------------------------------------------
def curve(run) -> list[tuple[float, float]]:
    """(executed FLOPs, validation loss) at every evaluation, step 0 included."""
    return [(float(r["flops"]), float(r["val_loss"])) for r in run.evaluated]


def flops_to_reach(c: list[tuple[float, float]], target: float) -> float | None:
    """FLOPs at which the curve first reaches `target` (linear between evaluations), None if it never does."""
    for i, (f, loss) in enumerate(c):
        if loss <= target:
            if i == 0:
                return f
            f0, l0 = c[i - 1]
            return f0 + (l0 - target) / (l0 - loss) * (f - f0)
    return None


def loss_at(c: list[tuple[float, float]], flops: float) -> float | None:
    """The curve's loss at `flops` (linear between evaluations), None beyond its end."""
    for (f0, l0), (f1, l1) in zip(c, c[1:]):
        if f0 <= flops <= f1:
            return l0 if f1 == f0 else l0 + (flops - f0) / (f1 - f0) * (l1 - l0)
    return None


def compare(grown_dir: Path, scratch_dir: Path) -> dict[str, Any]:
    """One grown run measured against the scratch run of its seed."""
    g, s = load_run(grown_dir), load_run(scratch_dir)
    cg, cs = curve(g), curve(s)
    target = cs[-1][1]
    fs, fg = flops_to_reach(cs, target), flops_to_reach(cg, target)
    common = max(min(loss for _, loss in cs), min(loss for _, loss in cg))
    fs_c, fg_c = flops_to_reach(cs, common), flops_to_reach(cg, common)
    at_equal = loss_at(cs, cg[-1][0])
    events = [{"step": e["step"], "operator": e["operator"], "val_loss_delta": e["val_loss_delta"],
               "function_preserving": bool(e.get("function_preserving")),
               "params_after": e["params_after"]} for e in g.growth]
    fp = [abs(e["val_loss_delta"]) for e in events if e["function_preserving"]]
    other = [e["val_loss_delta"] for e in events if not e["function_preserving"]]
    return {
        "final_val_loss": cg[-1][1], "scratch_final_val_loss": target, "flops": cg[-1][0], "scratch_flops": cs[-1][0],
        "flops_ratio": cg[-1][0] / cs[-1][0],
        "flops_to_target": fg, "scratch_flops_to_target": fs,
        "speedup": (fs / fg) if fg else None, "speedup_minus_1": (fs / fg - 1) if fg else None, "common_loss": common,
        "speedup_common": (fs_c / fg_c) if fs_c and fg_c else None,
        "loss_at_equal_flops": cg[-1][1] - at_equal if at_equal is not None else None,
        "events": events, "max_fp_event_delta": max(fp) if fp else None,
        "max_other_event_delta": max(other, key=abs) if other else None,
        "fp_ok": all(d <= FP_TOL for d in fp), "wall_s": g.wall_s, "params": (g.last or {}).get("params"),
    }


def spread(values: list[float | None]) -> dict[str, Any]:
    v = [x for x in values if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0, "of": len(values)}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v), "of": len(values)}


# -- the benchmark ------------------------------------------------------------------------------------
def sweep(args, fracs, seed, tok, data, data_cfg, runs_dir, scratch_dir) -> list[dict[str, Any]]:
    rows = []
    for f in fracs:
        d = run_one(args.sweep_schedule, seed, f, args, tok, data, data_cfg, runs_dir, tag=f"-f{f:g}")
        rows.append({"event_frac": f, "run": d.name, **compare(d, scratch_dir)})
    return rows


def pick_frac(rows: list[dict[str, Any]]) -> float:
    """The event fraction with the highest speed-up at the lowest common loss (then the plain speed-up)."""
    return max(rows, key=lambda r: (r["speedup_common"] or 0.0, r["speedup"] or 0.0))["event_frac"]


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every schedule for every seed; returns the result dict (what the JSON holds)."""
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="growlm-gvs-"))
    runs_dir = Path(args.keep) if args.keep else work / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    args.tok_dir = str(work / "tokenizer")  # recorded in every run's config (model.tokenizer)
    path, tok, note = prepare_corpus(work, args)
    print(note, flush=True)
    rows: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []
    frac = None if args.event_frac == "auto" else float(args.event_frac)
    seed0_dirs: dict[str, Path] = {}
    for i, seed in enumerate(args.seeds):
        data_cfg = DataConfig(path=path, seq_len=args.seq_len, val_fraction=args.val_fraction,
                              val_blocks=args.val_blocks, seed=1234 + seed, cache_dir=str(work / "data"))
        data = prepare_data(data_cfg, tok)
        print(f"seed {seed}: {data.n_blocks('train', args.seq_len)} training blocks of {args.seq_len} tokens, "
              f"{args.steps * args.micro_batch} used", flush=True)
        t0 = time.perf_counter()
        dirs = {"scratch": run_one("scratch", seed, 0.5, args, tok, data, data_cfg, runs_dir)}
        if i == 0:  # grown runs cost about 0.8-0.95 of a scratch run (fewer FLOPs, less efficient small matmuls)
            n_runs = 1 + 0.9 * (len(args.schedules) - 1 + (len(args.sweep_fracs) - 1 if frac is None else 0))
            n_runs = n_runs * len(args.seeds) if not args.sweep else 1 + 0.9 * len(args.sweep_fracs)
            print(f"expected total: about {(n_runs * (time.perf_counter() - t0) + t0 - t_start) / 60:.0f} min", flush=True)
        if i == 0 and (frac is None or args.sweep):
            fracs = args.sweep_fracs
            sweep_rows = sweep(args, fracs, seed, tok, data, data_cfg, runs_dir, dirs["scratch"])
            frac = pick_frac(sweep_rows)
            print(f"event at {frac:g} of the steps (step {max(1, round(frac * args.steps))}), the best of "
                  + ", ".join(f"{r['event_frac']:g}: {fmt(r['speedup_common'])}x" for r in sweep_rows), flush=True)
            if args.sweep:
                break
            dirs[args.sweep_schedule] = runs_dir / next(r["run"] for r in sweep_rows if r["event_frac"] == frac)
        for name in args.schedules:
            if name not in dirs:
                dirs[name] = run_one(name, seed, frac, args, tok, data, data_cfg, runs_dir)
        for name, d in dirs.items():
            row = {"schedule": name, "seed": seed, "run": d.name, **compare(d, dirs["scratch"])}
            rows.append(row)
        if i == 0:
            seed0_dirs = dirs
    out: dict[str, Any] = {"corpus": note, "event_frac": frac, "sweep": sweep_rows}
    if not args.sweep:
        names = [n for n in args.schedules]
        by = {n: [r for r in rows if r["schedule"] == n] for n in names}
        out["speedup"] = {n: spread([r["speedup"] for r in by[n]]) for n in names}
        out["speedup_common"] = {n: spread([r["speedup_common"] for r in by[n]]) for n in names}
        out["loss_at_equal_flops"] = {n: spread([r["loss_at_equal_flops"] for r in by[n]]) for n in names}
        out["final_val_loss"] = {n: spread([r["final_val_loss"] for r in by[n]]) for n in names}
        out["flops_ratio"] = {n: spread([r["flops_ratio"] for r in by[n]]) for n in names}
        out["wall_s"] = {n: spread([r["wall_s"] for r in by[n]]) for n in names}
        out["fp_ok"] = all(r["fp_ok"] for r in rows)
        out["runs"] = rows
        plots = Path(args.plots) if args.plots else work / "plots"
        out["plots"] = str(write_comparison([load_run(seed0_dirs[n]) for n in names if n in seed0_dirs], plots))
    out["runs_dir"] = str(runs_dir) if args.keep else None
    out["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "keep", "plots", "tok_dir")}
    out["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "loadavg": os.getloadavg(), "torch": torch.__version__}
    out["wall_s_total"] = time.perf_counter() - t_start
    shutil.rmtree(work / "data", ignore_errors=True)  # the packed-token cache
    if not args.keep:
        shutil.rmtree(runs_dir, ignore_errors=True)
    return out


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def print_table(out: dict[str, Any]) -> None:
    if out.get("sweep"):
        print(f"\nsweep of {out['settings']['sweep_schedule']} (seed {out['settings']['seeds'][0]}):")
        print(f"{'event frac':>10} {'speed-up':>9} {'common':>8} {'Δloss@FLOPs':>12} {'FLOPs ratio':>11}")
        for r in out["sweep"]:
            print(f"{r['event_frac']:>10g} {fmt(r['speedup']):>9} {fmt(r['speedup_common']):>8} "
                  f"{fmt(r['loss_at_equal_flops'], '+.4f'):>12} {r['flops_ratio']:>11.3f}")
    if "speedup" not in out:
        return
    print(f"\nmedian [min, max] over seeds; event at {out['event_frac']:g} of the steps")
    head = f"{'schedule':<17} {'speed-up':>20} {'reached':>7} {'ratio-1':>7} {'common speed-up':>20} " \
           f"{'Δloss @ equal FLOPs':>26} {'final loss':>10} {'FLOPs':>6} {'event Δloss':>16} {'wall s':>7}"
    print(head)
    for n, s in out["speedup"].items():
        c, d = out["speedup_common"][n], out["loss_at_equal_flops"][n]
        rows = [r for r in out["runs"] if r["schedule"] == n]
        fp = [r["max_fp_event_delta"] for r in rows if r["max_fp_event_delta"] is not None]
        other = [r["max_other_event_delta"] for r in rows if r["max_other_event_delta"] is not None]
        ev = (f"<={max(fp):.1e}" + ("" if all(r["fp_ok"] for r in rows) else " VIOLATED")) if fp else \
            (f"{statistics.median(other):+.3f} not FP" if other else "—")
        print(f"{n:<17} {_ms(s):>20} {s['n']}/{s['of']:<5} {fmt(s['median'] - 1 if s['median'] else None, '+.2f'):>7} "
              f"{_ms(c):>20} {_ms(d, '+.4f'):>26} {fmt(out['final_val_loss'][n]['median'], '.4f'):>10} "
              f"{fmt(out['flops_ratio'][n]['median'], '.3f'):>6} {ev:>16} "
              f"{fmt(out['wall_s'][n]['median'], '.0f'):>7}")
    print("speed-up: scratch FLOPs / grown FLOPs to reach the scratch run's final validation loss (— = not reached "
          "within the token budget); common: the same at the lowest loss both runs reach; FLOPs: grown / scratch total; "
          "event Δloss: validation-loss change at growth (function-preserving: the largest |Δ|; not FP: the median)")
    if not out["fp_ok"]:
        print(f"WARNING: a function-preserving growth event changed the validation loss by more than {FP_TOL:g}")


def _ms(s: dict[str, Any], spec: str = ".2f") -> str:
    if s["median"] is None:
        return "—"
    return f"{format(s['median'], spec)} [{format(s['min'], spec)}, {format(s['max'], spec)}]"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=128, help="optimizer steps of every run (the token budget)")
    p.add_argument("--layers", type=int, default=8, help="final depth (a multiple of 4)")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-kv-head", type=int, default=2)
    p.add_argument("--ffn", type=int, default=344)
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-frac", type=float, default=0.05, help="learning-rate warm-up (and the progressive_warm / progressive_rewarm re-warms) as a fraction of the steps")
    p.add_argument("--noise", type=float, default=0.01, help="width growth's symmetry-breaking noise")
    p.add_argument("--eval-every", type=int, default=8)
    p.add_argument("--val-blocks", type=int, default=48)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--chars", type=int, default=2_500_000, help="characters of articles to train and validate on")
    p.add_argument("--article-chars", type=int, default=6000, help="cut each article after the paragraph that passes this many characters")
    p.add_argument("--tok-chars", type=int, default=1_000_000, help="characters of earlier articles the BPE learns from")
    p.add_argument("--event-frac", default="auto", help="growth event (the last one) at this fraction of the steps, or 'auto' (sweep on the first seed)")
    p.add_argument("--sweep-fracs", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--sweep-schedule", default="depth_interleave", choices=SCHEDULES[1:])
    p.add_argument("--sweep", action="store_true", help="run only the event-timing sweep (first seed)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default); 1 is robust on a shared machine")
    p.add_argument("--keep", default=None, help="keep every run directory here (for growlm report RUN_A RUN_B --out DIR)")
    p.add_argument("--plots", default=None, help="comparison page of the seed-0 runs (default docs/growth-vs-scratch; --quick: a temp dir)")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps, one seed: checks the script, not the claim")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.layers, args.n_embd, args.n_head, args.n_kv_head, args.ffn = 24, [0], 4, 32, 4, 2, 64
        args.vocab, args.seq_len, args.micro_batch, args.eval_every, args.val_blocks = 300, 32, 4, 4, 8
        args.chars, args.tok_chars, args.article_chars = 150_000, 50_000, 3000
        args.sweep_fracs = [0.25, 0.5]
    if args.sweep and args.sweep_fracs == [0.1, 0.25, 0.5]:
        args.sweep_fracs = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7]
    try:
        ok = args.event_frac == "auto" or 0 < float(args.event_frac) < 1
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"--event-frac must be in (0, 1) or 'auto', got {args.event_frac}")
    if "scratch" not in args.schedules:
        args.schedules = ["scratch", *args.schedules]
    if args.plots is None and not args.quick:
        args.plots = str(ROOT / "docs" / "growth-vs-scratch")
    if args.out is None and not args.quick:
        name = "growth_vs_scratch_sweep.json" if args.sweep else "growth_vs_scratch.json"
        args.out = str(ROOT / "bench" / "results" / name)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = run_benchmark(args)
    print_table(out)
    print(f"{out['wall_s_total']:.0f} s in all")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")
    if "plots" in out:
        print(f"comparison of the seed-{args.seeds[0]} runs: {out['plots']}")


if __name__ == "__main__":
    main()
