"""`roam logs NAME`: a VM's console, QEMU or worker log, whole or followed (-f).

A peer's VM (`--via`, or $ROAM_PEER) is read through the peer's API (GET
/vms/NAME/logs/LOG, docs/API.md), so it works for a peer on another host too; a VM of
`roam run` from its run directory ($ROAM_RUN_DIR/NAME). Following polls: it prints
what was added every POLL seconds, until the VM is gone or SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, BinaryIO

import typer

from roam.cli.common import CommandError, run, stop_on_signals, unless_stopped
from roam.errors import ErrorCode, RoamError
from roam.peer.client import PeerClient
from roam.peer.models import MAX_LOG_CHUNK, LogName
from roam.vm import control

POLL = 0.5


def logs(
    name: Annotated[str, typer.Argument(help="The VM.")],
    via: Annotated[str | None, typer.Option(
        "--via", envvar="ROAM_PEER",
        help="The peer that runs it: state directory or API socket (default: $ROAM_PEER; "
             "without either, a VM of `roam run`).")] = None,
    log: Annotated[LogName, typer.Option(
        "--log", case_sensitive=False,
        help="console: the guest's serial console; qemu: QEMU's output; worker: the "
             "peer's worker of the VM.")] = LogName.CONSOLE,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing what is added until the VM is gone or "
                               "SIGINT.")] = False,
) -> None:
    """Print a VM's log (its console by default), as its peer or `roam run` keeps it."""
    out = sys.stdout.buffer
    if via is not None:
        run(_from_peer(via, name, log, follow, out))
        return
    if log == LogName.WORKER:
        raise typer.BadParameter("a VM of `roam run` has no worker: its log is the "
                                 "output of `roam run` itself", param_hint="--log")
    control.check_name(name)
    path = control.run_root() / name / f"{log}.log"
    if not path.exists():
        raise CommandError(f"no VM called {name!r} ran here (ROAM_RUN_DIR as for roam "
                           "run; --via for a peer's VM)", path, code=ErrorCode.NOT_FOUND)
    run(_from_file(path, follow, out))


async def _from_peer(via: str, name: str, log: LogName, follow: bool, out: BinaryIO) -> None:
    stop = stop_on_signals()
    offset, found = 0, False
    async with PeerClient(via) as client:
        while not stop.is_set():
            try:
                chunk = await client.log(name, log, offset, MAX_LOG_CHUNK)
            except RoamError as exc:
                if found and exc.code == ErrorCode.NOT_FOUND:
                    return  # the VM left the peer (stopped, migrated): its log ends
                raise
            found = True
            out.write(chunk.text.encode())
            out.flush()
            offset = chunk.next_offset
            if chunk.next_offset < chunk.size:
                continue  # more to read now
            if not follow:
                return
            await unless_stopped(asyncio.sleep(POLL), stop)


async def _from_file(path: Path, follow: bool, out: BinaryIO) -> None:
    stop = stop_on_signals()
    with path.open("rb") as file:
        while not stop.is_set():
            data = file.read(MAX_LOG_CHUNK)
            out.write(data)
            out.flush()
            if data:
                continue
            if not follow or not path.exists():  # the run ended and removed its directory
                return
            await unless_stopped(asyncio.sleep(POLL), stop)
