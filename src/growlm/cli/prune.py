"""`growlm prune`: cut a student out of a teacher (depth, then width) and write it with the teacher's tokenizer.

The calibration text (the embedded Shakespeare by default, or a text/jsonl file or folder) is split by
document: the first `calibration_batches` blocks of `seq_len` tokens of the training side measure the
importances, `val_blocks` blocks of the held-out side give the validation loss (mean next-token
cross-entropy) of the teacher, of the pruned student before any training and of a random-init student of
the same shape. The output folder holds the student (Hugging Face format by default) and `prune.json`
(spec, kept layers / heads / channels, importances, parameter counts, losses).
"""

from __future__ import annotations

import json
import math

import torch
from rich.console import Console
from rich.table import Table

from growlm.distill.prune import StudentSpec, block_loss, make_student
from growlm.errors import GrowlmError
from growlm.io import atomic_dir, check_output, parse_dtype
from growlm.models.config import module_diff
from growlm.models.hf import DEFAULT_MODEL, load_model, save_growlm, save_hf
from growlm.train.data import read_documents, split_documents, text_blocks

console = Console()


def parse_layers(layers: list[int] | str | int | None) -> list[int] | None:
    """'0,2,4' (or a list, or one integer) -> [0, 2, 4]."""
    if layers is None or isinstance(layers, list):
        return layers
    if isinstance(layers, int):
        return [layers]
    try:
        return [int(p) for p in str(layers).strip("[] ").split(",") if p.strip()]
    except ValueError:
        raise GrowlmError(f"--layers must be comma-separated layer indices such as 0,2,4, got {layers!r}") from None


