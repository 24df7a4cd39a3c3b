"""The peer API's types: requests, responses and events (docs/API.md).

One set of pydantic models for the HTTP API (its OpenAPI description is generated from
them), the client, and the peer's line-JSON protocol with its workers. Field names are
the API: clients (the CLI, a control plane, a dashboard) depend on them, so rename none.
Requests refuse unknown fields, so a misspelt option is an error instead of a default.
"""

from __future__ import annotations

import enum
import ipaddress
import re
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
from roam.migration.channel import Address
from roam.network.forward import PortForward
from roam.network.overlay import OverlaySpec

VMState = Literal["starting", "incoming", "running", "migrating", "paused", "in-doubt",
                  "handed-over", "migrated", "stopped", "mirror"]
"""A VM's state under its peer. `in-doubt` needs an operator (docs/MIGRATION.md);
`handed-over` means the destination owns the VM although post-copy failed."""

LIVE_STATES: tuple[VMState, ...] = ("starting", "incoming", "running", "migrating", "paused",
                                    "in-doubt", "handed-over")
"""States in which the VM still belongs to its worker here (the name is taken)."""

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,39}$")]
"""A VM's name: its network's names are made from it (roam.network.vmnet)."""
Vni = Annotated[int, Field(ge=1, le=2**24 - 1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _address(text: str) -> str:
    Address.parse(text)  # its ValueError says what is wrong
    return text


def _forward(spec: str) -> str:
    PortForward.parse(spec)
    return spec


def _ipv4(text: str) -> str:
    return str(ipaddress.IPv4Address(text))


def _absolute(text: str) -> str:
    if not text.startswith("/") or "\x00" in text:
        raise ValueError("must be an absolute path")
    return text


AbsolutePath = Annotated[str, AfterValidator(_absolute)]
IPv4Text = Annotated[str, AfterValidator(_ipv4)]
AddressText = Annotated[str, AfterValidator(_address)]
"""tcp://HOST:PORT or unix://PATH."""
ForwardText = Annotated[str, AfterValidator(_forward)]
"""[ADDR:]HOSTPORT:GUESTPORT[/udp], as `--publish` takes it."""


class PortForwardInfo(BaseModel):
    """A published port: host address and port forwarded to a guest port."""

    host_addr: str
    host_port: int
    guest_port: int
    protocol: Literal["tcp", "udp"]


def _store_url(text: str) -> str:
    if not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._-]+)*/?$", text):
        raise ValueError("must be s3://BUCKET/PREFIX (bucket: a-z 0-9 . -; prefix: "
                         "letters, digits, . _ - and /)")
    if any(part in (".", "..") for part in text.removeprefix("s3://").split("/")[1:]):
        raise ValueError("a prefix has no . or .. parts")
    return text.rstrip("/")


StoreURLText = Annotated[str, AfterValidator(_store_url)]
EndpointURL = Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=2048)]


class Checkpoint(BaseModel):
    """A consistent point of a VM: memory, disk and device state of one instant, taken
    during a pause of `pause_ms` (docs/MIRROR.md)."""

    seq: int
    epoch: int  # the authority epoch it was taken under
    at: float  # wall clock of the pause
    pause_ms: float  # QMP stop to cont on the source


class SyncInfo(BaseModel):
    """A VM's continuous sync to an object store (docs/SYNC.md)."""

    to: str  # s3://BUCKET/PREFIX/NAME
    state: Literal["first-pass", "running", "retrying", "stopped"]
    lag_bytes: int  # changed (or never uploaded) and not uploaded yet
    lag_seconds: float  # how long the oldest of that has waited
    uploaded_bytes: int
    objects_put: int
    dedup_hits: int  # chunks the store held already
    zero_chunks: int
    requests: int  # to the store
    sync_point: int | None  # the newest manifest written
    error: str | None  # the last failure (retrying), or why it stopped
    checkpoint: Checkpoint | None = None  # the newest sealed point (docs/MIRROR.md)


