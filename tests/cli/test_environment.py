"""The environment variables table of docs/TROUBLESHOOTING.md names exactly the variables
roam's code reads (os.environ, typer's envvar=), both ways."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = re.compile(r"ROAM_[A-Z0-9_]+")
READS = re.compile(r"""(?:environ\.get\(|getenv\(|environ\[|envvar=)\s*["']([A-Z_]+)["']""")
NOT_OURS = {"PATH"}  # read to extend it for a tool, not a setting of roam's


def _read_by_code() -> set[str]:
    """ROAM_* names anywhere in the code (a string that is the whole name: read through
    os.environ, typer's envvar= or a helper), and other variables read by name."""
    found = set()
    for path in (ROOT / "roam").rglob("*.py"):
        text = path.read_text()
        found |= {node.value for node in ast.walk(ast.parse(text))
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and OURS.fullmatch(node.value)}
        found |= set(READS.findall(text))
        # NOTIFY_SOCKET = "NOTIFY_SOCKET" ... os.environ.get(NOTIFY_SOCKET)
        constants = dict(re.findall(r"""^([A-Z_]+) = ["']([A-Z_]+)["']$""", text, re.M))
        found |= {constants[name] for name in re.findall(r"environ\.get\(([A-Z_]+)\)", text)
                  if name in constants}
    return found - NOT_OURS


def _documented() -> set[str]:
    text = (ROOT / "docs" / "TROUBLESHOOTING.md").read_text()
    section = text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for cell in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cell)}


def test_environment_table_matches_the_code() -> None:
    code, documented = _read_by_code(), _documented()
    assert {"ROAM_CACHE", "ROAM_RUN_DIR", "ROAM_PEER"} <= code  # the scan finds them
    assert code == documented, (f"read but not documented: {code - documented}; "
                                f"documented but not read: {documented - code}")
