"""Consistent points in the object store: a sync's sealed sync points (checkpoints and
hibernation) and the restore of a VM from the newest one, under a new authority epoch.

A sealed point is taken in the pause of roam.peer.pausing: the sync uploads everything
pending while the VM stands still and writes a manifest marked `sealed` with the VM's
epoch (roam.sync.syncer.Syncer.seal). The pause therefore lasts the upload of what
changed since the sync's last cycle; a hibernation keeps the VM stopped after it.

Authority in the bucket: `N/authority`, sealed with the sync key like a manifest, holds
the epoch of the last restore of VM N. A restore reads the newest sealed point, refuses
it if its epoch is older than that record (restored already: a newer copy runs), writes
epoch + 1 there, then restores the devices into a package directory and runs the VM
under that epoch. A sync that would seal a point under an older epoch than the record
refuses to (the old copy, come back after a restore, seals nothing more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from roam.errors import ErrorCode, RoamError
from roam.peer.errors import PeerError
from roam.peer.mirrored import StaleEpoch
from roam.peer.models import Checkpoint
from roam.peer.pausing import paused
from roam.storage.sources import SparseFileSource
from roam.sync.crypto import SyncKey
from roam.sync.errors import MissingObject, SyncError
from roam.sync.manifest import Manifest, manifests_prefix, seq_of
from roam.sync.reader import ChunkReader
from roam.sync.store import ObjectStore
from roam.vm import group
from roam.vm.group import Device, VMSpec
from roam.vm.package import CONFIG

if TYPE_CHECKING:
    from roam.peer.instance import Instance
    from roam.peer.syncing import SyncJob

log = logging.getLogger(__name__)


class BucketAuthority(BaseModel):
    """N/authority: VM N was restored under `epoch` from sync point `seq`."""

    epoch: int
    seq: int
    at: float


def _authority_key(vm: str) -> str:
    return f"{vm}/authority"


async def read_authority(store: ObjectStore, key: SyncKey, vm: str) -> BucketAuthority | None:
    try:
        blob = await store.get(_authority_key(vm))
    except MissingObject:
        return None
    try:
        return BucketAuthority.model_validate_json(key.open(_authority_key(vm).encode(), blob))
    except ValidationError as exc:
        raise RoamError(f"{_authority_key(vm)} is not an authority record: {exc}") from None


async def seal(instance: Instance, job: SyncJob, *, stop: bool = False) -> Checkpoint:
    """A sealed sync point of `instance` (paused meanwhile; with `stop` it stays
    stopped: hibernation). StaleEpoch if the bucket names a newer epoch."""
    syncer = job.syncer
    epoch = int(instance.info.get("epoch", 0))
    record = await read_authority(syncer.store, syncer.key, syncer.vm)
    if record is not None and epoch < record.epoch:
        raise StaleEpoch(f"{syncer.vm} was restored under epoch {record.epoch}; its copy "
                         f"under epoch {epoch} must not seal a point")
    async with paused(instance) as pause:
        pause.resume = not stop
        seq = await syncer.seal(epoch=epoch)
    point = Checkpoint(seq=seq, epoch=epoch, at=pause.at, pause_ms=pause.ms)
    job.checkpoint = point
    log.info("sealed sync point %d of %s (epoch %d, paused %.1f ms%s)", seq, syncer.vm,
             epoch, pause.ms, ", stopped" if stop else "")
    return point


async def checkpoints(instance: Instance, job: SyncJob, every: float) -> None:
    """Seal a point every `every` seconds once the sync caught up (a pause skipped while
    a migration runs is taken at the next turn). Ends on a newer epoch in the bucket."""
    while True:
        await asyncio.sleep(every)
        if job.syncer.state.value != "running":
            continue
        try:
            await seal(instance, job)
        except PeerError as exc:
            if exc.code != ErrorCode.BUSY:
                raise
        except StaleEpoch as exc:
            log.error("%s: %s", instance.spec.name, exc)
            raise
        except SyncError as exc:  # the store fails: the sync retries, so do we
            log.warning("no sealed point of %s now: %s", instance.spec.name, exc)


async def newest_sealed(reader: ChunkReader, vm: str) -> Manifest:
    seqs = []
    async for item in reader.store.list(manifests_prefix(vm)):
        seq = seq_of(item.key, vm)
        if seq is not None:
            seqs.append(seq)
    for seq in sorted(seqs, reverse=True):
        with contextlib.suppress(MissingObject):  # deleted by retention meanwhile
            manifest = await reader.manifest(vm, seq)
            if manifest.sealed:
                return manifest
    raise PeerError(f"no sealed sync point of {vm} in {reader.store.url}",
                    code=ErrorCode.NOT_FOUND)


async def restore(reader: ChunkReader, vm: str, into: Path) -> tuple[Path, int]:
    """The newest sealed point of `vm` as a package in `into` (replaced), after taking
    authority in the bucket: returns the package directory and the new epoch."""
    manifest = await newest_sealed(reader, vm)
    record = await read_authority(reader.store, reader.key, vm)
    if record is not None and record.epoch > manifest.epoch:
        raise StaleEpoch(f"{vm} was restored already under epoch {record.epoch} (from "
                         f"sync point {record.seq}); its newest sealed point has epoch "
                         f"{manifest.epoch}")
    epoch = manifest.epoch + 1
    text = BucketAuthority(epoch=epoch, seq=manifest.seq, at=time.time()).model_dump_json()
    await reader.store.put(_authority_key(vm), reader.key.seal(_authority_key(vm).encode(),
                                                                text.encode()))
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True, mode=0o700)
    files: dict[str, Path] = {}
    for dev in manifest.devices:
        path = into / f"{dev.name}.restored"
        target = SparseFileSource(path, dev.size)
        try:
            await reader.restore(manifest, dev.name, target)
        finally:
            await target.close()
        files[dev.name] = path
    spec = VMSpec.from_device(files[Device.SPEC].read_bytes())
    for device, name in group.package_files(spec.config).items():
        os.replace(files[device], into / name)
    files[Device.SPEC].unlink()
    (into / CONFIG).write_text(spec.config.model_dump_json())
    log.info("restored %s from sealed sync point %d into %s (epoch %d)", vm, manifest.seq,
             into, epoch)
    return into, epoch
