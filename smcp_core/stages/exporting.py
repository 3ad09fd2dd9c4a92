"""The export stage: ONNX of the slim and baseline models, parity, measured speed-up, accuracy."""

from __future__ import annotations

from pathlib import Path

import torch

from smcp_core.config.recipe import Recipe
from smcp_core.data import make_loader
from smcp_core.errors import SmcpError
from smcp_core.events import Reporter
from smcp_core.export.onnx import export_onnx, onnx_parity
from smcp_core.export.tensorrt import engine_parity, ensure_tensorrt, trt_version
from smcp_core.profile.fingerprint import environment_report
from smcp_core.profile.timing import canonical_dtype
from smcp_core.profile.trt import dtype_name
from smcp_core.prune.trainer import evaluate
from smcp_core.stages.artifacts import stamp
from smcp_core.stages.builders import (
    build_data,
    build_model,
    example_input,
    input_shape,
)
from smcp_core.stages.measure import TrtPlan, measure_pair
from smcp_core.stages.results import ExportResult
from smcp_core.stages.slimming import load_slim
from smcp_core.utils.fsutil import (
    atomic_write_json,
    forget_checksum,
    read_json,
    record_checksum,
)


def export(recipe: Recipe, out: Path, *, reporter: Reporter | None = None, trt: bool | None = None) -> ExportResult:
    """ONNX of the slim and the baseline model (+ parity), both timed in paired rounds on the export
    backend -- as TensorRT engines when ``trt`` (``--trt``), ``export.formats`` lists ``trt`` or the
    backend is ``tensorrt`` -- the gate's verdict, accuracy, and ``export/report.json``."""
    rep = reporter or Reporter()
    ec = recipe.export
    formats = list(dict.fromkeys(list(ec.formats) + (["trt"] if trt else [])))
    backend = "tensorrt" if "trt" in formats or recipe.export_backend() == "tensorrt" else recipe.export_backend()
    if backend == "tensorrt":
        ensure_tensorrt()
    edir = out / "export"
    edir.mkdir(parents=True, exist_ok=True)
    slim_m = load_slim(recipe, out)
    base = build_model(recipe)
    batch = recipe.export_batch_size()
    x = example_input(recipe, batch)
    onnx_slim, onnx_base, par = _export_onnx(recipe, edir, slim_m, base, x, rep)
    plan = _trt_plan(ec, edir) if backend == "tensorrt" else None
    if plan is not None:
        rep.log(f"building TensorRT {plan.precision} engines (baseline and pruned, batch {batch})")
    rep.log(f"measuring latency on {backend} (baseline and pruned interleaved, batch {batch})")
    tgt = recipe.gate_target()
    kind, value = tgt.kind(), tgt.value()
    meas = measure_pair(base, slim_m, recipe, batch=batch, backend=backend, workdir=edir, kind=kind, target=value,
                        confidence=ec.confidence, min_rounds=ec.min_runs, max_seconds=ec.max_seconds,
                        onnx_paths={"baseline": onnx_base, "pruned": onnx_slim}, trt=plan)
    trt_doc = _trt_section(meas, plan, slim_m, x, edir) if plan is not None else None
    report = _report(recipe, out, backend, meas, par, trt_doc, batch, kind, value, base, slim_m, rep)
    report.files.update({"onnx": str(onnx_slim), "baseline_onnx": str(onnx_base)})
    if trt_doc is not None:
        report.files.update({k: trt_doc[k] for k in ("engine", "baseline_engine", "timing_cache")})
    atomic_write_json(edir / "report.json", report.to_dict(), checksum=True)
    return report


def _export_onnx(recipe: Recipe, edir: Path, slim_m, base, x, rep: Reporter) -> tuple[Path, Path, dict]:
    """``model.onnx`` and ``baseline.onnx`` (fp32, dynamic batch) and the slim model's ONNX parity."""
    rep.log("exporting ONNX (slim and baseline)")
    for name in ("model.onnx", "baseline.onnx"):  # re-recorded once written (export_onnx is atomic)
        forget_checksum(edir / name)
    onnx_slim = export_onnx(slim_m, x, edir / "model.onnx", opset=recipe.export.opset, dynamic_batch=True)
    record_checksum(onnx_slim)
    onnx_base = export_onnx(base, x, edir / "baseline.onnx", opset=recipe.export.opset, dynamic_batch=True)
    record_checksum(onnx_base)
    par = onnx_parity(slim_m, onnx_slim, example_input(recipe, max(2, min(x.shape[0], 8))))
    return onnx_slim, onnx_base, par


def _trt_plan(ec, edir: Path) -> TrtPlan:
    """The export's engines: ``model.engine`` (pruned) and ``baseline.engine`` at the export
    precision, the timing cache kept in ``export/timing.cache`` for the next build."""
    return TrtPlan(precision=ec.trt_precision, timing_cache=edir / "timing.cache",
                   engines={"pruned": edir / "model.engine", "baseline": edir / "baseline.engine"})


