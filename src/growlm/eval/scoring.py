"""Log-likelihood scoring and perplexity that match EleutherAI's lm-evaluation-harness (Gao et al. 2021-2024).

The numbers growlm reports must mean what the harness's numbers mean, so every definition below follows
lm-eval 0.4 (`lm_eval/api/model.py` TemplateLM, `lm_eval/models/huggingface.py` HFLM, `lm_eval/utils.py`):

- `loglikelihood(ctx, cont)`: trailing spaces of the context move into the continuation; context +
  continuation are encoded together and the continuation is what follows the separately encoded context;
  an empty context conditions on the prefix token (BOS, else EOS). The sum of log p over the continuation
  tokens and `is_greedy` (argmax equals every continuation token) are returned. Too long inputs are cut
  from the left to `max_length + 1` tokens, as the harness does.
- `loglikelihood_rolling(text)`: the harness's disjoint windows of the model's context length (the first
  window is conditioned on the prefix token); `stride` gives overlapping (strided) windows instead.
- Perplexity (the harness's wikitext definitions): word_perplexity = exp(-sum LL / words),
  byte_perplexity = exp(-sum LL / bytes), bits_per_byte = -sum LL / (bytes ln 2). Token perplexity
  depends on the tokenizer and is always reported with the tokenizer's name.

Two things make it faster than the harness without changing a number (tests/test_eval.py checks both against
the harness and against the one-request-at-a-time path):
- continuations that share a context (the choices of one question) run their common token prefix once:
  by default packed into one row [context | choice 1 | choice 2 | ...] whose attention mask hides the
  choices from each other and whose position ids restart after the context for each choice, so rows of many
  questions batch together; or (share_context="cache") through a KV cache broadcast over the choices;
- only the scored positions go through the output head and the log-softmax (in chunks, so an 8k-token
  window over a 49k vocabulary never materialises all its logits).

Every scoring loop takes an optional `progress(done, total)`: called with (0, total) before the first forward
pass and after each batch, `done` counting the requests (rolling windows) scored so far, up to `total`. The
CLI turns it into a bar or a log line; this module never prints.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from growlm.errors import GrowlmError
from growlm.eval.tasks import get_task
from growlm.io import parse_dtype
from growlm.models.model import GPT, KVCache


# -- tokenisation, exactly as HFLM ---------------------------------------------------------------
def prefix_token_id(tokenizer) -> int:
    """The token an empty context conditions on: BOS if the tokenizer has one, else EOS (HFLM.prefix_token_id)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise GrowlmError("the tokenizer has neither a BOS nor an EOS token; empty contexts cannot be scored")
    return tid


def tok_encode(tokenizer, text: str) -> list[int]:
    """HFLM.tok_encode with default settings: the tokenizer's own special tokens, unless text starts with BOS."""
    kwargs = {}
    if text.startswith(tokenizer.decode(prefix_token_id(tokenizer))):
        kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as the harness builds them for a causal model."""
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        if not cont:
            raise GrowlmError("cannot score an empty continuation")
        p = prefix_token_id(tokenizer)
        return ([p], cont) if p != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:  # " word" tokenises as one token: keep the space with the word
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation)
    ctx = tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


# -- the model, without computing logits we do not need ------------------------------------------
def _autocast(dtype: str, device: torch.device):
    """bfloat16: autocast (the head and log-softmax still run in float32); float32: the model as it is."""
    if parse_dtype(dtype, ("float32", "bfloat16")) == torch.bfloat16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _score(model: GPT, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and greedy match for hidden rows h (N, C) predicting targets (N,).

    In chunks of rows: a rolling window of 8192 tokens over a 49k vocabulary would otherwise need 1.6 GB of
    logits per sequence.
    """
    lps, hits = [], []
    for s in range(0, h.shape[0], 2048):
        logits = F.linear(h[s: s + 2048], model.head_weight).float()  # log-softmax in float32 under bf16 too
        t = targets[s: s + 2048]
        lps.append(logits.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1))
        hits.append(logits.argmax(-1) == t)
    return torch.cat(lps), torch.cat(hits)


