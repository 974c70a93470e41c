"""Vocabulary growth for a nested BPE: V -> V' tokens.

The small tokenizer is a prefix of the big one (see growlm.models.tokenizer), so every new token t >= V
is a merge of old tokens. Row t of wte (and of an untied lm_head) is the mean of the rows of the old
tokens that t merges (`GrowthSpec.vocab_sources`; without them, the mean of all old rows). Old rows are
unchanged, so on old-token inputs the logits of old tokens are exactly unchanged; the softmax now also
covers the new tokens, so the loss of old-tokenised text rises by

    log(1 + sum_new e^z / sum_old e^z) >= 0          (z: the logits at one position)

Not function-preserving: measure the loss change (bits per byte) on the same text tokenised each way
(bench/grow.py does). The operator reads nothing from disk: `growlm.growth.with_vocab_sources` turns a
tokenizer directory into `vocab_sources` first.
"""

from __future__ import annotations

import torch

from growlm.errors import GrowlmError
from growlm.growth.spec import GrowthSpec, ParamMap, Step
from growlm.models.model import GPT


def grow_vocab(model: GPT, spec: GrowthSpec) -> Step:
    cfg = model.config
    V = cfg.vocab_size
    Vn = spec.vocab_size
    sources = spec.vocab_sources
    if sources is None and spec.tokenizer is not None:
        raise GrowlmError(f"vocab growth from the tokenizer {spec.tokenizer} needs its merge table: resolve the spec "
                          "with growlm.growth.with_vocab_sources(spec, model.config.vocab_size) first")
    if Vn is None and sources is not None:
        Vn = V + len(sources)
    if Vn is None:
        raise GrowlmError("vocab growth needs vocab_size (or vocab_sources, or a tokenizer directory)")
    if Vn < V:
        raise GrowlmError(f"cannot shrink vocab_size from {V} to {Vn}: growth operators only grow")
    if Vn == V:
        raise GrowlmError(f"vocab growth changes nothing: vocab_size is already {V}")
    if sources is not None:
        if len(sources) != Vn - V:
            raise GrowlmError(f"vocab_sources has {len(sources)} entries but {Vn - V} new tokens (ids {V}..{Vn - 1})")
        bad = [s for s in sources if not s or any(not 0 <= t < V for t in s)]
        if bad:
            raise GrowlmError(f"vocab_sources must list old token ids in 0..{V - 1} for every new token; bad entry {bad[0]}")
    src = torch.cat([torch.arange(V), torch.full((Vn - V,), -1)])  # new rows are fresh: new generation, scale 1
    values, pmap = {}, {}
    for name, p in model.named_parameters():
        p = p.detach()
        if name in ("wte.weight", "lm_head.weight"):
            if sources is None:
                new_rows = p.mean(0, keepdim=True).expand(Vn - V, -1)  # no merge information: mean embedding
            else:
                new_rows = torch.stack([p[torch.tensor(s, device=p.device)].mean(0) for s in sources])
            values[name] = torch.cat([p, new_rows.to(p.dtype)])
            pmap[name] = ParamMap(name, (src, None))
        else:
            values[name] = p.clone()
            pmap[name] = ParamMap(name)
    return Step(config=cfg.replace(vocab_size=Vn), values=values, param_map=pmap, function_preserving=False,
                record={"vocab_init": "mean of merged old tokens" if sources is not None else "mean of all old rows",
                        "old_rows_unchanged": True})
