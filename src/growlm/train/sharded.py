"""FSDP2 sharded training (`run.parallel: fsdp`): sharding, growth of a live sharded model, DCP checkpoints.

Fully sharded data parallelism (Zhao et al. 2023, "PyTorch FSDP"; FSDP2 = `torch.distributed.fsdp.fully_shard`
on DTensor): each process keeps 1/world of every parameter, gradient and AdamW moment, as rows
(`Shard(0)`, torch.chunk sizes: rank r holds rows [r c, min((r + 1) c, n)) with c = ceil(n / world)). A
block's weights are all-gathered for its forward and backward and its gradients reduce-scattered (mean
over ranks), so one step equals single-process training on the global batch up to float rounding.

- `shard`: `fully_shard` on every block, then on the root, over a 1-D `DeviceMesh` (CPU/gloo or CUDA/nccl),
  with a bf16 `MixedPrecisionPolicy` when `run.autocast` is bf16 (fp32 gradient reduction). One process
  (world 1) trains the plain model and still writes DCP checkpoints, so a sharded run can resume there.
- The multiplied update p = p_before + m (p_after - p_before) (`growlm.train.optim`) runs on the local
  shards: `shard_multipliers` turns each per-element multiplier (a broadcastable tensor) into a DTensor
  with the parameter's placement by slicing the rows this rank holds (no communication, no full copy).
- Growth of a live sharded model (`gather_full`): the full model and AdamW state are all-gathered on every
  rank (`get_model_state_dict` / `get_optimizer_state_dict`, full_state_dict), the same pure operator and
  the same `transfer_adamw_state` as single-process training run on them (deterministically: growth noise
  comes from its seed alone), then the grown model is sharded again (`fully_shard` keeps each rank's rows
  of the full tensors, no communication) and the moments are cut the same way (`shard_optimizer_state`).
  The cost: a full fp32 copy of weights and moments per rank for the moment of growth.
- Checkpoints (`save_checkpoint`, `load_checkpoint`, `load_state`): `torch.distributed.checkpoint` (DCP)
  writes each rank's shards plus `.metadata` into the same atomic step folder as a single-process
  checkpoint (`growlm.train.checkpoint`: temporary sibling, manifest last, rename), beside state.json,
  train_config.json, model_config.json and the growth tensors. DCP re-shards on load, so a run resumes
  on another number of processes; the data order is global (`BlockSampler` hands out the global batch,
  rank r takes every world-th micro-batch), so 2 processes x grad_accum 1 resume as 1 process x
  grad_accum 2 (`relayout`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from safetensors.torch import load_file

from growlm.errors import GrowlmError
from growlm.growth.factored import Factored
from growlm.io import atomic_dir
from growlm.models.config import ModelConfig
from growlm.models.model import GPT
from growlm.train import checkpoint as ckpt
from growlm.train.config import OptimConfig, RunConfig
from growlm.train.optim import broadcast, build_optimizer

DCP_METADATA = ".metadata"
"""The file DCP writes last into a checkpoint folder; its presence marks a sharded checkpoint."""


# -- sharding -------------------------------------------------------------------------------------------
def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard(model: GPT, world: int, device: str, run: RunConfig) -> GPT:
    """`fully_shard` each block, then the root (in place; the same module comes back). Identity for one
    process and for a model that is sharded already."""
    if world == 1 or is_sharded(model) or run.parallel != "fsdp":
        return model
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if run.autocast == "bf16" \
        else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@contextlib.contextmanager
def no_sync(module: torch.nn.Module) -> Iterator[None]:
    """No gradient communication inside (a non-final micro-step of gradient accumulation): DDP's `no_sync`,
    FSDP2's `set_requires_gradient_sync(False)` (unsharded gradients accumulate, reduce-scattered once)."""
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        yield


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (which takes DTensor gradients: the norm is reduced over the mesh);
    the total norm comes back as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _rows(n: int, p: DTensor) -> tuple[int, int]:
    """The rows [lo, hi) of a dim-0 size n that this rank holds of `p` (torch.chunk sizes, as FSDP2 shards)."""
    mesh = p.device_mesh
    if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise GrowlmError(f"only 1-D row sharding (Shard(0)) is supported, got {p.placements} on {mesh}")
    c = math.ceil(n / mesh.size())
    lo = min(mesh.get_local_rank() * c, n)
    return lo, min(lo + c, n)


