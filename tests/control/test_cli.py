"""`roam control` as users run it: a TLS control plane on loopback, tokens, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

ROAM = [sys.executable, "-m", "roam.cli.main"]


def roam(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ROAM, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@dataclass
class Served:
    url: str
    token: str
    ca: Path
    data: Path
    process: subprocess.Popen[str]

    def env(self, token: str | None = None) -> dict[str, str]:
        return {"ROAM_CONTROL_URL": self.url, "ROAM_TOKEN": token or self.token}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("control")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    data = tmp / "data"
    created = roam("control", "token", "create", "--data", str(data), "--json")
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)["token"]
    port = free_port()
    process = subprocess.Popen([*ROAM, "control", "serve", "--data", str(data), "--listen",
                                f"127.0.0.1:{port}", "--tls-cert", str(tmp / "server.pem")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = Served(f"https://127.0.0.1:{port}", token, tmp / "ca.pem", data, process)
    deadline = time.monotonic() + 30
    while roam("control", "status", "--ca", str(result.ca), env=result.env()).returncode:
        assert process.poll() is None and time.monotonic() < deadline, "no control plane"
        time.sleep(0.2)
    yield result
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def test_tokens_and_the_store_are_private(served: Served) -> None:
    assert served.token.startswith("roam_")
    assert stat.S_IMODE(served.data.stat().st_mode) == 0o700
    assert stat.S_IMODE((served.data / "control.db").stat().st_mode) == 0o600
    assert served.token.encode() not in (served.data / "control.db").read_bytes()


def test_https_with_the_ca_and_typed_one_line_errors(served: Served) -> None:
    ca = ("--ca", str(served.ca))
    status = roam("control", "status", *ca, "--json", env=served.env())
    assert status.returncode == 0 and json.loads(status.stdout)["leader"] is True
    untrusted = roam("control", "status", env=served.env())
    assert untrusted.returncode == 1 and untrusted.stderr.count("\n") == 1
    assert "certificate" in untrusted.stderr.lower()
    wrong = roam("control", "vm", "ls", *ca, env=served.env("roam_wrong"))
    assert (wrong.returncode, wrong.stderr) == (1, "error: that token is not valid here\n")
    missing = roam("control", "vm", "get", "nope", *ca, env=served.env())
    assert (missing.returncode, missing.stderr) == (1, "error: no VM called 'nope'\n")
    listed = roam("control", "vm", "ls", *ca, "--json", env=served.env())
    assert json.loads(listed.stdout) == []


def test_a_vm_no_node_fits_stays_pending_and_says_why(served: Served) -> None:
    ca = ("--ca", str(served.ca))
    created = roam("control", "vm", "create", "lonely", "--package", "/nowhere", "--memory",
                   "1G", *ca, env=served.env())
    assert created.returncode == 1
    assert created.stderr == ("error: lonely stays pending until a node fits it: no node "
                              "fits lonely (no nodes)\n")
    got = json.loads(roam("control", "vm", "get", "lonely", *ca, "--json",
                          env=served.env()).stdout)
    assert got["status"]["phase"] == "pending" and got["spec"]["memory_mib"] == 1024
    deleted = roam("control", "vm", "delete", "lonely", *ca, "--json", env=served.env())
    assert json.loads(deleted.stdout)["desired"]["deleted"] is True


def test_bad_options_are_usage_errors_and_send_nothing(served: Served) -> None:
    ca = ("--ca", str(served.ca))
    bad = roam("control", "vm", "create", "x", "--package", "/p", "--memory", "lots", *ca,
               env=served.env())
    assert bad.returncode == 2 and "--memory" in bad.stderr
    both = roam("control", "vm", "create", "x", "--package", "/p", "--from", "tcp://h:1",
                "--memory", "1G", *ca, env=served.env())
    assert both.returncode == 2 and "package or from" in both.stderr
    label = roam("node", "join", "--control", served.url, "--state-dir", "/nonexistent",
                 "--listen", "tcp://127.0.0.1:1", "--label", "price=free")
    assert label.returncode == 2 and "price" in label.stderr
    listed = roam("control", "vm", "ls", *ca, "--json", env=served.env())
    assert "x" not in [vm["name"] for vm in json.loads(listed.stdout)]


def test_mutual_tls_needs_a_client_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem"))
    ca.issue_cert("operator").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "client.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = free_port()
    process = subprocess.Popen([*ROAM, "control", "serve", "--data", str(tmp_path / "d"),
                                "--listen", f"127.0.0.1:{port}", "--tls-cert",
                                str(tmp_path / "server.pem"), "--tls-ca",
                                str(tmp_path / "ca.pem")], stderr=subprocess.PIPE, text=True)
    env = {"ROAM_CONTROL_URL": f"https://127.0.0.1:{port}"}
    ca_option = ("--ca", str(tmp_path / "ca.pem"))
    try:
        deadline = time.monotonic() + 30
        while True:  # up once it refuses a client without a certificate
            refused = roam("control", "status", *ca_option, env=env)
            if "no control plane answers" not in refused.stderr \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1
        accepted = roam("control", "status", *ca_option, "--json", env={
            **env, "ROAM_CONTROL_CERT": str(tmp_path / "client.pem")})
        assert accepted.returncode == 0, accepted.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_one_control_plane_per_data_directory(served: Served) -> None:
    second = roam("control", "serve", "--data", str(served.data), "--listen",
                  f"127.0.0.1:{free_port()}")
    assert second.returncode == 1
    assert second.stderr == f"error: another control plane serves {served.data}\n"
