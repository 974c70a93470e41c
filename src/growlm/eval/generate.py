"""Greedy generation for scoring, as lm-evaluation-harness's HFLM.generate_until does it.

- Contexts are encoded one by one (the tokenizer's special tokens, unless the text starts with BOS),
  left-truncated to `max_length - max_gen_toks` tokens, and run longest first in left-padded batches
  through `GPT.generate` with the KV cache (each row's positions start at its first real token).
- The tokenizer's EOS text joins the stop sequences. A row ends at the EOS token, when the decoded new text
  (special tokens kept, as the harness's stopping criterion decodes it) contains a stop sequence, or
  after `max_gen_toks` tokens.
- The result is the new tokens decoded without special tokens and cut before the first occurrence of each
  stop sequence in turn (lm_eval.models.utils.postprocess_generated_text).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from growlm.errors import GrowlmError
from growlm.eval.scoring import _autocast, tok_encode
from growlm.models.model import GPT


def stop_sequences(tokenizer, until: Sequence[str]) -> list[str]:
    """`until` plus the tokenizer's EOS text (lm_eval.models.utils.handle_stop_sequences)."""
    out = list(until)
    if tokenizer.eos_token_id is not None:
        eos = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
        if eos not in out:
            out.append(eos)
    return out


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text


@torch.no_grad()
def generate_tokens(
    model: GPT,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    eos_token_id: int | None = None,
    stop=None,
    batch_size: int = 16,
    dtype: str = "float32",
    progress: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations of token prompts (new tokens only, each cut after its EOS), longest first in
    left-padded batches; stop(i, new_tokens) -> True ends prompt i early. `progress(done, total)`: (0, total)
    first, then after each batch (done: prompts completed)."""
    if batch_size < 1:
        raise GrowlmError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), tuple(prompts[i])))
    out: list[list[int]] = [[] for _ in prompts]
    if progress is not None:
        progress(0, len(prompts))
    was_training = model.training
    model.eval()
    try:
        with _autocast(dtype, device):
            for start in range(0, len(order), batch_size):
                chunk = order[start: start + batch_size]
                T = max(len(prompts[i]) for i in chunk)
                if min(len(prompts[i]) for i in chunk) < 1:
                    raise GrowlmError("cannot generate from an empty prompt")
                idx = torch.zeros(len(chunk), T, dtype=torch.long)
                for b, i in enumerate(chunk):
                    idx[b, T - len(prompts[i]):] = torch.tensor(prompts[i])
                row_stop = None if stop is None else (lambda b, new, chunk=chunk: stop(chunk[b], new))
                gen = model.generate(idx.to(device), max_new_tokens, eos_token_id=eos_token_id,
                                     prompt_lengths=[len(prompts[i]) for i in chunk], stop=row_stop)
                for b, i in enumerate(chunk):
                    toks = gen[b, T:].tolist()
                    if eos_token_id is not None and eos_token_id in toks:
                        toks = toks[: toks.index(eos_token_id) + 1]
                    out[i] = toks
                if progress is not None:
                    progress(start + len(chunk), len(prompts))
    finally:
        model.train(was_training)
    return out


def generate_until(
    model: GPT,
    tokenizer,
    contexts: Sequence[str],
    until: Sequence[str] = (),
    max_gen_toks: int = 256,
    batch_size: int = 16,
    dtype: str = "float32",
    max_length: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy completions of `contexts`, cut at the stop sequences (HFLM.generate_until semantics);
    `progress(done, total)` after each batch (done: contexts completed)."""
    max_length = max_length or model.config.block_size
    max_ctx = max_length - max_gen_toks
    if max_ctx < 1:
        raise GrowlmError(f"max_gen_toks={max_gen_toks} leaves no room for a context in {max_length} tokens")
    stops = stop_sequences(tokenizer, until)
    prompts = [tok_encode(tokenizer, c)[-max_ctx:] for c in contexts]

    lookback = max(len(s) for s in stops) + 2  # a stop text of n characters spans at most n + 2 tokens
    model_eos = model.config.eos_token_id  # HF generate also ends a row at the model's own EOS

    def stopped(i: int, new: list[int]) -> bool:
        # as the harness's stopping criterion: decode the last few new tokens, special tokens kept
        text = tokenizer.decode(new[-lookback:], skip_special_tokens=False)
        return new[-1] == model_eos or any(s and s in text for s in stops)

    toks = generate_tokens(model, prompts, max_gen_toks, tokenizer.eos_token_id, stopped, batch_size, dtype, progress)
    return [cut_at_stops(tokenizer.decode(t, skip_special_tokens=True), stops) for t in toks]
