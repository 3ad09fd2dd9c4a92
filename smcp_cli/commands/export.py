"""smcp export: ONNX (+ TensorRT), parity and measured speed-up against the target."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

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


def print_report(rep: dict) -> None:
    from rich.table import Table

    t = Table(title=f"smcp export — {rep['backend']} / {rep['device']}, batch {rep['batch_size']}",
              title_justify="left")
    t.add_column("")
    t.add_column("baseline", justify="right")
    t.add_column("pruned", justify="right")
    t.add_row("latency (median ms)", f"{rep['baseline']['latency_ms']:.3f}", f"{rep['pruned']['latency_ms']:.3f}")
    t.add_row("p10-p90 (ms)", _spread(rep["baseline"]), _spread(rep["pruned"]))
    if rep["pruned"].get("predicted_ms") is not None:
        t.add_row("predicted by table (ms)", "", f"{rep['pruned']['predicted_ms']:.3f}")
    acc = rep.get("accuracy")
    if acc:
        b = f"{acc['baseline_top1']:.2f}%" if acc.get("baseline_top1") is not None else "n/a"
        if acc.get("baseline_from", "checkpoint") != "checkpoint" and acc.get("baseline_top1") is not None:
            b += " *"
        t.add_row(f"top-1 ({acc['images']} images)", b, f"{acc['pruned_top1']:.2f}%")
    if rep.get("flops_ratio") is not None:
        t.add_row("FLOPs / params ratio", "1 / 1", f"{rep['flops_ratio']:.3f} / {rep['params_ratio']:.3f}")
    console.print(t)
    if acc and acc.get("baseline_from", "checkpoint") != "checkpoint":
        console.print(f"[dim]* baseline top-1: {escape(str(acc['baseline_from']))}[/dim]")
    verdict = "[bold green]PASS[/bold green]" if rep["passed"] else "[bold red]FAIL[/bold red]"
    tgt = rep["target"]
    gate = rep.get("gate") or {}
    iv = gate.get("speedup_interval")
    interval = f" [{iv[0]:.2f}-{iv[1]:.2f}x, {gate['rounds']} rounds]" if iv else ""
    console.print(
        f"measured speed-up {rep['speedup']:.2f}x{interval} (target {tgt['kind']}={tgt['value']}), "
        f"ONNX parity max |diff| {rep['parity']['max_abs_diff']:.2e}: {verdict}"
    )
    reason = (gate.get("verdict") or {}).get("reason")
    if reason:
        console.print(f"[dim]gate: {escape(reason)}[/dim]")


def _spread(side: dict) -> str:
    st = side.get("stats") or {}
    return f"{st['p10_ms']:.3f}-{st['p90_ms']:.3f}" if "p10_ms" in st else ""


def export(
    recipe: Optional[str] = RecipeOpt,
    set_: Optional[list[str]] = SetOpt,
    out: Optional[Path] = OutOpt,
    trt: bool = typer.Option(False, "--trt", help="Time the baseline and pruned models as TensorRT engines (export.trt_precision, fp16 by default) and gate on them; needs tensorrt and a CUDA GPU."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Write ONNX, check parity, measure baseline vs pruned; exit 2 when the target is missed."""
    with guarded(as_json):
        r = load(recipe, set_, trt=trt)
        o = out_dir(r, out)
        with locked(o, "export", create=False):  # missing run dir: the stage says what is missing
            from smcp_core import stages

            check_run_dir(o, "export")
            with RichReporter(quiet) as rep:
                result = stages.export(r, o, reporter=rep, trt=trt)
            report = result.to_dict()
            if not quiet:
                print_report(report)
            emit({"ok": report["passed"], **report}, as_json)
            stages.gate(result)
