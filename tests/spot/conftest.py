"""A fake metadata service on loopback per test, and a watcher tuned to poll fast."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from roam.spot import Cloud, Notice, WatchConfig, Watcher
from roam.spot.fake import FakeMetadata, serve

ROUTE = {Cloud.AWS: "aws.instance-action", Cloud.GCP: "gcp.preempted",
         Cloud.AZURE: "azure.events"}
"""The fake's name for each cloud's polled route (its request counters)."""

FAST = {"interval": 0.05, "timeout": 1.0, "retry_min": 0.02, "retry_max": 0.1,
        "gcp_wait": 5}


@dataclass
class Fake:
    metadata: FakeMetadata
    url: str

    def config(self, cloud: Cloud, **changes: Any) -> WatchConfig:
        return replace(WatchConfig(cloud, metadata=self.url, **FAST), **changes)


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    metadata = FakeMetadata()
    async with serve(metadata) as url:
        yield Fake(metadata, url)


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Wait for `predicate` (checked every 10 ms); fail the test after `within` s."""
    for _ in range(int(within / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not true within {within} s: {predicate}")


@dataclass
class Running:
    watcher: Watcher
    notices: list[Notice] = field(default_factory=list)


@contextlib.asynccontextmanager
async def running(config: WatchConfig) -> AsyncIterator[Running]:
    """A watcher consumed by a task of its own while the block runs, as a node agent
    would; its notices collect in `notices`. Cancelled at the end."""
    async with Watcher(config) as watcher:
        result = Running(watcher)

        async def consume() -> None:
            async for notice in watcher:
                result.notices.append(notice)

        task = asyncio.create_task(consume())
        try:
            yield result
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
