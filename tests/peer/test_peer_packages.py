"""A destination peer that holds the package a VM was made from is sent only what differs
from its files (issue 13): named by content hash, never trusted by name."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from roam.migration.content import CHUNK
from roam.peer.packages import HeldPackages, digest_file
from roam.vm.package import Package
from tests.blueprint.boot import short_dir
from tests.peer.conftest import Peer

pytestmark = pytest.mark.slow

BLOB = 8 << 20  # written to the guest's disk before the move, read back after it
ALTERED = 64  # chunks of 64 KiB changed in the twin's memory, before and after indexing


def used(package: Path) -> int:
    """Bytes of the package's memory and disk files that are not zero, by 64 KiB chunk."""
    loaded = Package.load(package)
    files = loaded.config.files
    return sum(CHUNK * sum(d is not None for d in digest_file(loaded.path(name)).digests)
               for name in (files.memory, files.disk))


def kernel_files(package: Path) -> int:
    files = Package.load(package).config.files
    return sum((package / n).stat().st_size for n in (files.kernel, files.initramfs)
               if n is not None)


def overwrite(path: Path, chunks: list[int], keep_mtime: bool = False) -> None:
    """Random data over these chunks; with `keep_mtime`, the file looks unchanged to a
    cache keyed by size and modification time (stale digests)."""
    st = path.stat()
    with path.open("r+b") as f:
        for chunk in chunks:
            f.seek(chunk * CHUNK)
            f.write(os.urandom(CHUNK))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture(scope="module")
def world(snapshot: Path) -> Iterator[dict[str, object]]:
    """Peer a runs the VMs; b holds the snapshot (given at its start); c holds a twin:
    the same config.json (the same package id), other content in some memory chunks."""
    with short_dir() as root:
        twin = root / "twin"
        subprocess.run(["cp", "-a", "--sparse=always", str(snapshot), str(twin)], check=True)
        memory = Package.load(twin).path(Package.load(twin).config.files.memory)
        nonzero = [i for i, d in enumerate(digest_file(memory).digests) if d is not None]
        assert len(nonzero) > 4 * ALTERED
        before, after = nonzero[:ALTERED], nonzero[-ALTERED:]
        overwrite(memory, before)
        peers = {"a": Peer("a", root), "b": Peer("b", root, ("--package", str(snapshot))),
                 "c": Peer("c", root, ("--package", str(twin)))}
        try:
            yield {"peers": peers, "twin_memory": memory, "after": after}
        finally:
            for p in peers.values():
                p.close()


def indexed(peer: Peer) -> None:
    """Wait until the peer has hashed its held package (memory and disk)."""
    digests = peer.dir / "packages" / "digests"
    deadline = time.monotonic() + 120
    while len(list(digests.glob("*.digests"))) < 2:
        assert time.monotonic() < deadline, "the peer did not index its package"
        time.sleep(0.2)


def migrate(src: Peer, name: str, dst: Peer) -> dict[str, int]:
    """No post-copy, and the destination compares its whole memory with the source's at
    the pause before it resumes (it declines, and this fails, if they differ)."""
    result: dict[str, int] = json.loads(src.migrate(name, dst, "--no-postcopy",
                                                    "--check-memory").stdout)
    assert result["outcome"] == "completed"
    assert dst.vms()[name]["memory_checked"] is True
    return result


def write_blob(p: Peer, name: str) -> str:
    return p.sh(name, f"head -c {BLOB} /dev/urandom > /root/blob && sync && "
                      "sha256sum /root/blob")


def read_blob(p: Peer, name: str) -> str:
    """From the disk, not the guest's page cache."""
    return p.sh(name, "sync && echo 3 > /proc/sys/vm/drop_caches && sha256sum /root/blob")


def test_a_destination_holding_the_package_is_sent_only_changes(
        world: dict[str, object], snapshot: Path) -> None:
    peers = world["peers"]
    assert isinstance(peers, dict)
    a, b = peers["a"], peers["b"]
    indexed(b)
    a.run(snapshot, "held")
    blob = write_blob(a, "held")
    result = migrate(a, "held", b)
    held = used(snapshot)
    total = held + kernel_files(snapshot)  # what goes without HAVE, zero blocks aside
    assert result["have_bytes"] > held // 2, (result, held)
    assert result["bytes_sent"] < total - held // 2, (result, held, total)
    assert result["bytes_sent"] > BLOB  # what the guest wrote was sent
    assert read_blob(b, "held") == blob
    assert b.sh("held", "redis-cli ping").strip() == "PONG"
    # Back to a, which holds the package too: it ran the VM from it.
    result = migrate(b, "held", a)
    assert result["have_bytes"] > held // 2, (result, held)
    assert read_blob(a, "held") == blob
    a.stop("held")


def test_content_decides_not_the_package_id(world: dict[str, object],
                                            snapshot: Path) -> None:
    """c holds a package with the snapshot's id whose memory differs in some chunks; some
    more change after c indexed it, behind a file that looks unchanged (stale digests).
    Every such chunk is sent, and the VM's memory is the source's."""
    peers, memory, after = world["peers"], world["twin_memory"], world["after"]
    assert isinstance(peers, dict) and isinstance(memory, Path) and isinstance(after, list)
    a, c = peers["a"], peers["c"]
    indexed(c)
    overwrite(memory, after, keep_mtime=True)
    held = HeldPackages(c.dir / "packages")
    assert set(held.held().values()) == {memory.parent}  # the twin, under the snapshot's id
    a.run(snapshot, "twin")  # idle: it changes few of those chunks itself
    result = migrate(a, "twin", c)
    # Both sets of chunks went as data (2 x 64 x 64 KiB), the stale ones once c's check
    # of its own copy failed and it asked for them.
    assert result["bytes_sent"] > 2 * ALTERED * CHUNK, result
    assert result["priority_blocks"] > 0, result
    assert result["have_bytes"] > used(snapshot) // 4, result  # the rest still matched
    assert c.sh("twin", "redis-cli ping").strip() == "PONG"
    c.stop("twin")
