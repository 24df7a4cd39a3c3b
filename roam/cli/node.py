"""`roam node join`: run this host's peer and put it under a control plane.

The peer is the one `roam peer serve` runs (roam.peer.serve), in the same process; the
node agent (roam.control.agent) talks to it through its API socket and to the control
plane through its HTTP API, pulling its work with every heartbeat.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Annotated

import typer
from prometheus_client import REGISTRY
from pydantic import ValidationError

from roam.cli import control as control_cli
from roam.cli.common import (
    TlsCa,
    TlsCert,
    TlsKey,
    Verbose,
    address,
    failed,
    invalid,
    require_root,
    run,
    setup_logging,
    stop_on_signals,
    tls_files,
)
from roam.cli.peer import NetPool, NetPrefix, OverlayPeers, Underlay, net_config
from roam.cli.spot import CloudOption, MetadataOption
from roam.control.agent import NodeAgent
from roam.control.metrics import serve_registry
from roam.control.models import Registration
from roam.control.serve import listen_socket
from roam.errors import RoamError
from roam.peer import api as peer_api
from roam.peer import serve as peer_serve
from roam.peer.network import PEER_POOL
from roam.spot import DEFAULT_METADATA, Cloud, WatchConfig

app = typer.Typer(help="This host as a node of a control plane's fleet.",
                  no_args_is_help=True)


def _labels(given: list[str]) -> dict[str, str]:
    labels = {}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--label")
        labels[key] = value
    return labels


@app.command()
def join(
    control: control_cli.Control,
    state_dir: Annotated[Path, typer.Option(
        help="The peer's directory (as `roam peer serve --state-dir`); keep it short.")],
    listen_on: Annotated[str, typer.Option(
        "--listen", help="tcp://HOST:PORT for incoming migrations: other nodes connect "
                         "here, so an address they reach (the underlay's).")],
    token: control_cli.Token = None,
    ca: control_cli.Ca = None,
    name: Annotated[str | None, typer.Option(
        help="The node's name in the fleet (default: the host name).")] = None,
    label: Annotated[list[str], typer.Option(
        help="KEY=VALUE, repeatable: cloud, region, zone, lifecycle (spot or on-demand), "
             "price (per hour; the scheduler prefers cheaper), or any other.")] = [],  # noqa: B006
    cpu_model: Annotated[str | None, typer.Option(
        help="The CPU model to register (default: /proc/cpuinfo's): VMs move only between "
             "nodes of one model.")] = None,
    metrics_listen: Annotated[str | None, typer.Option(
        help="HOST:PORT to serve this node's Prometheus /metrics on.")] = None,
    cloud: CloudOption = Cloud.NONE,
    metadata: MetadataOption = DEFAULT_METADATA,
    tls_cert: TlsCert = None, tls_key: TlsKey = None, tls_ca: TlsCa = None,
    underlay: Underlay = None,
    overlay_peers: OverlayPeers = "",
    net_prefix: NetPrefix = None,
    net_pool: NetPool = PEER_POOL,
    verbose: Verbose = False,
) -> None:
    """Run this host's peer and serve the control plane's fleet until SIGINT/SIGTERM
    (which stops its VMs: drain the node first to keep them).

    With --cloud, the node watches its cloud's metadata service for spot notices and
    reports each to the control plane, which moves every VM off before the deadline
    (docs/SPOT.md). A node that cannot reach the control plane for a lease TTL pauses
    its VMs until it can again (docs/CONTROL.md)."""
    setup_logging(verbose)
    require_root("roam node join", "its VMs get network namespaces and FUSE mounts")
    addr = address(listen_on, "--listen")
    tls = tls_files(tls_cert, tls_key, tls_ca)
    directory = state_dir.absolute()
    netconf = net_config(directory, underlay, overlay_peers, net_prefix, net_pool)
    labels = _labels(label)
    node_name = name or socket.gethostname().split(".")[0]
    try:  # what the control plane would refuse, refused now
        Registration.model_validate({
            "name": node_name, "peer": listen_on, "version": "0", "labels": labels,
            "capacity": {"memory_bytes": 0, "memory_available_bytes": 0, "cpus": 1},
            "accelerator": {"kvm": False, "reason": ""}, "cpu": {"model": "x"}})
    except ValidationError as exc:
        raise invalid(exc) from None
    metrics_at = None
    if metrics_listen is not None:
        host, _, port = metrics_listen.rpartition(":")
        if not host or not port.isdigit():
            raise typer.BadParameter("HOST:PORT", param_hint="--metrics-listen")
        metrics_at = (host, int(port))
    controller = control_cli.client(control, token, ca, tls_cert, tls_key)

    async def main() -> None:
        stop = stop_on_signals()
        peer = peer_serve.Peer(directory, addr, tls, netconf)
        agent = NodeAgent(controller, directory, node_name, labels, cpu_model,
                          WatchConfig(cloud, metadata=metadata))
        failure: list[RoamError] = []

        async def serve_fleet() -> None:
            try:
                await agent.run()
            except RoamError as exc:  # e.g. a wrong token: the node cannot serve
                failure.append(exc)
            finally:
                stop.set()

        try:
            async with controller, asyncio.TaskGroup() as tasks:
                tasks.create_task(peer.serve(stop))
                acting = tasks.create_task(serve_fleet())
                metrics = None
                if metrics_at is not None:
                    metrics = peer_api.server(serve_registry(agent.registry, REGISTRY))
                    tasks.create_task(metrics.serve(sockets=[listen_socket(*metrics_at)]))
                await stop.wait()
                acting.cancel()
                if metrics is not None:
                    metrics.should_exit = True
        except* RoamError as group:  # e.g. another peer serves the state directory
            failure.extend(_leaves(group))
        if failure:
            raise failure[0]

    try:
        run(main())
    except RoamError as exc:
        raise failed(exc) from None


def _leaves(group: BaseExceptionGroup[RoamError]) -> list[RoamError]:
    """The errors of a task group, nested groups flattened."""
    return [leaf for e in group.exceptions
            for leaf in (_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])]
