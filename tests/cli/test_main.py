"""The `roam` command itself: every --help renders, --version, the global log options."""

from __future__ import annotations

import dataclasses
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from roam.cli.common import settings
from roam.cli.main import app, main

ROAM = [sys.executable, "-m", "roam.cli.main"]


@pytest.fixture(autouse=True)
def _session_logging() -> Iterator[None]:
    """main() sets logging up for its process; give the test session its own back."""
    root, roam = logging.getLogger(), logging.getLogger("roam")
    saved = root.level, list(root.handlers), roam.level, dataclasses.replace(settings)
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    roam.setLevel(saved[2])
    settings.level, settings.debug = saved[3].level, saved[3].debug


def _paths(command: object, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _paths(sub, (*path, name))


def _roam(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(args)
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def test_every_command_renders_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Help texts are plain text: `[/udp]` in `roam run --help` once crashed Rich."""
    paths = list(_paths(typer.main.get_command(app)))
    assert ("run",) in paths and ("peer", "gateway") in paths and ("doctor",) in paths
    for path in paths:
        code, out, err = _roam([*path, "--help"], capsys)
        assert (code, err) == (0, ""), (path, err)
        assert out.startswith(f"Usage: roam {' '.join(path)}".rstrip()), (path, out)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _roam(["--version"], capsys)
    assert code == 0 and out.startswith("roam ")


@pytest.mark.parametrize(("options", "level"), [
    ([], logging.INFO), (["-v"], logging.DEBUG), (["-q"], logging.WARNING),
    (["--log-level", "error"], logging.ERROR)])
def test_global_log_options_before_the_command(options: list[str], level: int,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = _roam([*options, "ls", "--help"], capsys)
    assert code == 0
    assert logging.getLogger("roam").level == level


def test_quiet_server_logs_nothing_and_default_one_format(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    logs = []
    for options in ([], ["-q"]):
        sock = tmp_path / "s.sock"
        proc = subprocess.Popen([*ROAM, *options, "nbd", "serve", str(disk), "--socket",
                                 str(sock)], stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        seen = ""
        if not options:  # logged once it listens; SIGTERM only then, or a line is lost
            line = proc.stderr.readline()
            assert " INFO roam.nbd: export" in line, line
            while "serving on unix:" not in seen:
                seen += proc.stderr.readline() or pytest.fail(f"no serving line: {seen}")
        else:
            while not sock.exists():  # another process: polling is the way to wait
                assert proc.poll() is None
                time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest
        logs.append(seen + rest)
    assert "serving on unix:" in logs[0] and logs[1] == ""
