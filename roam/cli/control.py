"""`roam control ...`: serve the control plane, and drive it (VMs, nodes, events).

Client commands read the control plane's URL and a token from --control and --token, or
ROAM_CONTROL_URL and ROAM_TOKEN. Each prints a summary, or JSON with --json; writes that
start work (create, migrate, drain) wait for it unless --no-wait, printing what happened.
Errors are the API's typed problems, reported as one line (docs/CONTROL.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from roam.cli import exits
from roam.cli.common import (
    CommandError,
    Json,
    Verbose,
    failed,
    invalid,
    print_json,
    run,
    setup_logging,
    tls_context,
)
from roam.control import auth
from roam.control import serve as control_serve
from roam.control.client import ControlClient
from roam.control.etcd import election as etcd_election
from roam.control.etcd import serve as etcd_serve
from roam.control.etcd import store as etcd_store
from roam.control.etcd.client import EtcdClient
from roam.control.etcd.store import EtcdStore
from roam.control.fleet import Fleet
from roam.control.models import (
    ControlEvent,
    FleetEvent,
    FleetSnapshot,
    MoveRequest,
    NodeChanged,
    NodeState,
    NodeView,
    VMChanged,
    VMPhase,
    VMRemoved,
    VMSpec,
    VMView,
)
from roam.control.notice import NoticeRecord, NoticeRequest, order, summary
from roam.control.sqlite import SqliteStore
from roam.control.store import Store
from roam.errors import ErrorCode, RoamError
from roam.peer.models import OutcomeEvent, ProgressEvent
from roam.vm.package import Package, PackageError

app = typer.Typer(help="The control plane: a fleet of nodes, its VMs, placement and drains.",
                  no_args_is_help=True, epilog=exits.TABLE)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
vm_app = typer.Typer(help="VMs of the fleet.", no_args_is_help=True)
node_app = typer.Typer(help="Nodes of the fleet.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(vm_app, name="vm")
app.add_typer(node_app, name="node")

DEFAULT_LISTEN = "127.0.0.1:7450"
DEFAULT_URL = "http://127.0.0.1:7450"
WAIT = 600.0
POLL = 0.5

T = TypeVar("T")

Control = Annotated[str, typer.Option(
    "--control", envvar="ROAM_CONTROL_URL",
    help="The control plane's URL, or several instances' URLs comma-separated (tried in "
         "turn) (default: $ROAM_CONTROL_URL, else " + DEFAULT_URL + ").")]
Token = Annotated[str | None, typer.Option(
    "--token", envvar="ROAM_TOKEN", help="An API token (default: $ROAM_TOKEN).")]
Ca = Annotated[Path | None, typer.Option(
    "--ca", help="PEM CA that an https control plane's certificate is signed by.")]
Wait = Annotated[bool, typer.Option(help="Wait until the work is done.")]
EtcdOption = Annotated[str | None, typer.Option(
    "--etcd", help="Keep the state in etcd: its members' client URLs, comma-separated "
                   "(a replicated control plane, docs/ETCD.md).")]
EtcdRoot = Annotated[str, typer.Option(help="The key under which the state lives in etcd.")]
EtcdCa = Annotated[Path | None, typer.Option(help="PEM CA of etcd's https endpoints.")]
EtcdCert = Annotated[Path | None, typer.Option(
    help="PEM client certificate for etcd (its --client-cert-auth).")]
EtcdKey = Annotated[Path | None, typer.Option(help="PEM key of --etcd-cert.")]


def client(control: str, token: str | None, ca: Path | None,
           cert: Path | None = None, key: Path | None = None) -> ControlClient:
    """A client with the options every client command shares (also `roam node join`).
    A control plane that requires client certificates gets `cert` and `key`, by default
    $ROAM_CONTROL_CERT and $ROAM_CONTROL_KEY."""
    cert = cert or _env_path("ROAM_CONTROL_CERT")
    key = key or _env_path("ROAM_CONTROL_KEY")
    tls = None
    if ca is not None or cert is not None:
        for path, option in ((ca, "--ca"), (cert, "ROAM_CONTROL_CERT"),
                             (key, "ROAM_CONTROL_KEY")):
            if path is not None and not path.is_file():
                raise typer.BadParameter(f"{path}: no such file", param_hint=option)
        tls = ssl.create_default_context(cafile=None if ca is None else str(ca))
        if cert is not None:
            try:
                tls.load_cert_chain(cert, key)
            except ssl.SSLError as exc:
                raise typer.BadParameter(f"{cert}: no PEM certificate and key ({exc.reason})",
                                         param_hint="ROAM_CONTROL_CERT") from None
    try:
        return ControlClient(control, token, tls)
    except RoamError as exc:
        raise typer.BadParameter(exc.message, param_hint="--control") from None


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _with(control: str, token: str | None, ca: Path | None,
          action: Callable[[ControlClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with client(control, token, ca) as c:
            return await action(c)

    try:
        return run(main())
    except RoamError as exc:
        raise failed(exc) from None


def _out(value: Any, as_json: bool, summary: Callable[[], str]) -> None:
    if as_json:
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json", by_alias=True)
        elif isinstance(value, list):
            value = [v.model_dump(mode="json", by_alias=True) for v in value]
        print_json(value)
    else:
        typer.echo(summary())


# -- serve and tokens -------------------------------------------------------------------


@app.command()
def serve(
    data: Annotated[Path | None, typer.Option(
        help="Directory of the state (SQLite), made mode 0700: one instance on this "
             "machine. Or give --etcd.")] = None,
    etcd: EtcdOption = None,
    etcd_root: EtcdRoot = etcd_store.ROOT,
    etcd_ca: EtcdCa = None,
    etcd_cert: EtcdCert = None,
    etcd_key: EtcdKey = None,
    leader_ttl: Annotated[float, typer.Option(
        help="With --etcd: seconds the leader's lease lives unrenewed, about how long "
             "the others wait for a leader that died.", min=1, max=600)
        ] = etcd_election.TTL,
    listen_on: Annotated[str, typer.Option(
        "--listen", help="HOST:PORT of the API (loopback unless you say otherwise).")]
        = DEFAULT_LISTEN,
    tls_cert: Annotated[Path | None, typer.Option(help="Serve HTTPS with this PEM "
                                                       "certificate.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM key of --tls-cert.")] = None,
    tls_ca: Annotated[Path | None, typer.Option(
        help="Require client certificates signed by this PEM CA (mutual TLS).")] = None,
    node_ttl: Annotated[float, typer.Option(
        help="Seconds a node's lease lives without a heartbeat; then it is lost.",
        min=0.5, max=3600)] = control_serve.TTL,
    verbose: Verbose = False,
) -> None:
    """Serve the control plane's API (docs/CONTROL.md) and run its scheduler until
    SIGINT/SIGTERM. Make a token first: `roam control token create --data DIR`.

    With --etcd (docs/ETCD.md) the state is in an etcd cluster and any number of
    instances serve it: each serves the API, the elected one schedules."""
    setup_logging(verbose)
    if (data is None) == (etcd is None):
        raise typer.BadParameter("give --data DIR or --etcd URL[,URL...] (one of them)")
    endpoints = _etcd_endpoints(etcd)
    etcd_tls = _etcd_tls(etcd_ca, etcd_cert, etcd_key)
    host, _, port_text = listen_on.rpartition(":")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise typer.BadParameter("HOST:PORT", param_hint="--listen")
    if (tls_key or tls_ca) and tls_cert is None:
        raise typer.BadParameter("--tls-key and --tls-ca go with --tls-cert")
    tls = None if tls_cert is None else tls_context(tls_cert, tls_key, tls_ca, server=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if endpoints:
            await etcd_serve.serve(endpoints, host.strip("[]"), int(port_text), stop,
                                   root=etcd_root, tls=tls, etcd_tls=etcd_tls, ttl=node_ttl,
                                   leader_ttl=leader_ttl)
        else:
            assert data is not None
            await control_serve.serve(data.absolute(), host.strip("[]"), int(port_text),
                                      stop, tls=tls, ttl=node_ttl)

    try:
        run(main())
    except OSError as exc:
        raise CommandError(str(exc), listen_on) from None
    except RoamError as exc:
        raise failed(exc) from None


def _etcd_endpoints(etcd: str | None) -> list[str]:
    if etcd is None:
        return []
    endpoints = [url.strip() for url in etcd.split(",") if url.strip()]
    for url in endpoints:
        if not url.startswith(("http://", "https://")):
            raise typer.BadParameter(f"{url!r} is no http:// or https:// URL",
                                     param_hint="--etcd")
    if not endpoints:
        raise typer.BadParameter("no URL", param_hint="--etcd")
    return endpoints


def _etcd_tls(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if key is not None and cert is None:
        raise typer.BadParameter("--etcd-key goes with --etcd-cert")
    if ca is None and cert is None:
        return None
    for path, option in ((ca, "--etcd-ca"), (cert, "--etcd-cert"), (key, "--etcd-key")):
        if path is not None and not path.is_file():
            raise typer.BadParameter(f"{path}: no such file", param_hint=option)
    context = ssl.create_default_context(cafile=None if ca is None else str(ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


@token_app.command("create")
def token_create(
    data: Annotated[Path | None, typer.Option(
        help="The control plane's --data directory (or give --etcd).")] = None,
    etcd: EtcdOption = None,
    etcd_root: EtcdRoot = etcd_store.ROOT,
    etcd_ca: EtcdCa = None,
    etcd_cert: EtcdCert = None,
    etcd_key: EtcdKey = None,
    name: Annotated[str, typer.Option(help="Who or what will hold it.")] = "default",
    as_json: Json = False,
) -> None:
    """Make an API token and print it (only its digest is stored: keep it now)."""
    if (data is None) == (etcd is None):
        raise typer.BadParameter("give --data DIR or --etcd URL[,URL...] (one of them)")
    endpoints = _etcd_endpoints(etcd)
    etcd_tls = _etcd_tls(etcd_ca, etcd_cert, etcd_key)

    async def main() -> str:
        store: Store
        if endpoints:
            store = EtcdStore.open(EtcdClient(endpoints, tls=etcd_tls), etcd_root)
        else:
            assert data is not None
            store = await SqliteStore.open(data.absolute())
        try:
            return await auth.create(Fleet(store), name)
        finally:
            await store.close()

    try:
        token = run(main())
    except RoamError as exc:
        raise failed(exc) from None
    _out({"token": token, "name": name}, as_json, lambda: token)


@app.command()
def status(control: Control = DEFAULT_URL, token: Token = None, ca: Ca = None,
           as_json: Json = False) -> None:
    """Whether the control plane answers, and whether this instance leads."""
    health = _with(control, token, ca, lambda c: c.health())
    if not health.ok:  # its store fails: it serves reads it can, and changes nothing
        if as_json:
            _out(health, as_json, str)
            raise typer.Exit(exits.Exit.FAILED)
        raise failed(RoamError(f"the control plane makes no change: {health.detail}"))
    _out(health, as_json, lambda: f"ok, {'leading' if health.leader else 'following'}, "
                                   f"revision {health.revision}")


# -- VMs --------------------------------------------------------------------------------


def _size_mib(text: str) -> int:
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = units.get(value[-1:], None)
    number = value[:-1] if factor is not None else value
    try:
        mib = int(float(number) * (factor or 1))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is no size (e.g. 512M, 2G)",
                                 param_hint="--memory") from None
    if mib <= 0:
        raise typer.BadParameter("must be above zero", param_hint="--memory")
    return mib


def _vm_line(vm: VMView) -> str:
    where = vm.status.node or "-"
    if vm.status.target:
        where += f" -> {vm.status.target}"
    detail = f"  ({vm.status.detail})" if vm.status.detail else ""
    return f"{vm.name:20} {vm.status.phase.value:10} {where:24} {vm.spec.memory_mib} MiB" \
           + detail


@vm_app.command("create")
def vm_create(
    name: Annotated[str, typer.Argument(help="The VM's name, unique in the fleet.")],
    package: Annotated[Path | None, typer.Option(
        help="A package directory that every node has at this path.")] = None,
    from_: Annotated[str | None, typer.Option(
        "--from", help="A `roam registry serve` address to start from instead.")] = None,
    memory: Annotated[str | None, typer.Option(
        help="Memory to place it by (default: the package's, if readable here).")] = None,
    cpus: Annotated[int | None, typer.Option(help="CPUs to place it by (default: the "
                                                  "package's, else 1).", min=1)] = None,
    publish: Annotated[list[str], typer.Option(
        "--publish", "-p", help="Port forward [ADDR:]HOSTPORT:GUESTPORT[/udp]: on its "
                                "gateway with --gateway, else on its node.")] = [],  # noqa: B006
    gateway: Annotated[str | None, typer.Option(
        help="The --underlay address of its overlay gateway (the node with that address "
             "holds it); the VM keeps its address and connections when it moves.")] = None,
    vni: Annotated[int | None, typer.Option(help="Its overlay segment.")] = None,
    cpu_model: Annotated[str | None, typer.Option(
        help="Run only on nodes of this CPU model.")] = None,
    spread: Annotated[list[str], typer.Option(
        help="Spread over the values of this node label (repeatable), among its "
             "--group.")] = [],  # noqa: B006
    group: Annotated[str | None, typer.Option(help="VMs that spread among each other.")
                     ] = None,
    priority: Annotated[int, typer.Option(
        help="Higher moves first when its node is evacuated or drained (-1000 to 1000).")
    ] = 0,
    sync_to: Annotated[str | None, typer.Option(
        help="s3://BUCKET/PREFIX: its node syncs it there with sealed checkpoints, so an "
             "evacuation that cannot move it in time hibernates it there, and a lost "
             "node's copy restarts elsewhere from the last checkpoint (S3 credentials "
             "and endpoint: the nodes' AWS_* environment).")] = None,
    checkpoint_every: Annotated[float, typer.Option(
        help="Seconds between its sealed checkpoints (with --sync-to).")] = 60.0,
    wait: Wait = True,
    control: Control = DEFAULT_URL, token: Token = None, ca: Ca = None, as_json: Json = False,
) -> None:
    """Create a VM: the scheduler places it and its node starts it."""
    memory_mib = _size_mib(memory) if memory is not None else None
    if package is not None and (memory_mib is None or cpus is None):
        try:
            config = Package.load(package).config
            memory_mib = memory_mib or config.memory_mib
            cpus = cpus or config.cpus
        except (PackageError, OSError) as exc:
            if memory_mib is None:
                raise typer.BadParameter(f"give --memory: {exc}") from None
    if memory_mib is None:
        raise typer.BadParameter("give --memory (the VM's size, for placement)")
    try:
        spec = VMSpec.model_validate({
            "name": name, "package": None if package is None else str(package.absolute()),
            "from": from_, "memory_mib": memory_mib, "cpus": cpus or 1, "publish": publish,
            "gateway": gateway, "vni": vni, "cpu_model": cpu_model, "spread": spread,
            "group": group, "priority": priority, "sync_to": sync_to,
            "checkpoint_every": checkpoint_every})
    except ValidationError as exc:
        raise invalid(exc) from None

    async def create(c: ControlClient) -> VMView:
        created = await c.create(spec)
        return await _until_settled(c, name, unplaced_fails=True) if wait else created

    vm = _with(control, token, ca, create)
    _out(vm, as_json, lambda: _vm_line(vm))
    _exit_for(vm)


async def _until_settled(c: ControlClient, name: str, unplaced_fails: bool = False
                         ) -> VMView:
    """The VM once it runs (or failed, or stopped), with no move pending. With
    `unplaced_fails`, a VM that no node fits ends the wait (it stays pending)."""
    deadline = time.monotonic() + WAIT
    while True:
        vm = await c.vm(name)
        if unplaced_fails and vm.status.phase == VMPhase.PENDING and vm.status.detail:
            raise RoamError(f"{name} stays pending until a node fits it: "
                            f"{vm.status.detail}", code=ErrorCode.CONFLICT)
        if vm.status.target is None and vm.desired.move is None and vm.status.phase in (
                VMPhase.RUNNING, VMPhase.FAILED, VMPhase.STOPPED, VMPhase.IN_DOUBT,
                VMPhase.LOST):
            return vm
        if time.monotonic() > deadline:
            raise RoamError(f"{name} is still {vm.status.phase.value}",
                            code=ErrorCode.TIMEOUT)
        await asyncio.sleep(POLL)


def _exit_for(vm: VMView) -> None:
    if vm.status.phase in (VMPhase.FAILED, VMPhase.IN_DOUBT):
        code = ErrorCode.IN_DOUBT if vm.status.phase == VMPhase.IN_DOUBT else ErrorCode.INTERNAL
        raise failed(RoamError(f"{vm.name} is {vm.status.phase.value}: {vm.status.detail}",
                               code=code))


@vm_app.command("ls")
def vm_ls(control: Control = DEFAULT_URL, token: Token = None, ca: Ca = None,
          as_json: Json = False) -> None:
    """Every VM: phase, node (and target while moving), memory."""
    vms = _with(control, token, ca, lambda c: c.vms())
    _out(vms, as_json, lambda: "\n".join(_vm_line(v) for v in vms) or "no VMs")


@vm_app.command("get")
def vm_get(name: str, control: Control = DEFAULT_URL, token: Token = None, ca: Ca = None,
           as_json: Json = False) -> None:
    """One VM, in full."""
    vm = _with(control, token, ca, lambda c: c.vm(name))
    _out(vm, as_json, lambda: vm.model_dump_json(indent=2, by_alias=True))


@vm_app.command("migrate")
def vm_migrate(
    name: str,
    to: Annotated[str | None, typer.Option(help="The node to move to (default: the "
                                                "scheduler picks).")] = None,
    cheapest: Annotated[bool, typer.Option(help="The cheapest node that fits.")] = False,
    wait: Wait = True,
    control: Control = DEFAULT_URL, token: Token = None, ca: Ca = None, as_json: Json = False,
) -> None:
    """Live-migrate a VM to another node."""
    try:
        request = MoveRequest(to=to, cheapest=cheapest)
    except ValidationError as exc:
        raise typer.BadParameter(str(exc.errors()[0]["msg"]), param_hint="--to") from None

    async def migrate(c: ControlClient) -> VMView:
        before = await c.migrate(name, request)
        if not wait:
            return before
        after = await _until_settled(c, name)
        if after.status.node == before.status.node:
            raise RoamError(f"{name} did not move: {after.status.detail or 'no reason'}",
                            code=ErrorCode.CONFLICT)
        return after

    vm = _with(control, token, ca, migrate)
    _out(vm, as_json, lambda: _vm_line(vm))


def _vm_action(verb: str, doc: str) -> None:
    def command(name: str, control: Control = DEFAULT_URL, token: Token = None,
                ca: Ca = None, as_json: Json = False) -> None:
        vm = _with(control, token, ca, lambda c: getattr(c, verb)(name))
        _out(vm, as_json, lambda: _vm_line(vm))
    command.__doc__ = doc
    vm_app.command(verb)(command)


_vm_action("stop", "Stop a VM (its memory is discarded; start runs its package again).")
_vm_action("start", "Start a stopped or failed VM again (the scheduler places it).")
_vm_action("delete", "Stop a VM and forget it.")


# -- nodes ------------------------------------------------------------------------------


def _node_line(node: NodeView) -> str:
    labels = ",".join(f"{k}={v}" for k, v in sorted(node.registration.labels.items()))
    return (f"{node.name:16} {node.state.value:9} {len(node.vms):3} VMs "
            f"{node.memory_used_mib:6} MiB used  {node.registration.cpu.model[:30]:30} "
            f"{labels}")


@node_app.command("ls")
def node_ls(control: Control = DEFAULT_URL, token: Token = None, ca: Ca = None,
            as_json: Json = False) -> None:
    """Every node: state, VMs, memory in use, CPU model, labels."""
    found = _with(control, token, ca, lambda c: c.nodes())
    _out(found, as_json, lambda: "\n".join(_node_line(n) for n in found) or "no nodes")


@node_app.command("cordon")
def node_cordon(name: str, control: Control = DEFAULT_URL, token: Token = None,
                ca: Ca = None, as_json: Json = False) -> None:
    """Place no new VM on the node (its VMs stay)."""
    node = _with(control, token, ca, lambda c: c.cordon(name))
    _out(node, as_json, lambda: _node_line(node))


@node_app.command("uncordon")
def node_uncordon(name: str, control: Control = DEFAULT_URL, token: Token = None,
                  ca: Ca = None, as_json: Json = False) -> None:
    """Place VMs on the node again (ends its drain; moves under way finish)."""
    node = _with(control, token, ca, lambda c: c.cordon(name, False))
    _out(node, as_json, lambda: _node_line(node))


@node_app.command("drain")
def node_drain(
    name: str,
    max_parallel: Annotated[int, typer.Option(help="Migrations at once.", min=1, max=64)]
        = 2,
    wait: Wait = True,
    control: Control = DEFAULT_URL, token: Token = None, ca: Ca = None, as_json: Json = False,
) -> None:
    """Cordon the node and live-migrate every VM off it; waits until it is empty."""
    async def drain(c: ControlClient) -> NodeView:
        node = await c.drain(name, max_parallel)
        deadline = time.monotonic() + WAIT
        while wait and (node.vms or node.draining is not None):
            if time.monotonic() > deadline:
                raise RoamError(f"{name} still holds {', '.join(node.vms)}",
                                code=ErrorCode.TIMEOUT)
            if node.state == NodeState.LOST:
                raise RoamError(f"{name} is lost; its VMs stay there",
                                code=ErrorCode.CONFLICT)
            await asyncio.sleep(POLL)
            node = await c.node(name)
        return node

    node = _with(control, token, ca, drain)
    _out(node, as_json, lambda: _node_line(node))


def _seconds(text: str) -> float:
    """30s, 2m, 90 (seconds)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in ("s", "m") else (text, "s")
    try:
        value = float(number) * (60 if unit == "m" else 1)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise typer.BadParameter(f"{text!r}: give a time up to an hour, as 30s, 2m or 90",
                                 param_hint="--deadline")
    return value


