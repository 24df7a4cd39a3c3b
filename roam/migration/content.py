"""Content a destination already holds, named by blake3 per chunk (its HAVE lists).

A destination that holds the same package or blueprint as the source (a root disk, the
memory image a guest was resumed from) offers it by digest; the source then sends "you
have this" for every chunk whose content matches instead of the data. Digests are per
64 KiB chunk whatever the device's block size: guest memory moves in 4 KiB pages, but
hashing each page on its own would cost a Python call per page on both ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import blake3

from roam.storage.bitmap import zero_blocks
from roam.storage.provider import Buffer, Provider

CHUNK = 64 * 1024
READ = 16 * 1024 * 1024  # bytes read per call when hashing a whole device


@dataclass(frozen=True)
class ContentDigests:
    """blake3 of each `chunk` bytes of some content, in order (the last chunk may be
    short); None for a chunk that is all zero (nothing worth offering: the source sends
    zero runs as ZERO anyway)."""

    chunk: int
    size: int
    digests: tuple[bytes | None, ...]


def digest_chunks(data: Buffer, chunk: int = CHUNK) -> list[bytes | None]:
    """The digests of `data`, chunk by chunk."""
    view = memoryview(data).cast("B")
    zero = zero_blocks(view, chunk)
    return [None if zero[i] else blake3.blake3(view[i * chunk : (i + 1) * chunk]).digest()
            for i in range(len(zero))]


async def digest_provider(provider: Provider, chunk: int = CHUNK) -> ContentDigests:
    """Hash a whole device (a destination without an index of what it holds)."""
    size = provider.size()
    step = max(chunk, READ - READ % chunk)
    digests: list[bytes | None] = []
    for offset in range(0, size, step):
        digests += digest_chunks(await provider.read_at(offset, min(step, size - offset)),
                                 chunk)
    return ContentDigests(chunk, size, tuple(digests))
