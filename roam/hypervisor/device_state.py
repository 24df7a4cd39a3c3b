"""The device-state device: QEMU's saved device state behind a length prefix.

The state's size is only known once QEMU has written all of it at the pause, so the
device is allocated large and sparse (nothing is stored for the unused tail) and a header
in its first block says how much of it is state. The header is cleared before a save and
written after it, so a save cut short never looks like a complete state.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

from roam.errors import ErrorCode, RoamError
from roam.storage.provider import Provider

HEADER_SIZE = 4096
MAGIC = b"ROAMSTA1"
_HEADER = struct.Struct("<8sQ")
DEFAULT_SIZE = 256 << 20
"""Bytes allocated for a state device: far more than a device state takes (about 1 MB)."""
CHUNK = 1 << 20


class StateError(RoamError):
    """The state device holds no complete state, or the state does not fit in it."""

    code = ErrorCode.INTEGRITY


async def write_state(device: Provider, reader: asyncio.StreamReader) -> int:
    """Store everything `reader` yields until end of file; return the state's length."""
    await device.write_at(0, bytes(HEADER_SIZE))
    offset = HEADER_SIZE
    while chunk := await reader.read(CHUNK):
        if offset + len(chunk) > device.size():
            raise StateError(f"device state exceeds the {device.size()}-byte state device")
        await device.write_at(offset, chunk)
        offset += len(chunk)
    length = offset - HEADER_SIZE
    await device.write_at(0, _HEADER.pack(MAGIC, length))
    await device.flush()
    return length


async def state_length(device: Provider) -> int:
    """The length recorded by the last complete save."""
    if device.size() < HEADER_SIZE:
        raise StateError(f"a state device needs at least {HEADER_SIZE} bytes")
    magic, length = _HEADER.unpack(bytes(await device.read_at(0, _HEADER.size)))
    if magic != MAGIC:
        raise StateError("the state device holds no saved state")
    if HEADER_SIZE + length > device.size():
        raise StateError(f"saved state length {length} exceeds the state device")
    return int(length)


async def read_state(device: Provider) -> AsyncIterator[bytes]:
    """The saved state, in chunks."""
    end = HEADER_SIZE + await state_length(device)
    offset = HEADER_SIZE
    while offset < end:
        n = min(CHUNK, end - offset)
        yield bytes(await device.read_at(offset, n))
        offset += n
