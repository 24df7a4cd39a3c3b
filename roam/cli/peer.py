"""`roam peer ...` and `roam migrate`: run VMs on a host and move them between hosts.

Every command that talks to a peer goes through its HTTP API (roam.peer.client) and exits
with the code its error's code calls for (roam.cli.exits).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from roam.cli import exits, listing
from roam.cli.common import (
    CommandError,
    Json,
    TlsCa,
    TlsCert,
    TlsKey,
    Verbose,
    address,
    failed,
    invalid,
    require_root,
    run,
    serving,
    setup_logging,
    stop_on_signals,
    tls_files,
    unless_stopped,
)
from roam.errors import RoamError
from roam.migration.channel import Channel, connect
from roam.migration.errors import MigrationError
from roam.peer import mounter, registry, systemd, terminator
from roam.peer import serve as peer
from roam.peer.client import PeerClient
from roam.peer.models import (
    GatewayRequest,
    GcRequest,
    HibernateRequest,
    MigrateRequest,
    MigrateResult,
    MirrorRequest,
    ProgressEvent,
    PromoteRequest,
    RestoreRequest,
    RunRequest,
    SyncRequest,
)
from roam.peer.network import PEER_POOL, NetConfig
from roam.peer.terminator import Backup
from roam.vm.package import Package, PackageError

log = logging.getLogger("roam.peer")
app = typer.Typer(help="Run VMs under a per-host peer and receive migrations.",
                  no_args_is_help=True, epilog=exits.TABLE)

Via = Annotated[str, typer.Option(
    "--via", envvar="ROAM_PEER",
    help="The peer's state directory or API socket (default: $ROAM_PEER).")]

Underlay = Annotated[str | None, typer.Option(
    help="This host's address for the overlay (VXLAN between peers). Needed to run VMs "
         "that keep their connections across migrations, or their gateways.")]
OverlayPeers = Annotated[str, typer.Option(
    help="Comma-separated --underlay addresses of every peer of the overlay (broadcasts "
         "are replicated to them).")]
NetPrefix = Annotated[str | None, typer.Option(
    help="Prefix of the namespaces, links and nft tables this peer creates (default: "
         "derived from --state-dir; names are machine-wide).")]
NetPool = Annotated[str, typer.Option(
    help="IPv4 range for the links between this host and its VMs' namespaces (one /30 "
         "per VM); peers sharing a network namespace need different ones.")]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def _with_peer(via: str, action: Callable[[PeerClient], Awaitable[T]]) -> T:
    """Run `action` with a client of the peer at `via`; its errors become exit codes."""
    async def main() -> T:
        async with PeerClient(via) as client:
            return await action(client)

    try:
        return run(main())
    except RoamError as exc:
        raise failed(exc) from None


def _request(model: type[M], **fields: Any) -> M:
    """A request from options; what the API would refuse is a usage error here."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise invalid(exc) from None


