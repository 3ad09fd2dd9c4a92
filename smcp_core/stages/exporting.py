"""The export stage: ONNX of the slim and baseline models, parity, measured speed-up, accuracy."""

from __future__ import annotations

from pathlib import Path

import torch

from smcp_core.config.recipe import Recipe
from smcp_core.data import make_loader
from smcp_core.errors import SmcpError
from smcp_core.events import Reporter
from smcp_core.export.onnx import export_onnx, onnx_parity
from smcp_core.export.tensorrt import build_trt_engine, ensure_tensorrt
from smcp_core.profile.fingerprint import environment_report
from smcp_core.prune.trainer import evaluate
from smcp_core.stages.artifacts import stamp
from smcp_core.stages.builders import (
    build_data,
    build_model,
    example_input,
    input_shape,
)
from smcp_core.stages.measure import measure_pair
from smcp_core.stages.results import ExportResult
from smcp_core.stages.slimming import load_slim
from smcp_core.utils.fsutil import (
    atomic_write_json,
    forget_checksum,
    read_json,
    record_checksum,
)


def export(recipe: Recipe, out: Path, *, reporter: Reporter | None = None, trt: bool | None = None) -> ExportResult:

    rep = reporter or Reporter()
    ec = recipe.export
    formats = list(ec.formats)
    if trt:
        formats = list(dict.fromkeys(formats + ["trt"]))
    if "trt" in formats:

        ensure_tensorrt()
    edir = out / "export"
    edir.mkdir(parents=True, exist_ok=True)
    slim_m = load_slim(recipe, out)
    base = build_model(recipe)
    batch = recipe.export_batch_size()
    backend = recipe.export_backend()
    x = example_input(recipe, batch)
    rep.log("exporting ONNX (slim and baseline)")
    for name in ("model.onnx", "baseline.onnx"):  # re-recorded once written (export_onnx is atomic)
        forget_checksum(edir / name)
    onnx_slim = export_onnx(slim_m, x, edir / "model.onnx", opset=ec.opset, dynamic_batch=True)
    record_checksum(onnx_slim)
    onnx_base = export_onnx(base, x, edir / "baseline.onnx", opset=ec.opset, dynamic_batch=True)
    record_checksum(onnx_base)
    par = onnx_parity(slim_m, onnx_slim, example_input(recipe, max(2, min(batch, 8))))
    rep.log(f"measuring latency on {backend} (baseline and pruned interleaved, batch {batch})")
    if backend == "tensorrt":
        raise SmcpError("export.backend tensorrt: use `smcp export --trt` on a machine with TensorRT")
    tgt = recipe.gate_target()
    kind, value = tgt.kind(), tgt.value()
    meas = measure_pair(base, slim_m, recipe, batch=batch, backend=backend, workdir=edir, kind=kind, target=value,
                        confidence=ec.confidence, min_rounds=ec.min_runs, max_seconds=ec.max_seconds,
                        onnx_paths={"baseline": onnx_base, "pruned": onnx_slim})
    sb, sp = (st.to_dict() for st in meas.timing.stats())
    speedup = meas.speedup.median
    slim_info = read_json(out / "slim" / "slim.json", "slim summary") if (out / "slim" / "slim.json").exists() else {}
    flops_ratio = slim_info["flops"] / slim_info["flops_full"] if slim_info else None
    params_ratio = slim_info["params"] / slim_info["params_full"] if slim_info else None
    if meas.verdict is not None:
        passed = meas.verdict.passed
    else:  # flops_ratio: counted, not timed
        passed = flops_ratio is not None and flops_ratio <= value + 1e-9
    # absolute, or relative for outputs larger than 1 (e.g. the logits of a barely trained model)
    parity_ok = par["max_abs_diff"] <= ec.tolerance or par.get("max_rel_diff", 1.0) <= ec.tolerance
    acc = None
    if recipe.data.val_path or recipe.data.source in ("digits", "cifar10", "imagenet_samples", "synthetic",
                                                      "imagefolder"):
        try:
            acc = _accuracy(recipe, base, slim_m, out)
        except SmcpError as exc:
            rep.log(f"accuracy skipped: {exc}")
    pred = None
    summ = out / "prune" / "summary.json"
    if summ.exists():
        pred = read_json(summ, "prune summary").get("predicted_ms")
    report = ExportResult(
        stamp=stamp(recipe, "export"),
        backend=backend,
        device=recipe.profile.device,
        batch_size=batch,
        dtype="float32",
        input_shape=[batch, *input_shape(recipe)],
        baseline={"latency_ms": sb["median_ms"], "stats": sb},
        pruned={"latency_ms": sp["median_ms"], "stats": sp, "predicted_ms": pred},
        speedup=speedup,
        gate=meas.gate_doc(),
        target={"kind": kind, "value": value},
        target_speedup=value if kind == "speedup" else None,
        passed=bool(passed and parity_ok),
        parity={**par, "tolerance": ec.tolerance, "passed": parity_ok},
        flops_ratio=flops_ratio,
        params_ratio=params_ratio,
        accuracy=acc,
        environment=environment_report(backend=backend, device=recipe.profile.device,
                                       threads=recipe.profile.threads, batch_size=batch),
        files={"onnx": str(onnx_slim), "baseline_onnx": str(onnx_base)},
    )
    if "trt" in formats:

        eng = build_trt_engine(onnx_slim, edir / "model.engine", precision=ec.trt_precision, batch_size=batch)
        report.files["engine"] = str(eng)
    atomic_write_json(edir / "report.json", report.to_dict(), checksum=True)
    return report


def _accuracy(recipe: Recipe, base, slim_m, out: Path) -> dict | None:
    """Top-1 of the pruned model and of the dense baseline on the validation set.  A model trained
    from scratch has no meaningful baseline weights: its dense reference is the top-1 at the end
    of the dense warm-up, taken from the prune history."""

    bundle = build_data(recipe)
    if bundle.val is None:
        return None
    loader = make_loader(bundle.val, batch_size=128, shuffle=False, seed=recipe.seed)
    dev = torch.device("cpu")
    res = {"pruned_top1": evaluate(slim_m, loader, dev), "images": len(bundle.val), "data": bundle.description}
    if recipe.model.checkpoint:
        res["baseline_top1"] = evaluate(base, loader, dev)
        res["baseline_from"] = "checkpoint"
    else:
        res["baseline_top1"] = None
        res["baseline_from"] = "trained from scratch: no dense baseline weights"
        summ = out / "prune" / "summary.json"
        if summ.exists():
            hist = read_json(summ, "prune summary").get("history", [])
            warm = [r for r in hist if r.get("event") == "epoch" and r["epoch"] <= recipe.prune.warmup_epochs
                    and r.get("top1") is not None]
            if warm:
                res["baseline_top1"] = warm[-1]["top1"]
                res["baseline_from"] = f"dense model at the end of warm-up (epoch {warm[-1]['epoch']})"
    return res
