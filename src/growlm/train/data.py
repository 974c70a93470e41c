"""Training data: read documents, tokenise in batches, pack into fixed-length blocks cached on disk.

Pipeline (as in nanoGPT's `prepare.py` + `get_batch`, made deterministic and resumable):

1. `read_documents` reads text / jsonl / parquet files or folders (or a hub dataset id when online,
   through `datasets`); the default is the embedded Shakespeare corpus (`growlm.models.assets`). A replay
   text (data.replay) is read the same way and mixed into the training stream only (`mix_replay`).
2. `split_documents` splits by *document* (a hash of its name), so no play is half in train and half in
   validation; the modern (`*_gut.txt`) and First Folio (`*_gut_f.txt`) spellings must not be mixed
   (near-duplicates would leak across the split), so mixing them is an error.
3. `tokenize_documents` tokenises with a fast tokenizer in batches and joins documents with EOS.
4. The token streams are cached as `uint16`/`uint32` numpy memmaps under a key that hashes the
   data bytes and the tokenizer, so a second run (or another process of a torchrun job) reads them.
5. `BlockSampler` cuts the stream into non-overlapping blocks of `seq_len + 1` tokens and walks a
   seeded permutation of them epoch after epoch; its position (epoch, cursor) is all a checkpoint needs
   to resume the data stream exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from growlm.errors import GrowlmError
from growlm.io import atomic_dir, read_text
from growlm.models.assets import shakespeare_files
from growlm.models.assets import cache_dir

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
DATA_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


@dataclass
class DataConfig:
    """Where the training text comes from and how it is cut into blocks."""

    path: str | None = None
    """A text/jsonl/parquet file, a folder of them, or a hub dataset id (online only); None = Shakespeare."""
    text_field: str = "text"
    """Field holding the text in jsonl/parquet/hub records."""
    seq_len: int = 128
    """Tokens per training sequence (each block holds seq_len + 1 tokens: inputs and shifted targets)."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation (at least one document when there are two or more)."""
    val_blocks: int = 16
    """Validation blocks used by each evaluation (0 = all of them)."""
    seed: int = 1234
    """Seed of the document split and of the block order."""
    cache_dir: str | None = None
    """Where packed token streams are cached; None = $GROWLM_CACHE/data or ~/.cache/growlm/data."""
    replay: str | None = None
    """Text replayed into the training stream against forgetting (a file, folder or hub id, read as data.path is;
    all of it trains, none of it validates); None = no replay."""
    replay_fraction: float = 0.0
    """Share of the training stream that is replay text: its tokens are repeated to this fraction of main +
    replay, so about this fraction of the sampled blocks is replay. In (0, 1) with data.replay, else 0."""

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise GrowlmError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise GrowlmError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_blocks < 0:
            raise GrowlmError(f"data.val_blocks must be >= 0, got {self.val_blocks}")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise GrowlmError(f"data.replay_fraction must be in [0, 1), got {self.replay_fraction}")
        if (self.replay is None) != (self.replay_fraction == 0.0):
            raise GrowlmError("data.replay and data.replay_fraction go together: name the replay text and the share of "
                              f"the training stream it takes (got replay={self.replay!r}, replay_fraction={self.replay_fraction})")


@dataclass
class Document:
    name: str
    text: str


# -- reading ------------------------------------------------------------------------------------------
def _read_jsonl(path: Path, field: str) -> list[Document]:
    docs = []
    for i, line in enumerate(read_text(path).splitlines()):  # read_text refuses a binary file
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise GrowlmError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or field not in rec:
            raise GrowlmError(f"{path}:{i + 1}: record has no field {field!r} (set data.text_field)")
        docs.append(Document(f"{path.name}:{i}", str(rec[field])))
    return docs


def _read_parquet(path: Path, field: str) -> list[Document]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if field not in table.column_names:
        raise GrowlmError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)}); set data.text_field")
    return [Document(f"{path.name}:{i}", str(t)) for i, t in enumerate(table.column(field).to_pylist())]


def _read_file(path: Path, field: str) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, field)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path, field)
    return [Document(path.name, read_text(path))]


