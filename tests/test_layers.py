"""Layers point down only: each part of roam imports only the parts below it.

The order, lowest first, is the one docs/DESIGN.md draws; a new import that breaks it is
a design change, to be made there first.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROAM = Path(__file__).resolve().parent.parent / "roam"

BELOW: dict[str, set[str]] = {
    "errors": set(),
    "logs": set(),
    "storage": {"errors"},
    "guest": {"errors"},
    "blueprint": {"errors", "guest"},
    "network": {"errors"},
    "spot": {"errors"},
    "exposure": {"errors", "storage"},
    "migration": {"errors", "storage"},
    "sync": {"errors", "storage"},
    "hypervisor": {"errors", "storage", "exposure", "guest"},
    "vm": {"errors", "storage", "exposure", "guest", "blueprint", "network", "hypervisor"},
    "peer": {"errors", "logs", "storage", "exposure", "guest", "blueprint", "network",
             "migration", "sync", "hypervisor", "vm"},
    "control": {"errors", "logs", "storage", "exposure", "guest", "blueprint", "network",
                "migration", "sync", "hypervisor", "vm", "peer", "spot"},
}
"""Each part and what it may import; cli and demo sit on top and may import anything."""


def _imports(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                 else [])
        for name in names:
            if name == "roam" and isinstance(node, ast.ImportFrom):
                parts.update(a.name for a in node.names)
            elif name.startswith("roam."):
                parts.add(name.split(".")[1])
    return parts


def test_layers_point_down() -> None:
    wrong = []
    for part, allowed in BELOW.items():
        files = [ROAM / f"{part}.py"] if (ROAM / f"{part}.py").exists() else sorted(
            (ROAM / part).rglob("*.py"))
        for path in files:
            for imported in _imports(path) - allowed - {part}:
                wrong.append(f"{path.relative_to(ROAM)} imports roam.{imported}")
    assert not wrong, "\n".join(wrong)
