"""A standby mirror, the standby's end: a copy of a VM that runs elsewhere, kept on disk.

The source (roam.peer.mirroring) connects to this peer's migration listener with
capability MIRROR; the worker the peer started for the connection becomes this standby
instead of an incoming VM. Blocks land in `live/` (one sparse file per device): a copy
that is always recent and rarely consistent. At each CHECKPOINT everything received
before it is memory, disk and device state of one instant: the files are synced, copied
(reflinked where the file system can) into a new directory laid out as a package
(config.json from the VM's spec), which then replaces `checkpoint/` by rename; the
standby answers CHECKPOINT_ACK.

Where (STATE_DIR/mirrors/NAME): `live/`, `checkpoint/` (a package, plus `mirror.json`:
the Checkpoint), `authority.json` (the epoch of a promotion here). The checkpoint is held
as a package: a migration of the VM to this peer offers its content by digest, so only
what changed since the checkpoint travels.

Authority: the standby never runs the VM by itself. `roam peer promote` (roam.peer.serve)
runs it from `checkpoint/` under the checkpoint's epoch + 1, recorded in
`authority.json` first; from then on this peer refuses a mirror of the VM under an
older epoch (the lost source, come back) and a second promotion of the same checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from roam.errors import ErrorCode, RoamError
from roam.migration.blocks import block_hash
from roam.migration.channel import Channel
from roam.migration.wire import (
    Blocks,
    Caps,
    Encoding,
    Event,
    EventKind,
    Group,
    Hello,
    MsgType,
    ProtocolError,
    decode,
    encode_error,
    encode_event,
)
from roam.migration.wire import (
    ErrorCode as WireError,
)
from roam.peer import events as peer_events
from roam.peer.models import Checkpoint, MirrorInfo, VMEvent, VMInfo
from roam.peer.packages import HeldPackages
from roam.vm import control, group
from roam.vm.group import Device, VMSpec
from roam.vm.package import CONFIG

log = logging.getLogger(__name__)

LIVE = "live"
CHECKPOINT = "checkpoint"
POINT = "mirror.json"
AUTHORITY = "authority.json"


class StaleEpoch(RoamError):
    """A copy of a VM under an older authority epoch than this peer's record: it must
    not run (a newer copy was restored from a checkpoint)."""

    code = ErrorCode.CONFLICT


class Authority(BaseModel):
    """authority.json: this peer ran the VM from a checkpoint under `epoch`."""

    epoch: int
    seq: int  # the checkpoint it ran from
    at: float


class MirroredStatus(BaseModel):
    """EVENT MIRRORED's payload."""

    model_config = ConfigDict(extra="forbid")

    lag_bytes: int = Field(ge=0)
    epoch: int = Field(ge=0)


def is_mirror(hello: Hello) -> bool:
    return Caps.MIRROR in hello.caps


def read_authority(directory: Path) -> Authority | None:
    try:
        return Authority.model_validate_json((directory / AUTHORITY).read_bytes())
    except FileNotFoundError:
        return None
    except ValidationError as exc:
        raise RoamError(f"{directory / AUTHORITY} is not an authority record: {exc}") from None


def read_point(checkpoint: Path) -> Checkpoint:
    try:
        return Checkpoint.model_validate_json((checkpoint / POINT).read_bytes())
    except FileNotFoundError:
        raise RoamError(f"no checkpoint in {checkpoint.parent}",
                        code=ErrorCode.NOT_FOUND) from None
    except ValidationError as exc:
        raise RoamError(f"{checkpoint / POINT} is not a checkpoint: {exc}") from None


def check_epoch(directory: Path, epoch: int) -> None:
    """StaleEpoch unless a copy under `epoch` may run (or be mirrored) here."""
    record = read_authority(directory)
    if record is not None and epoch < record.epoch:
        raise StaleEpoch(f"{directory.name} was restored here under epoch {record.epoch}; "
                         f"its copy under epoch {epoch} must not run")


def promote(directory: Path) -> tuple[Path, int]:
    """Take authority from the newest checkpoint: record epoch + 1 before anything
    runs; returns the checkpoint (a package directory) and the new epoch."""
    checkpoint = directory / CHECKPOINT
    point = read_point(checkpoint)
    record = read_authority(directory)
    if record is not None and record.epoch > point.epoch:
        raise StaleEpoch(f"{directory.name} was promoted here already (epoch "
                         f"{record.epoch}, from checkpoint {record.seq})")
    epoch = point.epoch + 1
    _write(directory / AUTHORITY, Authority(epoch=epoch, seq=point.seq, at=time.time())
           .model_dump_json().encode())
    return checkpoint, epoch