def calibration_blocks(path: str | None, tokenizer, seq_len: int, n_calib: int, n_val: int,
                       seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, validation) blocks of seq_len + 1 token ids from disjoint documents of `path` (a single
    document: its head calibrates, its tail validates)."""
    docs = read_documents(path)
    train, val = split_documents(docs, 0.1, seed)
    if val:
        a, b = "\n\n".join(d.text for d in train), "\n\n".join(d.text for d in val)
    else:
        text = docs[0].text
        a, b = text[: len(text) // 2], text[len(text) // 2:]
    return _blocks(a, tokenizer, seq_len, n_calib, "calibration"), _blocks(b, tokenizer, seq_len, n_val, "validation")


def _blocks(text: str, tokenizer, seq_len: int, n: int, what: str) -> torch.Tensor:
    budget = 16 * n * (seq_len + 1)  # characters: enough for >= 1 char per token with room to spare
    blocks = text_blocks(text[:budget], tokenizer, seq_len, n) if len(text) > budget else None
    if blocks is None or blocks.shape[0] < n:
        blocks = text_blocks(text, tokenizer, seq_len, n)
    if blocks.shape[0] < n:
        raise GrowlmError(f"the {what} text holds only {blocks.shape[0]} blocks of {seq_len + 1} tokens; "
                          f"ask for fewer or give more text")
    return blocks


def prune(
    out: str,
    model: str = DEFAULT_MODEL,
    layers: list[int] | str | None = None,
    n_layer: int | None = None,
    depth_by: str = "uniform",
    every: int | None = None,
    n_head: int | None = None,
    n_kv_head: int | None = None,
    ffn_size: int | None = None,
    n_embd: int | None = None,
    calibration: str | None = None,
    calibration_batches: int = 8,
    seq_len: int = 128,
    val_blocks: int = 8,
    format: str = "hf",
    seed: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
) -> None:
    """Cut a student from a teacher (depth first, then width) and write it with the teacher's tokenizer.

    Args:
        out: output directory (written atomically; refused if it exists, unless --overwrite).
        model: the teacher: preset name ('smollm2-135m'), model directory, .gguf file or hub id.
        layers: teacher layer indices to keep, e.g. 0,2,4 or [0,2,4].
        n_layer: number of layers to keep, chosen by --depth_by.
        depth_by: 'uniform' (first and last kept, the rest evenly spread) or 'importance' (Block Influence:
            1 - cosine between a block's input and output on the calibration text; least important dropped).
        every: keep every k-th layer (0, k, 2k, ...; 2 is DistilGPT2's one layer out of two).
        n_head: query heads to keep per layer (by attention-output norm, GQA-consistent).
        n_kv_head: KV heads (groups) to keep per layer; must divide n_head.
        ffn_size: FFN channels to keep per layer (by mean |intermediate activation|).
        n_embd: hidden channels to keep, the same everywhere (by mean |norm output|).
        calibration: text/jsonl file or folder for calibration and validation (default: embedded Shakespeare).
        calibration_batches: calibration sequences the importances are averaged over.
        seq_len: tokens per calibration / validation sequence.
        val_blocks: held-out sequences for the validation losses.
        format: 'hf' (transformers AutoModelForCausalLM) or 'growlm' (any architecture).
        seed: seed of the random-init student the pruned one is compared with.
        dtype: float32 or float64 (pruning and the losses are computed in it).
        overwrite: replace an existing output directory.
    """
    dt = parse_dtype(dtype, allowed=("float32", "float64"))
    if format not in ("hf", "growlm"):
        raise GrowlmError(f"format must be 'hf' or 'growlm', got {format!r}")
    layers = parse_layers(layers)
    if val_blocks < 1:
        raise GrowlmError(f"--val_blocks must be a positive integer, got {val_blocks}")
    spec = StudentSpec(layers=layers, n_layer=n_layer, every=every, depth_by=depth_by, n_head=n_head,
                       n_kv_head=n_kv_head, ffn_size=ffn_size, n_embd=n_embd,
                       calibration_batches=calibration_batches, calibration_seq_len=seq_len, seed=seed)
    if spec.layers is None and spec.n_layer is None and spec.every is None and not spec.prunes_width:
        raise GrowlmError("nothing to prune: give --layers, --n_layer, --every, --n_head, --n_kv_head, --ffn_size or --n_embd")
    check_output(out, overwrite)
    teacher, tok = load_model(model, dtype=dt)
    if tok is None:
        raise GrowlmError(f"{model}: no tokenizer beside the model (the student is saved with the teacher's tokenizer)")
    random_student, _ = make_student(teacher, StudentSpec(**{**spec.to_dict(), "init": "random"}))  # validates first
    if seq_len > teacher.config.block_size:
        raise GrowlmError(f"--seq_len {seq_len} exceeds the teacher's context length {teacher.config.block_size}")
    calib, val = calibration_blocks(calibration, tok, seq_len, calibration_batches, val_blocks)
    student, record = make_student(teacher, spec, calib[:, :-1])
    losses = {"teacher": block_loss(teacher, val), "pruned": block_loss(student, val),
              "random_init": block_loss(random_student, val)}
    params = {"teacher": teacher.num_params(), "pruned": student.num_params(), "random_init": random_student.num_params()}
    record.update(source=model, calibration=calibration or "shakespeare (embedded)", val_blocks=val_blocks,
                  seq_len=seq_len, val_loss=losses, params=params)
    with atomic_dir(out) as tmp:
        try:
            (save_hf if format == "hf" else save_growlm)(student, tmp, tok)
        except GrowlmError as e:
            raise GrowlmError(f"{e}; write the student with --format growlm instead") from None
        (tmp / "prune.json").write_text(json.dumps(record, indent=1) + "\n")

    console.print(f"module diff teacher -> student ({model} -> {out}):")
    diff = module_diff(teacher.config.to_dict(), student.config.to_dict(), ("teacher", "student"))
    console.print("\n".join(diff) if diff else "(unchanged)", markup=False, highlight=False)
    if record.get("kept_layers") is not None and len(record["kept_layers"]) != teacher.config.n_layer:
        how = f"every {every}" if every else (f"by {depth_by}" if n_layer else "listed")
        console.print(f"kept layers ({how}): {record['kept_layers']}", markup=False)
    t = Table(title=f"validation: {val_blocks} held-out blocks of {seq_len} tokens")
    for col in ("model", "params", "val loss", "val ppl"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for k in ("teacher", "pruned", "random_init"):
        t.add_row(k.replace("_", "-"), f"{params[k]:,}", f"{losses[k]:.4f}", f"{math.exp(min(losses[k], 700)):,.1f}")
    console.print(t)
    console.print(f"wrote {out} ({format}); prune record: {out}/prune.json")
