"""`growlm grow`: grow a checkpoint offline (depth, then width, then vocabulary) and write a directory.

Like LLaMA-Pro's block-expansion script, but for every growlm operator. Besides the model (Hugging Face
format by default) the output holds `growth.json` (one record per step, see growlm.growth),
`growth_generations.safetensors` (the generation tag of every weight element) and, after width growth,
`growth_update_scale.safetensors` (per-element update multipliers the training loop must apply). Both are
stored in factored form, a few vectors per weight (growlm.growth.factored; read them back with
`unpack(safetensors.torch.load_file(path), op)`, op "max" for generations and "mul" for update scales).
"""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from growlm.errors import GrowlmError
from growlm.growth import GrowthSpec, grow_many, with_vocab_sources
from growlm.growth.factored import pack
from growlm.io import atomic_dir, check_output, parse_dtype
from growlm.models.hf import DEFAULT_MODEL, load_model, save_growlm, save_hf

console = Console()

def grow(
    out: str,
    model: str = DEFAULT_MODEL,
    depth: int = 0,
    where: str = "interleave",
    layers: list[int] | None = None,
    init: str = "copy",
    stack: bool = False,
    factor: int | None = None,
    width: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    ffn: int | None = None,
    head_dim: int | None = None,
    ffn_init: str = "clone",
    noise: float = 0.01,
    tokenizer: str | None = None,
    format: str = "hf",
    seed: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
) -> None:
    """Grow a model and write it (depth first, then width, then vocabulary; each step is one generation).

    Args:
        out: output directory (written atomically).
        model: preset name ('smollm2-135m'), model directory, .gguf file or hub id.
        depth: number of new blocks (0: no depth growth).
        where: 'interleave' (every n_layer/depth layers, as LLaMA-Pro), 'top', or 'after' (with --layers).
        layers: old layer indices to insert after (where='after').
        init: new blocks 'copy' the block below or are 'random'; their o/down projections are zeroed.
        stack: copy blocks without zeroing (G_stack): NOT function-preserving.
        factor: multiply hidden size, heads, KV heads and FFN size by this integer (cloning, exact).
        width: new hidden size n_embd.
        heads: new number of query heads (head_dim fixed).
        kv_heads: new number of KV heads (a multiple of the old one, dividing heads).
        ffn: new FFN size.
        head_dim: new head size (learned positions only, e.g. GPT-2 wider at a fixed head count).
        ffn_init: new FFN units 'clone' old ones or are 'zero' (fresh, zero down columns).
        noise: symmetry-breaking noise (cancelling pairs) for cloned units, relative to each weight's std.
        tokenizer: directory of a bigger nested BPE tokenizer: grow the vocabulary to it (not exact).
        format: 'hf' (transformers AutoModelForCausalLM) or 'growlm' (any architecture).
        seed: seed of the noise and random initialisation.
        dtype: float32 or float64 (the dtype the growth is done and saved in).
        overwrite: replace an existing output directory (without it an existing --out is refused).
    """
    dt = parse_dtype(dtype, allowed=("float32", "float64"))
    if format not in ("hf", "growlm"):
        raise GrowlmError(f"format must be 'hf' or 'growlm', got {format!r}")
    for name, v in (("depth", depth), ("factor", factor), ("width", width), ("heads", heads), ("kv_heads", kv_heads),
                    ("ffn", ffn), ("head_dim", head_dim)):
        if v is not None and v < (0 if name == "depth" else 1):
            raise GrowlmError(f"--{name} must be {'>= 0' if name == 'depth' else 'a positive integer'}, got {v}")
    specs: list[GrowthSpec] = []
    if depth or layers:
        specs.append(GrowthSpec(operator="stack" if stack else "depth", n=depth or 1, where=where,
                                layers=layers, init=init))
    if factor or width or heads or kv_heads or ffn or head_dim:
        specs.append(GrowthSpec(operator="width", factor=factor, n_embd=width, n_head=heads, n_kv_head=kv_heads,
                                ffn_size=ffn, head_dim=head_dim, ffn_init=ffn_init, noise=noise))
    if tokenizer:
        specs.append(GrowthSpec(operator="vocab", tokenizer=tokenizer))
    if not specs:
        raise GrowlmError("nothing to grow: give --depth, --layers, --factor, --width, --heads, --kv_heads, --ffn, "
                          "--head_dim or --tokenizer")

    check_output(out, overwrite)
    m, tok = load_model(model, dtype=dt)
    specs = [with_vocab_sources(s, m.config.vocab_size) for s in specs]  # depth and width keep the vocabulary
    m, results = grow_many(m, specs, seed=seed)  # rebinding `m` frees the input model
    records = [r.record for r in results]
    gens, scales = results[-1].generations, results[-1].update_scale
    del results  # and the intermediate models
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    with atomic_dir(out) as tmp:
        try:
            (save_hf if format == "hf" else save_growlm)(m, tmp, tok)
        except GrowlmError as e:
            raise GrowlmError(f"{e}; write the grown model with --format growlm instead") from None
        (tmp / "growth.json").write_text(json.dumps({"source": model, "steps": records}, indent=2) + "\n")
        save_file(pack(gens), str(tmp / "growth_generations.safetensors"), metadata={"op": "max"})
        if scales:
            save_file(pack(scales), str(tmp / "growth_update_scale.safetensors"), metadata={"op": "mul"})

    t = Table(title=f"growlm grow {model} -> {out}")
    for col in ("step", "operator", "change", "params", "exact", "max |dlogit|"):
        t.add_column(col, justify="left" if col in ("operator", "change") else "right")
    for i, r in enumerate(records):
        b, a = r["config_before"], r["config_after"]
        change = ", ".join(f"{k} {b[k]}->{a[k]}" for k in b if b[k] != a[k] and k != "norm_eps")
        t.add_row(str(i + 1), r["operator"], change, f"{r['params_before']:,} -> {r['params_after']:,}",
                  "yes" if r["function_preserving"] else "NO", f"{r['max_abs_logit_diff']:.1e}")
    console.print(t)
    console.print(f"wrote {out} ({format}); growth record: {out}/growth.json")
