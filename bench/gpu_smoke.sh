#!/usr/bin/env bash
# GPU smoke test (cannot run on the CPU-only machine growlm is developed on; run it where a GPU is).
#   1. one GPU, bf16 autocast: SmolLM2-135M grows by 2 identity blocks at step 0 and step 40 (interleaved,
#      so the backward runs through the whole model) while it continues pretraining on Shakespeare,
#      80 steps of 16 x 512 tokens; then the same with run.parallel fsdp on 2 processes if 2 GPUs exist.
#   2. prints tokens/s, MFU (against the measured bf16 matmul peak of the device) and peak memory per run,
#      read from each run's metrics.jsonl. Budget: under 5 minutes on one modern GPU (each run is capped).
# Usage: bash bench/gpu_smoke.sh            (PY=path/to/python, OUT=runs/gpu-smoke to change defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu-smoke}
[ -x "$PY" ] || { echo "gpu_smoke: $PY not found; run 'bash scripts/setup.sh' first or set PY=" >&2; exit 2; }
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_smoke: no CUDA GPU visible to torch $("$PY" -c 'import torch; print(torch.__version__)') (a CPU build or no driver); this script needs one" >&2
  exit 2
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
"$PY" -c "import torch; print('gpu_smoke:', torch.cuda.get_device_name(), 'x', torch.cuda.device_count(), 'torch', torch.__version__)"

COMMON=(--config configs/grow-smollm2-shakespeare.yaml --run.device cuda --run.autocast bf16
        --run.max_steps 80 --run.eval_every 20 --run.log_every 10 --run.save_every 40 --data.seq_len 512
        --data.val_blocks 32 --run.retention_blocks 0 --run.export_hf false --run.overwrite true
        --growth.start 0 --growth.every 40 --growth.max_events 2
        --growth.operators '[{operator: depth, n: 2, where: interleave}]')

summary() {  # tokens/s, MFU and peak memory of a run, from its metrics.jsonl
  "$PY" - "$1" <<'PYEOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
steps = [r for r in recs if r.get("kind") == "train" and r.get("tok_s")][1:]  # the first interval includes warm-up
end = next((r for r in recs if r.get("event") == "end"), {})
ev = [r for r in recs if r.get("kind") == "growth"]
if not steps:
    sys.exit(f"gpu_smoke: {sys.argv[1]} logged no training steps")
tok = sum(r["tok_s"] for r in steps) / len(steps)
mfu = [r["mfu"] for r in steps if r.get("mfu") is not None]
print(f"{sys.argv[1]}: tokens/s {tok:,.0f} | MFU {100 * sum(mfu) / len(mfu):.1f}%" if mfu else f"{sys.argv[1]}: tokens/s {tok:,.0f}",
      f"| peak memory {end.get('peak_mem_mb', float('nan')):,.0f} MiB | growth events {len(ev)}, |val delta| max "
      f"{max(abs(e['val_loss_delta']) for e in ev):.1e} | final val loss {end.get('val_loss')}")
PYEOF
}

echo "== 1 GPU, bf16 =="
timeout 150 "$PY" -m growlm.cli train "${COMMON[@]}" --run.micro_batch 16 --run.out_dir "$OUT/one"
summary "$OUT/one"

if [ "$NGPU" -ge 2 ]; then
  echo "== 2 GPUs, FSDP2 (nccl), bf16 =="
  timeout 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m growlm.cli train "${COMMON[@]}" \
    --run.micro_batch 8 --run.parallel fsdp --run.out_dir "$OUT/fsdp2"
  summary "$OUT/fsdp2"
else
  echo "gpu_smoke: one GPU: the 2-process FSDP run is skipped"
fi
