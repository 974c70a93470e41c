"""Parity with transformers reference models built from configs (never downloaded)."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from growlm.errors import GrowlmError
from growlm.models.hf import from_hf, load_model, save_growlm, save_hf, state_dict_from_hf, state_dict_to_hf, to_hf
from growlm.models.model import GPT
from tests.conftest import tiny_config

LLAMA_CASES = {
    "gqa-untied-theta": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-bias-headdim": dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True, head_dim=16),
}


def _llama(**kw):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, rms_norm_eps=1e-6)
    base.update(kw)
    cfg = LlamaConfig(**base)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


def _gpt2(**kw):
    base = dict(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    base.update(kw)
    return GPT2LMHeadModel(GPT2Config(**base)).eval()


def _randomise(hf):
    # HF initialises norms to 1 and biases to 0: perturb everything so each weight matters
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


HF_MODELS = {f"llama-{k}": (lambda kw=kw: _llama(**kw)) for k, kw in LLAMA_CASES.items()}
HF_MODELS["gpt2-tied"] = lambda: _gpt2()
HF_MODELS["gpt2-untied-ffn"] = lambda: _gpt2(tie_word_embeddings=False, n_inner=48)


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_import_from_hf_matches_logits(name):
    hf = _randomise(HF_MODELS[name]())
    ours = from_hf(hf).eval()
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_roundtrip_state_dict_is_exact(name):
    hf = _randomise(HF_MODELS[name]())
    ours = from_hf(hf)
    back = state_dict_to_hf(dict(ours.state_dict()), ours.config)
    ref = {k: v for k, v in hf.state_dict().items() if not (ours.config.tie_embeddings and k == "lm_head.weight")}
    assert set(back) == set(ref)
    for k in ref:
        assert torch.equal(back[k], ref[k]), k
    again = state_dict_from_hf(back, ours.config)
    assert all(torch.equal(again[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize(
    "family, overrides",
    [("gpt2", {}), ("gpt2", dict(tie_embeddings=False)), ("llama", {}),
     ("llama", dict(tie_embeddings=True, rope_theta=123456.0, n_kv_head=1)),
     ("llama", dict(attn_bias=True, proj_bias=True, mlp_bias=True, head_dim=12))],
)
def test_export_to_hf_loads_with_from_pretrained(tmp_path, family, overrides):
    model = GPT(tiny_config(family, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_hf(model, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if family == "gpt2" else "LlamaForCausalLM")
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=0)
    reloaded, _ = load_model(str(tmp_path / "out"))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
    # and the in-memory converter gives the same model
    with torch.no_grad():
        torch.testing.assert_close(to_hf(model)(x).logits, model(x), atol=1e-5, rtol=0)


def test_custom_mix_cannot_be_exported_to_hf():
    model = GPT(tiny_config("llama", norm="layernorm", norm_bias=True))
    with pytest.raises(GrowlmError, match="no Hugging Face class"):
        to_hf(model)


def test_gpt2_with_extra_heads_cannot_be_exported():
    model = GPT(tiny_config("gpt2", n_head=8, head_dim=8))
    with pytest.raises(GrowlmError, match="GPT2LMHeadModel cannot represent"):
        to_hf(model)


def test_unmapped_key_raises():
    hf = _llama()
    sd = dict(hf.state_dict())
    sd["model.layers.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(GrowlmError, match="unmapped checkpoint keys.*mystery"):
        state_dict_from_hf(sd, from_hf(hf).config)


def test_weights_that_do_not_fit_the_config_raise_one_line(tmp_path):
    model = GPT(tiny_config("llama"))
    save_growlm(model, tmp_path / "m")
    cfg = tmp_path / "m" / "growlm_config.json"
    for change, needle in [(dict(n_layer=3), "Missing key(s)"), (dict(n_layer=1), "Unexpected key(s)"),
                           (dict(ffn_size=48), "size mismatch for blocks.0.mlp")]:
        model.config.replace(**change).save(cfg)
        with pytest.raises(GrowlmError, match="checkpoint does not fit the config") as e:
            load_model(str(tmp_path / "m"))
        assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("save", [save_hf, save_growlm])
def test_failed_save_leaves_the_old_directory_intact(tmp_path, save):
    class BrokenTokenizer:
        def save_pretrained(self, d):
            (Path(d) / "half_written").write_text("x")
            raise OSError("disk full")

    old, new = GPT(tiny_config("gpt2")), GPT(tiny_config("gpt2"))
    save(old, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(OSError, match="disk full"):
        save(new, tmp_path / "out", BrokenTokenizer())
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    reloaded, _ = load_model(str(tmp_path / "out"))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), old.state_dict().values()))
