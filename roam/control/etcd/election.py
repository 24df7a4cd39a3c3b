"""Leader election for a replicated control plane, as etcd's concurrency package does it.

Each instance campaigns with a key of its own under /election/, on a lease of its own;
the key with the lowest create_revision leads. Every other candidate watches the key
just before its own and looks again when that one goes, so when the leader dies the
next one learns it from etcd as its lease expires (no polling, no thundering herd), and
candidates lead in the order they came.

A leader leads only while its lease is surely alive: when most of the TTL has passed
since the last renewal that came back was sent, the leader stops its work there and
then, before etcd could expire the lease and let the next one start. (A candidate that
only waits renews at its own pace: it keeps its place until its lease is gone.) A store that fails
(etcd's quorum lost, no member reachable) ends the term the same way; the instance
campaigns again once the store answers.

The election needs nothing but the store interface, so it runs on any store; the
replicated control plane runs it on etcd (roam.control.etcd.store).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from roam.control.election import Election
from roam.control.store import Compacted, LeaseExpired, Store, StoreError, WatchKind

log = logging.getLogger(__name__)

PREFIX = "/election/"
TTL = 3.0
"""Seconds the leader's lease lives unrenewed: about how long a dead leader leads on."""
RETRY = 0.5
"""Seconds between campaigns while the store fails."""
MARGIN = 0.75
"""Share of the TTL, counted from the sending of the last renewal that came back, after
which a leader stops leading (unless a renewal came back meanwhile)."""


class LeaseElection(Election):
    """`await LeaseElection(store, identity, ttl).run(lead)`; `leading` says whether this
    instance leads now."""

    def __init__(self, store: Store, identity: str, ttl: float = TTL) -> None:
        super().__init__(store, identity, ttl)
        self.why_not = ""
        """Why this instance cannot campaign now (the store's error), or empty."""
        self._renewed = 0.0  # when the last good renewal of the lease was sent

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Campaign, and run `lead()` while leading, until cancelled."""
        while True:
            sent = time.monotonic()
            try:
                lease = await self.store.grant(self.ttl)
            except StoreError as exc:
                self._cannot(exc)
                await asyncio.sleep(RETRY)
                continue
            try:
                await self._term(lease.id, sent, lead)
            except* StoreError as group:
                self._cannot(group.exceptions[0])
            finally:
                self.leading = False
                with contextlib.suppress(StoreError):
                    await self.store.revoke(lease.id)
            await asyncio.sleep(RETRY)

    def _cannot(self, exc: BaseException) -> None:
        why = exc.message if isinstance(exc, StoreError) else str(exc)
        if why != self.why_not:
            log.warning("cannot lead: %s", why)
        self.why_not = why

    async def _term(self, lease: int, granted: float,
                    lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """One candidacy on `lease`: wait for the turn, lead until the lease fails."""
        key = f"{PREFIX}{lease:016x}"
        created = await self.store.put(key, self.identity.encode(), lease)
        self.why_not = ""
        self._renewed = granted
        async with asyncio.TaskGroup() as tasks:
            renewing = tasks.create_task(self._keep(lease))
            turn = tasks.create_task(self._wait_turn(key, created))
            await asyncio.wait([renewing, turn], return_when=asyncio.FIRST_COMPLETED)
            if turn.done() and not renewing.done():
                self.leading = True
                log.info("leading as %s", self.identity)
                work = tasks.create_task(lead())
                guard = tasks.create_task(self._guard())
                await asyncio.wait([renewing, work, guard],
                                   return_when=asyncio.FIRST_COMPLETED)
                work.cancel()
                guard.cancel()
                log.warning("no longer leading")
            turn.cancel()
            renewing.cancel()

    async def _wait_turn(self, key: str, created: int) -> None:
        """Until no candidate came before us: watch the one just before, look again
        when it goes."""
        while True:
            found = await self.store.range(PREFIX)
            if all(r.key != key for r in found.records):
                raise LeaseExpired(f"the candidacy {key} is gone (its lease expired)")
            before = [r for r in found.records if r.create_revision < created]
            if not before:
                return
            previous = max(before, key=lambda r: r.create_revision)
            log.info("waiting for %s to stop leading or campaigning",
                     previous.value.decode(errors="replace"))
            with contextlib.suppress(Compacted):
                async with self.store.watch(previous.key, found.revision) as changes:
                    async for change in changes:
                        if change.key == previous.key and change.kind == WatchKind.DELETE:
                            break

    async def _keep(self, lease: int) -> None:
        """Renew until a renewal fails; `_renewed` is when the last good one was sent."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            sent = time.monotonic()
            try:
                await self.store.keepalive(lease)
            except StoreError as exc:
                log.warning("cannot renew the election lease: %s", exc.message)
                return
            self._renewed = sent

    async def _guard(self) -> None:
        """Return once the last good renewal is older than MARGIN of the TTL: the lease
        may expire soon, and the next candidate lead."""
        while True:
            left = self._renewed + self.ttl * MARGIN - time.monotonic()
            if left <= 0:
                log.warning("the election lease was not renewed in time")
                return
            await asyncio.sleep(left)

    async def leader(self) -> str | None:
        """Who leads now (the identity of the first candidate), if anyone."""
        found = await self.store.range(PREFIX)
        if not found.records:
            return None
        return min(found.records, key=lambda r: r.create_revision).value.decode(
            errors="replace")


def _loop_time(monotonic: float) -> float:
    """A time.monotonic() instant as the event loop's clock reads it."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic - time.monotonic())
