"""The `smcp` command: profile, prune, slim, export, run, inspect.

Exit codes: 0 success; 1 bad input (recipe, file, model, arguments) with one line on stderr;
2 a validation gate failed (target missed, parity out of tolerance); 3 internal error;
130 interrupted.
"""

from __future__ import annotations

import sys

import typer

from smcp_cli.commands.export import export
from smcp_cli.commands.inspect_cmd import inspect
from smcp_cli.commands.profile import profile
from smcp_cli.commands.prune import prune
from smcp_cli.commands.run import run
from smcp_cli.commands.slim import slim

app = typer.Typer(
    name="smcp",
    help="Prune a trained CNN until it meets a measured latency target (SMCP), slim it, export it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
app.command("profile")(profile)
app.command("prune")(prune)
app.command("slim")(slim)
app.command("export")(export)
app.command("run")(run)
app.command("inspect")(inspect)


def _version(value: bool) -> None:
    if value:
        from smcp_core import __version__

        typer.echo(f"smcp {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """smcp: Soft Masking for Cost-Constrained Channel Pruning, from recipe to measured deployment."""


def main(argv: list[str] | None = None) -> int:
    from typer._click import exceptions as cx

    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=argv, prog_name="smcp", standalone_mode=False)
    except cx.UsageError as exc:  # bad arguments are bad input: exit 1, one line
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        sys.stderr.write(f"error: {exc.format_message()}{hint}\n")
        sys.exit(1)
    except cx.Abort:
        sys.stderr.write("error: aborted\n")
        sys.exit(130)
    except cx.ClickException as exc:
        sys.stderr.write(f"error: {exc.format_message()}\n")
        sys.exit(1)
    except cx.Exit as exc:
        sys.exit(exc.exit_code)
    code = rv if isinstance(rv, int) else 0
    sys.exit(code)
