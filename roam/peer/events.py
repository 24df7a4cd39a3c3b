"""Events: what a VM did, from its worker to the peer, and from the peer to /events.

A worker publishes on its instance's `Hub`: a `VMEvent` whenever the VM's state changes
(and when it became ready, or learnt its downtime), a `ProgressEvent` per cycle of a
migration out, an `OutcomeEvent` when that migration ended. The peer subscribes to each
worker's `events` stream method (roam.vm.control) as soon as the worker's control socket
exists, keeps its VM table from the `VMEvent`s, and publishes everything on its own hub,
which GET /events streams as server-sent events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal

from roam.errors import ErrorCode, RoamError
from roam.migration.source import Progress
from roam.peer.models import Event, OutcomeEvent, ProgressEvent, VMEvent, VMInfo
from roam.vm import control

if TYPE_CHECKING:
    from roam.peer.incoming import Incoming
    from roam.peer.instance import Instance
    from roam.peer.outgoing import Migrated

log = logging.getLogger(__name__)

BACKLOG = 4096
"""Events a subscriber may fall behind by before it is dropped (its stream ends): a
stalled client must not make the peer hold events without bound."""


class Hub:
    """Fan-out of events to subscribers, each with a bounded queue of its own."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[Event | None]] = set()
        self._closed = False

    @property
    def watched(self) -> bool:
        return bool(self._queues)

    def publish(self, event: Event) -> None:
        for queue in list(self._queues):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("an event subscriber fell %d events behind; dropping it", BACKLOG)
                self._queues.discard(queue)
                queue.get_nowait()  # room for the end of its stream
                queue.put_nowait(None)

    def close(self) -> None:
        """End every subscription (the peer or worker is shutting down)."""
        self._closed = True
        for queue in self._queues:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._queues.clear()

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[Event]]:
        """Events published from now on, until the hub closes or the subscriber is dropped.
        Subscribed on entry: take a snapshot inside the block and nothing is missed."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue(BACKLOG)
        if self._closed:
            queue.put_nowait(None)
        else:
            self._queues.add(queue)

        async def events() -> AsyncIterator[Event]:
            while (event := await queue.get()) is not None:
                yield event

        try:
            yield events()
        finally:
            self._queues.discard(queue)


# -- the worker's side ---------------------------------------------------------------------


def describe(instance: Instance) -> VMInfo:
    """The instance as the API shows it (its `info` reply and every `VMEvent`)."""
    return VMInfo.model_validate({
        **instance.info, "name": instance.spec.name, "state": instance.state,
        "sync": instance.sync.info() if instance.sync is not None else None,
        "mirror": instance.mirror.info() if instance.mirror is not None else None,
        "ready": instance.agent_ready.is_set(),
        "publish": [asdict(f) for f in instance.spec.forwards()],
        "overlay": instance.spec.overlay})


def changed(instance: Instance) -> None:
    """Publish the instance as it is now, if the peer listens."""
    if instance.events.watched:
        instance.events.publish(VMEvent(vm=describe(instance)))


def progress(instance: Instance) -> Callable[[Progress], None]:
    """The engine's progress hook for a migration of `instance` out."""
    def report(p: Progress) -> None:
        instance.info["dirty_rate"] = p.dirty_rate
        if instance.events.watched:
            instance.events.publish(ProgressEvent(vm=instance.spec.name, **asdict(p)))
    return report


def migration_ended(instance: Instance, to: str, started: float,
                    ended: Migrated | BaseException) -> None:
    """Publish how a migration out that started at `started` (perf_counter) ended."""
    duration_ms = (time.perf_counter() - started) * 1000
    if not isinstance(ended, BaseException):
        outcome: Literal["completed", "declined"] = (
            "completed" if ended.outcome == "completed" else "declined")
        event = OutcomeEvent(vm=instance.spec.name, to=to, outcome=outcome,
                             downtime_ms=ended.downtime_ms,
                             first_response_ms=ended.first_response_ms,
                             bytes_sent=ended.bytes_sent,
                             cycles=ended.cycles, final_dirty=ended.final_dirty,
                             first_pass_ms=ended.first_pass_ms,
                             first_pass_payload_bytes=ended.first_pass_payload_bytes,
                             have_bytes=ended.have_bytes, duration_ms=duration_ms)
    else:
        code = ended.code if isinstance(ended, RoamError) else ErrorCode.INTERNAL
        event = OutcomeEvent(vm=instance.spec.name, to=to, duration_ms=duration_ms,
                             outcome="declined" if code == ErrorCode.DECLINED else "failed",
                             code=code, detail=str(ended) or type(ended).__name__)
    instance.events.publish(event)


def stream(instance: Instance) -> control.StreamHandler:
    """The worker's `events` stream method: the VM as it is, then every event."""
    async def events(_: control.Json) -> AsyncIterator[control.Json]:
        async with instance.events.subscribe() as changes:
            yield VMEvent(vm=describe(instance)).model_dump(mode="json")
            async for event in changes:
                yield event.model_dump(mode="json")
    return events


async def watch(instance: Instance, incoming: Incoming | None = None) -> None:
    """Publish the instance again at moments that change what it shows without changing
    its state: the guest agent answering (`ready`); for an incoming VM, its QEMU up and
    PREPARED sent (accel, QEMU's pid) and its resume (its downtime is known just after
    its state became running)."""
    moments: list[Coroutine[Any, Any, object]] = [instance.agent_ready.wait()]
    if incoming is not None:
        moments += [_prepared(incoming), incoming.resumed.wait()]
    pending: set[asyncio.Task[Any]] = {asyncio.create_task(m) for m in moments}
    try:
        while pending:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            changed(instance)
    finally:
        for task in pending:
            task.cancel()


async def _prepared(incoming: Incoming) -> None:
    """Until the incoming VM's preparation ended (PREPARED sent, or it failed)."""
    await incoming.started.wait()
    assert incoming.prepared is not None
    await asyncio.wait([incoming.prepared])
