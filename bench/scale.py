"""Per-rank memory of DDP vs FSDP2 with 2 processes (gloo, CPU) on SmolLM2-135M, against `growlm plan`.

Each run launches `torchrun --nproc_per_node 2` on this file (`--worker ddp|fsdp`). Every rank builds the
model (FSDP: on the meta device, sharded, then materialised, so no rank ever holds the full model) and runs
`--steps` training steps the way `growlm.train.trainer` does: zero_grad(set_to_none), the loss inside
forward (`targets`, `run.loss_chunk`), backward, gradient clipping, the (multiplied) AdamW step. Each rank
records, after every phase (build, then forward / backward / optimizer of each step), and after each
block's forward and before its backward (`trace`):

  malloc_in_use            glibc's bytes handed out and not freed (`mallinfo2`: uordblks + hblkhd), every
                           thread and every library (gloo's buffers, Python objects) included;
  arena_free               bytes glibc's arenas hold free (fordblks): freed memory not returned to the OS;
  rss, peak_rss            resident memory now and its peak so far (ru_maxrss);
  tensor_peak, tensor_end  (--trace) CPU tensor bytes allocated and not freed, from the profiler's allocator
                           accounting (`profile_memory=True`; frees on gloo's threads are missed, so it drifts up).
All are minus their values before the model was built; `runtime_mb`, the RSS before the model (Python,
torch, gloo), is a separate line (the planner's `runtime` input).

Each engine runs twice (`MALLOC`): with glibc's defaults and with a fixed mmap threshold. With the fixed
threshold every block above 128 KiB is its own mapping, unmapped when freed, so the kernel's peak RSS is
the peak of live memory at every moment (touched pages: DDP's buckets only count once written), which is
what the planner predicts (`plan.tensors`). The difference to the default run is the allocator's
retention (freed memory glibc keeps), reported separately; `non_tensor_mb` is malloc's bytes in use after
the last step minus the exact weights, gradients and moments and DDP's buckets (Python objects, autograd,
gloo, the engines' bookkeeping).
Writes bench/results/scale.json and prints tables.

    python bench/scale.py [--seq_len 256 --micro_batch 1 --steps 2 --loss_chunk 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

from growlm.models.config import ModelConfig
from growlm.models.model import GPT
from growlm.train.config import OptimConfig, RunConfig
from growlm.train.optim import build_optimizer, multiplied_step
from growlm.train.plan import plan

HERE = Path(__file__).resolve().parent
MB = 2**20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc() -> tuple[float, float]:
    """(bytes in use, bytes free inside the arenas) of glibc malloc, all threads."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    return float(m.uordblks + m.hblkhd), float(m.fordblks)


def _rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


class Probe:
    """Phase marks: RSS, peak RSS and glibc's figures at the end of each phase, tensor bytes from the profile."""

    def __init__(self) -> None:
        self.base_rss, (self.base_malloc, self.base_free) = _rss(), _malloc()
        self.rows: list[dict] = []
        self.trace: list[tuple[str, float]] = []

    def point(self, label: str) -> None:
        """RSS at a moment inside a phase (block hooks): where the peak sits."""
        self.trace.append((label, (_rss() - self.base_rss) / MB))

    def hook_blocks(self, model: GPT) -> None:
        """A point after each block's forward and before each block's backward (a hook on its output)."""
        def fwd(i):
            def hook(mod, args, out):
                self.point(f"fwd {i}")
                if out.requires_grad:
                    out.register_hook(lambda g: self.point(f"bwd {i}"))
            return hook

        for i, b in enumerate(model.blocks):
            b.register_forward_hook(fwd(i))

    @contextlib.contextmanager
    def phase(self, name: str):
        with record_function("phase:" + name):
            yield
        used, free = _malloc()
        self.rows.append({"phase": name, "rss_mb": (_rss() - self.base_rss) / MB,
                          "peak_rss_mb": (_maxrss() - self.base_rss) / MB,
                          "malloc_in_use_mb": (used - self.base_malloc) / MB, "arena_free_mb": (free - self.base_free) / MB})

    def add_tensor_bytes(self, prof) -> None:
        """Peak and final net CPU allocation of each phase, from the profiler's allocation events (the
        allocator's running total since profiling began; allocations of this thread and autograd's)."""
        allocs, spans = [], {}

        def walk(n):
            if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu":
                allocs.append((n.start_time_ns, n.extra_fields.total_allocated))
            elif n.tag == _EventType.TorchOp and n.name.startswith("phase:"):
                spans[n.name[6:]] = (n.start_time_ns, n.end_time_ns)
            for c in n.children:
                walk(c)

        for r in prof.profiler.kineto_results.experimental_event_tree():
            walk(r)
        allocs.sort()
        last = 0.0
        for row in self.rows:
            s, e = spans[row["phase"]]
            inside = [t for ts, t in allocs if s <= ts <= e]
            row["tensor_peak_mb"] = max(inside, default=last) / MB
            last = inside[-1] if inside else last
            row["tensor_end_mb"] = last / MB


