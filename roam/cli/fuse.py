"""`roam fuse`: serve files as FUSE files that QEMU can map as guest memory."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer
import uvloop

from roam.exposure.fuse import FuseMount
from roam.storage.provider import Provider, StorageError
from roam.storage.sources import FileSource

app = typer.Typer(help="Serve devices as files on a FUSE mount.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Keeps `mount` a subcommand (typer folds a lone command into its group)."""


@app.command()
def mount(
    mountpoint: Annotated[Path, typer.Argument(help="An existing empty directory.")],
    devices: Annotated[list[str], typer.Argument(help="NAME=PATH: serve file PATH as "
                                                      "MOUNTPOINT/NAME.", show_default=False)],
) -> None:
    """Serve each PATH as MOUNTPOINT/NAME until SIGINT or SIGTERM, then flush and unmount."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pairs = [_parse(spec) for spec in devices]
    if len({name for name, _ in pairs}) != len(pairs):
        raise typer.BadParameter("device names must be unique")
    try:
        # uvloop halves the per-request cost of pyfuse3's asyncio mode (measured).
        uvloop.run(_serve(mountpoint, pairs))
    except StorageError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e


def _parse(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise typer.BadParameter(f"expected NAME=PATH, got {spec!r}")
    return name, Path(path)


async def _serve(mountpoint: Path, pairs: list[tuple[str, Path]]) -> None:
    sources: dict[str, Provider] = {}
    try:
        for name, path in pairs:
            sources[name] = FileSource(path)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with FuseMount(mountpoint, sources):
            await stop.wait()
    finally:
        for source in sources.values():
            await source.close()
