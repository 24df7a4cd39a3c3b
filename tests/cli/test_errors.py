"""Every bad input a newcomer tried: one line `error: WHAT (SUBJECT)` on stderr, exit 1
for a failure and 2 for a usage error, found before anything starts, nothing left behind.

Each case runs `roam` as a user would, in a directory of its own (`{d}` in its arguments);
whatever that directory holds afterwards must be what it held before.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROAM = [sys.executable, "-m", "roam.cli.main"]


@dataclass(frozen=True)
class Case:
    args: str  # `{d}` is the case's directory, `{port}` a port in use, `{nbd}` a server
    status: int
    says: str  # in the error line, with the subject it concerns
    setup: Callable[[Path], None] = lambda d: None


def _files(d: Path) -> None:
    (d / "disk.img").write_bytes(bytes(65536))
    (d / "file").write_text("not a directory\n")
    (d / "empty.pem").write_text("")
    (d / "dir").mkdir()


CASES = {
    "nbd serve on a port in use": Case(
        "nbd serve {d}/disk.img --listen tcp://127.0.0.1:{port}", 1,
        "Address already in use (tcp://127.0.0.1:{port})"),
    "nbd serve on a socket in a missing directory": Case(
        "nbd serve {d}/disk.img --socket {d}/missing/s.sock", 2,
        "directory {d}/missing does not exist (--socket)"),
    "nbd serve with a TLS file that holds nothing": Case(
        "nbd serve {d}/disk.img --listen tcp://127.0.0.1:1 --tls-cert {d}/empty.pem", 2,
        "{d}/empty.pem holds no PEM certificate and key (--tls-cert/--tls-key)"),
    "nbd serve with a TLS file that is a directory": Case(
        "nbd serve {d}/disk.img --listen tcp://127.0.0.1:1 --tls-cert {d}/dir", 2,
        "{d}/dir is a directory, not a file (--tls-cert)"),
    "nbd serve with a missing TLS CA": Case(
        "nbd serve {d}/disk.img --listen tcp://127.0.0.1:1 --tls-cert {d}/file "
        "--tls-ca {d}/nothing.pem", 2, "{d}/nothing.pem: No such file or directory (--tls-ca)"),
    "nbd serve of a directory": Case(
        "nbd serve {d}/dir --socket {d}/s.sock", 2, "{d}/dir is not a regular file (PATH)"),
    "nbd copy of an unknown export": Case(
        "nbd copy nbd+unix:///nope?socket={nbd} {d}/out.img", 1,
        "the server has no such export (nbd+unix:///nope?socket={nbd})"),
    "nbd copy from a socket nobody serves": Case(
        "nbd copy nbd+unix:///x?socket={d}/none.sock {d}/out.img", 1,
        "cannot connect: No such file or directory (nbd+unix:///x?socket={d}/none.sock)"),
    "nbd copy of a directory": Case(
        "nbd copy {d}/dir {d}/out.img", 2, "{d}/dir is not a regular file (SRC)"),
    "nbd copy into a directory": Case(
        "nbd copy {d}/disk.img {d}/dir", 2, "{d}/dir is a directory (DST)"),
    "device receive --out naming a file": Case(
        "device receive --connect unix://{d}/none.sock --out {d}/file", 2,
        "{d}/file is a file, not a directory (--out)"),
    "device receive from nobody": Case(
        "device receive --connect unix://{d}/none.sock --out {d}/new/out", 1,
        "cannot connect to unix://{d}/none.sock"),
    "device serve of a directory": Case(
        "device serve --listen unix://{d}/s.sock a={d}/dir", 2,
        "{d}/dir is not a regular file (FILES)"),
    "device serve with one TLS option of three": Case(
        "device serve --listen unix://{d}/s.sock a={d}/disk.img --tls-cert {d}/file", 2,
        "mutual TLS needs all three together (--tls-cert/--tls-key/--tls-ca)"),
    "device serve on a port in use": Case(
        "device serve --listen tcp://127.0.0.1:{port} a={d}/disk.img", 1,
        "Address already in use (tcp://127.0.0.1:{port})"),
    "package create into a missing directory": Case(
        "package create {d}/dir {d}/missing/p.tar.zst", 2,
        "directory {d}/missing does not exist (FILE)"),
    "package create of something not a package": Case(
        "package create {d}/dir {d}/p.tar.zst", 1, "{d}/dir: not a package"),
    "package extract into a file": Case(
        "package extract {d}/file {d}/file", 2, "{d}/file is a file, not a directory"),
    "package extract of a corrupt archive": Case(
        "package extract {d}/file {d}/new/pkg", 1, "{d}/file: corrupt package"),
    "fuse mount on a file": Case(
        "fuse mount {d}/file a={d}/disk.img", 2, "'{d}/file' is a file (mountpoint)"),
    "fuse mount on a missing directory": Case(
        "fuse mount {d}/missing a={d}/disk.img", 2, "'{d}/missing' does not exist (mountpoint)"),
    "fuse mount of a directory": Case(
        "fuse mount {d}/dir a={d}/dir", 2, "{d}/dir is not a regular file (DEVICES)"),
    "blueprint build with a negative disk": Case(
        "blueprint build --out {d}/bp --disk-size -5", 2, "(--disk-size)"),
    "blueprint build into a file": Case(
        "blueprint build --out {d}/file", 2, "{d}/file is a file, not a directory (--out)"),
    "snapshot over an existing package": Case(
        "snapshot --blueprint {d}/dir --out {d}/dir", 2, "{d}/dir exists already (--out)"),
    "snapshot of something not a blueprint": Case(
        "snapshot --blueprint {d}/dir --out {d}/new/pkg", 1, "{d}/dir/blueprint.json: not a "
        "blueprint"),
    "run with a bad port forward": Case(
        "run {d}/dir --name x --publish 99999:80", 2, "(--publish)"),
    "exec in a VM that does not run": Case(
        "exec nosuchvm ls -la", 1, "no VM called 'nosuchvm' is running"),
    "an unknown command": Case("frobnicate", 2, "No such command 'frobnicate'"),
    "-v with -q": Case("-v -q ls", 2, "(-v/-q/--log-level)"),
}


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def nbd_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A `roam nbd serve` of one export named `disk`, for clients that ask for another."""
    d = tmp_path_factory.mktemp("nbd")
    (d / "disk.img").write_bytes(bytes(65536))
    sock = d / "nbd.sock"
    proc = subprocess.Popen([*ROAM, "nbd", "serve", str(d / "disk.img"), "--name", "disk",
                             "--socket", str(sock)], stderr=subprocess.PIPE)
    while not sock.exists():  # another process: polling is the way to wait
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    yield sock
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)


