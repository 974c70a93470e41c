"""Width growth (Net2Net, Chen et al. 2016; HyperCloning, Samragh et al. 2024; staged training, Shen et al. 2022).

Hidden size, query heads / KV groups at fixed head_dim, head_dim (learned positions), FFN size, in any
combination (`factor=n` multiplies hidden size, heads, KV heads and FFN size).

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
* Symmetry breaking: clones of a unit have equal values and, with equal inputs, equal gradients forever
  (Net2Net section 2.2 adds noise for this reason). Consumer columns of cloned units get noise that sums to
  zero over each unit's clones (`noise` x std of the weight): the clones' inputs are equal, so the output
  is unchanged up to float rounding while their gradients now differ. On by default (`noise=0.01`).

Per element, a growth is p' = alpha * p[src], and (without noise) its gradient at growth time is
g' = beta * g[src]; growlm.growth.core explains how alpha becomes the update multiplier and beta the
optimizer-moment scale. Here:
- cloned producer elements (gradient / n): alpha = 1, beta = 1/n;
- consumer columns (value / n): alpha = 1/n, beta = 1;
- norm gains after padding: alpha = sqrt(kappa), beta = 1 / (n sqrt(kappa)); q rows after head_dim growth:
  alpha = c = sqrt(hd'/hd) / n_hd, beta = 1 / (m c) (a value rescaled by c has its gradient divided by c).

Every rule acts along one axis, so alpha, beta and the generation tags are kept per axis (one vector per
dimension, growlm.growth.factored), never one number per weight element. Duplicates (clone copies 2..n)
and fresh units are new along their axis, and an element is new when it is new along any axis. Fresh
elements (pads, zero-init FFN units) have beta = 0 (no source moments). Their update multiplier is 1 along
their fresh axis times the other axis' factor: a fresh pad row of q in a doubled model moves at 1/2 of the
learning rate along its cloned columns, exactly like its neighbours; only freshly initialised pad elements
of non-multiple widths are affected (a full-size alpha would give them exactly 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from growlm.errors import GrowlmError
from growlm.growth.factored import Factored
from growlm.growth.spec import GrowthSpec, ParamMap, Step
from growlm.models.config import ModelConfig
from growlm.models.model import GPT


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


def grow_width(model: GPT, spec: GrowthSpec, gen: torch.Generator) -> Step:
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
    # KV clones serve each old query head equally often only when (H'/H) is a multiple of (K'/K)
    grads_exact = Hn % H == 0 and (Hn // H) % (Kn // K) == 0
    tied = cfg.tie_embeddings
    std = cfg.init_std
    values, pmap, alphas, new_axes = {}, {}, {}, {}
    for name, p in model.named_parameters():
        p = p.detach()
        axes = _width_axes(name, tied)
        base = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        is_norm = base.startswith(("norm_1", "norm_2", "norm_f"))
        # constant parts of alpha and beta; both rules act on parameters whose dim 0 grows (q rows, norm units)
        c_alpha = c_beta = 1.0
        if base in ("attn.q.weight", "attn.q.bias") and hdn != hd:
            c_alpha, c_beta = q_scale, 1 / q_scale  # keeps q.k / sqrt(head_dim); a rescaled value has a rescaled gradient
        if is_norm and pad and name.endswith("weight"):
            c_alpha, c_beta = math.sqrt(kappa), 1 / math.sqrt(kappa)  # RMS / std of the padded vector is sqrt(kappa) x smaller
        wd = torch.promote_types(p.dtype, torch.float32)  # float64 stays float64
        idx, fresh_zero, fresh_rand, fresh_mean = [], [], [], []
        a_vecs, b_vecs, new_vecs = [], [], []  # (dim, per-axis vector)
        val = p
        for dim, ax in enumerate(axes):
            if ax is None:
                idx.append(None)
                continue
            sp = spaces[ax[0]]
            role = ax[1]
            idx.append(sp.src)
            val = val.index_select(dim, sp.src.clamp(min=0).to(p.device))
            inv = 1.0 / sp.mult
            one = torch.ones_like(inv)
            a = (inv if role == "in" else one) * (c_alpha if dim == 0 else 1.0)
            b = (inv if role == "out" else one) * (c_beta if dim == 0 else 1.0)
            a_vecs.append((dim, a))
            b_vecs.append((dim, b))
            shape = [1] * p.ndim
            shape[dim] = -1
            init = sp.fresh_in if role == "in" else sp.fresh_out
            {"zero": fresh_zero, "random": fresh_rand, "mean": fresh_mean}[init].append(sp.fresh.view(shape))
            new_vecs.append((dim, sp.dup | sp.fresh))
        new_shape = val.shape
        # the old elements' values: alpha x the source element (broadcast, not expanded)
        a_full = _prod([v.view([-1 if i == dim else 1 for i in range(p.ndim)]) for dim, v in a_vecs], p.ndim)
        val = val.to(wd) * a_full.to(val.device, wd)
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
                del noise, sums
        fz = _any(fresh_zero, p.ndim)
        fr = _any(fresh_rand, p.ndim) & ~fz
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
                del rnd
            if bool(fz.any()):
                val = torch.where(fz.to(val.device), torch.zeros((), dtype=wd, device=val.device), val)
        values[name] = val.to(p.dtype)
        del val
        # per-axis side state: beta is 0 on fresh positions (no source moments), alpha 1 along a fresh axis
        fresh_of = {dim: spaces[axes[dim][0]].fresh for dim, _ in a_vecs}
        beta = [Factored.axis(new_shape, dim, torch.where(fresh_of[dim], 0.0, v), "mul") for dim, v in b_vecs]
        pmap[name] = ParamMap(name, tuple(idx), _combine(beta, new_shape), p.dtype)
        alpha = [Factored.axis(new_shape, dim, torch.where(fresh_of[dim], 1.0, v).to(wd), "mul")
                 for dim, v in a_vecs if not bool((torch.where(fresh_of[dim], 1.0, v) == 1).all())]
        if alpha:
            alphas[name] = _combine(alpha, new_shape)
        new_axes[name] = [(dim, m) for dim, m in new_vecs if bool(m.any())]
    return Step(
        config=new_cfg, values=values, param_map=pmap, function_preserving=True, alpha=alphas, new_axes=new_axes,
        record={
            "kappa": kappa,
            "noise": spec.noise,
            # LayerNorm pads hold the mean only along the growth's own directions: gradients are not images
            "grad_images_exact": grads_exact and not (pad and cfg.norm == "layernorm"),
            "head_map": q_src.tolist(),
            "kv_head_map": kv_src.tolist(),
            "tied_head": "kept tied; norm_f divided by the hidden multiplier" if tied else "untied; lm_head columns divided",
        },
    )


def _combine(fs: list[Factored], shape) -> Factored:
    if not fs:
        return Factored.constant(shape, 1.0, "mul", torch.float64)
    out = fs[0]
    for f in fs[1:]:
        out = out.combine(f)
    return out


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
