"""Byte-level BPE tokenizers that nest: a smaller vocabulary is an exact prefix of a bigger one.

BPE training (Sennrich et al. 2016; byte-level as GPT-2, Radford et al. 2019) is greedy: merge k is chosen
after merges 0..k-1 and never revisited, and the `tokenizers` trainer numbers the vocabulary as
[special tokens, the 256 byte symbols, merge results in merge order]. So the first V ids and the merges
producing them are exactly a V-token BPE, and a model trained with it can be grown to the big vocabulary
(growlm.growth `vocab` operator) with the old ids unchanged. Train the big one once (`train_bpe`), derive the
small one (`nested_prefix`), and ask which old tokens each new token merges (`merge_sources`).
Files are saved in the Hugging Face format (`PreTrainedTokenizerFast`, loadable by `AutoTokenizer`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from growlm.errors import GrowlmError
from growlm.io import read_text

EOS = "<|endoftext|>"


def _texts(files_or_texts: Iterable[str | os.PathLike]) -> Iterator[str]:
    for item in files_or_texts:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and len(item) < 4096 and "\n" not in item and os.path.isfile(item)):
            yield read_text(item)
        else:
            yield str(item)


def train_bpe(files_or_texts: Iterable[str | os.PathLike], vocab_size: int, out_dir: str | Path,
              special_tokens: tuple[str, ...] = (EOS,)):
    """Train a byte-level BPE with `vocab_size` ids (specials first, then 256 bytes, then merges) and save it.

    Items that are paths (Path objects, or strings naming an existing file) are read as files; other strings
    are training text. Returns the `PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = len(special_tokens) + 256
    if vocab_size < base:
        raise GrowlmError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {base} ids "
                          f"({len(special_tokens)} special + 256 bytes)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(files_or_texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special_tokens[0] if special_tokens else None,
                                   eos_token=special_tokens[0] if special_tokens else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    _check_nested_order(out / "tokenizer.json")
    return fast


def _load_json(tokenizer_dir: str | Path) -> dict:
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise GrowlmError(f"{tokenizer_dir}: no tokenizer.json (expected a Hugging Face fast tokenizer directory)")
    data = json.loads(path.read_text())
    if data.get("model", {}).get("type") != "BPE":
        raise GrowlmError(f"{path}: not a BPE tokenizer")
    return data


def _merges(data: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]


def _check_nested_order(path: Path) -> None:
    """Merge k must produce id (first merge id) + k, so that every id prefix is a closed BPE."""
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    ids = [vocab[a + b] for a, b in _merges(data)]
    if ids != sorted(ids) or len(set(ids)) != len(ids):
        raise GrowlmError(f"{path}: merge results are not numbered in merge order; the vocabulary cannot be nested")


def nested_prefix(tokenizer_dir: str | Path, smaller_vocab: int, out_dir: str | Path):
    """Save the BPE made of the first `smaller_vocab` ids of `tokenizer_dir` (and the merges producing them)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = _load_json(tokenizer_dir)
    vocab: dict[str, int] = data["model"]["vocab"]
    if not 0 < smaller_vocab <= len(vocab):
        raise GrowlmError(f"smaller_vocab={smaller_vocab} must be in 1..{len(vocab)} (the big vocabulary's size)")
    merges = _merges(data)
    keep_vocab = {t: i for t, i in vocab.items() if i < smaller_vocab}
    keep_merges = [m for m in merges if vocab[m[0] + m[1]] < smaller_vocab]
    for a, b in keep_merges:
        if a not in keep_vocab or b not in keep_vocab:
            raise GrowlmError(f"merge {a!r} + {b!r} uses a token outside the first {smaller_vocab} ids: not a nested BPE")
    specials = [t for t in data.get("added_tokens", []) if t["id"] >= smaller_vocab]
    if specials:
        raise GrowlmError(f"special tokens {[t['content'] for t in specials]} lie beyond id {smaller_vocab - 1}")
    data["model"]["vocab"] = keep_vocab
    data["model"]["merges"] = [list(m) for m in keep_merges]
    tok = Tokenizer.from_str(json.dumps(data))
    cfg_path = Path(tokenizer_dir) / "tokenizer_config.json"
    kwargs = {}
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        kwargs = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if isinstance(cfg.get(k), str)}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def merge_sources(tokenizer_dir: str | Path, old_vocab: int) -> list[list[int]]:
    """For every id old_vocab..V-1 of the big nested BPE, the old ids (< old_vocab) it is made of, in order."""
    data = _load_json(tokenizer_dir)
    vocab: dict[str, int] = data["model"]["vocab"]
    parts: dict[int, list[int]] = {i: [i] for i in vocab.values() if i < old_vocab}
    for a, b in _merges(data):
        ia, ib, ic = vocab[a], vocab[b], vocab[a + b]
        if ic >= old_vocab:
            if ia not in parts or ib not in parts:
                raise GrowlmError(f"{tokenizer_dir}: merge {a!r} + {b!r} comes before its parts; not a nested BPE")
            parts[ic] = parts[ia] + parts[ib]
    n = max(vocab.values()) + 1
    missing = [i for i in range(old_vocab, n) if i not in parts]
    if missing:
        raise GrowlmError(f"{tokenizer_dir}: ids {missing[:5]} are not merges of older tokens (added tokens?); "
                          "cannot initialise them from the tokens they merge")
    return [parts[i] for i in range(old_vocab, n)]
