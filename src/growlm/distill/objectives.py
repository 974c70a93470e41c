"""Distillation objectives: the one place growlm computes a loss between a student and a teacher.

Used by teacher -> student distillation and by the KD term against the pre-growth snapshot
(`growlm.train.regularize.kd_loss`). Every term takes an optional boolean `mask` (B, T) of the positions
that count (False: padding, document boundaries) and is a mean over the counted positions only; the
values at excluded positions are never read, so garbage (even NaN) there cannot leak in.

Logits (student (B, T, V_s), teacher (B, T, V) with V <= V_s: the student is restricted to the teacher's
first V ids, which keep their meaning when a vocabulary grows, and renormalised there). With
p_t = softmax(z_t / T), p_s = softmax(z_s[..., :V] / T), the per-position divergences are
    forward_kl        KL(p_t || p_s)                                   (Hinton et al. 2015)
    reverse_kl        KL(p_s || p_t)                                   (mode seeking; Gu et al. 2024, MiniLLM)
    jsd               [beta KL(p_t || m) + (1 - beta) KL(p_s || m)] / (beta (1 - beta)),
                      m = beta p_t + (1 - beta) p_s                    (Agarwal et al. 2024, GKD, eq. 1)
    skew_kl           KL(p_t || alpha p_t + (1 - alpha) p_s)           (Ko et al. 2024, DistiLLM, eq. 3)
    skew_reverse_kl   KL(p_s || alpha p_s + (1 - alpha) p_t)           (Ko et al. 2024, DistiLLM, eq. 4)
    tv                (1/2) sum_v |p_t - p_s|                          (total variation)
    mse               (1/V) sum_v (z_s - z_t)^2 on raw logits, no T    (Ba & Caruana 2014)
    soft_ce           H(p_t, p_s) = -sum_v p_t log p_s = KL(p_t || p_s) + H(p_t)
GKD's generalised JSD is divided here by beta (1 - beta), so that it is continuous in beta and its limits
are the KLs: JSD_beta = beta KL(p_t||p_s) + O(beta^2) as beta -> 0 (the second KL is O(beta^2)) and
symmetrically at 1, so the scaled value tends to forward KL at beta -> 0 and to reverse KL at beta -> 1,
which are also its values at exactly 0 and 1. This is TRL's `generalized_jsd_loss` divided by
beta (1 - beta) for 0 < beta < 1 (4x the textbook JSD at beta = 0.5) and equal to it at 0 and 1.
alpha = 0 makes the skew kinds plain forward / reverse KL.

Temperature scaling (Hinton et al. 2015, sec. 2): the gradient of a softened divergence w.r.t. the
student logits shrinks as 1/T^2 (KL family: d KL(p_t||p_s)/d z_s = (p_s - p_t)/T, and p_s - p_t itself
is O(1/T)), so those losses are multiplied by T^2 to keep their weight independent of T; at high T,
T^2 KL(p_t||p_s) -> (1/2V) sum_v (dz_v - mean dz)^2, the logit-matching limit. The factor per kind is
`TEMPERATURE_POWER`: T^2 for forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl and soft_ce; T^1 for
tv (first order in p_s - p_t, gradient O(1/T)); T^0 for mse (raw logits: the temperature is not used).

Hard next-token CE: cross-entropy of the student's full-vocabulary logits with the data's next tokens.

Hidden states (the residual stream of `GPT.forward(..., output_hidden_states=True)`): student block i
is compared with teacher block j for each pair of `layer_map`; block i's output is hidden_states[i + 1].
The student state is projected to the teacher width (identity, linear, or orthogonal: kept
(semi-)orthogonal by `torch.nn.utils.parametrizations.orthogonal`), then, if asked, both sides go through
a layer norm without affine parameters; then MSE (mean over channels of the squared difference) or
cosine (1 - cos), per position; averaged over the pairs.

Attention maps (`GPT.forward(..., attention_layers=[...])`, probabilities (B, H, T, S)): per mapped pair,
the teacher's heads are averaged in consecutive groups of H_t / H_s (one group per student head; H_t must
be a multiple of H_s), optionally restricted to chosen student heads; then KL(p_t || p_s) over keys, or the
squared error summed over keys (invariant to padding keys, where both are 0); averaged over heads,
counted query positions and pairs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from growlm.distill.targets import SparseTargets
from growlm.errors import GrowlmError
from growlm.models.config import ModelConfig
from growlm.models.head import chunked_head_terms
from growlm.models.model import ModelOutput

LogitsKind = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv", "mse", "soft_ce"]
HiddenKind = Literal["mse", "cosine"]
AttentionKind = Literal["kl", "mse"]
ProjectorKind = Literal["identity", "linear", "orthogonal"]
LayerSpec = str | list[list[int]]

LOGITS_KINDS: tuple[str, ...] = LogitsKind.__args__
TEMPERATURE_POWER: dict[str, int] = {"forward_kl": 2, "reverse_kl": 2, "jsd": 2, "skew_kl": 2, "skew_reverse_kl": 2,
                                     "soft_ce": 2, "tv": 1, "mse": 0}
"""The loss of each logits kind is (divergence of the softened distributions) * T ** TEMPERATURE_POWER[kind]."""


# -- helpers -----------------------------------------------------------------------------------------------
def _dtype(*ts: torch.Tensor) -> torch.dtype:
    """float32 for half types and float32, float64 when any input is float64."""
    d = torch.float32
    for t in ts:
        d = torch.promote_types(d, t.dtype)
    return d


def _counted(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The counted positions of x (B, T, ...) as (N, ...)."""
    if mask is None:
        return x.reshape(-1, *x.shape[2:])
    if mask.shape != x.shape[:2]:
        raise GrowlmError(f"mask of shape {tuple(mask.shape)} does not match the positions {tuple(x.shape[:2])}")
    return x[mask.bool()]


