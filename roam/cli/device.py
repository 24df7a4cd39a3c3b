"""`roam device`: migrate files as one device group between two processes or hosts."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from roam.cli.common import TlsCa, TlsCert, TlsKey, Verbose, address, failed, run, setup_logging
from roam.cli.common import tls_files as make_tls
from roam.migration.channel import Channel, PeerLost, connect, listen
from roam.migration.destination import Destination, NewDevice
from roam.migration.errors import MigrationError
from roam.migration.source import Policy, Source, SourceDevice
from roam.migration.wire import DeviceSpec, Encoding, ProtocolError
from roam.storage.provider import DEFAULT_BLOCK_SIZE, StorageError
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
            raise typer.BadParameter(f"expected NAME=PATH, got {spec!r}")
        if not Path(path).is_file():
            raise typer.BadParameter(f"{path}: no such file")
        out.append((name, Path(path)))
    if len({n for n, _ in out}) != len(out):
        raise typer.BadParameter("device names must be unique")
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
    verbose: Verbose = False,
) -> None:
    """Serve the files as one device group, migrate them to the first receiver, exit 0."""
    setup_logging(verbose)
    devices = _named_files(files)
    addr = address(listen_on)
    tls = make_tls(tls_cert, tls_key, tls_ca)
    if compress not in COMPRESSIONS:
        raise typer.BadParameter(f"--compress must be one of {', '.join(COMPRESSIONS)}")
    policy = Policy(compression=COMPRESSIONS[compress], verify=verify)

    async def main() -> None:
        sources = [(name, FileSource(path)) for name, path in devices]
        group = [SourceDevice.stack(name, src, block_size) for name, src in sources]
        outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        taken = False

        async def handler(channel: Channel) -> None:
            nonlocal taken
            if taken:  # one group, one receiver
                return
            taken = True
            log.info("receiver connected; migrating %d device(s)", len(group))
            try:
                result = await Source(channel, group, policy=policy).run()
            except BaseException as e:
                outcome.set_exception(e)
                raise
            log.info("migrated %s in %.2fs: %d blocks, %d bytes sent",
                     ", ".join(n for n, _ in devices), result.total_seconds,
                     result.blocks_sent, result.bytes_sent)
            outcome.set_result(None)

        server = await listen(addr, handler, tls)
        log.info("serving %s on %s%s", ", ".join(n for n, _ in devices), addr,
                 " (TLS)" if tls else "")
        try:
            await outcome
        finally:
            server.close()
            for _, src in sources:
                await src.close()

    try:
        run(main())
    except (MigrationError, ProtocolError, PeerLost, StorageError, OSError) as e:
        raise failed(e) from None


@app.command()
def receive(
    connect_to: Annotated[str, typer.Option(
        "--connect", help="tcp://HOST:PORT or unix://PATH of `roam device serve`.")],
    out: Annotated[Path, typer.Option(help="Directory that gets one file per device.")],
    tls_cert: TlsCert = None, tls_key: TlsKey = None, tls_ca: TlsCa = None,
    tls_server_name: Annotated[str | None, typer.Option(
        help="Name the server certificate must carry (default: the host).")] = None,
    verbose: Verbose = False,
) -> None:
    """Receive a device group into OUT/NAME files, verifying every block.

    Files are written as OUT/NAME.partial and renamed only once complete, so an
    interrupted receive never leaves a half-written file under the final name.
    """
    setup_logging(verbose)
    addr = address(connect_to)
    tls = make_tls(tls_cert, tls_key, tls_ca)
    out.mkdir(parents=True, exist_ok=True)
    made: list[tuple[Path, FileSource]] = []

    async def make(spec: DeviceSpec) -> NewDevice:
        partial = out / f"{spec.name}.partial"
        partial.unlink(missing_ok=True)
        src = FileSource(partial, spec.size, create=True)
        made.append((partial, src))
        return NewDevice(src, fresh=True)

    async def main() -> None:
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
        total = sum(src.size() for _, src in made)
        log.info("received %d device(s), %d bytes, in %.2fs; %d blocks verified, "
                 "%d integrity errors repaired", len(made), total, result.total_seconds,
                 result.verified_blocks, result.integrity_errors)

    try:
        run(main())
    except (MigrationError, ProtocolError, PeerLost, StorageError, OSError) as e:
        for partial, _ in made:
            partial.unlink(missing_ok=True)
        raise failed(e) from None


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
