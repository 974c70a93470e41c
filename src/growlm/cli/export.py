"""`growlm export RUN_DIR --out DIR`: the newest usable checkpoint of a run as a Hugging Face directory.

Reads single-process checkpoints (model.safetensors) and sharded ones (run.parallel fsdp: DCP shards,
gathered into one full model on this process, `growlm.train.sharded.export_model`), so a run trained on
N processes is exported on one. The tokenizer is the run's (`model.tokenizer`, else the source model's).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from growlm.errors import GrowlmError
from growlm.io import check_output
from growlm.models.hf import load_model, save_hf
from growlm.train import checkpoint as ckpt
from growlm.train.build import load_tokenizer
from growlm.train.sharded import export_model, is_sharded_checkpoint

console = Console()


def export(run: str, out: str, checkpoint: str | None = None, overwrite: bool = False) -> None:
    """Write a run's newest usable checkpoint (or a named one) as a Hugging Face directory.

    Args:
        run: the run folder (run.out_dir of the training run).
        out: output directory (written atomically).
        checkpoint: a checkpoint folder name under RUN/checkpoints (e.g. step_000120); default: the newest that verifies.
        overwrite: replace an existing output directory (without it an existing --out is refused).
    """
    ckpt_dir = Path(run) / "checkpoints"
    if not Path(run).is_dir():
        raise GrowlmError(f"{run} is not a run folder")
    if checkpoint is None:
        path, skipped = ckpt.usable_checkpoint(ckpt_dir)
        if path is None:
            raise GrowlmError(f"{ckpt_dir} holds no usable checkpoint{f' ({skipped[0]})' if skipped else ''}")
    else:
        path = ckpt_dir / checkpoint
        why = ckpt.verify_checkpoint(path) if path.is_dir() else "no such checkpoint"
        if why is not None:
            raise GrowlmError(f"cannot export {path}: {why}")
    check_output(out, overwrite)
    src = ckpt.read_train_config(path).get("model", {})
    model = export_model(path)
    if src.get("tokenizer") is not None:
        tok = load_tokenizer(src["tokenizer"], None)
    elif src.get("init") == "pretrained":
        tok = load_model(src["name"])[1]  # the source model's own tokenizer
    else:
        tok = None
    save_hf(model, out, tok if hasattr(tok, "save_pretrained") else None)
    kind = "sharded (DCP)" if is_sharded_checkpoint(path) else "single-process"
    console.print(f"wrote {out} from {kind} checkpoint {path} ({model.num_params():,} parameters)")


def positional_run(argv: list[str]) -> list[str]:
    """`export RUN --out D` -> `export --run RUN --out D` (the CLI's options are all named)."""
    if len(argv) < 2 or argv[0] != "export" or argv[1].startswith("-"):
        return argv
    return [argv[0], "--run", argv[1], *argv[2:]]