class MirrorInfo(BaseModel):
    """A standby mirror, as either end shows it: `role` source (the VM runs here and is
    mirrored to `peer`) or standby (a copy of the VM that runs at `peer`)."""

    role: Literal["source", "standby"]
    peer: str  # the other end: its address (source), or "(remote)" (standby)
    state: Literal["first-pass", "running", "stopped"]
    lag_bytes: int  # changed on the source and not on the standby yet (as of `at`)
    lag_seconds: float  # since the standby last heard that it was up to date
    sent_bytes: int  # blocks' bytes sent (source) or received (standby)
    checkpoint: Checkpoint | None = None  # the newest sealed (standby) or acknowledged
    checkpoints: int = 0  # taken (source) or sealed (standby) since the mirror started
    error: str | None = None  # why it stopped, if it did


class MirrorRequest(_Request):
    """Keep a warm copy of the VM's devices on another peer (`roam peer mirror --help`)."""

    to: AddressText = Field(description="the standby peer's --listen address")
    check_period: Annotated[float, Field(gt=0, le=3600, description=(
        "seconds between sends of what changed"))] = 1.0
    checkpoint_every: Annotated[float | None, Field(gt=0, le=86400, description=(
        "seconds between consistent checkpoints (a short pause); none: no checkpoint "
        "but the first"))] = None


class RestoreRequest(_Request):
    """Run a VM from its newest sealed sync point (`roam peer run --from s3://...`)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Name
    from_: Annotated[StoreURLText, Field(
        alias="from", description="s3://BUCKET/PREFIX/NAME: where the VM synced")]
    endpoint_url: EndpointURL | None = None
    publish: list[ForwardText] = []


class HibernateRequest(_Request):
    """Seal a final point in the bucket and stop the VM (`roam peer hibernate`)."""

    to: StoreURLText = Field(description="s3://BUCKET/PREFIX (the VM lands in PREFIX/NAME)")
    endpoint_url: EndpointURL | None = None


class PromoteRequest(_Request):
    """Run a standby mirror's VM from its newest checkpoint (`roam peer promote`)."""

    publish: list[ForwardText] = []


class VMInfo(BaseModel):
    """A VM as its peer knows it. Timings are those of its arrival here."""

    name: str
    state: VMState
    ready: bool = False  # the guest agent answered: exec works
    package: str = "(received)"  # the package it was started from on this host, if any
    pid: int | None = None  # the worker process
    workdir: str | None = None
    netns: str | None = None
    accel: str | None = None
    memory_mib: int | None = None
    cpus: int | None = None
    qemu_pid: int | None = None
    publish: list[PortForwardInfo] = []
    overlay: OverlaySpec | None = None
    resumed_at: float | None = None  # wall clock: since then it runs on this host
    dirty_rate: float | None = None  # bytes/s dirtied, by the last cycle of a migration out
    downtime_ms: float | None = None  # QMP stop on the source to QMP cont here
    # QMP stop on the source to the guest agent's first answer here: the guest runs again
    first_response_ms: float | None = None
    load_state_ms: float | None = None
    cont_ms: float | None = None
    memory_checked: bool = False  # memory compared with the source's at the pause
    sync: SyncInfo | None = None  # its continuous sync, if it has one
    mirror: MirrorInfo | None = None  # its standby mirror (either end), if it has one
    epoch: int = 0  # authority epoch: raised by each restore from a checkpoint
    last_pause_ms: float | None = None  # the last checkpoint's pause (mirror or sync)


class SyncRequest(_Request):
    """Sync a running VM's devices to s3://BUCKET/PREFIX/NAME (Silo's knobs)."""

    to: StoreURLText = Field(description="s3://BUCKET/PREFIX: the VM syncs to PREFIX/NAME; "
                                         "every VM under PREFIX shares its objects")
    endpoint_url: EndpointURL | None = Field(default=None, description=(
        "the S3 endpoint (default: the peer's AWS_ENDPOINT_URL, else AWS)"))
    check_period: Annotated[float, Field(gt=0, le=3600, description=(
        "seconds between dirty collections"))] = 1.0
    max_age: Annotated[float, Field(ge=0, le=86400, description=(
        "seconds a changed chunk may wait"))] = 5.0
    min_changes: Annotated[int, Field(ge=1, le=1 << 20, description=(
        "changed blocks that send a chunk before max_age"))] = 16
    limit: Annotated[int, Field(ge=1, le=1 << 20, description=(
        "chunks uploaded per check, after the first pass"))] = 256
    concurrency: Annotated[int, Field(ge=1, le=64, description="uploads at once")] = 8
    keep: Annotated[int, Field(ge=1, le=1000, description="sync points kept")] = 3
    checkpoint_every: Annotated[float | None, Field(gt=0, le=86400, description=(
        "seconds between sealed (consistent) sync points: a short pause each"))] = None


