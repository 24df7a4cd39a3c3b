"""A standby mirror, the source's end: a running VM's devices kept warm on another peer.

The mirror speaks the migration protocol (docs/PROTOCOL.md) with capability MIRROR:
HELLO, GROUP (a migration's, with the package id), the standby's READY; then, every
`check_period`, BLOCKS of what changed since the cycle before (each device through its
own dirty view, as the sync reads it) and EVENT MIRRORED with the source's lag. The first
cycle sends every non-zero block.

A checkpoint pauses the VM as a handover does (memory flushed, QMP stop, device state
saved into the state device, memory flushed again), reads what changed while the VM
stands still, resumes it, sends those blocks and then EVENT CHECKPOINT: everything before
it is memory, disk and device state of one instant. The pause lasts the reads, not the
sending. The standby seals the point and answers CHECKPOINT_ACK (roam.peer.mirrored).

The mirror never hands authority over: the VM keeps running here, and the standby runs
it only when promoted from a checkpoint (after this peer is lost), under a higher epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from roam.errors import ErrorCode
from roam.migration.blocks import block_hash
from roam.migration.channel import Address, FrameProtocol, connect
from roam.migration.wire import (
    Caps,
    DeviceSpec,
    Encoding,
    Error,
    Event,
    EventKind,
    Group,
    ProtocolError,
    decode,
    encode_blocks_header,
    encode_event,
    encode_group,
    encode_hello,
    encode_raw_header,
)
from roam.peer import events
from roam.peer.errors import PeerError
from roam.peer.models import Checkpoint, MirrorInfo, MirrorRequest
from roam.peer.packages import package_id
from roam.peer.pausing import paused
from roam.storage.bitmap import zero_blocks
from roam.storage.dirty import DirtyView
from roam.storage.provider import block_count

if TYPE_CHECKING:
    from roam.peer.instance import Instance

log = logging.getLogger(__name__)

RUN_BYTES = 1 << 20  # bytes of blocks per BLOCKS frame
READY_TIMEOUT = 30.0


@dataclass
class _Device:
    id: int
    name: str
    size: int
    block_size: int
    view: DirtyView


class MirrorJob:
    """Mirror `instance` to the standby at `request.to` until stopped or lost."""

    def __init__(self, instance: Instance, request: MirrorRequest) -> None:
        self.instance = instance
        self.request = request
        self.devices: list[_Device] = []
        self.channel: FrameProtocol | None = None
        self.task: asyncio.Task[None] | None = None
        self.state: Literal["first-pass", "running"] = "first-pass"
        self.sent_bytes = 0
        self.lag_bytes = 0
        self.synced_at = time.monotonic()  # the standby was last up to date (as sent)
        self.seq = 0  # checkpoints taken
        self.acked: Checkpoint | None = None
        self.error: str | None = None
        self._next_checkpoint = 0.0

    async def start(self) -> None:
        """Connect, announce the group and wait for the standby's READY (its refusal is
        the caller's error: the VM is unaffected)."""
        instance = self.instance
        channel = self.channel = await connect(Address.parse(self.request.to), instance.tls)
        try:
            specs = []
            for i, name in enumerate(instance.order):
                tracker = instance.devices[name].tracker
                self.devices.append(_Device(i, name, tracker.size(), tracker.block_size,
                                            tracker.watch()))
                specs.append(DeviceSpec(id=i, name=name, size=tracker.size(),
                                        block_size=tracker.block_size))
            channel.send(encode_hello(Caps.MIRROR))
            channel.send(encode_group(Group(name=instance.spec.name, devices=specs,
                                            package=package_id(instance.spec.config))))
            # The epoch first: a standby that ran a newer copy refuses this one at once.
            self.lag_bytes = sum(d.size for d in self.devices)
            channel.send(self._mirrored())
            self._status()
            async with asyncio.timeout(READY_TIMEOUT):
                while True:
                    message = await self._next()
                    if isinstance(message, Event) and message.kind == EventKind.READY:
                        break
        except BaseException:
            await self._close()
            raise
        self.task = asyncio.create_task(self._run(), name=f"mirror-{instance.spec.name}")
        log.info("%s mirrors to %s", instance.spec.name, self.request.to)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        await self._close()

    def info(self) -> MirrorInfo:
        return MirrorInfo(
            role="source", peer=self.request.to,
            state="stopped" if self.task is None or self.task.done() else self.state,
            lag_bytes=self.lag_bytes,
            lag_seconds=round(time.monotonic() - self.synced_at, 3),
            sent_bytes=self.sent_bytes, checkpoint=self.acked, checkpoints=self.seq,
            error=self.error)

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._answers())
                tasks.create_task(self._cycles())
        except* (PeerError, ProtocolError, OSError) as group:
            self.error = str(group.exceptions[0])
            log.error("mirror of %s to %s stopped: %s", self.instance.spec.name,
                      self.request.to, self.error)
        finally:
            events.changed(self.instance)

    async def _cycles(self) -> None:
        machine = self.instance.vm.machine
        every = self.request.checkpoint_every
        # The first checkpoint follows the first pass (which runs with the VM): the
        # standby has a consistent point as soon as it has the whole VM.
        while True:
            first = self.state == "first-pass"
            if (every is not None and not first
                    and time.monotonic() >= self._next_checkpoint):
                if await self._checkpoint():
                    self._next_checkpoint = time.monotonic() + every
            else:
                await machine.flush_memory()
                await self._send(self._frames(first=first))
            self.state = "running"
            self._status()
            await asyncio.sleep(self.request.check_period)

    async def _answers(self) -> None:
        while True:
            message = await self._next()
            if isinstance(message, Event) and message.kind == EventKind.CHECKPOINT_ACK:
                self.acked = Checkpoint.model_validate_json(message.payload)
                log.info("checkpoint %d of %s sealed on the standby", self.acked.seq,
                         self.instance.spec.name)
                events.changed(self.instance)

    async def _next(self) -> Event:
        """The standby's next EVENT; its ERROR ends the mirror with its message."""
        assert self.channel is not None
        kind, body = await self.channel.recv()
        message = decode(kind, body)
        if isinstance(message, Error):
            raise PeerError(f"the standby refused the mirror: {message.message}",
                            code=ErrorCode.CONFLICT)
        if not isinstance(message, Event):
            raise ProtocolError(f"a standby sent {kind.name}")
        return message

    async def _checkpoint(self) -> bool:
        """Pause, read every change of one instant, resume, send it and CHECKPOINT.
        Skipped (False) while a migration or another pause holds the VM."""
        instance = self.instance
        try:
            async with paused(instance) as pause:
                # Read in the pause (the changes of one instant), sent after it.
                frames = [frame async for frame in self._frames(first=False)]
        except PeerError as exc:
            if exc.code != ErrorCode.BUSY:
                raise
            return False
        self.seq += 1
        point = Checkpoint(seq=self.seq, epoch=int(instance.info.get("epoch", 0)),
                           at=pause.at, pause_ms=pause.ms)
        await self._send(_replay(frames))
        assert self.channel is not None
        self.channel.send(encode_event(EventKind.CHECKPOINT, point.model_dump_json().encode()))
        await self.channel.drain()
        log.info("checkpoint %d of %s: paused %.1f ms", point.seq, instance.spec.name,
                 pause.ms)
        return True

    async def _frames(self, *, first: bool) -> AsyncIterator[tuple[bytes, bytes]]:
        """Frames (header, payload) of every block changed since the last read, every
        block the first time, each read as it is yielded."""
        for dev in self.devices:
            bs = dev.block_size
            if first:
                blocks = np.arange(block_count(dev.size, bs), dtype=np.int64)
            else:
                blocks = dev.view.take_dirty()
            per_frame = max(1, RUN_BYTES // bs)
            for start, count in _runs(blocks, per_frame):
                offset = start * bs
                length = min(count * bs, dev.size - offset)
                data = bytes(await dev.view.read_tracked(offset, length)).ljust(count * bs,
                                                                                b"\0")
                zero = zero_blocks(data, bs)
                if zero.all():
                    if not first:  # the standby's fresh files are zero already
                        yield (encode_blocks_header(
                            dev.id, Encoding.ZERO, start, count, b"", [], 0), b"")
                    continue
                carried = np.packbits(~zero, bitorder="little").tobytes()
                view = memoryview(data)
                payload = b"".join(view[i * bs:(i + 1) * bs]
                                   for i in np.flatnonzero(~zero).tolist())
                yield (encode_raw_header(dev.id, start, count, carried, block_hash(payload),
                                         len(payload)), payload)

    async def _send(self, frames: AsyncIterator[tuple[bytes, bytes]]) -> None:
        """Send `frames` as they come (a cycle: read while sent, memory stays bounded),
        then MIRRORED with what is dirty now."""
        assert self.channel is not None
        async for header, payload in frames:
            self.channel.send(header, payload)
            self.sent_bytes += len(payload)
            await self.channel.drain()
        self.lag_bytes = sum(d.view.dirty_count() * d.block_size for d in self.devices)
        self.synced_at = time.monotonic()
        self.channel.send(self._mirrored())
        await self.channel.drain()

    def _mirrored(self) -> bytes:
        return encode_event(EventKind.MIRRORED, json.dumps(
            {"lag_bytes": self.lag_bytes, "epoch": int(self.instance.info.get("epoch", 0))}
        ).encode())

    def _status(self) -> None:
        events.changed(self.instance)

    async def _close(self) -> None:
        for dev in self.devices:
            dev.view.close()
        self.devices = []
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.close()


async def _replay(frames: list[tuple[bytes, bytes]]) -> AsyncIterator[tuple[bytes, bytes]]:
    for frame in frames:
        yield frame


def _runs(blocks: np.ndarray, longest: int) -> list[tuple[int, int]]:
    """(first, count) of the runs of consecutive block numbers, none longer than
    `longest`."""
    if not len(blocks):
        return []
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    runs = []
    for part in np.split(blocks, breaks):
        first, count = int(part[0]), len(part)
        for at in range(0, count, longest):
            runs.append((first + at, min(longest, count - at)))
    return runs

