"""The optimizer and the one update rule: AdamW, its schedule, its state across growth, per-element multipliers.

AdamW (Loshchilov & Hutter 2019, Algorithm 2) with decoupled weight decay on matrices (>= 2-D) only;
norm gains, biases and nothing else are decay-free. The learning rate warms up linearly and then follows
a cosine or linear decay to `min_lr` (or stays constant): `lr_at`; after a growth event `rewarm_factor`
can ramp it up again (growth.lr_rewarm_steps).

Per-element learning rates. One AdamW step moves a parameter by

    p_after - p_before = -lr * ( m_hat / (sqrt(v_hat) + eps) + wd * p_before )

which is linear in lr, weight decay included. Scaling an element's update by m is therefore exactly a
per-element learning rate m * lr, and it is what `multiplied_step` applies after `optimizer.step()`:

    p = p_before + m * (p_after - p_before)        (torch.lerp: exact at m = 0 and m = 1)

Multiplying the update rather than the gradient matters because Adam normalises the gradient's scale
away (m_hat / sqrt(v_hat) is invariant to a constant factor on g), so a scaled gradient would not
change the step. The multiplier m of an element is the product of

- the policy for what was learned before the latest growth event (generation g, newest G):
  'train' 1, 'freeze' [g >= G], 'freeze_base' [g >= 1], 'decay' gen_lr_mult ** (G - g);
- the growth operator's own update scale (growlm.growth: value-divided width clones train at 1/n);
- a linear warm-up of the newest elements (g >= G) over `new_warmup_steps` after an event.

Generations and update scales are kept in factored form (`growlm.growth.factored.Factored`: per-axis
vectors, op max for generations and mul for scales) and broadcast only when applied. Each policy factor
above is a non-decreasing function h of g, so h(max(g_1, g_2)) = max(h(g_1), h(g_2)): the policy is
applied to each generation factor and the factored form is kept. A parameter whose multiplier is 0
everywhere is given requires_grad=False (`freeze_zero_update`), so it costs no gradient and no state.

AdamW state across growth (`transfer_adamw_state`): per element a growth is p' = alpha p[src] and, at
growth time, its gradient is g' = beta g[src]. The new moments are exp_avg' = beta exp_avg[src] and
exp_avg_sq' = beta^2 exp_avg_sq[src], so Adam's direction m / sqrt(v) is the old one (up to eps);
elements with no source start at zero and the step count carries on. With update scale alpha applied,
the grown model's step is the image of the un-grown model's step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from growlm.errors import GrowlmError
from growlm.growth import GrowthResult
from growlm.growth.factored import Factored
from growlm.models.model import GPT
from growlm.train.config import GrowthConfig, OptimConfig

Multiplier = float | torch.Tensor | Factored
"""A per-element update multiplier: a float when uniform, else a tensor broadcastable to the parameter."""


# -- AdamW and its schedule -----------------------------------------------------------------------------
def build_optimizer(model: GPT, o: OptimConfig, extra: torch.nn.Module | None = None) -> torch.optim.AdamW:
    """Fused AdamW over the trainable parameters of `model` (and of `extra`: a distillation objective's
    projectors): weight decay on >= 2-D tensors, none on norms and biases."""
    decay, no_decay = [], []
    params = list(model.parameters()) + (list(extra.parameters()) if extra is not None else [])
    for p in params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise GrowlmError("no trainable parameters (everything is frozen)")
    # fused: one kernel for all tensors (4x faster than the per-tensor loop on SmolLM2, bench/train_throughput.py)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)


def lr_at(step: int, o: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.decay == "constant":
        return o.lr
    span = max(1, max_steps - o.warmup_steps)
    frac = min(1.0, (step - o.warmup_steps) / span)  # peak right after warmup, min_lr just after the last step
    if o.decay == "linear":
        return o.min_lr + (o.lr - o.min_lr) * (1 - frac)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * frac))


def rewarm_factor(steps_since_growth: int, generation: int, k: int) -> float:
    """The learning-rate re-warm after the latest growth event: (s + 1) / k at the k optimizer steps s = 0..k-1
    after it (s = steps since the event), 1 before any event, after the ramp and with k = 0.

    It multiplies the scheduled rate of every trainable parameter (the rate `lr_at` gives), so after each
    expansion the optimizer restarts from small steps as a fresh run's warm-up would: the re-warm that
    progressive-training schedules (several small expansions, Deep Progressive Training, Bu 2025) are run
    with or without, and that continued pretraining applies when the data changes (Ibrahim et al. 2024,
    "Simple and scalable strategies to continually pre-train large language models"). A later event
    restarts the ramp; unlike growth.new_warmup_steps it acts on old and new elements alike."""
    if generation == 0 or k == 0 or steps_since_growth >= k:
        return 1.0
    return (steps_since_growth + 1) / k


# -- per-element multipliers ----------------------------------------------------------------------------
def generation_multiplier(g: int, G: int, growth: GrowthConfig) -> float:
    """The policy factor of an element of generation g when the newest generation is G (non-decreasing in g)."""
    if G == 0 or growth.old_params == "train":
        return 1.0
    if growth.old_params == "freeze":
        return float(g >= G)
    if growth.old_params == "freeze_base":
        return float(g >= 1)
    return growth.gen_lr_mult ** (G - g)


def update_multipliers(
    model: GPT,
    generations: Mapping[str, Factored],
    update_scale: Mapping[str, Factored],
    generation: int,
    growth: GrowthConfig,
    steps_since_growth: int,
) -> dict[str, float | torch.Tensor]:
    """The multiplier of every parameter: a float when uniform, else a tensor broadcastable to it (not
    expanded). `generations` absent for a name means generation 0; `update_scale` absent means 1."""
    G = generation
    warming = G > 0 and growth.new_warmup_steps > 0 and steps_since_growth < growth.new_warmup_steps
    frac = min(1.0, (steps_since_growth + 1) / growth.new_warmup_steps) if warming else 1.0
    out: dict[str, float | torch.Tensor] = {}
    for n, p in model.named_parameters():
        gen, scale = generations.get(n), update_scale.get(n)
        if (gen is None or gen.is_constant()) and scale is None:
            gi = 0 if gen is None else int(_const(gen))
            m = generation_multiplier(gi, G, growth)
            out[n] = m * frac if warming and gi >= G else m
            continue
        if gen is None or gen.is_constant():
            gi = 0 if gen is None else int(_const(gen))
            w = torch.full((), generation_multiplier(gi, G, growth), dtype=p.dtype, device=p.device)
            new = torch.tensor(gi >= G, device=p.device)
        else:  # h applied to each factor (h non-decreasing: h(max) = max(h)); the new-element mask likewise
            table = torch.tensor([generation_multiplier(g, G, growth) for g in range(G + 1)], dtype=p.dtype)
            w = broadcast(Factored(gen.shape, "max", [table[f.long()] for f in gen.factors]), p.dtype, p.device)
            new = broadcast(Factored(gen.shape, "max", [(f >= G).to(torch.uint8) for f in gen.factors]), None, p.device).bool()
        if scale is not None:
            w = w * broadcast(scale, p.dtype, p.device)
        if warming:
            w = torch.where(new, w * frac, w)
        if bool((w == 1).all()):
            out[n] = 1.0
        elif bool((w == 0).all()):
            out[n] = 0.0
        else:
            out[n] = w
    return out


def freeze_zero_update(model: GPT, multipliers: Mapping[str, Multiplier]) -> None:
    """requires_grad=False exactly for the parameters whose multiplier is 0 everywhere (nothing to compute
    or store for them); every other parameter trains."""
    for n, p in model.named_parameters():
        m = multipliers.get(n, 1.0)
        p.requires_grad_(not (isinstance(m, float) and m == 0.0))


def multiplied_step(optimizer: torch.optim.Optimizer, model: GPT, multipliers: Mapping[str, Multiplier]) -> None:
    """`optimizer.step()`, then p = p_before + m * (p_after - p_before) for every trainable parameter whose
    multiplier m is not 1 (absent names: 1). Exact at m = 0 and m = 1 (torch.lerp)."""
    scaled: dict[str, tuple[torch.Tensor, float | torch.Tensor]] = {}
    for n, p in model.named_parameters():
        m = multipliers.get(n, 1.0)
        if isinstance(m, Factored):
            m = broadcast(m, p.dtype, p.device)
        if p.requires_grad and not (isinstance(m, float) and m == 1.0):
            scaled[n] = (p, m)
    before = {n: p.detach().clone() for n, (p, _) in scaled.items()}
    optimizer.step()
    with torch.no_grad():
        for n, (p, m) in scaled.items():
            w = torch.full_like(p, m) if isinstance(m, float) else m.to(device=p.device, dtype=p.dtype)
            p.copy_(torch.lerp(before[n], p, w))


def broadcast(f: Factored, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """The value of `f` as op over its factors, broadcast but not expanded (a tensor broadcastable to f.shape:
    per-axis factors stay vectors when there is one, a constant stays one element)."""
    out = None
    for t in f.factors:
        t = t.to(device=device, dtype=dtype or t.dtype)
        out = t if out is None else (out * t if f.op == "mul" else torch.maximum(out, t))
    return out


def _const(f: Factored) -> float:
    """The value of a constant Factored without materialising its shape."""
    return float(broadcast(f).reshape(-1)[0])


# -- AdamW state across a growth event --------------------------------------------------------------------
@torch.no_grad()
def transfer_adamw_state(old_model: GPT, old_opt: torch.optim.Optimizer, result: GrowthResult,
                         new_opt: torch.optim.Optimizer) -> None:
    """Fill `new_opt.state` (an AdamW/Adam over `result.model`'s parameters) from `old_opt.state`.

    Old elements keep their moments (scaled by beta, see the module docstring), new elements start at
    zero, and every parameter's step count is the old one (the largest old step for new parameters).
    """
    old_params = dict(old_model.named_parameters())
    new_params = dict(result.model.named_parameters())
    group_of = {id(p): g for g in new_opt.param_groups for p in g["params"]}
    steps = [s["step"] for s in old_opt.state.values() if "step" in s]
    if not steps:
        return  # the old optimizer never stepped: nothing to carry
    max_step = max(steps, key=lambda s: float(s))
    for name, p in new_params.items():
        if id(p) not in group_of:
            continue
        pm = result.param_map.get(name)
        old_state = old_opt.state.get(old_params[pm.source]) if pm is not None and pm.source else None
        step = (old_state["step"] if old_state and "step" in old_state else max_step)
        st: dict[str, Any] = {"step": step.clone() if torch.is_tensor(step) else step}
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if old_state is None or key not in old_state:
                if key != "max_exp_avg_sq" or group_of[id(p)].get("amsgrad", False):
                    st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                continue
            m = _gather(old_state[key], pm.index, fill=0.0)
            if pm.grad_scale is not None:
                b = pm.grad_scale.to(m.device, m.dtype)
                m = m * (b * b if key != "exp_avg" else b)
            st[key] = m.to(p.dtype).contiguous()
        new_opt.state[p] = st


def _gather(t: torch.Tensor, index: tuple[torch.Tensor | None, ...], fill: float) -> torch.Tensor:
    """t re-indexed along every dimension with an index map; elements with any -1 index get `fill`."""
    out = t
    fresh = None
    for dim, ix in enumerate(index):
        if ix is None:
            continue
        ix = ix.to(t.device)
        out = out.index_select(dim, ix.clamp(min=0))
        shape = [1] * t.ndim
        shape[dim] = -1
        f = (ix < 0).view(shape)
        fresh = f if fresh is None else (fresh | f)
    if fresh is not None and bool(fresh.any()):
        out = torch.where(fresh.expand(out.shape), torch.full((), fill, dtype=out.dtype, device=out.device), out)
    return out.clone() if out is t else out
