"""Retention and garbage collection (`roam peer sync N --gc`).

A VM keeps its newest `keep` sync points; an object no remaining manifest of any VM under
the prefix names is deleted, unless it is younger than `grace` (another VM's sync may
have uploaded it for a manifest it has not written yet). A manifest this key cannot
open (another key, or damaged) stops the collection before anything is deleted: what
it names is unknown, so nothing can be called unreferenced.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from roam.sync.crypto import SyncKey
from roam.sync.errors import CorruptObject, SyncError
from roam.sync.manifest import Manifest, address_of, manifest_key
from roam.sync.store import ObjectStore

DELETE_BATCH = 1000


@dataclass
class Collected:
    manifests_deleted: int = 0
    objects_deleted: int = 0
    bytes_freed: int = 0
    objects_kept: int = 0


async def collect(store: ObjectStore, key: SyncKey, vm: str, keep: int,
                  grace: float = 600.0, in_use: frozenset[bytes] = frozenset()) -> Collected:
    """Delete VM `vm`'s sync points older than its newest `keep`, then every object
    nothing names. `in_use`: addresses a running sync holds but has not named yet."""
    result = Collected()
    manifests: dict[str, list[int]] = {}
    objects: dict[bytes, tuple[str, int, datetime.datetime]] = {}
    async for item in store.list(""):
        parts = item.key.split("/")
        address = address_of(item.key)
        if address is not None:
            objects[address] = (item.key, item.size, item.modified)
        elif len(parts) == 3 and parts[1] == "manifests" and parts[2].isdigit():
            manifests.setdefault(parts[0], []).append(int(parts[2]))
    mine = sorted(manifests.get(vm, []))
    old, manifests[vm] = mine[: max(0, len(mine) - keep)], mine[-keep:] if mine else []
    referenced = set(in_use)
    for name, seqs in manifests.items():
        for seq in seqs:
            try:
                referenced |= Manifest.open(key, name, seq, await store.get(
                    manifest_key(name, seq))).referenced()
            except CorruptObject as exc:
                raise SyncError(f"cannot read sync point {name}/{seq} ({exc}); nothing "
                                "was deleted") from None
    await store.delete([manifest_key(vm, s) for s in old])
    result.manifests_deleted = len(old)
    cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=grace)
    doomed = []
    for address, (path, size, modified) in objects.items():
        if address in referenced or modified > cutoff:
            result.objects_kept += 1
        else:
            doomed.append(path)
            result.bytes_freed += size
    for start in range(0, len(doomed), DELETE_BATCH):
        await store.delete(doomed[start : start + DELETE_BATCH])
    result.objects_deleted = len(doomed)
    return result
