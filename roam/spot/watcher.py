"""The watcher: polls one cloud's metadata service and yields each spot notice once.

    async with Watcher(WatchConfig(Cloud.AWS)) as watcher:
        async for notice in watcher:
            ...                              # evacuate before notice.deadline
            await watcher.acknowledge(notice)   # Azure: go ahead now; elsewhere a no-op

Iterating polls in the consumer's own task (no task of its own, so cancelling the
consumer stops everything, and breaking out of the loop leaves nothing running). A node
agent runs it as one task of its TaskGroup and starts evacuation in another, so that
polling goes on meanwhile. Failures never end the iteration: an unreachable service is
retried with backoff, an answer roam cannot trust is logged once per distinct problem;
neither is ever a notice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Protocol

import httpx

from roam.spot.aws import AwsSource
from roam.spot.azure import AzureSource
from roam.spot.config import WatchConfig
from roam.spot.errors import MetadataError, MetadataUnavailable
from roam.spot.gcp import GcpSource
from roam.spot.http import client
from roam.spot.metrics import METADATA_PROBLEMS, NOTICES
from roam.spot.notice import Cloud, Notice

__all__ = ["Source", "WatchState", "Watcher", "watch"]

log = logging.getLogger("roam.spot")


class WatchState(enum.StrEnum):
    STARTING = "starting"  # no answer yet
    WATCHING = "watching"  # the last poll was answered as documented
    UNREACHABLE = "unreachable"  # the last poll got no usable answer; retrying
    BAD_METADATA = "bad_metadata"  # the last answer was not trusted; retrying
    IDLE = "idle"  # cloud none: nothing to watch


class Source(Protocol):
    """One cloud's way of asking (roam.spot.aws, .gcp, .azure)."""

    cloud: Cloud

    async def poll(self) -> list[Notice]:
        """Ask once; the notices found (a GCP poll may hang until something changes)."""

    def pause(self, elapsed: float) -> float:
        """Seconds to wait before the next poll, this one having taken `elapsed`."""

    async def acknowledge(self, notice: Notice) -> None: ...


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _source(config: WatchConfig, http: httpx.AsyncClient,
            clock: Callable[[], dt.datetime]) -> Source | None:
    if config.cloud is Cloud.AWS:
        return AwsSource(http, config, clock)
    if config.cloud is Cloud.GCP:
        return GcpSource(http, config, clock)
    if config.cloud is Cloud.AZURE:
        return AzureSource(http, config, clock)
    return None


class _Problems:
    """Remembers problems already logged (a bounded set), so each is logged once."""

    def __init__(self, size: int = 256) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def first(self, message: str) -> bool:
        if message in self._seen:
            self._seen.move_to_end(message)
            return False
        self._seen[message] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return True

    def clear(self) -> None:
        self._seen.clear()


class Watcher:
    """Watches `config.cloud`'s metadata service at `config.metadata`."""

    def __init__(self, config: WatchConfig, *, http: httpx.AsyncClient | None = None,
                 clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self.config = config
        self._owned = http is None
        self._http = http or client(config.metadata, config.timeout)
        self.source: Source | None = _source(config, self._http, clock)
        self.state = WatchState.IDLE if self.source is None else WatchState.STARTING
        self.delivered: list[Notice] = []
        """Every notice yielded so far, in order."""
        self._unavailable = _Problems()
        self._bad = _Problems()
        self._seen: set[str] = set()  # event ids delivered: each notice once

    async def __aenter__(self) -> Watcher:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owned:
            await self._http.aclose()

    def __aiter__(self) -> AsyncIterator[Notice]:
        """Poll and yield notices until cancelled. Iterate one watcher in one task."""
        return self._notices()

    async def acknowledge(self, notice: Notice) -> None:
        """Tell the cloud the node is ready to go (Azure's StartRequests; nothing to do
        on AWS and GCP). Raises MetadataError if the cloud did not take it."""
        if self.source is not None:
            await self.source.acknowledge(notice)
            log.info("%s: acknowledged notice %s", notice.cloud, notice.event_id)

    def _failed(self, exc: MetadataError) -> None:
        assert self.source is not None
        unavailable = isinstance(exc, MetadataUnavailable)
        METADATA_PROBLEMS.labels(self.source.cloud.value,
                                 "unavailable" if unavailable else "bad").inc()
        self.state = WatchState.UNREACHABLE if unavailable else WatchState.BAD_METADATA
        problems = self._unavailable if unavailable else self._bad
        level = logging.WARNING if problems.first(exc.message) else logging.DEBUG
        what = ("metadata service unavailable, retrying" if unavailable else
                "metadata answer not trusted, ignored")
        log.log(level, "%s: %s: %s", self.source.cloud, what, exc.message)

    async def _notices(self) -> AsyncIterator[Notice]:
        source = self.source
        if source is None:
            log.info("cloud none: no spot notices to watch")
            await asyncio.Event().wait()  # until cancelled
            return
        backoff = self.config.retry_min
        while True:
            started = time.monotonic()
            try:
                found = await source.poll()
            except MetadataError as exc:
                self._failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.retry_max)
                continue
            if self.state is not WatchState.WATCHING:
                log.info("%s: watching spot notices at %s", source.cloud,
                         self.config.metadata)
                self.state = WatchState.WATCHING
                self._unavailable.clear()  # a later outage is news again
            backoff = self.config.retry_min
            for notice in found:
                if notice.event_id in self._seen:
                    continue
                self._seen.add(notice.event_id)
                NOTICES.labels(notice.cloud.value).inc()
                self.delivered.append(notice)
                log.warning("%s: spot notice: %s at %s (%.1f s from now), event %s",
                            notice.cloud, notice.action, notice.deadline.isoformat(),
                            notice.remaining().total_seconds(), notice.event_id)
                yield notice
            await asyncio.sleep(source.pause(time.monotonic() - started))


async def watch(config: WatchConfig) -> AsyncIterator[Notice]:
    """`async for notice in watch(config)`: a Watcher that closes when the loop ends
    (use contextlib.aclosing to end it at once on `break`)."""
    async with Watcher(config) as watcher:
        async for notice in watcher:
            yield notice
