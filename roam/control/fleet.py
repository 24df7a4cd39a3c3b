"""The fleet's records over a store: typed reads, and writes as compare-and-swap.

Every change of a record is `update`: read it, compute the new value, write it only if
nobody wrote it in between (else read again and recompute). So the API, the reconciler
and the heartbeats of many nodes can change the same VM without losing each other's
writes, on one machine or on a replicated store.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

from roam.control.models import (
    ControlEvent,
    ControlKind,
    Drain,
    Keys,
    Move,
    NodeRecord,
    NodeState,
    NodeView,
    VMRecord,
    VMView,
)
from roam.control.store import Compare, Delete, Put, Store, Txn
from roam.errors import ErrorCode, RoamError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

EVENTS_KEPT = 2000
"""Control-plane and relayed events kept in the store (the oldest go first)."""
ATTEMPTS = 20


class Contended(RoamError):
    """A record kept changing under an update: nothing was written."""

    code = ErrorCode.BUSY


@dataclass(frozen=True)
class Versioned(Generic[M]):
    value: M
    revision: int  # the record's mod_revision, to compare on write


@dataclass(frozen=True)
class View:
    """The fleet as read at one moment (each prefix read once)."""

    nodes: dict[str, Versioned[NodeRecord]]
    alive: set[str]
    vms: dict[str, Versioned[VMRecord]]
    drains: dict[str, Versioned[Drain]]

    def node_state(self, name: str) -> NodeState:
        if name not in self.alive:
            return NodeState.LOST
        if name in self.drains:
            return NodeState.DRAINING
        if self.nodes[name].value.cordoned:
            return NodeState.CORDONED
        return NodeState.READY

    def node_view(self, name: str) -> NodeView:
        record = self.nodes[name].value
        here = [v.value for v in self.vms.values() if v.value.status.node == name]
        drain = self.drains.get(name)
        return NodeView(name=name, state=self.node_state(name),
                        registration=record.registration, vms=[v.spec.name for v in here],
                        memory_used_mib=sum(v.spec.memory_mib for v in here),
                        cpus_used=sum(v.spec.cpus for v in here),
                        draining=None if drain is None else drain.value)


def move_off(reason: Literal["drain", "evacuation"]) -> Callable[[VMRecord], VMRecord | None]:
    """The update that asks for a VM's move off its node (a drain's, an evacuation's),
    unless one is asked for or under way already."""
    def update(record: VMRecord) -> VMRecord | None:
        if record.desired.move is not None or record.status.target is not None:
            return None
        record.desired.move = Move(reason=reason)
        return record
    return update


def vm_view(record: VMRecord) -> VMView:
    return VMView(name=record.spec.name, spec=record.spec, desired=record.desired,
                  status=record.status)


def _name(key: str, prefix: str) -> str:
    return key[len(prefix):]


class Fleet:
    """Typed access to the fleet's records in `store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _all(self, prefix: str, model: type[M]) -> dict[str, Versioned[M]]:
        found = await self.store.range(prefix)
        return {_name(r.key, prefix): Versioned(model.model_validate_json(r.value),
                                                r.mod_revision) for r in found.records}

    async def view(self) -> View:
        nodes = await self._all(Keys.NODES, NodeRecord)
        alive = {_name(r.key, Keys.ALIVE) for r in (await self.store.range(Keys.ALIVE)).records}
        vms = await self._all(Keys.VMS, VMRecord)
        drains = await self._all(Keys.DRAINS, Drain)
        return View(nodes, alive, vms, drains)

    async def get(self, key: str, model: type[M]) -> Versioned[M] | None:
        record = await self.store.get(key)
        if record is None:
            return None
        return Versioned(model.model_validate_json(record.value), record.mod_revision)

    async def vm(self, name: str) -> Versioned[VMRecord]:
        found = await self.get(Keys.vm(name), VMRecord)
        if found is None:
            raise RoamError(f"no VM called {name!r}", code=ErrorCode.NOT_FOUND)
        return found

    async def node(self, name: str) -> Versioned[NodeRecord]:
        found = await self.get(Keys.node(name), NodeRecord)
        if found is None:
            raise RoamError(f"no node called {name!r}", code=ErrorCode.NOT_FOUND)
        return found

    async def create(self, key: str, value: BaseModel, *extra: Put) -> bool:
        """Write `value` at `key` unless the key exists; whether it was written."""
        result = await self.store.txn(Txn([Compare(key, 0)], [
            Put(key, value.model_dump_json().encode()), *extra]))
        return result.succeeded

    async def replace(self, key: str, old: Versioned[M], new: M, *extra: Put | Delete) -> bool:
        """Write `new` if the record is still at `old`'s revision."""
        result = await self.store.txn(Txn([Compare(key, old.revision)], [
            Put(key, new.model_dump_json().encode()), *extra]))
        return result.succeeded

    async def update(self, key: str, model: type[M], change: Callable[[M], M | None]
                     ) -> M | None:
        """Apply `change` to the record at `key` until the write wins. `change` returns
        the new value, or None to leave the record as it is; it may raise (a RoamError
        saying why the change is refused), and nothing is written. NOT_FOUND if there
        is no record."""
        for _ in range(ATTEMPTS):
            current = await self.get(key, model)
            if current is None:
                raise RoamError(f"no record {key}", code=ErrorCode.NOT_FOUND)
            new = change(current.value.model_copy(deep=True))
            if new is None:
                return current.value
            if await self.replace(key, current, new):
                return new
            await asyncio.sleep(0.005)
        raise Contended(f"{key} kept changing; try again")

    async def event(self, kind: ControlKind, *, vm: str | None = None,
                    node: str | None = None, to: str | None = None,
                    detail: str | None = None) -> None:
        event = ControlEvent(kind=kind, at=time.time(), vm=vm, node=node, to=to,
                             detail=detail)
        log.info("%s%s%s%s%s", kind.value, f" vm={vm}" if vm else "",
                 f" node={node}" if node else "", f" to={to}" if to else "",
                 f": {detail}" if detail else "")
        await self.append(event)

    async def append(self, event: BaseModel) -> None:
        await self.store.put(event_key(), event.model_dump_json().encode())

    async def prune_events(self) -> None:
        """Keep the last EVENTS_KEPT events."""
        found = (await self.store.range(Keys.EVENTS)).records
        old = found[:max(0, len(found) - EVENTS_KEPT)]
        if old:
            await self.store.txn(Txn(then=[Delete(r.key) for r in old]))


def event_key() -> str:
    """Ordered by time (then unique): /events/NANOSECONDS-RANDOM."""
    return f"{Keys.EVENTS}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