@dataclass
class _Req:
    inp: list[int]  # tokens fed to the model (context + continuation minus the last token, left-truncated)
    cont: list[int]  # continuation tokens: the last len(cont) positions of inp predict them


def _make_req(ctx: list[int], cont: list[int], max_length: int) -> _Req:
    if not ctx or not cont:
        raise GrowlmError("both the context and the continuation must have at least one token")
    if len(cont) > max_length:
        raise GrowlmError(f"continuation of {len(cont)} tokens exceeds the model's context length {max_length}")
    return _Req((ctx + cont)[-(max_length + 1):][:-1], cont)


def _run_batch(model: GPT, reqs: list[_Req], device, cache: KVCache | None = None) -> list[tuple[float, bool]]:
    """Score right-padded rows in one forward pass (causal: padding at the end changes no earlier logit)."""
    T = max(len(r.inp) for r in reqs)
    idx = torch.zeros(len(reqs), T, dtype=torch.long, device=device)
    for b, r in enumerate(reqs):
        idx[b, : len(r.inp)] = torch.tensor(r.inp, dtype=torch.long)
    h = model.hidden(idx, cache=cache)
    rows, cols, tgt, owner = [], [], [], []
    for b, r in enumerate(reqs):
        n, L = len(r.cont), len(r.inp)
        rows += [b] * n
        cols += range(L - n, L)
        tgt += r.cont
        owner += [b] * n
    lp, greedy = _score(model, h[rows, cols], torch.tensor(tgt, dtype=torch.long, device=device))
    owner_t = torch.tensor(owner, device=device)
    sums = torch.zeros(len(reqs), dtype=torch.float64, device=device).index_add_(0, owner_t, lp.double())
    misses = torch.zeros(len(reqs), dtype=torch.long, device=device).index_add_(0, owner_t, (~greedy).long())
    return [(float(s), bool(m == 0)) for s, m in zip(sums.tolist(), misses.tolist())]


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def _run_packed(model: GPT, groups: list[tuple[list[_Req], int]], device) -> list[list[tuple[float, bool]]]:
    """Score groups of requests that share their first p input tokens, one packed row per group.

    Row layout: shared prefix, then each member's remaining tokens. Position ids restart at p for every
    member, and a member attends to the prefix and causally to itself only, so each member sees exactly
    the sequence it would see alone.
    """
    rows = []
    for members, p in groups:
        toks, pos, seg, cols = list(members[0].inp[:p]), list(range(p)), [-1] * p, []
        for j, r in enumerate(members):
            start = len(toks)
            toks += r.inp[p:]
            pos += range(p, len(r.inp))
            seg += [j] * (len(r.inp) - p)
            cols.append(range(len(toks) - len(r.cont), len(toks)))
        rows.append((toks, pos, seg, cols))
    B, T = len(rows), max(len(r[0]) for r in rows)
    idx = torch.zeros(B, T, dtype=torch.long)
    pos_t = torch.zeros(B, T, dtype=torch.long)
    seg_t = torch.full((B, T), -2, dtype=torch.long)  # -2: padding, -1: shared prefix, j: member j
    for b, (toks, pos, seg, _) in enumerate(rows):
        idx[b, : len(toks)] = torch.tensor(toks)
        pos_t[b, : len(toks)] = torch.tensor(pos)
        seg_t[b, : len(toks)] = torch.tensor(seg)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = (seg_t[:, None, :] == -1) | (seg_t[:, None, :] == seg_t[:, :, None])  # (B, Tq, Tk)
    mask = (causal & same) | torch.eye(T, dtype=torch.bool)  # padding attends to itself: no empty rows
    h = model.hidden(idx.to(device), pos=pos_t.to(device), mask=mask[:, None].to(device))  # mask (B, 1, T, T)
    b_idx, c_idx, tgt, owner = [], [], [], []
    n = 0  # members scored so far
    for b, ((members, _), (_, _, _, cols)) in enumerate(zip(groups, rows)):
        for r, cs in zip(members, cols):
            b_idx += [b] * len(cs)
            c_idx += cs
            tgt += r.cont
            owner += [n] * len(cs)
            n += 1
    return _per_request(model, h, b_idx, c_idx, tgt, owner, [len(m) for m, _ in groups], device)


