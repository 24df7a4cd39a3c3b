"""The control plane's types: what it stores, what its API takes and answers, its events.

Stored records (`NodeRecord`, `VMRecord`, `Drain`, `TokenRecord`, `ControlEvent`) are the
store's values as JSON under the keys of `Keys`. A VM record has three parts written by
different hands: `spec` (what the user asked for, never changed after create), `desired`
(what the user wants now: running, deleted, a move) and `status` (what the control plane
decided and observed: node, migration target, phase, authority epoch). Every write of a
record is a transaction on the revision it was read at (roam.control.fleet).

Requests refuse unknown fields, so a misspelt option is an error instead of a default.
"""

from __future__ import annotations

import enum
import math
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from roam.errors import ErrorCode
from roam.peer.models import (
    AbsolutePath,
    Accelerator,
    AddressText,
    Capacity,
    ForwardText,
    IPv4Text,
    Name,
    StoreURLText,
    Vni,
)
from roam.peer.models import Event as PeerEvent
from roam.peer.models import VMInfo as PeerVM

NodeName = Name
"""A node's name: the same rules as a VM's (letters, digits, `_.-`, up to 40)."""
LabelKey = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9_.-]{0,62})$")]
LabelValue = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:/+-]{0,63}$")]

PRICE = "price"
"""The label with a node's price per hour (a number): the scheduler prefers cheaper."""
LIFECYCLE = "lifecycle"
"""The label saying `spot` or `on-demand`."""
WELL_KNOWN = ("cloud", "region", "zone", LIFECYCLE, PRICE)


class Keys:
    """Where records live in the store."""

    NODES = "/nodes/"
    ALIVE = "/alive/"  # one per node, on the node's lease: gone when the lease expires
    VMS = "/vms/"
    DRAINS = "/drains/"
    TOKENS = "/tokens/"
    EVENTS = "/events/"
    LEADER = "/leader"

    @staticmethod
    def node(name: str) -> str:
        return Keys.NODES + name

    @staticmethod
    def alive(name: str) -> str:
        return Keys.ALIVE + name

    @staticmethod
    def vm(name: str) -> str:
        return Keys.VMS + name

    @staticmethod
    def drain(name: str) -> str:
        return Keys.DRAINS + name

    @staticmethod
    def token(digest: str) -> str:
        return Keys.TOKENS + digest


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _labels(labels: dict[str, str]) -> dict[str, str]:
    if PRICE in labels:
        try:
            price = float(labels[PRICE])
        except ValueError:
            raise ValueError(f"label {PRICE} must be a number (per hour)") from None
        if not math.isfinite(price) or price < 0:
            raise ValueError(f"label {PRICE} must be a finite number, 0 or more")
    if labels.get(LIFECYCLE) not in (None, "spot", "on-demand"):
        raise ValueError(f"label {LIFECYCLE} is spot or on-demand")
    return labels


Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=64),
                   AfterValidator(_labels)]


# -- nodes ------------------------------------------------------------------------------


class NodeState(enum.StrEnum):
    """`ready` takes new VMs; `cordoned` keeps its VMs and takes none; `draining` moves
    its VMs off; `lost` missed its lease (its VMs stay where they were: not started
    anywhere else)."""

    READY = "ready"
    CORDONED = "cordoned"
    DRAINING = "draining"
    LOST = "lost"


class Cpu(BaseModel):
    model: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    flags: Annotated[list[Annotated[str, StringConstraints(max_length=64)]],
                     Field(max_length=1024)] = []


class Registration(_Request):
    """What `roam node join` says about its host (POST /nodes)."""

    name: NodeName
    peer: AddressText = Field(description="the peer's migration address (its --listen)")
    underlay: IPv4Text | None = Field(None, description="its overlay address, if any")
    version: Annotated[str, StringConstraints(max_length=64)]
    capacity: Capacity
    accelerator: Accelerator
    cpu: Cpu
    labels: Labels = {}


class NodeRecord(BaseModel):
    """A node as stored: its registration and what operators set."""

    registration: Registration
    cordoned: bool = False
    joined: float  # wall clock of its first registration
    lost_since: float | None = None  # set by the reconciler while its lease is gone

    def price(self) -> float:
        return float(self.registration.labels.get(PRICE, "inf"))


class NodeView(BaseModel):
    """A node as the API shows it."""

    name: str
    state: NodeState
    registration: Registration
    vms: list[str]
    memory_used_mib: int
    cpus_used: int
    draining: Drain | None = None


class Registered(BaseModel):
    """The answer to a registration: the lease to renew by heartbeats."""

    lease: int
    ttl: float
    heartbeat: float = Field(description="seconds between heartbeats")


# -- VMs --------------------------------------------------------------------------------