def _mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of per-position values (N,); 0 when no position counts."""
    return values.sum() / max(values.shape[0], 1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p + (1 - w) q) for 0 < w < 1, computed stably in log space."""
    return torch.logaddexp(log_p + math.log(w), log_q + math.log1p(-w))


# -- logits ------------------------------------------------------------------------------------------------
def logits_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: LogitsKind = "forward_kl",
                      temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """The per-position divergence (...,) of `kind` (see the module docstring), without the T^p factor.

    student_logits (..., V_s) and teacher_logits (..., V), V <= V_s; computed in float32 (float64 stays)."""
    v = teacher_logits.shape[-1]
    if student_logits.shape[-1] < v:
        raise GrowlmError(f"the student has {student_logits.shape[-1]} vocabulary logits, fewer than the teacher's {v}")
    if not (0 <= beta <= 1 and 0 <= alpha < 1):
        raise GrowlmError(f"beta must be in [0, 1] and alpha in [0, 1), got beta {beta}, alpha {alpha}")
    dt = _dtype(student_logits, teacher_logits)
    zs, zt = student_logits[..., :v].to(dt), teacher_logits.to(dt)
    if kind == "mse":
        return (zs - zt).pow(2).mean(-1)
    s = F.log_softmax(zs / temperature, dim=-1)
    t = F.log_softmax(zt / temperature, dim=-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0) or (kind == "skew_kl" and alpha == 0):
        return _kl(t, s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1) or (kind == "skew_reverse_kl" and alpha == 0):
        return _kl(s, t)
    if kind == "jsd":  # GKD eq. 1, divided by beta (1 - beta) so the limits are the KLs
        m = _log_mix(t, s, beta)
        return (beta * _kl(t, m) + (1 - beta) * _kl(s, m)) / (beta * (1 - beta))
    if kind == "skew_kl":  # DistiLLM: KL(p_t || alpha p_t + (1 - alpha) p_s)
        return _kl(t, _log_mix(t, s, alpha))
    if kind == "skew_reverse_kl":  # DistiLLM: KL(p_s || alpha p_s + (1 - alpha) p_t)
        return _kl(s, _log_mix(s, t, alpha))
    if kind == "tv":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    if kind == "soft_ce":
        return -(t.exp() * s).sum(-1)
    raise GrowlmError(f"unknown logits objective {kind!r} (known: {', '.join(LOGITS_KINDS)})")


