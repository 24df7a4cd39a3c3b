"""`roam fuse`: serve files as FUSE files that QEMU can map as guest memory."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer
import uvloop

from roam.cli.common import CommandError
from roam.exposure.fuse import FuseMount
from roam.storage.provider import Provider
from roam.storage.sources import FileSource

app = typer.Typer(help="Serve devices as files on a FUSE mount.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Keeps `mount` a subcommand (typer folds a lone command into its group)."""


@app.command()
def mount(
    mountpoint: Annotated[Path, typer.Argument(
        help="An existing empty directory.", exists=True, file_okay=False)],
    devices: Annotated[list[str], typer.Argument(help="NAME=PATH: serve file PATH as "
                                                      "MOUNTPOINT/NAME.", show_default=False)],
) -> None:
    """Serve each PATH as MOUNTPOINT/NAME until SIGINT or SIGTERM, then flush and unmount."""
    pairs = [_parse(spec) for spec in devices]
    if len({name for name, _ in pairs}) != len(pairs):
        raise typer.BadParameter("device names must be unique", param_hint="DEVICES")
    # uvloop halves the per-request cost of pyfuse3's asyncio mode (measured).
    uvloop.run(_serve(mountpoint, pairs))


def _parse(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise typer.BadParameter(f"expected NAME=PATH, got {spec!r}", param_hint="DEVICES")
    if not Path(path).exists():
        raise typer.BadParameter(f"{path}: no such file", param_hint="DEVICES")
    if not Path(path).is_file():
        raise typer.BadParameter(f"{path} is not a regular file", param_hint="DEVICES")
    return name, Path(path)


async def _serve(mountpoint: Path, pairs: list[tuple[str, Path]]) -> None:
    sources: dict[str, Provider] = {}
    mounted = False
    try:
        for name, path in pairs:
            sources[name] = FileSource(path)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with FuseMount(mountpoint, sources):
            mounted = True
            await stop.wait()
    except RuntimeError as exc:  # pyfuse3's only way to say that the mount failed
        if mounted:
            raise
        raise CommandError(f"cannot mount FUSE: {exc}", mountpoint) from exc
    finally:
        for source in sources.values():
            await source.close()
