"""smcp slim: physically remove the pruned channels."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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


def slim(
    recipe: Optional[str] = RecipeOpt,
    set_: Optional[list[str]] = SetOpt,
    out: Optional[Path] = OutOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Remove masked channels (torch.fx); checks the slim model equals the masked one."""
    with guarded(as_json):
        r = load(recipe, set_)
        o = out_dir(r, out)
        with locked(o, "slim", create=False):  # missing run dir: the stage says what is missing
            from smcp_core import stages

            check_run_dir(o, "slim")
            with RichReporter(quiet) as rep:
                s = stages.slim(r, o, reporter=rep).to_dict()
            if not quiet:
                console.print(
                    f"[green]slim[/green] {o / 'slim'}: params {s['params_full']:,} -> {s['params']:,}, "
                    f"MACs {s['flops_full']:,} -> {s['flops']:,}; max |slim - masked| = {s['max_abs_diff']:.2e}"
                )
            emit({"ok": True, **s}, as_json)
