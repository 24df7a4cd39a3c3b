"""Peers with mutual TLS: a VM moves between peers whose certificates share a CA, and a
peer with a foreign certificate is refused while the VM runs on at the source; a registry
with mutual TLS serves lazy starts to the first and refuses the second."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from roam.errors import RoamError
from tests.blueprint.boot import short_dir
from tests.peer.conftest import Peer, serve_in_background
from tests.vm.conftest import ROAM, roam


def _identity(ca: trustme.CA, root: Path, name: str) -> tuple[str, ...]:
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(root / f"{name}.pem"))
    cert.private_key_pem.write_to_path(str(root / f"{name}.key"))
    ca.cert_pem.write_to_path(str(root / f"{name}-ca.pem"))
    return ("--tls-cert", str(root / f"{name}.pem"), "--tls-key", str(root / f"{name}.key"),
            "--tls-ca", str(root / f"{name}-ca.pem"))


def _files(root: Path, name: str) -> tuple[str, ...]:
    """The --tls options of identity `name` (written by _identity)."""
    return ("--tls-cert", str(root / f"{name}.pem"), "--tls-key", str(root / f"{name}.key"),
            "--tls-ca", str(root / f"{name}-ca.pem"))


@pytest.fixture(scope="module")
def tls_peers() -> Iterator[dict[str, Peer]]:
    with short_dir() as root:
        ours, theirs = trustme.CA(), trustme.CA()
        started = {"a": Peer("a", root, _identity(ours, root, "a")),
                   "b": Peer("b", root, _identity(ours, root, "b")),
                   "rogue": Peer("rogue", root, _identity(theirs, root, "rogue"))}
        try:
            yield started
        finally:
            for p in started.values():
                p.close()


def test_migration_over_mutual_tls(tls_peers: dict[str, Peer], snapshot: Path) -> None:
    a, b, rogue = tls_peers["a"], tls_peers["b"], tls_peers["rogue"]
    a.run(snapshot, "secure")
    a.sh("secure", "redis-cli set moved-over tls >/dev/null")

    refused = a.migrate("secure", rogue, check=False)
    assert refused.returncode == 1, refused.stderr
    assert "TLS" in refused.stderr or "certificate" in refused.stderr, refused.stderr
    assert a.vms()["secure"]["state"] == "running"
    assert "secure" not in rogue.vms()

    a.migrate("secure", b)
    assert b.vms()["secure"]["state"] == "running"
    assert b.sh("secure", "redis-cli get moved-over").strip() == "tls"
    assert "secure" not in a.vms()
    b.stop("secure")


def test_registry_over_mutual_tls(tls_peers: dict[str, Peer], snapshot: Path) -> None:
    a, rogue = tls_peers["a"], tls_peers["rogue"]
    root = a.dir.parent
    socket = root / "tls-registry.sock"
    registry = serve_in_background(
        "registry", "serve", str(snapshot), "--listen", f"unix://{socket}",
        "--tls-cert", str(root / "b.pem"), "--tls-key", str(root / "b.key"),
        "--tls-ca", str(root / "b-ca.pem"), socket=socket)
    try:
        with pytest.raises(RoamError, match="TLS"):
            rogue.run_from(f"unix://{socket}", "lazy")
        assert "lazy" not in rogue.vms()
        info = a.run_from(f"unix://{socket}", "lazy")
        assert info.state == "running"
        assert a.sh("lazy", "redis-cli ping").strip() == "PONG"
        a.stop("lazy")
    finally:
        registry.terminate()
        registry.communicate(timeout=30)


def test_terminate_over_mutual_tls(tls_peers: dict[str, Peer], snapshot: Path,
                                   tmp_path: Path) -> None:
    """A terminator whose CA did not sign the source's certificate refuses it (the VM
    runs on); one with the peers' CA takes the live backup."""
    a = tls_peers["a"]
    root = a.dir.parent
    a.run(snapshot, "tlsbackup")
    for name, status in (("rogue", 1), ("b", 0)):
        listen = root / f"term-{name}.sock"
        out = tmp_path / f"backup-{name}"
        terminator = serve_in_background(
            "terminate", "--listen", f"unix://{listen}", "--out", str(out), "--json",
            *_files(root, name), socket=listen)
        moved = roam("migrate", "tlsbackup", "--to", f"unix://{listen}", "--via", str(a.dir),
                     "--no-postcopy", check=False)
        assert moved.returncode == status, moved.stderr
        if status == 0:  # without --json, a summary (with it, the result: test_peer.py)
            assert moved.stdout.startswith("tlsbackup: declined in "), moved.stdout
        if status:
            terminator.send_signal(signal.SIGTERM)
        stdout, stderr = terminator.communicate(timeout=60)
        assert terminator.returncode == status, stderr
        assert (out / "config.json").exists() == (status == 0)
        assert a.vms()["tlsbackup"]["state"] == "running"
    assert json.loads(stdout)["name"] == "tlsbackup"
    a.stop("tlsbackup")


def test_mount_from_registry_over_mutual_tls(tls_peers: dict[str, Peer], snapshot: Path,
                                             tmp_path: Path) -> None:
    root = tls_peers["a"].dir.parent
    socket = root / "tls-registry-mount.sock"
    registry = serve_in_background("registry", "serve", str(snapshot), "--listen",
                                   f"unix://{socket}", *_files(root, "b"), socket=socket)
    fuse = tmp_path / "fuse"
    fuse.mkdir()
    refused = subprocess.run([*ROAM, "mount", "disk", "--from", f"unix://{socket}", "--file",
                              str(fuse), *_files(root, "rogue")],
                             capture_output=True, text=True, timeout=60)
    mounter = serve_in_background("mount", "disk", "--from", f"unix://{socket}", "--file",
                                  str(fuse), "--cache", str(tmp_path / "cache"),
                                  *_files(root, "a"), socket=fuse / "disk")
    try:
        assert refused.returncode == 1 and "TLS" in refused.stderr, refused.stderr
        with (fuse / "disk").open("rb") as got, (snapshot / "disk.img").open("rb") as want:
            assert got.read(1 << 20) == want.read(1 << 20)
    finally:
        for process in (mounter, registry):
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=30)
