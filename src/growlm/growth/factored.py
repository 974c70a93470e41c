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

import math
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
            any_fresh = bool(fresh.any())
            placed = False
            for k, f in enumerate(factors):
                fd = dim - (len(self.shape) - f.dim())  # factors may have fewer leading dims
                if fd < 0 or f.shape[fd] == 1:
                    continue
                g = f.index_select(fd, ix.clamp(min=0).to(f.device))
                if any_fresh:
                    # the first factor along `dim` takes the fill, any later one the neutral element, so
                    # that op over the factors is fill (combined with factors along other dims) there
                    view = [1] * f.dim()
                    view[fd] = -1
                    v = _neutral(self.op, g.dtype) if placed else fill
                    g = torch.where(fresh.view(view).to(g.device), torch.full((), v, dtype=g.dtype, device=g.device), g)
                    placed = True
                factors[k] = g
            if any_fresh and not placed:
                neutral = _neutral(self.op, factors[0].dtype)
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

    def extrema(self) -> tuple[float, float]:
        """(min, max) of the values, from the factors alone when they vary along disjoint dims (and, for
        'mul', are all positive), else from the dense tensor."""
        groups = self._groups()
        if groups is None or (self.op == "mul" and not all(bool((g > 0).all()) for g in groups.values())):
            d = self.dense()
            return float(d.min()), float(d.max())
        lo = [float(g.min()) for g in groups.values()]
        hi = [float(g.max()) for g in groups.values()]
        if self.op == "mul":
            return math.prod(lo), math.prod(hi)
        return max(lo), max(hi)

    def counts(self) -> dict[int, int]:
        """How many elements hold each value ('max' of integer tags), without materialising when the
        factors vary along disjoint dims: #(value <= v) is the product over those dims of the per-factor
        counts, so #(value == v) is a difference of two such products."""
        if self.op != "max" or self.factors[0].dtype.is_floating_point:
            raise ValueError("counts() is for integer tags combined with op='max'")
        groups = self._groups()
        if groups is None:
            u, c = torch.unique(self.dense(), return_counts=True)
            return {int(v): int(n) for v, n in zip(u.tolist(), c.tolist())}
        total = math.prod(self.shape)
        free = total // math.prod(g.numel() for g in groups.values())  # elements per cell of the varying dims
        out: dict[int, int] = {}
        below = 0
        for v in sorted(set().union(*(set(g.unique().tolist()) for g in groups.values()))):
            le = free * math.prod(int((g <= v).sum()) for g in groups.values())
            if le > below:
                out[int(v)] = le - below
            below = le
        return out

    def _groups(self) -> dict[tuple[int, ...], torch.Tensor] | None:
        """Factors combined by the set of dims they vary along; None when two such sets overlap."""
        nd = len(self.shape)
        groups: dict[tuple[int, ...], torch.Tensor] = {}
        for f in self.factors:
            f = f.reshape([1] * (nd - f.dim()) + list(f.shape))
            dims = tuple(d for d in range(nd) if f.shape[d] != 1)
            if dims in groups:
                g = groups[dims]
                f = g * f if self.op == "mul" else torch.maximum(g, f)
            groups[dims] = f
        used = [d for dims in groups for d in dims]
        return groups if len(used) == len(set(used)) else None

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


def _neutral(op: Op, dtype: torch.dtype) -> float | int:
    """x op neutral == x: 1 for mul, the dtype's lowest value for max."""
    if op == "mul":
        return 1
    return torch.finfo(dtype).min if dtype.is_floating_point else torch.iinfo(dtype).min


def _merge_constants(factors: list[torch.Tensor], op: Op) -> list[torch.Tensor]:
    """Fold factors of the same broadcast shape into one (constants included), so that the factor list stays
    short across many growth events: at most one factor per set of dims it varies along."""
    nd = max(f.dim() for f in factors)
    merged: dict[tuple[int, ...], torch.Tensor] = {}
    for f in factors:
        f = f.reshape([1] * (nd - f.dim()) + list(f.shape))
        key = tuple(f.shape)
        if key in merged:
            g = merged[key]
            f = g * f if op == "mul" else torch.maximum(g, f)
        merged[key] = f
    return sorted(merged.values(), key=lambda f: f.numel())

def pack(state: dict[str, Factored]) -> dict[str, torch.Tensor]:
    """Flat tensors for a safetensors file: every entry's `to_tensors(name)` (shared factors copied)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, f in state.items():
        for k, t in f.to_tensors(name).items():
            if t.data_ptr() in seen:  # safetensors refuses tensors that share memory
                t = t.clone()
            seen.add(t.data_ptr())
            out[k] = t
    return out


def unpack(tensors: dict[str, torch.Tensor], op: Op) -> dict[str, Factored]:
    """Inverse of `pack` (parameter names never end in a digit, so `{name}.{k}` is unambiguous)."""
    names = [k.removesuffix(".shape") for k in tensors if k.endswith(".shape")]
    return {n: Factored.from_tensors(tensors, n, op) for n in names}
