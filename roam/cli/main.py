"""The `roam` command. Each part of roam adds its own command group here.

`main` is the entry point: it runs the command tree and turns whatever a command raises
into the one error line of roam.cli.common (the traceback only with `roam --debug`).
"""

from __future__ import annotations

import enum
import logging
import platform
import sys
from importlib import metadata
from typing import Annotated, NoReturn

import typer

# typer carries its own copy of click; its exception types are not re-exported, and the
# one error line needs to tell usage errors (and `roam GROUP` alone) from the rest.
from typer._click import exceptions as usage

from roam.cli import (
    blueprint,
    control,
    device,
    doctor,
    exits,
    fuse,
    logs,
    nbd,
    node,
    peer,
    spot,
    vm,
)
from roam.cli.common import configure_logging, describe, report, settings
from roam.errors import RoamError

# Help texts are plain text: Rich markup would read `[/udp]` in an option's help as a
# closing tag and crash `--help` (it did, for `roam run`).
app = typer.Typer(
    name="roam",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    epilog=exits.TABLE,
    rich_markup_mode=None,
)

class LogLevel(enum.StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _version(show: bool) -> None:
    if show:
        try:
            version = metadata.version("roam")
        except metadata.PackageNotFoundError:  # run from a checkout that was not installed
            version = "(not installed)"
        typer.echo(f"roam {version} (Python {platform.python_version()})")
        raise typer.Exit()


@app.callback()
def options(
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Log debug details, of roam and of what it uses.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Log only warnings and errors.")] = False,
    log_level: Annotated[LogLevel | None, typer.Option(
        case_sensitive=False, help="Log from this level on (default info).")] = None,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Print the traceback of an error, not only its one line.")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print roam's version.")] = False,
) -> None:
    """Run Linux VMs anywhere and live-migrate them between hosts.

    The options below go before the command (roam -v migrate ...). Every command has
    --help; `roam doctor` says what this host lacks, docs/QUICKSTART.md runs a first VM.
    An error is one line on stderr; exit status 1 is a failure, 2 a usage error.
    """
    if sum((verbose, quiet, log_level is not None)) > 1:
        raise typer.BadParameter("give one of them", param_hint="-v/-q/--log-level")
    settings.debug = debug
    level = (logging.DEBUG if verbose else logging.WARNING if quiet
             else logging.getLevelNamesMapping()[(log_level or LogLevel.info).upper()])
    configure_logging(level)


app.add_typer(device.app, name="device")
app.add_typer(blueprint.app, name="blueprint")
app.add_typer(fuse.app, name="fuse")
app.add_typer(nbd.app, name="nbd")
app.add_typer(peer.app, name="peer")
app.add_typer(peer.registry_app, name="registry")
app.add_typer(spot.app, name="spot")
app.add_typer(vm.package_app, name="package")
app.add_typer(control.app, name="control")
app.add_typer(node.app, name="node")
app.command()(vm.snapshot)
app.command()(vm.run)
# Everything after NAME is the guest's command line, its options included: `roam exec web
# ls -la` (options of roam exec itself go before NAME).
app.command("exec", context_settings={"allow_interspersed_args": False})(vm.exec_)
app.command()(vm.ls)
app.command(epilog=exits.TABLE)(peer.migrate)
app.command()(peer.terminate)
app.command()(peer.mount)
app.command("doctor")(doctor.doctor)
app.command("logs")(logs.logs)


def _hint(exc: usage.BadParameter) -> str | None:
    """The option or argument a bad value was given to, as the user typed it."""
    if exc.param_hint is not None:
        return exc.param_hint if isinstance(exc.param_hint, str) else "/".join(exc.param_hint)
    if exc.param is None:
        return None
    return exc.param.get_error_hint().replace("'", "")


def _usage_line(exc: usage.UsageError) -> str:
    if isinstance(exc, usage.BadParameter) and not isinstance(exc, usage.MissingParameter):
        hint = _hint(exc)
        what = exc.message.rstrip(".")
        return what if hint is None else f"{what} ({hint})"
    return exc.format_message().rstrip(".")


def main(args: list[str] | None = None) -> NoReturn:
    """Run `roam ARGS` and exit with its status; every error ends as one line."""
    command = typer.main.get_command(app)
    try:
        status = command.main(args, prog_name="roam", standalone_mode=False)
    except usage.NoArgsIsHelpError as exc:
        exc.show()  # `roam` or `roam GROUP` alone: the help
        status = exc.exit_code
    except usage.UsageError as exc:
        report(_usage_line(exc))
        status = exc.exit_code
    except typer.TyperException as exc:
        report(exc.format_message())
        status = exc.exit_code
    except typer.Abort:
        report("aborted")
        status = 1
    except RoamError as exc:  # every error of roam's own: its code picks the exit code
        report(describe(exc))
        status = exits.for_code(exc.code)
    except OSError as exc:  # a file, socket or device the command was given
        report(describe(exc))
        status = exits.Exit.FAILED
    except Exception as exc:
        report(f"internal error, {type(exc).__name__}: {describe(exc)} (roam --debug "
               "shows where)")
        status = 1
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
