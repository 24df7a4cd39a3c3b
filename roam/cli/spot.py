"""`roam spot ...`: does this host see spot notices? And a fake metadata service to try.

`roam spot watch` polls the cloud's metadata service exactly as a node does and prints
each notice (ops: "would this node see a notice?"); `roam spot fake-metadata` serves the
documented answers of AWS, GCP and Azure on loopback and turns to a notice on demand
(tests and demos). docs/SPOT.md has both.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
from typing import Annotated
from urllib.parse import urlsplit

import typer

from roam.cli.common import Json, Verbose, print_json, run, setup_logging
from roam.spot import DEFAULT_METADATA, Cloud, Notice, WatchConfig, Watcher
from roam.spot.fake import CLOUDS, FakeMetadata, serve

app = typer.Typer(help="Spot notices: watch this host's cloud metadata service, or run a "
                  "fake one to try it.", no_args_is_help=True, rich_markup_mode=None)

def _metadata_url(text: str) -> str:
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or \
            parts.query or port == -1:
        raise typer.BadParameter(f"{text!r}: give http://HOST[:PORT] (metadata services "
                                 "speak plain HTTP on a link-local address)",
                                 param_hint="--metadata")
    return text.rstrip("/")


CloudOption = Annotated[Cloud, typer.Option(
    case_sensitive=False, help="The cloud whose metadata service to watch for spot "
    "notices (none: not a spot machine).")]
MetadataOption = Annotated[str, typer.Option(
    callback=_metadata_url, help="Base URL of the cloud's metadata service.")]
"""Options a command that watches spot notices shares (roam spot watch, a node agent)."""


def _line(notice: Notice) -> str:
    return (f"spot notice: {notice.cloud} will {notice.action} this host at "
            f"{notice.deadline.isoformat()} ({notice.remaining().total_seconds():.0f} s "
            f"left), event {notice.event_id}")


@app.command("watch")
def watch_(
    cloud: CloudOption,
    metadata: MetadataOption = DEFAULT_METADATA,
    interval: Annotated[float, typer.Option(
        min=0.01, help="Seconds between polls (AWS, Azure; AWS advises 5).")] = 5.0,
    resource: Annotated[str | None, typer.Option(
        help="Azure: this VM's name in events (default: asked from IMDS).")] = None,
    count: Annotated[int, typer.Option(
        min=0, help="Exit after this many notices (0: watch until interrupted).")] = 0,
    acknowledge: Annotated[bool, typer.Option(
        "--acknowledge", help="Azure: acknowledge each notice at once, which lets Azure "
        "take the VM (and every VM the event names) right away. For tests.")] = False,
    json_: Json = False,
    verbose: Verbose = False,
) -> None:
    """Print every spot notice this host's metadata service gives, once each.

    Polls as a node does: AWS IMDSv2 instance-action with a session token, GCP's
    instance/preempted with a hanging GET, Azure's Scheduled Events for this VM.
    Failures are logged and retried, never printed as notices. With --json, one JSON
    object per notice and line.
    """
    setup_logging(verbose)
    config = WatchConfig(cloud, metadata=metadata, interval=interval,
                         azure_resource=resource)
    if cloud is Cloud.NONE:
        typer.echo("cloud none: no metadata service to watch", err=True)
        return

    async def main() -> None:
        seen = 0
        async with Watcher(config) as watcher:
            async for notice in watcher:
                if json_:
                    print_json(notice.model_dump(mode="json"), indent=None)
                else:
                    typer.echo(_line(notice))
                if acknowledge:
                    await watcher.acknowledge(notice)
                seen += 1
                if seen == count:
                    return

    with contextlib.suppress(KeyboardInterrupt):
        run(main())


def _listen(text: str) -> tuple[str, int]:
    parts = urlsplit(f"//{text}")
    try:
        port = parts.port
        address = ipaddress.ip_address(parts.hostname or "")
    except ValueError:
        port, address = None, None
    if port is None or address is None or parts.path:
        raise typer.BadParameter(f"{text!r}: give IP:PORT ([IPv6]:PORT)",
                                 param_hint="--listen")
    if not (address.is_loopback or address.is_link_local):
        raise typer.BadParameter(
            f"{address} is neither loopback nor link-local: the fake's control endpoints "
            "have no authentication (in a namespace, listen on 169.254.169.254)",
            param_hint="--listen")
    return str(address), port


@app.command("fake-metadata")
def fake_metadata(
    listen: Annotated[str, typer.Option(
        help="IP:PORT to serve on, loopback or link-local (port 0: any free one).")
    ] = "127.0.0.1:8169",
    cloud: Annotated[list[Cloud] | None, typer.Option(
        case_sensitive=False, help="A cloud to answer as (repeat; default all three).")
    ] = None,
    resource: Annotated[str, typer.Option(
        help="This VM's name in Azure's events and compute/name.")] = "roam-node",
    json_: Json = False,
    verbose: Verbose = False,
) -> None:
    """Serve a fake metadata service (AWS, GCP, Azure as documented) for tests and demos.

    Prints its URL, then serves until interrupted. Give a notice with
    `curl -X POST URL/_roam/notice -d '{"deadline_seconds": 30}'`, withdraw it with
    DELETE; POST /_roam/tokens/expire expires AWS tokens; POST /_roam/faults
    '{"status": 503, "count": 3}' or '{"delay_seconds": 5}' makes it fail or slow;
    GET /_roam/state shows requests, refusals and Azure acknowledgements.
    """
    setup_logging(verbose)
    host, port = _listen(listen)
    clouds = frozenset(c for c in (cloud or CLOUDS) if c is not Cloud.NONE) or CLOUDS
    fake = FakeMetadata(clouds, resource=resource)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with serve(fake, host, port) as url:
            if json_:
                print_json({"url": url, "clouds": sorted(clouds)}, indent=None)
            else:
                typer.echo(f"fake metadata service for {', '.join(sorted(clouds))} at {url}")
            await stop.wait()

    run(main())
