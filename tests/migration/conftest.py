"""Helpers to run both ends of a migration in one event loop over a real socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from roam.migration.channel import Address, Channel, FrameProtocol, connect, listen
from roam.migration.destination import NewDevice
from roam.migration.wire import DeviceSpec
from roam.storage.sources import MemorySource


async def memory_device(spec: DeviceSpec) -> NewDevice:
    return NewDevice(MemorySource(spec.size))


MakePair = Callable[[], Awaitable[tuple[Channel, Channel]]]


@pytest.fixture
async def socket_pair(tmp_path: Path) -> AsyncIterator[MakePair]:
    """Returns a function giving (source channel, destination channel) over a UNIX socket."""
    servers: list[asyncio.Server] = []
    channels: list[Channel] = []

    async def make() -> tuple[Channel, Channel]:
        accepted: asyncio.Queue[Channel] = asyncio.Queue()
        done = asyncio.Event()

        async def handler(ch: Channel) -> None:
            await accepted.put(ch)
            await done.wait()

        addr = Address.parse(f"unix://{tmp_path}/m{len(servers)}.sock")
        servers.append(await listen(addr, handler))
        src: FrameProtocol = await connect(addr)
        dst = await accepted.get()
        channels.extend([src, dst])
        return src, dst

    yield make
    for ch in channels:
        await ch.close()
    for server in servers:
        server.close()
