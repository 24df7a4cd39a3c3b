"""Interop with NBD software we did not write: qemu-img, qemu-io, nbdinfo, nbdcopy, fio, nbdkit.

roam's side runs as `roam nbd serve` in its own process (so SIGTERM handling is covered
too), or in-process where a test needs a provider the CLI does not build.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from roam.exposure.nbd import protocol as p
from roam.exposure.nbd.client import NBDClient
from roam.exposure.nbd.server import Export, NBDServer
from roam.storage.sources import MemorySource

SIZE = 16 * 1024 * 1024
TOOLS = ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "fio", "nbdkit")
pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS),
                                reason="needs qemu-utils, libnbd-bin, fio and nbdkit")


def pattern(size: int, seed: int) -> bytes:
    """Incompressible data with some zero runs, so holes and data both occur."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for _ in range(8):
        at = rng.randrange(0, size - 300_000)
        data[at : at + 300_000] = bytes(300_000)
    return bytes(data)


def wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """`roam nbd serve` on a 16 MiB file plus a second export; yields (socket, disk, spare)."""
    disk, spare = tmp_path / "disk.img", tmp_path / "spare.img"
    disk.write_bytes(pattern(SIZE, 1))
    spare.write_bytes(bytes(SIZE))
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "roam.cli.main", "nbd", "serve", str(disk), "--socket",
         str(sock), "--name", "disk", "--export", f"spare={spare}"],
        stderr=subprocess.PIPE)
    wait_for(sock, proc)
    yield str(sock), disk, spare
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert b"serving on unix:" in err and b"stopping" in err


def u(sock: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def test_qemu_img_info_and_convert_both_ways(served: tuple[str, Path, Path],
                                            tmp_path: Path) -> None:
    sock, disk, spare = served
    info = json.loads(run("qemu-img", "info", "--output=json", u(sock, "disk")))
    assert info["virtual-size"] == SIZE
    out = tmp_path / "out.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", u(sock, "disk"), str(out))
    assert out.read_bytes() == disk.read_bytes()
    source = tmp_path / "source.img"
    source.write_bytes(pattern(SIZE, 2))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), u(sock, "spare"))
    assert spare.read_bytes() == source.read_bytes()


def test_qemu_io_patterns(served: tuple[str, Path, Path]) -> None:
    sock, disk, _ = served
    uri = u(sock, "disk")
    run("qemu-io", "-f", "raw", "-c", "write -P 0xab 65536 1M", "-c", "write -z 3M 512k",
        "-c", "write -P 0x17 -f 5M 12345", "-c", "discard 6M 64k", "-c", "flush", uri)
    out = run("qemu-io", "-f", "raw", "-c", "read -P 0xab 65536 1M", "-c", "read -P 0 3M 512k",
              "-c", "read -P 0x17 5M 12345", "-c", "read -P 0 6M 64k", uri)
    assert "Pattern verification failed" not in out and out.count("read ") == 4
    bad = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0xcd 65536 4096", uri],
                         capture_output=True, text=True, timeout=60)
    assert "Pattern verification failed" in bad.stdout + bad.stderr
    data = disk.read_bytes()
    assert data[65536 : 65536 + (1 << 20)] == b"\xab" * (1 << 20)
    assert data[3 << 20 : (3 << 20) + (512 << 10)] == bytes(512 << 10)
    assert data[5 << 20 : (5 << 20) + 12345] == b"\x17" * 12345


def test_nbdinfo_list(served: tuple[str, Path, Path]) -> None:
    sock, _, _ = served
    listing = json.loads(run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}"))
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert set(exports) == {"disk", "spare"}
    assert exports["disk"]["export-size"] == SIZE
    assert exports["disk"]["can_multi_conn"] is True
    assert exports["disk"]["block_size_maximum"] == 32 * 1024 * 1024
    assert "base:allocation" in exports["disk"]["contexts"]


def test_nbdcopy_both_ways(served: tuple[str, Path, Path], tmp_path: Path) -> None:
    sock, disk, spare = served
    out = tmp_path / "copy.img"
    run("nbdcopy", u(sock, "disk"), str(out))
    assert out.read_bytes() == disk.read_bytes()
    source = tmp_path / "source.img"
    source.write_bytes(pattern(SIZE, 3))
    run("nbdcopy", "--connections=4", str(source), u(sock, "spare"))
    assert spare.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("bs", ["4k", "1M"])
def test_fio_verify(served: tuple[str, Path, Path], bs: str) -> None:
    sock, _, _ = served
    out = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={u(sock, 'spare')}",
              "--rw=randwrite", f"--bs={bs}", "--iodepth=16", "--size=4M", "--verify=crc32c",
              "--do_verify=1", "--verify_state_save=0", "--output-format=json")
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 4 * 1024 * 1024
    assert job["read"]["io_bytes"] == 4 * 1024 * 1024  # the verify pass read it all back


def test_roam_nbd_copy_cli(served: tuple[str, Path, Path], tmp_path: Path) -> None:
    sock, disk, spare = served
    out = tmp_path / "out.img"
    roam = [sys.executable, "-m", "roam.cli.main", "nbd", "copy"]
    subprocess.run([*roam, u(sock, "disk"), str(out)], check=True, timeout=60)
    assert out.read_bytes() == disk.read_bytes()
    assert out.stat().st_blocks * 512 < SIZE  # zero runs stayed holes
    source = tmp_path / "source.img"
    source.write_bytes(pattern(SIZE, 4))
    subprocess.run([*roam, str(source), u(sock, "spare")], check=True, timeout=60)
    assert spare.read_bytes() == source.read_bytes()


