"""The environment variables table of docs/TROUBLESHOOTING.md names exactly the variables
roam's code reads (os.environ, typer's envvar=), both ways."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
READS = re.compile(r"""(?:environ\.get\(|getenv\(|environ\[|envvar=)\s*["']([A-Z_]+)["']""")
CONSTANT = re.compile(r"""^([A-Z_]+) = ["']([A-Z_]+)["']$""", re.MULTILINE)
NOT_OURS = {"PATH"}  # read to extend it for a tool, not a setting of roam's


def _read_by_code() -> set[str]:
    found = set()
    for path in (ROOT / "roam").rglob("*.py"):
        text = path.read_text()
        constants = dict(CONSTANT.findall(text))  # NOTIFY_SOCKET = "NOTIFY_SOCKET"
        found |= set(READS.findall(text))
        found |= {constants[name] for name in re.findall(r"environ\.get\(([A-Z_]+)\)", text)
                  if name in constants}
    return found - NOT_OURS


def _documented() -> set[str]:
    text = (ROOT / "docs" / "TROUBLESHOOTING.md").read_text()
    section = text.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z_]+)` \|", section, re.MULTILINE))


def test_environment_table_matches_the_code() -> None:
    code, documented = _read_by_code(), _documented()
    assert {"ROAM_CACHE", "ROAM_RUN_DIR", "ROAM_PEER"} <= code  # the scan finds them
    assert code == documented, (f"read but not documented: {code - documented}; "
                                f"documented but not read: {documented - code}")
