"""smcp profile: latency lookup tables for the model's layers on the target device/backend."""

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
from smcp_core.utils.text import layer_weights_text, spread


def profile(
    recipe: Optional[str] = RecipeOpt,
    set_: Optional[list[str]] = SetOpt,
    out: Optional[Path] = OutOpt,
    gpu: bool = typer.Option(False, "--gpu", help="Profile on CUDA (sets profile.device=cuda)."),
    device: Optional[str] = typer.Option(None, "--device", help="Overrides profile.device (cpu, cuda, cuda:N)."),
    backend: Optional[str] = typer.Option(None, "--backend",
                                          help="Overrides profile.backend (onnxruntime, torch, tensorrt)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Overrides profile.batch_size."),
    force: bool = typer.Option(False, "--force", help="Re-measure every point instead of reusing the cached table."),
    budget_minutes: Optional[float] = typer.Option(
        None, "--budget-minutes", help="Time bound for the layer measurements (sets profile.max_seconds): every "
        "layer's coarse grid is measured first; points left when time runs out are interpolated."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Measure per-layer latency over a channel grid (cached in OUT/latency.json)."""
    with guarded(as_json):
        extra = []
        if gpu:
            extra.append("profile.device=cuda")
        if device is not None:
            extra.append(f"profile.device={device}")
        if backend is not None:
            extra.append(f"profile.backend={backend}")
        if batch_size is not None:  # 0 or less: the recipe check says why
            extra.append(f"profile.batch_size={batch_size}")
        if budget_minutes is not None:  # 0 or less: the recipe check says why
            extra.append(f"profile.max_seconds={budget_minutes * 60:g}")
        r = load(recipe, set_, extra)
        o = out_dir(r, out)
        with locked(o, "profile"):
            from smcp_core import stages
            from smcp_core.stages.registry import check_prunable

            if not force:  # --force re-measures (and so re-creates) the table
                check_run_dir(o, "profile")
            stages.write_resolved(r, o)
            check_prunable(r)  # a table for a model with nothing to prune would be minutes wasted
            with RichReporter(quiet) as rep:
                res = stages.profile(r, o, reporter=rep, force=force).to_dict()
            if not quiet:
                console.print(
                    f"[green]latency table[/green] {res['path']}: {res['layers']} layer shapes, baseline "
                    f"{res['baseline_ms']:.3f} ms{spread(res.get('baseline_spread_ms'))} on "
                    f"{r.profile.backend}/{r.profile.device} "
                    f"batch {r.profile.batch_size}; "
                    f"calibration{_weights(res.get('layer_weights'))}: measured = {res['scale']:.3f} x "
                    f"(table + {res['removed_layer_ms']:.4f} ms per removed layer) + {res['offset_ms']:.3f} ms "
                    f"({res['seconds']:.0f}s)"
                )
                if res.get("interpolated_points"):
                    console.print(f"[yellow]{res['interpolated_points']} grid points interpolated[/yellow] "
                                  "(time budget ran out after the coarse grid; the next profile measures them)")
                for p in res["calibration"]:
                    err = 100 * (p["predicted_ms"] - p["measured_ms"]) / p["measured_ms"]
                    console.print(f"  {p['name']:<18} measured {p['measured_ms']:.3f} ms  "
                                  f"predicted {p['predicted_ms']:.3f} ms ({err:+.1f}%)")
            emit({"ok": True, **res}, as_json)


def _weights(weights: dict[str, float] | None) -> str:
    return f" (layer weights per resolution: {layer_weights_text(weights)})" if weights else ""
