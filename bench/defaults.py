"""The main job's training speed with growlm's current defaults against the settings it ran with before.

The main job is configs/grow-smollm2-shakespeare.yaml: SmolLM2-135M, 8 x 128 tokens per step, two identity
blocks at step 0 with the base frozen (interleaved since 2026-12-03; on top in the results measured before
that). One `Trainer` per arm is built in one process from the same weights,
data and seed:

- before: run.autocast=none, run.loss_chunk=0 (the full (tokens, vocab) logits), run.compile=false;
- now: the recipe with those three fields left at their defaults (autocast auto, loss_chunk 1024, compile auto,
  which growlm.train.precision.choose_compile resolves for this job and machine: eager on CPU for a job this short);
- now+blocks: the same with run.compile=blocks (every block through one shared compiled graph);
  `--compile` adds a fourth arm with run.compile=true (the whole model; a cold compile adds minutes).

Every arm grows at step 0 exactly as the job does (growlm's `grow_now`), then runs `--warmup` untimed and
`--steps` timed optimizer steps, one arm after the other with the order rotating each round, so that load from
other processes falls on all alike. A step that compiled (torch.compile built a graph during it) is reported
as the arm's compile_s and is never timed; the warm-up covers it. Reported: tokens/s from the median step time, the speed-up as the median of the
per-round ratios t_before / t_now with a 95% bootstrap interval over rounds, and the largest difference of the
per-step training losses (the arms must compute the same run: to 1e-4). The machine line (CPU, instruction
sets, threads, load averages) goes into the JSON with every step time.

Run: python bench/defaults.py                       (~5-7 min on 2 quiet cores; -> bench/results/defaults.json)
     python bench/defaults.py --steps 4 --warmup 1  (a quicker look)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from growlm.train import TrainConfig, Trainer
from growlm.train.build import setup
from growlm.train.parallel import compiled_graphs
from growlm.train.precision import cpu_info

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "grow-smollm2-shakespeare.yaml"
DEFAULT_OUT = ROOT / "bench" / "results" / "defaults.json"
CHANGED = ("autocast", "loss_chunk", "compile")
BEFORE = {"autocast": "none", "loss_chunk": 0, "compile": False}


def bootstrap_ci(ratios: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the median ratio, resampling rounds with replacement."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def arm_config(recipe: dict, out: Path, name: str, run: dict, val_blocks: int) -> TrainConfig:
    d = copy.deepcopy(recipe)
    for k in CHANGED:
        d["run"].pop(k, None)  # the defaults, unless `run` sets them
    d["run"].update(run, out_dir=str(out / name), export_hf=False, save_every=0, retention_blocks=0, overwrite=True)
    d["data"]["val_blocks"] = val_blocks  # the validation set is evaluated at growth: keep it short
    return TrainConfig.from_dict(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per arm (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first (default 2)")
    ap.add_argument("--compile", action="store_true", help="a third arm: the defaults with run.compile=true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--val-blocks", type=int, default=4, help="validation blocks evaluated at the growth event")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = yaml.safe_load(RECIPE.read_text())
    start, load0 = time.time(), os.getloadavg()
    arms = {"before": BEFORE, "now": {}, "now+blocks": {"compile": "blocks"}}
    if args.compile:
        arms["now+compile"] = {"compile": True}
    infos: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        cfgs = {n: arm_config(recipe, Path(tmp), n, run, args.val_blocks) for n, run in arms.items()}
        built = setup(cfgs["before"])
        model, tok, data = built.model, built.tokenizer, built.data
        trainers = {}
        for n, cfg in cfgs.items():
            t = Trainer(cfg, copy.deepcopy(model), data, tok,
                        callback=lambda kind, rec, n=n: infos.append(f"{n}: {rec['message']}") if kind == "info" else None)
            t.grow_now(val_before=float("nan"))  # the job's step-0 growth (start: 0); its evaluation is not timed
            trainers[n] = t
        del model
        print(f"set-up {time.time() - start:.0f} s; arms: " + ", ".join(f"{n} (autocast {t.autocast}, loss_chunk "
              f"{t.cfg.run.loss_chunk}, compile {t._compile})" for n, t in trainers.items()), file=sys.stderr, flush=True)
        names = list(trainers)
        times: dict[str, list[float]] = {n: [] for n in names}
        losses: dict[str, list[float]] = {n: [] for n in names}
        compile_s: dict[str, float] = {}
        last: dict[str, float] = {}
        for r in range(args.warmup + args.steps):
            for n in names[r % len(names):] + names[: r % len(names)]:
                t = trainers[n]
                graphs, t0 = compiled_graphs(), time.perf_counter()
                rec = t.train_step()
                dt = time.perf_counter() - t0
                t.state.step += 1
                losses[n].append(rec["loss"])
                if compiled_graphs() > graphs:  # a step that compiled: its time is mostly the compile's
                    compile_s[n] = compile_s.get(n, 0.0) + dt
                    if r >= args.warmup:
                        raise SystemExit(f"{n} compiled in timed round {r + 1}: raise --warmup")
                last[n] = dt
                if r >= args.warmup:
                    times[n].append(dt)
            print(f"round {r + 1}{' (warm-up)' if r < args.warmup else ''}: "
                  + ", ".join(f"{n} {last[n]:.2f} s" for n in names), file=sys.stderr, flush=True)
        tokens = cfgs["before"].run.micro_batch * cfgs["before"].data.seq_len
    rows = {}
    for n in names:
        med = statistics.median(times[n])
        rows[n] = {"tokens_per_s": tokens / med, "step_s_median": med, "step_s": times[n], "losses": losses[n],
                   "autocast_used": trainers[n].autocast, "compile": trainers[n]._compile,
                   "loss_chunk": trainers[n].cfg.run.loss_chunk, "compile_s": compile_s.get(n)}
        if n != "before":
            ratios = [a / b for a, b in zip(times["before"], times[n])]
            lo, hi = bootstrap_ci(ratios)
            rows[n].update(speedup=statistics.median(ratios), speedup_ci95=[lo, hi],
                           max_loss_diff=max(abs(a - b) for a, b in zip(losses["before"], losses[n])))
    cpu = cpu_info()
    report = {"bench": "defaults", "recipe": str(RECIPE.relative_to(ROOT)),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)), "wall_s": time.time() - start,
              "machine": {**cpu, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                          "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg()), "torch": torch.__version__},
              "tokens_per_step": tokens, "warmup": args.warmup, "steps": args.steps, "before": BEFORE,
              "notes": infos, "arms": rows}
    print(f"{cpu['cpu']} ({'/'.join(cpu['flags'])}), {torch.get_num_threads()} threads, load {load0[0]:.1f} -> "
          f"{os.getloadavg()[0]:.1f}")
    for n, r in rows.items():
        extra = "" if n == "before" else (f" | {r['speedup']:.2f}x [{r['speedup_ci95'][0]:.2f}, {r['speedup_ci95'][1]:.2f}]"
                                          f" | max loss diff {r['max_loss_diff']:.1e}")
        print(f"{n:12s} | {r['tokens_per_s']:7.1f} tok/s | step {r['step_s_median']:.2f} s{extra}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
