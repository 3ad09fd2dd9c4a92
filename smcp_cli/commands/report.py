"""smcp report: plots and a Markdown/HTML summary of a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from smcp_cli.common import JsonOpt, QuietOpt, console, emit, guarded


def report(
    run_dir: Path = typer.Argument(..., help="A run directory (the --out of smcp run/prune/export)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Where to write the report (default: RUN_DIR/report)."),
    html: bool = typer.Option(True, "--html/--no-html", help="Also write report.html with the images inlined."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Plot kept channels, training curves and predicted vs measured latency (report.md, .html).

    Kept channels per layer, budget / predicted cost / top-1 over training, predicted vs measured
    latency; needs matplotlib (the `report` extra of smcp)."""
    with guarded(as_json):
        from smcp_core.analysis.report import make_report

        res = make_report(run_dir, out, html_report=html)
        if not quiet:
            console.print(f"[green]report[/green] {escape(str(res['files']['markdown']))}"
                          + (f" and {escape(str(res['files']['html']))}" if "html" in res["files"] else ""))
            for k in ("channels", "training", "latency"):
                if k in res["files"]:
                    console.print(f"  {k:<9} {escape(str(res['files'][k]))}")
                else:
                    console.print(f"  {k:<9} [dim]skipped (no data in the run yet)[/dim]")
            console.print(f"  {res['artifacts_checked']} artifacts verified")
        emit({"ok": True, **res}, as_json)