def _run_rows(model: GPT, rows: list[tuple[list[int], list[_Req]]], device, cache: KVCache | None
              ) -> list[list[tuple[float, bool]]]:
    """Score requests that share one input row each: rows (tail tokens, members), right-padded, continuing
    `cache` (expanded over the batch); member r scores its continuation at the row's last len(r.cont) positions."""
    T = max(len(t) for t, _ in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (t, _) in enumerate(rows):
        idx[b, : len(t)] = torch.tensor(t, dtype=torch.long)
    h = model.hidden(idx.to(device), cache=cache.expand(len(rows)) if cache is not None else None)
    b_idx, c_idx, tgt, owner = [], [], [], []
    n = 0
    for b, (t, members) in enumerate(rows):
        for r in members:
            b_idx += [b] * len(r.cont)
            c_idx += range(len(t) - len(r.cont), len(t))
            tgt += r.cont
            owner += [n] * len(r.cont)
            n += 1
    return _per_request(model, h, b_idx, c_idx, tgt, owner, [len(m) for _, m in rows], device)


def _per_request(model: GPT, h: torch.Tensor, b_idx: list[int], c_idx: list[int], tgt: list[int], owner: list[int],
                 sizes: list[int], device) -> list[list[tuple[float, bool]]]:
    """(log p sum, is_greedy) per request from the hidden states at (b_idx, c_idx) predicting `tgt`;
    `owner` says which request each position belongs to, `sizes` how many requests each group holds."""
    lp, greedy = _score(model, h[b_idx, c_idx], torch.tensor(tgt, dtype=torch.long, device=device))
    owner_t = torch.tensor(owner, device=device)
    n = sum(sizes)
    sums = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, owner_t, lp.double())
    misses = torch.zeros(n, dtype=torch.long, device=device).index_add_(0, owner_t, (~greedy).long())
    flat = [(float(s), bool(m == 0)) for s, m in zip(sums.tolist(), misses.tolist())]
    out, k = [], 0
    for size in sizes:
        out.append(flat[k: k + size])
        k += size
    return out


def _score_prefixed(model: GPT, reqs: list[_Req], batch_size: int, device, tick: Callable[[int], None]
                    ) -> list[tuple[float, bool]]:
    """All requests' common input prefix (a task's few-shot preamble) runs once into a KV cache; requests
    with the same remaining input (single-token choices of one question) share one row after it."""
    p = min(_common_prefix([r.inp for r in reqs]), min(len(r.inp) - len(r.cont) for r in reqs)) if reqs else 0
    cache = None
    if p >= 1 and len(reqs) > 1:
        cache = KVCache()
        model.hidden(torch.tensor([reqs[0].inp[:p]], device=device), cache=cache)
    else:
        p = 0
    by_tail: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, r in enumerate(reqs):
        by_tail[tuple(r.inp[p:])].append(i)
    tails = sorted(by_tail, key=lambda t: (-len(t), t))
    out: list[tuple[float, bool] | None] = [None] * len(reqs)
    for start in range(0, len(tails), batch_size):
        chunk = tails[start: start + batch_size]
        scored = _run_rows(model, [(list(t), [reqs[i] for i in by_tail[t]]) for t in chunk], device, cache)
        for t, res in zip(chunk, scored):
            for i, r in zip(by_tail[t], res):
                out[i] = r
        tick(sum(len(by_tail[t]) for t in chunk))
    return out  # type: ignore[return-value]


SHARING = ("packed", "cache", "none", "prefix")


