"""Function-preserving growth operators: depth, width (hidden, heads, FFN), vocabulary; AdamW state transfer.

API (used by the training loop)
-------------------------------
    spec = GrowthSpec(operator="depth", n=2, where="interleave")      # or GrowthSpec.from_dict(yaml_dict)
    res = grow(model, spec, generations=None, generation=1, seed=0)   # never mutates `model`
    res.model            # the grown GPT (same dtype/device as the input)
    res.record           # JSON-serialisable: operator, config before/after, params before/after/added,
                         # function_preserving, max_abs_logit_diff (measured on random tokens), ...
    res.generations      # {param name: int32 tensor, same shape}: growth generation that created each element
    res.update_scale     # {param name: float tensor}: per-element update multipliers s (absent name: s = 1);
                         # may be broadcast (expanded) views: read-only
    res.param_map        # {new param name: ParamMap}: where each new element came from (optimizer transfer)
    grow_many(model, [spec1, spec2])                                  # several steps, generations 1, 2, ...
    transfer_adamw_state(old_model, old_opt, res, new_opt)           # fill new_opt.state from old_opt.state

The training loop applies `update_scale` after every optimizer step as
`p = p_before + s * (p_after - p_before)` (REFERENCE fact 6: AdamW's update is linear in lr, weight decay
included, so this is exactly a per-element learning rate of s * lr); `snapshot_scaled` before the step and
`apply_update_scale` after it do that. Keep applying it for the rest of training: it is the learning rate
that makes the grown model follow the un-grown one (value-divided elements are n times smaller).

Operators
---------
- ``depth`` (LLaMA-Pro, Wu et al. 2024; staged training, Shen et al. 2022): insert `n` blocks on `top`,
  `after` the given old layer indices, or `interleave`d (after layers floor((i+1) L / n) - 1, i.e. every
  L/n layers as LLaMA-Pro). A new block is a copy of the old block just below it (`init="copy"`) or freshly
  initialised (`init="random"`); its residual output projections (attn.o and mlp.down, weights and biases)
  are zeroed, so the block is the identity on the residual stream (pre-norm). Zeroing the output projections
  rather than the norm gains keeps the block trainable: o/down get gradients at once, the rest after one step
  (a zeroed norm gain would leave q/k/v/o/up/down without gradient; tests check both).
- ``stack`` (G_stack, Du et al. 2024): the same positions, blocks copied *without* zeroing (on `top` the top n
  old blocks are repeated in order, so n = L stacks the whole model as G_stack). Not function-preserving.
- ``width`` (Net2Net, Chen et al. 2016; HyperCloning, Samragh et al. 2024; staged training): hidden size,
  query heads / KV groups at fixed head_dim, head_dim (learned positions), FFN size, in any combination
  (`factor=n` multiplies hidden size, heads, KV heads and FFN size).
  * hidden d -> D = n d + r: every residual unit is cloned n times (tiled layout [x, ..., x, pad]); producers
    (wte, wpe, o, down, norm gains/biases) repeat, consumers (q, k, v, up, gate, untied lm_head) have their
    input columns divided by n. LayerNorm/RMSNorm statistics of a duplicated vector are unchanged, so exact
    for both when r = 0. The r pad units are exact too: for RMSNorm they are 0 in the residual stream
    (producer rows 0); for LayerNorm each producer's pad row is the mean of its old rows, so a pad unit
    always holds the token's mean mu (the residual stream is a sum of producer outputs and the mean is
    linear). Either way the padded vector keeps the old mean, its mean square / variance shrinks by
    kappa = n d / D, so growlm sets eps' = kappa eps and multiplies the gains by sqrt(kappa); a pad unit's
    normalised value is then exactly 0 (RMSNorm: 0; LayerNorm: mu - mu, pad bias 0), and the consumers' pad
    columns can be random. (Pad consumer columns get their first gradient after one step; with LayerNorm
    pads the old elements' gradients are no longer exact images of the old ones: `grad_images_exact`.)
  * Tied head: logits = norm_f(h) @ wte^T; wte columns repeat (they are also the input embedding), so the sum
    over D would be n times too large. growlm keeps the head tied and divides the final norm's gain (and
    LayerNorm bias) by n instead: norm_f's output feeds only the head, so this is exact.
  * heads H -> H', KV groups K -> K' at fixed head_dim (so RoPE stays valid): K' must divide H'. New KV head
    j clones old KV head j mod K; the query slots of the clones of group g cycle through g's old query heads
    (GQA-consistent: every query head still reads a clone of its own KV head), which needs every old head to
    get a slot. Multi-head attention stays multi-head (K' = H') unless n_kv_head is given. A query head
    cloned m times has its o columns divided by m; any H' >= H works (multiplicities may differ per head).
  * head_dim hd -> hd' = n hd + r (learned positions only; RoPE frequencies depend on head_dim, so growlm
    refuses it there): every head dimension is cloned n times, r pad dims have zero k rows (q.k unchanged),
    random q and v rows and zero o columns; q (weights and bias) is multiplied by sqrt(hd'/hd) / n so that
    q.k / sqrt(hd') equals the old q.k / sqrt(hd). Exact. It lets a GPT-2 grow its hidden size at a fixed
    head count (HF GPT-2 needs n_head * head_dim = n_embd).
  * FFN F -> F': unit j of the new FFN clones unit j mod F (down columns divided by the multiplicity; exact
    for any F' >= F), or with `ffn_init="zero"` keeps old units and adds fresh ones whose down columns are
    zero (up/gate rows random).
  * Symmetry breaking (REFERENCE fact 4): consumer columns of cloned units get noise that sums to zero over
    each unit's clones (`noise` x std of the weight); the clones' inputs are equal, so the output is
    unchanged up to float rounding while their gradients now differ. On by default (`noise=0.01`).
- ``vocab``: V -> V' for a nested BPE (the small tokenizer is a prefix of the big one, see
  growlm.models.tokenizer). Row t >= V of wte (and of an untied lm_head) is the mean of the rows of the old tokens
  that token t merges. Old rows are unchanged, so on old-token inputs the logits of old tokens are exactly
  unchanged; the softmax now also covers the new tokens, so the loss of old-tokenised text rises by
  log(1 + sum_new e^z / sum_old e^z) >= 0. Not function-preserving: measure the loss change (bits per byte)
  on the same text tokenised each way.

Generations: an element keeps its old tag when it is the first copy of an old element; duplicates (clone
copies 2..n), new blocks, fresh units and new vocabulary rows get `generation`.

AdamW transfer (REFERENCE fact 5). Per element, a growth is p' = alpha * p[src] and, without noise, its
gradient at growth time is g' = beta * g[src]. growlm sets exp_avg' = beta * exp_avg[src],
exp_avg_sq' = beta^2 * exp_avg_sq[src] (so Adam's direction m/sqrt(v) is the old one, up to eps), moments of
elements with no source (new blocks, fresh units, new vocab rows) are zero, and the step count carries on.
The update is then alpha times the old update when `update_scale = alpha` is applied:
- cloned producer elements (gradient / n): alpha = 1, beta = 1/n;
- consumer columns (value / n): alpha = 1/n, beta = 1 -- without the 1/n update scale Adam would move them
  n times too far relative to their size;
- norm gains after padding: alpha = sqrt(kappa), beta = 1 / (n sqrt(kappa)); q rows after head_dim growth:
  alpha = c = sqrt(hd'/hd) / n_hd, beta = 1 / (m c) (a value rescaled by c has its gradient divided by c).
Because s scales weight decay as well, a grown model with weight decay on consumer columns decays them at
s * lr * wd (the un-grown model decays at lr * wd); with wd = 0 on those elements the grown model follows
the un-grown trajectory up to Adam's eps.
Elements with zero moments and a carried step count take a first step of about (1 - beta1) / sqrt(1 - beta2)
times lr (3.2 lr for the default betas): schedule a short warmup after growth if that matters.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from growlm.models.config import ModelConfig, check_keys
from growlm.errors import GrowlmError
from growlm.models.model import GPT
from growlm.models.tokenizer import merge_sources

Operator = Literal["depth", "stack", "width", "vocab"]
OPERATORS = ("depth", "stack", "width", "vocab")
WHERE = ("top", "after", "interleave")


@dataclass
class GrowthSpec:
    """One growth step: an operator and its arguments (parseable from YAML/CLI with `from_dict`)."""

    operator: Operator = "depth"
    """'depth' (identity blocks), 'stack' (G_stack copies, not exact), 'width' (hidden/heads/FFN), 'vocab'."""
    n: int = 1
    """depth/stack: number of new blocks."""
    where: str = "interleave"
    """depth/stack: 'top' (append), 'after' (after each index in `layers`), 'interleave' (every L/n layers)."""
    layers: list[int] | None = None
    """depth/stack with where='after': old layer indices; one new block after each entry (repeats allowed)."""
    init: str = "copy"
    """depth: new block is a 'copy' of the old block below it, or 'random'; o/down are zeroed either way."""
    factor: int | None = None
    """width: multiply n_embd, n_head, n_kv_head and ffn_size by this integer (HyperCloning style)."""
    n_embd: int | None = None
    """width: new hidden size (None: unchanged, or from `factor`)."""
    n_head: int | None = None
    """width: new number of query heads (head_dim fixed). None: unchanged, or n_embd / head_dim when the
    attention width equals the hidden size and n_embd grows."""
    n_kv_head: int | None = None
    """width: new number of KV heads; must be a multiple of the old one and divide n_head. None: unchanged,
    or scaled with n_head when n_head is derived from n_embd."""
    ffn_size: int | None = None
    """width: new FFN hidden size."""
    head_dim: int | None = None
    """width: new head size (learned positions only: RoPE frequencies depend on head_dim). None: unchanged."""
    ffn_init: str = "clone"
    """width: new FFN units 'clone' old ones (exact, all trainable) or are 'zero' (fresh, down columns zero)."""
    noise: float = 0.01
    """width: symmetry-breaking noise in cancelling pairs, relative to each weight's std (0 disables)."""
    vocab_size: int | None = None
    """vocab: new vocabulary size."""
    vocab_sources: list[list[int]] | None = None
    """vocab: for each new token id V..V'-1, the old token ids it merges (see growlm.models.tokenizer.merge_sources)."""
    tokenizer: str | None = None
    """vocab: directory of the bigger nested tokenizer; `vocab_sources` is derived from it when not given."""

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise GrowlmError(f"unknown growth operator {self.operator!r}; choose one of: {', '.join(OPERATORS)}")
        if self.operator in ("depth", "stack"):
            if self.where not in WHERE:
                raise GrowlmError(f"unknown position where={self.where!r}; choose one of: {', '.join(WHERE)}")
            if self.where == "after":
                if not self.layers:
                    raise GrowlmError("where='after' needs layers=[i, ...] (old layer indices to insert after)")
                self.layers = [int(i) for i in self.layers]
                self.n = len(self.layers)
            if not isinstance(self.n, int) or self.n < 1:
                raise GrowlmError(f"depth growth needs n >= 1 new blocks, got n={self.n!r}")
            if self.init not in ("copy", "random"):
                raise GrowlmError(f"init must be 'copy' or 'random', got {self.init!r}")
        if self.ffn_init not in ("clone", "zero"):
            raise GrowlmError(f"ffn_init must be 'clone' or 'zero', got {self.ffn_init!r}")
        if self.noise < 0:
            raise GrowlmError(f"noise must be >= 0, got {self.noise}")
        if self.factor is not None and (not isinstance(self.factor, int) or self.factor < 1):
            raise GrowlmError(f"width factor must be a positive integer, got {self.factor!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GrowthSpec":
        check_keys(cls, d, "growth spec keys")
        return cls(**d)


@dataclass
class ParamMap:
    """Where the elements of one new parameter come from.

    `source` is the old parameter's name (None: a new parameter, optimizer moments start at zero). `index`
    has one entry per dimension: None (identity) or a LongTensor new index -> old index, -1 for fresh
    elements (zero moments). `grad_scale` (beta) maps old moments: m' = beta m[src], v' = beta^2 v[src].
    """

    source: str | None
    index: tuple[torch.Tensor | None, ...] = ()
    grad_scale: torch.Tensor | None = None


@dataclass
class GrowthResult:
    model: GPT
    record: dict[str, Any]
    generations: dict[str, torch.Tensor]
    update_scale: dict[str, torch.Tensor] = field(default_factory=dict)
    param_map: dict[str, ParamMap] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------
def grow(
    model: GPT,
    spec: GrowthSpec,
    generations: dict[str, torch.Tensor] | None = None,
    generation: int = 1,
    seed: int = 0,
    update_scale: dict[str, torch.Tensor] | None = None,
) -> GrowthResult:
    """Grow `model` as `spec` says; the input model is not modified.

    `generations` are the input model's tags (default: all 0); `generation` tags the new elements.
    `update_scale` are the input model's multipliers from earlier growth (default: all 1); they compose.
    Random choices (noise, random init) come from `seed` only; the global RNG is left untouched.
    """
    if isinstance(spec, dict):
        spec = GrowthSpec.from_dict(spec)
    old_sd = {k: v.detach() for k, v in model.named_parameters()}
    gens = {k: (generations[k] if generations and k in generations else torch.zeros(v.shape, dtype=torch.int32, device=v.device))
            for k, v in old_sd.items()}
    scales = dict(update_scale or {})
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        if spec.operator in ("depth", "stack"):
            new_cfg, values, pmap, extra = _grow_depth(model, spec)
        elif spec.operator == "width":
            new_cfg, values, pmap, extra = _grow_width(model, spec, gen)
        else:
            new_cfg, values, pmap, extra = _grow_vocab(model, spec)
        new_model = _build(new_cfg, values, model)
        old_params = dict(model.named_parameters())
        for name, p in new_model.named_parameters():  # frozen stays frozen; new parameters train
            src = pmap[name].source
            p.requires_grad_(old_params[src].requires_grad if src is not None else True)

        new_gens, new_scales = {}, {}
        for name, p in new_model.named_parameters():
            pm = pmap[name]
            if pm.source is None:
                src_name = extra.get("copied_from", {}).get(name)
                new_gens[name] = torch.full(p.shape, generation, dtype=torch.int32, device=p.device)
                if src_name is not None and src_name in scales:
                    new_scales[name] = scales[src_name].clone()
                continue
            g = _gather(gens[pm.source], pm.index, fill=generation)
            dup = extra.get("dup_mask", {}).get(name)
            if dup is not None:
                g = torch.where(dup.to(g.device), torch.full_like(g, generation), g)
            new_gens[name] = g
            s = scales.get(pm.source)
            alpha = extra.get("alpha", {}).get(name)
            if s is not None:
                s = _gather(s, pm.index, fill=1.0)
            if alpha is not None:
                s = alpha.to(p.device, p.dtype) if s is None else s * alpha.to(s.device, s.dtype)
            if s is not None and not bool((s == 1).all()):
                new_scales[name] = s

        diff = _logit_diff(model, new_model, old_vocab=model.config.vocab_size, seed=seed)
    before, after = model.num_params(), new_model.num_params()
    record = {
        "operator": spec.operator,
        "spec": spec.to_dict(),
        "generation": generation,
        "seed": seed,
        "config_before": _shape(model.config),
        "config_after": _shape(new_cfg),
        "params_before": before,
        "params_after": after,
        "params_added": after - before,
        "function_preserving": extra["function_preserving"],
        "max_abs_logit_diff": diff,
        "generation_counts": {str(k): int(v) for k, v in _gen_counts(new_gens).items()},
        "update_scale": {k: [float(v.min()), float(v.max())] for k, v in new_scales.items()},  # [min, max]
        "param_sources": {k: v.source for k, v in pmap.items()},
        **extra.get("record", {}),
    }
    return GrowthResult(new_model, record, new_gens, new_scales, pmap)


def grow_many(model: GPT, specs: list[GrowthSpec], seed: int = 0) -> tuple[GPT, list[GrowthResult]]:
    """Apply several growth steps in order (generation i+1 for step i); returns the final model and results."""
    results, gens, scales = [], None, None
    for i, spec in enumerate(specs):
        res = grow(model, spec, gens, generation=i + 1, seed=seed + i, update_scale=scales)
        model, gens, scales = res.model, res.generations, res.update_scale
        results.append(res)
    return model, results


# --------------------------------------------------------------------------------------------------
# depth
# --------------------------------------------------------------------------------------------------
def depth_positions(n_layer: int, spec: GrowthSpec) -> list[int]:
    """Old layer index after which each new block goes (sorted)."""
    L = n_layer
    if spec.where == "top":
        return [L - 1] * spec.n
    if spec.where == "interleave":
        if spec.n > L:
            raise GrowlmError(f"interleave inserts at most one block per old layer: n={spec.n} > n_layer={L}; use where='top' or 'after'")
        return [(i + 1) * L // spec.n - 1 for i in range(spec.n)]
    bad = [i for i in spec.layers if not 0 <= i < L]
    if bad:
        raise GrowlmError(f"unknown position: layers {bad} are outside 0..{L - 1} (indices of the old blocks)")
    return sorted(spec.layers)


def _grow_depth(model: GPT, spec: GrowthSpec):
    cfg = model.config
    L = cfg.n_layer
    after = depth_positions(L, spec)
    order: list[tuple[str, int]] = []  # ("old", i) or ("new", source block)
    k = 0
    for i in range(L):
        order.append(("old", i))
        for _ in range(after.count(i)):
            src = i
            if spec.operator == "stack" and spec.where == "top":
                src = (L - spec.n + k) % L  # the top n blocks again, in order; n = L: G_stack's whole model
            order.append(("new", src))
            k += 1
    new_cfg = cfg.replace(n_layer=L + spec.n)
    old = {k: v.detach() for k, v in model.named_parameters()}
    values: dict[str, torch.Tensor] = {}
    pmap: dict[str, ParamMap] = {}
    copied_from: dict[str, str] = {}
    fresh = spec.operator == "depth" and spec.init == "random"
    for name, v in old.items():
        if not name.startswith("blocks."):
            values[name] = v.clone()
            pmap[name] = ParamMap(name)
    for j, (kind, i) in enumerate(order):
        for name, v in old.items():
            prefix = f"blocks.{i}."
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            new_name = f"blocks.{j}.{rest}"
            if kind == "old":
                values[new_name] = v.clone()
                pmap[new_name] = ParamMap(name)
                continue
            if fresh:  # GPT.reset_parameters' rules: biases 0, norm gains 1, weights N(0, init_std)
                if rest.endswith("bias"):
                    values[new_name] = torch.zeros_like(v)
                elif rest.startswith("norm"):
                    values[new_name] = torch.ones_like(v)
                else:
                    values[new_name] = torch.randn(v.shape, dtype=v.dtype).mul_(cfg.init_std).to(v.device)
            else:
                values[new_name] = v.clone()
                copied_from[new_name] = name
            if spec.operator == "depth" and rest in ("attn.o.weight", "attn.o.bias", "mlp.down.weight", "mlp.down.bias"):
                values[new_name].zero_()  # identity block: zero only the residual output projections (fact 1)
            pmap[new_name] = ParamMap(None)
    new_blocks = [j for j, (kind, _) in enumerate(order) if kind == "new"]
    extra = {
        "function_preserving": spec.operator == "depth",
        "copied_from": copied_from,
        "record": {"new_blocks": new_blocks, "inserted_after_old": after,
                   "block_sources": [f"{kind}:{i}" for kind, i in order]},
    }
    return new_cfg, values, pmap, extra


# --------------------------------------------------------------------------------------------------
# width
# --------------------------------------------------------------------------------------------------
@dataclass
class _Space:
    """One growable index space (residual, query rows, KV rows, FFN units)."""

    src: torch.Tensor  # (new,) long, old index or -1 (fresh)
    fresh_out: str = "zero"  # init of fresh elements along this axis when it is a producer ('out') axis
    fresh_in: str = "random"  # ... and when it is a consumer ('in') axis

    def __post_init__(self) -> None:
        s = self.src
        ok = s >= 0
        counts = torch.zeros(int(s.max().item()) + 1 if ok.any() else 1, dtype=torch.float64)
        counts.index_add_(0, s[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
        self.mult = torch.where(ok, counts[s.clamp(min=0)], torch.ones_like(counts[:1]).expand_as(s))
        self.fresh = ~ok
        first = torch.zeros_like(ok)
        seen: set[int] = set()
        for i, v in enumerate(s.tolist()):
            if v >= 0 and v not in seen:
                seen.add(v)
                first[i] = True
        self.dup = ok & ~first


def _tile(old: int, new: int) -> torch.Tensor:
    """Tiled clone map: new unit j copies old unit j mod old (first n*old), rest fresh (-1)."""
    n = new // old
    return torch.cat([torch.arange(old).repeat(n), torch.full((new - n * old,), -1, dtype=torch.long)])


def _head_rows(head_src: torch.Tensor, hd: int, dim_src: torch.Tensor) -> torch.Tensor:
    """Row map of a (heads x head_dim) projection: new (h', j') <- old (head_src[h'], dim_src[j']); -1 = fresh."""
    rows = head_src[:, None] * hd + dim_src.clamp(min=0)[None, :]
    return torch.where((dim_src < 0)[None, :], torch.full_like(rows, -1), rows).reshape(-1)


def _width_axes(name: str, tied: bool) -> list[tuple[str, str] | None]:
    """(space, role) per dimension; role 'out' = producer (values repeat), 'in' = consumer (values / n)."""
    base = name.split(".", 2)[-1] if name.startswith("blocks.") else name
    table = {
        "wte.weight": [None, ("d", "out")],
        "wpe.weight": [None, ("d", "out")],
        "lm_head.weight": [None, ("d", "in")],
        "norm_1.weight": [("d", "out")], "norm_1.bias": [("d", "out")],
        "norm_2.weight": [("d", "out")], "norm_2.bias": [("d", "out")],
        # tied head: divide the final norm by n instead of the (shared) embedding columns
        "norm_f.weight": [("d", "in" if tied else "out")], "norm_f.bias": [("d", "in" if tied else "out")],
        "attn.q.weight": [("q", "out"), ("d", "in")], "attn.q.bias": [("q", "out")],
        "attn.k.weight": [("k", "out"), ("d", "in")], "attn.k.bias": [("k", "out")],
        "attn.v.weight": [("v", "out"), ("d", "in")], "attn.v.bias": [("v", "out")],
        "attn.o.weight": [("d", "out"), ("q", "in")], "attn.o.bias": [("d", "out")],
        "mlp.gate.weight": [("f", "out"), ("d", "in")], "mlp.gate.bias": [("f", "out")],
        "mlp.up.weight": [("f", "out"), ("d", "in")], "mlp.up.bias": [("f", "out")],
        "mlp.down.weight": [("d", "out"), ("f", "in")], "mlp.down.bias": [("d", "out")],
    }
    if base not in table:
        raise GrowlmError(f"internal: no width rule for parameter {name}")
    return table[base]


def width_config(cfg: ModelConfig, spec: GrowthSpec) -> ModelConfig:
    """The grown config, with every constraint checked (GrowlmError names the one that fails)."""
    f = spec.factor
    D = spec.n_embd or (cfg.n_embd * f if f else cfg.n_embd)
    H = spec.n_head or (cfg.n_head * f if f else None)
    K = spec.n_kv_head or (cfg.n_kv_head * f if f else None)
    F = spec.ffn_size or (cfg.ffn_size * f if f else cfg.ffn_size)
    hd = spec.head_dim or cfg.head_dim
    if hd < cfg.head_dim:
        raise GrowlmError(f"cannot shrink head_dim from {cfg.head_dim} to {hd}: growth operators only grow")
    if hd != cfg.head_dim and cfg.position == "rope":
        raise GrowlmError(f"head_dim growth ({cfg.head_dim}->{hd}) is not function-preserving with RoPE (its "
                          "frequencies depend on head_dim); grow n_head at a fixed head_dim instead")
    if H is None:
        if D != cfg.n_embd and cfg.n_head * cfg.head_dim == cfg.n_embd and hd * cfg.n_head != D:
            # attention width equals the hidden size: keep it so (GPT-2 export needs it)
            if D % hd:
                raise GrowlmError(f"hidden size n_embd={D} is not divisible into heads of head_dim={hd}; "
                                  f"choose a multiple of {hd} or give n_head explicitly")
            H = D // hd
            if K is None:
                if (K_num := cfg.n_kv_head * H) % cfg.n_head:
                    raise GrowlmError(f"n_kv_head={cfg.n_kv_head} cannot be scaled with n_head {cfg.n_head}->{H}; give n_kv_head explicitly")
                K = K_num // cfg.n_head
        else:
            H = cfg.n_head
    if K is None:
        K = H if cfg.n_kv_head == cfg.n_head else cfg.n_kv_head  # multi-head attention stays multi-head
    for what, new, old in (("n_embd", D, cfg.n_embd), ("n_head", H, cfg.n_head), ("n_kv_head", K, cfg.n_kv_head),
                           ("ffn_size", F, cfg.ffn_size)):
        if new < old:
            raise GrowlmError(f"cannot shrink {what} from {old} to {new}: growth operators only grow")
    if H % K:
        raise GrowlmError(f"n_kv_head={K} KV groups must divide n_head={H} query heads")
    r, rn = cfg.n_head // cfg.n_kv_head, H // K
    copies = [sum(1 for j in range(K) if j % cfg.n_kv_head == g) for g in range(cfg.n_kv_head)]
    if min(copies) * rn < r:
        raise GrowlmError(f"n_head={H}, n_kv_head={K} cannot hold every old query head next to a clone of its KV group "
                          f"(old groups of {r} heads, new groups of {rn}); use n_kv_head a multiple of {cfg.n_kv_head} "
                          f"with n_head/n_kv_head >= {r}, or fewer KV heads")
    if (D, H, K, F, hd) == (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.ffn_size, cfg.head_dim):
        raise GrowlmError("width growth changes nothing: give factor, n_embd, n_head, n_kv_head, ffn_size or head_dim larger than now")
    kappa = (D // cfg.n_embd) * cfg.n_embd / D
    eps = cfg.norm_eps * kappa  # the padded vector's mean square (or variance) is kappa times the old one
    try:
        return cfg.replace(n_embd=D, n_head=H, n_kv_head=K, ffn_size=F, head_dim=hd, norm_eps=eps)
    except ValueError as e:
        raise GrowlmError(str(e)) from None


def _grow_width(model: GPT, spec: GrowthSpec, gen: torch.Generator):
    cfg = model.config
    new_cfg = width_config(cfg, spec)
    d, D = cfg.n_embd, new_cfg.n_embd
    hd, hdn = cfg.head_dim, new_cfg.head_dim
    hd_src = _tile(hd, hdn)  # head_dim growth: each dim cloned hdn // hd times, then zero-k pad dims
    # q.k over the cloned dims is (hdn // hd) times larger and the softmax scale 1/sqrt(hdn) smaller
    q_scale = math.sqrt(hdn / hd) / (hdn // hd)
    H, K, Hn, Kn = cfg.n_head, cfg.n_kv_head, new_cfg.n_head, new_cfg.n_kv_head
    # GQA-consistent head map: new KV head j' = c*K + g clones old KV head g; its r' query slots cycle
    # through g's old query heads (r of them).
    r, rn = H // K, Hn // Kn
    kv_src = torch.arange(Kn) % K
    q_src = torch.tensor([(j % K) * r + (s % r) for j in range(Kn) for s in range((j // K) * rn, (j // K + 1) * rn)])
    if spec.ffn_init == "clone":
        f_src = torch.arange(new_cfg.ffn_size) % cfg.ffn_size
    else:
        f_src = torch.cat([torch.arange(cfg.ffn_size), torch.full((new_cfg.ffn_size - cfg.ffn_size,), -1)])
    spaces = {
        # residual pad units: 0 (RMSNorm) or the token's mean over the old units (LayerNorm), see docstring
        "d": _Space(_tile(d, D), fresh_out="mean" if cfg.norm == "layernorm" else "zero", fresh_in="random"),
        # head_dim pad dims: q rows random, k rows zero (so q.k is unchanged), v rows random, o columns zero
        "q": _Space(_head_rows(q_src, hd, hd_src), fresh_out="random", fresh_in="zero"),
        "k": _Space(_head_rows(kv_src, hd, hd_src), fresh_out="zero"),
        "v": _Space(_head_rows(kv_src, hd, hd_src), fresh_out="random"),
        "f": _Space(f_src, fresh_out="random", fresh_in="zero"),  # fresh FFN units: down columns zero
    }
    kappa = (D // d) * d / D
    pad = D % d != 0
    exact = True
    # KV clones serve each old query head equally often only when (H'/H) is a multiple of (K'/K)
    grads_exact = Hn % H == 0 and (Hn // H) % (Kn // K) == 0
    tied = cfg.tie_embeddings
    std = cfg.init_std
    values, pmap = {}, {}
    alphas, dups = {}, {}
    for name, p in model.named_parameters():
        p = p.detach()
        axes = _width_axes(name, tied)
        idx, alpha, beta, fresh_zero, fresh_rand, fresh_mean, dup = [], [], [], [], [], [], []
        val = p
        for dim, ax in enumerate(axes):
            if ax is None:
                idx.append(None)
                continue
            sp = spaces[ax[0]]
            role = ax[1]
            idx.append(sp.src)
            val = val.index_select(dim, sp.src.clamp(min=0).to(p.device))
            shape = [1] * p.ndim
            shape[dim] = -1
            inv = (1.0 / sp.mult).view(shape)
            alpha.append(inv if role == "in" else torch.ones_like(inv))
            beta.append(inv if role == "out" else torch.ones_like(inv))
            init = sp.fresh_in if role == "in" else sp.fresh_out
            fr = sp.fresh.view(shape)
            {"zero": fresh_zero, "random": fresh_rand, "mean": fresh_mean}[init].append(fr)
            dup.append(sp.dup.view(shape))
        new_shape = val.shape
        wd = torch.promote_types(p.dtype, torch.float32)  # float64 stays float64
        # per-axis factors and masks broadcast against each other; expanded (not copied) to the full shape
        a, b = _prod(alpha, p.ndim), _prod(beta, p.ndim)
        fz = _any(fresh_zero, p.ndim)
        fr = _any(fresh_rand, p.ndim) & ~fz
        base = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        is_norm = base.startswith(("norm_1", "norm_2", "norm_f"))
        if base in ("attn.q.weight", "attn.q.bias") and hdn != hd:
            a = a * q_scale  # keeps q.k / sqrt(head_dim) unchanged
            b = b / q_scale  # a rescaled value has a rescaled gradient (q' = c q: dL/dq' = dL/dq / c)
        if is_norm and pad and name.endswith("weight"):
            a = a * math.sqrt(kappa)  # RMS / std of the padded vector is sqrt(kappa) times smaller
            b = b / math.sqrt(kappa)
        val = val.to(wd) * a.to(val.device, wd)
        # symmetry breaking: noise along consumer axes, summing to zero over each unit's clones
        if spec.noise > 0 and p.ndim >= 2:
            for dim, ax in enumerate(axes):
                if ax is None or ax[1] != "in" or bool((spaces[ax[0]].mult <= 1).all()):
                    continue
                sp = spaces[ax[0]]
                noise = torch.randn(new_shape, generator=gen, dtype=wd) * (spec.noise * float(p.float().std()))
                ok = (~sp.fresh).nonzero().squeeze(1)
                n_old = p.shape[dim]
                sums = torch.zeros([n_old if i == dim else s for i, s in enumerate(new_shape)], dtype=wd)
                sums.index_add_(dim, sp.src[ok], noise.index_select(dim, ok))
                counts_shape = [1] * p.ndim
                counts_shape[dim] = -1
                counts = torch.bincount(sp.src[ok], minlength=n_old).clamp(min=1).to(wd)
                noise -= (sums / counts.view(counts_shape)).index_select(dim, sp.src.clamp(min=0))
                val = val + noise.to(val.device)
        fm = _any(fresh_mean, p.ndim)
        fresh_any = fz | fr | fm
        if is_norm:
            if bool(fresh_any.any()):  # pad units of a norm: gain sqrt(kappa), bias 0 (their output is 0 anyway)
                fill = math.sqrt(kappa) if name.endswith("weight") else 0.0
                val = torch.where(fresh_any.to(val.device), torch.full((), fill, dtype=wd, device=val.device), val)
        else:
            if bool(fm.any()):
                # LayerNorm pad: a producer's pad row is the mean of its old rows, so pad units carry the mean
                dim = next(i for i, n in enumerate(fm.shape) if n > 1)
                first = (~spaces["d"].fresh & ~spaces["d"].dup).nonzero().squeeze(1).to(val.device)
                mean = val.index_select(dim, first).mean(dim, keepdim=True)
                val = torch.where(fm.to(val.device), mean, val)
            if bool(fr.any()):
                rnd = torch.randn(new_shape, generator=gen, dtype=wd) * std
                val = torch.where(fr.to(val.device), rnd.to(val.device), val)
            if bool(fz.any()):
                val = torch.where(fz.to(val.device), torch.zeros((), dtype=wd, device=val.device), val)
        values[name] = val.to(p.dtype)
        pmap[name] = ParamMap(name, tuple(idx), torch.where(fresh_any, 0.0, b).to(p.dtype).expand(new_shape))
        alphas[name] = torch.where(fresh_any, 1.0, a).to(p.dtype).expand(new_shape)
        dups[name] = (_any(dup, p.ndim) | fresh_any).expand(new_shape)
    extra = {
        "function_preserving": exact,
        "alpha": alphas,
        "dup_mask": dups,
        "record": {
            "kappa": kappa,
            "noise": spec.noise,
            # LayerNorm pads hold the mean only along the growth's own directions: gradients are not images
            "grad_images_exact": grads_exact and not (pad and cfg.norm == "layernorm"),
            "head_map": q_src.tolist(),
            "kv_head_map": kv_src.tolist(),
            "tied_head": "kept tied; norm_f divided by the hidden multiplier" if tied else "untied; lm_head columns divided",
        },
    }
    return new_cfg, values, pmap, extra


# --------------------------------------------------------------------------------------------------
# vocabulary
# --------------------------------------------------------------------------------------------------
def _grow_vocab(model: GPT, spec: GrowthSpec):
    cfg = model.config
    V = cfg.vocab_size
    Vn = spec.vocab_size
    sources = spec.vocab_sources
    if sources is None and spec.tokenizer is not None:

        sources = merge_sources(spec.tokenizer, V)
        Vn = Vn or V + len(sources)
    if Vn is None:
        raise GrowlmError("vocab growth needs vocab_size (or a tokenizer directory)")
    if Vn < V:
        raise GrowlmError(f"cannot shrink vocab_size from {V} to {Vn}: growth operators only grow")
    if Vn == V:
        raise GrowlmError(f"vocab growth changes nothing: vocab_size is already {V}")
    if sources is not None:
        if len(sources) != Vn - V:
            raise GrowlmError(f"vocab_sources has {len(sources)} entries but {Vn - V} new tokens (ids {V}..{Vn - 1})")
        bad = [s for s in sources if not s or any(not 0 <= t < V for t in s)]
        if bad:
            raise GrowlmError(f"vocab_sources must list old token ids in 0..{V - 1} for every new token; bad entry {bad[0]}")
    new_cfg = cfg.replace(vocab_size=Vn)
    src = torch.cat([torch.arange(V), torch.full((Vn - V,), -1)])
    values, pmap = {}, {}
    for name, p in model.named_parameters():
        p = p.detach()
        if name in ("wte.weight", "lm_head.weight"):
            if sources is None:
                new_rows = p.mean(0, keepdim=True).expand(Vn - V, -1)  # no merge information: mean embedding
            else:
                new_rows = torch.stack([p[torch.tensor(s, device=p.device)].mean(0) for s in sources])
            values[name] = torch.cat([p, new_rows.to(p.dtype)])
            pmap[name] = ParamMap(name, (src, None))
        else:
            values[name] = p.clone()
            pmap[name] = ParamMap(name)
    extra = {"function_preserving": False,
             "record": {"vocab_init": "mean of merged old tokens" if sources is not None else "mean of all old rows",
                        "old_rows_unchanged": True}}
    return new_cfg, values, pmap, extra


# --------------------------------------------------------------------------------------------------
# optimizer transfer
# --------------------------------------------------------------------------------------------------
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


def apply_update_scale(before: dict[str, torch.Tensor], model: GPT, update_scale: dict[str, torch.Tensor]) -> None:
    """p = p_before + s * (p_after - p_before) for every scaled parameter (call after optimizer.step()).

    `before` holds copies of the scaled parameters taken before the step (`snapshot_scaled(model, scale)`).
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = update_scale.get(name)
            if s is not None:
                p.copy_(before[name] + s.to(p.device, p.dtype) * (p - before[name]))


def snapshot_scaled(model: GPT, update_scale: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the parameters that `update_scale` touches (take it before optimizer.step())."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in update_scale}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
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


def _prod(vecs: list[torch.Tensor], ndim: int) -> torch.Tensor:
    """Product of per-axis factor vectors (each viewed along its axis), broadcast, not expanded."""
    out = torch.ones([1] * ndim, dtype=torch.float64)
    for v in vecs:
        out = out * v
    return out


def _any(masks: list[torch.Tensor], ndim: int) -> torch.Tensor:
    out = torch.zeros([1] * ndim, dtype=torch.bool)
    for m in masks:
        out = out | m
    return out


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
    keys = ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "ffn_size", "norm_eps", "tie_embeddings")
    return {k: getattr(cfg, k) for k in keys}


def _gen_counts(gens: dict[str, torch.Tensor]) -> dict[int, int]:
    out: dict[int, int] = {}
    for t in gens.values():
        for v, c in enumerate(torch.bincount(t.reshape(-1)).tolist()):  # bincount: no sort (unique is slow at 100M)
            if c:
                out[v] = out.get(v, 0) + c
    return dict(sorted(out.items()))
