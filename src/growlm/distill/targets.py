"""Teacher targets cached on disk: the teacher's top-k log-probabilities per training position (the loss
computed from them is `growlm.distill.objectives.sparse_kd_loss`).

A teacher forward pass on every step of every epoch is the larger part of logit distillation's cost when
the teacher is bigger than the student. Its predictions on the (fixed) training blocks do not change, so
they are computed once, per (teacher weights, data, tokenizer, sequence length, k, storage dtype), and kept
as memory-mapped numpy arrays (`.npy`, read with `np.load(mmap_mode="r")`) in a folder named by a hash of
that fingerprint:

    logprobs.npy      (N, T, k)  float16 | float32   log p_i of the teacher's k most likely tokens, sorted
    ids.npy           (N, T, k)  uint16 | int32      their token ids
    rest_logmass.npy  (N, T)     float32             log r, r = 1 - sum_i p_i: the mass of the V - k others
    meta.json                                        the fingerprint (written last: its presence = complete)

N = training blocks, T = seq_len; block n is `data.block("train", n, seq_len)` and the inputs are its
first T tokens (the x of `growlm.train.data.stack_blocks`). Probabilities are stored at temperature 1;
log r is computed as logsumexp of the non-top-k logits minus the log-partition function, so it keeps its
relative precision when r is tiny (1 - sum p_i would cancel). Raw top-k caching of teacher logits is
the "sparse KD" of Raman et al. 2023 ("For Distillation, Tokens Are Not All You Need") and Anshumann et
al. 2025 ("Sparse Logit Sampling"); keeping the remainder as one extra outcome is what makes the
k = V case exact and the k < V case a bounded under-estimate (`growlm.distill.objectives.sparse_kd_loss`).

A cache is refused, with one line naming the difference, when its fingerprint is not the one expected
(another teacher, data, tokenizer, seq_len or k) or when a file is truncated or does not match meta.json.
This module sits below `growlm.train` (distill is layer 3), so it takes the packed data by duck typing:
any object with `key`, `vocab_size`, `n_blocks(split, seq_len)` and `block(split, i, seq_len)`, as
`growlm.train.data.PackedData` has; its key is `<data hash>-<tokenizer fingerprint>`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from growlm.errors import GrowlmError
from growlm.io import atomic_dir
from growlm.models.assets import cache_dir as _growlm_cache_dir

FORMAT_VERSION = 1
STORAGE_DTYPES = ("float16", "float32")
_FILES = ("logprobs", "ids", "rest_logmass")


# -- fingerprint --------------------------------------------------------------------------------------
def teacher_fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict in name order (name, dtype, shape and the raw bytes of every tensor),
    first 16 hex digits. It changes with any weight, with the weights' dtype and with the architecture's
    parameter names; SmolLM2-135M in float32 (538 MB) hashes in about a second."""
    h = hashlib.sha256(f"growlm-teacher-v1|{type(model).__name__}".encode())
    sd = model.state_dict()
    for name in sorted(sd):
        t = sd[name].detach()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TargetsFingerprint:
    """Everything a cache of teacher targets depends on; two caches are interchangeable iff these are equal."""

    teacher: str
    """Hash of the teacher's weights (`teacher_fingerprint`)."""
    data: str
    """Hash of the training documents and split (the first part of PackedData.key)."""
    tokenizer: str
    """Tokenizer fingerprint (the rest of PackedData.key)."""
    seq_len: int
    """Tokens per block (inputs)."""
    k: int
    """Log-probabilities kept per position."""
    n_blocks: int
    """Training blocks covered (blocks 0..n_blocks-1)."""
    vocab_size: int
    """The teacher's output vocabulary V."""
    dtype: str
    """Storage dtype of the log-probabilities (float16 or float32)."""
    version: int = FORMAT_VERSION
    """Layout version of the files."""

    def key(self) -> str:
        """The folder name: a hash of every field."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: "TargetsFingerprint") -> list[str]:
        """'field (cache value vs expected value)' for every field that differs from `other`."""
        names = {"teacher": "teacher weights"}
        return [f"{names.get(f.name, f.name)} ({getattr(self, f.name)} vs {getattr(other, f.name)})"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def _split_key(key: str) -> tuple[str, str]:
    data, _, tok = str(key).partition("-")  # PackedData.key = f"{data hash (hex)}-{tokenizer fingerprint}"
    return data, tok


def _vocab_size(teacher: nn.Module) -> int:
    cfg = getattr(teacher, "config", None)
    if cfg is None or not hasattr(cfg, "vocab_size"):
        raise GrowlmError("the teacher has no config.vocab_size; pass a growlm GPT")
    return int(cfg.vocab_size)


def targets_fingerprint(teacher: nn.Module, data: Any, seq_len: int, k: int, dtype: str = "float16",
                        max_blocks: int | None = None, teacher_hash: str | None = None) -> TargetsFingerprint:
    """The fingerprint of the cache `build_targets` would write for these arguments (validated).
    `teacher_hash` skips hashing the weights again when the caller already has `teacher_fingerprint`."""
    vocab = _vocab_size(teacher)
    if dtype not in STORAGE_DTYPES:
        raise GrowlmError(f"teacher-target dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if not 1 <= k <= vocab:
        raise GrowlmError(f"top-k must be in 1..{vocab} (the teacher's vocabulary), got {k}")
    if seq_len < 1:
        raise GrowlmError(f"seq_len must be >= 1, got {seq_len}")
    block_size = getattr(teacher.config, "block_size", None)
    if block_size is not None and seq_len > block_size:
        raise GrowlmError(f"seq_len {seq_len} exceeds the teacher's context length {block_size}")
    if int(data.vocab_size) > vocab:
        raise GrowlmError(f"the data's tokenizer has {data.vocab_size} tokens, more than the teacher's vocabulary of {vocab}")
    n = int(data.n_blocks("train", seq_len))
    if max_blocks is not None:
        if max_blocks < 1:
            raise GrowlmError(f"max_blocks must be >= 1, got {max_blocks}")
        n = min(n, int(max_blocks))
    if n < 1:
        raise GrowlmError(f"the training split holds no block of seq_len + 1 = {seq_len + 1} tokens")
    d, tok = _split_key(data.key)
    return TargetsFingerprint(teacher_hash or teacher_fingerprint(teacher), d, tok, int(seq_len), int(k), n, vocab, dtype)


# -- the cache ----------------------------------------------------------------------------------------
class SparseTargets(NamedTuple):
    """Cached teacher targets of a batch (what `TeacherTargets.get` returns), the teacher side of the objective."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    rest_logmass: torch.Tensor