def _notice_line(record: NoticeRecord) -> str:
    left = record.deadline - time.time()
    head = (f"{record.node}: {record.cloud.value} {record.action.value}, deadline in "
            f"{left:.0f} s" if left > 0 else f"{record.node}: deadline passed")
    lines = [head + (f"; {summary(record)}" if record.finished else "")]
    for name in order(record):
        vm = record.vms[name]
        margin = "" if vm.margin_ms is None else f", margin {vm.margin_ms / 1000:.1f} s"
        where = f" to {vm.to}" if vm.to else ""
        lines.append(f"  {name:20} {vm.state.value:10}{where}{margin}"
                     + (f"  ({vm.detail})" if vm.detail else ""))
    return "\n".join(lines)


@node_app.command("notice")
def node_notice(
    name: str,
    deadline: Annotated[str, typer.Option(
        help="When the node goes: 30s, 2m, 90 (seconds from now).")] = "30s",
    max_parallel: Annotated[int, typer.Option(help="Migrations at once.", min=1, max=64)]
        = 2,
    wait: Wait = True,
    control: Control = DEFAULT_URL, token: Token = None, ca: Ca = None, as_json: Json = False,
) -> None:
    """Give the node a spot notice, as its cloud would: it is cordoned and every VM on it
    moves elsewhere before the deadline, highest priority first. Waits until the
    evacuation is over (exit code: internal if a VM was lost)."""
    seconds = _seconds(deadline)

    async def give(c: ControlClient) -> NoticeRecord:
        record = await c.give_notice(name, NoticeRequest(deadline_seconds=seconds,
                                                         max_parallel=max_parallel))
        while wait and record.finished is None:
            await asyncio.sleep(POLL)
            record = await c.notice(name)
        return record

    record = _with(control, token, ca, give)
    _out(record, as_json, lambda: _notice_line(record))
    if record.lost:
        raise failed(RoamError(f"lost {', '.join(record.lost)} from {name}",
                               code=ErrorCode.INTERNAL))


