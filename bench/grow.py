"""Growth operators on the embedded SmolLM2-135M: validation-loss change at growth, logit deviation, time.

For each operator (growlm.growth) the default model is grown once in float32 and both models score the same
Shakespeare validation tokens (the default data split, 4 x 256 tokens). Exact operators should change the
loss by float32 rounding only; G_stack is listed as the non-exact reference. Results: bench/results/grow.json.

`--vocab` adds vocabulary growth on a tiny model: a nested BPE 300 -> 360 trained on Shakespeare, a tiny
Llama trained 120 steps on the small vocabulary, then grown; the same validation text is scored with each
model's own tokenizer (nats per byte and per token). Results: bench/results/grow_vocab.json.

Run: python bench/grow.py            (~3 min on 2 idle cores; ~9 min when the machine is shared)
     python bench/grow.py --quick    (depth and FFN only)
     python bench/grow.py --vocab    (only the vocabulary row, ~1 min)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from growlm.growth import GrowthSpec, grow, with_vocab_sources
from growlm.models.assets import shakespeare_files
from growlm.models.config import ModelConfig
from growlm.models.hf import load_model
from growlm.models.model import GPT
from growlm.models.tokenizer import nested_prefix, train_bpe
from growlm.train.data import DataConfig, read_documents, split_documents

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


def _loss(model, batch) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).double(), batch[:, 1:].flatten())


def _nll(model, tok, text: str, T: int = 64) -> tuple[float, float]:
    """(nats per byte, nats per token) of `text` in windows of T tokens."""
    x = torch.tensor(tok(text).input_ids)
    n = (len(x) - 1) // T * T
    xs = x[: n + 1]
    with torch.no_grad():
        total = sum(float(_loss(model, xs[i:i + T + 1][None])) * T for i in range(0, n, T))
    return total / len(tok.decode(xs[1:].tolist()).encode()), total / n


def vocab_growth(out: Path) -> dict:
    """Nested BPE 300 -> 360 on a tiny Llama: loss change on old-tokenised text, and bits per byte each way."""
    import tempfile

    from transformers import AutoTokenizer

    files = shakespeare_files()
    train_text = files[0].read_text()[:150_000]
    val_text = files[1].read_text()[20_000:28_000]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        train_bpe([train_text], 360, d / "big")
        nested_prefix(d / "big", 300, d / "small")
        big, small = AutoTokenizer.from_pretrained(d / "big"), AutoTokenizer.from_pretrained(d / "small")
        spec = with_vocab_sources(GrowthSpec("vocab", tokenizer=str(d / "big")), 300)
    torch.manual_seed(0)
    m = GPT(ModelConfig.from_preset("tiny-llama").replace(vocab_size=300, block_size=64))
    ids = torch.tensor(small(train_text).input_ids)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(120):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=gen)
        batch = torch.stack([ids[s:s + 65] for s in starts])
        opt.zero_grad()
        _loss(m, batch).backward()
        opt.step()
    g = grow(m, spec).model
    x = torch.tensor(small(val_text).input_ids[:65])[None]
    with torch.no_grad():
        d_loss = float(_loss(g, x) - _loss(m, x))
    (bpb_old, tok_old), (bpb_new, tok_new) = _nll(m, small, val_text), _nll(g, big, val_text)
    r = {"vocab": [300, 360], "train_steps": 120, "old_tokenised_loss_change": d_loss,
         "nats_per_byte": [bpb_old, bpb_new], "nats_per_token": [tok_old, tok_new]}
    print(f"vocab 300->360 (tiny llama, 120 steps): old-tokenised loss +{d_loss:.4f} nats/token; same text, each "
          f"own tokenizer: {bpb_old:.4f} -> {bpb_new:.4f} nats/byte ({tok_old:.4f} -> {tok_new:.4f} nats/token)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {out}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--vocab", action="store_true", help="only the vocabulary-growth row (tiny model)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "grow.json"))
    args = ap.parse_args()
    if args.vocab:
        vocab_growth(ROOT / "bench" / "results" / "grow_vocab.json")
        return
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
