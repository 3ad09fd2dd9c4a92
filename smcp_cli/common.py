"""Shared CLI plumbing: recipe loading, output directory, progress/reporting, errors, JSON."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
import traceback
import warnings
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

from smcp_core.utils.text import first_line  # light: no torch, keeps --help fast

# logs and progress go to stderr; stdout carries only the --json document
console = Console(stderr=True, highlight=False)

RecipeOpt = typer.Option(None, "--recipe", "-r", help="Recipe YAML file or built-in name (default: quickstart).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe key: a.b=value (repeatable).")
OutOpt = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<recipe name>).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document with the result on stdout.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress output.")

EXIT_OK, EXIT_INPUT, EXIT_GATE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # SIGINT / SIGTERM (128 + signal number)


def load(recipe: Optional[str], sets: Optional[list[str]], extra: list[str] | None = None, *, trt: bool = False):
    """The recipe with ``--set`` overrides; ``trt`` (``--trt``) adds ``trt`` to ``export.formats``, so
    the export stamp sees it (a run exported without engines is not "up to date" for ``--trt``)."""
    from smcp_core.config.recipe import load_recipe

    overrides = list(sets or []) + list(extra or [])
    r = load_recipe(recipe, overrides)
    if trt and "trt" not in r.export.formats:
        r = load_recipe(recipe, [*overrides, f"export.formats=[{', '.join([*r.export.formats, 'trt'])}]"])
    return r


def out_dir(recipe, out: Optional[Path]) -> Path:
    return Path(out) if out else Path("runs") / recipe.name


def _file_in_the_way(o: Path) -> bool:
    """``o``, or the nearest of its parents that exists, is a file (not a directory)."""
    for p in (o, *o.parents):
        try:
            if p.exists():
                return not p.is_dir()
        except OSError:  # a name too long: the stage's own access says so
            return False
    return False


def locked(o: Path, command: str, *, create: bool = True):
    """Exclusive lock on the run directory: a second smcp process writing into it fails at once
    (exit 1, one line); the OS releases the lock when the holder exits or is killed."""
    import contextlib
    import os

    from smcp_core.utils.fsutil import run_lock

    if not create and _file_in_the_way(o):  # not "pruned checkpoint OUT/prune/pruned.pt not found"
        from smcp_core.utils.fsutil import run_dir_error

        raise run_dir_error(o, OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(o)))
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 writes (and locks)
        from smcp_core.utils.fsutil import make_run_dir

        make_run_dir(o)
        return contextlib.nullcontext()
    return run_lock(o, "smcp " + command, create=create)


def check_run_dir(o: Path, command: str) -> None:
    """Before ``command`` writes anything: the JSON artifacts it reads from ``o`` are intact and of
    the right structure (one line naming the file and key otherwise)."""
    from smcp_core.stages.artifacts import check_json_artifacts

    check_json_artifacts(o, command)


class RichReporter:
    """smcp_core.events.Reporter implemented with rich."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._progress: Progress | None = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> RichReporter:
        # not on a terminal a transient bar shows nothing but leaves an empty line at the top of stderr
        if not self.quiet and console.is_terminal:
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
_deferred = False  # inside guarded(): the document is written when the command ends
_pending: Any = None  # the document emit() was given, not yet written
_terminated = False  # SIGTERM arrived during this command


def _write_doc(doc: Any) -> None:
    out = _json_stdout or sys.stdout
    out.write(json.dumps(doc, indent=2, default=str) + "\n")
    out.flush()


def emit(result: Any, as_json: bool) -> None:
    """Print the one JSON document of this command (at most once).

    Inside :func:`guarded` the document is held until the command ends, so that a failure after
    it (a gate, an interrupt) turns it into the failure document: the result plus ``ok: false``,
    ``error``, ``kind`` and ``exit_code``."""
    global _emitted, _pending
    if as_json and not _emitted:
        _emitted = True
        if _deferred:
            _pending = result
        else:
            _write_doc(result)


def _flush_pending() -> None:
    global _pending
    if _pending is not None:
        doc, _pending = _pending, None
        _write_doc(doc)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs (atomic writes
    roll back their temp files, the run lock is released, the --json document is written)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    global _terminated
    _terminated = True
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def _user_model_frame(exc: BaseException) -> str | None:
    """``file:line`` of the deepest frame of a user model file (``model.source: file.py:factory``)."""
    where = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if str(frame.f_globals.get("__name__", "")).startswith("smcp_user_model_"):
            where = f"{frame.f_code.co_filename}:{lineno}"
    return where


