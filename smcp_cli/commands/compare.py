"""smcp compare: prune the same recipe with several methods and time every result side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from smcp_cli.common import (
    JsonOpt,
    QuietOpt,
    RecipeOpt,
    RichReporter,
    SetOpt,
    console,
    emit,
    guarded,
    load,
    locked,
)


def print_compare(res: dict) -> None:
    from rich.table import Table

    from smcp_core.analysis.compare import HEADERS, table_rows

    t = res["target"]
    table = Table(title=f"smcp compare — {res['recipe']}: target {t['kind']}={t['value']}; "
                        f"{res['backend']} / {res['device']}, batch {res['batch_size']}, interleaved",
                  title_justify="left")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right")
    for cells in table_rows(res):
        table.add_row(*cells)
    console.print(table)
    d = res["dense"]
    if d.get("top1_from") and d["top1_from"] != "checkpoint":
        console.print(f"[dim]dense top-1: {escape(str(d['top1_from']))}[/dim]")
    for r in res["rows"]:
        if "error" in r:
            console.print(f"[red]{r['method']}[/red]: {escape(str(r['error']))}", markup=True, highlight=False)


def compare(
    recipe: Optional[str] = RecipeOpt,
    set_: Optional[list[str]] = SetOpt,
    methods: str = typer.Option("smcp,halp,l1,uniform", "--methods", "-m",
                                help="Comma-separated methods: smcp, halp, l1, sfp, uniform, none "
                                     "(the unpruned model fine-tuned the same way), snip, magnitude (unstructured: "
                                     "give --set-for snip,magnitude:prune.sparsity=0.9)."),
    set_for: Optional[list[str]] = typer.Option(None, "--set-for", metavar="METHOD[,METHOD]:KEY=VALUE",
                                                help="A recipe override for some methods only (repeatable), "
                                                     "e.g. uniform,l1:prune.target_margin=0.05."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Output directory (default: runs/<recipe name>/compare)."),
    force: bool = typer.Option(False, "--force", help="Re-profile and re-train every method even if up to date."),
    force_table: bool = typer.Option(False, "--force-table",
                                     help="Use a latency table measured on another device/setting."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Prune with every method on one target, table and budget; time all slim models in one loop.

    Every method gets the same target, fine-tuning budget and latency table; each is slimmed, and the
    dense and every slim model are timed interleaved; writes OUT/compare.json and OUT/compare.md."""
    with guarded(as_json):
        from smcp_core.analysis.compare import parse_method_sets, parse_methods

        ms = parse_methods(methods)
        per = parse_method_sets(set_for, ms)
        r = load(recipe, set_)  # bad recipe or --set: exit 1 before anything is written
        for m, extra in per.items():  # every per-method override must validate too, before any work
            load(recipe, list(set_ or []) + [f"prune.method={m}"] + extra)
        o = Path(out) if out else Path("runs") / r.name / "compare"
        with locked(o, "compare"):
            from smcp_core.analysis.compare import compare as run_compare

            with RichReporter(quiet) as rep:
                res = run_compare(recipe, list(set_ or []), ms, o, reporter=rep, force=force, force_table=force_table,
                                  method_overrides=per)
            if not quiet:
                print_compare(res)
                console.print(f"report: {o / 'compare.md'} (json: {o / 'compare.json'})", markup=False)
            emit({"ok": True, **res}, as_json)