def _print(result: Any) -> None:
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json")
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def serve(
    listen_on: Annotated[str, typer.Option(
        "--listen", help="tcp://HOST:PORT or unix://PATH for incoming migrations.")],
    state_dir: Annotated[Path, typer.Option(
        help="This peer's directory: API socket (peer.sock) and one subdirectory per VM. "
             "Keep it short (UNIX socket paths are limited to 107 bytes).")],
    tls_cert: TlsCert = None, tls_key: TlsKey = None, tls_ca: TlsCa = None,
    api_listen: Annotated[str | None, typer.Option(
        help="Also serve the API on tcp://HOST:PORT, with mutual TLS (needs the --tls "
             "options: clients must present a certificate signed by --tls-ca).")] = None,
    underlay: Underlay = None,
    overlay_peers: OverlayPeers = "",
    net_prefix: NetPrefix = None,
    net_pool: NetPool = PEER_POOL,
    package: Annotated[list[Path] | None, typer.Option(
        help="A package directory this peer holds (repeatable): a VM made from it "
             "migrating here gets only what differs from its files. Packages the peer "
             "runs VMs from are held too.")] = None,
    verbose: Verbose = False,
) -> None:
    """Serve this host until SIGINT/SIGTERM (which stops its VMs).

    Its HTTP API (docs/API.md) is on STATE_DIR/peer.sock, e.g. `curl --unix-socket
    STATE_DIR/peer.sock http://peer/vms`. Each VM gets a network namespace with a tap: NAT
    and its --publish ports on this host, or, started with --gateway, a place on its
    overlay segment (it keeps its address and connections when it moves). With the --tls
    options, migrations in and out use mutual TLS: the other peer must present a
    certificate signed by --tls-ca, and this peer presents --tls-cert."""
    setup_logging(verbose)
    require_root("roam peer serve", "its VMs get network namespaces and FUSE mounts")
    addr = address(listen_on)
    tls = tls_files(tls_cert, tls_key, tls_ca)
    api_addr = address(api_listen) if api_listen else None
    if api_addr is not None and (api_addr.scheme != "tcp" or tls is None):
        raise typer.BadParameter("--api-listen takes tcp://HOST:PORT and needs the --tls "
                                 "options (the TCP API always uses mutual TLS)")
    directory = state_dir.absolute()
    netconf = net_config(directory, underlay, overlay_peers, net_prefix, net_pool)
    held = [p.absolute() for p in package or []]
    for given in held:
        try:
            Package.load(given)
        except PackageError as exc:
            raise typer.BadParameter(f"--package: {exc}") from None

    async def main() -> None:
        stop = stop_on_signals()
        await peer.Peer(directory, addr, tls, netconf, api_addr, held).serve(stop)

    run(main())  # errors: one line each (roam.cli.main)


@app.command(context_settings={"allow_extra_args": True,
                                "ignore_unknown_options": True})
def unit(
    ctx: typer.Context,
    listen_on: Annotated[str, typer.Option(
        "--listen", help="The peer's --listen address.")] = "tcp://127.0.0.1:7200",
    state_dir: Annotated[Path, typer.Option(
        help="The peer's --state-dir (systemd creates /var/lib/roam, mode 0700).")]
        = Path("/var/lib/roam/peer"),
) -> None:
    """Print a systemd unit that runs `roam peer serve` with these options and any
    others given after them (`roam peer unit --listen tcp://10.0.0.5:7200 --
    --underlay 10.0.0.5 > /etc/systemd/system/roam-peer.service`).

    Type=notify: the peer tells systemd when it serves (READY=1) and when it stops
    (STOPPING=1). SIGTERM stops its VMs; a peer that died is restarted and cleans up
    after itself. Check it with `systemd-analyze verify FILE`."""
    address(listen_on, "--listen")
    typer.echo(systemd.unit(["--listen", listen_on, "--state-dir", str(state_dir.absolute()),
                             *ctx.args]), nl=False)


def net_config(directory: Path, underlay: str | None, overlay_peers: str,
               net_prefix: str | None, net_pool: str) -> NetConfig:
    """A peer's network settings from its options (`roam peer serve`, `roam node join`)."""
    try:
        ipaddress.IPv4Network(net_pool)
        return NetConfig(
            directory=directory / "net",
            prefix=net_prefix or NetConfig.default_prefix(directory), pool=net_pool,
            underlay=str(ipaddress.IPv4Address(underlay)) if underlay else None,
            overlay_peers=[str(ipaddress.IPv4Address(a)) for a in overlay_peers.split(",")
                           if a])
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("run")
def run_vm(
    name: Annotated[str, typer.Option(help="VM name, unique on the peer.")],
    via: Via,
    package: Annotated[Path | None, typer.Argument(
        help="Package directory (never changed).")] = None,
    from_: Annotated[str | None, typer.Option(
        "--from", help="Start lazily from `roam registry serve` at this address instead "
                       "of a local package; or, with s3://BUCKET/PREFIX/NAME, restore "
                       "the VM from its newest sealed sync point there (after a host "
                       "loss or `roam peer hibernate`) under a new epoch.")] = None,
    publish: Annotated[list[str], typer.Option(
        "--publish", "-p", help="Port forward HOSTPORT:GUESTPORT or ADDR:HOSTPORT:GUESTPORT "
                                "on the host where the VM runs (set up again on each host "
                                "it moves to).")] = [],  # noqa: B006
    gateway: Annotated[str | None, typer.Option(
        help="Put the VM on overlay segment --vni, whose gateway (`roam peer gateway`) "
             "runs on the peer with this --underlay address: its address and connections "
             "then survive migrations.")] = None,
    vni: Annotated[int | None, typer.Option(help="The VM's overlay segment.")] = None,
    sync_to: Annotated[str | None, typer.Option(
        help="Sync the VM continuously to s3://BUCKET/PREFIX (it lands in PREFIX/NAME; "
             "see `roam peer sync`). A bucket that refuses the peer's credentials starts "
             "no VM.")] = None,
    endpoint_url: EndpointUrl = None,
) -> None:
    """Resume PACKAGE (or the registry's package) as a VM on the peer; returns once it
    runs."""
    if from_ is not None and from_.startswith("s3://"):
        if package is not None or sync_to is not None or gateway is not None:
            raise typer.BadParameter("a restore from a bucket takes no package, "
                                     "--sync-to or overlay")
        restore = _request(RestoreRequest, name=name, publish=publish,
                           endpoint_url=endpoint_url, **{"from": from_})
        _print(_with_peer(via, lambda p: p.restore(restore)))
        return
    sync = None if sync_to is None else {"to": sync_to, "endpoint_url": endpoint_url}
    request = _request(RunRequest, name=name, publish=publish, gateway=gateway, vni=vni,
                       package=str(package.absolute()) if package else None,
                       sync=sync, **{"from": from_})
    _print(_with_peer(via, lambda p: p.run(request)))


