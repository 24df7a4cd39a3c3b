"""`roam nbd`: serve files as NBD exports and copy between files and exports."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
import uvloop

from roam.exposure.nbd.copy import copy, open_endpoint
from roam.exposure.nbd.server import Export, NBDServer
from roam.storage.provider import StorageError
from roam.storage.sources import FileSource

app = typer.Typer(help="Serve devices over NBD and copy to and from NBD exports.",
                  no_args_is_help=True)
log = logging.getLogger("roam.nbd")


def _parse_listen(listen: str) -> tuple[str, int]:
    parts = urlsplit(listen)
    if parts.scheme != "tcp" or parts.port is None:
        raise typer.BadParameter(f"expected tcp://HOST:PORT, got {listen}")
    return parts.hostname or "127.0.0.1", parts.port


def _parse_export(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise typer.BadParameter(f"expected NAME=PATH, got {spec}")
    return name, Path(path)


@app.command()
def serve(
    path: Annotated[Path, typer.Argument(help="File to export.")],
    socket: Annotated[Path | None, typer.Option(help="UNIX socket to listen on.")] = None,
    listen: Annotated[str | None, typer.Option(
        help="Also listen on tcp://HOST:PORT (HOST defaults to 127.0.0.1).")] = None,
    name: Annotated[str, typer.Option(help="Export name.")] = "",
    read_only: Annotated[bool, typer.Option("--read-only", help="Refuse writes.")] = False,
    export: Annotated[list[str] | None, typer.Option(
        help="Another export, NAME=PATH (repeatable).")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate: require TLS "
                                                  "(STARTTLS) on TCP.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM key for --tls-cert.")] = None,
) -> None:
    """Serve PATH until SIGTERM or SIGINT, then flush and exit 0."""
    if socket is None and listen is None:
        raise typer.BadParameter("give --socket and/or --listen")
    tcp = _parse_listen(listen) if listen else None
    exports = [(name, path)] + [_parse_export(e) for e in export or []]
    tls = None
    if tls_cert is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(tls_cert, tls_key)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        uvloop.run(_serve(exports, read_only, socket, tcp, tls))
    except StorageError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e


async def _serve(exports: list[tuple[str, Path]], read_only: bool, socket: Path | None,
                 tcp: tuple[str, int] | None, tls: ssl.SSLContext | None) -> None:
    server = NBDServer(tls=tls)
    sources = []
    for export_name, export_path in exports:
        source = FileSource(export_path, readonly=read_only)
        sources.append(source)
        server.add_export(Export(export_name, source, read_only=read_only))
        log.info("export %r: %s (%d bytes%s)", export_name, export_path, source.size(),
                 ", read-only" if read_only else "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if socket is not None:
        await server.serve_unix(socket)
        log.info("serving on unix:%s", socket)
    if tcp is not None:
        await server.serve_tcp(*tcp)
        log.info("serving on tcp://%s:%d%s", *tcp, " (TLS required)" if tls else "")
    await stop.wait()
    log.info("stopping: finishing requests and flushing")
    await server.close()
    for source in sources:
        await source.close()


@app.command("copy")
def copy_command(
    src: Annotated[str, typer.Argument(help="File or NBD URI to read.")],
    dst: Annotated[str, typer.Argument(help="File or NBD URI to write.")],
    progress: Annotated[bool | None, typer.Option(
        help="Show progress (default: when stderr is a terminal).")] = None,
) -> None:
    """Copy SRC to DST; URIs are nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=SOCK."""
    show = sys.stderr.isatty() if progress is None else progress
    try:
        written = uvloop.run(_copy(src, dst, show))
    except (OSError, ValueError, StorageError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(f"copied {src} -> {dst} ({written} bytes of data)", err=True)


async def _copy(src: str, dst: str, show: bool) -> int:
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    source = await open_endpoint(src)
    try:
        dest = await open_endpoint(dst, dest_size=source.size)
    except BaseException:
        await source.finish()
        raise
    try:
        if not show:
            return await copy(source, dest)
        with Progress(*Progress.get_default_columns(), DownloadColumn(),
                      TransferSpeedColumn(), transient=True) as bar:
            task = bar.add_task("copy", total=source.size)
            return await copy(source, dest, progress=lambda n: bar.advance(task, n))
    finally:
        await dest.finish()
        await source.finish()
