"""Every third-party package mtmim_cli imports (lazy imports too) is declared in pyproject.toml:
in `dependencies`, or in an optional group for an import the code guards (onnxruntime, which
`mtmim export` asks for by name when it is missing)."""

from __future__ import annotations

import ast
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _name(spec: str) -> str:
    return Requirement(spec).name.lower().replace("_", "-")


def _declared() -> tuple[set[str], set[str]]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = {_name(s) for group in project["optional-dependencies"].values() for s in group}
    return {_name(s) for s in project["dependencies"]}, optional


def _imported_top_levels() -> dict[str, str]:
    """Top-level third-party module -> one file importing it."""
    out: dict[str, str] = {}
    for path in sorted((REPO / "mtmim_cli").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "mtmim_cli" and top not in sys.stdlib_module_names:
                    out.setdefault(top, str(path.relative_to(REPO)))
    return out


def test_every_imported_package_is_declared() -> None:
    required, optional = _declared()
    dists = packages_distributions()
    missing = []
    for top, where in _imported_top_levels().items():
        names = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
        if not names & (required | optional):
            missing.append(f"{top} ({where}; distribution {sorted(names)})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert "scipy" in required   # calibrate's interval and the demo faces need it at run time