class VMSpec(_Request):
    """A VM as the user asked for it (POST /vms): where its package is, its size (for
    placement), its network and placement rules. Never changed after create."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Name
    package: Annotated[AbsolutePath | None, Field(
        description="a package directory that every node has at this path")] = None
    from_: Annotated[AddressText | None, Field(
        alias="from", description="a registry's address, instead of a package")] = None
    memory_mib: Annotated[int, Field(gt=0, le=2**24, description="for placement")]
    cpus: Annotated[int, Field(gt=0, le=1024)] = 1
    publish: Annotated[list[ForwardText], Field(
        max_length=64, description="port forwards: on its gateway if it has one, else "
                                   "on the node it runs on")] = []
    gateway: Annotated[IPv4Text | None, Field(
        description="underlay address of its overlay gateway (a node with that address "
                    "holds it)")] = None
    vni: Vni | None = None
    cpu_model: Annotated[str | None, StringConstraints(max_length=200), Field(
        description="run only on nodes of this CPU model (default: the model of the "
                    "node it first runs on)")] = None
    spread: Annotated[list[LabelKey], Field(
        max_length=8, description="label keys whose values the VM's peers spread over")
    ] = []
    group: Annotated[str | None, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,40}$"),
                     Field(description="the VMs spread among each other")] = None
    priority: Annotated[int, Field(ge=-1000, le=1000, description=(
        "higher moves first when its node is evacuated (roam.control.evacuation)"))] = 0
    sync_to: Annotated[StoreURLText | None, Field(description=(
        "s3://BUCKET/PREFIX: its node syncs it there (PREFIX/NAME) with sealed "
        "checkpoints, to hibernate it or restart it elsewhere from them"))] = None
    checkpoint_every: Annotated[float, Field(gt=0, le=86400, description=(
        "seconds between its sealed checkpoints (with sync_to)"))] = 60.0

    def store(self) -> str | None:
        """Where its checkpoints are: s3://BUCKET/PREFIX/NAME, if it has a store."""
        return None if self.sync_to is None else f"{self.sync_to.rstrip('/')}/{self.name}"

    @model_validator(mode="after")
    def _consistent(self) -> VMSpec:
        if (self.package is None) == (self.from_ is None):
            raise ValueError("give a package or from (a registry's address)")
        if (self.gateway is None) != (self.vni is None):
            raise ValueError("gateway and vni go together")
        return self


class MoveRequest(_Request):
    """POST /vms/{name}/migrate: to a node, or wherever the scheduler picks."""

    to: NodeName | None = None
    cheapest: bool = Field(False, description="the cheapest node that fits, nothing else "
                                              "considered")


class Move(BaseModel):
    """A move the user or a drain asked for, not yet given a target."""

    to: str | None = None
    cheapest: bool = False
    reason: Literal["user", "drain", "evacuation"] = "user"


class Desired(BaseModel):
    running: bool = True
    deleted: bool = False
    move: Move | None = None


class VMPhase(enum.StrEnum):
    PENDING = "pending"  # waits for a node
    PLACED = "placed"  # a node was chosen; it starts the VM
    RUNNING = "running"
    MIGRATING = "migrating"
    STOPPING = "stopping"
    STOPPED = "stopped"
    LOST = "lost"  # its node missed its lease: it may still run there
    IN_DOUBT = "in-doubt"  # a migration's authority was never acknowledged
    FAILED = "failed"  # it did not start, or its worker exited
    HIBERNATING = "hibernating"  # its node seals a last checkpoint and stops it
    HIBERNATED = "hibernated"  # in its checkpoint store only: restored where it fits


class Status(BaseModel):
    phase: VMPhase = VMPhase.PENDING
    node: str | None = None
    target: str | None = None  # the destination of the migration in flight
    epoch: int = 0  # grows at every placement and authority transfer
    started: bool = False  # it ran since its last placement: never start it again
    cpu_model: str | None = None  # the model it runs under (learned from its node)
    failures: int = 0  # failed migrations since it last moved
    detail: str | None = None  # why it is pending, failed, in doubt
    peer: PeerVM | None = None  # as its node's peer last reported it
    restore: bool = False  # its next start restores its last checkpoint (spec.sync_to)


class VMRecord(BaseModel):
    spec: VMSpec
    desired: Desired = Desired()
    status: Status = Status()
    created: float


class VMView(BaseModel):
    name: str
    spec: VMSpec
    desired: Desired
    status: Status


# -- drains -----------------------------------------------------------------------------


class DrainRequest(_Request):
    max_parallel: Annotated[int, Field(ge=1, le=64)] = 2


class Drain(BaseModel):
    max_parallel: int
    started: float


# -- node agent protocol ----------------------------------------------------------------


