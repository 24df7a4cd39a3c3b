"""Pieces that every `roam` command shares: the one error line, the one logging setup, TLS
options, checks made before anything starts, JSON output, progress, running a coroutine.

Every command reports a failure the same way: `error: WHAT (SUBJECT)` on one line of
stderr, SUBJECT being the path, address or option concerned; exit status 1 for a
failure, 2 for a usage error. Commands either raise (`CommandError`, `typer.BadParameter`,
or any error of the layers below, which roam.cli.main turns into that line) or, when they
want another status, call `fail`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import ssl
import stat
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import uvloop
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from roam import logs
from roam.cli.exits import Exit, for_code
from roam.errors import ErrorCode, RoamError
from roam.migration.channel import Address, Handler, TLSFiles, listen

T = TypeVar("T")

TlsCert = Annotated[Path | None, typer.Option(
    help="PEM certificate of this side (mutual TLS: give all three --tls options).")]
TlsKey = Annotated[Path | None, typer.Option(help="PEM private key for --tls-cert.")]
TlsCa = Annotated[Path | None, typer.Option(
    help="PEM CA that the other side's certificate must be signed by.")]
Verbose = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Log debug details (same as `roam -v COMMAND`).")]
Json = Annotated[bool, typer.Option(
    "--json", help="Print the result as JSON on stdout instead of a summary.")]

SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


class CommandError(RoamError):
    """A failure a command found itself: `error: WHAT (SUBJECT)`, exit status 1."""

    def __init__(self, what: str, subject: object = None, *,
                 code: ErrorCode | None = None) -> None:
        super().__init__(what if subject is None else f"{what} ({subject})", code=code)


@dataclass
class Settings:
    """What the options before the subcommand chose (`roam --debug -v COMMAND`)."""

    level: int = logging.INFO
    debug: bool = False


settings = Settings()


def configure_logging(level: int) -> None:
    """The one logging setup (roam.logs), remembered for commands that start others."""
    settings.level = level
    logs.configure(level)


def setup_logging(verbose: bool = False) -> None:
    """For commands with their own -v: the global setup, at DEBUG if `verbose`."""
    configure_logging(logging.DEBUG if verbose else settings.level)


def describe(exc: BaseException) -> str:
    """An error as the one line that reports it: an OSError names its errno's meaning and
    its file; any other error is its own message."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        what = os.strerror(exc.errno)
        return f"{what} ({exc.filename})" if exc.filename is not None else what
    if isinstance(exc, RoamError):
        return exc.message
    return str(exc) or type(exc).__name__


def report(message: str) -> None:
    """Print `error: MESSAGE` on stderr (the traceback too with `roam --debug`, when an
    exception is being handled)."""
    if settings.debug and sys.exc_info()[1] is not None:
        traceback.print_exc()
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def fail(message: object, code: int = Exit.FAILED) -> typer.Exit:
    """Print an error the way every roam command does, and give the exit to raise."""
    report(describe(message) if isinstance(message, BaseException) else str(message))
    return typer.Exit(code)


def failed(exc: Exception) -> typer.Exit:
    """`fail` for a caught error: a roam error's code picks the exit code (roam.cli.exits),
    anything else exits 1."""
    if isinstance(exc, RoamError):
        return fail(exc.message, for_code(exc.code))
    return fail(str(exc) or type(exc).__name__)


