"""`roam device`: migrate files as one device group between two processes or hosts."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from roam.cli.common import (
    CommandError,
    Json,
    TlsCa,
    TlsCert,
    TlsKey,
    Verbose,
    address,
    check_directory,
    check_listen,
    new_directory,
    print_json,
    run,
    serving,
    setup_logging,
    stop_on_signals,
    unless_stopped,
)
from roam.cli.common import tls_files as make_tls
from roam.migration.channel import Channel, connect
from roam.migration.destination import Destination, DestinationResult, NewDevice
from roam.migration.source import Policy, Source, SourceDevice, SourceResult
from roam.migration.wire import DeviceSpec, Encoding
from roam.storage.provider import DEFAULT_BLOCK_SIZE
from roam.storage.sources import FileSource

app = typer.Typer(help="Serve and receive device groups over the migration protocol.",
                  no_args_is_help=True)
log = logging.getLogger("roam.device")

COMPRESSIONS = {"none": Encoding.RAW, "zstd": Encoding.ZSTD, "lz4": Encoding.LZ4}


def _named_files(specs: list[str]) -> list[tuple[str, Path]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"expected NAME=PATH, got {spec!r}", param_hint="FILES")
        if not Path(path).exists():
            raise typer.BadParameter(f"{path}: no such file", param_hint="FILES")
        if not Path(path).is_file():
            raise typer.BadParameter(f"{path} is not a regular file", param_hint="FILES")
        out.append((name, Path(path)))
    if len({n for n, _ in out}) != len(out):
        raise typer.BadParameter("device names must be unique", param_hint="FILES")
    return out


@app.command()
def serve(
    files: Annotated[list[str], typer.Argument(help="Devices as NAME=PATH.")],
    listen_on: Annotated[str, typer.Option(
        "--listen", help="tcp://HOST:PORT or unix://PATH to wait on.")],
    block_size: Annotated[int, typer.Option(help="Block size in bytes.")] = DEFAULT_BLOCK_SIZE,
    compress: Annotated[str, typer.Option(help="none, zstd or lz4.")] = "none",
    verify: Annotated[bool, typer.Option(
        help="Send every block's hash at the end for a full comparison.")] = True,
    tls_cert: TlsCert = None, tls_key: TlsKey = None, tls_ca: TlsCa = None,
    json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Serve the files as one device group, migrate them to the first receiver, exit 0."""
    setup_logging(verbose)
    devices = _named_files(files)
    addr = address(listen_on, "--listen")
    tls = make_tls(tls_cert, tls_key, tls_ca)
    if compress not in COMPRESSIONS:
        raise typer.BadParameter(f"must be one of {', '.join(COMPRESSIONS)}",
                                 param_hint="--compress")
    policy = Policy(compression=COMPRESSIONS[compress], verify=verify)
    check_listen(addr)

    async def main() -> SourceResult | None:
        stop = stop_on_signals()
        sources = [(name, FileSource(path)) for name, path in devices]
        group = [SourceDevice.stack(name, src, block_size) for name, src in sources]
        outcome: asyncio.Future[SourceResult] = asyncio.get_running_loop().create_future()
        sending: list[asyncio.Task[Any]] = []

        async def handler(channel: Channel) -> None:
            if sending:  # one group, one receiver
                return
            task = asyncio.current_task()
            assert task is not None
            sending.append(task)
            log.info("receiver connected; migrating %d device(s)", len(group))
            try:
                result = await Source(channel, group, policy=policy).run()
            except Exception as e:
                if not outcome.done():
                    outcome.set_exception(e)
                return
            if not outcome.done():
                outcome.set_result(result)

        try:
            async with serving(addr, handler, tls):
                log.info("serving %s on %s%s", ", ".join(n for n, _ in devices), addr,
                         " (TLS)" if tls else "")
                result = await unless_stopped(outcome, stop)
                for task in sending:  # stopped halfway: the receiver keeps nothing
                    task.cancel()
                await asyncio.gather(*sending, return_exceptions=True)
                return result
        finally:
            for _, src in sources:
                await src.close()

    result = run(main())
    if result is None:
        raise CommandError("stopped by a signal before the devices were sent", addr)
    names = [n for n, _ in devices]
    if json:
        print_json({"devices": names, "seconds": result.total_seconds,
                    "blocks_sent": result.blocks_sent, "bytes_sent": result.bytes_sent})
        return
    typer.echo(f"migrated {', '.join(names)} in {result.total_seconds:.2f} s: "
               f"{result.blocks_sent} blocks, {result.bytes_sent} bytes sent")


@app.command()
def receive(
    connect_to: Annotated[str, typer.Option(
        "--connect", help="tcp://HOST:PORT or unix://PATH of `roam device serve`.")],
    out: Annotated[Path, typer.Option(help="Directory that gets one file per device.")],
    tls_cert: TlsCert = None, tls_key: TlsKey = None, tls_ca: TlsCa = None,
    tls_server_name: Annotated[str | None, typer.Option(
        help="Name the server certificate must carry (default: the host).")] = None,
    json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Receive a device group into OUT/NAME files, verifying every block.

    Files are written as OUT/NAME.partial and renamed only once complete, so an
    interrupted receive never leaves a half-written file under the final name; a failed
    receive leaves nothing, not even OUT if it made it.
    """
    setup_logging(verbose)
    addr = address(connect_to, "--connect")
    tls = make_tls(tls_cert, tls_key, tls_ca)
    check_directory(out, "--out")
    made: list[tuple[Path, FileSource]] = []

    async def make(spec: DeviceSpec) -> NewDevice:
        partial = out / f"{spec.name}.partial"
        partial.unlink(missing_ok=True)
        src = FileSource(partial, spec.size, create=True)
        made.append((partial, src))
        return NewDevice(src, fresh=True)

    async def main() -> DestinationResult:
        channel = await connect(addr, tls, tls_server_name)
        dest = Destination(channel, make)
        progress = asyncio.create_task(_report_progress(dest))
        try:
            result = await dest.run()
        finally:
            progress.cancel()
            await channel.close()
            for _, src in made:
                await src.close()
        for partial, _ in made:
            os.replace(partial, partial.with_suffix(""))
        return result

    with new_directory(out):
        try:
            result = run(main())
        except BaseException:
            for partial, _ in made:
                partial.unlink(missing_ok=True)
            raise
    names = [partial.with_suffix("").name for partial, _ in made]
    total = sum(src.size() for _, src in made)
    if json:
        print_json({"devices": names, "bytes": total, "seconds": result.total_seconds,
                    "verified_blocks": result.verified_blocks,
                    "integrity_errors": result.integrity_errors})
        return
    typer.echo(f"received {', '.join(names)} into {out}: {total} bytes in "
               f"{result.total_seconds:.2f} s; {result.verified_blocks} blocks verified, "
               f"{result.integrity_errors} integrity errors repaired")


async def _report_progress(dest: Destination, every: float = 2.0) -> None:
    """Log how far the transfer is, for long receives."""
    start = time.monotonic()
    while True:
        await asyncio.sleep(every)
        caches = list(dest.devices.values())
        if not caches:
            continue
        have = sum(c.present_count for c in caches)
        total = sum(c.nblocks for c in caches)
        log.info("%d/%d blocks (%.0f%%) after %.0fs", have, total, 100 * have / max(total, 1),
                 time.monotonic() - start)