class Report(_Request):
    """How something a node was asked to do ended (sent with the next heartbeat)."""

    vm: Name
    action: Literal["run", "migrate", "stop", "hibernate"]
    ok: bool
    code: ErrorCode | None = None
    detail: Annotated[str, StringConstraints(max_length=4000)] = ""
    epoch: int = 0


class Heartbeat(_Request):
    """A node's periodic report: its lease, its peer's VMs and gateways, what ended."""

    lease: int
    vms: Annotated[list[PeerVM], Field(max_length=4096)] = []
    gateways: Annotated[list[Name], Field(max_length=4096)] = []
    reports: Annotated[list[Report], Field(max_length=4096)] = []


class Work(BaseModel):
    """One thing a node should do now. Nodes act idempotently: `run` only what their
    peer does not have, `migrate` only what runs there, `stop` only what is there."""

    action: Literal["run", "migrate", "stop", "hibernate"]
    vm: VMSpec
    epoch: int
    to: str | None = None  # migrate: the destination peer's migration address
    to_node: str | None = None
    restore: bool = False  # run: from its last checkpoint in spec.sync_to


class SyncWork(BaseModel):
    """A VM placed on this node that syncs with checkpoints while it runs here."""

    vm: Name
    to: str  # s3://BUCKET/PREFIX
    checkpoint_every: float


class GatewayWork(BaseModel):
    name: str
    vni: int
    publish: list[str]


class NodeWork(BaseModel):
    """The answer to a heartbeat: everything this node should be doing."""

    work: list[Work]
    gateways: list[GatewayWork]
    syncs: list[SyncWork] = []


class PeerEvents(_Request):
    """A node relays its peer's events (POST /nodes/{name}/events)."""

    events: Annotated[list[PeerEvent], Field(max_length=1024)]


# -- tokens -----------------------------------------------------------------------------


class TokenRecord(BaseModel):
    name: str
    created: float


# -- events -----------------------------------------------------------------------------


class ControlKind(enum.StrEnum):
    NODE_JOINED = "node_joined"
    NODE_LOST = "node_lost"
    NODE_BACK = "node_back"
    PLACED = "placed"
    UNSCHEDULABLE = "unschedulable"
    MIGRATION_STARTED = "migration_started"
    MIGRATION_ENDED = "migration_ended"
    MIGRATION_FAILED = "migration_failed"
    DRAIN_STARTED = "drain_started"
    DRAIN_FINISHED = "drain_finished"
    DRAIN_STUCK = "drain_stuck"
    VM_FAILED = "vm_failed"
    VM_STOPPED = "vm_stopped"
    VM_DELETED = "vm_deleted"
    NOTICE = "notice"  # a spot notice: the node goes at `deadline`
    EVACUATED = "evacuated"  # a VM resumed elsewhere, `margin_ms` before the deadline
    WILL_BE_LOST = "will_be_lost"  # a VM cannot leave in time, or has nowhere to go
    VM_LOST = "vm_lost"  # the deadline passed (or its lost node stays lost) without it
    EVACUATION_FINISHED = "evacuation_finished"
    HIBERNATING = "hibernating"  # a VM that cannot leave in time goes to its store
    HIBERNATED = "hibernated"  # it is in its store only, until a node fits
    RESTORING = "restoring"  # it starts again from its last checkpoint (a new epoch)


class ControlEvent(BaseModel):
    """Something the control plane decided or saw (stored under /events/)."""

    type: Literal["control"] = "control"
    kind: ControlKind
    at: float
    vm: str | None = None
    node: str | None = None
    to: str | None = None
    detail: str | None = None
    deadline: float | None = None  # notices and evacuations: wall clock
    margin_ms: float | None = None  # evacuated: deadline minus its resume elsewhere


class RelayedEvent(BaseModel):
    """One of a node's peer events, as it relayed it."""

    type: Literal["peer"] = "peer"
    node: str
    at: float
    event: PeerEvent


class FleetSnapshot(BaseModel):
    """First on every GET /events stream: the fleet as it is."""

    type: Literal["snapshot"] = "snapshot"
    nodes: list[NodeView]
    vms: list[VMView]


class NodeChanged(BaseModel):
    type: Literal["node"] = "node"
    node: NodeView


class VMChanged(BaseModel):
    type: Literal["vm"] = "vm"
    vm: VMView


class VMRemoved(BaseModel):
    type: Literal["vm_removed"] = "vm_removed"
    name: str


FleetEvent = Annotated[FleetSnapshot | NodeChanged | VMChanged | VMRemoved | ControlEvent
                       | RelayedEvent, Field(discriminator="type")]


class FleetEventEnvelope(BaseModel):
    event: FleetEvent


class Health(BaseModel):
    ok: bool
    leader: bool
    revision: int
    detail: str = ""