def worker(kind: str, out: Path, micro_batch: int, seq_len: int, steps: int, loss_chunk: int, trace: bool) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("smollm2-135m")
    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), generator=g) for _ in range(steps)]
    probe = Probe()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if trace else contextlib.nullcontext()
    with prof:
        with probe.phase("build"):
            if kind == "fsdp":
                from growlm.train.sharded import shard

                with torch.device("meta"):
                    model = GPT(cfg)
                model = shard(model, world, "cpu", RunConfig(parallel="fsdp"))
                model.to_empty(device="cpu")
                with torch.no_grad():
                    for p in model.parameters():
                        p.to_local().normal_(0, 0.02)
                runner = model
            else:
                from torch.nn.parallel import DistributedDataParallel as DDP

                model = GPT(cfg)
                runner = DDP(model)
            opt = build_optimizer(model, OptimConfig(lr=1e-4))
            probe.hook_blocks(model)
        for s, x in enumerate(batches):
            with probe.phase(f"{s}.forward"):
                opt.zero_grad(set_to_none=True)
                loss = runner(x[:, :-1], targets=x[:, 1:], loss_chunk=loss_chunk)
            with probe.phase(f"{s}.backward"):
                loss.backward()
            with probe.phase(f"{s}.optimizer"):
                from growlm.train.sharded import clip_grad_norm_

                clip_grad_norm_([p for p in model.parameters()], 1.0)
                multiplied_step(opt, model, {})
    if trace:
        probe.add_tensor_bytes(prof)

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    grads = sum(local(p.grad).numel() * local(p.grad).element_size() for p in model.parameters() if p.grad is not None)
    adam = sum(local(v).numel() * local(v).element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)
    rec = {"rank": rank, "weights": params, "grads": grads, "adam": adam, "state_bytes": params + grads + adam,
           "runtime_mb": probe.base_rss / MB, "phases": probe.rows, "loss": float(loss.detach()), "trace": probe.trace,
           "peak_rss_mb": max(r["peak_rss_mb"] for r in probe.rows),
           "peak_tensor_mb": max(r.get("tensor_peak_mb", 0.0) for r in probe.rows),
           "peak_malloc_mb": max(r["malloc_in_use_mb"] for r in probe.rows)}
    (out / f"{kind}_{rank}.json").write_text(json.dumps(rec))
    torch.distributed.destroy_process_group()


