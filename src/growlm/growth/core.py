"""`grow` and `grow_many`: run one growth operator (or several) and carry the per-element side state.

    res = grow(model, spec, generations=None, generation=1, seed=0)   # never mutates `model`
    res.model            # the grown GPT (same dtype/device as the input)
    res.record           # JSON-serialisable: operator, config before/after, params before/after/added,
                         # function_preserving, max_abs_logit_diff (measured on random tokens), ...
    res.generations      # {param name: Factored (op max, int32)}: the growth generation that created each element
    res.update_scale     # {param name: Factored (op mul)}: per-element update multipliers s (absent name: s = 1)
    res.param_map        # {new param name: ParamMap}: where each new element came from (optimizer transfer)
    grow_many(model, [spec1, spec2])                                  # several steps, generations 1, 2, ...

Side state in factored form. Both the generation tag and the update multiplier of an element are functions
of the per-axis quantities of the growth (a cloned row, a divided column, a new block), so they are kept
as `growlm.growth.factored.Factored`: a few vectors per weight, combined on demand, never one number per
weight element (1.9 GB of int32 tags and 1.7 GB of multipliers for SmolLM2-135M x2 if dense). Re-indexing
along the growth's index maps and combining with the step's own per-axis factors keeps that form:
- generation = max of the per-axis tags: an element keeps its old tag when it is the first copy of an old
  element; duplicates (clone copies 2..n), fresh units, new vocabulary rows (a new tag along their axis)
  and new blocks (a constant) get `generation`, which must exceed every earlier tag;
- update scale = product of per-axis factors: the old factors gathered along the index map (1 at fresh
  positions) times the step's alpha (growlm.growth.width).

Update scale. Per element, a growth is p' = alpha * p[src] and, without noise, its gradient at growth
time is g' = beta * g[src] (`ParamMap.grad_scale`). The training loop applies the multiplier after every
optimizer step as p = p_before + s * (p_after - p_before) with s = alpha; AdamW's update, decoupled
weight decay included, is linear in the learning rate (Loshchilov & Hutter 2019, Algorithm 2), so this is
exactly a per-element learning rate of s * lr. Keep applying it for the rest of training: it is the
learning rate that makes the grown model follow the un-grown one (value-divided elements are n times
smaller, so an unscaled Adam step would move them n times too far relative to their size).

Optimizer moments (the transfer lives in growlm.train.optim): exp_avg' = beta * exp_avg[src],
exp_avg_sq' = beta^2 * exp_avg_sq[src], so Adam's direction m / sqrt(v) is the old one up to eps (Kingma &
Ba 2015, Algorithm 1); moments of elements with no source (new blocks, fresh units, new vocab rows) are
zero, and the step count carries on. The update is then alpha times the old update. Because s scales
weight decay as well, a grown model with weight decay on consumer columns decays them at s * lr * wd
(the un-grown model decays at lr * wd); with wd = 0 on those elements the grown model follows the
un-grown trajectory up to Adam's eps. Elements with zero moments and a carried step count take a first
step of about (1 - beta1) / sqrt(1 - beta2) times lr (3.2 lr for the default betas): schedule a short
warmup after growth if that matters.
"""

from __future__ import annotations

from typing import Any

import torch

from growlm.errors import GrowlmError
from growlm.growth.depth import grow_depth
from growlm.growth.factored import Factored
from growlm.growth.spec import GrowthResult, GrowthSpec, Step
from growlm.growth.vocab import grow_vocab
from growlm.growth.width import grow_width
from growlm.models.config import ModelConfig
from growlm.models.model import GPT


def grow(
    model: GPT,
    spec: GrowthSpec,
    generations: dict[str, Factored] | None = None,
    generation: int = 1,
    seed: int = 0,
    update_scale: dict[str, Factored] | None = None,
) -> GrowthResult:
    """Grow `model` as `spec` says; the input model is not modified.

    `generations` are the input model's tags (default: all 0); `generation` tags the new elements and must
    be larger than every earlier tag. `update_scale` are the input model's multipliers from earlier growth
    (default: all 1); they compose. Random choices (noise, random init) come from `seed` only; the global
    RNG is left untouched.
    """
    if not isinstance(spec, GrowthSpec):
        raise TypeError(f"grow() takes a GrowthSpec, got {type(spec).__name__} (use GrowthSpec.from_dict for a dict)")
    for what, state in (("generations", generations), ("update_scale", update_scale)):
        bad = [k for k, v in (state or {}).items() if not isinstance(v, Factored)]
        if bad:
            raise TypeError(f"grow() takes {what} as {{name: Factored}}; {bad[0]!r} is a "
                            f"{type(state[bad[0]]).__name__} (wrap a dense tensor with Factored.from_dense)")
    old_shapes = {k: tuple(v.shape) for k, v in model.named_parameters()}
    gens = {k: (generations or {}).get(k) or Factored.constant(s, 0, "max", torch.int32) for k, s in old_shapes.items()}
    scales = dict(update_scale or {})
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        if spec.operator in ("depth", "stack"):
            step = grow_depth(model, spec)
        elif spec.operator == "width":
            step = grow_width(model, spec, gen)
        else:
            step = grow_vocab(model, spec)
        new_model = _build(step.config, step.values, model)
        step.values = {}  # the new model owns these tensors now
        old_params = dict(model.named_parameters())
        for name, p in new_model.named_parameters():  # frozen stays frozen; new parameters train
            src = step.param_map[name].source
            p.requires_grad_(old_params[src].requires_grad if src is not None else True)
        new_gens, new_scales = _side_state(new_model, step, gens, scales, generation)
        diff = _logit_diff(model, new_model, old_vocab=model.config.vocab_size, seed=seed)
    before, after = model.num_params(), new_model.num_params()
    record = {
        "operator": spec.operator,
        "spec": spec.to_dict(),
        "generation": generation,
        "seed": seed,
        "config_before": _shape(model.config),
        "config_after": _shape(step.config),
        "params_before": before,
        "params_after": after,
        "params_added": after - before,
        "function_preserving": step.function_preserving,
        "max_abs_logit_diff": diff,
        "generation_counts": {str(k): v for k, v in generation_counts(new_gens).items()},
        "update_scale": {k: list(v.extrema()) for k, v in new_scales.items()},  # [min, max]
        "param_sources": {k: v.source for k, v in step.param_map.items()},
        **step.record,
    }
    return GrowthResult(new_model, record, new_gens, new_scales, step.param_map)


