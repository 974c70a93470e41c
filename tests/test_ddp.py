"""DDP under torchrun: 2 processes (gloo, CPU) equal 1 process with twice the accumulation, across a growth event."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import sys, copy
    import numpy as np, torch
    from safetensors.torch import save_file
    from growlm.models.config import ModelConfig
    from growlm.train.data import DataConfig, PackedData
    from growlm.models.model import GPT
    from growlm.train import GrowthConfig, OptimConfig, RunConfig, TrainConfig, Trainer

    out, accum = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny-llama"))
    rng = np.random.default_rng(0)
    stream = np.where(rng.random(3000) < 0.7, np.arange(3000) % 17, rng.integers(0, 96, 3000)).astype(np.uint16)
    data = PackedData(stream[:2600], stream[2600:], "ddp", 1, 1, 96)
    cfg = TrainConfig(
        data=DataConfig(seq_len=8, val_blocks=4),
        # eps 1e-6: gradients summed in another order differ by float rounding; Adam would magnify that
        # on elements whose gradient is ~0 (see test_train's accumulation test)
        optim=OptimConfig(lr=1e-2, warmup_steps=1, eps=1e-6),
        growth=GrowthConfig(trigger="steps", steps=[2], operators=[{"operator": "depth", "n": 1}], old_params="decay", gen_lr_mult=0.5),
        run=RunConfig(max_steps=4, micro_batch=2, grad_accum=accum, eval_every=2, log_every=1, out_dir=out + "/run",
                      peak_flops=0, export_hf=False, device="cpu"),
    )
    t = Trainer(cfg, model=model, data=data)
    res = t.fit()
    if t.rank == 0:
        save_file({k: v.detach().contiguous() for k, v in res.model.state_dict().items()}, out + "/final.safetensors")
        with open(out + "/losses.txt", "w") as f:
            import json
            for line in open(out + "/run/metrics.jsonl"):
                r = json.loads(line)
                if r.get("loss") is not None:
                    f.write(f"{r['step']} {r['loss']!r}\\n")
    """
)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None and
                    shutil.which("torchrun") is None, reason="torchrun not found")
def test_two_process_gloo_equals_one_process_with_double_accumulation(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "two"), "1"],
                         capture_output=True, text=True, env=env, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "2"], capture_output=True, text=True, env=env, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(str(tmp_path / "two" / "final.safetensors")), load_file(str(tmp_path / "one" / "final.safetensors"))
    assert set(a) == set(b) and any(k.startswith("blocks.2.") for k in a)  # the growth event happened in both
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    la = [float(ln.split()[1]) for ln in (tmp_path / "two" / "losses.txt").read_text().splitlines()]
    lb = [float(ln.split()[1]) for ln in (tmp_path / "one" / "losses.txt").read_text().splitlines()]
    assert len(la) == 4
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=0, atol=1e-6)
