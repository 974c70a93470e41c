"""Regularisers against forgetting when a model grows: distillation from the pre-growth snapshot and EWC.

Knowledge distillation (Hinton et al. 2015, "Distilling the knowledge in a neural network", eq. 2):
    L_KD = T^2 * KL( softmax(z_teacher / T) || softmax(z_student / T) ),  averaged over tokens.
The teacher is a frozen copy of the model taken just before a growth event (reg.kd_teacher: re-taken at
every event, or the base model before the first event kept for the whole run); a function-preserving
operator makes the grown student equal to the snapshot, so L_KD is exactly zero right after growth and only
grows as training moves the student away. When the vocabulary grew, the student's logits are
restricted to the teacher's vocabulary (the old tokens keep their ids) and renormalised there.

Elastic Weight Consolidation (Kirkpatrick et al. 2017, PNAS, eq. 3):
    L_EWC = (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2
with theta* the parameters at growth time and F the diagonal Fisher, the MEAN OF SQUARED PER-SAMPLE
gradients (a sample is one training sequence, its loss the mean token cross-entropy). Squaring the
gradient of a batch mean instead would make F depend on the batch size (a known Avalanche bug).
Two variants: "empirical" uses the data's gold next tokens as labels (the empirical Fisher, cheap and
what most implementations compute); "true" samples the labels from the model's own predictive
distribution (the true Fisher of the model). The Fisher is computed on the grown model right after a
function-preserving growth event (old elements then have exactly their pre-growth gradients, since new
blocks/units contribute zero to the output) and set to zero for elements the event created: EWC
anchors what was learned, not the new capacity.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from growlm.distill.objectives import logits_loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """T^2 * KL(teacher || student) on temperature-softened distributions, mean over positions (float32,
    float64 stays): the forward-KL objective of `growlm.distill.objectives`, the one copy of that math."""
    return logits_loss(student_logits, teacher_logits, "forward_kl", temperature)


def _sequence_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def sample_labels(model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens drawn from the model's predictive distribution at every position (for the true Fisher)."""
    probs = model(x).float().softmax(-1)  # (B, T, V)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(x.shape)


def per_sample_fisher(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    names: list[str] | None = None,
    chunk: int = 4,
    method: Literal["vmap", "loop"] = "vmap",
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher: mean over the B sequences of (d loss_b / d theta)^2, for the parameters `names`
    (default: those requiring grad). `vmap` computes per-sample gradients with torch.func
    (functional_call + vmap(grad)), `chunk` samples at a time to bound memory; `loop` is the plain
    per-sample backward, kept as the reference."""
    params = dict(model.named_parameters())
    names = names if names is not None else [n for n, p in params.items() if p.requires_grad]
    fisher = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    B = x.shape[0]
    if method == "loop":
        for b in range(B):
            loss = _sequence_loss(model(x[b : b + 1]), y[b : b + 1])
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    fisher[n] += g.float() ** 2
    else:
        from torch.func import functional_call, grad, vmap

        fixed = {n: p.detach() for n, p in params.items() if n not in names}
        buffers = dict(model.named_buffers())

        def loss_one(trainable: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            logits = functional_call(model, ({**fixed, **trainable}, buffers), (xi[None],))
            return _sequence_loss(logits, yi[None])

        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
        trainable = {n: params[n].detach() for n in names}
        for s in range(0, B, chunk):
            with warnings.catch_warnings():  # SDPA has no vmap batching rule yet: a slower fallback, same values
                warnings.filterwarnings("ignore", message=".*batching rule.*")
                g = per_sample(trainable, x[s : s + chunk], y[s : s + chunk])
            for n in names:
                fisher[n] += (g[n].float() ** 2).sum(0)
    return {n: f / B for n, f in fisher.items()}


@dataclass
class EWC:
    """The EWC penalty around an anchor theta* with diagonal Fisher F."""

    fisher: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]
    lam: float

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """(lambda / 2) * sum F (theta - theta*)^2 over the anchored parameters (0 at the anchor)."""
        total = None
        for n, p in model.named_parameters():  # model order: the sum is the same after a checkpoint reload
            f = self.fisher.get(n)
            if f is None:
                continue
            term = (f * (p.float() - self.anchor[n]) ** 2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * self.lam * total

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict for a safetensors checkpoint."""
        out = {f"fisher.{n}": f for n, f in self.fisher.items()}
        out.update({f"anchor.{n}": a for n, a in self.anchor.items()})
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], lam: float) -> "EWC":
        fisher = {k[len("fisher."):]: v for k, v in t.items() if k.startswith("fisher.")}
        anchor = {k[len("anchor."):]: v for k, v in t.items() if k.startswith("anchor.")}
        return cls(fisher, anchor, lam)


def build_ewc(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lam: float,
    new_elements: dict[str, torch.Tensor] | None = None,
    fisher: Literal["empirical", "true"] = "empirical",
    generator: torch.Generator | None = None,
    chunk: int = 4,
) -> EWC:
    """EWC anchored at the model's current parameters. `new_elements[name]` is a bool mask of elements
    created by the latest growth event: their Fisher is zero. `fisher="true"` samples the labels."""
    if fisher == "true":
        y = sample_labels(model, x, generator)
    elif fisher != "empirical":
        raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
    F_ = per_sample_fisher(model, x, y, chunk=chunk)
    if new_elements:
        for n, mask in new_elements.items():
            if n in F_:
                F_[n] = F_[n].masked_fill(mask.to(F_[n].device), 0.0)
    params = dict(model.named_parameters())
    anchor = {n: params[n].detach().float().clone() for n in F_}
    return EWC(F_, anchor, lam)