def data_files(path: str | None) -> list[Path]:
    """The files behind `path` (sorted), the Shakespeare plays when None; [] for a hub id."""
    if path is None:

        return shakespeare_files()
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise GrowlmError(f"data folder {p} holds no {'/'.join(DATA_SUFFIXES)} files")
        names = [f.name for f in files]
        if any(n.endswith("_gut.txt") for n in names) and any(n.endswith("_gut_f.txt") for n in names):
            raise GrowlmError(
                f"{p} mixes modern (*_gut.txt) and First Folio (*_gut_f.txt) spellings of the same plays; "
                "near-duplicates would leak across the train/validation split: keep one spelling"
            )
        return files
    looks_like_hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is not None and p.suffix.lower() not in DATA_SUFFIXES
    if not looks_like_hub_id or path.startswith((".", "/", "~")):
        raise GrowlmError(f"data path {path} does not exist")
    return []  # a hub dataset id (datasets.load_dataset; needs the network)


def read_documents(path: str | None, text_field: str = "text") -> list[Document]:
    """Documents (name, text) of a file, folder or hub dataset; empty texts are dropped."""
    files = data_files(path)
    if files:
        docs = [d for f in files for d in _read_file(f, text_field)]
    else:
        docs = _read_hub(path, text_field)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise GrowlmError(f"no text found in {path or 'the Shakespeare corpus'} (all documents are empty)")
    return docs


def _read_hub(name: str, field: str) -> list[Document]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, unknown id, gated...: one actionable line
        raise GrowlmError(f"data path {name!r} is neither a local file/folder nor a loadable hub dataset ({type(e).__name__})") from None
    if field not in ds.column_names:
        raise GrowlmError(f"hub dataset {name}: no column {field!r}; set data.text_field")
    return [Document(f"{name}:{i}", str(t)) for i, t in enumerate(ds[field])]


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Deterministic split by document: a document goes to validation when a seeded hash of its name
    falls below `val_fraction` (independent of file order and of the other documents). With two or more
    documents both sides are non-empty; a single document is split by its tail instead (see `split_tokens`).
    """
    if len(docs) < 2:
        return list(docs), []

    def u(d: Document) -> float:
        h = hashlib.sha256(f"{seed}:{d.name}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    scores = [u(d) for d in docs]
    val = [d for d, s in zip(docs, scores) if s < val_fraction]
    train = [d for d, s in zip(docs, scores) if s >= val_fraction]
    if not val:  # the smallest hash goes to validation so an evaluation is always possible
        i = min(range(len(docs)), key=scores.__getitem__)
        val, train = [docs[i]], [d for j, d in enumerate(docs) if j != i]
    if not train:
        i = max(range(len(docs)), key=scores.__getitem__)
        train, val = [docs[i]], [d for j, d in enumerate(docs) if j != i]
    return train, val


# -- tokenisation -------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens (0..255) plus EOS = 256: a tokenizer that needs no files (tiny models, tests)."""

    vocab_size = 257
    eos_token_id = 256
    bos_token_id = None
    name_or_path = "growlm-bytes-v1"

    def __call__(self, texts: list[str], **_: Any) -> dict[str, list[list[int]]]:
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}

    def encode(self, text: str, **_: Any) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        ids = [ids] if isinstance(ids, int) else ids
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes when the tokenizer's vocabulary, merges or normalisation change."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.name_or_path
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        blob = backend.to_str()
    else:  # slow tokenizers: the vocabulary is the best we have
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tokenizer_size(tokenizer: Any) -> int:
    return len(tokenizer)


def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise GrowlmError("the tokenizer has no EOS token; documents cannot be separated when packing")
    return int(eos)


