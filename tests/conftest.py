"""Shared test fixtures: deterministic seeds, float32 default, tiny configs, real-data locations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from growlm.models.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GROWLM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed_dtype_threads(request):
    """Seed, restore the default dtype, and use one thread for tiny models (thread overhead dominates them)."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def tiny_config(family: str = "llama", **overrides) -> ModelConfig:
    """2 layers, n_embd 32, vocab 96: small enough for exact fp64 checks."""
    cfg = ModelConfig.from_preset(f"tiny-{family}")
    return cfg.replace(**overrides) if overrides else cfg


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"benchmark data {p} is absent (tests read ../shared/data beside the repo)")
    return p


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct as (growlm model in float32, tokenizer); skips if not installed."""
    from growlm.errors import GrowlmError
    from growlm.models.hf import load_model

    try:
        model, tok = load_model("smollm2-135m")
    except GrowlmError as e:
        pytest.skip(str(e))
    return model.eval(), tok
