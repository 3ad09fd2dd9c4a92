"""smcp prune: SMCP soft-mask fine-tuning until the latency target is met."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

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


def prune(
    recipe: Optional[str] = RecipeOpt,
    set_: Optional[list[str]] = SetOpt,
    out: Optional[Path] = OutOpt,
    resume: bool = typer.Option(False, "--resume", help=(
        "Continue from OUT/prune/checkpoint.pt.  Without it the prune starts over: it deletes "
        "OUT/prune/checkpoint.pt (an interrupted prune's work), metrics.csv and weight_masks.pt.")),
    force_table: bool = typer.Option(False, "--force-table",
                                     help="Use a latency table measured on another device/setting."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Fine-tune with soft input-channel masks; writes OUT/prune/pruned.pt and summary.json.

    Without --resume this starts over and discards OUT/prune/checkpoint.pt."""
    with guarded(as_json):
        r = load(recipe, set_)
        o = out_dir(r, out)
        with locked(o, "prune"):
            import os

            from smcp_core import stages

            check_run_dir(o, "prune")
            if not resume:  # a model with nothing to prune: one line before any data or table is read
                from smcp_core.stages.registry import check_prunable

                check_prunable(r)
            rank = int(os.environ.get("RANK", "0"))
            if rank > 0:  # torchrun: the other ranks train silently, rank 0 reports and writes
                quiet = True
            else:
                stages.write_resolved(r, o)
            with RichReporter(quiet) as rep:
                s = stages.prune(r, o, reporter=rep, resume=resume, force_table=force_table).to_dict()
            if not quiet:
                t = s["target"]
                pred = (f"predicted {s['predicted_ms']:.3f} ms ({s['predicted_speedup']:.2f}x)"
                        if s.get("predicted_ms") is not None else f"cost {s['final_cost']:.4g} {s['cost_unit']}")
                top1 = f", top-1 {s['top1']:.2f}%" if s.get("top1") is not None else ""
                console.print(
                    f"[green]pruned[/green] to {pred} for target {t['kind']}={t['value']}; "
                    f"FLOPs x{s['flops_ratio']:.3f}, params x{s['params_ratio']:.3f}{top1} ({s['seconds']:.0f}s)"
                )
            if rank == 0:
                emit({"ok": True, **{k: v for k, v in s.items() if k != "history"}}, as_json)
