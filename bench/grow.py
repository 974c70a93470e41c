"""Growth operators on the embedded SmolLM2-135M: validation-loss change at growth, logit deviation, time.

For each operator (growlm.growth) the default model is grown once in float32 and both models score the same
Shakespeare validation tokens (the default data split, 4 x 256 tokens). Exact operators should change the
loss by float32 rounding only (REFERENCE fact 7: a seed GPT-2 12->15 reports +0.00003); G_stack is listed
as the non-exact reference. Results: bench/results/grow.json.

Run: python bench/grow.py            (~3 min on 2 idle cores; ~9 min when the machine is shared)
     python bench/grow.py --quick    (depth and FFN only)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from growlm.train.data import DataConfig, read_documents, split_documents
from growlm.growth import GrowthSpec, grow
from growlm.models.hf import load_model

ROOT = Path(__file__).resolve().parents[1]
OPS = {
    "depth +2 interleave (copy)": GrowthSpec("depth", n=2, where="interleave"),
    "depth +2 top (random)": GrowthSpec("depth", n=2, where="top", init="random"),
    "ffn 1536->2048 (clone)": GrowthSpec("width", ffn_size=2048),
    "heads 9->12, kv 3 (clone)": GrowthSpec("width", n_head=12),
    "hidden 576->640 (pad)": GrowthSpec("width", n_embd=640, n_head=9),
    "width x2 (clone all)": GrowthSpec("width", factor=2),
    "stack +2 top (G_stack, not exact)": GrowthSpec("stack", n=2, where="top"),
}
QUICK = ("depth +2 interleave (copy)", "ffn 1536->2048 (clone)", "stack +2 top (G_stack, not exact)")


def val_loss(model, batch) -> float:
    with torch.no_grad():
        logits = model(batch[:, :-1])
        return float(F.cross_entropy(logits.flatten(0, 1).double(), batch[:, 1:].flatten()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "grow.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    model.eval()
    cfg = DataConfig()
    _, val = split_documents(read_documents(None), cfg.val_fraction, cfg.seed)
    ids = torch.tensor(tok(val[0].text[5_000:60_000]).input_ids[: 4 * 256 + 1])
    batch = torch.stack([ids[i * 256: i * 256 + 257] for i in range(4)])
    base = val_loss(model, batch)
    rows = []
    print(f"SmolLM2-135M, float32, {batch.numel()} Shakespeare validation tokens: loss {base:.6f}")
    print(f"{'operator':36s} {'params':>13s} {'exact':>5s} {'val loss change':>16s} {'max |dlogit|':>12s} {'time s':>7s}")
    for name, spec in OPS.items():
        if args.quick and name not in QUICK:
            continue
        t = time.perf_counter()
        res = grow(model, spec)
        dt = time.perf_counter() - t
        loss = val_loss(res.model.eval(), batch)
        r = {"operator": name, "spec": spec.to_dict(), "params_before": res.record["params_before"],
             "params_after": res.record["params_after"], "function_preserving": res.record["function_preserving"],
             "val_loss_before": base, "val_loss_after": loss, "val_loss_change": loss - base,
             "max_abs_logit_diff": res.record["max_abs_logit_diff"], "seconds": dt}
        rows.append(r)
        print(f"{name:36s} {r['params_after']:>13,} {'yes' if r['function_preserving'] else 'NO':>5s} "
              f"{r['val_loss_change']:>+16.2e} {r['max_abs_logit_diff']:>12.2e} {dt:>7.1f}", flush=True)
        del res
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "smollm2-135m", "dtype": "float32", "tokens": batch.numel(),
                               "val_loss": base, "val_ppl": math.exp(base), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