def tokenize_documents(docs: Sequence[Document], tokenizer: Any, batch_size: int = 64,
                       progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """One token stream: each document's ids followed by EOS. Whole documents are tokenised (cutting
    them would change the pre-tokenisation at the cut), in batches so that a fast (Rust) tokenizer
    works on several documents at once. `progress(done, total)` is called after each batch."""
    eos = eos_id(tokenizer)
    out: list[np.ndarray] = []
    for i in range(0, len(docs), batch_size):
        ids = tokenizer([d.text for d in docs[i : i + batch_size]], add_special_tokens=False)["input_ids"]
        for seq in ids:
            out.append(np.asarray(seq, dtype=np.int64))
            out.append(np.asarray([eos], dtype=np.int64))
        if progress is not None:
            progress(min(i + batch_size, len(docs)), len(docs))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# -- the cached, packed dataset -----------------------------------------------------------------------
@dataclass
class PackedData:
    """Train and validation token streams (read-only memmaps) with their provenance."""

    train: np.ndarray
    val: np.ndarray
    key: str
    n_train_docs: int
    n_val_docs: int
    vocab_size: int
    n_replay: int = 0
    """Tokens of replay text (data.replay) at the end of the training stream."""

    def n_blocks(self, split: str, seq_len: int) -> int:
        stream = self.train if split == "train" else self.val
        return max(0, (len(stream) - 1) // seq_len)

    def block(self, split: str, i: int, seq_len: int) -> torch.Tensor:
        """Block i: tokens [i*seq_len, (i+1)*seq_len] inclusive (inputs and targets overlap by one)."""
        stream = self.train if split == "train" else self.val
        s = i * seq_len
        return torch.from_numpy(np.asarray(stream[s : s + seq_len + 1], dtype=np.int64))


def _data_hash(cfg: DataConfig, docs: Sequence[Document], replay: Sequence[Document] = ()) -> str:
    h = hashlib.sha256()
    h.update(f"v1|{cfg.val_fraction}|{cfg.seed}|{cfg.text_field}".encode())
    for d in docs:
        h.update(d.name.encode() + b"\0")
        h.update(hashlib.sha256(d.text.encode()).digest())
    if replay:  # without replay the key is what it always was (existing caches stay valid)
        h.update(f"|replay|{cfg.replay_fraction!r}".encode())
        for d in replay:
            h.update(d.name.encode() + b"\0")
            h.update(hashlib.sha256(d.text.encode()).digest())
    return h.hexdigest()[:16]


def read_replay(cfg: DataConfig) -> list[Document]:
    """The documents of data.replay ([] when unset); a missing or empty source is a GrowlmError naming data.replay."""
    if cfg.replay is None:
        return []
    try:
        return read_documents(cfg.replay, cfg.text_field)
    except GrowlmError as e:
        raise GrowlmError(f"data.replay: {e}") from None


def mix_replay(train: np.ndarray, replay: np.ndarray, fraction: float) -> np.ndarray:
    """The training stream followed by the replay tokens repeated (and cut) to n = round(len(train) * f / (1 - f))
    tokens, so that replay is the fraction f of the combined stream. Blocks are sampled uniformly from it
    (`BlockSampler`), so about f of every batch is replay text: experience replay against forgetting in
    continued pretraining (a small buffer of the old distribution mixed into the new one; e.g. Ibrahim et
    al. 2024, "Simple and scalable strategies to continually pre-train large language models")."""
    if len(replay) == 0:
        raise GrowlmError("data.replay holds no tokens")
    n = int(round(len(train) * fraction / (1 - fraction)))
    reps = -(-n // len(replay))
    return np.concatenate([np.asarray(train), np.tile(np.asarray(replay, dtype=train.dtype), reps)[:n]])


def prepare_data(cfg: DataConfig, tokenizer: Any, progress: Callable[[int, int], None] | None = None) -> PackedData:
    """Read, split, tokenise and pack (or reuse the on-disk cache keyed by data + tokenizer);
    `progress(documents done, total)` follows the tokenisation."""
    docs = read_documents(cfg.path, cfg.text_field)
    replay = read_replay(cfg)
    key = f"{_data_hash(cfg, docs, replay)}-{tokenizer_fingerprint(tokenizer)}"
    root = Path(cfg.cache_dir) if cfg.cache_dir else _default_cache() / "data"
    d = root / key
    meta_path = d / "meta.json"
    if not meta_path.exists():
        train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
        n = len(train_docs) + len(val_docs) + len(replay)
        train = tokenize_documents(train_docs, tokenizer, progress=progress and (lambda d, _: progress(d, n)))
        if val_docs:
            val = tokenize_documents(val_docs, tokenizer, progress=progress and (lambda d, _: progress(len(train_docs) + d, n)))
        else:  # one document: hold out its tail
            n_val = max(2, int(len(train) * cfg.val_fraction))
            train, val = train[:-n_val], train[-n_val:]
        n_main = len(train)
        if replay:  # after the split: validation stays the main data's
            done = n - len(replay)
            buf = tokenize_documents(replay, tokenizer, progress=progress and (lambda d, _: progress(done + d, n)))
            train = mix_replay(train, buf, cfg.replay_fraction)
        vocab = tokenizer_size(tokenizer)
        dtype = np.uint16 if vocab <= 2**16 else np.uint32
        meta = {"key": key, "dtype": np.dtype(dtype).name, "n_train": int(len(train)), "n_val": int(len(val)),
                "n_replay": int(len(train) - n_main), "n_replay_docs": len(replay),
                "n_train_docs": len(train_docs), "n_val_docs": len(val_docs), "vocab_size": vocab,
                "val_docs": [x.name for x in val_docs][:1000]}
        _write_cache(d, {"train": train.astype(dtype), "val": val.astype(dtype)}, meta)
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(d / "train.bin", dtype=dtype, mode="r", shape=(meta["n_train"],)) if meta["n_train"] else np.zeros(0, dtype)
    val = np.memmap(d / "val.bin", dtype=dtype, mode="r", shape=(meta["n_val"],)) if meta["n_val"] else np.zeros(0, dtype)
    packed = PackedData(train, val, key, meta["n_train_docs"], meta["n_val_docs"], meta["vocab_size"], meta.get("n_replay", 0))
    for split in ("train", "val"):
        if packed.n_blocks(split, cfg.seq_len) < 1:
            raise GrowlmError(
                f"the {split} split has {len(getattr(packed, split))} tokens, fewer than one block of "
                f"seq_len + 1 = {cfg.seq_len + 1}; add data or lower data.seq_len"
            )
    return packed


def _default_cache() -> Path:

    return cache_dir()


def _write_cache(d: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write into a temporary sibling folder, then rename (`growlm.io.atomic_dir`): concurrent ranks never
    see a partial cache (when two write it, the contents are identical and either one wins)."""
    with atomic_dir(d) as tmp:
        for name, arr in arrays.items():
            arr.tofile(tmp / f"{name}.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


# -- sampling -----------------------------------------------------------------------------------------
class BlockSampler:
    """Walks a seeded permutation of the training blocks, epoch after epoch.

    `next_indices(n)` returns the next n block indices; `state_dict()` = {epoch, cursor} is enough to
    resume exactly because each epoch's permutation is a pure function of (seed, epoch).
    """

    def __init__(self, n_blocks: int, seed: int) -> None:
        if n_blocks < 1:
            raise GrowlmError("no training blocks to sample from")
        self.n_blocks, self.seed = n_blocks, seed
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, zlib.crc32(b"blocks")])
        return rng.permutation(self.n_blocks)

    def next_indices(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.cursor >= self.n_blocks:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(n - len(out), self.n_blocks - self.cursor)
            out.extend(int(i) for i in self._perm[self.cursor : self.cursor + take])
            self.cursor += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "n_blocks": self.n_blocks, "seed": self.seed}

    def load_state_dict(self, s: dict[str, int]) -> None:
        if s["n_blocks"] != self.n_blocks or s["seed"] != self.seed:
            raise GrowlmError("the checkpoint's data position refers to different data (block count or seed differs)")
        self.epoch, self.cursor = int(s["epoch"]), int(s["cursor"])
        self._perm = self._permutation(self.epoch)


def stack_blocks(data: PackedData, split: str, indices: Sequence[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape (B, seq_len) for the given block indices."""
    blocks = torch.stack([data.block(split, i, seq_len) for i in indices])  # (B, seq_len + 1)
    return blocks[:, :-1], blocks[:, 1:]


def text_blocks(text: str, tokenizer: Any, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, seq_len + 1) blocks of one text (for held-out measures such as retention)."""
    ids = tokenize_documents([Document("text", text)], tokenizer)
    n = (len(ids) - 1) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n < 1:
        raise GrowlmError(f"text of {len(ids)} tokens is shorter than one block of {seq_len + 1}")
    return torch.stack([torch.from_numpy(ids[i * seq_len : i * seq_len + seq_len + 1].copy()) for i in range(n)])


def retention_text() -> str:
    """Modern technical English that ships with every CPython: the Python language reference topics
    (`pydoc_data.topics`). Far from Shakespeare's domain and in SmolLM2's pretraining distribution (web
    text and code), so its perplexity measures how much general-English ability continued pretraining on
    Shakespeare keeps; being part of the standard library it is always present offline."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))