EndpointUrl = Annotated[str | None, typer.Option(
    help="The S3 endpoint, e.g. http://127.0.0.1:9000 for MinIO (default: the peer's "
         "AWS_ENDPOINT_URL, else AWS). Credentials are the peer's AWS_ACCESS_KEY_ID and "
         "AWS_SECRET_ACCESS_KEY.")]


@app.command("sync")
def sync_cmd(
    name: Annotated[str, typer.Argument(help="A VM running on the peer.")],
    via: Via,
    to: Annotated[str | None, typer.Option(
        help="Start syncing to s3://BUCKET/PREFIX (the VM lands in PREFIX/NAME; VMs "
             "under one PREFIX share their objects).")] = None,
    endpoint_url: EndpointUrl = None,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the VM's sync.")] = False,
    gc: Annotated[bool, typer.Option(
        "--gc", help="Delete the VM's sync points but the newest --keep, then every "
                     "object under PREFIX that no sync point names.")] = False,
    check_period: Annotated[float, typer.Option(
        help="Seconds between collections of what changed.")] = 1.0,
    max_age: Annotated[float, typer.Option(
        help="Seconds a changed chunk may wait before it goes up.")] = 5.0,
    min_changes: Annotated[int, typer.Option(
        help="Changed blocks that send a chunk up before --max-age.")] = 16,
    limit: Annotated[int, typer.Option(help="Chunks uploaded per check.")] = 256,
    concurrency: Annotated[int, typer.Option(help="Uploads at once.")] = 8,
    keep: Annotated[int, typer.Option(help="Sync points kept.")] = 3,
    checkpoint_every: Annotated[float | None, typer.Option(
        help="Seconds between sealed sync points: the VM pauses while what changed goes "
             "up, and the point is memory, disk and device state of one instant (`roam "
             "peer run --from` restores from the newest).")] = None,
    grace: Annotated[float, typer.Option(
        help="With --gc: seconds an unnamed object is spared (another VM's sync may be "
             "about to name it).")] = 600.0,
) -> None:
    """Sync a running VM continuously to an S3 bucket (AWS S3, MinIO, R2...), stop it, or
    collect its garbage. Chunks of 1 MiB go up encrypted (the key is STATE_DIR/sync.key),
    a sync point after each round of uploads; `roam peer ls` shows the lag. A VM that
    syncs moves with `roam migrate` taking what the bucket holds from there."""
    if sum((to is not None, stop, gc)) != 1:
        raise typer.BadParameter("give one of --to, --stop and --gc")
    if stop:
        _with_peer(via, lambda p: p.sync_stop(name))
        return
    if gc:
        gc_request = _request(GcRequest, keep=keep, grace=grace)
        _print(_with_peer(via, lambda p: p.sync_gc(name, gc_request)))
        return
    request = _request(SyncRequest, to=to, endpoint_url=endpoint_url,
                       check_period=check_period, max_age=max_age, min_changes=min_changes,
                       limit=limit, concurrency=concurrency, keep=keep,
                       checkpoint_every=checkpoint_every)
    _print(_with_peer(via, lambda p: p.sync(name, request)))


