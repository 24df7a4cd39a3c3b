"""`roam nbd`: serve files as NBD exports and copy between files and exports."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
import uvloop
from rich.console import Console
from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

from roam.cli.common import (
    CommandError,
    check_listen,
    check_new_file,
    check_socket_path,
    describe,
    terminal,
    tls_context,
)
from roam.exposure.nbd import protocol as p
from roam.exposure.nbd.copy import Endpoint, copy, open_endpoint
from roam.exposure.nbd.server import Export, NBDServer
from roam.migration.channel import Address
from roam.storage.sources import FileSource

app = typer.Typer(help="Serve devices over NBD and copy to and from NBD exports.",
                  no_args_is_help=True)
log = logging.getLogger("roam.nbd")
URI_SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://")


def _parse_listen(listen: str) -> Address:
    parts = urlsplit(listen)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or port is None:
        raise typer.BadParameter(f"expected tcp://HOST:PORT, got {listen}",
                                 param_hint="--listen")
    return Address("tcp", host=parts.hostname or "127.0.0.1", port=port)


def _parse_export(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise typer.BadParameter(f"expected NAME=PATH, got {spec}", param_hint="--export")
    _check_file(Path(path), "--export")
    return name, Path(path)


def _check_file(path: Path, hint: str) -> None:
    if not path.exists():
        raise typer.BadParameter(f"{path}: no such file", param_hint=hint)
    if not path.is_file():
        raise typer.BadParameter(f"{path} is not a regular file", param_hint=hint)


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
    tls_key: Annotated[Path | None, typer.Option(
        help="PEM key for --tls-cert (default: in the --tls-cert file).")] = None,
    tls_ca: Annotated[Path | None, typer.Option(
        help="PEM CA: with --tls-cert, clients must also present a certificate it "
             "signed (mutual TLS).")] = None,
) -> None:
    """Serve PATH until SIGTERM or SIGINT, then flush and exit 0."""
    if socket is None and listen is None:
        raise typer.BadParameter("give --socket and/or --listen", param_hint="--socket/--listen")
    _check_file(path, "PATH")
    exports = [(name, path)] + [_parse_export(e) for e in export or []]
    tls = None
    if tls_cert is not None:
        tls = tls_context(tls_cert, tls_key, tls_ca, server=True)
    elif tls_key is not None or tls_ca is not None:
        raise typer.BadParameter("needs --tls-cert", param_hint="--tls-key/--tls-ca")
    if socket is not None:
        check_socket_path(socket, "--socket")
    tcp = _parse_listen(listen) if listen else None
    if tcp is not None:
        check_listen(tcp)
    uvloop.run(_serve(exports, read_only, socket, tcp, tls))


async def _serve(exports: list[tuple[str, Path]], read_only: bool, socket: Path | None,
                 tcp: Address | None, tls: ssl.SSLContext | None) -> None:
    server = NBDServer(tls=tls)
    sources = []
    try:
        for export_name, export_path in exports:
            source = FileSource(export_path, readonly=read_only)
            sources.append(source)
            server.add_export(Export(export_name, source, read_only=read_only))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            if socket is not None:
                await server.serve_unix(socket)
            if tcp is not None:
                await server.serve_tcp(tcp.host, tcp.port)
        except OSError as exc:  # taken between the check and now
            raise CommandError(f"cannot listen: {exc.strerror}", socket or tcp) from exc
        # Logged once everything stands, so a failure is the only line a failed start prints.
        for (export_name, export_path), source in zip(exports, sources, strict=True):
            log.info("export %r: %s (%d bytes%s)", export_name, export_path, source.size(),
                     ", read-only" if read_only else "")
        if socket is not None:
            log.info("serving on unix:%s", socket)
        if tcp is not None:
            log.info("serving on %s%s", tcp, "" if tls is None else " (mutual TLS required)"
                     if tls.verify_mode == ssl.CERT_REQUIRED else " (TLS required)")
        await stop.wait()
        log.info("stopping: finishing requests and flushing")
    finally:
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
    """Copy SRC to DST; URIs are nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=SOCK.

    A DST file that did not exist is removed again if the copy fails."""
    if not src.startswith(URI_SCHEMES):
        _check_file(Path(src), "SRC")
    created = None
    if not dst.startswith(URI_SCHEMES):
        check_new_file(Path(dst), "DST")
        created = None if Path(dst).exists() else Path(dst)
    show = terminal() if progress is None else progress
    try:
        written = uvloop.run(_copy(src, dst, show))
    except BaseException:
        if created is not None:
            created.unlink(missing_ok=True)
        raise
    typer.echo(f"copied {src} -> {dst} ({written} bytes of data)", err=True)


async def _open(spec: str, dest_size: int | None = None) -> Endpoint:
    """The endpoint; an NBD server's refusal or absence is reported with its URI."""
    try:
        return await open_endpoint(spec, dest_size=dest_size)
    except p.OptionError as exc:
        reason = {p.REP_ERR_UNKNOWN: "the server has no such export",
                  p.REP_ERR_TLS_REQD: "the server requires TLS (nbds://)",
                  p.REP_ERR_POLICY: "the server refused it by policy"}.get(exc.reply, str(exc))
        raise CommandError(reason, spec) from exc
    except OSError as exc:
        if not spec.startswith(URI_SCHEMES):
            raise
        raise CommandError(f"cannot connect: {describe(exc)}", spec) from exc


async def _copy(src: str, dst: str, show: bool) -> int:
    source = await _open(src)
    try:
        dest = await _open(dst, dest_size=source.size)
    except BaseException:
        await source.finish()
        raise
    try:
        if not show:
            return await copy(source, dest)
        with Progress(*Progress.get_default_columns(), DownloadColumn(),
                      TransferSpeedColumn(), transient=True,
                      console=Console(stderr=True)) as bar:
            task = bar.add_task("copy", total=source.size)
            return await copy(source, dest, progress=lambda n: bar.advance(task, n))
    finally:
        await dest.finish()
        await source.finish()