@pytest.fixture
async def nbdkit(tmp_path: Path) -> AsyncIterator[str]:
    sock = tmp_path / "kit.sock"
    proc = await asyncio.create_subprocess_exec(
        "nbdkit", "-f", "-U", str(sock), "memory", str(SIZE))
    for _ in range(500):
        if sock.exists():
            break
        await asyncio.sleep(0.01)
    yield str(sock)
    proc.terminate()
    await proc.wait()


async def test_client_against_nbdkit(nbdkit: str) -> None:
    async with await NBDClient.connect(u(nbdkit, "")) as c:
        assert c.size == SIZE and c.structured and c.context_id is not None
        data = pattern(2 * 1024 * 1024, 5)
        await asyncio.gather(c.write(1 << 20, data), c.write(8 << 20, b"tail", fua=True))
        await c.flush()
        assert await c.read(1 << 20, len(data)) == data
        assert await c.read(8 << 20, 4) == b"tail"
        await c.write_zeroes(1 << 20, 4096)
        await c.trim(2 << 20, 65536)
        await c.cache(0, 65536)
        got = await c.read(1 << 20, len(data))
        assert got[:4096] == bytes(4096) and got[4096 : 1 << 20] == data[4096 : 1 << 20]
        assert got[1 << 20 : (1 << 20) + 65536] == bytes(65536)
        extents = await c.block_status(0, SIZE)
        assert extents[0].hole and extents[0].zero  # nothing written below 1 MiB
        assert sum(e.length for e in extents) <= SIZE
        with pytest.raises(p.NBDError):
            await c.read(SIZE - 1, 2)


async def test_roam_copy_to_and_from_nbdkit(nbdkit: str, tmp_path: Path) -> None:
    from roam.exposure.nbd.copy import copy, open_endpoint

    source = tmp_path / "src.img"
    source.write_bytes(pattern(SIZE, 6))
    src = await open_endpoint(str(source))
    dst = await open_endpoint(u(nbdkit, ""), dest_size=SIZE)
    await copy(src, dst)
    await src.finish()
    await dst.finish()
    back = tmp_path / "back.img"
    src = await open_endpoint(u(nbdkit, ""))
    dst = await open_endpoint(str(back), dest_size=SIZE)
    await copy(src, dst)
    await src.finish()
    await dst.finish()
    assert back.read_bytes() == source.read_bytes()


async def test_nbdinfo_map_sees_holes(tmp_path: Path) -> None:
    class Sparse(MemorySource):
        def allocated_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
            return [(1 << 20, 1 << 20)]

    server = NBDServer([Export("", Sparse(SIZE))])
    sock = tmp_path / "map.sock"
    await server.serve_unix(sock)
    try:
        proc = await asyncio.create_subprocess_exec(
            "nbdinfo", "--map", "--json", f"nbd+unix:///?socket={sock}",
            stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        extents = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
        assert extents == [(0, 1 << 20, 3), (1 << 20, 1 << 20, 0),
                           (2 << 20, SIZE - (2 << 20), 3)]
    finally:
        await server.close()


def test_cli_rejects_bad_listen(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    proc = subprocess.run([sys.executable, "-m", "roam.cli.main", "nbd", "serve", str(disk),
                           "--listen", "udp://x"], capture_output=True, timeout=30,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode != 0 and b"tcp://HOST:PORT" in proc.stderr


def test_cli_read_only_over_tcp(tmp_path: Path) -> None:
    disk = tmp_path / "ro.img"
    disk.write_bytes(pattern(SIZE, 8))
    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "roam.cli.main", "nbd", "serve", str(disk),
                             "--listen", f"tcp://127.0.0.1:{port}", "--read-only"],
                            stderr=subprocess.PIPE)
    try:
        uri = f"nbd://127.0.0.1:{port}/"
        for _ in range(500):
            if subprocess.run(["nbdinfo", "--can", "connect", uri]).returncode == 0:
                break
            time.sleep(0.02)
        assert subprocess.run(["nbdinfo", "--is", "read-only", uri]).returncode == 0
        write = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4096", uri],
                               capture_output=True, text=True, timeout=60)
        assert write.returncode != 0 and "Permission denied" in write.stderr
        out = tmp_path / "out.img"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))
        assert out.read_bytes() == disk.read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert f"tcp://127.0.0.1:{port}".encode() in err


def test_starttls_with_qemu_and_nbdinfo(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca-cert.pem"))  # the names QEMU and libnbd use
    cert.private_key_pem.write_to_path(str(tmp_path / "server-key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server-cert.pem"))
    disk = tmp_path / "tls.img"
    disk.write_bytes(bytes(SIZE))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "roam.cli.main", "nbd", "serve", str(disk), "--listen",
         f"tcp://127.0.0.1:{port}", "--tls-cert", str(tmp_path / "server-cert.pem"),
         "--tls-key", str(tmp_path / "server-key.pem")], stderr=subprocess.PIPE)
    try:
        tls_uri = f"nbds://127.0.0.1:{port}/?tls-certificates={tmp_path}"
        for _ in range(500):
            if subprocess.run(["nbdinfo", "--can", "connect", tls_uri]).returncode == 0:
                break
            time.sleep(0.02)
        plain = subprocess.run(["nbdinfo", f"nbd://127.0.0.1:{port}/"], capture_output=True)
        assert plain.returncode != 0  # TLS is required on TCP
        creds = f"tls-creds-x509,id=tls0,dir={tmp_path},endpoint=client"
        opts = f"driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"
        info = run("qemu-img", "info", "--object", creds, "--image-opts", opts)
        assert f"({SIZE} bytes)" in info
        assert "newstyle-fixed with TLS" in run("nbdinfo", tls_uri)
        run("qemu-io", "--object", creds, "--image-opts", opts, "-c", "write -P 0x5a 4096 8192")
        assert disk.read_bytes()[4096 : 4096 + 8192] == b"\x5a" * 8192
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