@app.command("hibernate")
def hibernate_cmd(
    name: Annotated[str, typer.Argument(help="A VM running on the peer.")],
    via: Via,
    to: Annotated[str, typer.Option(
        help="s3://BUCKET/PREFIX (the VM lands in PREFIX/NAME); a VM that does not sync "
             "there yet first uploads everything.")],
    endpoint_url: EndpointUrl = None,
) -> None:
    """Seal a final consistent point of the VM in a bucket and stop it; `roam peer run
    --from s3://BUCKET/PREFIX/NAME` resumes it, here or on another peer."""
    request = _request(HibernateRequest, to=to, endpoint_url=endpoint_url)
    _print(_with_peer(via, lambda p: p.hibernate(name, request)))


@app.command("mirror")
def mirror_cmd(
    name: Annotated[str, typer.Argument(help="A VM running on the peer.")],
    via: Via,
    to: Annotated[str | None, typer.Option(
        help="The standby peer's --listen address: it keeps a copy of the VM's devices "
             "(never runs it).")] = None,
    stop: Annotated[bool, typer.Option(
        "--stop", help="End the VM's mirror (on either end; the standby's copy stays).")
    ] = False,
    check_period: Annotated[float, typer.Option(
        help="Seconds between sends of what changed.")] = 1.0,
    checkpoint_every: Annotated[float | None, typer.Option(
        help="Seconds between consistent checkpoints: the VM pauses while its changes "
             "are read (`peer ls` shows the pause), the standby seals them as a package. "
             "Without it the standby has a warm copy but no point to restore from.")
    ] = None,
) -> None:
    """Keep a warm copy of a running VM on another peer, over the migration protocol.
    `roam migrate` to that peer later sends only what changed since the last checkpoint;
    `roam peer promote` there runs the VM from it if this peer is lost."""
    if (to is None) == (not stop):
        raise typer.BadParameter("give one of --to and --stop")
    if stop:
        _with_peer(via, lambda p: p.mirror_stop(name))
        return
    request = _request(MirrorRequest, to=to, check_period=check_period,
                       checkpoint_every=checkpoint_every)
    _print(_with_peer(via, lambda p: p.mirror(name, request)))


@app.command("promote")
def promote_cmd(
    name: Annotated[str, typer.Argument(help="A VM this peer keeps a standby mirror of.")],
    via: Via,
    publish: Annotated[list[str] | None, typer.Option(
        help="[ADDR:]HOSTPORT:GUESTPORT[/udp] to forward here.")] = None,
) -> None:
    """Run a standby mirror's VM from its newest checkpoint (its source is lost), under
    a new authority epoch: from then on this peer refuses the old copy."""
    request = _request(PromoteRequest, publish=publish or [])
    _print(_with_peer(via, lambda p: p.promote(name, request)))


@app.command("gateway")
def gateway_cmd(
    name: Annotated[str, typer.Argument(help="The VM whose gateway this is.")],
    via: Via,
    vni: Annotated[int | None, typer.Option(
        help="The VM's overlay segment (1 to 16777215).", min=1, max=2**24 - 1)] = None,
    publish: Annotated[list[str], typer.Option(
        "--publish", "-p", help="Port forward [ADDR:]HOSTPORT:GUESTPORT[/udp] on this host "
                                "to the VM, wherever it runs.")] = [],  # noqa: B006
    remove: Annotated[bool, typer.Option(help="Remove the gateway instead.")] = False,
) -> None:
    """Make this peer the gateway of overlay VM NAME: its stable address (--publish) and
    the source address of its outbound connections, wherever on the overlay it runs.
    Then start the VM on any peer of the overlay with `roam peer run --gateway ADDR --vni
    N`, ADDR being this peer's --underlay address."""
    if remove:
        _with_peer(via, lambda p: p.remove_gateway(name))
        return
    if vni is None:
        raise typer.BadParameter("give --vni (or --remove)")
    request = _request(GatewayRequest, name=name, vni=vni, publish=publish)
    _print(_with_peer(via, lambda p: p.add_gateway(request)))


