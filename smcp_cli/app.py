"""The `smcp` command: profile, prune, slim, export, run, inspect, report, compare.

Exit codes: 0 success; 1 bad input (recipe, file, model, arguments) with one line on stderr;
2 a validation gate failed (target missed, parity out of tolerance); 3 internal error;
130 interrupted (SIGINT); 143 terminated (SIGTERM); 141 stdout closed early (broken pipe).
``smcp`` without a command prints one line listing the commands (exit 1).
"""

from __future__ import annotations

import errno
import os
import signal
import sys


def _terminated_while_importing(signum: int, frame) -> None:
    """SIGTERM while the `smcp` process imports its modules (before :func:`main` runs): the one
    line (and the --json document) and exit 143; SystemExit leaves the import without a traceback."""
    msg = "terminated (SIGTERM) while smcp was starting; nothing was written, run the command again"
    sys.stderr.write(f"error: {msg}\n")
    if "--json" in sys.argv[1:]:
        import json

        sys.stdout.write(json.dumps({"ok": False, "error": msg, "kind": "interrupted", "exit_code": 143}) + "\n")
    sys.exit(143)


def _is_smcp_process() -> bool:
    """This process is the `smcp` command (console script or `python -m smcp_cli`), not a program
    importing smcp_cli (tests call main() in-process and keep their own handlers)."""
    argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return os.path.basename(argv0) == "smcp" or argv0.endswith(os.path.join("smcp_cli", "__main__.py"))


if _is_smcp_process() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _terminated_while_importing)  # as early as this module can

import typer  # noqa: E402

from smcp_cli.commands.compare import compare  # noqa: E402
from smcp_cli.commands.export import export  # noqa: E402
from smcp_cli.commands.inspect_cmd import inspect  # noqa: E402
from smcp_cli.commands.profile import profile  # noqa: E402
from smcp_cli.commands.prune import prune  # noqa: E402
from smcp_cli.commands.report import report  # noqa: E402
from smcp_cli.commands.run import run  # noqa: E402
from smcp_cli.commands.slim import slim  # noqa: E402

app = typer.Typer(
    name="smcp",
    help="Prune a trained CNN until it meets a measured latency target (SMCP), slim it, export it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
COMMANDS = {"profile": profile, "prune": prune, "slim": slim, "export": export, "run": run, "inspect": inspect,
            "report": report, "compare": compare}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)


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
    # the flag, never the environment, opens unpickling: set (or reset, for in-process callers) the
    # library's switch on every command; torch is imported only when it must be switched on
    if trust_checkpoint:
        from smcp_core.stages.builders import set_trust_checkpoint

        set_trust_checkpoint(True)
    elif "smcp_core.stages.builders" in sys.modules:
        sys.modules["smcp_core.stages.builders"].set_trust_checkpoint(False)


def _usage_error(msg: str, argv: list[str], code: int = 1, kind: str = "usage") -> None:
    """One line on stderr; with --json also the error document on stdout (CI parses stdout)."""
    msg = " ".join(msg.split())
    sys.stderr.write(f"error: {msg}\n")
    if "--json" in argv:
        import json

        sys.stdout.write(json.dumps({"ok": False, "error": msg, "kind": kind, "exit_code": code}, indent=2) + "\n")
        sys.stdout.flush()
    sys.exit(code)


def _quiet_broken_pipe() -> None:
    """stdout's reader went away (`smcp --help | head`): point stdout at /dev/null so that the
    interpreter's final flush does not print a second BrokenPipeError, and exit 141 (128 + SIGPIPE,
    what a shell reports for a process killed by the broken pipe) without a message."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (tests redirect it)
        pass
    sys.exit(EXIT_BROKEN_PIPE)


def _is_broken_pipe(exc: BaseException) -> bool:
    """The exception, or the one it was raised while handling (rich and click raise SystemExit(1)
    from a BrokenPipeError), is a broken pipe."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 5:
        if isinstance(e, BrokenPipeError) or (isinstance(e, OSError) and e.errno == errno.EPIPE):
            return True
        e, seen = e.__context__, seen + 1
    return False


EXIT_BROKEN_PIPE, EXIT_TERMINATED = 141, 143


class _TerminatedOutsideCommand(BaseException):
    """SIGTERM before a command's guard is installed (argument parsing) or after it is removed:
    not a KeyboardInterrupt, so that click does not turn it into an Abort (after an empty line)."""


def _on_early_sigterm(signum: int, frame) -> None:
    from smcp_cli import common

    common._terminated = True
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise _TerminatedOutsideCommand()


def _install_sigterm():
    """SIGTERM handled from the first line of :func:`main` (before that, while Python imports this
    module, the default action ends the process with status 143 and no output).  Returns the handler
    it replaced, or None when it cannot be set (not the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, _on_early_sigterm)
    except (ValueError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    previous = _install_sigterm()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args)
    except _TerminatedOutsideCommand:
        from smcp_cli import common

        # a command that already wrote its --json document gets no second one
        _usage_error("terminated (SIGTERM) outside a running stage; files written so far are kept, run the "
                     "command again", [] if common._emitted else args, EXIT_TERMINATED, "interrupted")
    except SystemExit as exc:  # rich and click answer a broken pipe with SystemExit(1)
        if _is_broken_pipe(exc):
            _quiet_broken_pipe()
        raise
    except OSError as exc:
        if _is_broken_pipe(exc):
            _quiet_broken_pipe()
        raise
    finally:
        if previous is not None:  # in-process callers (tests) get their handler back
            try:
                signal.signal(signal.SIGTERM, previous)
            except (ValueError, TypeError):
                pass


NO_COMMAND = ("no command given; usage: smcp COMMAND [OPTIONS], COMMAND one of " + ", ".join(COMMANDS)
              + " (`smcp --help` describes them, `smcp COMMAND --help` their options)")


def _main(args: list[str]) -> int:
    # typer 0.29 bundles its own click (typer._click) without Abort/Exit: those live in typer.exceptions
    from typer._click import exceptions as cx
    from typer.exceptions import Abort

    from smcp_cli import common

    common._terminated = common._emitted = False
    if not args or args == ["--json"]:  # not click's help on stdout followed by an empty error line
        _usage_error(NO_COMMAND, args)
    cmd = typer.main.get_command(app)
    try:
        rv = cmd.main(args=args, prog_name="smcp", standalone_mode=False)
    except cx.UsageError as exc:  # bad arguments are bad input: exit 1, one line
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        _usage_error(f"{exc.format_message()}{hint}", args)
    except Abort:  # Ctrl-C (or SIGTERM that reached click as a KeyboardInterrupt) while parsing
        if common._terminated:
            _usage_error("terminated (SIGTERM); run the command again", args, common.EXIT_TERMINATED, "interrupted")
        _usage_error("aborted", args, 130, "interrupted")
    except cx.ClickException as exc:
        _usage_error(exc.format_message(), args)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    code = rv if isinstance(rv, int) else 0
    if code == 130 and common._terminated:  # SIGTERM that reached typer (outside a command's guard)
        code = common.EXIT_TERMINATED
    sys.exit(code)
