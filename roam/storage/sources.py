"""Sources: the bottom of every provider chain, where the bytes live."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

from roam.storage.bitmap import runs, zero_blocks
from roam.storage.provider import Buffer, StorageError, check_range

_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)


class MemorySource:
    """A device held in process memory (tests, scratch, small state devices)."""

    def __init__(self, size: int, *, populate: bool = False) -> None:
        # Anonymous memory: pages are zero and cost nothing until first written, unless
        # `populate` faults them all in now (a destination getting ready ahead of time).
        self._size = size
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (_MAP_POPULATE if populate else 0)
        self._map = mmap.mmap(-1, max(size, 1), flags=flags)
        self._view = memoryview(self._map)[:size]

    def size(self) -> int:
        return self._size

    async def read_at(self, offset: int, length: int) -> Buffer:
        check_range(self, offset, length)
        return self._view[offset : offset + length]

    async def write_at(self, offset: int, data: Buffer) -> None:
        check_range(self, offset, len(data))
        self._view[offset : offset + len(data)] = data

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass  # the memory goes with the object: a closed device may still be read back


class FileSource:
    """A device backed by a file mapped into memory (MAP_SHARED: writes reach the file).

    `create` sizes a new file with ftruncate, so a fresh device is sparse until written.
    """

    def __init__(self, path: str | Path, size: int | None = None, *, create: bool = False,
                 readonly: bool = False) -> None:
        self.path = Path(path)
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if create:
            flags |= os.O_CREAT
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise StorageError(f"cannot open {self.path}: {e.strerror}") from e
        current = os.fstat(self._fd).st_size
        if size is None:
            size = current
        elif size != current:
            if readonly:
                os.close(self._fd)
                raise StorageError(f"{self.path} is {current} bytes, expected {size}")
            os.ftruncate(self._fd, size)
        self._size = size
        self._readonly = readonly
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        if size:
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            try:
                self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, prot)
            except OSError as e:
                os.close(self._fd)
                raise StorageError(f"cannot map {self.path}: {e.strerror}") from e
            self._view = memoryview(self._map)

    def size(self) -> int:
        return self._size

    async def read_at(self, offset: int, length: int) -> Buffer:
        check_range(self, offset, length)
        if self._view is None:
            if length:
                raise StorageError(f"{self.path} is closed")
            return b""
        return self._view[offset : offset + length]

    async def write_at(self, offset: int, data: Buffer) -> None:
        check_range(self, offset, len(data))
        if self._readonly:
            raise StorageError(f"{self.path} is read-only")
        if self._view is None:
            if len(data):
                raise StorageError(f"{self.path} is closed")
            return
        self._view[offset : offset + len(data)] = data

    async def flush(self) -> None:
        if self._map is not None and not self._readonly:
            self._map.flush()

    async def close(self) -> None:
        if self._map is not None:
            await self.flush()
            if self._view is not None:
                self._view.release()
                self._view = None
            try:
                self._map.close()
            except BufferError:
                pass  # a caller still holds a view; the map closes when it is dropped
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SparseFileSource:
    """A file device where only written blocks take space: all-zero writes punch holes.

    Reads use pread, so unwritten ranges cost nothing; good for large devices that are
    mostly empty, such as the device-state device.
    """

    def __init__(self, path: str | Path, size: int, *, block_size: int = 64 * 1024,
                 create: bool = True) -> None:
        self.path = Path(path)
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise StorageError(f"cannot open {self.path}: {e.strerror}") from e
        if os.fstat(self._fd).st_size != size:
            os.ftruncate(self._fd, size)
        self._size = size
        self._block_size = block_size

    def size(self) -> int:
        return self._size

    async def read_at(self, offset: int, length: int) -> Buffer:
        check_range(self, offset, length)
        self._check_open()
        data = os.pread(self._fd, length, offset)
        if len(data) < length:  # never happens for a sized file, but stay exact
            data += bytes(length - len(data))
        return data

    async def write_at(self, offset: int, data: Buffer) -> None:
        check_range(self, offset, len(data))
        self._check_open()
        view = memoryview(data).cast("B")
        bs = self._block_size
        # Whole aligned blocks that are all zero become holes; everything else is written
        # with one pwrite per run (a 1 MiB write is one or a few calls, not sixteen).
        head = min(len(view), -offset % bs)
        whole = (len(view) - head) // bs
        if whole == 0:
            os.pwrite(self._fd, view, offset)
            return
        zero = zero_blocks(view[head : head + whole * bs], bs)
        if not zero.any():
            os.pwrite(self._fd, view, offset)
            return
        if head:
            os.pwrite(self._fd, view[:head], offset)
        for first, count in runs(~zero):
            lo = head + first * bs
            os.pwrite(self._fd, view[lo : lo + count * bs], offset + lo)
        for first, count in runs(zero):
            _punch_hole(self._fd, offset + head + first * bs, count * bs)
        tail = head + whole * bs
        if tail < len(view):
            os.pwrite(self._fd, view[tail:], offset + tail)

    async def flush(self) -> None:
        self._check_open()
        os.fsync(self._fd)

    def _check_open(self) -> None:
        if self._fd < 0:
            raise StorageError(f"{self.path} is closed")

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def allocated_bytes(self) -> int:
        return os.fstat(self._fd).st_blocks * 512


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


_libc = ctypes.CDLL(None, use_errno=True)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        os.pwrite(fd, bytes(length), offset)  # filesystem without hole punching
