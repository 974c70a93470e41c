"""Processes and devices: torchrun/DDP setup, the DDP wrapper, cross-rank means, memory and the MFU peak.

Under torchrun (WORLD_SIZE > 1) every process runs the same loop on its own slice of each batch and
DistributedDataParallel averages the gradients (Li et al. 2020, "PyTorch Distributed"); alone, the same
code runs with world = 1 and the model unwrapped.
"""

from __future__ import annotations

import os
import resource
from typing import Any, Callable

import torch
from torch.distributed.fsdp import FSDPModule

from growlm.models.config import ModelConfig
from growlm.models.model import GPT
from growlm.train.config import RunConfig
from growlm.train.precision import model_peak


def resolve_device(device: str) -> str:
    """'auto' means cuda when available, else cpu."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int]:
    """Initialise the process group under torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist_info()


def wrap(model: GPT, world: int, device: str) -> torch.nn.Module:
    """The module the loop calls: DDP around `model` when world > 1, else `model` itself (also when FSDP2
    has sharded it: `growlm.train.sharded`)."""
    if world == 1 or isinstance(model, FSDPModule):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None)


class Compiled:
    """`module(*args, **kw)`, through torch.compile when `compile` is true. Compiling happens on the first
    call (`pending` until then); where it fails, `failed(message)` is told once and the module runs eagerly."""

    def __init__(self, module: torch.nn.Module, compile: bool, failed: Callable[[str], None]) -> None:
        self.module, self.failed, self.fn, self.pending = module, failed, module, False
        if compile:
            torch._dynamo.reset()  # drop the graphs of an earlier (pre-growth) model
            self.fn, self.pending = torch.compile(module), True

    def __call__(self, *args: Any, **kw: Any) -> Any:
        if not self.pending:
            return self.fn(*args, **kw)
        self.pending = False
        try:
            return self.fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - any compiler failure: train on, eagerly
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            self.failed(f"torch.compile failed ({type(e).__name__}: {msg}); training in eager mode")
            self.fn = self.module
            return self.module(*args, **kw)


class CompiledBlocks:
    """`GPT.block_call`: every block through `torch.compile(fn)`, fn = `call_block` (or `checkpointed_block`
    under activation checkpointing: the checkpoint is traced inside the graph). With nn.Module inlining (the
    default since torch 2.5) a block's parameters are graph inputs, not constants, so the blocks of one model
    share one graph per kind of call (trainable weights, frozen weights, no_grad evaluation), and the blocks a
    depth growth adds, of the same shapes, reuse them: one block's compile time, once per run (torchtitan
    compiles per block for the same reason). Width growth changes the shapes: those compile once more.

    A compile that fails (no C++ compiler, an unsupported op) calls `failed(message)` once and every block
    runs eagerly from then on; the call that failed is run again eagerly, so no step is lost."""

    def __init__(self, failed: Callable[[str], None]) -> None:
        self.compiled: dict[Callable, Callable] = {}
        self.failed, self.ok = failed, True

    def __call__(self, fn: Callable[..., torch.Tensor], block: torch.nn.Module, *args: Any) -> torch.Tensor:
        if self.ok:
            try:
                if fn not in self.compiled:
                    self.compiled[fn] = torch.compile(fn)
                return self.compiled[fn](block, *args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: train on, eagerly
                self.ok = False
                msg = (str(e).strip().splitlines() or [""])[0][:200]
                self.failed(f"torch.compile failed ({type(e).__name__}: {msg}); training in eager mode")
        return fn(block, *args)

    def __deepcopy__(self, memo: dict) -> "CompiledBlocks":
        return self  # a copied model (the KD teacher snapshot) shares the compiled runner: it holds no weights


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a step that adds one paid for a compile)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def all_mean(t: torch.Tensor, world: int, device: str) -> torch.Tensor:
    """The mean of a (CPU) tensor over all ranks."""
    if world > 1:
        t = t.to(device, copy=True)
        torch.distributed.all_reduce(t)
        t = (t / world).cpu()
    return t


def from_rank0(value: float, world: int, device: str) -> float:
    """Rank 0's `value` on every rank (a choice measured per process, such as the precision, must agree)."""
    if world <= 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.broadcast(t, src=0)
    return float(t.item())


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def peak_flops(run: RunConfig, dtype: torch.dtype, device: str, cfg: ModelConfig, tokens: int) -> tuple[float, str]:
    """(The matmul peak MFU is measured against, where it comes from): run.peak_flops, else $GROWLM_MATMUL_PEAK,
    else the rate of the model's own matmul shapes (`tokens` rows) in `dtype` (the compute dtype: bfloat16
    under autocast) at the current thread count, measured once and cached (growlm.train.precision)."""
    if run.peak_flops is not None:
        return float(run.peak_flops), "run.peak_flops"
    env = os.environ.get("GROWLM_MATMUL_PEAK")
    if env:
        return float(env), "$GROWLM_MATMUL_PEAK"
    return model_peak(cfg, tokens, dtype, device)


def machine_info(device: str, world: int) -> dict[str, object]:
    """Where a run executes, for its report: device, CPU model and count, threads, framework versions."""
    import platform

    import numpy
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, object] = {"device": device, "world": world, "cpu": cpu, "cpu_count": os.cpu_count(),
                               "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    info["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "numpy": numpy.__version__}
    return info
