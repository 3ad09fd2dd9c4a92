"""Shared CLI plumbing: recipe loading, output directory, progress/reporting, errors, JSON."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

# logs and progress go to stderr; stdout carries only the --json document
console = Console(stderr=True, highlight=False)

RecipeOpt = typer.Option(None, "--recipe", "-r", help="Recipe YAML file or built-in name (default: quickstart).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe key: a.b=value (repeatable).")
OutOpt = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<recipe name>).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document with the result on stdout.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress output.")

EXIT_OK, EXIT_INPUT, EXIT_GATE, EXIT_INTERNAL = 0, 1, 2, 3


def load(recipe: Optional[str], sets: Optional[list[str]], extra: list[str] | None = None):
    from smcp_core.config.recipe import load_recipe

    return load_recipe(recipe, list(sets or []) + list(extra or []))


def out_dir(recipe, out: Optional[Path]) -> Path:
    return Path(out) if out else Path("runs") / recipe.name


def locked(o: Path, command: str, *, create: bool = True):
    """Exclusive lock on the run directory: a second smcp process writing into it fails at once
    (exit 1, one line); the OS releases the lock when the holder exits or is killed."""
    import contextlib
    import os

    from smcp_core.utils.fsutil import run_lock

    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 writes (and locks)
        o.mkdir(parents=True, exist_ok=True)
        return contextlib.nullcontext()
    return run_lock(o, "smcp " + command, create=create)


class RichReporter:
    """smcp_core.events.Reporter implemented with rich."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress: Progress | None = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> RichReporter:
        if not self.quiet:
            self._progress = Progress(
                TextColumn("[bold]{task.fields[label]}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console, transient=True,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def log(self, msg: str) -> None:
        if not self.quiet:
            console.print(f"[dim]·[/dim] {escape(msg)}")

    def heading(self, title: str) -> None:
        """A bold line that opens a stage (CLI-side; core messages go through :meth:`log`)."""
        if not self.quiet:
            console.print(f"[dim]·[/dim] [bold]{escape(title)}[/bold]")

    def progress(self, task: str, done: int, total: int, info: str = "") -> None:
        if self._progress is None:
            return
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(task, total=total, label=task, info=info)
        t = self._tasks[task]
        self._progress.update(t, completed=done, total=total, info=info[:60])
        if done >= total and task == "epoch":
            self._progress.update(t, completed=0)

    def metrics(self, row: dict) -> None:
        if self.quiet:
            return
        if row.get("event") == "epoch":
            top1 = f" top1 {row['top1']:.2f}%" if row.get("top1") is not None else ""
            console.print(
                f"epoch {row['epoch']:>3}  loss {row['loss']:.4f}  lr {row['lr']:.4g}{top1}  "
                f"predicted {row['predicted']:.4g}  ({row['seconds']:.1f}s)"
            )
        elif row.get("event") == "closed_loop" and "measured_ms" in row:
            console.print(
                f"  closed loop: measured {row['measured_ms']:.4g} ms (predicted {row['predicted_ms']:.4g}) vs target "
                f"{row['target_ms']:.4g} ms: {'met' if row['met'] else 'missed'}"
            )
        elif row.get("event") == "mask_update":
            console.print(
                f"[dim]  masks @ {100 * row['progress']:.0f}% of ramp: budget {row['budget']:.4g} -> cost "
                f"{row['cost']:.4g}, {row['kept_classes']} classes kept, solve {row['solve_ms']:.1f} ms[/dim]"
            )


_emitted = False
_json_stdout: Any = None  # the real stdout while a --json command runs (sys.stdout goes to stderr)


def emit(result: Any, as_json: bool) -> None:
    """Print the one JSON document of this command (at most once)."""
    global _emitted
    if as_json and not _emitted:
        _emitted = True
        out = _json_stdout or sys.stdout
        out.write(json.dumps(result, indent=2, default=str) + "\n")
        out.flush()


@contextmanager
def guarded(as_json: bool = False) -> Iterator[None]:
    """Turn library errors into one line + documented exit code (1 input, 2 gate, 3 internal)."""
    from smcp_core.errors import GateFailed, SmcpError

    global _emitted, _json_stdout
    _emitted = False
    saved = sys.stdout
    if as_json:  # stray prints of libraries must not break the one JSON document on stdout
        _json_stdout = saved
        sys.stdout = sys.stderr
    try:
        yield
    except typer.Exit:
        raise
    except GateFailed as exc:
        _fail(str(exc), EXIT_GATE, as_json, "gate")
    except SmcpError as exc:
        _fail(str(exc), EXIT_INPUT, as_json, "input")
    except KeyboardInterrupt:
        _fail("interrupted; resume with --resume (prune) or re-run (other stages)", 130, as_json, "interrupted")
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("SMCP_DEBUG"):
            traceback.print_exc()
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _fail(f"internal error: {type(exc).__name__}: {msg} (set SMCP_DEBUG=1 for the traceback)",
              EXIT_INTERNAL, as_json, "internal")
    finally:
        if as_json:
            sys.stdout = saved
            _json_stdout = None


def _fail(msg: str, code: int, as_json: bool, kind: str) -> None:
    from rich.text import Text

    msg = " ".join(msg.split())
    console.print(Text.assemble(("error:", "bold red"), " ", msg), soft_wrap=True)  # verbatim, no markup
    if as_json:
        emit({"ok": False, "error": msg, "kind": kind, "exit_code": code}, True)
    raise typer.Exit(code)
