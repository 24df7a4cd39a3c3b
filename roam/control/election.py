"""Leader election over the store: exactly one instance reconciles at a time.

An instance campaigns by creating the `/leader` key on a lease of its own, in a
transaction that succeeds only if the key does not exist. While it renews the lease it
leads; when it cannot (its store is unreachable, it was paused past the TTL), the key
goes with the lease and another instance's campaign wins. A leader that fails to renew
stops its work at once, before the TTL could let another one start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from roam.control.models import Keys
from roam.control.store import Compare, LeaseExpired, Put, Store, StoreError, Txn

log = logging.getLogger(__name__)


class Election:
    def __init__(self, store: Store, identity: str, ttl: float) -> None:
        self.store = store
        self.identity = identity
        self.ttl = ttl
        self.leading = False

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Campaign, and run `lead()` while leading, until cancelled."""
        while True:
            lease = await self.store.grant(self.ttl)
            won = await self.store.txn(Txn([Compare(Keys.LEADER, 0)], [
                Put(Keys.LEADER, self.identity.encode(), lease.id)]))
            if not won.succeeded:
                await self.store.revoke(lease.id)
                await asyncio.sleep(self.ttl / 3)
                continue
            log.info("leading as %s", self.identity)
            self.leading = True
            try:
                async with asyncio.TaskGroup() as tasks:
                    work = tasks.create_task(lead())
                    await self._renew(lease.id)
                    work.cancel()
            finally:
                self.leading = False
                with contextlib.suppress(StoreError):
                    await self.store.revoke(lease.id)
            log.warning("lost the leadership; campaigning again")

    async def _renew(self, lease: int) -> None:
        """Renew until that fails."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.store.keepalive(lease)
            except (LeaseExpired, StoreError) as exc:
                log.warning("cannot renew the leadership: %s", exc)
                return