# -- events -----------------------------------------------------------------------------


@app.command()
def events(control: Control = DEFAULT_URL, token: Token = None, ca: Ca = None,
           as_json: Json = False) -> None:
    """Print the fleet's events until interrupted: a snapshot, then every change of a
    node or VM, the control plane's decisions, and the nodes' peer events (migration
    progress and outcomes). With --json, one JSON object per line."""
    async def follow(c: ControlClient) -> None:
        async with c.events() as stream:
            async for event in stream:
                typer.echo(event.model_dump_json(by_alias=True) if as_json
                           else _event_line(event))

    with contextlib.suppress(KeyboardInterrupt):
        _with(control, token, ca, follow)


def _event_line(event: FleetEvent) -> str:
    when = time.strftime("%H:%M:%S")
    if isinstance(event, FleetSnapshot):
        return f"{when} fleet: {len(event.nodes)} nodes, {len(event.vms)} VMs"
    if isinstance(event, NodeChanged):
        return f"{when} node {event.node.name}: {event.node.state.value}"
    if isinstance(event, VMChanged):
        return f"{when} vm {_vm_line(event.vm)}"
    if isinstance(event, VMRemoved):
        return f"{when} vm {event.name} removed"
    if isinstance(event, ControlEvent):
        return " ".join(part for part in (
            when, event.kind.value, event.vm and f"vm={event.vm}",
            event.node and f"node={event.node}", event.to and f"to={event.to}",
            event.margin_ms is not None and f"margin={event.margin_ms / 1000:.1f}s",
            event.detail and f"({event.detail})") if part)
    inner = event.event
    if isinstance(inner, ProgressEvent):
        return (f"{when} {event.node}: {inner.vm} {inner.phase} {inner.cycle} "
                f"{inner.bytes_sent >> 20} of {inner.bytes_expected >> 20} MiB")
    if isinstance(inner, OutcomeEvent):
        return (f"{when} {event.node}: {inner.vm} -> {inner.to} {inner.outcome}"
                + (f", downtime {inner.downtime_ms:.0f} ms" if inner.downtime_ms else "")
                + (f" ({inner.code}: {inner.detail})" if inner.code else ""))
    return f"{when} {event.node}: {inner.type}"
