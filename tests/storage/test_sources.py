"""Sources: memory, mmap-backed file, sparse file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from roam.storage.provider import Provider, StorageError
from roam.storage.sources import FileSource, MemorySource, SparseFileSource

BS = 64 * 1024


async def _roundtrip_unaligned(dev: Provider) -> None:
    size = dev.size()
    data = os.urandom(3 * BS + 17)
    await dev.write_at(BS - 5, data)  # starts 5 bytes before a boundary, spans four blocks
    assert bytes(await dev.read_at(BS - 5, len(data))) == data
    assert bytes(await dev.read_at(0, BS - 5)) == bytes(BS - 5)
    tail = size - (BS - 5 + len(data))
    assert bytes(await dev.read_at(BS - 5 + len(data), tail)) == bytes(tail)
    await dev.write_at(size - 3, b"end")  # the very last bytes
    assert bytes(await dev.read_at(size - 4, 4)) == b"\0end"


async def _bad_ranges(dev: Provider) -> None:
    size = dev.size()
    for offset, length in [(-1, 1), (size, 1), (size - 1, 2), (0, size + 1), (0, -1)]:
        with pytest.raises(StorageError):
            await dev.read_at(offset, length)
    with pytest.raises(StorageError):
        await dev.write_at(size - 1, b"xy")
    with pytest.raises(StorageError):
        await dev.write_at(-1, b"x")
    assert bytes(await dev.read_at(size, 0)) == b""


async def test_memory_source() -> None:
    dev = MemorySource(10 * BS + 123)
    assert dev.size() == 10 * BS + 123
    assert bytes(await dev.read_at(0, dev.size())) == bytes(dev.size())
    await _roundtrip_unaligned(dev)
    await _bad_ranges(dev)


async def test_memory_source_empty() -> None:
    dev = MemorySource(0)
    assert dev.size() == 0
    assert bytes(await dev.read_at(0, 0)) == b""
    with pytest.raises(StorageError):
        await dev.read_at(0, 1)


async def test_file_source_persists_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    dev = FileSource(path, 5 * BS + 1000, create=True)
    await _roundtrip_unaligned(dev)
    await _bad_ranges(dev)
    want = bytes(await dev.read_at(0, dev.size()))
    await dev.close()
    assert path.read_bytes() == want  # MAP_SHARED: the writes reached the file

    again = FileSource(path)  # size taken from the file
    assert again.size() == len(want)
    assert bytes(await again.read_at(0, again.size())) == want
    await again.write_at(7, b"changed")
    await again.flush()
    assert path.read_bytes()[7:14] == b"changed"
    await again.close()
    with pytest.raises(StorageError, match="closed"):
        await again.read_at(0, 1)
    with pytest.raises(StorageError, match="closed"):
        await again.write_at(0, b"x")


async def test_file_source_create_is_sparse_and_resizes(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    dev = FileSource(path, 64 * 1024 * 1024, create=True)
    assert os.stat(path).st_blocks * 512 < 1024 * 1024  # ftruncate: nothing allocated
    await dev.close()
    grown = FileSource(path, 128 * 1024 * 1024)
    assert os.stat(path).st_size == grown.size() == 128 * 1024 * 1024
    await grown.close()


async def test_file_source_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open"):
        FileSource(tmp_path / "nope")


async def test_file_source_readonly(tmp_path: Path) -> None:
    path = tmp_path / "base"
    content = os.urandom(3 * BS)
    path.write_bytes(content)
    dev = FileSource(path, readonly=True)
    assert bytes(await dev.read_at(BS - 1, 2)) == content[BS - 1 : BS + 1]
    with pytest.raises(StorageError, match="read-only"):
        await dev.write_at(0, b"x")
    await dev.flush()
    await dev.close()
    assert path.read_bytes() == content
    with pytest.raises(StorageError, match="expected"):
        FileSource(path, 4 * BS, readonly=True)  # never resizes a read-only file
    assert path.read_bytes() == content


async def test_file_source_empty_file(tmp_path: Path) -> None:
    dev = FileSource(tmp_path / "empty", create=True)
    assert dev.size() == 0
    assert bytes(await dev.read_at(0, 0)) == b""
    await dev.write_at(0, b"")
    await dev.close()


async def test_file_source_close_while_a_view_is_held(tmp_path: Path) -> None:
    dev = FileSource(tmp_path / "f", BS, create=True)
    await dev.write_at(0, b"abc")
    view = await dev.read_at(0, 3)
    await dev.close()  # must not raise although the caller still holds a view
    assert bytes(view) == b"abc"


async def test_sparse_source_roundtrip(tmp_path: Path) -> None:
    dev = SparseFileSource(tmp_path / "s", 9 * BS + 999, block_size=BS)
    await _roundtrip_unaligned(dev)
    await _bad_ranges(dev)
    await dev.close()
    with pytest.raises(StorageError, match="closed"):
        await dev.read_at(0, 1)
    with pytest.raises(StorageError, match="closed"):
        await dev.write_at(0, b"x")


async def test_sparse_source_zero_blocks_take_no_space(tmp_path: Path) -> None:
    size = 256 * BS
    dev = SparseFileSource(tmp_path / "s", size, block_size=BS)
    assert dev.allocated_bytes() == 0
    await dev.write_at(0, bytes(size))  # all zeroes: nothing allocated
    assert dev.allocated_bytes() == 0
    await dev.write_at(10 * BS, os.urandom(4 * BS))
    assert 4 * BS <= dev.allocated_bytes() < 8 * BS
    # Zeroing whole blocks gives their space back.
    await dev.write_at(10 * BS, bytes(4 * BS))
    assert dev.allocated_bytes() < BS
    assert bytes(await dev.read_at(0, size)) == bytes(size)


async def test_sparse_source_unaligned_zero_write_keeps_neighbours(tmp_path: Path) -> None:
    dev = SparseFileSource(tmp_path / "s", 4 * BS, block_size=BS)
    data = os.urandom(4 * BS)
    await dev.write_at(0, data)
    # Zeroes from the middle of block 0 to the middle of block 3: blocks 1-2 become
    # holes, blocks 0 and 3 keep their other halves.
    await dev.write_at(BS // 2, bytes(3 * BS))
    want = data[: BS // 2] + bytes(3 * BS) + data[BS // 2 + 3 * BS :]
    assert bytes(await dev.read_at(0, 4 * BS)) == want
    assert dev.allocated_bytes() <= 2 * BS + 8192


async def test_sparse_source_reopen_keeps_content_and_size(tmp_path: Path) -> None:
    path = tmp_path / "s"
    dev = SparseFileSource(path, 3 * BS, block_size=BS)
    await dev.write_at(BS + 1, b"kept")
    await dev.flush()
    await dev.close()
    again = SparseFileSource(path, 3 * BS, block_size=BS, create=False)
    assert bytes(await again.read_at(BS, 6)) == b"\0kept\0"
    await again.close()
    with pytest.raises(StorageError, match="cannot open"):
        SparseFileSource(tmp_path / "missing", BS, create=False)
