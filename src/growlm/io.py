"""Small shared I/O: the one dtype table and atomic writes of files and folders (the bottom layer).

Atomic means: written under a temporary sibling name in the same folder, then renamed into place with
`os.replace`, so a reader (or a run killed mid-write) sees the old content or the new, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
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


def _unique_sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` atomically (text is written as UTF-8), with the user's umask."""
    path = Path(path)
    tmp = _unique_sibling(path, "tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, as open() does
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
    and deleted only after the new one is in place); on any error it is removed and `path` is untouched.
    A `path` that exists but is not a folder is refused: nothing is ever moved aside but a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GrowlmError(f"{path} exists and is not a folder; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_sibling(path, "tmp")
    tmp.mkdir()  # 0o777 & ~umask, like save_pretrained's folders
    try:
        yield tmp
        _apply_umask(tmp)
        if path.exists():
            old = _unique_sibling(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(folder: Path) -> None:
    """Give everything in `folder` the modes a plain open()/mkdir would: some writers (safetensors' save_file)
    create 0600 files whatever the umask."""
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def remove_stale_temporaries(folder: str | Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """Delete the `.NAME.tmp*` / `.NAME.old*` siblings an interrupted `atomic_dir`/`atomic_write` left in
    `folder` (for the given NAMEs only, or any NAME); returns what was removed."""
    d = Path(folder)
    if not d.is_dir():
        return []
    stem = "|".join(re.escape(n) for n in names) if names else ".+?"
    pattern = re.compile(rf"^\.({stem})\.(tmp|old)")
    removed = []
    for p in d.iterdir():
        if pattern.match(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed


def check_output(path: str | Path, overwrite: bool = False, kind: str = "folder", flag: str = "--overwrite") -> Path:
    """Refuse, before any work, an output path that exists (unless `overwrite`), that is a file where a
    folder is wanted (or the reverse), or whose folder cannot be written; returns it as a Path."""
    p = Path(path).expanduser()
    if p.exists() or p.is_symlink():
        if kind == "folder" and not p.is_dir():
            raise GrowlmError(f"{p} exists and is not a folder; choose another output path")
        if kind == "file" and p.is_dir():
            raise GrowlmError(f"{p} is a folder; give a file name")
        if not overwrite:
            raise GrowlmError(f"{p} already exists; pass {flag} to replace it")
    check_writable(p)
    return p


def check_writable(path: str | Path) -> None:
    """The nearest existing ancestor of `path` must be a writable folder (read-only file systems included)."""
    p = Path(path).expanduser().absolute()
    anc = p.parent
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise GrowlmError(f"cannot write {path}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise GrowlmError(f"cannot write {path}: {anc} is not writable")
    try:  # os.access ignores read-only mounts on some systems: try a real file
        fd, probe = tempfile.mkstemp(prefix=".growlm-probe", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise GrowlmError(f"cannot write {path}: {anc}: {e.strerror or e}") from None


def read_text(path: str | Path) -> str:
    """A text file's content as UTF-8 (invalid bytes replaced); a file that is not text (NUL bytes, or
    mostly invalid UTF-8) is refused with a GrowlmError."""
    data = Path(path).read_bytes()
    head = data[: 1 << 20]
    if b"\0" in head:
        raise GrowlmError(f"{path}: not a text file (it holds NUL bytes)")
    text = data.decode("utf-8", errors="replace")
    if data and text[: 1 << 20].count("\ufffd") > 0.1 * min(len(text), 1 << 20):
        raise GrowlmError(f"{path}: not a UTF-8 text file (mostly invalid UTF-8)")
    return text