class GcRequest(_Request):
    keep: Annotated[int, Field(ge=1, le=1000, description="this VM's sync points kept")] = 3
    grace: Annotated[float, Field(ge=0, le=30 * 86400, description=(
        "seconds an unnamed object is spared (another VM may be about to name it)"))] = 600.0


class GcResult(BaseModel):
    manifests_deleted: int
    objects_deleted: int
    bytes_freed: int
    objects_kept: int


class RunRequest(_Request):
    """Start a VM from a package directory on the peer's host, or lazily from a registry."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Name
    package: Annotated[AbsolutePath | None, Field(
        description="a package directory on the peer's host (never changed)")] = None
    from_: Annotated[AddressText | None, Field(
        alias="from", description="a registry's address, instead of a package")] = None
    publish: Annotated[list[ForwardText], Field(
        description="port forwards on the host it runs on")] = []
    gateway: Annotated[IPv4Text | None, Field(
        description="the --underlay address of the peer that is its overlay gateway")] = None
    vni: Vni | None = None
    sync: SyncRequest | None = Field(default=None, description=(
        "sync it to an object store from the start"))

    @model_validator(mode="after")
    def _consistent(self) -> RunRequest:
        if (self.package is None) == (self.from_ is None):
            raise ValueError("give a package or from (a registry's address)")
        if (self.gateway is None) != (self.vni is None):
            raise ValueError("gateway and vni go together")
        if self.gateway is not None and self.publish:
            raise ValueError("a VM on an overlay publishes its ports on its gateway "
                             "(POST /gateways), not with publish")
        return self


class ExecRequest(_Request):
    argv: list[Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]] = Field(
        min_length=1)
    timeout: Annotated[float, Field(gt=0, le=86400,
                                    description="seconds before it is killed")] = 30.0


class ExecResult(BaseModel):
    exit_code: int | None  # None when the command timed out and was killed
    stdout: str
    stderr: str
    timed_out: bool


class MigrateRequest(_Request):
    """Options of a live migration (`roam migrate --help`)."""

    to: AddressText = Field(description="the destination peer's --listen address")
    postcopy: bool = True
    # With post-copy: a final dirty set of at most this many KiB goes inside the pause
    pause_send_kib: Annotated[int, Field(ge=0, le=1 << 30)] = 2048
    max_cycles: Annotated[int, Field(ge=1, le=100000)] = 20
    min_cycles: Annotated[int, Field(ge=0, le=100000)] = 1
    max_dirty_blocks: Annotated[int, Field(ge=0)] = 256
    cycle_throttle: Annotated[float, Field(ge=0, le=3600)] = 0.0
    compression: Literal["none", "zstd", "lz4"] = "none"
    verify: bool = False
    check_memory: bool = False


class LogName(enum.StrEnum):
    """The logs a peer keeps of each VM, in its directory (STATE_DIR/vms/N/NAME.log)."""

    CONSOLE = "console"  # the guest's serial console: kernel, init, the agent's messages
    QEMU = "qemu"  # QEMU's own output
    WORKER = "worker"  # the worker process: the VM's life and migrations on this peer


MAX_LOG_CHUNK = 1 << 20


class LogChunk(BaseModel):
    """A piece of a VM's log: bytes [offset, next_offset) of the file, as text (invalid
    UTF-8 replaced). Ask again from `next_offset` to follow it; `size` is the file's."""

    vm: str
    log: LogName
    offset: int
    next_offset: int
    size: int
    text: str


class MigrateResult(BaseModel):
    """What the source learnt. `declined` is only a result for destinations that decline
    on purpose (a live backup); any other decline is a `declined` problem."""

    outcome: Literal["completed", "declined"]
    bytes_sent: int
    total_ms: float
    cycles: int
    dirty_per_cycle: list[int]
    final_dirty: int
    handover_ms: float
    state_save_ms: float
    downtime_ms: float
    priority_blocks: int
    # The destination's: the pause here to the guest agent's first answer there (None
    # when the destination did not say: an older peer, or no answer in time).
    first_response_ms: float | None = None
    first_pass_ms: float = 0.0
    first_pass_payload_bytes: int = 0
    have_bytes: int = 0
    store_offered_bytes: int = 0  # hybrid: what the destination took from the store


