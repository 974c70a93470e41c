"""Integration: the embedded SmolLM2-135M-Instruct, against transformers' own GGUF loading."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_logits_match_transformers_gguf(smollm2):
    from transformers import AutoModelForCausalLM

    from growlm.models.assets import smollm2_gguf

    model, tok = smollm2
    f = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("To be, or not to be, that is the question: whether 'tis nobler in the mind")])
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    assert theirs.abs().max() > 10  # real logits, not a degenerate model
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)


def test_greedy_generation_knows_paris(smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok.encode("The capital of France is")])
    out = model.generate(ids, 8)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:].tolist())
    assert torch.equal(out, model.generate(ids, 8, use_cache=False))
