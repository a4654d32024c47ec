"""The package layout: dependencies between lm's subpackages point one way (docs/layout.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lm"
TOP = {"config", "errors", "files", "private"}
TOP_OF_NN = {"lm.nn.model", "lm.nn.regularized", "lm.nn.regularizer_args"}
# what each part may import besides itself (the top-level modules are open to all)
ALLOWED = {
    "top": set(),
    "nn": set(),
    "data": set(),
    "regularizers": {"nn"},
    "eval": {"nn", "regularizers", "data"},
    "train": {"eval", "nn", "regularizers", "data"},
    "analysis": {"eval", "nn", "regularizers", "data"},
    "cli": {"train", "eval", "analysis", "nn", "regularizers", "data"},
}


def _part(module: str) -> str:
    parts = module.split(".")
    return "top" if len(parts) < 2 or parts[1] in TOP else parts[1]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lm.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lm"):
            out.add(node.module)
    return out


def test_dependencies_point_one_way():
    bad = []
    for path in ROOT.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        src = _part(module)
        for target in _imports(path):
            dst = _part(target)
            # the model and the drop-in layer (the top of lm.nn) are built from a regularizer; the rest of
            # lm.nn lies below regularizers
            model_uses_regularizer = module in TOP_OF_NN and dst == "regularizers"
            if dst != src and dst != "top" and dst not in ALLOWED[src] and not model_uses_regularizer:
                bad.append(f"{module} -> {target}")
            if src == "regularizers" and target in TOP_OF_NN:
                bad.append(f"{module} -> {target}")
            if module == "lm.errors" and target != "lm.errors":
                bad.append(f"{module} -> {target}")  # errors is the bottom of everything
    assert not bad, "imports against the layout: " + ", ".join(sorted(bad))


def test_top_level_holds_only_shared_modules():
    shared = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if p.name == "config"}
    assert shared == TOP | {"__init__"}
    for sub in ALLOWED:
        if sub != "top":
            doc = ast.get_docstring(ast.parse((ROOT / sub / "__init__.py").read_text()))
            assert doc and "import" in doc, f"lm/{sub}/__init__.py must say what it may import"