def _read(path: Path, option: str) -> None:
    """Fail now, with the option, if `path` cannot be read as a file."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise typer.BadParameter(f"{path}: {os.strerror(exc.errno or errno.ENOENT)}",
                                 param_hint=option) from None
    if stat.S_ISDIR(mode):
        raise typer.BadParameter(f"{path} is a directory, not a file", param_hint=option)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise typer.BadParameter(f"{path}: {os.strerror(exc.errno or errno.EACCES)}",
                                 param_hint=option) from None


def tls_context(cert: Path, key: Path | None, ca: Path | None, *, server: bool
                ) -> ssl.SSLContext:
    """A TLS context from PEM files, every file checked now: a bad file names its option.
    With `ca`, the other side must present a certificate that `ca` signed."""
    for path, option in ((cert, "--tls-cert"), (key, "--tls-key"), (ca, "--tls-ca")):
        if path is not None:
            _read(path, option)
    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    context = ssl.create_default_context(purpose)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        what = (f"{cert} holds no PEM certificate and key" if key in (None, cert) else
                f"{cert} holds no PEM certificate, or {key} not its key")
        reason = f" ({exc.reason})" if exc.reason else ""
        raise typer.BadParameter(what + reason, param_hint="--tls-cert/--tls-key") from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as exc:
            raise typer.BadParameter(f"{ca}: no PEM CA certificate ({exc.reason or exc})",
                                     param_hint="--tls-ca") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def tls_files(cert: Path | None, key: Path | None, ca: Path | None) -> TLSFiles | None:
    """The three files of mutual TLS, or None; checked now (readable, PEM, matching)."""
    given = [p for p in (cert, key, ca) if p is not None]
    if not given:
        return None
    if cert is None or key is None or ca is None:
        raise typer.BadParameter("mutual TLS needs all three together",
                                 param_hint="--tls-cert/--tls-key/--tls-ca")
    tls_context(cert, key, ca, server=True)
    return TLSFiles(cert, key, ca)


def invalid(exc: ValidationError) -> typer.BadParameter:
    """A usage error for options that make an invalid request: field by field."""
    return typer.BadParameter("; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors()))


def address(text: str, option: str | None = None) -> Address:
    try:
        return Address.parse(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=option) from None


def check_listen(addr: Address, option: str = "--listen") -> None:
    """Fail now if nothing could listen on `addr`: a UNIX socket's directory missing, its
    path too long or taken by something else than a socket; a TCP port in use."""
    if addr.scheme == "unix":
        check_socket_path(Path(addr.path), option)
        return
    try:
        infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise typer.BadParameter(f"{addr.host}: {exc.strerror}", param_hint=option) from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise typer.BadParameter(f"{addr.host} is not an address of this host",
                                         param_hint=option) from None
            raise CommandError(os.strerror(exc.errno or errno.EADDRINUSE), addr) from None


def check_socket_path(path: Path, option: str) -> None:
    if len(str(path).encode()) > SOCKET_PATH_MAX:
        raise typer.BadParameter(f"{path} is longer than a UNIX socket path may be "
                                 f"({SOCKET_PATH_MAX} bytes)", param_hint=option)
    if not path.parent.is_dir():
        raise typer.BadParameter(f"directory {path.parent} does not exist", param_hint=option)
    if path.exists() and not path.is_socket():
        raise typer.BadParameter(f"{path} exists and is not a socket", param_hint=option)


def require_root(command: str, why: str, *, fuse: bool = True) -> None:
    """Fail now, before anything starts, unless this process is root (and, with `fuse`,
    can open /dev/fuse): `command` would otherwise fail halfway, or look started."""
    if os.geteuid() != 0:
        raise CommandError(f"{command} needs root: {why}", f"running as uid {os.geteuid()}")
    if fuse:
        try:
            os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
        except OSError as exc:
            raise CommandError(f"{command} needs FUSE: {os.strerror(exc.errno or 0)}",
                               "/dev/fuse") from None


def check_new_file(path: Path, option: str) -> None:
    """Fail now unless `path` can be created as a file: its directory exists, and it is
    not a directory itself."""
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a directory", param_hint=option)
    if not path.parent.is_dir():
        raise typer.BadParameter(f"directory {path.parent} does not exist", param_hint=option)


def check_directory(path: Path, option: str) -> None:
    """Fail now if `path` exists as something other than a directory."""
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} is a file, not a directory", param_hint=option)


@contextlib.contextmanager
def new_directory(path: Path) -> Iterator[Path]:
    """Create `path` (and missing parents) for a command's output, and remove what was
    created if the command fails, so a failure leaves nothing behind. An existing
    directory is kept, and so is anything the command wrote into it."""
    created: list[Path] = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        created.append(parent)
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for directory in created:  # deepest first
            with contextlib.suppress(OSError):  # not empty: the command left a file
                directory.rmdir()
        raise


def print_json(value: Any, indent: int | None = 2) -> None:
    """`value` as JSON on stdout; `indent=None` gives one line per value (JSON Lines), for
    commands that report more than once."""
    typer.echo(json.dumps(value, indent=indent, default=str))


def terminal() -> bool:
    """Whether progress can be shown: stderr is a terminal and logging is not quieted."""
    return sys.stderr.isatty() and settings.level <= logging.INFO


class _StepHandler(logging.Handler):
    def __init__(self, progress: Progress, title: str) -> None:
        super().__init__(logging.INFO)
        self._progress = progress
        self._title = title

    def emit(self, record: logging.LogRecord) -> None:
        self._progress.update(self._progress.task_ids[0],
                              description=f"{self._title}: {record.getMessage()}")


@contextlib.contextmanager
def steps(title: str, logger: str) -> Iterator[None]:
    """On a terminal, a spinner with the time spent and the current step: the last INFO
    message of `logger`, whose records keep printing above it. Elsewhere nothing, so that
    logs and pipes get no control characters."""
    if not terminal():
        yield
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        progress.add_task(title)
        handler = _StepHandler(progress, title)
        logging.getLogger(logger).addHandler(handler)
        try:
            yield
        finally:
            logging.getLogger(logger).removeHandler(handler)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro)


def stop_on_signals() -> asyncio.Event:
    """An event that SIGINT and SIGTERM set: every long-running command ends cleanly on
    either, whatever it is waiting for."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def unless_stopped(awaitable: Awaitable[T], stop: asyncio.Event) -> T | None:
    """What `awaitable` gives, or None if `stop` is set first (it is then cancelled)."""
    task = asyncio.ensure_future(awaitable)
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


@contextlib.asynccontextmanager
async def serving(addr: Address, handler: Handler, tls: TLSFiles | None = None
                  ) -> AsyncIterator[asyncio.Server]:
    """A migration-protocol listener for the life of the block; a UNIX socket is removed
    after it, so that nothing stale is left to connect to."""
    server = await listen(addr, handler, tls)
    try:
        yield server
    finally:
        server.close()
        if addr.scheme == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(addr.path)
