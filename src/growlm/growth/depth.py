"""Depth growth: identity blocks (``depth``) and stacked copies (``stack``).

- ``depth`` (LLaMA-Pro, Wu et al. 2024; staged training, Shen et al. 2022): insert `n` blocks on `top`,
  `after` the given old layer indices, or `interleave`d (after layers floor((i+1) L / n) - 1, i.e. every
  L/n layers as LLaMA-Pro). A new block is a copy of the old block just below it (`init="copy"`) or freshly
  initialised (`init="random"`); its residual output projections (attn.o and mlp.down, weights and biases)
  are zeroed, so the block is the identity on the residual stream (pre-norm). Zeroing the output projections
  rather than the norm gains keeps the block trainable: o/down get gradients at once, the rest after one step
  (a zeroed norm gain would leave q/k/v/o/up/down without gradient; tests check both).
- ``stack`` (G_stack, Du et al. 2024): the same positions, blocks copied *without* zeroing (on `top` the top n
  old blocks are repeated in order, so n = L stacks the whole model as G_stack). Not function-preserving.

New blocks are new parameters (no optimizer moments to carry); every element of them gets the new
generation tag, and a copied block inherits the update multipliers of the block it copies.
"""

from __future__ import annotations

import torch

from growlm.errors import GrowlmError
from growlm.growth.spec import GrowthSpec, ParamMap, Step
from growlm.models.model import GPT

# the residual output projections of a block: zeroed, they make the block the identity
_OUTPUTS = ("attn.o.weight", "attn.o.bias", "mlp.down.weight", "mlp.down.bias")


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


def grow_depth(model: GPT, spec: GrowthSpec) -> Step:
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
        prefix = f"blocks.{i}."
        for name, v in old.items():
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
            if spec.operator == "depth" and rest in _OUTPUTS:
                values[new_name].zero_()  # identity block: zero only the residual output projections
            pmap[new_name] = ParamMap(None)
    new_blocks = [j for j, (kind, _) in enumerate(order) if kind == "new"]
    return Step(
        config=cfg.replace(n_layer=L + spec.n), values=values, param_map=pmap,
        function_preserving=spec.operator == "depth", copied_from=copied_from,
        record={"new_blocks": new_blocks, "inserted_after_old": after,
                "block_sources": [f"{kind}:{i}" for kind, i in order]},
    )
