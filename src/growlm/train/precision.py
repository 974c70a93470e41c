"""Which compute precision is fast on this machine, and the matmul peak MFU is measured against, both
measured on the model's own matmul shapes.

Whether bf16 pays depends on the CPU far more than on the model: measured on three 2-core machines, a bf16
matmul ran at ~4x float32 (AVX-512 with BF16 instructions), ~0.3-0.6x (AVX-512 without them) and ~0.02x
(AVX2 only). So `run.autocast: auto` measures both, once per (CPU model, instruction sets, threads, torch
version, shapes), caches the result (`$GROWLM_CACHE/precision.json`) and uses bf16 autocast only where it
is faster by a margin (`BF16_MARGIN`).

The shapes are the forward matmuls of one micro-batch of M = micro_batch x seq_len tokens:
(M, d) x (d, q+k+v), (M, d_attn) x (d_attn, d), the MLP's (M, d) x (d, ffn) and (M, ffn) x (ffn, d),
and the head (M, d) x (d, V). Their rate is total FLOPs / total best time (each shape weighted by its
FLOPs, as in a training step). Measuring on these shapes, in the run's dtype and thread count, is what
keeps MFU (`growlm.train.flops`) from reading above 100%: a 2048^3 square matmul runs faster than the
thin shapes of a small model, or slower when measured on a busy machine.

Bounded time: bf16 is first probed on the shapes cut to PROBE_ROWS x PROBE_COLS; where the probe runs
more than SLOW_FACTOR times slower than float32, the full bf16 measurement is skipped and the probe's
ratio stands for it (an AVX2-only machine would otherwise spend minutes on one bf16 head matmul). Each
full shape runs at most `MAX_SECONDS` (after one warm-up run) or `REPEATS` times, and the best time counts,
because on a shared machine other processes only ever make a run slower.

A rate measured on a busy machine is low, and cached it would stay low (MFU reading above 100% in every later
run): each entry records the load average per core it was measured under, and an entry measured busy
(above BUSY_LOAD) is measured again once the machine is at most half as loaded, keeping the faster rate.

The same reasoning, measured once and written down (COMPILE_MIN_SECONDS), decides `run.compile: auto`:
`choose_compile`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from growlm.io import atomic_write
from growlm.models.assets import cache_dir
from growlm.models.config import ModelConfig

BF16_MARGIN = 1.1
"""auto picks bf16 only where its matmuls run at more than this many times float32's rate."""
SLOW_FACTOR = 3.0
"""bf16 probed slower than float32 by more than this: its full measurement is skipped."""
PROBE_ROWS, PROBE_COLS = 32, 4096
REPEATS, MAX_SECONDS = 5, 2.0
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
"""The instruction sets that decide bf16's speed on x86 CPUs (recorded in the cache key and in benches)."""

Timer = Callable[[int, int, int, torch.dtype, str], float]
"""timer(m, k, n, dtype, device) -> best FLOP/s of an (m, k) x (k, n) matmul."""


def model_shapes(cfg: ModelConfig, tokens: int) -> list[tuple[int, int, int]]:
    """The distinct forward matmul shapes (M, K, N) of one micro-batch of `tokens` tokens."""
    d, d_attn, kv = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    shapes = [(tokens, d, d_attn + 2 * kv), (tokens, d_attn, d), (tokens, d, cfg.ffn_size), (tokens, cfg.ffn_size, d),
              (tokens, d, cfg.vocab_size)]
    return list(dict.fromkeys(shapes))


