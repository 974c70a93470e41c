"""Small shared I/O: the one dtype table and atomic writes of files and folders (the bottom layer).

Atomic means: written under a temporary sibling name in the same folder, then renamed into place with
`os.replace`, so a reader (or a run killed mid-write) sees the old content or the new, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from growlm.errors import GrowlmError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
"""Every dtype a user may name (weights, evaluation, training)."""


def parse_dtype(name: str, allowed: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype:
    """The torch dtype called `name`, or a GrowlmError listing the allowed names."""
    if name not in allowed:
        raise GrowlmError(f"dtype must be one of {', '.join(allowed)}, got {name!r}")
    return DTYPES[name]


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` atomically (text is written as UTF-8)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` (an existing folder is swapped out
    and deleted only after the new one is in place); on any error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
