"""The output head and next-token cross-entropy, a chunk of tokens at a time.

For hidden states h (N, C), head weight W (V, C) and targets y (N,), the plain path builds the logits
Z = h W^T (N, V) and, for the backward, dL/dZ (N, V) as well: 2 x 4 N V bytes in float32 (400 MB for
SmolLM2's 49,152-token head on 8 x 128 tokens). `chunked_cross_entropy` never holds more than one chunk
of rows. Per chunk of n rows:

    z = h_c W^T                        (n, V)
    log p = log_softmax(z)             l_i = -log p_{i, y_i}           (0 where y_i = ignore_index)
    G = softmax(z) - onehot(y)         dl_i/dz_i, formed in place from log p
    dh_c = diag(s) G W                 dW += G^T diag(s) h_c           s = 1/N_valid (mean), 1 (sum), 0 if ignored

The gradients are formed in the forward, while z is at hand, and scaled by the incoming gradient in the
backward: recomputing z in the backward would cost one more N x V x C matmul, a third of the head's
training cost (the fused linear cross-entropy of Liger-Kernel, Hsu et al. 2024, does the same). They are
formed only for the inputs that require a gradient (a frozen head gets no dW) and only when autograd is
on, so evaluation costs the forward alone. `reduction="none"` gives per-token losses whose gradient is
formed in the backward instead (the incoming gradient is then a vector), recomputing each chunk's logits.

Under autocast (bf16) the matmuls run in the autocast dtype as `F.linear` would, the logits, log-sum-exp
and loss in float32 (or float64 for float64 inputs), and dW is accumulated in float32 over chunks.

`chunked_head_terms` is the same pattern for any loss that is a sum over rows of a function of each row's
logits (the distillation objectives of `growlm.distill.objectives`, where G is not softmax - onehot): the
caller's `row_terms(z, s, e)` gives the terms of rows s:e from their logits z, and G = d(sum_k w_k term_k)/dz
is taken by autograd on that (n, V) chunk alone, then multiplied into dh and dW as above.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
                          ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight.T` against `targets`, `chunk_size` rows at a time.

    hidden: (N, C) or (..., C); weight: (V, C) (a tied head passes the embedding matrix: its gradient flows
    into it); targets: (N,) or (...) ids, `ignore_index` rows count neither in the loss nor in the mean.
    chunk_size <= 0 is the plain path `F.cross_entropy(F.linear(hidden, weight), targets)`. Equal to it in
    value and gradients up to float rounding (the chunked sums run in another order).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if chunk_size <= 0:
        logits = F.linear(h, weight)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, t, ignore_index=ignore_index, reduction=reduction)
    dev = h.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and h.dtype != torch.float64 else None
    grad = torch.is_grad_enabled()  # under no_grad a Function's needs_input_grad still says True
    return _ChunkedCrossEntropy.apply(h, weight, t, int(chunk_size), ignore_index, reduction, cdt, grad)


def _grad_logits(logp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """softmax(z) - onehot(t) from log-probabilities, in place: one pass over (n, V)."""
    g = logp.exp_()
    g[torch.arange(g.shape[0], device=g.device), t] -= 1
    return g


def _accumulate(g: torch.Tensor, h_c: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None,
                grad_h: torch.Tensor | None, grad_w: torch.Tensor | None, s: int, e: int) -> None:
    """grad_h[s:e] = diag(scale) G W and grad_w += G^T diag(scale) h_c. The per-row scale (1/N_valid, 0 on ignored
    rows, or the incoming gradient; None = 1) multiplies the (n, C) operands, not the (n, V) G. Written in place
    where the dtypes allow: no (V, C) temporary per chunk."""
    sc = None if scale is None else scale[:, None]
    if grad_h is not None:
        if grad_h.dtype == g.dtype:
            torch.mm(g, w, out=grad_h[s:e])
            if sc is not None:
                grad_h[s:e] *= sc.to(grad_h.dtype)
        else:
            grad_h[s:e] = (g @ w).to(grad_h.dtype) * (1 if sc is None else sc.to(grad_h.dtype))
    if grad_w is not None:
        hs = h_c if sc is None else h_c * sc.to(h_c.dtype)
        if grad_w.dtype == g.dtype:
            grad_w.addmm_(g.t(), hs)
        else:
            grad_w += (g.t() @ hs).to(grad_w.dtype)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, ignore_index, reduction, cdt, grad):
        dev = hidden.device.type
        need_h, need_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        eager = (need_h or need_w) and reduction != "none"  # gradients formed now, scaled in the backward
        with torch.autocast(dev, enabled=False):
            h = hidden if cdt is None else hidden.to(cdt)
            w = weight if cdt is None else weight.to(cdt)
            ldt = torch.promote_types(h.dtype, torch.float32)  # loss dtype: float32, float64 stays
            N = h.shape[0]
            valid = targets != ignore_index
            tgt = torch.where(valid, targets, torch.zeros_like(targets))
            n_valid = valid.sum()
            losses = torch.empty(N, dtype=ldt, device=h.device)
            lses = torch.empty(N, dtype=ldt, device=h.device)
            if eager:
                scale = valid.to(ldt) / n_valid.to(ldt) if reduction == "mean" else valid.to(ldt)
                grad_h = torch.empty_like(hidden) if need_h else None
                grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, ldt), device=w.device) if need_w else None
            for s in range(0, N, chunk):
                e = min(s + chunk, N)
                z = F.linear(h[s:e], w).to(ldt)  # (n, V), a fresh tensor
                t_c = tgt[s:e, None]
                z_t = z.gather(1, t_c).squeeze(1)
                logp = torch.log_softmax(z, dim=-1, out=z)  # in place: one (n, V) buffer per chunk, not two
                lp = logp.gather(1, t_c).squeeze(1)
                lses[s:e] = z_t - lp  # log-sum-exp, for the backward of 'none'
                losses[s:e] = -lp * valid[s:e]
                if eager:
                    g = _grad_logits(logp, tgt[s:e]).to(h.dtype)
                    _accumulate(g, h[s:e], w, scale[s:e], grad_h, grad_w, s, e)
        if eager:
            ctx.grads = (grad_h, grad_w)  # not save_for_backward: the backward hands these very tensors on
        elif need_h or need_w:  # reduction="none": recompute in the backward
            ctx.save_for_backward(hidden, weight, tgt, valid, lses)
        ctx.eager, ctx.chunk, ctx.cdt, ctx.w_dtype = eager, chunk, cdt, weight.dtype
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / n_valid.to(ldt) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.eager:  # scaled in place and handed over: no second (V, C) buffer at the start of the backward,
            # when the activations peak (it would cost as much memory as the head's weight, 113 MB on SmolLM2)
            if ctx.grads is None:
                raise RuntimeError("the chunked cross-entropy's gradients were used by an earlier backward")
            (grad_h, grad_w), ctx.grads = ctx.grads, None
            gh = None if grad_h is None else grad_h.mul_(grad_out.to(grad_h.dtype))
            gw = None if grad_w is None else grad_w.mul_(grad_out.to(grad_w.dtype)).to(ctx.w_dtype)
            return gh, gw, None, None, None, None, None, None
        hidden, weight, tgt, valid, lses = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdt = ctx.cdt
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden if cdt is None else hidden.to(cdt)
            w = weight if cdt is None else weight.to(cdt)
            scale = grad_out.to(lses.dtype) * valid
            gh = torch.empty_like(hidden) if need_h else None
            gw = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, lses.dtype), device=w.device) if need_w else None
            for s in range(0, h.shape[0], ctx.chunk):
                e = min(s + ctx.chunk, h.shape[0])
                logp = F.linear(h[s:e], w).to(lses.dtype).sub_(lses[s:e, None])
                g = _grad_logits(logp, tgt[s:e]).to(h.dtype)
                _accumulate(g, h[s:e], w, scale[s:e], gh, gw, s, e)
        return gh, None if gw is None else gw.to(weight.dtype), None, None, None, None, None, None


RowTerms = Callable[[torch.Tensor, int, int], torch.Tensor]
"""row_terms(z, s, e) -> (K,): the K loss terms' contributions of rows s:e (of the flattened positions) computed
from their logits z (e - s, V), float32 (float64 for float64 inputs). Each term must be a sum over rows (a
mean divides by the global count), so that the chunks add up to the whole."""


def chunked_head_terms(hidden: torch.Tensor, weight: torch.Tensor, row_terms: RowTerms, weights: Sequence[float],
                       chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, terms): terms (K,) = the sum over chunks of `row_terms` on the logits `hidden @ weight.T`,
    total = sum_k weights[k] terms[k], differentiable w.r.t. hidden and weight; terms is detached.

    hidden (N, C) or (..., C) (flattened to rows in order), weight (V, C). Never more than `chunk_size` rows of
    logits and their gradient at once: G = d total / dz per chunk by autograd on that chunk alone, then
    dh = G W, dW += G^T h (see the module docstring). chunk_size <= 0 is the plain path: all logits at once
    through autograd, the reference it equals to float rounding. Nothing in `row_terms` may need a gradient
    other than through z (teacher tensors it reads are constants).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    if chunk_size <= 0:
        z = F.linear(h, weight)
        terms = row_terms(z.to(torch.promote_types(z.dtype, torch.float32)), 0, h.shape[0])
        w = torch.as_tensor(list(weights), dtype=terms.dtype, device=terms.device)
        return (w * terms).sum(), terms.detach()
    dev = h.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and h.dtype != torch.float64 else None
    return _ChunkedHeadTerms.apply(h, weight, row_terms, tuple(weights), int(chunk_size), cdt, torch.is_grad_enabled())


class _ChunkedHeadTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, row_terms, weights, chunk, cdt, grad):
        need_h, need_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden if cdt is None else hidden.to(cdt)
            w = weight if cdt is None else weight.to(cdt)
            ldt = torch.promote_types(h.dtype, torch.float32)
            wk = torch.tensor(weights, dtype=ldt, device=h.device)
            terms = torch.zeros(len(weights), dtype=ldt, device=h.device)
            grad_h = torch.zeros_like(hidden) if need_h else None  # rows whose terms do not depend on z stay 0
            grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, ldt), device=w.device) if need_w else None
            for s in range(0, h.shape[0], chunk):
                e = min(s + chunk, h.shape[0])
                z = F.linear(h[s:e], w).to(ldt)  # (n, V): the only logits alive
                if not (need_h or need_w):
                    terms += row_terms(z, s, e).detach()
                    continue
                with torch.enable_grad():
                    z.requires_grad_(True)
                    t = row_terms(z, s, e)
                    total = (wk * t).sum()
                    g = torch.autograd.grad(total, z, allow_unused=True)[0] if total.requires_grad else None
                terms += t.detach()
                del z
                if g is not None:
                    _accumulate(g.to(h.dtype), h[s:e], w, None, grad_h, grad_w, s, e)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        ctx.mark_non_differentiable(terms)
        return (wk * terms).sum(), terms

    @staticmethod
    def backward(ctx, grad_out, _grad_terms):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_out.to(grad_w.dtype)).to(ctx.w_dtype)
        return gh, gw, None, None, None, None, None
