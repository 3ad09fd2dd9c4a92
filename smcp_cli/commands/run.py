"""smcp run: profile -> prune -> slim -> export, skipping stages that are up to date."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from smcp_cli.commands.export import print_report
from smcp_cli.common import (
    JsonOpt,
    OutOpt,
    QuietOpt,
    RecipeOpt,
    RichReporter,
    SetOpt,
    check_run_dir,
    console,
    emit,
    guarded,
    load,
    locked,
    out_dir,
)


def run(
    recipe: Optional[str] = RecipeOpt,
    set_: Optional[list[str]] = SetOpt,
    out: Optional[Path] = OutOpt,
    force: bool = typer.Option(False, "--force", help=(
        "Re-run every stage even if its outputs are up to date (the latency table is re-measured from "
        "scratch, so a corrupt or truncated artifact is re-created); the prune starts over (an "
        "interrupted prune's OUT/prune/checkpoint.pt is deleted) unless --resume is given too.")),
    resume: bool = typer.Option(False, "--resume", help=(
        "Continue an interrupted prune from OUT/prune/checkpoint.pt (the other stages run or are "
        "skipped as usual).")),
    trt: bool = typer.Option(False, "--trt", help="Time the baseline and pruned models as TensorRT engines (export.trt_precision, fp16 by default) and gate on them; needs tensorrt and a CUDA GPU."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Run the whole chain into OUT (default runs/<recipe name>).

    An interrupted prune (OUT/prune/checkpoint.pt while the prune is not up to date) is never
    discarded unasked: pass --resume to continue it or --force to start over; without either the
    run stops with exit 1 before any stage runs."""
    with guarded(as_json):
        r = load(recipe, set_, trt=trt)
        o = out_dir(r, out)
        with locked(o, "run"):
            from smcp_core import stages
            from smcp_core.stages.pruning import refuse_to_discard_checkpoint
            from smcp_core.stages.registry import check_prunable

            if not force:  # --force re-creates them (a corrupt one included)
                check_run_dir(o, "run")
            if not force and not resume:
                refuse_to_discard_checkpoint(r, o)
            stages.write_resolved(r, o)
            results: dict = {"out": str(o), "stages": {}}
            with RichReporter(quiet) as rep:
                options = {"trt": trt, "resume": resume, "force": force}
                checked = False
                for stage in stages.PIPELINE:
                    if not force and stages.up_to_date(r, o, stage.name):
                        rep.log(f"{stage.name}: up to date, skipped")
                        results["stages"][stage.name] = "skipped"
                        continue
                    if stage.needs_prunable and not checked:  # before profiling, not after it
                        check_prunable(r)
                        checked = True
                    rep.heading(stage.name)
                    res = stage.run(r, o, reporter=rep, **{k: options[k] for k in stage.options})
                    if res.headline():
                        rep.log(res.headline())
                    results["stages"][stage.name] = "done"
                    results[stage.name] = res.brief()
            from smcp_core.utils.fsutil import read_json

            report = read_json(o / "export" / "report.json", "export report")
            if not quiet:
                print_report(report)
                console.print(f"artifacts in {o}/ (report: {o / 'export' / 'report.json'})", markup=False)
            results["report"] = report
            emit({"ok": report["passed"], **results}, as_json)
            stages.gate(stages.ExportResult.from_dict(report))
