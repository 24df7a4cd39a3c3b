"""`roam snapshot`, `roam run`, `roam exec`, `roam ls` and `roam package`: VMs as packages."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
import uvloop
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn
from rich.table import Table

from roam.blueprint import Blueprint, BlueprintError
from roam.cli.common import TlsCa, TlsCert, TlsKey, fail, failed, tls_files
from roam.cli.exits import Exit
from roam.hypervisor import HypervisorError, MachineExited
from roam.hypervisor.device_state import StateError
from roam.migration.channel import Address
from roam.migration.errors import MigrationError
from roam.network.forward import PortForward
from roam.peer.worker import run_from
from roam.storage.provider import StorageError
from roam.vm import archive, control
from roam.vm.package import PackageError
from roam.vm.runner import RunError, run_package
from roam.vm.snapshot import SnapshotError, SnapshotOptions, take_snapshot

package_app = typer.Typer(help="Archive packages (tar + zstd) and unpack them.",
                          no_args_is_help=True)
err = Console(stderr=True, soft_wrap=True)

_FAILURES = (BlueprintError, PackageError, SnapshotError, RunError, HypervisorError, StateError,
             StorageError, control.ControlError)


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("roam.vm").setLevel(logging.DEBUG if verbose else logging.INFO)


def parse_mib(text: str) -> int:
    """512M, 1G, 1024 (MiB)."""
    match = re.fullmatch(r"(\d+)([MG]?)i?B?", text.strip(), re.IGNORECASE)
    if match is None or int(match.group(1)) == 0:
        raise typer.BadParameter(f"{text!r}: expected a size such as 512M or 1G")
    return int(match.group(1)) << (10 if match.group(2).upper() == "G" else 0)


def snapshot(
    blueprint: Annotated[Path, typer.Option(help="A blueprint directory (roam blueprint "
                                                 "build --out).", exists=True,
                                            file_okay=False)],
    out: Annotated[Path, typer.Option(help="The package directory to create.")],
    memory: Annotated[str, typer.Option(help="Guest memory, e.g. 512M or 1G.")] = "512M",
    cpus: Annotated[int, typer.Option(min=1)] = 1,
    cpu_model: Annotated[str | None, typer.Option(
        help="QEMU CPU model (e.g. Haswell-v4) so the guest sees the same CPU on every "
             "host; default host under KVM, max under TCG.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Boot a blueprint, wait for its workload, and save the running VM as a package."""
    _logging(verbose)
    options = SnapshotOptions(memory_mib=parse_mib(memory), cpus=cpus, cpu_model=cpu_model)
    try:
        times = uvloop.run(take_snapshot(Blueprint.load(blueprint), out, options))
    except _FAILURES as exc:
        raise fail(exc) from exc
    typer.echo(f"package {out}: booted to ready in {times.boot_to_ready:.1f} s, "
               f"suspended in {times.suspend:.2f} s ({times.state_bytes} bytes of state)")