@dataclass
class TeacherTargets:
    """An opened cache: three read-only memmaps and the fingerprint they were built for."""

    path: Path
    fingerprint: TargetsFingerprint
    logprobs: np.ndarray
    """(N, T, k) memmap: log-probabilities of the top-k tokens, largest first."""
    ids: np.ndarray
    """(N, T, k) memmap: their token ids."""
    rest_logmass: np.ndarray
    """(N, T) memmap: log of the probability of all other tokens (-inf when k = V)."""

    def __len__(self) -> int:
        return self.fingerprint.n_blocks

    @property
    def nbytes(self) -> int:
        return sum(Path(self.path, f"{n}.npy").stat().st_size for n in _FILES)

    def get(self, block_indices: Sequence[int], device: torch.device | str | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logprobs (B, T, k) float32, ids (B, T, k) int64, rest_logmass (B, T) float32) of the given
        training blocks; only those rows are read from disk."""
        idx = np.asarray(block_indices, dtype=np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= len(self))):
            raise IndexError(f"block indices must be a list in 0..{len(self) - 1}")
        lp = torch.from_numpy(self.logprobs[idx].astype(np.float32, copy=False))
        ids = torch.from_numpy(self.ids[idx].astype(np.int64))
        rest = torch.from_numpy(np.array(self.rest_logmass[idx], dtype=np.float32))
        if device is not None:
            lp, ids, rest = lp.to(device), ids.to(device), rest.to(device)
        return lp, ids, rest


def default_targets_dir() -> Path:
    """$GROWLM_CACHE/targets (or ~/.cache/growlm/targets): one folder per fingerprint key."""
    return _growlm_cache_dir() / "targets"


def _corrupt(path: Path, what: str) -> GrowlmError:
    return GrowlmError(f"teacher-target cache {path} is corrupt ({what}); delete the folder to rebuild it")


def _open_npy(path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    f = path / f"{name}.npy"
    try:
        with open(f, "rb") as fh:
            fmt = np.lib.format
            version = fmt.read_magic(fh)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            header = read(fh)  # (shape, fortran_order, dtype)
            offset = fh.tell()
        arr = np.load(f, mmap_mode="r")
    except FileNotFoundError:
        raise _corrupt(path, f"{name}.npy is missing") from None
    except Exception as e:  # a truncated or overwritten header / body: one line, not a numpy traceback
        raise _corrupt(path, f"{name}.npy cannot be read: {type(e).__name__}") from None
    if tuple(header[0]) != shape or np.dtype(header[2]) != dtype:
        raise _corrupt(path, f"{name}.npy holds {np.dtype(header[2]).name}{list(header[0])}, meta.json says {dtype.name}{list(shape)}")
    if f.stat().st_size != offset + arr.nbytes:
        raise _corrupt(path, f"{name}.npy has {f.stat().st_size} bytes, expected {offset + arr.nbytes}")
    return arr


def _ids_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab <= 2**16 else np.int32)


def open_targets(path: str | Path, expect: TargetsFingerprint | None = None) -> TeacherTargets:
    """Open a cache folder read-only (memory-mapped). With `expect`, a cache built for anything else is
    refused with one line naming every field that differs; a missing, truncated or inconsistent file is
    refused with one line too."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise GrowlmError(f"no teacher-target cache at {path} (meta.json is missing)")
    try:
        meta = json.loads(meta_path.read_text())
        fp = TargetsFingerprint(**meta["fingerprint"])
    except Exception as e:
        raise _corrupt(path, f"meta.json unreadable: {type(e).__name__}") from None
    if expect is not None and fp != expect:
        raise GrowlmError(f"teacher-target cache {path} is stale: {', '.join(fp.differences(expect))}; build it again")
    n, t, k = fp.n_blocks, fp.seq_len, fp.k
    lp = _open_npy(path, "logprobs", (n, t, k), np.dtype(fp.dtype))
    ids = _open_npy(path, "ids", (n, t, k), _ids_dtype(fp.vocab_size))
    rest = _open_npy(path, "rest_logmass", (n, t), np.dtype(np.float32))
    return TeacherTargets(path, fp, lp, ids, rest)


