"""roam.network sits below the VMs and the peer: it must never import them back.

A cycle here once meant that the network layer parsed the guest's address out of the VM
layer's kernel command line; the network now owns that address and the VM layer uses it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import roam.network

ABOVE = ("roam.vm", "roam.peer", "roam.cli", "roam.demo")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_network_imports_nothing_above_it() -> None:
    package = Path(roam.network.__file__).parent
    offending = {f"{path.name}: {name}" for path in package.glob("*.py")
                 for name in _imports(path)
                 if any(name == top or name.startswith(top + ".") for top in ABOVE)}
    assert not offending