def shard_like(full: torch.Tensor, p: DTensor) -> DTensor:
    """A tensor broadcastable to p.shape as a DTensor placed like `p`: this rank's rows, no communication."""
    lo, hi = _rows(p.shape[0], p)
    local = full.to(device=p.device).expand(p.shape)[lo:hi].contiguous()
    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def shard_multipliers(model: torch.nn.Module, multipliers: dict[str, Any]) -> dict[str, Any]:
    """Tensor multipliers of sharded parameters as DTensors placed like them (floats stay floats)."""
    params = dict(model.named_parameters())
    out = {}
    for n, m in multipliers.items():
        p = params.get(n)
        if isinstance(m, Factored):
            m = broadcast(m, None if p is None else p.dtype)
        if isinstance(p, DTensor) and torch.is_tensor(m) and not isinstance(m, DTensor):
            m = shard_like(m.to(p.dtype), p)
        out[n] = m
    return out


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Full-shape moments of sharded parameters (as `transfer_adamw_state` fills them) cut to this rank's rows."""
    for p, st in optimizer.state.items():
        if not isinstance(p, DTensor):
            continue
        for k, v in st.items():
            if torch.is_tensor(v) and not isinstance(v, DTensor) and v.dim() > 0 and tuple(v.shape) == tuple(p.shape):
                st[k] = shard_like(v, p)


# -- the full state (growth, export) --------------------------------------------------------------------
def gather_full(model: GPT, optimizer: torch.optim.Optimizer, optim: OptimConfig) -> tuple[GPT, torch.optim.Optimizer]:
    """A plain copy of a sharded model and an AdamW over it holding the full state (collective: every rank
    calls it and gets the same full copy, on the CPU). Frozen parameters stay frozen."""
    opts = StateDictOptions(full_state_dict=True)
    msd = {k: v.detach().cpu() for k, v in get_model_state_dict(model, options=opts).items()}
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    full = GPT.from_state_dict(model.config, _own_keys(model.config, msd), device="cpu")
    trainable = {n: q.requires_grad for n, q in model.named_parameters()}
    for n, p in full.named_parameters():
        p.requires_grad_(trainable[n])
    opt = build_optimizer(full, optim)
    for n, p in full.named_parameters():
        if n in osd["state"]:
            opt.state[p] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in osd["state"][n].items()}
    return full, opt


def full_model(model: GPT) -> GPT:
    """The model itself when it is not sharded, else a full plain copy on the CPU (collective)."""
    if not is_sharded(model):
        return model
    msd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return GPT.from_state_dict(model.config, _own_keys(model.config, {k: v.detach().cpu() for k, v in msd.items()}), device="cpu")