@torch.no_grad()
def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k log-probs (..., k) sorted descending, their ids, log of the remaining mass (...)) of
    logits (..., V), in float32. The remainder is the sum of exp(z_j - max z) over the other V - k tokens
    (the top-k zeroed in place), never 1 - sum p_i: it keeps its relative precision when it is 1e-30
    (the subtraction would give 0 or a negative number); it is -inf only below exp(-87) of the top."""
    z = logits.float()
    top = z.amax(-1, keepdim=True)
    e = (z - top).exp_()  # (..., V), one pass; its sum is the partition function / exp(top)
    log_s = e.sum(-1, keepdim=True).log()
    vals, ids = z.topk(k, dim=-1, sorted=True)
    rest = e.scatter_(-1, ids, 0.0).sum(-1).log() - log_s.squeeze(-1)
    return vals - top - log_s, ids, rest


def build_targets(teacher: nn.Module, data: Any, seq_len: int, k: int, cache_dir: str | Path | None = None,
                  dtype: str = "float16", batch_size: int = 8, max_blocks: int | None = None,
                  rebuild: bool = False, progress: Callable[[int, int], None] | None = None,
                  teacher_hash: str | None = None) -> TeacherTargets:
    """Open the cache of `teacher`'s top-k predictions on the training blocks of `data`, building it first
    when absent (or when `rebuild`). The folder is `cache_dir / fingerprint.key()` (default
    `default_targets_dir()`), written atomically (a temporary sibling renamed into place, meta.json last),
    so a run killed mid-build leaves no half cache and concurrent builders produce the same files.

    The teacher runs in eval mode under no_grad, `batch_size` blocks at a time, on its own device and dtype;
    log-softmax and top-k are taken in float32. `max_blocks` caches only the first blocks (benchmarks).
    `progress(blocks done, total)` is called after each batch.
    """
    if batch_size < 1:
        raise GrowlmError(f"batch_size must be >= 1, got {batch_size}")
    fp = targets_fingerprint(teacher, data, seq_len, k, dtype, max_blocks, teacher_hash)
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_targets_dir()
    path = path / fp.key()
    if (path / "meta.json").exists() and not rebuild:
        return open_targets(path, fp)
    device = next(teacher.parameters()).device
    n = fp.n_blocks
    was_training = teacher.training
    teacher.eval()
    try:
        with atomic_dir(path) as tmp, torch.no_grad():
            fmt = np.lib.format
            lp = fmt.open_memmap(tmp / "logprobs.npy", mode="w+", dtype=np.dtype(dtype), shape=(n, seq_len, k))
            ids = fmt.open_memmap(tmp / "ids.npy", mode="w+", dtype=_ids_dtype(fp.vocab_size), shape=(n, seq_len, k))
            rest = fmt.open_memmap(tmp / "rest_logmass.npy", mode="w+", dtype=np.float32, shape=(n, seq_len))
            for s in range(0, n, batch_size):
                e = min(s + batch_size, n)
                x = torch.stack([data.block("train", i, seq_len)[:-1] for i in range(s, e)]).to(device)  # (B, T)
                b_lp, b_ids, b_rest = teacher_topk(teacher(x), k)
                lp[s:e] = b_lp.cpu().numpy().astype(lp.dtype)
                ids[s:e] = b_ids.cpu().numpy().astype(ids.dtype)
                rest[s:e] = b_rest.cpu().numpy()
                if progress is not None:
                    progress(e, n)
            for arr in (lp, ids, rest):
                arr.flush()
            del lp, ids, rest
            meta = {"fingerprint": asdict(fp), "files": {n_: f"{n_}.npy" for n_ in _FILES}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    finally:
        teacher.train(was_training)
    return open_targets(path, fp)