def _percentiles_ms(samples_s: list[float]) -> dict:
    import numpy as np

    p = np.percentile(np.asarray(samples_s, dtype=np.float64) * 1e3, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}


def _trt_section(meas, plan: TrtPlan, slim_m, x, edir: Path) -> dict:
    """``report.json``'s ``tensorrt``: precision, version, FPS (batch / median latency) and latency
    percentiles of both engines from the paired rounds, engine paths, the pruned engine's parity."""
    batch = int(x.shape[0])
    doc = {"precision": plan.precision, "version": trt_version(), "batch_size": batch}
    for side, samples in (("baseline", meas.timing.a_s), ("pruned", meas.timing.b_s)):
        lat = _percentiles_ms(samples)
        doc[side] = {"fps": batch / (lat["p50"] / 1e3), "latency_ms": lat, "engine": str(plan.engine(side, edir))}
    doc["speedup"] = meas.speedup.median
    doc["parity"] = engine_parity(slim_m, plan.engine("pruned", edir), x, plan.precision)
    doc.update(engine=str(plan.engine("pruned", edir)), baseline_engine=str(plan.engine("baseline", edir)),
               timing_cache=str(plan.cache(edir)))
    return doc


def _timed_precision(recipe: Recipe, backend: str) -> tuple[str, str]:
    """The dtype and input layout of what was timed: the TensorRT precision, the profile's dtype and
    layout on torch, the fp32 NCHW ONNX model on onnxruntime."""
    if backend == "tensorrt":
        return dtype_name(recipe.export.trt_precision), "nchw"
    if backend == "torch":
        return canonical_dtype(recipe.profile.dtype), recipe.profile.layout
    return "float32", "nchw"


def _report(recipe: Recipe, out: Path, backend: str, meas, par: dict, trt_doc: dict | None, batch: int, kind: str,
            value: float, base, slim_m, rep: Reporter) -> ExportResult:
    """The export report: latencies and verdict of the paired measurement, parity, ratios, accuracy."""
    ec = recipe.export
    sb, sp = (st.to_dict() for st in meas.timing.stats())
    slim_info = read_json(out / "slim" / "slim.json", "slim summary") if (out / "slim" / "slim.json").exists() else {}
    flops_ratio = slim_info["flops"] / slim_info["flops_full"] if slim_info else None
    params_ratio = slim_info["params"] / slim_info["params_full"] if slim_info else None
    if meas.verdict is not None:
        passed = meas.verdict.passed
    else:  # flops_ratio: counted, not timed
        passed = flops_ratio is not None and flops_ratio <= value + 1e-9
    # absolute, or relative for outputs larger than 1 (e.g. the logits of a barely trained model)
    parity_ok = par["max_abs_diff"] <= ec.tolerance or par.get("max_rel_diff", 1.0) <= ec.tolerance
    engine_ok = trt_doc is None or trt_doc["parity"]["passed"]
    summ = out / "prune" / "summary.json"
    pred = read_json(summ, "prune summary").get("predicted_ms") if summ.exists() else None
    dtype, layout = _timed_precision(recipe, backend)
    device = "cuda" if backend == "tensorrt" and not recipe.profile.device.startswith("cuda") else recipe.profile.device
    return ExportResult(
        stamp=stamp(recipe, "export"), backend=backend, device=device, batch_size=batch, dtype=dtype,
        input_shape=[batch, *input_shape(recipe)],
        baseline={"latency_ms": sb["median_ms"], "stats": sb},
        pruned={"latency_ms": sp["median_ms"], "stats": sp, "predicted_ms": pred},
        speedup=meas.speedup.median, gate=meas.gate_doc(), target={"kind": kind, "value": value},
        target_speedup=value if kind == "speedup" else None, passed=bool(passed and parity_ok and engine_ok),
        parity={**par, "tolerance": ec.tolerance, "passed": parity_ok}, flops_ratio=flops_ratio,
        params_ratio=params_ratio, accuracy=_maybe_accuracy(recipe, base, slim_m, out, rep),
        environment=environment_report(backend=backend, device=device, threads=recipe.profile.threads,
                                       batch_size=batch, precision=dtype, layout=layout,
                                       input_shape=[batch, *input_shape(recipe)]),
        files={}, tensorrt=trt_doc,
    )


def _maybe_accuracy(recipe: Recipe, base, slim_m, out: Path, rep: Reporter) -> dict | None:
    if not (recipe.data.val_path or recipe.data.source in ("digits", "cifar10", "imagenet_samples", "synthetic",
                                                           "imagefolder")):
        return None
    try:
        return _accuracy(recipe, base, slim_m, out)
    except SmcpError as exc:
        rep.log(f"accuracy skipped: {exc}")
        return None


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
