"""What the dashboard shows, folded from the fleet's records and its event log.

The API's records say where things are; the event log says how they got there. A
`Board` holds both as the page needs them: the nodes and VMs as they are now, the
migrations in flight with their last `progress` event, the finished ones with their
outcome (downtime, bytes, duration), and each drain's evacuation (when it began and when
each VM it moved arrived). It is built once per browser connection from the store (the
log keeps the last 2,000 events) and then folded forward, change by change, from the
same watch GET /events streams.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from roam.control.fleet import Fleet, vm_view
from roam.control.models import (
    ControlEvent,
    ControlKind,
    FleetEventEnvelope,
    Keys,
    NodeView,
    RelayedEvent,
    VMPhase,
    VMRecord,
    VMView,
)
from roam.peer.models import OutcomeEvent, ProgressEvent

HISTORY = 200
"""Finished migrations the board keeps (the newest)."""


@dataclass
class Flight:
    """A migration under way: from the VM's record, with its last progress event."""

    vm: str
    source: str | None
    target: str
    started: float | None = None  # when migration_started was logged
    progress: ProgressEvent | None = None

    @property
    def fraction(self) -> float:
        """Bytes sent of expected, 0 to 1 (the expected size grows with dirtied pages)."""
        if self.progress is None or self.progress.bytes_expected <= 0:
            return 0.0
        return min(1.0, self.progress.bytes_sent / self.progress.bytes_expected)


@dataclass
class Finished:
    """A migration's outcome, as the source node relayed it."""

    at: float
    vm: str
    source: str
    target: str  # a node's name when its peer address is known, else the address
    outcome: OutcomeEvent

    @property
    def throughput(self) -> float | None:
        """Bytes per second over the whole migration."""
        if self.outcome.bytes_sent is None or self.outcome.duration_ms <= 0:
            return None
        return self.outcome.bytes_sent / (self.outcome.duration_ms / 1000)


@dataclass
class Arrival:
    vm: str
    started: float | None
    ended: float
    ok: bool


@dataclass
class Evacuation:
    """A drain: when it began, each VM moved off the node and when, when it ended."""

    node: str
    started: float
    finished: float | None = None
    arrivals: list[Arrival] = field(default_factory=list)


@dataclass
class Board:
    nodes: dict[str, NodeView] = field(default_factory=dict)
    vms: dict[str, VMView] = field(default_factory=dict)
    flights: dict[str, Flight] = field(default_factory=dict)
    history: list[Finished] = field(default_factory=list)
    evacuations: list[Evacuation] = field(default_factory=list)
    _started: dict[str, tuple[float, str | None]] = field(default_factory=dict)
    """Per VM: when its last migration_started was logged, and the node it went to."""

    @classmethod
    async def load(cls, fleet: Fleet) -> tuple[Board, int]:
        """The board as the store holds it, and the revision to watch from."""
        board = cls()
        logged = await fleet.store.range(Keys.EVENTS)
        view = await fleet.view()
        for name in sorted(view.nodes):
            board.nodes[name] = view.node_view(name)
        for _, vm in sorted(view.vms.items()):
            board._vm(vm_view(vm.value))
        for record in logged.records:
            board._log(record.value)
        return board, logged.revision

    async def apply(self, fleet: Fleet, key: str, value: bytes | None) -> bool:
        """Fold one change of the store's watch (`value` None: the key was deleted) into
        the board; whether it may have changed what the board shows."""
        if key.startswith(Keys.EVENTS):
            if value is None:
                return False  # an old event pruned: the board keeps what it folded
            self._log(value)
        elif key.startswith(Keys.VMS):
            name = key.removeprefix(Keys.VMS)
            if value is None:
                self.vms.pop(name, None)
                self.flights.pop(name, None)
            else:
                self._vm(vm_view(VMRecord.model_validate_json(value)))
        elif key.startswith((Keys.NODES, Keys.ALIVE, Keys.DRAINS)):
            # a node's view mixes its record, its lease and its drain: read them again
            view = await fleet.view()
            self.nodes = {n: view.node_view(n) for n in sorted(view.nodes)}
        else:
            return False  # tokens, the leader: nothing shown
        return True

    # -- folding -----------------------------------------------------------------------

    def _vm(self, vm: VMView) -> None:
        self.vms[vm.name] = vm
        status = vm.status
        if status.target is None or status.phase != VMPhase.MIGRATING:
            self.flights.pop(vm.name, None)
            return
        flight = self.flights.get(vm.name)
        if flight is None or flight.target != status.target:
            started = self._started.get(vm.name)
            self.flights[vm.name] = Flight(vm.name, status.node, status.target,
                                           None if started is None else started[0])

    def _log(self, value: bytes) -> None:
        event = FleetEventEnvelope.model_validate({"event": json.loads(value)}).event
        if isinstance(event, ControlEvent):
            self._control(event)
        elif isinstance(event, RelayedEvent):
            self._relayed(event)

    def _control(self, event: ControlEvent) -> None:
        if event.kind == ControlKind.MIGRATION_STARTED and event.vm is not None:
            self._started[event.vm] = (event.at, event.to)
            if event.vm in self.flights:
                self.flights[event.vm].started = event.at
                self.flights[event.vm].progress = None
        elif event.kind == ControlKind.DRAIN_STARTED and event.node is not None:
            self.evacuations.append(Evacuation(event.node, event.at))
        elif event.kind == ControlKind.DRAIN_FINISHED and event.node is not None:
            evacuation = self._evacuation(event.node)
            if evacuation is not None:
                evacuation.finished = event.at
        elif (event.kind in (ControlKind.MIGRATION_ENDED, ControlKind.MIGRATION_FAILED)
              and event.vm is not None and event.node is not None):
            evacuation = self._evacuation(event.node)
            if evacuation is not None:
                started = self._started.get(event.vm)
                evacuation.arrivals.append(Arrival(
                    event.vm, None if started is None else started[0], event.at,
                    event.kind == ControlKind.MIGRATION_ENDED))

    def _evacuation(self, node: str) -> Evacuation | None:
        for evacuation in reversed(self.evacuations):
            if evacuation.node == node and evacuation.finished is None:
                return evacuation
        return None

    def _relayed(self, relayed: RelayedEvent) -> None:
        event = relayed.event
        if isinstance(event, ProgressEvent):
            flight = self.flights.get(event.vm)
            if flight is not None and (flight.started is None or relayed.at >= flight.started):
                flight.progress = event
        elif isinstance(event, OutcomeEvent):
            started = self._started.get(event.vm)
            target = started[1] if started is not None and started[1] else None
            self.history.append(Finished(relayed.at, event.vm, relayed.node,
                                         target or self._node_at(event.to), event))
            del self.history[:-HISTORY]

    def _node_at(self, address: str) -> str:
        """The name of the node whose peer listens at `address` (as the source's peer
        names its destination), or the address: for an outcome whose migration_started
        the log no longer holds."""
        for node in self.nodes.values():
            if node.registration.peer == address or node.registration.peer.endswith(
                    "://" + address):
                return node.name
        return address
