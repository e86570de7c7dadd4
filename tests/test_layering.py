"""Import rules between the packages (docs/development.md).

common/ is shared pure logic: it never imports client/, server/ or simulation/.
client/ and server/ never import each other (each side can be installed alone).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "common": {"client", "server", "simulation"},
    "client": {"server", "simulation"},
    "server": {"client"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_forbidden_layers(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules found under {package}/"
    bad = {f"{p.relative_to(ROOT)} imports {m}" for p in files for m in _imports(p) & FORBIDDEN[package]}
    assert not bad, sorted(bad)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "mod.py"
    bad.write_text("import os\nfrom client.trainer import LocalTrainer\nimport server.strategy\n")
    assert {"client", "server"} <= _imports(bad)