def run(
    name: Annotated[str, typer.Option(help="The VM's name for roam exec and roam ls.")],
    package: Annotated[Path | None, typer.Argument(help="A package directory.", exists=True,
                                                   file_okay=False)] = None,
    from_: Annotated[str | None, typer.Option(
        "--from", help="Start lazily from `roam registry serve` at this address instead: "
                       "SIGINT or SIGTERM then discards the VM (docs/MIGRATION.md).")] = None,
    publish: Annotated[list[str] | None, typer.Option(
        "--publish", "-p", help="[HOSTIP:]HOSTPORT:GUESTPORT[/udp] (repeatable; "
                                "loopback unless HOSTIP is given).")] = None,
    tls_cert: TlsCert = None, tls_key: TlsKey = None, tls_ca: TlsCa = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Resume a package until SIGINT or SIGTERM, then suspend it back into the package
    (or, with --from, start a registry's package lazily; the --tls options connect to a
    registry that requires mutual TLS)."""
    _logging(verbose)
    try:
        forwards = [PortForward.parse(p) for p in publish or []]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if (package is None) == (from_ is None):
        raise typer.BadParameter("give a PACKAGE or --from ADDR")
    if from_ is not None:
        try:
            uvloop.run(run_from(Address.parse(from_), name, publish or [],
                                tls_files(tls_cert, tls_key, tls_ca)))
        except (ValueError, OSError, MigrationError, *_FAILURES) as exc:
            raise fail(exc) from exc
        return

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def running(info: dict[str, object]) -> None:
            err.print(f"{name}: running (QEMU pid {info['qemu_pid']}); "
                      "SIGINT or SIGTERM suspends it", highlight=False)

        assert package is not None
        times = await run_package(package, name, forwards, stop, running)
        err.print(f"{name}: resumed in {times.resume:.2f} s, suspended in "
                  f"{times.suspend:.2f} s; package updated "
                  f"({times.committed_bytes / 2**20:.1f} MiB written back)", highlight=False)

    try:
        uvloop.run(main())
    except MachineExited as exc:
        raise fail(f"{exc}; the package is unchanged") from exc
    except _FAILURES as exc:
        raise fail(exc) from exc


def exec_(
    name: Annotated[str, typer.Argument(help="A running VM.")],
    command: Annotated[list[str], typer.Argument(help="The command and its arguments "
                                                      "(after --).")],
    timeout: Annotated[float, typer.Option(help="Seconds before the command is killed.")
                       ] = 30.0,
) -> None:
    """Run a command in a running VM; its output and exit code become ours (124 if it
    timed out)."""
    try:
        result = asyncio.run(control.call(name, "exec", {"argv": command, "timeout": timeout},
                                          timeout=timeout + 30))
    except control.ControlError as exc:
        raise failed(exc) from exc
    sys.stdout.write(result["stdout"])
    sys.stderr.write(result["stderr"])
    if result["timed_out"]:
        raise fail(f"timed out after {timeout} s", Exit.TIMEOUT)
    raise typer.Exit(result["exit_code"])


def ls() -> None:
    """List the running VMs."""
    vms = asyncio.run(control.list_vms())
    table = Table("NAME", "PACKAGE", "ACCEL", "MEMORY", "CPUS", "PUBLISH", "PID")
    for vm in vms:
        ports = ", ".join(f"{p['host_addr']}:{p['host_port']}->{p['guest_port']}/"
                          f"{p['protocol']}" for p in vm["publish"])
        table.add_row(vm["name"], vm["package"], vm["accel"], f"{vm['memory_mib']} MiB",
                      str(vm["cpus"]), ports, str(vm["pid"]))
    Console().print(table)


def _progress() -> Progress:
    return Progress("[progress.description]{task.description}", BarColumn(),
                    DownloadColumn(binary_units=True), TimeRemainingColumn(),
                    console=err, transient=True)


@package_app.command()
def create(
    package: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    file: Annotated[Path, typer.Argument(help="The archive to write (.tar.zst).")],
) -> None:
    """Archive a package directory as tar + zstd with a checksum manifest."""
    try:
        names = archive.package_files(package)
        total = sum((package / n).stat().st_size for n in names)
        with _progress() as bar:
            task = bar.add_task(f"packing {package.name}", total=total)
            archive.create(package, file, lambda n: bar.advance(task, n), threads=-1)
    except _FAILURES as exc:
        raise fail(exc) from exc
    typer.echo(f"{file}: {file.stat().st_size / 2**20:.1f} MiB")


@package_app.command()
def extract(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    directory: Annotated[Path, typer.Argument(help="A new or empty directory.")],
) -> None:
    """Unpack an archive, verifying every file; a corrupt archive is refused."""
    try:
        with _progress() as bar:
            task = bar.add_task(f"unpacking {file.name}", total=file.stat().st_size)
            archive.extract(file, directory, lambda n: bar.advance(task, n))
    except _FAILURES as exc:
        raise fail(exc) from exc
    typer.echo(f"{directory}: package verified")