def _tree(d: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else None
            for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input(case: Case, tmp_path: Path, busy_port: int, nbd_socket: Path) -> None:
    _files(tmp_path)
    case.setup(tmp_path)
    before = _tree(tmp_path)
    fill = {"d": tmp_path, "port": busy_port, "nbd": nbd_socket}
    args = [a.format(**fill) for a in case.args.split()]
    done = subprocess.run([*ROAM, *args], capture_output=True, text=True, timeout=60)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert case.says.format(**fill) in lines[0]
    assert done.returncode == case.status, done.stderr
    assert _tree(tmp_path) == before, "left behind"


@pytest.mark.parametrize(("args", "says"), [
    ("peer serve --listen unix://{d}/m.sock --state-dir {d}/state",
     "roam peer serve needs root: its VMs get network namespaces and FUSE mounts"),
    ("run --from unix://{d}/r.sock --name web",
     "roam run needs root: the VM gets a network namespace and a FUSE mount"),
], ids=["peer serve", "run"])
def test_not_root_refused_at_once(args: str, says: str, tmp_path: Path) -> None:
    """Not root: one line before anything starts (a peer used to log "peer serving")."""
    # A user namespace without a mapping: roam sees uid 65534 (the overflow uid), while
    # files keep their owner's access, so a checkout under a 0700 directory still runs.
    nobody = 65534
    done = subprocess.run(
        ["unshare", "--user", *ROAM,
         *args.format(d=tmp_path).split()], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [f"error: {says} (running as uid {nobody})"]
    assert list(tmp_path.iterdir()) == []
