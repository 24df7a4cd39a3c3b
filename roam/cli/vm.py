"""`roam snapshot`, `roam run`, `roam exec`, `roam ls` and `roam package`: VMs as packages."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
import uvloop
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

from roam.blueprint import Blueprint
from roam.cli import listing
from roam.cli.common import (
    Json,
    TlsCa,
    TlsCert,
    TlsKey,
    Verbose,
    address,
    check_directory,
    check_new_file,
    fail,
    new_directory,
    print_json,
    require_root,
    setup_logging,
    steps,
    terminal,
    tls_files,
)
from roam.cli.exits import Exit
from roam.hypervisor import MachineExited
from roam.network.forward import PortForward
from roam.peer.worker import run_from
from roam.vm import archive, control
from roam.vm.runner import run_package
from roam.vm.snapshot import SnapshotOptions, take_snapshot

package_app = typer.Typer(help="Archive packages (tar + zstd) and unpack them.",
                          no_args_is_help=True)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def parse_mib(text: str) -> int:
    """512M, 1G, 1024 (MiB)."""
    match = re.fullmatch(r"(\d+)([MG]?)i?B?", text.strip(), re.IGNORECASE)
    if match is None or int(match.group(1)) == 0:
        raise typer.BadParameter(f"{text!r}: expected a size such as 512M or 1G",
                                 param_hint="--memory")
    return int(match.group(1)) << (10 if match.group(2).upper() == "G" else 0)


def snapshot(
    blueprint: Annotated[Path, typer.Option(help="A blueprint directory (roam blueprint "
                                                 "build --out).", exists=True,
                                            file_okay=False)],
    out: Annotated[Path, typer.Option(help="The package directory to create (must not "
                                           "exist).")],
    memory: Annotated[str, typer.Option(help="Guest memory, e.g. 512M or 1G.")] = "512M",
    cpus: Annotated[int, typer.Option(min=1)] = 1,
    cpu_model: Annotated[str | None, typer.Option(
        help="QEMU CPU model (e.g. Haswell-v4) so the guest sees the same CPU on every "
             "host; default host under KVM, max under TCG.")] = None,
    json: Json = False,
    verbose: Verbose = False,
) -> None:
    """Boot a blueprint, wait for its workload, and save the running VM as a package."""
    setup_logging(verbose)
    require_root("roam snapshot", "the VM's memory is served on a FUSE mount")
    options = SnapshotOptions(memory_mib=parse_mib(memory), cpus=cpus, cpu_model=cpu_model)
    if out.exists():
        raise typer.BadParameter(f"{out} exists already", param_hint="--out")
    check_directory(out.parent, "--out")
    loaded = Blueprint.load(blueprint)
    # take_snapshot removes `out` if it fails; this removes the parents made for it.
    with steps(f"snapshot of {blueprint.name}", "roam.vm"), new_directory(out.parent):
        times = uvloop.run(take_snapshot(loaded, out, options))
    if json:
        print_json({"package": str(out), "boot_to_ready_seconds": times.boot_to_ready,
                    "suspend_seconds": times.suspend, "state_bytes": times.state_bytes})
        return
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
    json: Annotated[bool, typer.Option(
        "--json", help="Print a JSON line on stdout when the VM runs and one when it was "
                       "suspended, instead of messages on stderr.")] = False,
    verbose: Verbose = False,
) -> None:
    """Resume a package until SIGINT or SIGTERM, then suspend it back into the package.

    With --from, start a registry's package lazily instead; the --tls options connect to a
    registry that requires mutual TLS.
    """
    setup_logging(verbose)
    require_root("roam run", "the VM gets a network namespace and a FUSE mount")
    try:
        forwards = [PortForward.parse(p) for p in publish or []]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--publish") from None
    if (package is None) == (from_ is None):
        raise typer.BadParameter("give a PACKAGE or --from ADDR", param_hint="PACKAGE/--from")
    if from_ is not None:
        source = address(from_, "--from")
        uvloop.run(run_from(source, name, publish or [], tls_files(tls_cert, tls_key, tls_ca)))
        return
    control.check_name(name)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def running(info: dict[str, object]) -> None:
            if json:
                print_json({"event": "running", **info}, indent=None)
            else:
                err.print(f"{name}: running (QEMU pid {info['qemu_pid']}); "
                          "SIGINT or SIGTERM suspends it")

        assert package is not None
        times = await run_package(package, name, forwards, stop, running)
        if json:
            print_json({"event": "suspended", "name": name, "package": str(package),
                        "resume_seconds": times.resume, "suspend_seconds": times.suspend,
                        "commit_seconds": times.commit,
                        "committed_bytes": times.committed_bytes}, indent=None)
            return
        err.print(f"{name}: resumed in {times.resume:.2f} s, suspended in "
                  f"{times.suspend:.2f} s; package updated "
                  f"({times.committed_bytes / 2**20:.1f} MiB written back)")

    try:
        uvloop.run(main())
    except MachineExited as exc:
        raise fail(f"{exc}; the package is unchanged") from exc


def exec_(
    name: Annotated[str, typer.Argument(help="A running VM.")],
    command: Annotated[list[str], typer.Argument(
        help="The command and its arguments, options included (roam exec web ls -la); "
             "options of roam exec go before NAME.")],
    timeout: Annotated[float, typer.Option(help="Seconds before the command is killed "
                                                "(exit status 124).")] = 30.0,
) -> None:
    """Run a command in a running VM; its output and exit code become ours."""
    if command[:1] == ["--"]:  # still accepted: `roam exec NAME -- CMD`, as before
        command = command[1:]
    if not command:
        raise typer.BadParameter("give the command to run", param_hint="COMMAND")
    result = asyncio.run(control.call(name, "exec", {"argv": command, "timeout": timeout},
                                      timeout=timeout + 30))
    sys.stdout.write(result["stdout"])
    sys.stderr.write(result["stderr"])
    if result["timed_out"]:
        raise fail(f"{' '.join(command)} timed out after {timeout:g} s (in {name})",
                   Exit.TIMEOUT)
    raise typer.Exit(result["exit_code"])


def ls(json: Json = False) -> None:
    """List the VMs of `roam run`: uptime, memory, CPUs, accelerator, published ports.
    (A peer's VMs: `roam peer ls`.)"""
    vms = listing.with_uptime(asyncio.run(control.list_vms()))
    if json:
        print_json(vms)
        return
    Console().print(listing.table(vms, states=False))


def _progress() -> Progress:
    """A byte progress bar on a terminal; nothing at all elsewhere."""
    return Progress("[progress.description]{task.description}", BarColumn(),
                    DownloadColumn(binary_units=True), TimeRemainingColumn(),
                    console=err, transient=True, disable=not terminal())


@package_app.command()
def create(
    package: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
    file: Annotated[Path, typer.Argument(help="The archive to write (.tar.zst).")],
) -> None:
    """Archive a package directory as tar + zstd with a checksum manifest."""
    check_new_file(file, "FILE")
    names = archive.package_files(package)
    total = sum((package / n).stat().st_size for n in names)
    with _progress() as bar:
        task = bar.add_task(f"packing {package.name}", total=total)
        archive.create(package, file, lambda n: bar.advance(task, n), threads=-1)
    typer.echo(f"{file}: {file.stat().st_size / 2**20:.1f} MiB")


@package_app.command()
def extract(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    directory: Annotated[Path, typer.Argument(help="A new or empty directory.")],
) -> None:
    """Unpack an archive, verifying every file; a corrupt archive is refused and leaves
    nothing behind."""
    check_directory(directory, "DIRECTORY")
    if directory.is_dir() and any(directory.iterdir()):
        raise typer.BadParameter(f"{directory} is not empty", param_hint="DIRECTORY")
    with new_directory(directory), _progress() as bar:
        task = bar.add_task(f"unpacking {file.name}", total=file.stat().st_size)
        archive.extract(file, directory, lambda n: bar.advance(task, n))
    typer.echo(f"{directory}: package verified")