MALLOC = {"default": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
"""glibc settings of the two runs per engine: its defaults (a dynamic mmap threshold up to 32 MiB, so freed
blocks below it stay in the arenas), and a fixed 128 KiB threshold (every larger block is its own mapping,
returned to the OS when freed: the peak RSS is then the peak of live memory)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--micro_batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--loss_chunk", type=int, default=RunConfig.loss_chunk)
    ap.add_argument("--trace", action="store_true", help="also count tensor bytes with the profiler (slower)")
    ap.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, Path(a.out), a.micro_batch, a.seq_len, a.steps, a.loss_chunk, a.trace)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    cfg = ModelConfig.from_preset("smollm2-135m")
    rows = {}
    for kind in ("ddp", "fsdp"):
        runs = {}
        for malloc, extra in MALLOC.items():
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            env.update(OMP_NUM_THREADS="1", **extra)
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [torchrun, "--standalone", "--nproc_per_node", "2", __file__, "--worker", kind, "--out", tmp,
                       "--seq_len", str(a.seq_len), "--micro_batch", str(a.micro_batch), "--steps", str(a.steps),
                       "--loss_chunk", str(a.loss_chunk), *(["--trace"] if a.trace and malloc == "mmap" else [])]
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(f"{kind} run ({malloc} malloc) failed:\n{r.stderr[-3000:]}")
                runs[malloc] = [json.loads((Path(tmp) / f"{kind}_{i}.json").read_text()) for i in range(2)]
            for i, x in enumerate(runs[malloc]):  # the block trace of rank 0 with the fixed threshold, compactly
                t = x.pop("trace")
                if malloc == "mmap" and i == 0:
                    x["trace"] = " ".join(f"{label.replace(' ', '')}:{mb:.0f}" for label, mb in t)
        live = runs["mmap"]
        runtime = max(x["runtime_mb"] for x in live)
        p = plan(cfg, kind, 2, micro_batch=a.micro_batch, seq_len=a.seq_len, loss_chunk=a.loss_chunk, runtime=runtime * MB)
        peak = max(x["peak_rss_mb"] for x in live)
        rows[kind] = {
            "ranks": runs, "plan": p.as_dict(),
            "runtime_mb": runtime,
            "state_mb": max(x["state_bytes"] for x in live) / MB,
            "state_plan_mb": (p.weights + p.grads + p.adam) / MB,
            "peak_mb": peak,
            "peak_default_malloc_mb": max(x["peak_rss_mb"] for x in runs["default"]),
            "non_tensor_mb": max(x["phases"][-1]["malloc_in_use_mb"] - (x["state_bytes"] + p.buckets) / MB for x in live),
            "plan_tensors_mb": p.tensors / MB, "plan_total_mb": p.total / MB,
            "plan_vs_peak": p.tensors / MB / peak, "plan_total_vs_rss": p.total / MB / (runtime + peak),
        }
        rows[kind]["malloc_retention_mb"] = rows[kind]["peak_default_malloc_mb"] - peak
    res = {"model": "smollm2-135m (random init, float32)", "world": 2, "backend": "gloo (CPU)",
           "micro_batch": a.micro_batch, "seq_len": a.seq_len, "steps": a.steps, "loss_chunk": a.loss_chunk,
           "torch": torch.__version__, "malloc": {k: v or "glibc defaults" for k, v in MALLOC.items()},
           "units": "MiB per rank (max over the 2 ranks); peaks are above the runtime (RSS before the model)",
           **rows,
           "fsdp_over_ddp_state": rows["fsdp"]["state_mb"] / rows["ddp"]["state_mb"],
           "fsdp_over_ddp_peak": rows["fsdp"]["peak_mb"] / rows["ddp"]["peak_mb"]}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "scale.json").write_text(json.dumps(res, indent=1) + "\n")
    for kind, r in rows.items():
        print(f"{kind} rank 0, fixed mmap threshold (MiB above the {r['runtime_mb']:.0f} MiB runtime):")
        print(f"  {'phase':12} {'malloc used':>12} {'RSS':>7} {'peak RSS':>9}" + (f" {'tensor peak':>12}" if a.trace else ""))
        for ph in r["ranks"]["mmap"][0]["phases"]:
            print(f"  {ph['phase']:12} {ph['malloc_in_use_mb']:12.0f} {ph['rss_mb']:7.0f} {ph['peak_rss_mb']:9.0f}"
                  + (f" {ph['tensor_peak_mb']:12.0f}" if a.trace else ""))
        print("  plan: " + ", ".join(f"{k} {v / MB:.0f}" for k, v in r["plan"]["moments"].items()))
    print(f"{'':6} {'runtime':>8} {'state':>7} {'plan':>7} {'peak':>7} {'plan':>7} {'plan/peak':>10} {'non-tensor':>11} "
          f"{'glibc default peak':>19} {'retention':>10}")
    for kind, r in rows.items():
        print(f"{kind:6} {r['runtime_mb']:8.0f} {r['state_mb']:7.0f} {r['state_plan_mb']:7.0f} {r['peak_mb']:7.0f} "
              f"{r['plan_tensors_mb']:7.0f} {r['plan_vs_peak']:10.2f} {r['non_tensor_mb']:11.0f} "
              f"{r['peak_default_malloc_mb']:19.0f} {r['malloc_retention_mb']:10.0f}")
    print(f"FSDP / DDP: weights+grads+AdamW {res['fsdp_over_ddp_state']:.2f}, peak {res['fsdp_over_ddp_peak']:.2f}")


if __name__ == "__main__":
    main()
