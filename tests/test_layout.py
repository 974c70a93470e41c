"""The package layout: imports point down only, no lazy growlm imports, modules stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "growlm"

# Lower number = lower layer. A module may import its own layer or lower ones, never a higher one.
LAYERS = {"errors": 0, "io": 0, "models": 1, "growth": 2, "eval": 2, "distill": 3, "train": 4, "report": 5,
          "cli": 6, "__init__": 7, "__main__": 7}
# growlm imports made inside a function, each allowed for a stated reason.
LAZY_OK: dict[str, str] = {}
# modules still being split (issue 10 in progress); this list must end empty
SPLIT_PENDING: set[str] = set()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    """(module name, imported growlm module, inside a function?) for every growlm import in `path`."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    mod = ".".join(rel.parts).removesuffix(".__init__")
    tree = ast.parse(path.read_text())
    funcs = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("growlm"):
            targets = [node.module] if node.module != "growlm" else [f"growlm.{a.name}" for a in node.names]
            for t in targets:
                yield mod, t, id(node) in funcs
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("growlm"):
                    yield mod, a.name, id(node) in funcs


def _modules():
    return sorted(p for p in PKG.rglob("*.py"))


def test_imports_point_down_only():
    bad = []
    for path in _modules():
        for mod, target, _ in _imports(path):
            src, dst = _layer(mod), _layer(target)
            assert src in LAYERS, f"{mod}: subpackage {src!r} has no layer in tests/test_layout.py"
            assert dst in LAYERS, f"{target}: subpackage {dst!r} has no layer in tests/test_layout.py"
            if LAYERS[dst] > LAYERS[src]:
                bad.append(f"{mod} imports {target}")
    assert not bad, "imports pointing up: " + "; ".join(bad)


def test_no_lazy_growlm_imports():
    lazy = [f"{mod} -> {t}" for p in _modules() for mod, t, inner in _imports(p) if inner and mod not in LAZY_OK]
    assert not lazy, "growlm imported inside a function (move it to the top, or list it in LAZY_OK with the reason): " + "; ".join(lazy)


def test_no_module_over_600_lines():
    long = {str(p.relative_to(PKG)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 600
            and str(p.relative_to(PKG)) not in SPLIT_PENDING}
    assert not long, f"modules over 600 lines: {long}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """Negative control: the walker finds a lazy upward import in a module written for the purpose."""
    fake = PKG / "models" / "_layout_probe.py"
    fake.write_text("def f():\n    from growlm.cli import main\n")
    try:
        found = list(_imports(fake))
    finally:
        fake.unlink()
    assert found == [("growlm.models._layout_probe", "growlm.cli", True)]
    assert LAYERS[_layer("growlm.cli")] > LAYERS[_layer(found[0][0])]