@app.command()
def ls(via: Via, json: Json = False) -> None:
    """The peer's VMs (state, uptime, memory, CPUs, dirty rate during a migration out,
    sync lag: bytes not uploaded yet and how long the oldest has waited, accelerator,
    ports, worker pid) and its gateways; --json: {"vms": [...],
    "gateways": [...]}, the API's objects with `uptime_s`."""
    async def both(p: PeerClient) -> dict[str, Any]:
        return {"vms": listing.with_uptime([vm.model_dump(mode="json")
                                            for vm in await p.vms()]),
                "gateways": [g.model_dump(mode="json") for g in await p.gateways()]}

    found = _with_peer(via, both)
    if json:
        _print(found)
        return
    console = Console()
    console.print(listing.table(found["vms"], states=True))
    if found["gateways"]:
        gateways = Table("GATEWAY OF", "SEGMENT", "NETNS", "PUBLISH")
        for g in found["gateways"]:
            gateways.add_row(g["name"], str(g["vni"]), g["netns"], ", ".join(
                f"{p['host_addr']}:{p['host_port']}->{p['guest_port']}/{p['protocol']}"
                for p in g["publish"]))
        console.print(gateways)


@app.command()
def info(via: Via) -> None:
    """The peer itself: version, addresses, capacity, accelerator, CPU model."""
    _print(_with_peer(via, lambda p: p.peer()))


@app.command()
def events(via: Via) -> None:
    """Print the peer's events (docs/API.md) as JSON lines until interrupted: a snapshot
    of every VM, then state changes, migration progress and outcomes."""
    async def follow(p: PeerClient) -> None:
        async with p.events() as stream:
            async for event in stream:
                typer.echo(event.model_dump_json())

    with contextlib.suppress(KeyboardInterrupt):
        _with_peer(via, follow)


@app.command("exec")
def exec_(name: str, argv: list[str], via: Via,
          timeout: Annotated[float, typer.Option(help="Seconds.")] = 30.0) -> None:
    """Run a command in a VM of the peer; prints its output, exits with its code (124 if
    it timed out)."""
    result = _with_peer(via, lambda p: p.exec(name, argv, timeout))
    typer.echo(result.stdout, nl=False)
    typer.echo(result.stderr, nl=False, err=True)
    raise typer.Exit(exits.Exit.TIMEOUT if result.exit_code is None else result.exit_code)


@app.command()
def stop(name: str, via: Via) -> None:
    """Stop a VM of the peer, discarding it."""
    _with_peer(via, lambda p: p.stop(name))


@app.command()
def resume(name: str, via: Via) -> None:
    """Resume a VM left paused by a migration in doubt (exit code 4 of `roam migrate`).
    Only once you know that the destination does not run it: else `roam peer stop`."""
    _with_peer(via, lambda p: p.resume(name))


def migrate(
    name: Annotated[str, typer.Argument(help="VM to move.")],
    to: Annotated[str, typer.Option(help="The destination peer's --listen address.")],
    via: Via,
    postcopy: Annotated[bool, typer.Option(
        help="Resume on the destination before the last dirty blocks arrived.")] = True,
    pause_send_kib: Annotated[int, typer.Option(
        help="With post-copy, a final dirty set of at most this many KiB is still sent "
             "inside the pause (the resumed guest then never waits for it); 0 streams "
             "every final block after the resume.")] = 2048,
    max_cycles: Annotated[int, typer.Option(help="Dirty cycles before the handover.")] = 20,
    min_cycles: Annotated[int, typer.Option(help="Dirty cycles at least.")] = 1,
    max_dirty_blocks: Annotated[int, typer.Option(
        help="Hand over once a cycle finds at most this many dirty 64 KiB blocks.")] = 256,
    cycle_throttle: Annotated[float, typer.Option(help="Seconds between cycles.")] = 0.0,
    compress: Annotated[str, typer.Option(help="none, zstd or lz4.")] = "none",
    verify: Annotated[bool, typer.Option(
        help="Compare every block's hash at the end.")] = False,
    check_memory: Annotated[bool, typer.Option(
        help="The destination compares its whole memory with the source's before it "
             "resumes, declining if they differ (adds a full read to the downtime; use "
             "with --no-postcopy).")] = False,
    json: Json = False,
) -> None:
    """Live-migrate VM NAME from the peer at --via to the peer listening at --to.

    Prints the outcome (downtime, bytes, cycles, time; --json: the API's result object);
    on a terminal, shows the progress of each dirty cycle meanwhile. Migrating into `roam
    terminate` or `roam mount --listen` (a live backup) ends "declined" on purpose and
    exits 0.
    """
    request = _request(MigrateRequest, to=to, postcopy=postcopy,
                       pause_send_kib=pause_send_kib, max_cycles=max_cycles,
                       min_cycles=min_cycles, max_dirty_blocks=max_dirty_blocks,
                       cycle_throttle=cycle_throttle, compression=compress, verify=verify,
                       check_memory=check_memory)
    result = _with_peer(via, lambda p: _migrate(p, name, request, sys.stderr.isatty()))
    if json:
        _print(result)
        return
    typer.echo(f"{name}: {result.outcome} in {result.total_ms / 1000:.1f} s, downtime "
               f"{result.downtime_ms:.1f} ms, {result.bytes_sent / 2**20:.1f} MiB sent, "
               f"{result.cycles} dirty cycles")


