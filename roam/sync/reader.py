"""Reading back from the store: chunks by address, verified, and whole sync points.

Nothing read from the store is used unverified: an object must open with the key (AES-GCM
authenticates it and binds it to its name) and its plaintext must hash to its address
(the keyed blake3 that names it), which covers every block in it.
"""

from __future__ import annotations

import asyncio
from collections import deque

from roam.storage.provider import Provider
from roam.sync.crypto import SyncKey
from roam.sync.errors import MissingObject, SyncError
from roam.sync.manifest import Manifest, manifest_key, manifests_prefix, object_key, seq_of
from roam.sync.store import ObjectStore


class ChunkReader:
    """Objects of one store, by address, verified."""

    def __init__(self, store: ObjectStore, key: SyncKey) -> None:
        self.store = store
        self.key = key

    async def fetch(self, address: bytes) -> bytes:
        """The chunk stored under `address`; MissingObject or CorruptObject otherwise."""
        blob = await self.store.get(object_key(address))
        return await asyncio.to_thread(self.key.verified, address, blob)

    async def latest(self, vm: str) -> Manifest:
        """VM `vm`'s newest sync point."""
        newest = None
        async for item in self.store.list(manifests_prefix(vm)):
            seq = seq_of(item.key, vm)
            if seq is not None and (newest is None or seq > newest):
                newest = seq
        if newest is None:
            raise MissingObject(f"no sync point of {vm} in {self.store.url}")
        return await self.manifest(vm, newest)

    async def manifest(self, vm: str, seq: int) -> Manifest:
        return Manifest.open(self.key, vm, seq,
                             await self.store.get(manifest_key(vm, seq)))

    async def restore(self, manifest: Manifest, device: str, into: Provider,
                      concurrency: int = 8) -> int:
        """Write device `device` of a sync point into `into` (zero chunks are skipped:
        `into` is taken to be zero); returns the bytes fetched."""
        dev = manifest.device(device)
        addresses = dev.addresses()
        queue = deque(i for i in range(len(addresses)) if addresses[i].any())
        fetched = 0

        async def worker() -> None:
            nonlocal fetched
            while queue:
                i = queue.popleft()
                data = await self.fetch(bytes(addresses[i]))
                offset = i * manifest.chunk_size
                expected = min(manifest.chunk_size, dev.size - offset)
                if len(data) != expected:
                    raise MissingObject(f"chunk {i} of {device} is {len(data)} bytes, "
                                        f"{expected} expected")
                await into.write_at(offset, data)
                fetched += len(data)

        try:
            async with asyncio.TaskGroup() as tasks:
                for _ in range(concurrency):
                    tasks.create_task(worker())
        except* SyncError as group:  # the first failure says what went wrong
            raise group.exceptions[0] from None
        return fetched
