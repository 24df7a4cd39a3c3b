"""The `roam` command. Each part of roam adds its own command group here."""

from __future__ import annotations

import typer

from roam.cli import blueprint, device, exits, fuse, nbd, peer, vm

app = typer.Typer(
    name="roam",
    help="Run Linux VMs anywhere and live-migrate them between hosts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    epilog=exits.TABLE,
)
app.add_typer(device.app, name="device")
app.add_typer(blueprint.app, name="blueprint")
app.add_typer(fuse.app, name="fuse")
app.add_typer(nbd.app, name="nbd")
app.add_typer(peer.app, name="peer")
app.add_typer(peer.registry_app, name="registry")
app.add_typer(vm.package_app, name="package")
app.command()(vm.snapshot)
app.command()(vm.run)
app.command("exec")(vm.exec_)
app.command()(vm.ls)
app.command(epilog=exits.TABLE)(peer.migrate)
app.command()(peer.terminate)
app.command()(peer.mount)

if __name__ == "__main__":
    app()
