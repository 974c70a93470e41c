"""Atomic training checkpoints that carry everything an exact resume needs.

Layout of `<run>/checkpoints/step_000120/` (nanochat-style: the checkpoint carries its own config):
  model.safetensors, model_config.json   weights and the (possibly grown) architecture
  optimizer.pt                           AdamW state (tensors and numbers only: loads with weights_only=True)
  rng.pt                                 torch (and CUDA) RNG states
  state.json                             step, tokens, FLOPs, data position, growth history, plateau state,
                                         Python/NumPy RNG states, best/last validation loss
  train_config.json                      the TrainConfig, compared on resume
  tensors-<group>.safetensors            generations, update scales, EWC Fisher and anchor
  teacher.safetensors, teacher_config.json   the pre-growth snapshot used by KD
  manifest.json                          size and SHA-256 of every file above, written last
A sharded run (run.parallel fsdp, `growlm.train.sharded`) writes DCP's `.metadata` and `__<rank>_0.distcp`
files in place of model.safetensors and optimizer.pt; the rest is the same.
A checkpoint is written into a temporary sibling folder and renamed into place (`growlm.io.atomic_dir`),
so a run killed mid-write leaves the previous checkpoints intact; `latest.json` and `best.json` are
replaced the same way (`growlm.io.atomic_write`). Only the `keep_last` newest checkpoints and the best
one are kept. A resume takes the newest checkpoint whose manifest verifies (`usable_checkpoint`): a file
damaged after the rename (a full disk, a bad copy) costs the steps since the previous one, not the run. The RNG helpers capture and restore every generator an exact resume needs (Python, NumPy,
torch and CUDA); `truncate_metrics` drops metrics lines written after the checkpoint a run resumes from.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from growlm.errors import GrowlmError
from growlm.io import atomic_dir, atomic_write
from growlm.models.config import ModelConfig
from growlm.models.model import GPT

STEP_RE = re.compile(r"^step_(\d{6,})$")


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    train_config: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    teacher: GPT | None = None,
    keep_last: int = 2,
    val_loss: float | None = None,
) -> Path:
    """Write checkpoint `step_{step:06d}` atomically, update latest/best, prune old ones; returns its path."""
    ckpt_dir = Path(ckpt_dir)
    name = f"step_{step:06d}"
    with atomic_dir(ckpt_dir / name) as tmp:  # the same step written again (after a resume) is swapped in
        _save_tensors(model.state_dict(), tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_run_files(tmp, model.config, state, train_config, tensors, teacher)
    return finish_checkpoint(ckpt_dir, name, step, keep_last, val_loss)


def write_run_files(tmp: Path, config: ModelConfig, state: dict[str, Any], train_config: dict[str, Any],
                    tensors: dict[str, dict[str, torch.Tensor]] | None, teacher: GPT | None) -> None:
    """Everything but the weights and optimizer (which single-process and sharded checkpoints write their
    own ways) into a checkpoint's temporary folder, then the manifest of all its files, last."""
    config.save(tmp / "model_config.json")
    torch.save(capture_torch_rng(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    (tmp / "train_config.json").write_text(json.dumps(train_config, indent=1))
    for group, ts in (tensors or {}).items():
        if ts:
            _save_tensors(ts, tmp / f"tensors-{group}.safetensors")
    if teacher is not None:
        _save_tensors(teacher.state_dict(), tmp / "teacher.safetensors")
        teacher.config.save(tmp / "teacher_config.json")
    (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1))  # last: it vouches for the rest


def finish_checkpoint(ckpt_dir: Path, name: str, step: int, keep_last: int, val_loss: float | None) -> Path:
    """After checkpoint `name` is in place: point latest.json (and best.json) at it, prune older ones."""
    final = ckpt_dir / name
    _write_json(ckpt_dir / "latest.json", {"name": name, "step": step})
    best = read_json(ckpt_dir / "best.json")
    if val_loss is not None and (best is None or val_loss < best["val_loss"]):
        _write_json(ckpt_dir / "best.json", {"name": name, "step": step, "val_loss": val_loss})
    prune(ckpt_dir, keep_last)
    return final


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def verify_checkpoint(path: str | Path) -> str | None:
    """None when every file the manifest lists is present with its size and hash; else the first problem.
    A checkpoint written before manifests existed (no manifest.json) is taken as it is."""
    path = Path(path)
    m = path / MANIFEST
    if not m.exists():
        return None if (path / "train_config.json").exists() else "no manifest.json"
    try:
        files = json.loads(m.read_text())
    except (OSError, json.JSONDecodeError):
        return "manifest.json is unreadable"
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != rec["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {rec['bytes']}"
        if _sha256(f) != rec["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def usable_checkpoint(ckpt_dir: str | Path, before: int | None = None) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies (at a step below `before`, and not beyond the one latest.json
    names: a diverged run points it back), and one line per newer one skipped (with the reason)."""
    ptr = read_json(Path(ckpt_dir) / "latest.json")
    limit = min(before - 1 if before is not None else 1 << 62, ptr["step"] if ptr else 1 << 62)
    skipped = []
    for p in reversed(list_checkpoints(ckpt_dir)):
        if int(STEP_RE.match(p.name)[1]) > limit:
            continue
        why = verify_checkpoint(p)
        if why is None:
            return p, skipped
        skipped.append(f"skipped checkpoint {p.name}: {why}")
    return None, skipped


def point_latest(ckpt_dir: str | Path, path: Path) -> None:
    """Make latest.json name `path` (a resume starts there and ignores newer checkpoints)."""
    _write_json(Path(ckpt_dir) / "latest.json", {"name": path.name, "step": int(STEP_RE.match(path.name)[1])})


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_dir() and STEP_RE.match(p.name)), key=lambda p: int(STEP_RE.match(p.name)[1]))


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints and the best one."""
    best = read_json(ckpt_dir / "best.json")
    latest = read_json(ckpt_dir / "latest.json")
    protected = {x["name"] for x in (best, latest) if x}
    ckpts = list_checkpoints(ckpt_dir)
    for p in ckpts[: max(0, len(ckpts) - max(1, keep_last))]:
        if p.name not in protected:
            shutil.rmtree(p, ignore_errors=True)


def latest(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint named by latest.json (or the highest step when the pointer is missing)."""
    d = Path(ckpt_dir)
    ptr = read_json(d / "latest.json")
    if ptr and (d / ptr["name"]).is_dir():
        return d / ptr["name"]
    ckpts = list_checkpoints(d)
    return ckpts[-1] if ckpts else None


def read_train_config(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "train_config.json"
    if not p.exists():
        raise GrowlmError(f"{path} is not a growlm training checkpoint (no train_config.json)")
    return json.loads(p.read_text())


def _load_model(weights: Path, config: Path, device: str) -> GPT:
    return GPT.from_state_dict(ModelConfig.load(config), load_file(str(weights), device=device), device=device)


def load_checkpoint(path: str | Path, device: str = "cpu") -> dict[str, Any]:
    """Everything in a checkpoint: model, optimizer state dict, RNG, state, config, tensors, teacher.

    Only safetensors and torch.load(weights_only=True) are used: loading runs no pickled code."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        what = "a sharded (run.parallel fsdp) checkpoint" if (path / ".metadata").exists() else "not a growlm training checkpoint"
        raise GrowlmError(f"{path} is {what} (no model.safetensors)")
    out: dict[str, Any] = {
        "model": _load_model(path / "model.safetensors", path / "model_config.json", device),
        "optimizer": torch.load(path / "optimizer.pt", map_location=device, weights_only=True),
        "rng": torch.load(path / "rng.pt", weights_only=True),
        "state": json.loads((path / "state.json").read_text()),
        "train_config": read_train_config(path),
        "tensors": {},
        "teacher": None,
    }
    for f in sorted(path.glob("tensors-*.safetensors")):
        group = f.name[len("tensors-") : -len(".safetensors")]
        out["tensors"][group] = load_file(str(f), device=device)
    if (path / "teacher.safetensors").exists():
        out["teacher"] = _load_model(path / "teacher.safetensors", path / "teacher_config.json", device)
    return out


# -- RNG and metrics helpers for an exact resume -------------------------------------------------------------
def capture_host_rng() -> dict[str, list]:
    """Python's and NumPy's global RNG states as JSON-ready lists (they go into state.json)."""
    v, st, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python_rng": [v, list(st), gauss], "numpy_rng": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def capture_torch_rng() -> dict[str, Any]:
    """torch's CPU (and every CUDA device's) RNG state (it goes into rng.pt)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(host: dict[str, Any], torch_rng: dict[str, Any]) -> None:
    """Set the global RNGs back to what `capture_host_rng` and `capture_torch_rng` returned."""
    s = host["python_rng"]
    random.setstate((s[0], tuple(s[1]), s[2]))
    s = host["numpy_rng"]
    np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    torch.set_rng_state(torch_rng["torch"])


def truncate_metrics(path: Path, step: int) -> str | None:
    """Keep only the metrics lines of steps <= `step` (those written after a checkpoint are redone). A torn
    last line (a run killed mid-write) is dropped; returns a line saying so, else None."""
    if not path.exists():
        return None
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    recs, note = [], None
    for i, ln in enumerate(lines):
        try:
            recs.append((ln, json.loads(ln)))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise GrowlmError(f"{path}:{i + 1}: not valid JSON (only a torn last line is dropped on resume)") from None
            note = f"dropped a torn last line of {path} ({len(ln)} characters)"
    keep = [ln for ln, rec in recs if not isinstance(rec, dict) or rec.get("step", 0) <= step]
    atomic_write(path, "".join(ln + "\n" for ln in keep))
    return note
