"""What the FUSE and guest-exposure tests share: mount checks, a recording provider, and
the guest RAM ranges that QMP pmemsave reads."""

from __future__ import annotations

import re

from qemu.qmp import QMPClient

from roam.exposure.fuse.mount import mounted
from roam.storage.provider import Buffer
from roam.storage.sources import MemorySource

__all__ = ["PAGE", "Recorder", "mounted", "ram_ranges"]

PAGE = 4096


class Recorder:
    """Wraps a provider and records which pages write requests covered."""

    def __init__(self, inner: MemorySource) -> None:
        self.inner = inner
        self.pages: set[int] = set()
        self.flushes = 0

    def size(self) -> int:
        return self.inner.size()

    async def read_at(self, offset: int, length: int) -> Buffer:
        return await self.inner.read_at(offset, length)

    async def write_at(self, offset: int, data: Buffer) -> None:
        self.pages.update(range(offset // PAGE, (offset + len(data) - 1) // PAGE + 1))
        await self.inner.write_at(offset, data)

    async def flush(self) -> None:
        self.flushes += 1

    async def close(self) -> None:
        await self.inner.close()

    def take(self) -> set[int]:
        pages, self.pages = self.pages, set()
        return pages


async def ram_ranges(qmp: QMPClient, backend: str) -> list[tuple[int, int, int]]:
    """(guest address, length, offset in the memory file) of every range backed by the
    RAM block of memory backend `backend`."""
    # One line of `info mtree -f`: a range of guest-physical addresses backed by the RAM
    # block (read-write, or read-only where the chipset maps BIOS areas), at an offset
    # into it ("@...", absent for offset 0).
    ram_range = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, r[ao]m\): "
                           + re.escape(backend) + r"(?: @([0-9a-f]+))?(?: KVM)?$")
    text = await qmp.execute("human-monitor-command", {"command-line": "info mtree -f"})
    assert isinstance(text, str)
    # pmemsave reads the system address space ("memory"), not the SMM view listed first.
    views = [view for view in text.split("FlatView #") if ' AS "memory"' in view]
    assert len(views) == 1, text
    ranges = []
    for line in views[0].splitlines():
        match = ram_range.match(line)
        if match:
            start, end, offset = match.groups()
            ranges.append((int(start, 16), int(end, 16) - int(start, 16) + 1,
                           int(offset or "0", 16)))
    return ranges