def time_matmul(m: int, k: int, n: int, dtype: torch.dtype, device: str) -> float:
    """Best FLOP/s (2 m k n per product) of an (m, k) x (k, n) matmul: one warm-up, then up to REPEATS runs
    or MAX_SECONDS, whichever comes first (at least one timed run)."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)  # written in place: a fresh (m, n) output per run would time
    # mapping and faulting in its pages too (the head's is 200 MB for SmolLM2 at 1,024 tokens), not the matmul
    best, start, i = math.inf, time.perf_counter(), 0
    while i <= REPEATS and (i < 2 or time.perf_counter() - start < MAX_SECONDS):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b, out=c)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i > 0:  # the first run warms up kernels and caches
            best = min(best, time.perf_counter() - t)
        i += 1
    return 2 * m * k * n / max(best, 1e-12)


def rate(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: str, timer: Timer | None = None) -> float:
    """FLOP/s over the shapes: total FLOPs / total best time (timer: `time_matmul` unless given)."""
    timer = timer or time_matmul
    flops = [2 * m * k * n for m, k, n in shapes]
    seconds = sum(f / timer(m, k, n, dtype, device) for f, (m, k, n) in zip(flops, shapes))
    return sum(flops) / seconds


def cpu_info() -> dict[str, object]:
    """CPU model and the FLAGS it has (from /proc/cpuinfo; empty where there is none)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name") and not model:
                    model = ln.split(":", 1)[1].strip()
                elif ln.startswith("flags") and not flags:
                    flags = set(ln.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model or "unknown", "flags": [f for f in FLAGS if f in flags]}


def machine_key(device: str) -> str:
    """What a measurement depends on besides the shapes: the processor, its instruction sets, threads, torch."""
    if device.startswith("cuda"):
        where = f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    else:
        info = cpu_info()
        where = f"cpu:{info['cpu']}:{'+'.join(info['flags'])}:{torch.get_num_threads()}threads"
    return f"v2|{where}|torch {torch.__version__}"  # v2: outputs written in place (v1 rates were low)


BUSY_LOAD = 0.5
"""1-minute load average per core above which a cached measurement is provisional (see the module docstring)."""


def cpu_load() -> float:
    """The 1-minute load average per core (0 where the platform has none)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return 0.0


def _provisional(entry: dict, device: str, now: float) -> bool:
    """An entry measured on a busy CPU (or before the load was recorded) while this one is at most half as busy."""
    if device.startswith("cuda") or not entry:
        return False
    then = entry.get("load")
    return then is None or (then > BUSY_LOAD and now <= then / 2)


def measure(shapes: list[tuple[int, int, int]], dtypes: tuple[str, ...], device: str, cache: Path | None = None,
            timer: Timer | None = None) -> dict[str, dict]:
    """{dtype name: {"flops": FLOP/s, "estimated": bool}} on `shapes`, from the cache or measured (and cached).

    dtype names: float32, bfloat16, float64. bfloat16 is probed first (see the module docstring); where it
    is skipped, "flops" is float32's full rate times the probe's ratio and "estimated" is true.
    """
    cache = cache if cache is not None else cache_dir() / "precision.json"
    key = f"{machine_key(device)}|{','.join('x'.join(map(str, s)) for s in shapes)}"
    table = _read(cache)
    entry = table.get(key, {})
    load = cpu_load()
    old = {}
    if _provisional(entry, device, load):  # measure again, keep the faster of the two
        old, entry = entry, {}
    missing = [d for d in dtypes if d not in entry]
    if "bfloat16" in missing and "float32" not in entry:
        missing.append("float32")  # the bf16 probe is judged against float32
    if not missing:
        return {d: entry[d] for d in dtypes}
    for name in sorted(set(missing), key=lambda n: n != "float32"):  # float32 first
        dt = getattr(torch, name)
        if name == "bfloat16":
            if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
                entry[name] = {"flops": 0.0, "estimated": True, "note": "no bf16 on this GPU"}
                continue
            probe = [(min(m, PROBE_ROWS), k, min(n, PROBE_COLS)) for m, k, n in shapes]
            ratio = rate(probe, dt, device, timer) / rate(probe, torch.float32, device, timer)
            if ratio < 1 / SLOW_FACTOR:
                entry[name] = {"flops": entry["float32"]["flops"] * ratio, "estimated": True,
                               "note": f"probe: {ratio:.2f}x float32, full measurement skipped"}
                continue
        entry[name] = {"flops": rate(shapes, dt, device, timer), "estimated": False}
    for name, r in old.items():
        if isinstance(r, dict) and r.get("flops", 0) > entry.get(name, {}).get("flops", math.inf):
            entry[name] = r
    entry["measured"], entry["load"] = time.strftime("%Y-%m-%dT%H:%M:%S%z"), round(load, 3)
    table = _read(cache)  # another process may have added entries meanwhile
    table[key] = entry
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, json.dumps(table, indent=1))
    return {d: entry[d] for d in dtypes}


def _read(cache: Path) -> dict:
    try:
        return json.loads(cache.read_text()) if cache.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged cache is measured again


@dataclass
class Precision:
    """The precision a run computes in, and why."""

    autocast: str
    """'none' or 'bf16': what the run uses."""
    ratio: float | None
    """bf16 / float32 matmul rate on the model's shapes (None where not measured)."""
    warning: str | None = None
    """One line for the user where an explicit bf16 is measured slower than float32."""


