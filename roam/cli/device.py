"""`roam device`: migrate files as a device group (placeholder until the engine lands)."""

import typer

app = typer.Typer(help="Serve and receive device groups over the migration protocol.",
                  no_args_is_help=True)
