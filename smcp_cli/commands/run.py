"""smcp run: profile -> prune -> slim -> export, skipping stages that are up to date."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from smcp_cli.common import (JsonOpt, OutOpt, QuietOpt, RecipeOpt, RichReporter, SetOpt, console, emit,
                             guarded, load, locked, out_dir)
from smcp_cli.commands.export import print_report


def run(
    recipe: Optional[str] = RecipeOpt,
    set_: Optional[list[str]] = SetOpt,
    out: Optional[Path] = OutOpt,
    force: bool = typer.Option(False, "--force", help="Re-run every stage even if its outputs are up to date."),
    trt: bool = typer.Option(False, "--trt", help="Also build a TensorRT engine at export."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Run the whole chain into OUT (default runs/<recipe name>)."""
    with guarded(as_json):
        r = load(recipe, set_)
        o = out_dir(r, out)
        with locked(o, "run"):
            from smcp_core import pipeline

            pipeline.write_resolved(r, o)
            results: dict = {"out": str(o), "stages": {}}
            with RichReporter(quiet) as rep:
                for stage in pipeline.STAGES:
                    if not force and pipeline.up_to_date(r, o, stage):
                        rep.log(f"{stage}: up to date, skipped")
                        results["stages"][stage] = "skipped"
                        continue
                    rep.heading(stage)
                    if stage == "profile":
                        res = pipeline.profile(r, o, reporter=rep)
                        rep.log(f"baseline {res['baseline_ms']:.3f} ms; table {res['path']}")
                    elif stage == "prune":
                        res = pipeline.prune(r, o, reporter=rep)
                        res = {k: v for k, v in res.items() if k not in ("history", "layers")}
                    elif stage == "slim":
                        res = pipeline.slim(r, o, reporter=rep)
                    else:
                        res = pipeline.export(r, o, reporter=rep, trt=trt)
                    results["stages"][stage] = "done"
                    results[stage] = res
            from smcp_core.fsutil import read_json

            report = read_json(o / "export" / "report.json", "export report")
            if not quiet:
                print_report(report)
                console.print(f"artifacts in {o}/ (report: {o / 'export' / 'report.json'})", markup=False)
            results["report"] = report
            emit({"ok": report["passed"], **results}, as_json)
            pipeline.gate(report)