class Standby:
    """Receive a mirror of a VM into `mirrors`/NAME; `held`: where this peer records the
    packages it holds (the checkpoint becomes one)."""

    def __init__(self, channel: Channel, workdir: Path, mirrors: Path,
                 held: HeldPackages | None) -> None:
        self.channel = channel
        self.workdir = workdir
        self.mirrors = mirrors
        self.held = held
        self.group: Group | None = None
        self.directory: Path | None = None
        self.files: dict[int, tuple[int, int, int]] = {}  # id -> fd, size, block size
        self.names: dict[int, str] = {}
        self.received = 0
        self.lag_bytes = 0
        self.heard = time.monotonic()
        self.point: Checkpoint | None = None
        self.sealed = 0
        self.state: Literal["first-pass", "running", "stopped"] = "first-pass"
        self.error: str | None = None
        self.events = peer_events.Hub()
        self.stopped = asyncio.Event()

    async def run(self) -> None:
        """Until the source stops, is lost, or `stop` is called; the record stays."""
        try:
            await self._group()
            path = self.workdir / control.SOCKET
            server = await control.serve(path, {"info": self._info, "stop": self._stop},
                                         {"events": self._events})
            try:
                receiving = asyncio.create_task(self._receive())
                stopping = asyncio.create_task(self.stopped.wait())
                await asyncio.wait([receiving, stopping], return_when=asyncio.FIRST_COMPLETED)
                for task in (receiving, stopping):
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receiving
            finally:
                self.state = "stopped"
                self._changed()
                self.events.close()
                server.close()
        except (ProtocolError, StaleEpoch, OSError, RoamError) as exc:
            self.error = str(exc)
            log.warning("mirror ended: %s", exc)
            code = WireError.ABORTED if isinstance(exc, StaleEpoch) else WireError.PROTOCOL
            with contextlib.suppress(Exception):
                self.channel.send(encode_error(code, str(exc)))
                await self.channel.drain()
        finally:
            for fd, _, _ in self.files.values():
                os.close(fd)
            with contextlib.suppress(Exception):
                await self.channel.close()

    async def _group(self) -> None:
        kind, body = await self.channel.recv()
        message = decode(kind, body)
        if not isinstance(message, Group):
            raise ProtocolError(f"expected GROUP, got {kind.name}")
        control.check_name(message.name)
        for spec in message.devices:
            group.device(spec.name)  # a VM's devices only
        self.group = message
        self.directory = self.mirrors / message.name
        kind, body = await self.channel.recv()  # the source's epoch, before any file
        status = decode(kind, body)
        if not isinstance(status, Event) or status.kind != EventKind.MIRRORED:
            raise ProtocolError(f"expected EVENT MIRRORED, got {kind.name}")
        self._status(status)
        live = self.directory / LIVE
        shutil.rmtree(live, ignore_errors=True)
        live.mkdir(parents=True, mode=0o700)
        self.mirrors.chmod(0o700)
        for spec in message.devices:
            fd = os.open(live / f"{spec.name}.img", os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, spec.size)
            self.files[spec.id] = (fd, spec.size, spec.block_size)
            self.names[spec.id] = spec.name
        log.info("standby mirror of %s in %s", message.name, self.directory)
        self.channel.send(encode_event(EventKind.READY))
        await self.channel.drain()

    async def _receive(self) -> None:
        while True:
            kind, body = await self.channel.recv()
            message = decode(kind, body)
            if isinstance(message, Blocks):
                self._write(message)
            elif isinstance(message, Event) and message.kind == EventKind.MIRRORED:
                self._status(message)
                if self.state == "first-pass":
                    self.state = "running"
                self._changed()
            elif isinstance(message, Event) and message.kind == EventKind.CHECKPOINT:
                try:
                    point = Checkpoint.model_validate_json(bytes(message.payload))
                except ValidationError as exc:
                    raise ProtocolError(f"EVENT CHECKPOINT: {exc}") from None
                assert self.directory is not None
                check_epoch(self.directory, point.epoch)
                await asyncio.to_thread(self._seal, point)
                self.point = point
                self.sealed += 1
                self.channel.send(encode_event(EventKind.CHECKPOINT_ACK,
                                               point.model_dump_json().encode()))
                await self.channel.drain()
                self._changed()
            else:
                raise ProtocolError(f"a mirror source sent {MsgType(kind).name}")

    def _status(self, event: Event) -> None:
        """EVENT MIRRORED: the source's lag and epoch (an older epoch than a promotion
        here is refused)."""
        assert self.directory is not None
        try:
            status = MirroredStatus.model_validate_json(bytes(event.payload))
        except ValidationError as exc:
            raise ProtocolError(f"EVENT MIRRORED: {exc}") from None
        check_epoch(self.directory, status.epoch)
        self.lag_bytes = status.lag_bytes
        self.heard = time.monotonic()

    def _write(self, blocks: Blocks) -> None:
        if blocks.device not in self.files:
            raise ProtocolError(f"BLOCKS for unknown device {blocks.device}")
        fd, size, bs = self.files[blocks.device]
        if (blocks.first + blocks.count - 1) * bs >= size:
            raise ProtocolError("BLOCKS beyond the end of the device")
        if blocks.encoding == Encoding.ZERO:
            length = min(blocks.count * bs, size - blocks.first * bs)
            os.pwrite(fd, bytes(length), blocks.first * bs)
            return
        if blocks.encoding != Encoding.RAW:
            raise ProtocolError(f"a mirror sends RAW or ZERO blocks, not {blocks.encoding.name}")
        if block_hash(blocks.payload) != bytes(blocks.hashes):
            raise ProtocolError("BLOCKS: the payload does not match its hash")
        carried = [i for i in range(blocks.count) if blocks.carried[i // 8] >> (i % 8) & 1]
        if len(blocks.payload) != len(carried) * bs:
            raise ProtocolError("BLOCKS: payload length does not match its map")
        position = {i: n for n, i in enumerate(carried)}
        for i in range(blocks.count):
            offset = (blocks.first + i) * bs
            length = min(bs, size - offset)
            at = position.get(i)
            if at is None:
                os.pwrite(fd, bytes(length), offset)
            else:
                os.pwrite(fd, blocks.payload[at * bs:at * bs + length], offset)
        self.received += len(blocks.payload)

    def _seal(self, point: Checkpoint) -> None:
        """The live files as they are now, as a package, in place of the last point."""
        assert self.directory is not None and self.group is not None
        for fd, _, _ in self.files.values():
            os.fsync(fd)
        live = self.directory / LIVE
        spec = VMSpec.from_device((live / f"{Device.SPEC}.img").read_bytes())
        tmp = self.directory / f".{CHECKPOINT}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        for dev, name in group.package_files(spec.config).items():
            subprocess.run(["cp", "--reflink=auto", "--sparse=always",
                            str(live / f"{dev}.img"), str(tmp / name)], check=True)
        _write(tmp / CONFIG, spec.config.model_dump_json().encode())
        _write(tmp / POINT, point.model_dump_json().encode())
        final = self.directory / CHECKPOINT
        old = self.directory / f".{CHECKPOINT}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        if self.held is not None:  # a migration here later sends what changed since
            self.held.hold(final)
        log.info("checkpoint %d of %s sealed (epoch %d, paused %.1f ms on the source)",
                 point.seq, self.group.name, point.epoch, point.pause_ms)

    # -- what the peer asks ------------------------------------------------------------------

    def describe(self) -> VMInfo:
        assert self.group is not None
        return VMInfo(
            name=self.group.name, state="mirror", pid=os.getpid(),
            workdir=str(self.workdir), package=str(self.directory),
            epoch=self.point.epoch if self.point else 0,
            mirror=MirrorInfo(
                role="standby", peer="(remote)", state=self.state,
                lag_bytes=self.lag_bytes,
                lag_seconds=round(time.monotonic() - self.heard, 3),
                sent_bytes=self.received, checkpoint=self.point, checkpoints=self.sealed,
                error=self.error))

    def _changed(self) -> None:
        if self.events.watched and self.group is not None:
            self.events.publish(VMEvent(vm=self.describe()))

    async def _info(self, _: control.Json) -> control.Json:
        return self.describe().model_dump(mode="json")

    async def _stop(self, _: control.Json) -> control.Json:
        self.stopped.set()
        return {}

    async def _events(self, _: control.Json) -> AsyncIterator[control.Json]:
        async with self.events.subscribe() as changes:
            yield VMEvent(vm=self.describe()).model_dump(mode="json")
            async for event in changes:
                yield event.model_dump(mode="json")


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
