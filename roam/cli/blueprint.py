"""`roam blueprint`: build the guest OS (kernel, initramfs, root disk) that VMs boot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from roam.blueprint import BuildOptions, build, cache_root
from roam.cli.common import Verbose, check_directory, new_directory, setup_logging, steps

app = typer.Typer(help="Build guest blueprints from Debian packages.", no_args_is_help=True)

FileOption = Annotated[Path | None, typer.Option(exists=True, dir_okay=False,
                                                 resolve_path=True)]
MIN_DISK_MIB = 64  # below this mkfs.ext4 cannot hold even a minimal root


@app.command("build")
def build_command(
    out: Annotated[Path, typer.Option(help="Directory that receives the blueprint.")],
    kernel: FileOption = None,
    initramfs: FileOption = None,
    rootfs: FileOption = None,
    disk_size: Annotated[int, typer.Option(help="Root disk size in MiB.",
                                           min=MIN_DISK_MIB)] = 1024,
    package: Annotated[list[str] | None, typer.Option(
        help="Debian package for the root disk (repeat; replaces the default set).")] = None,
    verbose: Verbose = False,
) -> None:
    """Build (or take from the cache) a blueprint and copy it to --out.

    --kernel/--initramfs/--rootfs use your own files instead of building those parts
    (e.g. a PVM guest kernel). The cache lives in $ROAM_CACHE, default ~/.cache/roam.
    """
    setup_logging(verbose)
    check_directory(out, "--out")
    if initramfs is not None and kernel is None:
        raise typer.BadParameter("goes with --kernel: the Debian kernel gets roam's",
                                 param_hint="--initramfs")
    defaults = BuildOptions()
    options = BuildOptions(
        packages=tuple(package) if package else defaults.packages,
        disk_size_mib=disk_size,
        kernel=kernel,
        initramfs=initramfs,
        rootfs=rootfs,
    )
    with steps("blueprint", "roam.blueprint"), new_directory(out):
        blueprint = build(options, out=out, cache=cache_root())
    size = blueprint.rootfs.stat().st_blocks * 512
    typer.echo(f"blueprint {blueprint.hash} in {out} (root disk uses {size / 2**20:.0f} MiB)")
