"""The one interface every storage provider implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from roam.errors import RoamError

DEFAULT_BLOCK_SIZE = 64 * 1024

Buffer = bytes | bytearray | memoryview
"""What read_at returns and write_at takes.

read_at may return a view of the provider's own memory: it is valid until the caller next
awaits or writes to the device. A caller that keeps data across an await copies it
(`bytes(view)`).
"""


class StorageError(RoamError):
    """An operation on a device failed (bad range, closed device, lost peer...): code
    `internal`, a failure of a part the caller depends on."""


@runtime_checkable
class Provider(Protocol):
    """A fixed-size, byte-addressed device. Offsets and lengths need not be aligned."""

    def size(self) -> int: ...

    async def read_at(self, offset: int, length: int) -> Buffer: ...

    async def write_at(self, offset: int, data: Buffer) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


class HasSize(Protocol):
    def size(self) -> int: ...


def check_range(provider: HasSize, offset: int, length: int) -> None:
    """Raise StorageError unless [offset, offset+length) lies inside the device."""
    if offset < 0 or length < 0 or offset + length > provider.size():
        raise StorageError(
            f"range {offset}+{length} outside device of {provider.size()} bytes"
        )


def check_block_size(block_size: int) -> None:
    if block_size < 4096 or block_size & (block_size - 1):
        raise ValueError(f"block size {block_size} must be a power of two >= 4096")


def blocks_spanning(offset: int, length: int, block_size: int) -> range:
    """Indices of the blocks that [offset, offset+length) touches."""
    if length <= 0:
        return range(0)
    return range(offset // block_size, (offset + length - 1) // block_size + 1)


def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


def is_zero(data: Buffer) -> bool:
    """True if every byte is zero (one numpy pass over 8-byte words, no Python loop)."""
    view = memoryview(data).cast("B")
    words = len(view) // 8
    if words and np.frombuffer(view[: words * 8], dtype=np.uint64).any():
        return False
    return not any(view[words * 8 :])
