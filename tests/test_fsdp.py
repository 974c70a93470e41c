"""FSDP2 (run.parallel fsdp) under torchrun, 2 processes on gloo, tiny Llama: equal to one process with the
same global batch across a width and a depth growth event, exact resume after SIGKILL on 2 processes and
on 1, export of a sharded checkpoint to transformers."""

from __future__ import annotations

import importlib.util
import json
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
    import json, os, signal, sys
    import numpy as np, torch
    from safetensors.torch import save_file
    from growlm.models.config import ModelConfig
    from growlm.models.model import GPT
    from growlm.train import GrowthConfig, ModelSource, OptimConfig, RunConfig, TrainConfig, Trainer
    from growlm.train import sharded
    from growlm.train.data import DataConfig, PackedData

    def data():
        rng = np.random.default_rng(0)
        stream = np.where(rng.random(3000) < 0.7, np.arange(3000) % 17, rng.integers(0, 96, 3000)).astype(np.uint16)
        return PackedData(stream[:2600], stream[2600:], "fsdp", 1, 1, 96)

    def config(out, dtype, parallel, accum, resume=False):
        # a larger eps in float32: gradients reduced in another order differ by rounding, which Adam magnifies
        # where g ~ 0 (the zero-initialised o / down of a new block: 1.8e-6 after 6 steps with eps 1e-6)
        policy = {"float32": "freeze", "float64": "decay"}[dtype]
        return TrainConfig(
            model=ModelSource(name="tiny-llama", init="scratch"),
            data=DataConfig(seq_len=8, val_blocks=4),
            optim=OptimConfig(lr=1e-2, warmup_steps=1, eps=1e-5 if dtype == "float32" else 1e-6),
            growth=GrowthConfig(trigger="steps", steps=[2, 4], old_params=policy, gen_lr_mult=0.5,
                                operators=[{"operator": "width", "factor": 2}, {"operator": "depth", "n": 1}]),
            run=RunConfig(max_steps=6, micro_batch=1, grad_accum=accum, eval_every=2, log_every=1, save_every=1,
                          out_dir=out, peak_flops=0, export_hf=False, device="cpu", dtype=dtype, parallel=parallel,
                          resume=resume))

    def run(out, dtype, parallel, accum, resume=False, kill_at=None):
        torch.manual_seed(0)
        model = GPT(ModelConfig.from_preset("tiny-llama"))
        x = torch.arange(16).reshape(2, 8) % 96
        holder, diffs = {}, []
        def on(kind, rec):
            if kind == "log" and rec.get("step") == kill_at and holder["t"].rank == 0:
                os.kill(os.getpid(), signal.SIGKILL)  # after step kill_at's log, before its checkpoint
        t = Trainer(config(out, dtype, parallel, accum, resume), model=model, data=data(), callback=on)
        holder["t"] = t
        grow_now = t.grow_now
        def logged_grow(val=None):  # the logits of the live (sharded) model just before and after growth
            with torch.no_grad():
                before = t.model(x)
                rec = grow_now(val)
                diffs.append(float((t.model(x) - before).abs().max()))
            return rec
        t.grow_now = logged_grow
        res = t.fit()
        full = sharded.full_model(res.model)
        if t.rank == 0:
            save_file({k: v.detach().contiguous() for k, v in full.state_dict().items()}, out + "/final.safetensors")
            losses = [r["loss"] for r in map(json.loads, open(out + "/metrics.jsonl")) if r.get("loss") is not None]
            events = [r for r in map(json.loads, open(out + "/metrics.jsonl")) if r.get("kind") == "growth"]
            json.dump({"losses": losses, "logit_diffs": diffs, "events": events}, open(out + "/result.json", "w"))

    if __name__ == "__main__":
        base, mode = sys.argv[1], sys.argv[2]
        if mode == "full":  # uninterrupted 2-process runs, fp32 and fp64
            run(base + "/fsdp32", "float32", "fsdp", 2)  # 2 micro-batches per process: no_sync on the first
            run(base + "/fsdp64", "float64", "fsdp", 2)
        elif mode == "kill":
            run(base + "/killed", "float32", "fsdp", 2, kill_at=3)
        elif mode == "resume":
            run(base + "/killed", "float32", "fsdp", 2, resume=True)
    """
)

pytestmark = pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None
                                and shutil.which("torchrun") is None, reason="torchrun not found")


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    return subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run once: 2-process FSDP (fp32, fp64), 1-process references, a killed run resumed on 2 and on 1."""
    base = tmp_path_factory.mktemp("fsdp")
    script = base / "worker.py"
    script.write_text(WORKER)
    spec = importlib.util.spec_from_file_location("fsdp_worker", script)
    w = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(w)
    full = _torchrun(script, str(base), "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _torchrun(script, str(base), "kill")
    assert killed.returncode != 0 and not (base / "killed" / "result.json").exists()
    assert json.loads((base / "killed" / "checkpoints" / "latest.json").read_text())["step"] == 2  # right after growth
    shutil.copytree(base / "killed", base / "killed1")
    resumed = _torchrun(script, str(base), "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    shutil.copytree(base / "killed1", base / "killed3")
    w.run(str(base / "one32"), "float32", "ddp", 4)  # one process, the same global batch of 4 sequences
    w.run(str(base / "one64"), "float64", "ddp", 4)
    w.run(str(base / "killed1"), "float32", "fsdp", 4, resume=True)  # the 2-process checkpoint on 1 process
    return base, w


def _result(d: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((d / "result.json").read_text()), load_file(str(d / "final.safetensors"))


@pytest.mark.parametrize("bits,tol", [(32, 1e-6), (64, 1e-10)])
def test_fsdp_two_processes_equal_one_process_across_width_and_depth_growth(runs, bits, tol):
    runs, _ = runs
    (ra, wa), (rb, wb) = _result(runs / f"fsdp{bits}"), _result(runs / f"one{bits}")
    assert [e["operator"] for e in ra["events"]] == ["width", "depth"] == [e["operator"] for e in rb["events"]]
    assert len(ra["logit_diffs"]) == 2 and max(ra["logit_diffs"]) <= tol  # the re-sharded model keeps the function
    for e in ra["events"]:
        assert abs(e["val_loss_delta"]) <= tol
    assert set(wa) == set(wb) and any(k.startswith("blocks.2.") for k in wa) and wa["wte.weight"].shape[1] == 64
    assert wa["wte.weight"].dtype == (torch.float32 if bits == 32 else torch.float64)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=tol, msg=k)
    assert len(ra["losses"]) == 6
    ck = runs / f"fsdp{bits}" / "checkpoints" / "step_000006"
    assert {p.name for p in ck.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}  # one shard file per rank
    assert json.loads((ck / "state.json").read_text())["world"] == 2
    torch.testing.assert_close(torch.tensor(ra["losses"]), torch.tensor(rb["losses"]), rtol=0, atol=tol)


def test_sigkilled_fsdp_run_resumes_exactly_on_two_processes_and_on_one(runs):
    runs, _ = runs
    (ra, wa), (rb, wb) = _result(runs / "fsdp32"), _result(runs / "killed")
    assert rb["losses"] == ra["losses"]  # bit-exact, across the growth event at step 4 too
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    rc, wc = _result(runs / "killed1")
    torch.testing.assert_close(torch.tensor(rc["losses"]), torch.tensor(ra["losses"]), rtol=0, atol=1e-6)
    for k in wa:
        torch.testing.assert_close(wc[k], wa[k], rtol=0, atol=1e-6, msg=k)
    ck = runs / "killed1" / "checkpoints" / "step_000006"
    assert json.loads((ck / "state.json").read_text())["world"] == 1 and (ck / ".metadata").is_file()


def test_export_of_a_sharded_checkpoint_loads_in_transformers(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from growlm.cli.main import main
    from growlm.models.config import ModelConfig
    from growlm.models.model import GPT

    run = runs[0] / "fsdp32"
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    _, w = _result(run)
    ours = GPT.from_state_dict(ModelConfig.load(run / "checkpoints" / "step_000006" / "model_config.json"), w)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    x = torch.arange(24).reshape(2, 12) % 96
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours.eval()(x), rtol=0, atol=1e-5)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2  # never overwritten


def test_resume_on_another_process_count_needs_the_same_global_batch(runs):
    from growlm.errors import GrowlmError
    from growlm.train import TrainConfig

    base, w = runs
    with pytest.raises(GrowlmError, match="global batch is 4 sequences"):
        w.run(str(base / "killed3"), "float32", "fsdp", 3, resume=True)
    assert json.loads((base / "killed3" / "checkpoints" / "latest.json").read_text())["step"] == 2  # untouched
    cfg = w.config(str(base / "x"), "float32", "fsdp", 1).to_dict()
    with pytest.raises(GrowlmError, match="ewc_lambda"):
        TrainConfig.from_dict({**cfg, "reg": {**cfg["reg"], "ewc_lambda": 1.0}})
