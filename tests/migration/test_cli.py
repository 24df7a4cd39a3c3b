"""`roam device serve` and `roam device receive` as users run them: separate processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import trustme

ROAM = [sys.executable, "-m", "roam.cli.main"]


def _serve(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([*ROAM, "device", "serve", *args], stderr=subprocess.PIPE,
                            text=True)


def _wait_for_socket(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline, "server never listened"
        time.sleep(0.05)


def _receive(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ROAM, "device", "receive", *args], capture_output=True, text=True,
                          timeout=120)


def test_serve_and_receive_over_unix_socket(tmp_path: Path) -> None:
    mem = tmp_path / "mem.img"
    mem.write_bytes(os.urandom(3 * 1024 * 1024 + 777))
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:  # mostly holes
        f.truncate(64 * 1024 * 1024)
        f.seek(40 * 1024 * 1024)
        f.write(b"data in the middle")
    sock = tmp_path / "s.sock"
    server = _serve(["--listen", f"unix://{sock}", f"mem={mem}", f"disk={disk}"])
    _wait_for_socket(sock)
    out = tmp_path / "out"
    done = _receive(["--connect", f"unix://{sock}", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert server.wait(timeout=30) == 0
    assert (out / "mem").read_bytes() == mem.read_bytes()
    assert (out / "disk").read_bytes() == disk.read_bytes()
    assert os.stat(out / "disk").st_blocks * 512 < 1024 * 1024  # holes stayed holes
    assert "blocks verified" in done.stdout
    assert not list(out.glob("*.partial"))


def test_mutual_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    files = {}
    for side in ("server", "client"):
        cert = ca.issue_cert("localhost", "127.0.0.1")
        files[side] = (tmp_path / f"{side}.pem", tmp_path / f"{side}.key")
        cert.cert_chain_pems[0].write_to_path(str(files[side][0]))
        cert.private_key_pem.write_to_path(str(files[side][1]))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    rogue = trustme.CA().issue_cert("localhost")
    rogue.cert_chain_pems[0].write_to_path(str(tmp_path / "rogue.pem"))
    rogue.private_key_pem.write_to_path(str(tmp_path / "rogue.key"))

    data = tmp_path / "d.img"
    data.write_bytes(os.urandom(1024 * 1024))
    sock = tmp_path / "tls.sock"

    def tls(side: str) -> list[str]:
        cert, key = files[side]
        return ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca",
                str(tmp_path / "ca.pem")]

    server = _serve(["--listen", f"unix://{sock}", *tls("server"), f"d={data}"])
    _wait_for_socket(sock)
    # A client whose certificate our CA did not sign is turned away...
    refused = _receive(["--connect", f"unix://{sock}", "--out", str(tmp_path / "x"),
                        "--tls-cert", str(tmp_path / "rogue.pem"),
                        "--tls-key", str(tmp_path / "rogue.key"),
                        "--tls-ca", str(tmp_path / "ca.pem")])
    assert refused.returncode != 0
    assert "error:" in refused.stderr
    assert not (tmp_path / "x" / "d").exists()
    # ...and the server is still there for the right one.
    done = _receive(["--connect", f"unix://{sock}", "--out", str(tmp_path / "out"),
                     *tls("client")])
    assert done.returncode == 0, done.stderr
    _, server_log = server.communicate(timeout=30)
    assert server.returncode == 0, server_log
    assert (tmp_path / "out" / "d").read_bytes() == data.read_bytes()


def test_receive_from_nobody_fails_clearly(tmp_path: Path) -> None:
    done = _receive(["--connect", f"unix://{tmp_path}/none.sock", "--out", str(tmp_path)])
    assert done.returncode == 1
    assert "error: cannot connect to unix://" in done.stderr


def test_server_killed_mid_transfer_leaves_no_partial_output(tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(1024 * 1024))
    sock = tmp_path / "s.sock"
    server = _serve(["--listen", f"unix://{sock}", f"big={big}"])
    _wait_for_socket(sock)
    receiver = subprocess.Popen(
        [*ROAM, "device", "receive", "--connect", f"unix://{sock}", "--out",
         str(tmp_path / "out")], stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "out" / "big.partial"
    deadline = time.monotonic() + 30
    while not partial.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()
    _, err = receiver.communicate(timeout=60)
    assert receiver.returncode == 1
    assert "error:" in err and "lost the source" in err
    assert not partial.exists() and not (tmp_path / "out" / "big").exists()


def test_bad_arguments_are_explained(tmp_path: Path) -> None:
    done = subprocess.run([*ROAM, "device", "serve", "--listen", "http://x", "a=b"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "no such file" in done.stderr or "address must be" in done.stderr
