"""The CLI: bad input gives one clear line on stderr and exit code 2, no traceback."""

import json
import math
import subprocess
import sys

import pytest
import torch

from growlm.cli import main
from growlm.models.hf import load_model, save_growlm, save_hf
from growlm.models.model import GPT
from tests.conftest import tiny_config


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "growlm.cli", *args], capture_output=True, text=True, timeout=300)


def _assert_one_line_error(r, needle):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines and needle in lines[-1], r.stderr
    assert len(lines) == 1, r.stderr


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty_dir").mkdir()
    bert = d / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    good = d / "good"
    save_hf(GPT(tiny_config("llama")), good)
    trunc = d / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_text((good / "config.json").read_text())
    data = (good / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    garbage = d / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text((good / "config.json").read_text())
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    gguf = d / "not_a_lm.gguf"
    _write_non_lm_gguf(gguf)
    return d


def _write_non_lm_gguf(path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    "path, needle",
    [
        ("missing", "no such file or directory"),
        ("empty_dir", "not a model directory"),
        ("bert", "unsupported architecture 'bert'"),
        ("trunc", "corrupt or truncated safetensors"),
        ("garbage", "corrupt or truncated safetensors"),
        ("not_a_lm.gguf", "cannot load as a causal language model GGUF"),
    ],
)
def test_bad_model_input_exits_2_with_one_line(bad_inputs, path, needle):
    _assert_one_line_error(run_cli("info", "--model", str(bad_inputs / path)), needle)


def test_good_model_info_and_convert(bad_inputs, tmp_path):
    r = run_cli("info", "--model", str(bad_inputs / "good"), "--json_out", "true")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    good, _ = load_model(str(bad_inputs / "good"))
    assert {k: info[k] for k in ("family", "n_layer", "n_kv_head", "params_total", "params_non_embedding")} == {
        "family": "llama", "n_layer": 2, "n_kv_head": good.config.n_kv_head, "params_total": good.num_params(),
        "params_non_embedding": good.num_params(embeddings=False)}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_convert_writes_the_same_model_in_both_formats(tmp_path, family):
    """growlm -> hf -> growlm through the CLI: weights exact, logits equal to the source and to transformers'."""
    from transformers import AutoModelForCausalLM

    src = GPT(tiny_config(family, init_std=0.2, tie_embeddings=family == "gpt2")).eval()
    save_growlm(src, tmp_path / "src")
    x = torch.randint(0, 96, (2, 16))
    assert main(["convert", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert main(["convert", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--format", "growlm"]) == 0
    with torch.no_grad():
        want = src(x)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
        torch.testing.assert_close(hf(x).logits, want, atol=1e-5, rtol=0)
        for d in ("hf", "back"):
            m, _ = load_model(str(tmp_path / d))
            assert m.config == src.config, d
            assert m.state_dict().keys() == src.state_dict().keys(), d
            assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values())), d
            assert torch.equal(m(x), want), d
    assert want.abs().max() > 1  # large weights: a wrong transpose or head would show


def test_unknown_option_exits_2_with_one_line():
    r = run_cli("info", "--no_such_option", "1")
    _assert_one_line_error(r, "unrecognized arguments: --no_such_option")
    assert "growlm info --help" in r.stderr


def test_generate_and_perplexity_commands(tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    # a byte-level-ish word tokenizer over a tiny vocabulary, saved with a tiny model
    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["[UNK]"] = 95
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[UNK]")  # rolling windows start from EOS
    model = GPT(tiny_config("llama", init_std=0.3))
    save_hf(model, tmp_path / "m", tok)
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "hello", "--max_new_tokens", "5"]) == 0
    out = capsys.readouterr().out.strip()
    ids = torch.tensor([tok.encode("hello")])
    expected = tok.decode(model.eval().generate(ids, 5)[0].tolist())
    assert out == expected
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    assert main(["perplexity", "--model", str(tmp_path / "m"), "--text", str(text), "--window", "32"]) == 0
    res = json.loads(capsys.readouterr().out)
    # by hand: windows of 32 inputs, each token predicted once, the first from EOS; the last (partial) window
    # predicts its 16 new tokens with a full window of context, as lm-evaluation-harness does
    ids = tok.encode(text.read_text())
    inp = torch.tensor([tok.eos_token_id] + ids[:-1])  # inp[j] predicts ids[j]
    ll = 0.0
    assert len(ids) % 32 == 16
    with torch.no_grad():
        for s in range(0, len(ids), 32):
            e = min(s + 32, len(ids))
            lp = model(inp[None, e - 32: e])[0].log_softmax(-1)[s - (e - 32):]
            ll += lp.gather(-1, torch.tensor(ids[s: e])[:, None]).double().sum().item()
    n_bytes = len(text.read_text().encode())
    assert res["tokens"] == len(ids) == n_bytes  # one id per character here
    assert res["token_perplexity"] == pytest.approx(math.exp(-ll / len(ids)), rel=1e-6)
    assert res["bits_per_byte"] == pytest.approx(-ll / (n_bytes * math.log(2)), rel=1e-6)
    assert res["word_perplexity"] == pytest.approx(math.exp(-ll / 181), rel=1e-6)  # 180 words and a trailing ''


def test_tokenizer_command_trains_nested_bpe(tmp_path):
    from transformers import AutoTokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question; whether tis nobler in the mind to suffer\n" * 50)
    out = tmp_path / "tok"
    assert main(["tokenizer", "--out", str(out), "--vocab_size", "300", "--files", f"[{corpus}]", "--nested", "[280]"]) == 0
    big = AutoTokenizer.from_pretrained(out)
    small = AutoTokenizer.from_pretrained(out / "vocab_280")
    assert len(big) == 300 and len(small) == 280
    assert {t: i for t, i in big.get_vocab().items() if i < 280} == small.get_vocab()  # a prefix: same ids
    text = "to be or not to be"
    assert big.decode(big.encode(text)) == text
    assert max(small.encode(text)) < 280 and len(big.encode(text)) <= len(small.encode(text))
    assert main(["tokenizer", "--out", str(tmp_path / "x"), "--files", f"[{tmp_path / 'missing.txt'}]"]) == 2
