"""Training throughput: growlm's GPT vs transformers' GPT2LMHeadModel / LlamaForCausalLM.

One training step = zero_grad, forward, cross-entropy, backward, AdamW step, on the same config, the same
weights (each side builds growlm's GPT from the same seed; the transformers side converts it with
`growlm.models.hf.to_hf`, so step-0 losses must agree), the same batch and the same optimizer (fused AdamW, the
default of transformers' Trainer for torch >= 2.8), in float32 or in bf16 autocast with float32 weights.
Three growlm sides: `growlm` (eager), `growlm+blocks` (run.compile=blocks: every transformer block through one
shared compiled graph, what run.compile=auto picks on CPU for a run long enough to repay the compile, so the
side that stands for growlm's defaults in a real run) and `growlm+compile` (run.compile=true: model and loss
compiled together). The optimizer is eager on every side.

Method (a shared 2-core CPU where timings drift by +-15% or more):
- one spawned worker process per side for the whole run; for each (config, dtype) the sides are built and
  warmed up one at a time, then the parent asks them for one timed step each, round after round, rotating
  who goes first (A B C, B C A, ...), so that load from other users hits all sides alike;
- speed-up = the median over rounds of the per-round ratio t_transformers / t_side, with a 95% bootstrap
  interval over the paired rounds;
- tokens/s = batch * seq_len / median step time; MFU = FLOPs/token (growlm.train.flops: 6 N_matmul + 12 L T d_attn,
  Kaplan et al. 2020, PaLM appendix B) * tokens/s / the matmul rate on the config's own shapes in the same dtype
  (growlm.train.precision, measured at the start and at the end of the run, the higher kept); a dtype more than
  3x slower than float32 there is skipped with a note (bf16 is probed on small shapes first, so an AVX2-only
  CPU does not spend minutes on it);
- growlm's sides use growlm's default loss path (the chunked head + cross-entropy, --loss-chunk);
- peak memory = the worker's VmHWM (Linux peak resident set) during the timed steps minus its VmRSS at the
  start of the case (after gc + malloc_trim): weights + gradients + AdamW state + activations + allocator
  slack. VmHWM is reset (/proc/self/clear_refs) at the start of the case and after warm-up, so compilation
  memory shows separately (setup_peak_mem_mb). ru_maxrss is not used: it is a high-water mark over the
  process life that even keeps the parent's RSS across fork+exec. Each worker first runs one untimed step
  of tiny models so that lazily loaded code is not counted as the first case's memory.

Run: python bench/train_throughput.py              (all configs: 4 min measured with --threads 1 on a quiet
                                                   machine, 6-10 min when it is busy or inductor's cache is cold)
     python bench/train_throughput.py --threads 1  (on a machine shared with other jobs, see bench/README.md)
     python bench/train_throughput.py --quick      (smoke run, ~25 s)
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import tempfile
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from growlm.models.config import ModelConfig
from growlm.train.config import RunConfig
from growlm.train.precision import SLOW_FACTOR, cpu_info, measure, model_shapes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "train_throughput.json"
SIDES = ("growlm", "transformers", "growlm+blocks", "growlm+compile")
COMPILED = ("growlm+blocks", "growlm+compile")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}
LOSS_CHUNK = RunConfig.loss_chunk  # growlm's default: run.loss_chunk
ADAMW = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


@dataclass
class Case:
    """A benchmark configuration: model, batch shape and default step counts."""

    name: str
    model: ModelConfig
    batch: int
    seq_len: int
    steps: int
    warmup: int


def cases(quick: bool) -> dict[str, Case]:
    small = dict(vocab_size=8192, block_size=256, n_layer=4, n_embd=256, n_head=4, n_kv_head=None, head_dim=None)

    def like(preset: str, **changes) -> ModelConfig:  # a preset's family switches with other sizes
        return ModelConfig.from_dict({**ModelConfig.from_preset(preset).to_dict(), **small, **changes})

    gpt2 = like("gpt2", ffn_size=None, bos_token_id=None, eos_token_id=None, name="gpt2-small")
    llama = like("smollm2-135m", n_kv_head=2, ffn_size=704, name="llama-small")
    smol = ModelConfig.from_preset("smollm2-135m")
    if quick:  # shapes small enough that process start-up dominates
        return {
            "gpt2-small": Case("gpt2-small", gpt2.replace(n_layer=2), 4, 64, 3, 1),
            "llama-small": Case("llama-small", llama.replace(n_layer=2), 4, 64, 3, 1),
        }
    return {
        "gpt2-small": Case("gpt2-small", gpt2, 4, 256, 6, 2),
        "llama-small": Case("llama-small", llama, 4, 256, 6, 2),
        "smollm2-135m": Case("smollm2-135m", smol, 8, 128, 5, 1),  # run.micro_batch x data.seq_len defaults
    }


# ---------------------------------------------------------------- worker (one per side)
def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Free what the previous case left, so the next case's baseline RSS is its own."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _worker(conn, side: str, threads: int) -> None:
    """One side for the whole run: per case build, warm up, then one timed step per 'step' message."""
    try:
        torch.set_num_threads(threads)
        if side == "transformers":
            importlib.import_module("transformers")  # module memory is not training memory
        if side in COMPILED:
            importlib.import_module("torch._inductor.compile_fx")
        _prime(side)
        conn.send({"imported": True})
        while (msg := conn.recv()) != "exit":
            _run_worker_case(conn, side, msg)
            _trim_heap()
    except Exception as e:  # report instead of leaving the parent waiting
        import traceback

        conn.send({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})


class _NoParent:
    """Stands in for the pipe while priming: no timed steps, results dropped."""

    def send(self, msg: Any) -> None:
        pass

    def recv(self) -> str:
        return "end"


def _prime(side: str) -> None:
    """One untimed step of each tiny family and dtype, so lazily loaded code and kernels (transformers'
    modeling modules, oneDNN) are resident before the first measured case and not counted as its memory."""
    for preset in ("tiny-gpt2", "tiny-llama"):
        for dtype in DTYPES:
            spec = dict(model=ModelConfig.from_preset(preset).to_dict(), batch=2, seq_len=8, dtype=dtype, warmup=1,
                        seed=0, device="cpu", adamw=ADAMW["fused"], compile=False, loss_chunk=LOSS_CHUNK)
            _run_worker_case(_NoParent(), side, spec)
    _trim_heap()


def _run_worker_case(conn, side: str, spec: dict[str, Any]) -> None:
    import torch.nn as nn
    import torch.nn.functional as F

    from growlm.models.model import GPT

    if side == "growlm+compile":
        torch._dynamo.reset()  # growlm+blocks keeps its graphs: a grown or repeated model of the same shapes reuses them
    device = spec["device"]
    cfg = ModelConfig.from_dict(spec["model"])
    base_rss = _proc_status_kb("VmRSS")
    _reset_peak_rss()
    t0 = time.perf_counter()

    torch.manual_seed(spec["seed"])
    model = GPT(cfg)
    if side == "transformers":
        from growlm.models.hf import to_hf

        model = to_hf(model)  # the same weights as the growlm sides (same seed), in transformers' layout
        # growlm has no dropout; GPT2Config defaults to 0.1 (attention, residual, embedding): switch it off
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        attn_impl = getattr(model.config, "_attn_implementation", None)

        def forward(x):
            return model(input_ids=x, use_cache=False).logits
    else:
        attn_impl = "sdpa"
        forward = None
    model.to(device).train()

    def loss_fn(x, y):
        if forward is None:  # growlm: its default loss path, the chunked head + cross-entropy inside forward
            return model(x, targets=y, loss_chunk=spec["loss_chunk"])
        logits = forward(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    if side == "growlm+compile" and spec.get("compile", True):
        loss_fn = torch.compile(loss_fn)
    if side == "growlm+blocks" and spec.get("compile", True):
        from growlm.train.parallel import CompiledBlocks

        def failed(message: str) -> None:
            raise RuntimeError(message)  # a benchmark must not time the eager fallback under this side's name

        model.block_call = CompiledBlocks(failed)

    g = torch.Generator().manual_seed(spec["seed"] + 1)
    data = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq_len"] + 1), generator=g).to(device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, **spec["adamw"])
    dtype = DTYPES[spec["dtype"]]
    dev_type = torch.device(device).type

    def sync():
        if dev_type == "cuda":
            torch.cuda.synchronize()

    def step() -> tuple[float, float]:
        sync()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev_type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - t, float(loss.detach())

    losses, warm_times = [], []
    for _ in range(spec["warmup"]):
        dt, loss = step()
        warm_times.append(dt)
        losses.append(loss)
    setup_peak = _proc_status_kb("VmHWM")
    if dev_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset = _reset_peak_rss()
    conn.send({
        "ready": True, "setup_s": time.perf_counter() - t0, "warmup_step_s": warm_times,
        "threads": torch.get_num_threads(), "attn_implementation": attn_impl,
        "params": sum(p.numel() for p in model.parameters()),
    })
    times = []
    while (msg := conn.recv()) == "step":
        dt, loss = step()
        times.append(dt)
        losses.append(loss)
        conn.send(dt)
    peak = _proc_status_kb("VmHWM")
    mb = lambda kb: None if kb is None or base_rss is None else (kb - base_rss) / 1024  # noqa: E731
    out = {
        "step_s": times, "losses": losses, "peak_mem_mb": mb(peak) if reset else None,
        "setup_peak_mem_mb": mb(setup_peak) if reset else None,
        "baseline_rss_mb": None if base_rss is None else base_rss / 1024,
    }
    if dev_type == "cuda":
        out["cuda_peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    conn.send(out)


# ---------------------------------------------------------------- parent
def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


class Workers:
    """One spawned process per side, kept for the whole run (imports are paid once)."""

    def __init__(self, sides: list[str], threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.procs, self.conns = {}, {}
        for side in sides:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child, side, threads), daemon=True)
            p.start()
            self.procs[side], self.conns[side] = p, parent
        for side in sides:
            self.recv(side)  # imported

    def recv(self, side: str, what: str = "") -> Any:
        msg = self.conns[side].recv()
        if isinstance(msg, dict) and "error" in msg:
            self.close(kill=True)
            raise RuntimeError(f"{what}{side}: {msg['error']}")
        return msg

    def ask(self, side: str, msg: Any, what: str = "") -> Any:
        self.conns[side].send(msg)
        return self.recv(side, what)

    def close(self, kill: bool = False) -> None:
        for side, p in self.procs.items():
            if kill:
                p.kill()
            else:
                self.conns[side].send("exit")
                p.join(timeout=30)


def run_case(workers: Workers, sides: list[str], case: Case, dtype: str, steps: int, warmup: int, device: str,
             adamw: dict, loss_chunk: int = 0) -> dict:
    """All sides of one (config, dtype), interleaved step by step; returns the raw per-side measurements."""
    what = f"{case.name}/{dtype}/"
    spec = dict(model=case.model.to_dict(), batch=case.batch, seq_len=case.seq_len, dtype=dtype, warmup=warmup,
                seed=0, device=device, adamw=adamw, loss_chunk=loss_chunk)
    # built and warmed up one side at a time, so a compile does not slow another side's warm-up
    info = {side: workers.ask(side, spec, what) for side in sides}
    for r in range(steps):
        for side in sides[r % len(sides):] + sides[: r % len(sides)]:  # rotate who goes first
            workers.ask(side, "step", what)
    return {side: {**info[side], **workers.ask(side, "end", what)} for side in sides}


def bootstrap_ci(ratios: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the median of the paired ratios, resampling rounds with replacement."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def summarise(case: Case, dtype: str, raw: dict, peak: float) -> dict:
    from growlm.train.flops import flops_per_token

    fpt = flops_per_token(case.model, case.seq_len)
    tokens = case.batch * case.seq_len
    ref = raw.get("transformers")
    rows = {}
    for side, r in raw.items():
        med = statistics.median(r["step_s"])
        row = {
            "tokens_per_s": tokens / med,
            "step_s_median": med,
            "step_s_min": min(r["step_s"]),
            "step_s_max": max(r["step_s"]),
            "step_s": r["step_s"],
            "mfu": fpt * tokens / med / peak,
            "peak_mem_mb": r["peak_mem_mb"],
            "setup_peak_mem_mb": r["setup_peak_mem_mb"],
            "setup_s": r["setup_s"],
            "warmup_step_s": r["warmup_step_s"],
            "step0_loss": r["losses"][0] if r["losses"] else None,
            "final_loss": r["losses"][-1] if r["losses"] else None,
            "params": r["params"],
            "threads": r["threads"],
            "attn_implementation": r["attn_implementation"],
        }
        if "cuda_peak_mem_mb" in r:
            row["cuda_peak_mem_mb"] = r["cuda_peak_mem_mb"]
        if ref is not None and ref["losses"] and r["losses"]:
            # same weights and batch: a different step-0 loss would mean the sides do not compute the same model
            row["step0_loss_diff_vs_transformers"] = abs(r["losses"][0] - ref["losses"][0])
        if ref is not None:
            # paired per-round ratios: both sides' step r ran back to back, under the same background load
            ratios = [a / b for a, b in zip(ref["step_s"], r["step_s"])]
            row["speedup_vs_transformers"] = statistics.median(ratios)
            row["speedup_ci95"] = list(bootstrap_ci(ratios))
            if ref.get("peak_mem_mb") and r.get("peak_mem_mb") is not None:
                row["peak_mem_vs_transformers"] = r["peak_mem_mb"] / ref["peak_mem_mb"]
        rows[side] = row
    return {
        "config": case.name, "dtype": dtype, "batch": case.batch, "seq_len": case.seq_len,
        "flops_per_token": fpt, "model": case.model.to_dict(), "sides": rows,
    }


def _speed_cell(r: dict, side: str) -> str:
    speed = r.get("speedup_vs_transformers")
    if speed is None or side == "transformers":
        return "-"
    lo, hi = r.get("speedup_ci95", (speed, speed))
    return f"{speed:.2f}x [{lo:.2f}, {hi:.2f}]"


def print_table(results: list[dict], peaks: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Training throughput (median of interleaved steps)")
    for col in ("config", "dtype", "side", "tok/s", "step ms", "x transformers", "MFU", "peak MB", "step-0 loss"):
        t.add_column(col, justify="left" if col in ("config", "dtype", "side") else "right")
    for res in results:
        for side, r in res["sides"].items():
            t.add_row(
                res["config"], res["dtype"], side, f"{r['tokens_per_s']:,.0f}", f"{1e3 * r['step_s_median']:,.0f}",
                _speed_cell(r, side), f"{100 * r['mfu']:.1f}%",
                "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:,.0f}", f"{r['step0_loss']:.5f}",
            )
    c = Console(width=max(Console().width, 120))
    c.print(t)
    c.print("matmul peak on each config's shapes (growlm.train.precision, at start and end, the higher kept): "
            + "; ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))


def markdown_table(results: list[dict]) -> str:
    """The same table in Markdown, for bench/README.md."""
    lines = ["| config | dtype | side | tok/s | step ms | x transformers [95% CI] | MFU | peak MB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for res in results:
        for side, r in res["sides"].items():
            cells = [
                res["config"], res["dtype"], side, f"{r['tokens_per_s']:,.0f}", f"{1e3 * r['step_s_median']:,.0f}",
                _speed_cell(r, side), f"{100 * r['mfu']:.1f}%",
                "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:,.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per side (default: 6, SmolLM2 5, --quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per side first (default: 2, SmolLM2 1)")
    ap.add_argument("--configs", default=None, help="comma list of gpt2-small, llama-small, smollm2-135m (default all)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = autocast, fp32 weights)")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma list of {', '.join(SIDES)}")
    ap.add_argument("--no-compile", action="store_true", help="leave out the growlm+blocks and growlm+compile rows")
    ap.add_argument("--compile-large", action="store_true",
                    help="also run growlm+compile on smollm2-135m (a cold whole-model compile takes ~3 min on 2 busy "
                         "cores; growlm+blocks runs on every config)")
    ap.add_argument("--adamw", choices=tuple(ADAMW), default="fused",
                    help="AdamW implementation on every side (fused: transformers' Trainer default for torch >= 2.8)")
    ap.add_argument("--loss-chunk", type=int, default=LOSS_CHUNK,
                    help=f"growlm sides' run.loss_chunk (default {LOSS_CHUNK}, growlm's default; 0 = full logits)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every worker and for the matmul peak (default: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu (measured) or cuda (supported, not yet measured)")
    ap.add_argument("--markdown", type=Path, default=None, metavar="JSON",
                    help="print the table of an earlier run's JSON as Markdown and exit")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2-layer models, 4 x 64 tokens, 3 steps, 1 thread, no compile (< 1 min)")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT.relative_to(ROOT)}; "
                    "--quick writes nothing unless given)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown is not None:
        print(markdown_table(json.loads(args.markdown.read_text())["results"]))
        return 0
    all_cases = cases(args.quick)
    names = args.configs.split(",") if args.configs else list(all_cases)
    dtypes = args.dtypes.split(",")
    sides = args.sides.split(",")
    if args.no_compile or args.quick:
        sides = [s for s in sides if s not in COMPILED]
    for n in names:
        if n not in all_cases:
            sys.exit(f"unknown config {n!r}; choose from {', '.join(all_cases)}")
    for d in dtypes:
        if d not in DTYPES:
            sys.exit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    for s in sides:
        if s not in SIDES:
            sys.exit(f"unknown side {s!r}; choose from {', '.join(SIDES)}")

    # --quick: tiny shapes gain nothing from threads, and on a busy machine extra threads only add stalls
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    torch.set_num_threads(threads)
    start, load0 = time.time(), _loadavg()
    fresh = Path(tempfile.mkdtemp()) / "precision.json"  # measured in this run, not read from growlm's cache

    def peak_of(case: Case) -> dict[str, dict]:
        """float32 and bf16 matmul rates on the case's own shapes; bf16 is probed first and only measured in
        full where it is within SLOW_FACTOR of float32 (an AVX2-only CPU runs bf16 at ~0.02x)."""
        shapes = model_shapes(case.model, case.batch * case.seq_len)
        return measure(shapes, tuple(dict.fromkeys(("float32", *(DTYPE_NAMES[d] for d in dtypes)))), args.device, fresh)

    adamw = ADAMW[args.adamw]
    results, skipped, peaks = [], [], {}
    workers = Workers(sides, threads)
    try:
        for n in names:
            case = all_cases[n]
            rates = peak_of(case)
            for d in dtypes:
                ratio = rates[DTYPE_NAMES[d]]["flops"] / rates["float32"]["flops"]
                peaks[f"{n}/{d}"] = rates[DTYPE_NAMES[d]]["flops"]
                if ratio < 1 / SLOW_FACTOR:
                    note = (f"{n} {d}: skipped, its matmuls run at {ratio:.2f}x float32 here "
                            f"({'probe' if rates[DTYPE_NAMES[d]].get('estimated') else 'measured'})")
                    skipped.append(note)
                    print(note, file=sys.stderr, flush=True)
                    continue
                case_sides = [s for s in sides if s != "growlm+compile" or n != "smollm2-135m" or args.compile_large]
                t, load = time.time(), _loadavg()
                raw = run_case(workers, case_sides, case, d, args.steps or case.steps, args.warmup or case.warmup,
                               args.device, adamw, args.loss_chunk)
                print(f"{n} {d}: " + ", ".join(f"{s} {statistics.median(r['step_s']) * 1e3:,.0f} ms/step"
                      for s, r in raw.items()) + f" ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
                results.append({**summarise(case, d, raw, peaks[f"{n}/{d}"]), "loadavg_1min_at_start": load and load[0],
                                "bf16_vs_fp32_matmul": ratio if d == "bf16" else None})
    finally:
        workers.close()
    # the peaks again at the end: the machine is shared, keep the better (less disturbed) measurement
    fresh.unlink(missing_ok=True)
    for res in results:
        again = peak_of(all_cases[res["config"]])[DTYPE_NAMES[res["dtype"]]]["flops"]
        key = f"{res['config']}/{res['dtype']}"
        peaks[key] = max(peaks[key], again)
        for r in res["sides"].values():
            r["mfu"] = res["flops_per_token"] * r["tokens_per_s"] / peaks[key]
    print_table(results, peaks)
    cpu = cpu_info()
    machine = (f"{cpu['cpu']} ({'/'.join(cpu['flags']) or 'no AVX2'}), {threads} threads, load average "
               f"{load0 and load0[0]:.1f} -> {_loadavg()[0]:.1f}, {time.time() - start:.0f} s")
    print(machine)
    for note in skipped:
        print(note)

    import transformers

    report = {
        "bench": "train_throughput",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
        "wall_s": time.time() - start,
        "conditions": {
            "device": args.device,
            "cpu": cpu["cpu"],
            "instruction_sets": cpu["flags"],
            "machine_line": machine,
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "loadavg_start": load0,
            "loadavg_end": _loadavg(),
            "note": "shared machine (other users' jobs running); sides interleaved per step, medians reported",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "method": {
            "step": "zero_grad + forward + cross_entropy + backward + AdamW step, same weights/batch/optimizer",
            "optimizer": {"name": "AdamW", "lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, **adamw},
            "bf16": "torch.autocast(bfloat16) with float32 weights and optimizer state",
            "compile": "growlm+compile: torch.compile (inductor) of model forward + loss; growlm+blocks: every block "
                       "through one torch.compile(call_block) (growlm.train.parallel.CompiledBlocks); backward via "
                       "AOTAutograd; optimizer eager",
            "transformers_dropout": "set to 0 (growlm has none)",
            "speedup": "median over rounds of t_transformers / t_side, sides interleaved with rotating order; "
                       "speedup_ci95: 95% bootstrap interval of that median over the paired rounds",
            "growlm_loss": f"GPT.forward(targets=..., loss_chunk={args.loss_chunk}) (growlm.models.head; 0 = full logits)",
            "skip": f"a dtype whose matmuls on the config's shapes run more than {SLOW_FACTOR:g}x slower than float32",
            "mfu": "flops_per_token (growlm.train.flops: 6*N_matmul + 12*L*T*d_attn) * tokens/s / the matmul rate on "
                   "the config's own shapes in the same dtype and threads (growlm.train.precision; best of start and end)",
            "peak_mem_mb": "VmHWM over the timed steps (reset after warm-up) minus VmRSS at the start of the case "
                           "(after gc + malloc_trim); setup_peak_mem_mb: the same over build + warm-up (+ compile)",
        },
        "matmul_peak_flops": peaks,
        "skipped": skipped,
        "results": results,
    }
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
