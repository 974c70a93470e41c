"""`growlm SUBCOMMAND --help` documents every option: each one has a help text beyond its type and default
(from the functions' Args and the config dataclasses' field docstrings, read with docstring-parser)."""

from __future__ import annotations

import contextlib
import io
import re
import sys

import pytest

from growlm.cli import main
from growlm.cli.main import _commands
from growlm.growth.spec import Operator


def help_entries(cmd: str) -> list[tuple[str, str]]:
    """(option, help text without its '(type: ..., default: ...)' suffix) for each option of `cmd --help`."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([cmd, "--help"]) == 0
    lines = buf.getvalue().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("options:"))
    out: list[list[str]] = []
    for ln in lines[start + 1:]:
        m = re.match(r"^  (-\S+(?: [^ ]\S*)*?)(?:\s{2,}(.*))?$", ln)
        if m:
            out.append([m.group(1), m.group(2) or ""])
        elif ln.startswith("    ") and out:
            out[-1][1] += " " + ln.strip()
        elif ln.strip():  # a group header ends the previous option
            out.append(["", ""])
    return [(o, re.sub(r"\((required, )?type: .*\)\s*$", "", d).strip()) for o, d in out if o]


@pytest.mark.parametrize("cmd", sorted(_commands()))
def test_every_option_has_a_help_text(cmd):
    entries = help_entries(cmd)
    assert len(entries) >= 3
    missing = [o for o, text in entries if not text]
    assert not missing, f"growlm {cmd} --help: options without a help text: {missing}"


def test_train_help_is_complete_and_lists_the_growth_operators():
    entries = dict(help_entries("train"))
    assert len(entries) >= 50
    ops = next(t for o, t in entries.items() if o.startswith("--growth.operators [ITEM"))
    assert all(op in ops for op in Operator.__args__), ops
    assert "Peak learning rate" in entries["--optim.lr LR"]


def test_the_checker_sees_a_missing_help_text(monkeypatch):
    """Negative control: a command whose argument has no docstring is reported."""
    def bare(x: int = 1) -> None:
        """No Args section."""

    monkeypatch.setattr(sys.modules["growlm.cli.main"], "_commands", lambda: {"bare": bare})
    assert [o for o, t in help_entries("bare") if not t] == ["--x X"]