def grow_many(model: GPT, specs: list[GrowthSpec], seed: int = 0, generations: dict[str, Factored] | None = None,
              update_scale: dict[str, Factored] | None = None, generation: int = 1) -> tuple[GPT, list[GrowthResult]]:
    """Apply several growth steps in order (generation `generation + i` for step i, seed `seed + i`).

    Each result's generations and update scales are the input of the next step; the last result's are the
    final model's. Returns the final model and the results (drop them to free the intermediate models)."""
    results: list[GrowthResult] = []
    gens, scales = generations, update_scale
    for i, spec in enumerate(specs):
        res = grow(model, spec, gens, generation=generation + i, seed=seed + i, update_scale=scales)
        model, gens, scales = res.model, res.generations, res.update_scale
        results.append(res)
    return model, results


def generation_counts(gens: dict[str, Factored]) -> dict[int, int]:
    """Number of weight elements per generation tag, over all parameters (from the factors)."""
    out: dict[int, int] = {}
    for f in gens.values():
        for v, c in f.counts().items():
            out[v] = out.get(v, 0) + c
    return dict(sorted(out.items()))


def _side_state(new_model: GPT, step: Step, gens: dict[str, Factored], scales: dict[str, Factored],
                generation: int) -> tuple[dict[str, Factored], dict[str, Factored]]:
    """Generations (max over per-axis tags) and update scales (product of per-axis factors) of the new model."""
    new_gens: dict[str, Factored] = {}
    new_scales: dict[str, Factored] = {}
    for name, p in new_model.named_parameters():
        shape = tuple(p.shape)
        pm = step.param_map[name]
        if pm.source is None:  # a new parameter (depth): all new; a copied block keeps its source's multipliers
            new_gens[name] = Factored.constant(shape, generation, "max", torch.int32)
            src = step.copied_from.get(name)
            if src is not None and src in scales:
                new_scales[name] = scales[src]
            continue
        g = gens[pm.source].gather(pm.index, fill=generation)  # fresh positions: the new tag
        for dim, mask in step.new_axes.get(name, []):  # duplicates (and fresh units): the new tag
            tag = torch.where(mask, generation, 0).to(torch.int32)
            g = g.combine(Factored.axis(shape, dim, tag, "max"))
        new_gens[name] = g
        s = scales[pm.source].gather(pm.index, fill=1.0) if pm.source in scales else None
        a = step.alpha.get(name)
        if a is not None:
            s = a if s is None else s.combine(a)
        if s is not None and not (s.is_constant() and s.value() == 1.0):
            new_scales[name] = s
    return new_gens, new_scales


def _build(cfg: ModelConfig, values: dict[str, torch.Tensor], like: GPT) -> GPT:
    p0 = next(like.parameters())
    with torch.device("meta"):
        new = GPT(cfg)
    names = {n for n, _ in new.named_parameters()}
    if names != set(values):
        raise GrowlmError(f"internal: grown parameters do not match the config ({sorted(names ^ set(values))[:4]})")
    new.load_state_dict({k: v.to(p0.device, p0.dtype).contiguous() for k, v in values.items()}, assign=True)
    new.train(like.training)
    return new


@torch.no_grad()
def _logit_diff(old: GPT, new: GPT, old_vocab: int, seed: int) -> float:
    """Max |logits_new - logits_old| over old-vocabulary logits on 2 x 16 random old tokens."""
    g = torch.Generator().manual_seed(seed)
    T = min(16, old.config.block_size)
    idx = torch.randint(0, old_vocab, (2, T), generator=g).to(next(old.parameters()).device)
    was = old.training, new.training
    old.eval(), new.eval()
    try:
        a, b = old(idx), new(idx)[..., :old_vocab]
    finally:
        old.train(was[0]), new.train(was[1])
    return float((a.double() - b.double()).abs().max())


def _shape(cfg: ModelConfig) -> dict[str, Any]:
    keys = ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "ffn_size", "mlp", "norm_eps", "tie_embeddings")
    return {k: getattr(cfg, k) for k in keys}
