"""Pieces that every `roam` command shares: logging, TLS options, running a coroutine."""

from __future__ import annotations

import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import uvloop

from roam.cli.exits import Exit, for_code
from roam.errors import RoamError
from roam.migration.channel import Address, TLSFiles

T = TypeVar("T")

TlsCert = Annotated[Path | None, typer.Option(
    help="PEM certificate of this side (mutual TLS: give all three --tls options).")]
TlsKey = Annotated[Path | None, typer.Option(help="PEM private key for --tls-cert.")]
TlsCa = Annotated[Path | None, typer.Option(
    help="PEM CA that the other side's certificate must be signed by.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")]


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def tls_files(cert: Path | None, key: Path | None, ca: Path | None) -> TLSFiles | None:
    given = [p for p in (cert, key, ca) if p is not None]
    if not given:
        return None
    if len(given) != 3:
        raise typer.BadParameter("TLS needs --tls-cert, --tls-key and --tls-ca together")
    for p in given:
        if not p.is_file():
            raise typer.BadParameter(f"{p}: no such file")
    assert cert and key and ca
    return TLSFiles(cert, key, ca)


def address(text: str) -> Address:
    try:
        return Address.parse(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def fail(message: object, code: int = Exit.FAILED) -> typer.Exit:
    """Print an error the way every roam command does, and give the exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def failed(exc: Exception) -> typer.Exit:
    """`fail` for a caught error: a roam error's code picks the exit code (roam.cli.exits),
    anything else exits 1."""
    if isinstance(exc, RoamError):
        return fail(exc.message, for_code(exc.code))
    return fail(str(exc) or type(exc).__name__)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro)