def logits_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: LogitsKind = "forward_kl",
                temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """T ** TEMPERATURE_POWER[kind] * mean over counted positions of `logits_divergence`.

    student_logits (B, T, V_s), teacher_logits (B, T, V), mask (B, T) bool or None (all positions count)."""
    d = logits_divergence(_counted(student_logits, mask), _counted(teacher_logits, mask), kind, temperature, beta, alpha)
    return temperature ** TEMPERATURE_POWER[kind] * _mean(d)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hard next-token cross-entropy -log p_s(target), mean over counted positions (float32 or float64)."""
    z = _counted(logits, mask)
    return _mean(F.cross_entropy(z.to(_dtype(z)), _counted(targets, mask), reduction="none"))


# -- layer maps --------------------------------------------------------------------------------------------
def layer_map(n_student: int, n_teacher: int, spec: LayerSpec) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs, 0-based block indices.

    "last": the last blocks; "uniform": every student block i with teacher block ceil((i + 1) n_t / n_s) - 1
    (6 of 12: 0->1, 1->3, ..., 5->11, DistilBERT's every other layer); "every-K": uniform, but only student
    blocks K-1, 2K-1, ...; or explicit pairs [[s, t], ...]. A block out of range raises GrowlmError."""
    def uniform(i: int) -> int:
        return -(-(i + 1) * n_teacher // n_student) - 1

    k = check_layer_spec(spec)
    if spec == "last":
        pairs = [(n_student - 1, n_teacher - 1)]
    elif spec == "uniform":
        pairs = [(i, uniform(i)) for i in range(n_student)]
    elif k:
        if k > n_student:
            raise GrowlmError(f"layer map {spec!r}: the student has only {n_student} layers")
        pairs = [(i, uniform(i)) for i in range(k - 1, n_student, k)]
    else:
        pairs = [(p[0], p[1]) for p in spec]
    for s, t in pairs:
        if not 0 <= s < n_student:
            raise GrowlmError(f"layer map: student layer {s} does not exist (the student has layers 0..{n_student - 1})")
        if not 0 <= t < n_teacher:
            raise GrowlmError(f"layer map: teacher layer {t} does not exist (the teacher has layers 0..{n_teacher - 1})")
    return pairs


def check_layer_spec(spec: LayerSpec) -> int:
    """Raise GrowlmError unless `spec` is a layer-map spec (see `layer_map`); K for "every-K", else 0."""
    if isinstance(spec, str):
        if spec in ("last", "uniform"):
            return 0
        if m := re.fullmatch(r"every-([1-9][0-9]*)", spec):
            return int(m.group(1))
        raise GrowlmError(f"layer map {spec!r}: expected 'last', 'uniform', 'every-K' or a list of [student, teacher] pairs")
    if not isinstance(spec, (list, tuple)) or not spec:
        raise GrowlmError(f"layer map {spec!r}: expected 'last', 'uniform', 'every-K' or a non-empty list of [student, teacher] pairs")
    for p in spec:
        if not isinstance(p, (list, tuple)) or len(p) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            raise GrowlmError(f"layer map pair {p!r}: expected [student layer, teacher layer] (two integers)")
    return 0


# -- hidden states and attention ---------------------------------------------------------------------------
def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, kind: HiddenKind = "mse",
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over counted positions of the MSE over channels, or of 1 - cos, between (B, T, C) states."""
    dt = _dtype(student, teacher)
    s, t = _counted(student, mask).to(dt), _counted(teacher, mask).to(dt)
    if kind == "mse":
        return _mean((s - t).pow(2).mean(-1))
    if kind == "cosine":
        return _mean(1 - F.cosine_similarity(s, t, dim=-1))
    raise GrowlmError(f"unknown hidden-state objective {kind!r} (known: mse, cosine)")


def group_heads(probs: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(B, H, T, S) -> (B, n_groups, T, S): the mean of each run of H / n_groups consecutive heads (rows still sum to 1)."""
    B, H, T, S = probs.shape
    if H % n_groups:
        raise GrowlmError(f"attention maps: {H} teacher heads do not split into {n_groups} equal groups (one per student head)")
    return probs.view(B, n_groups, H // n_groups, T, S).mean(2)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, kind: AttentionKind = "kl",
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention maps (B, H, T, S) with the same H: KL(p_t || p_s) over keys (0 log 0 = 0), or the squared
    error summed over keys; mean over heads and counted query positions (mask (B, T))."""
    dt = _dtype(student, teacher)
    s, t = _counted(student.transpose(1, 2), mask).to(dt), _counted(teacher.transpose(1, 2), mask).to(dt)  # (N, H, S)
    if kind == "kl":
        tiny = torch.finfo(dt).tiny  # keys no query may see are 0 in both maps: their term is 0
        d = (t * (t.clamp_min(tiny).log() - s.clamp_min(tiny).log())).sum(-1)
    elif kind == "mse":
        d = (s - t).pow(2).sum(-1)
    else:
        raise GrowlmError(f"unknown attention objective {kind!r} (known: kl, mse)")
    return _mean(d.mean(-1))


def make_projector(kind: ProjectorKind, d_student: int, d_teacher: int) -> nn.Module:
    """Student width -> teacher width. identity (widths must match); linear (no bias); orthogonal: a linear
    map kept (semi-)orthogonal, W W^T = I when d_teacher <= d_student, W^T W = I otherwise. Linear and
    orthogonal start at the identity on the first min(d_s, d_t) channels."""
    if kind == "identity":
        if d_student != d_teacher:
            raise GrowlmError(f"projector 'identity' needs equal widths, but the student has {d_student} and the "
                              f"teacher {d_teacher}: use projector 'linear' or 'orthogonal'")
        return nn.Identity()
    if kind not in ("linear", "orthogonal"):
        raise GrowlmError(f"unknown projector {kind!r} (known: identity, linear, orthogonal)")
    lin = nn.Linear(d_student, d_teacher, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(d_teacher, d_student))
    # matrix_exp, not torch's default householder map for non-square weights: that map reads the
    # reflectors' diagonal as exact +-1, so weight decay (AdamW) on it silently zeroes the projector
    return orthogonal(lin, orthogonal_map="matrix_exp") if kind == "orthogonal" else lin


SPARSE_KINDS = ("forward_kl", "ce")


# -- the loss from cached teacher targets (growlm.distill.targets) ---------------------------------------------------------------------
def _student_buckets(student_logits: torch.Tensor, ids: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """log Q (B, T, k + 1): the student's log-probabilities of the cached ids and of all other tokens."""
    s = student_logits[..., :vocab_size] if vocab_size is not None else student_logits
    log_q = s.float().log_softmax(-1)  # (B, T, V)
    top = log_q.gather(-1, ids)  # (B, T, k)
    # A finite fill, not -inf: with k = V the rest is empty, and logsumexp's backward over all -inf is nan.
    rest = log_q.scatter(-1, ids, torch.finfo(torch.float32).min).logsumexp(-1, keepdim=True)
    return torch.cat([top, rest], -1)


def _teacher_buckets(logprobs: torch.Tensor, rest_logmass: torch.Tensor) -> torch.Tensor:
    """log P (B, T, k + 1), renormalised (float16 storage leaves sum p_i + r a few 1e-4 away from 1)."""
    log_p = torch.cat([logprobs.float(), rest_logmass.float().unsqueeze(-1)], -1)
    return log_p - log_p.logsumexp(-1, keepdim=True)


def sparse_kd_loss(student_logits: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor, rest_logmass: torch.Tensor,
                   temperature: float = 1.0, mask: torch.Tensor | None = None, kind: str = "forward_kl",
                   vocab_size: int | None = None) -> torch.Tensor:
    """Distillation loss from cached top-k teacher targets, mean over (masked) positions, times T^2.

    The cache knows the teacher's p_i for the top-k set S and r = p(R), R = the other V - k tokens, not
    how r splits over R. So both distributions are merged onto k + 1 outcomes (the tokens of S and one
    outcome "rest"): P = (p_i, r), Q = (q_i, q_R) with q_R = sum_{j in R} q_j (logsumexp of the student's
    other logits, never 1 - sum q_i). With T = 1:

        forward_kl:  KL(P || Q) = sum_i p_i log(p_i / q_i) + r log(r / q_R)
        ce:          -sum_i p_i log q_i - r log q_R            (= KL(P || Q) + H(P))

    Exactness and the gap. The chain rule of KL over the merge j -> (j if j in S else rest) gives

        KL(p || q) = KL(P || Q) + r * KL(p_R / r || q_R / q_R)                       (1)

    so with k = V (R empty) the loss is the dense forward KL to float rounding, and with k < V it is a lower
    bound of it (data-processing inequality) that misses gap = r * KL(pbar || qbar), pbar and qbar being the
    teacher's and student's distributions within R. `sparse_kd_gap_bound` bounds that gap by what is known.
    The gradient with respect to the student logits z_j is q_j - p_i for j in S and q_j * (1 - r / q_R) for
    j in R: mass is moved between S and R as the teacher says, and within R in proportion to the student's.

    Temperature. The cache stores T = 1 probabilities, and the teacher's tempered rest mass
    sum_{j in R} p_j^(1/T) / Z_T is not known from r. So for T != 1 both sides are merged first and
    tempered after: P_T proportional to (p_i^(1/T), r^(1/T)), likewise Q_T from (q_i, q_R); the loss is
    T^2 * KL(P_T || Q_T) (Hinton et al. 2015's T^2 keeps gradient sizes comparable across T, as
    `growlm.train.regularize.kd_loss` does). With k = V this is exactly the dense tempered loss; with k < V it
    is the tempered KL of the merged distributions (identical student and teacher still give 0), not a
    merge of the tempered dense ones, and the gap bound is stated for T = 1 only.

    Shapes: student_logits (B, T, V'), logprobs / ids (B, T, k), rest_logmass (B, T), mask (B, T) with
    True (or 1) on the positions that count. `vocab_size` drops student logits beyond the teacher's
    vocabulary (a student with a padded head), as the dense path does.
    """
    if kind not in SPARSE_KINDS:
        raise GrowlmError(f"sparse KD kind must be one of {', '.join(SPARSE_KINDS)}, got {kind!r}")
    if not temperature > 0:
        raise GrowlmError(f"temperature must be > 0, got {temperature}")
    per = sparse_divergence(_counted(student_logits, mask), _counted(logprobs, mask), _counted(ids, mask),
                            _counted(rest_logmass, mask), temperature, kind, vocab_size)
    return temperature**2 * _mean(per)


def sparse_divergence(student_logits: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor,
                      rest_logmass: torch.Tensor, temperature: float = 1.0, kind: str = "forward_kl",
                      vocab_size: int | None = None) -> torch.Tensor:
    """The per-position loss (...,) of `sparse_kd_loss`, without the T^2 factor: student_logits (..., V'),
    logprobs / ids (..., k), rest_logmass (...)."""
    log_q = _student_buckets(student_logits, ids, vocab_size)
    log_p = _teacher_buckets(logprobs, rest_logmass)
    if temperature != 1.0:  # merge, then temper (see sparse_kd_loss)
        log_q = (log_q / temperature).log_softmax(-1)
        log_p = (log_p / temperature).log_softmax(-1)
    p = log_p.exp()
    cross = (p * log_q).sum(-1)  # p = 0 where log_q may be the finite fill: 0, not nan
    if kind == "ce":
        return -cross
    return torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1) - cross


@torch.no_grad()
def sparse_kd_gap_bound(student_logits: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor,
                        rest_logmass: torch.Tensor, mask: torch.Tensor | None = None,
                        vocab_size: int | None = None) -> torch.Tensor:
    """The largest value dense forward KL - `sparse_kd_loss` (T = 1, same reduction) can take for any
    teacher consistent with the cache; 0 when k = V.

    By (1) in `sparse_kd_loss` the gap at a position is r * KL(pbar || qbar). The cache fixes r and bounds
    every pbar_j: a token of R is no likelier than the least likely cached one, so
    pbar_j <= c = min(1, p_(k) / r). KL(pbar || qbar) is convex in pbar, so over the polytope
    {pbar >= 0, sum pbar = 1, pbar_j <= c} its maximum is at a vertex: M = floor(1 / c) coordinates equal
    to c and one equal to 1 - M c; by the rearrangement inequality the large values go to the tokens the
    student finds least likely (qbar ascending, qbar_(1) <= qbar_(2) <= ...):

        gap <= r * [ sum_{m=1..M} c log(c / qbar_(m)) + (1 - M c) log((1 - M c) / qbar_(M+1)) ]

    The bound is attained by a teacher with the same cache, so nothing computed from the cache alone can be
    smaller. It is small when r is (a peaked teacher) and grows with how unlikely the student finds the
    least likely tokens; it uses the student's full logits, which the loss has anyway.
    """
    s = student_logits[..., :vocab_size] if vocab_size is not None else student_logits
    log_q = s.float().log_softmax(-1)  # (B, T, V)
    v, k = log_q.shape[-1], ids.shape[-1]
    if k >= v:
        return torch.zeros((), device=log_q.device)
    log_p = _teacher_buckets(logprobs, rest_logmass)
    log_r = log_p[..., -1]  # (B, T)
    log_qr = log_q.scatter(-1, ids, torch.finfo(torch.float32).min).logsumexp(-1)  # (B, T)
    c = (log_p[..., :-1].min(-1).values - log_r).exp().clamp(max=1.0).clamp(min=1.0 / (v - k))  # (B, T)
    m_count = torch.floor(1.0 / c + 1e-6).clamp(max=v - k)  # M per position
    rem = (1.0 - m_count * c).clamp(min=0.0)
    n_take = int(min(m_count.max().item() + 1, v - k))
    smallest = (-log_q.scatter(-1, ids, float("inf"))).topk(n_take, dim=-1).values.neg()  # (B, T, n) ascending log q
    log_qbar = smallest - log_qr.unsqueeze(-1)
    m = torch.arange(n_take, device=log_q.device)
    w = torch.where(m < m_count.unsqueeze(-1), c.unsqueeze(-1), torch.where(m == m_count.unsqueeze(-1), rem.unsqueeze(-1), 0.0))
    kl_max = torch.where(w > 0, w * (w.clamp_min(1e-38).log() - log_qbar), torch.zeros_like(w)).sum(-1)  # (B, T)
    per = torch.where(torch.isfinite(log_r), log_r.exp() * kl_max, torch.zeros_like(kl_max))
    return _mean(_counted(per, mask))


# -- the combined objective --------------------------------------------------------------------------------
@dataclass
class ObjectiveConfig:
    """Which distillation terms, and their weights: loss = ce_weight CE + kd_weight KD + hidden_weight H + attn_weight A."""

    logits: LogitsKind = "forward_kl"
    """Logits objective: forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tv, mse or soft_ce."""
    temperature: float = 1.0
    """Softmax temperature T of the logits objective; KL-family losses are scaled by T^2, tv by T."""
    beta: float = 0.5
    """jsd: mixture weight of the teacher in [0, 1]; 0 is forward KL, 1 reverse KL (GKD)."""
    alpha: float = 0.1
    """skew_kl / skew_reverse_kl: skew in [0, 1), the weight of the distribution being fitted in the mixture (DistiLLM)."""
    ce_weight: float = 1.0
    """Weight of the hard next-token cross-entropy on the data."""
    kd_weight: float = 1.0
    """Weight of the logits objective against the teacher."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state objective (0 = off)."""
    attn_weight: float = 0.0
    """Weight of the attention-map objective (0 = off)."""
    hidden_loss: HiddenKind = "mse"
    """Hidden-state objective: mse (mean over channels) or cosine (1 - cos)."""
    hidden_layers: LayerSpec = "uniform"
    """Hidden-state layer map: last, uniform, every-K, or [[student block, teacher block], ...] (0-based)."""
    hidden_norm: bool = False
    """Layer-norm (no affine) both hidden states, after the projector, before comparing them."""
    projector: ProjectorKind = "linear"
    """Student -> teacher width map per mapped layer: identity (equal widths), linear, or orthogonal."""
    attn_loss: AttentionKind = "kl"
    """Attention-map objective: kl over keys, or mse (squared error summed over keys)."""
    attn_layers: LayerSpec = "last"
    """Attention layer map: last, uniform, every-K, or [[student block, teacher block], ...] (0-based)."""
    attn_heads: list[int] | None = None
    """Student heads whose maps are compared (None = all); teacher heads are averaged in groups, one per student head."""

    def __post_init__(self) -> None:
        if self.logits not in LOGITS_KINDS:
            raise GrowlmError(f"logits objective {self.logits!r} is unknown (known: {', '.join(LOGITS_KINDS)})")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise GrowlmError(f"temperature must be a positive number, got {self.temperature}")
        if not 0 <= self.beta <= 1:
            raise GrowlmError(f"beta must be in [0, 1], got {self.beta}")
        if not 0 <= self.alpha < 1:
            raise GrowlmError(f"alpha must be in [0, 1), got {self.alpha}")
        weights = {"ce_weight": self.ce_weight, "kd_weight": self.kd_weight, "hidden_weight": self.hidden_weight,
                   "attn_weight": self.attn_weight}
        for name, w in weights.items():
            if not (math.isfinite(w) and w >= 0):
                raise GrowlmError(f"{name} must be a finite number >= 0, got {w}")
        if not any(weights.values()):
            raise GrowlmError("every objective weight is 0: set ce_weight, kd_weight, hidden_weight or attn_weight")
        for name, value, known in (("hidden_loss", self.hidden_loss, ("mse", "cosine")),
                                   ("projector", self.projector, ("identity", "linear", "orthogonal")),
                                   ("attn_loss", self.attn_loss, ("kl", "mse"))):
            if value not in known:
                raise GrowlmError(f"{name} {value!r} is unknown (known: {', '.join(known)})")
        for spec in (self.hidden_layers, self.attn_layers):
            check_layer_spec(spec)  # the syntax now; the ranges when the models are known
        if self.attn_heads is not None and (not self.attn_heads or len(set(self.attn_heads)) != len(self.attn_heads)
                                            or any(h < 0 for h in self.attn_heads)):
            raise GrowlmError(f"attn_heads must be distinct head indices >= 0, got {self.attn_heads}")


class Objective(nn.Module):
    """The weighted distillation loss of an ObjectiveConfig between a student and a teacher model config.

    Owns the trainable projectors (train them with the student). `student_attention_layers`,
    `teacher_attention_layers` and `needs_hidden_states` say what each forward must return:
        out = student(x, output_hidden_states=obj.needs_hidden_states, attention_layers=obj.student_attention_layers)
        loss, parts = obj(out, teacher_out, targets, mask)
    """

    def __init__(self, cfg: ObjectiveConfig, student: ModelConfig, teacher: ModelConfig | None = None) -> None:
        super().__init__()
        teacher = teacher or student
        self.cfg = cfg
        if cfg.kd_weight > 0 and teacher.vocab_size > student.vocab_size:
            raise GrowlmError(f"the teacher's vocabulary ({teacher.vocab_size}) is larger than the student's ({student.vocab_size})")
        self.hidden_pairs = layer_map(student.n_layer, teacher.n_layer, cfg.hidden_layers) if cfg.hidden_weight > 0 else []
        self.projectors = nn.ModuleList(make_projector(cfg.projector, student.n_embd, teacher.n_embd) for _ in self.hidden_pairs)
        self.attn_pairs = layer_map(student.n_layer, teacher.n_layer, cfg.attn_layers) if cfg.attn_weight > 0 else []
        self.n_head = student.n_head
        self.teacher_vocab = teacher.vocab_size
        if self.attn_pairs:
            if teacher.n_head % student.n_head:
                raise GrowlmError(f"attention maps: the teacher's {teacher.n_head} heads do not split into equal groups, "
                                  f"one per student head ({student.n_head})")
            bad = [h for h in cfg.attn_heads or [] if h >= student.n_head]
            if bad:
                raise GrowlmError(f"attn_heads: head {bad[0]} does not exist (the student has heads 0..{student.n_head - 1})")

    @property
    def needs_teacher(self) -> bool:
        """False when every teacher term has weight 0 (a CE-only baseline runs no teacher)."""
        return self.cfg.kd_weight > 0 or bool(self.hidden_pairs) or bool(self.attn_pairs)

    @property
    def needs_hidden_states(self) -> bool:
        return bool(self.hidden_pairs)

    @property
    def student_attention_layers(self) -> tuple[int, ...]:
        return tuple(sorted({s for s, _ in self.attn_pairs}))

    @property
    def teacher_attention_layers(self) -> tuple[int, ...]:
        return tuple(sorted({t for _, t in self.attn_pairs}))

    def forward(self, student_out: ModelOutput | torch.Tensor, teacher_out: ModelOutput | torch.Tensor | None,
                targets: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total, {"ce", "kd", "hidden", "attn"}: each unweighted term with a weight > 0, detached).

        student_out / teacher_out: ModelOutput (or bare logits when no hidden or attention term is on);
        targets (B, T) next-token ids for the CE term; mask (B, T) bool, True where a position counts.
        The teacher side is detached."""
        cfg = self.cfg
        s_out = student_out if isinstance(student_out, ModelOutput) else ModelOutput(student_out)
        sparse = teacher_out if isinstance(teacher_out, SparseTargets) else None  # cached top-k targets
        t_out = teacher_out if isinstance(teacher_out, ModelOutput) or teacher_out is None or sparse is not None \
            else ModelOutput(teacher_out)
        terms: dict[str, tuple[float, torch.Tensor]] = {}
        if cfg.ce_weight > 0:
            if targets is None:
                raise GrowlmError("the CE term needs the next-token targets")
            terms["ce"] = (cfg.ce_weight, next_token_loss(s_out.logits, targets, mask))
        if cfg.kd_weight > 0 or self.hidden_pairs or self.attn_pairs:
            if t_out is None:
                raise GrowlmError("the distillation terms need the teacher's outputs")
        if cfg.kd_weight > 0 and sparse is not None:
            if cfg.logits not in ("forward_kl", "soft_ce"):
                raise GrowlmError(f"cached teacher targets give forward_kl and soft_ce only, not {cfg.logits}")
            terms["kd"] = (cfg.kd_weight, sparse_kd_loss(s_out.logits, *sparse, temperature=cfg.temperature, mask=mask,
                                                         kind="ce" if cfg.logits == "soft_ce" else "forward_kl",
                                                         vocab_size=self.teacher_vocab))
        elif cfg.kd_weight > 0:
            terms["kd"] = (cfg.kd_weight, logits_loss(s_out.logits, t_out.logits.detach(), cfg.logits, cfg.temperature,
                                                      cfg.beta, cfg.alpha, mask))
        if self.hidden_pairs:
            if s_out.hidden_states is None or t_out.hidden_states is None:
                raise GrowlmError("the hidden-state term needs output_hidden_states=True on both models")
            total = 0.0
            for (s, t), proj in zip(self.hidden_pairs, self.projectors):
                hs, ht = proj(s_out.hidden_states[s + 1]), t_out.hidden_states[t + 1].detach()
                if cfg.hidden_norm:
                    hs, ht = F.layer_norm(hs, hs.shape[-1:]), F.layer_norm(ht, ht.shape[-1:])
                total = total + hidden_loss(hs, ht, cfg.hidden_loss, mask)
            terms["hidden"] = (cfg.hidden_weight, total / len(self.hidden_pairs))
        if self.attn_pairs:
            s_att, t_att = s_out.attentions or {}, t_out.attentions or {}
            total = 0.0
            for s, t in self.attn_pairs:
                if s not in s_att or t not in t_att:
                    raise GrowlmError(f"attention maps of student layer {s} and teacher layer {t} are missing: pass "
                                      "attention_layers=student_attention_layers / teacher_attention_layers")
                ps, pt = s_att[s], group_heads(t_att[t].detach(), self.n_head)
                if cfg.attn_heads is not None:
                    ps, pt = ps[:, cfg.attn_heads], pt[:, cfg.attn_heads]
                total = total + attention_loss(ps, pt, cfg.attn_loss, mask)
            terms["attn"] = (cfg.attn_weight, total / len(self.attn_pairs))
        loss = sum(w * v for w, v in terms.values())
        return loss, {k: v.detach() for k, (_, v) in terms.items()}

    def chunked_loss(self, hidden: torch.Tensor, weight: torch.Tensor,
                     teacher: SparseTargets | tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None,
                     targets: torch.Tensor, mask: torch.Tensor | None = None,
                     chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`forward`'s CE and logits terms from the student's final hidden states, `chunk_size` positions at a time.

        hidden (B, T, C): the input of the student's head, weight (V_s, C) its weight; the student logits
        F.linear(hidden, weight) and their gradient are never built for more than chunk_size positions at once
        (`growlm.models.head.chunked_head_terms`). teacher: cached SparseTargets; or (teacher hidden (B, T, C_t),
        teacher head weight (V, C_t)), whose logits are formed a chunk at a time too; or teacher logits (B, T, V);
        or None (no KD term). Same value and gradients as `forward(F.linear(hidden, weight), ...)` to float
        rounding; parts always has "ce" (logged even at ce_weight 0, where it adds nothing to the gradient).
        chunk_size <= 0: all positions at once. Hidden-state and attention terms need `forward`."""
        cfg = self.cfg
        if self.hidden_pairs or self.attn_pairs:
            raise GrowlmError("the chunked loss covers the CE and logits terms; hidden-state and attention terms need forward()")
        B, T = hidden.shape[:2]
        if mask is not None and mask.shape != (B, T):
            raise GrowlmError(f"mask of shape {tuple(mask.shape)} does not match the positions {(B, T)}")
        rows = torch.ones(B * T, dtype=torch.bool, device=hidden.device) if mask is None else mask.reshape(-1).bool()
        n, y, kd = max(int(rows.sum()), 1), targets.reshape(-1), cfg.kd_weight > 0
        sparse = teacher if isinstance(teacher, SparseTargets) else None
        if kd and teacher is None:
            raise GrowlmError("the distillation terms need the teacher's outputs")
        if kd and sparse is not None:
            if cfg.logits not in ("forward_kl", "soft_ce"):
                raise GrowlmError(f"cached teacher targets give forward_kl and soft_ce only, not {cfg.logits}")
            lp, ids, rest = (t.reshape(B * T, *t.shape[2:]) for t in sparse)
        elif kd:  # the teacher's (hidden, head weight), whose logits are formed per chunk, or its logits
            t_hidden, t_weight = (teacher[0].reshape(B * T, -1), teacher[1]) if isinstance(teacher, tuple) else (None, None)
            t_logits = None if isinstance(teacher, tuple) else teacher.reshape(B * T, -1)
        power = 2 if sparse is not None else TEMPERATURE_POWER[cfg.logits]
        scale = cfg.temperature ** power / n

        def row_terms(z: torch.Tensor, s: int, e: int) -> torch.Tensor:
            m = rows[s:e]
            zc = z[m]
            ce = F.cross_entropy(zc, y[s:e][m], reduction="sum") / n
            if not kd:
                return ce.unsqueeze(0)
            if sparse is not None:
                per = sparse_divergence(zc, lp[s:e][m], ids[s:e][m], rest[s:e][m], cfg.temperature,
                                        "ce" if cfg.logits == "soft_ce" else "forward_kl", self.teacher_vocab)
            else:
                zt = t_logits[s:e][m] if t_hidden is None else F.linear(t_hidden[s:e][m], t_weight.to(t_hidden.dtype))
                per = logits_divergence(zc, zt.detach(), cfg.logits, cfg.temperature, cfg.beta, cfg.alpha)
            return torch.stack([ce, per.sum() * scale])

        loss, terms = chunked_head_terms(hidden, weight, row_terms, (cfg.ce_weight, cfg.kd_weight)[:1 + kd], chunk_size)
        return loss, dict(zip(("ce", "kd"), terms))