_OOM_HINT = ("lower data.batch_size (training), profile.batch_size / export.batch_size (timing and export) "
             "or model.input_size")
_ENV_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG,
               errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


def _os_error_message(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else "a file"
    fix = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (quota exceeded)",
           errno.ENAMETOOLONG: "use a shorter recipe `name` or --out",
           errno.ELOOP: "remove the symbolic link loop"}.get(
        exc.errno, "make the path writable, remove what is in the way, or use another --out")
    return f"cannot write {where}: {exc.strerror or first_line(exc)}; {fix}"


@contextmanager
def guarded(as_json: bool = False) -> Iterator[None]:
    """Turn library errors into one line + documented exit code (1 input, 2 gate, 3 internal,
    130 SIGINT, 143 SIGTERM)."""
    from smcp_core.errors import GateFailed, SmcpError

    global _emitted, _json_stdout, _deferred, _pending, _terminated
    _emitted, _deferred, _pending, _terminated = False, True, None, False
    saved = sys.stdout
    if as_json:  # stray prints of libraries must not break the one JSON document on stdout
        _json_stdout = saved
        sys.stdout = sys.stderr
    caught = warnings.catch_warnings()
    caught.__enter__()
    if not os.environ.get("SMCP_DEBUG"):  # torch's UserWarnings are noise on a command's stderr
        warnings.simplefilter("ignore", UserWarning)
    old_term, installed = None, threading.current_thread() is threading.main_thread()
    if installed:  # signal handlers can only be set (and only run) in the main thread
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except typer.Exit:
        raise
    except GateFailed as exc:
        _fail(str(exc), EXIT_GATE, as_json, "gate")
    except SmcpError as exc:
        _fail(str(exc), EXIT_INPUT, as_json, "input")
    except KeyboardInterrupt:
        _fail("interrupted; files written so far are kept; an interrupted prune continues with `smcp run --resume` "
              "or `smcp prune --resume`, other commands: run them again", 130, as_json, "interrupted")
    except SystemExit as exc:
        where = _user_model_frame(exc)
        if where is None:
            raise
        _fail(f"model file {where} called sys.exit({exc.code!r}) while smcp imported it or built the model; "
              "keep script code under `if __name__ == \"__main__\":`", EXIT_INPUT, as_json, "input")
    except MemoryError:
        _fail(f"out of memory; {_OOM_HINT}", EXIT_INPUT, as_json, "input")
    except RuntimeError as exc:  # torch: "DefaultCPUAllocator: can't allocate memory", "CUDA out of memory"
        text = first_line(exc)
        if "can't allocate memory" in text or "out of memory" in text.lower():
            _fail(f"out of memory ({' '.join(text.split())[:160]}); {_OOM_HINT}", EXIT_INPUT, as_json, "input")
        _internal(exc, as_json)
    except OSError as exc:  # read-only, full or blocked paths are the environment, not a bug
        if exc.errno in _ENV_ERRNOS:
            _fail(_os_error_message(exc), EXIT_INPUT, as_json, "input")
        _internal(exc, as_json)
    except Exception as exc:  # noqa: BLE001
        _internal(exc, as_json)
    finally:
        caught.__exit__(None, None, None)
        if installed:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if old_term is None else old_term)
            except (ValueError, TypeError):
                pass
        _flush_pending()
        _deferred = False
        if as_json:
            sys.stdout = saved
            _json_stdout = None


def _internal(exc: BaseException, as_json: bool) -> None:
    if os.environ.get("SMCP_DEBUG"):
        traceback.print_exc()
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    _fail(f"internal error: {type(exc).__name__}: {msg} (set SMCP_DEBUG=1 for the traceback)",
          EXIT_INTERNAL, as_json, "internal")


def _fail(msg: str, code: int, as_json: bool, kind: str) -> None:
    from rich.text import Text

    global _pending, _emitted
    if kind == "interrupted" and _terminated:
        code = EXIT_TERMINATED
    msg = " ".join(msg.split())
    console.print(Text.assemble(("error:", "bold red"), " ", msg), soft_wrap=True)  # verbatim, no markup
    if as_json and (_pending is not None or not _emitted):
        # the result document emit() holds (a gate failing after it) becomes the failure document
        result = _pending if isinstance(_pending, dict) else {}
        doc = {**result, "ok": False, "error": msg, "kind": kind, "exit_code": code}
        _pending, _emitted = None, True
        _write_doc(doc)
    raise typer.Exit(code)
