"""The `smcp` command: profile, prune, slim, export, run, inspect, report, compare.

Exit codes: 0 success; 1 bad input (recipe, file, model, arguments) with one line on stderr;
2 a validation gate failed (target missed, parity out of tolerance); 3 internal error;
130 interrupted.
"""

from __future__ import annotations

import sys

import typer

from smcp_cli.commands.compare import compare
from smcp_cli.commands.export import export
from smcp_cli.commands.inspect_cmd import inspect
from smcp_cli.commands.profile import profile
from smcp_cli.commands.prune import prune
from smcp_cli.commands.report import report
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
app.command("report")(report)
app.command("compare")(compare)


def _version(value: bool) -> None:
    if value:
        from smcp_core import __version__

        typer.echo(f"smcp {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          trust_checkpoint: bool = typer.Option(
              False, "--trust-checkpoint",
              help="Allow model.checkpoint files that need full unpickling (runs code from the file: only for "
                   "files you trust). Default: torch.load(weights_only=True).")) -> None:
    """smcp: Soft Masking for Cost-Constrained Channel Pruning, from recipe to measured deployment."""
    if trust_checkpoint:
        import os

        os.environ["SMCP_TRUST_CHECKPOINT"] = "1"


def _usage_error(msg: str, argv: list[str], code: int = 1, kind: str = "usage") -> None:
    """One line on stderr; with --json also the error document on stdout (CI parses stdout)."""
    msg = " ".join(msg.split())
    sys.stderr.write(f"error: {msg}\n")
    if "--json" in argv:
        import json

        sys.stdout.write(json.dumps({"ok": False, "error": msg, "kind": kind, "exit_code": code}, indent=2) + "\n")
        sys.stdout.flush()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    from typer._click import exceptions as cx

    args = list(sys.argv[1:] if argv is None else argv)
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=args, prog_name="smcp", standalone_mode=False)
    except cx.UsageError as exc:  # bad arguments are bad input: exit 1, one line
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        _usage_error(f"{exc.format_message()}{hint}", args)
    except cx.Abort:
        _usage_error("aborted", args, 130, "interrupted")
    except cx.ClickException as exc:
        _usage_error(exc.format_message(), args)
    except cx.Exit as exc:
        sys.exit(exc.exit_code)
    code = rv if isinstance(rv, int) else 0
    sys.exit(code)