def _own_keys(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as GPT.from_state_dict takes it (a tied head has no lm_head key)."""
    return {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}


# -- checkpoints ----------------------------------------------------------------------------------------
def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DCP_METADATA).is_file()


def _app_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    sd: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        sd["optim"] = get_optimizer_state_dict(model, optimizer)
    return sd


def save_checkpoint(ckpt_dir: str | Path, step: int, model: GPT, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], train_config: dict[str, Any], rank: int, world: int,
                    tensors: dict[str, dict[str, torch.Tensor]] | None = None, teacher: GPT | None = None,
                    keep_last: int = 2, val_loss: float | None = None) -> Path:
    """A DCP checkpoint `step_{step:06d}` (collective): every rank writes its shards into one temporary
    folder that rank 0 created, rank 0 adds the run's state and the manifest and renames it into place."""
    ckpt_dir = Path(ckpt_dir)
    name = f"step_{step:06d}"
    sd = _app_state(model, optimizer)
    with atomic_dir(ckpt_dir / name) if rank == 0 else contextlib.nullcontext(None) as tmp:
        where = [str(tmp) if rank == 0 else None]
        if world > 1:
            torch.distributed.broadcast_object_list(where, src=0)
        dcp.save(sd, checkpoint_id=where[0], no_dist=not _distributed())
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            ckpt.write_run_files(Path(where[0]), model.config, state, train_config, tensors, teacher)
    if rank == 0:
        ckpt.finish_checkpoint(ckpt_dir, name, step, keep_last, val_loss)
    if world > 1:
        torch.distributed.barrier()
    return ckpt_dir / name


def load_checkpoint(path: str | Path, device: str = "cpu") -> dict[str, Any]:
    """What `growlm.train.checkpoint.load_checkpoint` returns, for a sharded checkpoint: "model" is built
    from the saved config with placeholder weights (`load_state` fills them after sharding) and
    "optimizer" is None; "sharded" is True."""
    path = Path(path)
    cfg = ModelConfig.load(path / "model_config.json")
    out: dict[str, Any] = {
        "model": GPT(cfg).to(device),
        "optimizer": None,
        "rng": torch.load(path / "rng.pt", weights_only=True),
        "state": json.loads((path / "state.json").read_text()),
        "train_config": ckpt.read_train_config(path),
        "tensors": {},
        "teacher": None,
        "sharded": True,
    }
    for f in sorted(path.glob("tensors-*.safetensors")):
        out["tensors"][f.name[len("tensors-"): -len(".safetensors")]] = load_file(str(f), device=device)
    if (path / "teacher.safetensors").exists():
        out["teacher"] = GPT.from_state_dict(ModelConfig.load(path / "teacher_config.json"),
                                             load_file(str(path / "teacher.safetensors"), device=device), device=device)
    return out


def load_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Weights (and AdamW state) of a DCP checkpoint into a model sharded over any number of processes
    (or not sharded). Collective under a process group."""
    sd = _app_state(model, optimizer)
    dcp.load(sd, checkpoint_id=str(path), no_dist=not _distributed())
    set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, sd["optim"])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def launch_world() -> int:
    """The number of processes of this run: the process group's, else torchrun's WORLD_SIZE, else 1."""
    if _distributed():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def relayout(path: str | Path, saved: dict[str, Any], now: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """For a sharded checkpoint resumed on another number of processes: run.micro_batch and run.grad_accum
    may change when the global batch micro_batch * grad_accum * world stays the same (the sampler's order is
    global). Returns `now` with the saved values in those fields (to compare the rest) and a note; for any
    other case `now` unchanged."""
    if not is_sharded_checkpoint(path):
        return now, []
    w0 = json.loads((Path(path) / "state.json").read_text()).get("world", 1)
    w1 = launch_world()
    a, b = saved.get("run", {}), now.get("run", {})
    try:
        g0, g1 = a["micro_batch"] * a["grad_accum"] * w0, b["micro_batch"] * b["grad_accum"] * w1
    except (KeyError, TypeError):
        return now, []
    if (w0, a["micro_batch"], a["grad_accum"]) == (w1, b["micro_batch"], b["grad_accum"]):
        return now, []
    if g0 != g1:
        raise GrowlmError(f"cannot resume {path} on {w1} processes: its global batch is {g0} sequences "
                          f"(micro_batch {a['micro_batch']} x grad_accum {a['grad_accum']} x {w0} processes), now {g1}; "
                          "set run.micro_batch and run.grad_accum so that the product stays the same")
    note = (f"resuming {Path(path).name} (written by {w0} processes) on {w1}: micro_batch x grad_accum "
            f"{a['micro_batch']} x {a['grad_accum']} -> {b['micro_batch']} x {b['grad_accum']}, global batch {g0}")
    return {**now, "run": {**b, "micro_batch": a["micro_batch"], "grad_accum": a["grad_accum"]}}, [note]


def export_model(path: str | Path) -> GPT:
    """The full model of a checkpoint (sharded or not) on one process, on the CPU."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        return ckpt.load_checkpoint(path)["model"]
    model = GPT(ModelConfig.load(path / "model_config.json"))
    sd = {"model": get_model_state_dict(model)}
    dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(sd["model"])
    return model