def choose_autocast(setting: str, cfg: ModelConfig, tokens: int, dtype: torch.dtype, device: str,
                    cache: Path | None = None, timer: Timer | None = None) -> Precision:
    """Resolve run.autocast: 'auto' -> 'bf16' where bf16 matmuls on the model's shapes run more than
    BF16_MARGIN x float32's rate, else 'none' (float64 weights never autocast: they ask for precision);
    an explicit 'bf16' is kept, with a warning where it is measured slower; 'none' measures nothing."""
    if setting == "none" or (setting == "auto" and dtype == torch.float64):
        return Precision("none", None)
    r = measure(model_shapes(cfg, tokens), ("float32", "bfloat16"), device, cache, timer)
    ratio = r["bfloat16"]["flops"] / r["float32"]["flops"]
    if setting == "auto":
        return Precision("bf16" if ratio > BF16_MARGIN else "none", ratio)
    warning = None
    if ratio < 1:
        warning = (f"run.autocast=bf16: bf16 matmuls on this model's shapes run at {ratio:.2f}x float32's rate on "
                   f"this machine ({_where(device)}); run.autocast=auto or none would be faster")
    return Precision("bf16", ratio, warning)


COMPILE_MIN_SECONDS = 2000.0
"""run.compile=auto compiles the blocks on CPU only where the run's training FLOPs at the measured matmul peak take
at least this long (the upper end of the break-even range below, so that auto never makes a run slower). Measured on SmolLM2 (2-core AVX-512 Xeon, 1 thread, CPU seconds, inductor cache cold): the
per-block compile costs 34 s (one graph: every block trains) to 46 s (three graphs: frozen base, first and
later trainable blocks) and saves 2-8% of a step, so it pays after about 600-2000 s of eager steps; the FLOP
estimate at the peak is about 0.6x of the eager time."""


def choose_compile(setting: bool | str, device: str, parallel: str | None, run_flops: float, peak: float) -> str:
    """Resolve run.compile to 'none', 'blocks' (each block through one shared compiled graph) or 'model' (the
    whole model and loss compiled together, recompiled after every growth event).

    true -> 'model', false -> 'none', 'blocks' -> 'blocks'. auto -> 'model' on CUDA; on CPU 'blocks' where the
    run's training FLOPs `run_flops` at the matmul rate `peak` (FLOP/s) need at least COMPILE_MIN_SECONDS,
    else 'none' (so are short runs and an unknown peak, <= 0). Not under FSDP on CPU (`parallel`: 'ddp' or
    'fsdp' under torchrun, None alone): compiling FSDP-wrapped blocks there is untested.
    """
    if setting == "blocks":
        return "blocks"
    if setting is True or setting is False:
        return "model" if setting else "none"
    if device.startswith("cuda"):
        return "model"
    if parallel == "fsdp" or peak <= 0:
        return "none"
    return "blocks" if run_flops / peak >= COMPILE_MIN_SECONDS else "none"


def model_peak(cfg: ModelConfig, tokens: int, dtype: torch.dtype, device: str, cache: Path | None = None,
               timer: Timer | None = None) -> tuple[float, str]:
    """(FLOP/s, source line): the matmul rate on the model's shapes in the compute dtype (bf16 under autocast)
    and the current thread count, for MFU."""
    name = str(dtype).removeprefix("torch.")
    r = measure(model_shapes(cfg, tokens), (name,), device, cache, timer)[name]
    how = "estimated from a probe" if r.get("estimated") else "measured"
    return float(r["flops"]), (f"{name} matmuls on the model's shapes ({tokens} tokens), {how}, "
                               f"{torch.get_num_threads() if not device.startswith('cuda') else 'gpu'} threads")


def _where(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    info = cpu_info()
    return f"{info['cpu']}, {'/'.join(info['flags']) or 'no AVX2'}, {torch.get_num_threads()} threads"
