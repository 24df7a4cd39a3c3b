"""`roam nbd serve --tls-ca`: STARTTLS that also requires a client certificate the CA
signed; a client without one, or with another CA's, is turned away and the server serves
on."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from roam.exposure.nbd.client import NBDClient

ROAM = [sys.executable, "-m", "roam.cli.main"]
SIZE = 1 << 20


def _pem(cert: trustme.LeafCert, directory: Path, name: str) -> tuple[str, str]:
    cert.cert_chain_pems[0].write_to_path(str(directory / f"{name}.pem"))
    cert.private_key_pem.write_to_path(str(directory / f"{name}.key"))
    return str(directory / f"{name}.pem"), str(directory / f"{name}.key")


def _client(ca: Path, cert: tuple[str, str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


async def test_client_certificate_required(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server_cert = _pem(ca.issue_cert("127.0.0.1"), tmp_path, "server")
    client_cert = _pem(ca.issue_cert("client"), tmp_path, "client")
    rogue_cert = _pem(trustme.CA().issue_cert("client"), tmp_path, "rogue")
    disk = tmp_path / "disk.img"
    data = os.urandom(SIZE)
    disk.write_bytes(data)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        *ROAM, "nbd", "serve", str(disk), "--listen", f"tcp://127.0.0.1:{port}",
        "--tls-cert", server_cert[0], "--tls-key", server_cert[1],
        "--tls-ca", str(tmp_path / "ca.pem"), stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        while b"serving on" not in (line := await proc.stderr.readline()):
            assert line, "the server exited"
        assert b"mutual TLS required" in line
        uri = f"nbd://127.0.0.1:{port}/"
        for refused in (None, rogue_cert):
            with pytest.raises((OSError, asyncio.IncompleteReadError, ssl.SSLError)):
                client = await NBDClient.connect(uri, tls=_client(tmp_path / "ca.pem", refused))
                try:  # TLS 1.3: the refusal arrives after the client's handshake
                    await client.read(0, 4096)
                finally:
                    await client.close()
        async with await NBDClient.connect(uri, tls=_client(tmp_path / "ca.pem", client_cert)
                                           ) as client:
            assert await client.read(0, SIZE) == data
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
