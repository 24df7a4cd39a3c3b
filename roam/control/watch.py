"""The node's spot watch: the cloud's notices, relayed to the control plane.

`roam node join --cloud aws|gcp|azure --metadata URL` runs a roam.spot Watcher beside
the node agent. Each notice it yields is sent as POST /nodes/{name}/notice (again and
again until the control plane takes it, or the deadline passes), which starts the
evacuation (roam.control.evacuation). The watch then follows the evacuation (GET
/nodes/{name}/notice) and acknowledges the notice once it has finished, or at once if
there was nothing to move: on Azure that lets the platform go ahead (StartRequests)
instead of waiting for the deadline; elsewhere acknowledging is a no-op.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

from roam.control.client import ControlClient
from roam.control.notice import NoticeRecord, NoticeRequest
from roam.errors import RoamError
from roam.spot import Notice, WatchConfig, Watcher

log = logging.getLogger("roam.node")

RETRY = 1.0
"""Seconds between attempts to reach the control plane, and between looks at the
evacuation."""


class SpotWatch:
    def __init__(self, config: WatchConfig, control: ControlClient, node: str,
                 max_parallel: int = 2) -> None:
        self.config = config
        self.control = control
        self.node = node
        self.max_parallel = max_parallel

    async def run(self) -> None:
        """Watch until cancelled; each notice is handled in a task of its own."""
        log.info("watching %s's metadata service at %s for spot notices",
                 self.config.cloud.value, self.config.metadata)
        async with Watcher(self.config) as watcher, asyncio.TaskGroup() as tasks:
            async for notice in watcher:
                tasks.create_task(self._handle(watcher, notice))

    async def _handle(self, watcher: Watcher, notice: Notice) -> None:
        left = notice.remaining().total_seconds()
        log.warning("spot notice: %s will %s this node in %.0f s (event %s)",
                    notice.cloud.value, notice.action.value, left, notice.event_id)
        request = NoticeRequest(deadline=notice.deadline.timestamp(), cloud=notice.cloud,
                                action=notice.action, event_id=notice.event_id[:200],
                                max_parallel=self.max_parallel)
        record = await self._until_past(notice, lambda: self.control.give_notice(
            self.node, request), "report the notice")
        while record is not None and record.finished is None and record.vms:
            await asyncio.sleep(RETRY)
            record = await self._until_past(notice, lambda: self.control.notice(self.node),
                                            "follow the evacuation")
        if record is not None:
            log.info("evacuation %s: %d evacuated, %d lost; acknowledging the notice",
                     "finished" if record.vms else "had nothing to move",
                     len(record.evacuated), len(record.lost))
        try:
            await watcher.acknowledge(notice)
        except RoamError as exc:
            log.warning("acknowledging the notice: %s", exc.message)

    async def _until_past(self, notice: Notice, call: Callable[[], Awaitable[NoticeRecord]],
                          what: str) -> NoticeRecord | None:
        """`call()`'s answer, retried while the control plane cannot be reached; None
        once the deadline passed."""
        while dt.datetime.now(dt.UTC) < notice.deadline:
            try:
                return await call()
            except RoamError as exc:
                log.warning("cannot %s: %s", what, exc.message)
                await asyncio.sleep(RETRY)
        return None