@torch.no_grad()
def loglikelihood_tokens(
    model: GPT,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 16,
    dtype: str = "float32",
    max_length: int | None = None,
    share_context: str = "packed",
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[float, bool]]:
    """(log p sum, is_greedy) for token-level (context, continuation) pairs, in the order given;
    `progress(done, total)` after each batch (done: requests scored).

    Requests with the same context (the choices of one question) share the forward pass of their common
    input-token prefix (only the common prefix: joint encoding may change tokens at the boundary):
    - "packed": one row per question, [prefix | choice 1 | choice 2 ...] with a mask that hides the choices
      from each other; rows of several questions are batched (`batch_size` continuations per pass);
    - "cache": the prefix runs once into a KVCache that is broadcast over the choices, one question per pass;
    - "none": every request alone, the harness's way;
    - "prefix": the common input prefix of all requests (a subject's few-shot preamble) runs once into a
      KV cache and each distinct remainder is one row after it (`batch_size` rows per pass).
    Requests without a sibling are batched longest-first, right-padded, as the harness does.
    """
    if share_context is True or share_context is False:
        share_context = "packed" if share_context else "none"
    if share_context not in SHARING:
        raise GrowlmError(f"share_context must be one of {', '.join(SHARING)}, got {share_context!r}")
    if batch_size < 1:
        raise GrowlmError(f"batch_size must be >= 1, got {batch_size}")
    max_length = max_length or model.config.block_size
    device = next(model.parameters()).device
    reqs = [_make_req(list(c), list(x), max_length) for c, x in requests]
    out: list[tuple[float, bool] | None] = [None] * len(reqs)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, len(reqs))

    tick(0)
    was_training = model.training
    model.eval()
    try:
        with _autocast(dtype, device):
            if share_context == "prefix":
                return _score_prefixed(model, reqs, batch_size, device, tick)
            singles = list(range(len(reqs)))
            if share_context != "none":
                by_ctx: dict[tuple[int, ...], list[int]] = defaultdict(list)
                for i, (ctx, _) in enumerate(requests):
                    by_ctx[tuple(ctx)].append(i)
                singles, shared = [], []
                for members in by_ctx.values():
                    # the shared part must end before the first scored position of every member
                    p = min(_common_prefix([reqs[i].inp for i in members]),
                            min(len(reqs[i].inp) - len(reqs[i].cont) for i in members))
                    if len(members) < 2 or p < 1:
                        singles += members
                    else:
                        shared.append((members, p))
                if share_context == "cache":
                    for members, p in shared:
                        cache = KVCache()
                        model.hidden(torch.tensor([reqs[members[0]].inp[:p]], device=device), cache=cache)
                        for start in range(0, len(members), batch_size):
                            chunk = members[start: start + batch_size]
                            tails = [_Req(reqs[i].inp[p:], reqs[i].cont) for i in chunk]
                            for i, r in zip(chunk, _run_batch(model, tails, device, cache.expand(len(chunk)))):
                                out[i] = r
                            tick(len(chunk))
                else:
                    # rows of similar packed length share a batch
                    shared.sort(key=lambda g: -(g[1] + sum(len(reqs[i].inp) - g[1] for i in g[0])))
                    batch: list[tuple[list[int], int]] = []
                    for k, g in enumerate(shared):
                        batch.append(g)
                        if sum(len(m) for m, _ in batch) >= batch_size or k == len(shared) - 1:
                            scored = _run_packed(model, [([reqs[i] for i in m], p) for m, p in batch], device)
                            for (m, _), res in zip(batch, scored):
                                for i, r in zip(m, res):
                                    out[i] = r
                            tick(sum(len(m) for m, _ in batch))
                            batch = []
            # longest first, like the harness's Collator: similar lengths share a batch, OOMs come early
            singles.sort(key=lambda i: (-len(reqs[i].inp) - 1, tuple(reqs[i].inp)))
            for start in range(0, len(singles), batch_size):
                chunk = singles[start: start + batch_size]
                for i, r in zip(chunk, _run_batch(model, [reqs[i] for i in chunk], device)):
                    out[i] = r
                tick(len(chunk))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def loglikelihood(
    model: GPT,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    dtype: str = "float32",
    max_length: int | None = None,
    share_context: str = "packed",
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), is_greedy) per (context, continuation) string pair;
    `progress(done, total)` after each batch (done: pairs scored)."""
    toks = [encode_pair(tokenizer, c, x) for c, x in requests]
    return loglikelihood_tokens(model, toks, batch_size, dtype, max_length, share_context, progress)


# -- rolling windows (perplexity) ----------------------------------------------------------------
def rolling_windows(tokens: list[int], prefix_token: int, max_length: int, stride: int | None = None
                    ) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that predict every token once (utils.get_rolling_token_windows +
    make_disjoint_window). stride=None: disjoint windows of max_length predictions (the harness default);
    otherwise each later window predicts `stride` new tokens with up to max_length - stride tokens of context.
    """
    if not tokens:
        return []
    context_len = 1 if stride is None else max_length - stride + 1
    if not 1 <= context_len <= max_length:
        raise GrowlmError(f"stride must be in 1..{max_length}, got {stride}")
    pred_len = max_length - context_len + 1
    first = min(max_length, len(tokens))
    windows = [([prefix_token] + tokens[: first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, pred_len)
        end = done + n
        windows.append((tokens[max(0, end - max_length - 1): end - 1], tokens[end - n: end]))
        done = end
    # make the context stop where the predictions start
    return [(a[: len(a) - (len(b) - 1)], b) for a, b in windows]


def loglikelihood_rolling(
    model: GPT,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 16,
    dtype: str = "float32",
    max_length: int | None = None,
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Total log-likelihood of each text (every token scored once) with the harness's rolling windows;
    `progress(done, total)` after each batch (done: windows scored)."""
    max_length = max_length or model.config.block_size
    p = prefix_token_id(tokenizer)
    windows, owner = [], []
    for i, t in enumerate(texts):
        for w in rolling_windows(tok_encode(tokenizer, t), p, max_length, stride):
            windows.append(w)
            owner.append(i)
    scores = loglikelihood_tokens(model, windows, batch_size, dtype, max_length, share_context="none", progress=progress)
    totals = [0.0] * len(texts)
    for i, (ll, _) in zip(owner, scores):
        totals[i] += ll
    return totals


def count_words(text: str) -> int:
    """Words as the harness's wikitext task counts them: len(re.split(r"\\s+", text))."""
    return len(re.split(r"\s+", text))


def perplexity_metrics(loglikelihood_sum: float, n_tokens: int, n_words: int, n_bytes: int,
                       tokenizer_name: str) -> dict[str, float | str]:
    """Token/word/byte perplexity and bits per byte from a total log-likelihood and counts."""
    return {
        "token_perplexity": math.exp(-loglikelihood_sum / n_tokens),
        "tokenizer": tokenizer_name,
        "word_perplexity": math.exp(-loglikelihood_sum / n_words),
        "byte_perplexity": math.exp(-loglikelihood_sum / n_bytes),
        "bits_per_byte": -loglikelihood_sum / (n_bytes * math.log(2)),
        "tokens": n_tokens,
        "words": n_words,
        "bytes": n_bytes,
    }


def tokenizer_name(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return f"{name} (vocab {len(tokenizer)})"


def perplexity(
    model: GPT,
    tokenizer,
    texts: str | Sequence[str],
    batch_size: int = 16,
    dtype: str = "float32",
    max_length: int | None = None,
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float | str]:
    """Perplexity metrics of documents (each scored from its own start, as the harness does);
    `progress(done, total)` after each batch (done: rolling windows scored)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    lls = loglikelihood_rolling(model, tokenizer, texts, batch_size, dtype, max_length, stride, progress)
    n_tokens = sum(len(tok_encode(tokenizer, t)) for t in texts)
    n_words = sum(count_words(t) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return perplexity_metrics(sum(lls), n_tokens, n_words, n_bytes, tokenizer_name(tokenizer))


# -- statistics as the harness computes them -------------------------------------------------------
def mean_stderr(xs: Sequence[float]) -> float:
    """Standard error of a mean with the sample (n - 1) standard deviation (lm_eval.api.metrics.mean_stderr)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


# -- tasks -----------------------------------------------------------------------------------------
def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])  # first maximum, as numpy.argmax


def evaluate_loglikelihood_tasks(
    model: GPT,
    tokenizer,
    tasks: str | Sequence[str],
    data_dir: str,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 16,
    dtype: str = "float32",
    seed: int = 1234,
    max_length: int | None = None,
    share_context: str = "packed",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Score tasks read from local files the way lm-evaluation-harness does.

    `progress(done, total)` after each batch, per task: each task counts from 0 to its own total (requests,
    or rolling windows for perplexity tasks), one task after the other.

    Few-shot examples are drawn from the task's own file with `random.Random(seed)` in document order, the
    evaluated document left out (the harness's ContextSampler with its default fewshot seed 1234).
    Returns {"results": {task: metrics}, "samples": {task: per-document scores}}.
    """

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    if num_fewshot < 0:
        raise GrowlmError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and limit < 1:
        raise GrowlmError(f"limit must be a positive number of documents, got {limit}")
    results, samples = {}, {}
    for name in names:
        task = get_task(name)
        path = task.find_file(data_dir)
        docs = task.load(path)
        eval_docs = docs[:limit] if limit else docs
        if num_fewshot and task.output_type == "loglikelihood_rolling":
            raise GrowlmError(f"{name}: perplexity tasks take no few-shot examples (num_fewshot must be 0)")
        if num_fewshot >= len(docs):
            raise GrowlmError(f"{name}: num_fewshot={num_fewshot} needs more than the {len(docs)} documents in {path}")
        rnd = random.Random(seed)
        reqs: list[tuple[str, str]] = []
        spans = []
        for doc in eval_docs:
            fewshot = ""
            if num_fewshot:
                shots = [x for x in rnd.sample(docs, num_fewshot + 1) if x != doc][:num_fewshot]
                fewshot = "".join(task.fewshot_example(x) for x in shots)
            r = task.requests(doc, fewshot)
            spans.append((len(reqs), len(reqs) + len(r)))
            reqs += r
        res: dict = {"n": len(eval_docs), "num_fewshot": num_fewshot, "file": str(path)}
        per_doc = []
        if task.output_type == "loglikelihood_rolling":
            texts = [c for _, c in reqs]
            lls = loglikelihood_rolling(model, tokenizer, texts, batch_size, dtype, max_length, progress=progress)
            # the harness counts words and bytes of the page before detokenisation
            words = [count_words(d["page"]) for d in eval_docs]
            nbytes = [len(d["page"].encode("utf-8")) for d in eval_docs]
            n_tokens = sum(len(tok_encode(tokenizer, t)) for t in texts)
            m = perplexity_metrics(sum(lls), n_tokens, sum(words), sum(nbytes), tokenizer_name(tokenizer))
            res.update(m)
            per_doc = [{"loglikelihood": ll, "words": w, "bytes": b} for ll, w, b in zip(lls, words, nbytes)]
        else:
            scores = loglikelihood(model, tokenizer, reqs, batch_size, dtype, max_length, share_context, progress)
            for doc, (a, b) in zip(eval_docs, spans):
                lls = [s[0] for s in scores[a:b]]
                greedy = [s[1] for s in scores[a:b]]
                item: dict = {"loglikelihoods": lls, "is_greedy": greedy}
                if task.output_type == "loglikelihood":
                    item["acc"] = float(greedy[0])
                else:
                    gold = task.gold(doc)
                    choices = task.doc_to_choice(doc)
                    item["gold"] = gold
                    item["acc"] = float(_argmax(lls) == gold)
                    item["acc_norm"] = float(_argmax([ll / len(c) for ll, c in zip(lls, choices)]) == gold)
                per_doc.append(item)
            if task.output_type == "loglikelihood":
                lls = [d["loglikelihoods"][0] for d in per_doc]
                res["perplexity"] = math.exp(-sum(lls) / len(lls))
                # delta method (the harness bootstraps this one): d exp(-m) = exp(-m) dm
                res["perplexity_stderr"] = res["perplexity"] * mean_stderr(lls)
            for metric in task.metrics:
                if metric in ("acc", "acc_norm"):
                    xs = [d[metric] for d in per_doc]
                    res[metric] = sum(xs) / len(xs)
                    res[f"{metric}_stderr"] = mean_stderr(xs)
        results[name] = res
        samples[name] = per_doc
    return {"results": results, "samples": samples}
