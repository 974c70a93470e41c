"""Per-rank memory of DDP vs FSDP2 with 2 processes (gloo, CPU) on SmolLM2-135M, against `growlm plan`.

Each run launches `torchrun --nproc_per_node 2` on this file (`--worker ddp|fsdp`). Every rank builds the
model (FSDP: on the meta device, sharded, then materialised, so no rank ever holds the full model), trains
`--steps` AdamW steps of micro_batch x seq_len tokens through growlm's own pieces (`build_optimizer`,
`growlm.train.sharded.shard`, the multiplied update) and reports:
  state_bytes  the bytes of its parameters, gradients and AdamW moments (local shards), counted exactly;
  peak_rss     its peak resident memory (ru_maxrss) minus the resident memory before the model was built.
The planner's prediction (`growlm.train.plan.plan`, same model, batch and process count) is compared
with both. Writes bench/results/scale.json and prints a table.

    python bench/scale.py [--seq_len 256 --micro_batch 1 --steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from growlm.models.config import ModelConfig
from growlm.models.model import GPT
from growlm.train.config import OptimConfig, RunConfig
from growlm.train.optim import build_optimizer, multiplied_step
from growlm.train.plan import plan

HERE = Path(__file__).resolve().parent


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(kind: str, out: Path, micro_batch: int, seq_len: int, steps: int) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("smollm2-135m")
    base = _rss_mb()
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
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), generator=g)
        logits = runner(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        multiplied_step(opt, model, {})
        if _ < steps - 1:
            opt.zero_grad(set_to_none=True)

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    grads = sum(local(p.grad).numel() * local(p.grad).element_size() for p in model.parameters() if p.grad is not None)
    adam = sum(local(v).numel() * local(v).element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rec = {"rank": rank, "weights": params, "grads": grads, "adam": adam, "state_bytes": params + grads + adam,
           "peak_rss_mb": peak - base, "base_rss_mb": base, "loss": float(loss)}
    (out / f"{kind}_{rank}.json").write_text(json.dumps(rec))
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--micro_batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, Path(a.out), a.micro_batch, a.seq_len, a.steps)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cfg = ModelConfig.from_preset("smollm2-135m")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("ddp", "fsdp"):
            cmd = [torchrun, "--standalone", "--nproc_per_node", "2", __file__, "--worker", kind, "--out", tmp,
                   "--seq_len", str(a.seq_len), "--micro_batch", str(a.micro_batch), "--steps", str(a.steps)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{kind} run failed:\n{r.stderr[-3000:]}")
            ranks = [json.loads((Path(tmp) / f"{kind}_{i}.json").read_text()) for i in range(2)]
            p = plan(cfg, kind, 2, micro_batch=a.micro_batch, seq_len=a.seq_len)
            state_pred = p.weights + p.grads + p.adam
            peak = max(x["peak_rss_mb"] for x in ranks)
            rows[kind] = {"ranks": ranks, "plan": {"weights": p.weights, "grads": p.grads, "adam": p.adam,
                                                   "engine": p.engine, "activations": p.activations, "total": p.total},
                          "state_mb": max(x["state_bytes"] for x in ranks) / 2**20, "state_plan_mb": state_pred / 2**20,
                          "peak_rss_mb": peak, "plan_total_mb": p.total / 2**20,
                          "plan_vs_peak": p.total / 2**20 / peak}
    res = {"model": "smollm2-135m (random init, float32)", "world": 2, "backend": "gloo (CPU)",
           "micro_batch": a.micro_batch, "seq_len": a.seq_len, "steps": a.steps, "torch": torch.__version__, **rows,
           "fsdp_over_ddp_state": rows["fsdp"]["state_mb"] / rows["ddp"]["state_mb"],
           "fsdp_over_ddp_peak": rows["fsdp"]["peak_rss_mb"] / rows["ddp"]["peak_rss_mb"]}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "scale.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"{'':6} {'state MiB':>10} {'plan':>8} {'peak RSS MiB':>13} {'plan total':>11} {'plan/peak':>10}")
    for kind, r in rows.items():
        print(f"{kind:6} {r['state_mb']:10.0f} {r['state_plan_mb']:8.0f} {r['peak_rss_mb']:13.0f} "
              f"{r['plan_total_mb']:11.0f} {r['plan_vs_peak']:10.2f}")
    print(f"FSDP / DDP: weights+grads+AdamW {res['fsdp_over_ddp_state']:.2f}, peak {res['fsdp_over_ddp_peak']:.2f}")


if __name__ == "__main__":
    main()
