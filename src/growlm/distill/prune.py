"""Students cut from teachers: depth and width pruning of a `GPT`, as pure functions.

    student, record = make_student(teacher, StudentSpec(n_layer=10, depth_by="importance", ffn_size=768), calib)

`make_student` never modifies the teacher: every student tensor is a new tensor. It prunes **depth first,
then width**, and measures the width importances on the depth-pruned model, so that they describe the
activations the student actually computes (Minitron measures all axes on one model, then prunes; here the
axes of one step are independent index sets and are cut together).

Depth (`layers`, `every`, or `n_layer` with `depth_by`):
- `layers=[0, 2, 4]` keeps those blocks in order; `every=k` keeps blocks 0, k, 2k, ... (DistilBERT and
  DistilGPT2 take one teacher layer out of two, Sanh et al. 2019);
- `n_layer=n, depth_by="uniform"` keeps round(i (L-1) / (n-1)) for i = 0..n-1: always the first and the
  last block, the rest evenly spread (for 12 -> 6 this is [0, 2, 4, 7, 9, 11], the layers Hugging Face's
  distillation scripts copy into DistilBERT / DistilGPT2);
- `n_layer=n, depth_by="importance"` keeps the n blocks of highest Block Influence (ShortGPT, Men et al.
  2024, eq. 1; the depth axis of Minitron, Muralidharan et al. 2024):
      BI_i = 1 - E_{tokens} [ x_i . x_{i+1} / (|x_i| |x_{i+1}|) ]
  with x_i the residual stream entering block i, averaged over every calibration token. A block that
  leaves the stream unchanged (an identity block) has BI 0 and is dropped first. One-shot: the scores are
  measured once on the teacher (ties broken by index).

Width (Minitron's activation importance, mean over batch and sequence of |activation|):
- attention heads: F_head(h) = E_{b,t} || y_{b,t,h} ||_2, the norm of head h's attention output (the input
  of `attn.o`, before the output projection). GQA-consistent: a student with K' KV groups of G' = H'/K'
  query heads keeps the K' KV groups of the largest summed query-head importance and, within each, the G'
  most important query heads, so every query head still reads its own KV head. `n_kv_head` alone drops
  whole groups (G' = G); `n_head` alone keeps every group and drops heads inside them (K' = K; multi-head
  attention stays multi-head). head_dim never changes (RoPE frequencies and the q.k scale depend on it).
- FFN channels: F_ffn(j) = E_{b,t} |a_{b,t,j}| of the intermediate activation a = silu(gate x) * up x
  (SwiGLU) or gelu(up x) (GELU), the input of `mlp.down`; each layer keeps its own top ffn_size channels.
- embedding channels: F_emb(c) = sum over every norm (norm_1 and norm_2 of each block, norm_f) of
  E_{b,t} |norm(x)_{b,t,c}| (Minitron: importance from the LayerNorm outputs). One set of channels is kept
  everywhere: wte, wpe, the input columns of q/k/v/gate/up/lm_head, the output rows of o/down, the norms.
  The norms then average over D' < D channels; growlm multiplies their gains by sqrt(D/D') and their eps
  by D/D', which makes the cut exact when the removed channels are zero (RMSNorm) or hold the token's
  mean (LayerNorm) and keeps the normalised scale of the kept channels in general.

Keeping every layer and every unit returns the teacher's function exactly (tests check the logits), and
units whose output weights are zero (zero `mlp.down` columns, zero residual channels, an identity block)
have importance 0 and are removed first without changing the logits.

`init="random"` returns a freshly initialised model of the student's shape (seeded), the baseline a pruned
student must beat.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from growlm.errors import GrowlmError
from growlm.models.config import ModelConfig, check_keys
from growlm.models.model import GPT

DepthBy = Literal["uniform", "importance"]
Init = Literal["pruned", "random"]


@dataclass
class StudentSpec:
    """How a student is cut from its teacher (depth first, then width). None keeps the teacher's value."""

    layers: list[int] | None = None
    """Teacher layer indices to keep, in order (e.g. [0, 2, 4]); excludes n_layer and every."""
    n_layer: int | None = None
    """Number of layers to keep, chosen by depth_by."""
    every: int | None = None
    """Keep every k-th layer: 0, k, 2k, ... (k=2 is DistilBERT / DistilGPT2's one layer out of two)."""
    depth_by: DepthBy = "uniform"
    """With n_layer: 'uniform' (first and last kept, the rest evenly spread) or 'importance' (Block
    Influence, 1 - cosine(block input, block output), measured on the calibration data; least important dropped)."""
    n_head: int | None = None
    """Query heads to keep per layer (by attention-output norm; GQA-consistent, see the module docstring)."""
    n_kv_head: int | None = None
    """KV heads (groups) to keep per layer; must divide n_head. None: the teacher's groups when n_head is
    given and they divide it, else n_head / (teacher's query heads per group)."""
    head_dim: int | None = None
    """Must equal the teacher's head size if given: pruning never changes head_dim."""
    ffn_size: int | None = None
    """FFN channels to keep per layer (by mean |intermediate activation|)."""
    n_embd: int | None = None
    """Hidden (embedding) channels to keep, the same set in every tensor (by mean |norm output|)."""
    calibration_batches: int = 8
    """Number of calibration sequences the importances are averaged over."""
    calibration_seq_len: int = 128
    """Tokens per calibration sequence."""
    init: Init = "pruned"
    """'pruned' (weights cut from the teacher) or 'random' (a fresh model of the student's shape, for comparison)."""
    seed: int = 0
    """Seed of the random initialisation (init='random')."""

    def __post_init__(self) -> None:
        given = [k for k in ("layers", "n_layer", "every") if getattr(self, k) is not None]
        if len(given) > 1:
            raise GrowlmError(f"give at most one of layers, n_layer and every (got {', '.join(given)})")
        if self.depth_by not in ("uniform", "importance"):
            raise GrowlmError(f"depth_by must be 'uniform' or 'importance', got {self.depth_by!r}")
        if self.depth_by == "importance" and self.n_layer is None:
            raise GrowlmError("depth_by='importance' needs n_layer (the number of layers to keep)")
        if self.init not in ("pruned", "random"):
            raise GrowlmError(f"init must be 'pruned' or 'random', got {self.init!r}")
        if self.layers is not None:
            if not self.layers:
                raise GrowlmError("layers must name at least one layer to keep")
            self.layers = [int(i) for i in self.layers]
            if len(set(self.layers)) != len(self.layers):
                raise GrowlmError(f"layers {self.layers} name a layer twice (pruning keeps each layer at most once)")
        for k in ("n_layer", "every", "n_head", "n_kv_head", "head_dim", "ffn_size", "n_embd",
                   "calibration_batches", "calibration_seq_len"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise GrowlmError(f"{k} must be a positive integer, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudentSpec":
        check_keys(cls, d, "student spec keys")
        return cls(**d)

    @property
    def prunes_width(self) -> bool:
        return any(v is not None for v in (self.n_head, self.n_kv_head, self.ffn_size, self.n_embd))


# -- the student's shape --------------------------------------------------------------------------------
def select_layers(n_layer: int, spec: StudentSpec, influence: list[float] | None = None) -> list[int]:
    """Teacher layer indices the student keeps (ascending), for a teacher of `n_layer` blocks.

    `influence` (Block Influence per teacher layer) is needed for depth_by='importance' only."""
    L = n_layer
    if spec.layers is not None:
        bad = [i for i in spec.layers if not 0 <= i < L]
        if bad:
            raise GrowlmError(f"layers {bad} do not exist: the teacher has layers 0..{L - 1}")
        return list(spec.layers)
    if spec.every is not None:
        if spec.every > L:
            raise GrowlmError(f"every={spec.every} is larger than the teacher's {L} layers")
        return list(range(0, L, spec.every))
    if spec.n_layer is None:
        return list(range(L))
    n = spec.n_layer
    if n > L:
        raise GrowlmError(f"n_layer={n} is larger than the teacher's {L} layers (pruning only removes layers)")
    if spec.depth_by == "uniform":
        return [0] if n == 1 else sorted({round(i * (L - 1) / (n - 1)) for i in range(n)})
    if influence is None or len(influence) != L:
        raise GrowlmError("depth_by='importance' needs the Block Influence of every teacher layer (calibration data)")
    ranked = sorted(range(L), key=lambda i: (-influence[i], i))  # most influential first, ties by index
    return sorted(ranked[:n])


def student_config(cfg: ModelConfig, spec: StudentSpec) -> ModelConfig:
    """The student's config, every target checked against the teacher (GrowlmError names the one that fails)."""
    n_layer = cfg.n_layer if spec.n_layer is None and spec.every is None and spec.layers is None else \
        len(select_layers(cfg.n_layer, spec, [0.0] * cfg.n_layer))
    H, K = cfg.n_head, cfg.n_kv_head
    G = H // K
    if spec.head_dim is not None and spec.head_dim != cfg.head_dim:
        raise GrowlmError(f"head_dim {cfg.head_dim} -> {spec.head_dim}: pruning keeps head_dim (prune heads instead)")
    for what, new, old in (("n_head", spec.n_head, H), ("n_kv_head", spec.n_kv_head, K),
                           ("ffn_size", spec.ffn_size, cfg.ffn_size), ("n_embd", spec.n_embd, cfg.n_embd)):
        if new is not None and new > old:
            raise GrowlmError(f"{what}={new} is larger than the teacher's {old} (pruning only removes units)")
    H2, K2 = spec.n_head, spec.n_kv_head
    if H2 is None and K2 is None:
        H2, K2 = H, K
    elif K2 is None:
        K2 = H2 if K == H else K  # multi-head stays multi-head; GQA keeps its groups
        if H2 % K2:
            raise GrowlmError(f"n_head={H2} is not GQA-consistent with the teacher's {K} KV groups: give n_kv_head "
                              f"dividing it (each kept group keeps n_head / n_kv_head of its {G} query heads)")
    elif H2 is None:
        H2 = K2 * G  # whole groups dropped
    if H2 % K2:
        raise GrowlmError(f"n_kv_head={K2} must divide n_head={H2} (each KV group serves a whole number of query heads)")
    if H2 // K2 > G:
        raise GrowlmError(f"n_head={H2} with n_kv_head={K2} puts {H2 // K2} query heads in a group; the teacher's "
                          f"groups have {G}, and a kept group cannot gain heads")
    try:
        return cfg.replace(n_layer=n_layer, n_head=H2, n_kv_head=K2, head_dim=cfg.head_dim,
                           ffn_size=spec.ffn_size or cfg.ffn_size, n_embd=spec.n_embd or cfg.n_embd,
                           norm_eps=cfg.norm_eps * cfg.n_embd / (spec.n_embd or cfg.n_embd))
    except ValueError as e:
        raise GrowlmError(f"student config: {e}") from None


# -- importances --------------------------------------------------------------------------------------------
def _batches(calibration: torch.Tensor, batch_size: int):
    if calibration.dim() != 2 or calibration.dtype not in (torch.int32, torch.int64) or calibration.shape[0] < 1:
        raise GrowlmError(f"calibration must be token ids of shape (sequences, tokens), got {tuple(calibration.shape)} "
                          f"{calibration.dtype}")
    for i in range(0, calibration.shape[0], batch_size):
        yield calibration[i:i + batch_size]


@torch.no_grad()
def block_influence(model: GPT, calibration: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Block Influence BI_i = 1 - mean over tokens of cos(x_i, x_{i+1}) for every block (ShortGPT eq. 1)."""
    dev = next(model.parameters()).device
    total = torch.zeros(model.config.n_layer, dtype=torch.float64)
    n = 0
    for x in _batches(calibration, batch_size):
        states = model(x.to(dev), output_hidden_states=True).hidden_states  # n_layer + 1 x (B, T, C)
        for i in range(model.config.n_layer):
            a, b = states[i].double(), states[i + 1].double()
            total[i] += F.cosine_similarity(a, b, dim=-1).sum().cpu()
        n += x.numel()
    return (1.0 - total / n).tolist()


@torch.no_grad()
def width_importance(model: GPT, calibration: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Minitron activation importances, averaged over every calibration token (float64, on the CPU):
    'heads' (n_layer, n_head), 'ffn' (n_layer, ffn_size), 'embd' (n_embd,); see the module docstring."""
    cfg = model.config
    L, H, hd = cfg.n_layer, cfg.n_head, cfg.head_dim
    acc = {"heads": torch.zeros(L, H, dtype=torch.float64), "ffn": torch.zeros(L, cfg.ffn_size, dtype=torch.float64),
           "embd": torch.zeros(cfg.n_embd, dtype=torch.float64)}
    hooks = []

    def on_input(key: str, i: int, per_head: bool):
        def hook(_mod, args):
            a = args[0].double()
            if per_head:  # (B, T, H * hd) -> (B, T, H): norm of each head's attention output
                a = a.view(*a.shape[:-1], H, hd).norm(dim=-1)
            acc[key][i] += a.abs().sum(dim=(0, 1)).cpu()
        return hook

    def on_norm(_mod, _args, out):
        acc["embd"].add_(out.double().abs().sum(dim=(0, 1)).cpu())

    try:
        for i, blk in enumerate(model.blocks):
            hooks.append(blk.attn.o.register_forward_pre_hook(on_input("heads", i, True)))
            hooks.append(blk.mlp.down.register_forward_pre_hook(on_input("ffn", i, False)))
            hooks.append(blk.norm_1.register_forward_hook(on_norm))
            hooks.append(blk.norm_2.register_forward_hook(on_norm))
        hooks.append(model.norm_f.register_forward_hook(on_norm))
        n = 0
        dev = next(model.parameters()).device
        for x in _batches(calibration, batch_size):
            model(x.to(dev))
            n += x.numel()
    finally:
        for h in hooks:
            h.remove()
    return {k: v / n for k, v in acc.items()}


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, ascending (ties: the lower index wins)."""
    order = sorted(range(scores.numel()), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


def choose_heads(scores: torch.Tensor, n_kv_head: int, n_head: int, n_kv_new: int, n_head_new: int) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV heads) of one layer from per-query-head scores: the n_kv_new groups of the
    largest summed score, then the n_head_new / n_kv_new best query heads inside each kept group."""
    G, G2 = n_head // n_kv_head, n_head_new // n_kv_new
    groups = _top(scores.view(n_kv_head, G).sum(dim=1), n_kv_new)
    heads = [g * G + j for g in groups for j in _top(scores[g * G:(g + 1) * G], G2)]
    return heads, groups


# -- surgery ----------------------------------------------------------------------------------------------
def keep_layers(model: GPT, layers: list[int]) -> GPT:
    """A new model made of the given blocks (in order) and copies of the embeddings, final norm and head."""
    sd = {}
    for name, v in model.state_dict().items():
        if name.startswith("blocks."):
            continue
        sd[name] = v.detach().clone()
    for j, i in enumerate(layers):
        prefix = f"blocks.{i}."
        for name, v in model.state_dict().items():
            if name.startswith(prefix):
                sd[f"blocks.{j}.{name[len(prefix):]}"] = v.detach().clone()
    return _build(model.config.replace(n_layer=len(layers)), sd, model)


def _rows(idx: list[int], size: int) -> torch.Tensor:
    """Row indices of whole units of `size` rows (heads of head_dim rows)."""
    return torch.tensor([u * size + r for u in idx for r in range(size)], dtype=torch.long)


def prune_width(model: GPT, cfg: ModelConfig, heads: list[list[int]], kv_heads: list[list[int]],
                ffn: list[list[int]], channels: list[int]) -> GPT:
    """Keep, per layer, the listed query heads / KV heads / FFN channels, and the listed embedding channels
    everywhere; `cfg` is the target config (its norm_eps already scaled by n_embd / n_embd')."""
    old = model.config
    hd = old.head_dim
    ch = torch.tensor(channels, dtype=torch.long)
    gain = math.sqrt(old.n_embd / len(channels))  # the norms average over fewer channels (module docstring)
    sd: dict[str, torch.Tensor] = {}

    def cut(t: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
        return t.detach().clone() if idx is None or len(idx) == t.shape[dim] else t.detach().index_select(dim, idx.to(t.device))

    full = ch if len(channels) < old.n_embd else None
    for name, v in model.state_dict().items():
        parts = name.split(".")
        if name in ("wte.weight", "wpe.weight", "lm_head.weight"):
            sd[name] = cut(v, 1, full)
        elif parts[0] == "norm_f" or (parts[0] == "blocks" and parts[2].startswith("norm")):
            w = cut(v, 0, full)
            sd[name] = w * gain if name.endswith("weight") and full is not None else w
        elif parts[0] == "blocks":
            i, proj, kind = int(parts[1]), parts[3], parts[4]
            unit = {"q": _rows(heads[i], hd), "k": _rows(kv_heads[i], hd), "v": _rows(kv_heads[i], hd),
                    "o": _rows(heads[i], hd), "gate": torch.tensor(ffn[i]), "up": torch.tensor(ffn[i]),
                    "down": torch.tensor(ffn[i])}[proj]
            if proj in ("o", "down"):  # producers: rows are residual channels, columns are units
                w = cut(v, 0, full)
                sd[name] = cut(w, 1, unit) if kind == "weight" else w
            else:  # consumers: rows are units, columns are residual channels
                w = cut(v, 0, unit)
                sd[name] = cut(w, 1, full) if kind == "weight" else w
        else:
            raise GrowlmError(f"internal: no pruning rule for parameter {name}")
    return _build(cfg, sd, model)


def _build(cfg: ModelConfig, sd: dict[str, torch.Tensor], like: GPT) -> GPT:
    p0 = next(like.parameters())
    new = GPT.from_state_dict(cfg, sd, device=p0.device, dtype=p0.dtype)
    return new.train(like.training)


# -- the one entry point ---------------------------------------------------------------------------------
def make_student(teacher: GPT, spec: StudentSpec, calibration: torch.Tensor | None = None,
                 batch_size: int = 4) -> tuple[GPT, dict[str, Any]]:
    """A student cut from `teacher` as `spec` says (depth, then width) and a JSON-serialisable record.

    `calibration`: token ids (sequences, tokens); needed for depth_by='importance' and for any width
    pruning, used as given (the caller cuts it to spec.calibration_batches x spec.calibration_seq_len).
    The teacher is not modified; with init='random' the student is a fresh model of the same shape."""
    tcfg = teacher.config
    cfg = student_config(tcfg, spec)
    record: dict[str, Any] = {"spec": spec.to_dict(), "init": spec.init, "config_teacher": tcfg.to_dict(),
                              "config_student": cfg.to_dict(), "params_teacher": teacher.num_params()}
    p0 = next(teacher.parameters())
    if spec.init == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            student = GPT(cfg).to(device=p0.device, dtype=p0.dtype).train(teacher.training)
        record["params_student"] = student.num_params()
        return student, record
    needs_calibration = spec.depth_by == "importance" and spec.n_layer is not None or spec.prunes_width
    if needs_calibration and calibration is None:
        raise GrowlmError("importance-based pruning needs calibration token ids")
    influence = None
    if spec.n_layer is not None and spec.depth_by == "importance":
        influence = block_influence(teacher, calibration, batch_size)
    kept = select_layers(tcfg.n_layer, spec, influence)
    student = keep_layers(teacher, kept)
    record.update(kept_layers=kept, dropped_layers=[i for i in range(tcfg.n_layer) if i not in kept],
                  layer_importance=influence)
    if spec.prunes_width:
        imp = width_importance(student, calibration, batch_size)
        L = cfg.n_layer
        hk = [choose_heads(imp["heads"][i], tcfg.n_kv_head, tcfg.n_head, cfg.n_kv_head, cfg.n_head) for i in range(L)]
        ffn = [_top(imp["ffn"][i], cfg.ffn_size) for i in range(L)]
        channels = _top(imp["embd"], cfg.n_embd)
        student = prune_width(student, cfg, [h for h, _ in hk], [k for _, k in hk], ffn, channels)
        record.update(
            kept_heads=[h for h, _ in hk], kept_kv_heads=[k for _, k in hk], head_importance=imp["heads"].tolist(),
            kept_ffn=ffn, ffn_importance=imp["ffn"].tolist(), kept_channels=channels,
            channel_importance=imp["embd"].tolist(), norm_gain_scale=math.sqrt(tcfg.n_embd / cfg.n_embd),
        )
    if calibration is not None:
        record["calibration_tokens"] = int(calibration.numel())
    record["params_student"] = student.num_params()
    return student, record


@torch.no_grad()
def block_loss(model: GPT, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats per token) over blocks (n, seq_len + 1) of token ids."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for b in _batches(blocks, batch_size):
            b = b.to(dev)
            logits = model(b[:, :-1])
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            total += float(F.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten(), reduction="sum"))
            n += b[:, 1:].numel()
    finally:
        model.train(was)
    return total / n
