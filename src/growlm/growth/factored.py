"""Per-element side state kept in factored form: a value per weight element without a tensor per weight.

Growth tags every element of every weight with the generation that created it and gives some elements
an update multiplier (growlm.growth.width). Both are functions of the row and the column an element sits
in: width growth acts per axis (a cloned row, a divided column), depth growth per tensor. Storing them
at full size costs one number per weight (1.7 GB of update scales for SmolLM2 x2). `Factored` keeps the
per-axis vectors instead and combines them when asked:

    value[i, j] = op(f_0, f_1, ...)[i, j]     each factor broadcastable to `shape`, e.g. (n, 1), (1, m), ()

with op = "mul" (update scales: products compose) or "max" (generations: a newer tag wins). A full-size
factor is allowed (`from_dense`), so any tensor is representable; re-indexing along an axis
(`gather`) keeps the form, which is what growth needs to compose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Op = Literal["mul", "max"]


@dataclass
class Factored:
    """A tensor of `shape` equal to `op` over `factors` (each broadcastable to `shape`)."""

    shape: tuple[int, ...]
    op: Op
    factors: list[torch.Tensor]

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.op not in ("mul", "max"):
            raise ValueError(f"op must be 'mul' or 'max', got {self.op!r}")
        if not self.factors:
            raise ValueError("a Factored needs at least one factor (use Factored.constant)")
        for f in self.factors:
            if f.dim() > len(self.shape) or torch.broadcast_shapes(f.shape, self.shape) != torch.Size(self.shape):
                raise ValueError(f"factor of shape {tuple(f.shape)} does not broadcast to {self.shape}")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def constant(cls, shape: tuple[int, ...] | torch.Size, value: float | int, op: Op,
                 dtype: torch.dtype = torch.float32) -> "Factored":
        return cls(tuple(shape), op, [torch.full([1] * len(shape), value, dtype=dtype)])

    @classmethod
    def from_dense(cls, t: torch.Tensor, op: Op) -> "Factored":
        """A full-size tensor as one factor, compressed to a constant when all its values are equal."""
        t = t.detach()
        if t.numel() > 0 and bool((t == t.reshape(-1)[0]).all()):
            return cls.constant(t.shape, t.reshape(-1)[0].item(), op, t.dtype)
        return cls(tuple(t.shape), op, [t.clone()])

    @classmethod
    def axis(cls, shape: tuple[int, ...] | torch.Size, dim: int, vec: torch.Tensor, op: Op) -> "Factored":
        """A factor that varies along `dim` only."""
        view = [1] * len(shape)
        view[dim] = -1
        return cls(tuple(shape), op, [vec.reshape(view)])

    # -- algebra -----------------------------------------------------------------------------------
    def combine(self, other: "Factored") -> "Factored":
        """Elementwise op of two Factored of the same shape and op (factors are concatenated, constants merged)."""
        if other.shape != self.shape or other.op != self.op:
            raise ValueError(f"cannot combine {self.op}{self.shape} with {other.op}{other.shape}")
        return Factored(self.shape, self.op, _merge_constants(self.factors + other.factors, self.op))

    def gather(self, index: tuple[torch.Tensor | None, ...], fill: float | int) -> "Factored":
        """Re-index along each dim (`index[d]`: new position -> old position, -1 = fresh, None = identity).

        Fresh positions take `fill` in the first factor that varies along that dim (or in a new axis
        factor when none does), so op over the factors gives `fill` combined with the others there."""
        factors = list(self.factors)
        shape = list(self.shape)
        for dim, ix in enumerate(index):
            if ix is None:
                continue
            shape[dim] = int(ix.numel())
            fresh = ix < 0
            placed = False
            for k, f in enumerate(factors):
                fd = dim - (len(self.shape) - f.dim())  # factors may have fewer leading dims
                if fd < 0 or f.shape[fd] == 1:
                    continue
                g = f.index_select(fd, ix.clamp(min=0).to(f.device))
                if bool(fresh.any()):
                    view = [1] * f.dim()
                    view[fd] = -1
                    g = torch.where(fresh.view(view).to(g.device), torch.full((), fill, dtype=g.dtype, device=g.device), g)
                    placed = True
                factors[k] = g
            if bool(fresh.any()) and not placed:
                neutral = 1 if self.op == "mul" else _lowest(factors[0].dtype)
                vec = torch.where(fresh, torch.full((), fill, dtype=factors[0].dtype),
                                  torch.full((), neutral, dtype=factors[0].dtype))
                view = [1] * len(self.shape)
                view[dim] = -1
                factors.append(vec.reshape(view))
        return Factored(tuple(shape), self.op, _merge_constants(factors, self.op))

    # -- reading -----------------------------------------------------------------------------------
    def dense(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """The full tensor (materialised: use only where a full-size tensor is needed anyway)."""
        out = None
        for f in self.factors:
            f = f.to(device=device, dtype=dtype or f.dtype)
            out = f if out is None else (out * f if self.op == "mul" else torch.maximum(out, f))
        return out.expand(self.shape).clone()

    def is_constant(self) -> bool:
        return all(f.numel() == 1 for f in self.factors)

    def value(self) -> float:
        """The single value of a constant Factored."""
        if not self.is_constant():
            raise ValueError("not a constant")
        return float(self.dense().reshape(-1)[0]) if self.shape else float(self.dense())

    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.factors)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors: `{prefix}.{k}` per factor and `{prefix}.shape`."""
        out = {f"{prefix}.{k}": f.contiguous() for k, f in enumerate(self.factors)}
        out[f"{prefix}.shape"] = torch.tensor(self.shape, dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, op: Op) -> "Factored":
        shape = tuple(int(s) for s in tensors[f"{prefix}.shape"].tolist())
        k, factors = 0, []
        while f"{prefix}.{k}" in tensors:
            factors.append(tensors[f"{prefix}.{k}"])
            k += 1
        return cls(shape, op, factors)


def _lowest(dtype: torch.dtype) -> float | int:
    return torch.finfo(dtype).min if dtype.is_floating_point else torch.iinfo(dtype).min


def _merge_constants(factors: list[torch.Tensor], op: Op) -> list[torch.Tensor]:
    """Fold all one-element factors into one (keeps the factor list short across many growth events)."""
    consts = [f for f in factors if f.numel() == 1]
    rest = [f for f in factors if f.numel() != 1]
    if len(consts) <= 1:
        return factors
    c = consts[0]
    for f in consts[1:]:
        c = c * f if op == "mul" else torch.maximum(c, f)
    return [c, *rest] if rest else [c]
