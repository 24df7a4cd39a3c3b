"""Hybrid migration: the destination takes what an object store holds from the store.

A source whose VM syncs continuously (roam.sync) offers the chunks that the store holds
as the devices have them now (STORE, then SAFE lists); it leaves them out of its first
pass and tracks them as if sent, so a write after the offer sends them again as dirty.
The destination pulls them from the store in parallel while the source sends the rest,
verifies each against the address the source named, and asks the source (NEED_AT) for
any it cannot get or verify. The engine knows no store: the application opens one from
the descriptor (`StoreOpener`) and reads chunks through it (`ChunkFetcher`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from roam.migration.wire import StoreDescriptor


class ChunkFetcher(Protocol):
    async def fetch(self, address: bytes) -> bytes:
        """The chunk stored under `address`, verified against it; raises otherwise."""
        ...


StoreOpener = Callable[[StoreDescriptor], Awaitable[ChunkFetcher]]


@dataclass(frozen=True)
class SafeChunks:
    """Chunks of one device the store holds as they are now (in the group's order)."""

    chunk_blocks: int
    chunks: npt.NDArray[np.int64]
    addresses: bytes  # 32 bytes per chunk


@dataclass(frozen=True)
class StoreOffer:
    descriptor: StoreDescriptor
    devices: list[SafeChunks]
