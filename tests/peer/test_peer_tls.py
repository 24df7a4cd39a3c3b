"""Peers with mutual TLS: a VM moves between peers whose certificates share a CA, and a
peer with a foreign certificate is refused while the VM runs on at the source."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.blueprint.boot import short_dir
from tests.peer.conftest import Peer


def _identity(ca: trustme.CA, root: Path, name: str) -> tuple[str, ...]:
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(root / f"{name}.pem"))
    cert.private_key_pem.write_to_path(str(root / f"{name}.key"))
    ca.cert_pem.write_to_path(str(root / f"{name}-ca.pem"))
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
    b.call("stop", name="secure")