async def _migrate(client: PeerClient, name: str, request: MigrateRequest,
                   show: bool) -> MigrateResult:
    """The migration, with a progress bar from the peer's progress events if `show`."""
    if not show:
        return await client.migrate(name, request)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TextColumn("dirtying {task.fields[dirty]}/s"), TimeElapsedColumn())
    async with client.events() as stream:
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"{name}: starting", total=None, dirty="-")

            async def follow() -> None:
                async for event in stream:
                    if isinstance(event, ProgressEvent) and event.vm == name:
                        # The first pass counts zero blocks whole: its total is far above
                        # what goes on the wire, so show no total until the cycles.
                        bar.update(task, completed=event.bytes_sent,
                                   total=None if event.phase == "copy" else event.bytes_expected,
                                   description=f"{name}: {event.phase} {event.cycle}",
                                   dirty=f"{event.dirty_rate / 2**20:.1f} MiB")

            following = asyncio.create_task(follow())
            try:
                return await client.migrate(name, request)
            finally:
                following.cancel()  # before the stream it reads is closed
                with contextlib.suppress(asyncio.CancelledError):
                    await following


def terminate(
    listen_on: Annotated[str, typer.Option(
        "--listen", help="tcp://HOST:PORT or unix://PATH to take the migration on.")],
    out: Annotated[Path, typer.Option(help="Package directory to write.")],
    tls_cert: TlsCert = None, tls_key: TlsKey = None, tls_ca: TlsCa = None,
    json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Take one live migration into a package directory without starting the VM (a live
    backup): `roam migrate NAME --to` this address; the VM runs on at its source.

    With the --tls options the source peer must present a certificate signed by
    --tls-ca (peers started with --tls-* do), and this side presents --tls-cert.
    SIGINT or SIGTERM before the backup is written ends it (exit 1; the VM runs on)."""
    setup_logging(verbose)
    addr = address(listen_on)
    tls = tls_files(tls_cert, tls_key, tls_ca)

    async def main() -> Backup | None:
        stop = stop_on_signals()
        done: asyncio.Future[Backup] = asyncio.get_running_loop().create_future()
        taking: list[asyncio.Task[Any]] = []

        async def handler(channel: Channel) -> None:
            if taking:
                return  # one migration per terminator
            task = asyncio.current_task()
            assert task is not None
            taking.append(task)
            try:
                backup = await terminator.terminate(channel, out)
            except Exception as exc:
                if not done.done():
                    done.set_exception(exc)
            else:
                if not done.done():
                    done.set_result(backup)

        async with serving(addr, handler, tls):
            backup = await unless_stopped(done, stop)
            for task in taking:  # stopped halfway: the source keeps its VM
                task.cancel()
            await asyncio.gather(*taking, return_exceptions=True)
            return backup

    backup = run(main())
    if backup is None:
        raise CommandError("stopped by a signal before a backup was written", out)
    if json:
        _print(asdict(backup))
        return
    typer.echo(f"live backup of {backup.name} in {backup.directory}: "
               f"{backup.bytes_received / 2**20:.1f} MiB received in {backup.seconds:.1f} s")


registry_app = typer.Typer(help="Serve packages for lazy starts.", no_args_is_help=True)


@registry_app.command("serve")
def registry_serve(
    package: Annotated[Path, typer.Argument(help="Package directory (only read).")],
    listen_on: Annotated[str, typer.Option(
        "--listen", help="tcp://HOST:PORT or unix://PATH.")],
    tls_cert: TlsCert = None, tls_key: TlsKey = None, tls_ca: TlsCa = None,
    verbose: Verbose = False,
) -> None:
    """Serve PACKAGE to every `roam peer run --from` / `roam run --from` until SIGINT.

    With the --tls options, clients must present a certificate signed by --tls-ca (peers
    started with --tls-* do)."""
    setup_logging(verbose)
    addr = address(listen_on)
    tls = tls_files(tls_cert, tls_key, tls_ca)
    Package.load(package)  # a PackageError is the one error line, before serving

    async def main() -> None:
        async def handler(channel: Channel) -> None:
            try:
                result = await registry.serve_package(package, channel)
            except MigrationError as exc:
                log.warning("a lazy start failed: %s", exc)
                return
            log.info("served %s: %d MiB in %.1f s, %d blocks on demand", package,
                     result.bytes_sent >> 20, result.total_seconds, result.priority_blocks)

        stop = stop_on_signals()
        async with serving(addr, handler, tls):
            log.info("serving %s on %s%s", package, addr, " (mutual TLS)" if tls else "")
            await stop.wait()

    run(main())  # errors: one line each (roam.cli.main)


def mount(
    device: Annotated[str, typer.Argument(help="Device to mount: memory, disk, state, ...")],
    from_: Annotated[str | None, typer.Option(
        "--from", help="A `roam registry serve` address to mount from.")] = None,
    listen_on: Annotated[str | None, typer.Option(
        "--listen", help="Instead, take `roam migrate NAME --to` this address: mounts the "
                         "VM's device as at its pause; the VM runs on.")] = None,
    file: Annotated[Path | None, typer.Option(
        help="FUSE directory in which the device appears as a file.")] = None,
    nbd: Annotated[Path | None, typer.Option(
        help="UNIX socket on which the device is an NBD export named DEVICE.")] = None,
    cache: Annotated[Path | None, typer.Option(
        help="Directory for the blocks received (default: a temporary one).")] = None,
    tls_cert: TlsCert = None, tls_key: TlsKey = None, tls_ca: TlsCa = None,
    verbose: Verbose = False,
) -> None:
    """Mount a device of a remote package or VM locally, without a VM, until SIGINT or
    SIGTERM.

    With the --tls options, mutual TLS: the registry (--from) or the source peer
    (--listen) must present a certificate signed by --tls-ca, and this side presents
    --tls-cert."""
    setup_logging(verbose)
    if (from_ is None) == (listen_on is None) or (file is None) == (nbd is None):
        raise typer.BadParameter("give one of --from/--listen and one of --file/--nbd")
    tls = tls_files(tls_cert, tls_key, tls_ca)
    if file is not None:
        require_root("roam mount --file", "the device is served on a FUSE mount")

    async def main(cache_dir: Path) -> None:
        stop = stop_on_signals()
        if from_ is not None:
            channel: Channel = await connect(address(from_), tls)
            await mounter.mount(channel, device, cache_dir, stop, fuse_dir=file, nbd_socket=nbd)
            return
        assert listen_on is not None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        taken = asyncio.Event()

        async def handler(incoming: Channel) -> None:
            if taken.is_set():
                return
            taken.set()
            try:
                await mounter.mount(incoming, device, cache_dir, stop, fuse_dir=file,
                                    nbd_socket=nbd)
                done.set_result(None)
            except Exception as exc:
                done.set_exception(exc)

        async with serving(address(listen_on), handler, tls):
            await unless_stopped(taken.wait(), stop)
            if not taken.is_set():
                log.info("stopped before a migration arrived")
                return
        await done  # the mount ends on `stop` by itself

    with tempfile.TemporaryDirectory(prefix="roam-mount-") as tmp:
        run(main(cache or Path(tmp)))