class GatewayRequest(_Request):
    name: Name
    vni: Vni
    publish: Annotated[list[ForwardText], Field(
        description="port forwards on this host, to the VM wherever it runs")] = []


class GatewayInfo(BaseModel):
    name: str
    vni: int
    gateway: str
    netns: str
    publish: list[PortForwardInfo]


class Capacity(BaseModel):
    memory_bytes: int
    memory_available_bytes: int
    cpus: int


class Accelerator(BaseModel):
    """What VMs started here can use; a VM keeps the accelerator it was snapshotted under."""

    kvm: bool
    reason: str


class PeerInfo(BaseModel):
    version: str
    listen: str  # where migrations come in
    api_listen: str | None  # the TCP API (mutual TLS), if any
    underlay: str | None
    tls: bool
    capacity: Capacity
    accelerator: Accelerator
    cpu_model: str
    vms: int


class Prepared(BaseModel):
    """A destination's PREPARED payload, as the source's VM layer reads it: a peer names
    its overlay address; a terminator or mounter says that it takes a copy and will
    decline authority on purpose (the migration then succeeded: the VM runs on)."""

    underlay: str | None = None
    backup: bool = False


class Done(BaseModel):
    """A destination peer's DONE payload: when the guest first answered after its resume
    there (its liveness), measured from the source's pause."""

    model_config = ConfigDict(extra="ignore", strict=True)  # a number, not text

    first_response_ms: float | None = Field(default=None, ge=0, allow_inf_nan=False)

    @classmethod
    def parse(cls, payload: bytes) -> Done:
        """The payload as sent; an empty or unreadable one says nothing (it is a figure
        for reports, never a reason to fail a migration that completed)."""
        try:
            return cls.model_validate_json(payload or b"{}")
        except ValueError:
            return cls()


BACKUP = Prepared(backup=True).model_dump_json().encode()
"""The PREPARED payload of a terminator or mounter: the source's `roam migrate` exits 0."""


# -- events (GET /events) ---------------------------------------------------------------


class SnapshotEvent(BaseModel):
    """First on every stream: every VM as it is now. Everything after it is a change."""

    type: Literal["snapshot"] = "snapshot"
    vms: list[VMInfo]


class VMEvent(BaseModel):
    """A VM changed state (or learnt something: ready, downtime)."""

    type: Literal["vm"] = "vm"
    vm: VMInfo


class VMRemovedEvent(BaseModel):
    """The VM's worker exited: it is no longer on this peer."""

    type: Literal["vm_removed"] = "vm_removed"
    name: str
    exit_code: int


class ProgressEvent(BaseModel):
    """One per dirty cycle of a migration out (roam.migration.source.Progress)."""

    type: Literal["progress"] = "progress"
    vm: str
    phase: Literal["copy", "cycle", "handover"]
    cycle: int
    bytes_sent: int
    bytes_expected: int
    dirty_rate: float  # bytes per second


class OutcomeEvent(BaseModel):
    """How a migration out ended. `code` is set when it failed (or was declined)."""

    type: Literal["outcome"] = "outcome"
    vm: str
    to: str
    outcome: Literal["completed", "declined", "failed"]
    code: ErrorCode | None = None
    detail: str | None = None
    downtime_ms: float | None = None
    first_response_ms: float | None = None
    bytes_sent: int | None = None
    cycles: int | None = None  # pre-copy passes, when it completed
    final_dirty: int | None = None  # blocks still dirty at the pause
    first_pass_ms: float | None = None  # the destination ready to every block sent once
    first_pass_payload_bytes: int | None = None  # data the first pass sent (not zero, not held)
    have_bytes: int | None = None  # named, not sent: the destination held them
    duration_ms: float


Event = Annotated[SnapshotEvent | VMEvent | VMRemovedEvent | ProgressEvent | OutcomeEvent,
                  Field(discriminator="type")]


class EventEnvelope(BaseModel):
    """For parsing one event of any type."""

    event: Event
