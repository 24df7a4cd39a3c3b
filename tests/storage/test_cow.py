"""Copy-on-write overlay over a read-only base."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from roam.storage.cow import CopyOnWrite
from roam.storage.gate import Gate
from roam.storage.provider import StorageError
from roam.storage.sources import FileSource, MemorySource

BS = 4096
SIZE = 8 * BS + 300  # a short last block


@pytest.fixture
def base_file(tmp_path: Path) -> tuple[Path, bytes]:
    content = os.urandom(SIZE)
    path = tmp_path / "base.img"
    path.write_bytes(content)
    return path, content


def _open(tmp_path: Path, base: Path) -> CopyOnWrite:
    return CopyOnWrite(FileSource(base, readonly=True),
                      FileSource(tmp_path / "upper.img", SIZE, create=True),
                      tmp_path / "upper.map", BS)


async def test_reads_fall_through_to_base(tmp_path: Path, base_file: tuple[Path, bytes]) -> None:
    path, content = base_file
    ov = _open(tmp_path, path)
    assert ov.size() == SIZE
    assert bytes(await ov.read_at(0, SIZE)) == content
    assert bytes(await ov.read_at(BS - 3, 7)) == content[BS - 3 : BS + 4]
    assert ov.written_blocks() == 0
    await ov.close()


async def test_partial_writes_copy_up(tmp_path: Path, base_file: tuple[Path, bytes]) -> None:
    path, content = base_file
    ov = _open(tmp_path, path)
    model = bytearray(content)
    for offset, data in [(BS - 2, b"span"), (3 * BS + 100, b"mid"),
                         (5 * BS, b"W" * BS), (SIZE - 5, b"last!")]:
        await ov.write_at(offset, data)
        model[offset : offset + len(data)] = data
    assert bytes(await ov.read_at(0, SIZE)) == bytes(model)
    assert ov.written_blocks() == 5  # blocks 0, 1, 3, 5 and the last
    # Unaligned read across base, upper, base, upper runs.
    assert bytes(await ov.read_at(BS // 2, 6 * BS)) == bytes(model[BS // 2 : BS // 2 + 6 * BS])
    await ov.close()
    assert path.read_bytes() == content  # the base never changes


async def test_map_persists_across_reopen(tmp_path: Path,
                                          base_file: tuple[Path, bytes]) -> None:
    path, content = base_file
    ov = _open(tmp_path, path)
    model = bytearray(content)
    await ov.write_at(2 * BS + 7, b"persisted")
    model[2 * BS + 7 : 2 * BS + 16] = b"persisted"
    await ov.write_at(7 * BS, bytes(BS))  # a written block of zeroes is still written
    model[7 * BS : 8 * BS] = bytes(BS)
    await ov.close()
    assert (tmp_path / "upper.map").stat().st_size == 9

    again = _open(tmp_path, path)
    assert again.written_blocks() == 2
    assert bytes(await again.read_at(0, SIZE)) == bytes(model)
    await again.write_at(0, b"more")
    model[0:4] = b"more"
    await again.flush()  # flush alone saves the map too
    third = _open(tmp_path, path)
    assert bytes(await third.read_at(0, SIZE)) == bytes(model)
    await third.close()
    await again.close()


async def test_map_of_wrong_size_is_refused(tmp_path: Path,
                                            base_file: tuple[Path, bytes]) -> None:
    path, _ = base_file
    (tmp_path / "upper.map").write_bytes(bytes(5))
    with pytest.raises(StorageError, match="5 blocks"):
        _open(tmp_path, path)


async def test_sizes_must_match() -> None:
    with pytest.raises(StorageError):
        CopyOnWrite(MemorySource(BS), MemorySource(2 * BS), "/nonexistent/map", BS)


async def test_write_out_of_range(tmp_path: Path) -> None:
    ov = CopyOnWrite(MemorySource(BS), MemorySource(BS), tmp_path / "m", BS)
    with pytest.raises(StorageError):
        await ov.write_at(BS - 1, b"xy")
    with pytest.raises(StorageError):
        await ov.read_at(BS, 1)
    assert ov.written_blocks() == 0


async def test_write_during_slow_copy_up_is_not_lost(tmp_path: Path) -> None:
    """A partial write waits for the base; a whole-block write to the same block that
    finishes meanwhile must survive the copy-up."""
    base_src = MemorySource(2 * BS)
    await base_src.write_at(0, b"B" * (2 * BS))
    base = Gate(base_src)  # lets the test hold base reads
    ov = CopyOnWrite(base, MemorySource(2 * BS), tmp_path / "m", BS)
    await base.lock(reads=True)
    partial = asyncio.create_task(ov.write_at(10, b"p"))
    for _ in range(5):
        await asyncio.sleep(0)
    whole = asyncio.create_task(ov.write_at(0, b"W" * BS))
    for _ in range(5):
        await asyncio.sleep(0)
    base.unlock()
    await asyncio.gather(partial, whole)
    got = bytes(await ov.read_at(0, BS))
    # Either order is fine, but nothing may come from the base once W landed.
    assert got in (b"W" * BS, b"W" * 10 + b"p" + b"W" * (BS - 11))
