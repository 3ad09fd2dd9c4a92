"""TensorRT engines of whole models: the ONNX model an engine of a precision needs, the engine, and
the parity of its output against the PyTorch model.  The builder and the runner themselves are
:mod:`smcp_core.profile.trt` (the latency tables time engines too)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from smcp_core.export.onnx import export_onnx, output_agreement, reference_output
from smcp_core.profile.trt import (
    build_trt_engine,
    ensure_tensorrt,
    onnx_dtype_for,
    serialize_engine,
    trt_runner,
    trt_version,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["PARITY_RTOL", "build_model_engine", "build_trt_engine", "engine_parity", "ensure_tensorrt",
           "serialize_engine", "trt_runner", "trt_version"]

PARITY_RTOL = {"fp32": 1e-3, "fp16": 1e-2, "int8": 1e-1}
"""Largest ``max|engine - torch| / max|torch|`` accepted per precision: fp32 allows TF32 (TensorRT's
default on Ampere and later), fp16 the half-precision rounding of every layer, int8 quantisation."""


def build_model_engine(model: torch.nn.Module, x: torch.Tensor, engine_path: str | os.PathLike, *,
                       precision: str, timing_cache: str | os.PathLike | None = None,
                       onnx_path: str | os.PathLike | None = None, opset: int = 18) -> Path:
    """The engine of ``model`` at ``x``'s batch size and ``precision`` written to ``engine_path``;
    returns the ONNX file it was built from: ``onnx_path`` (exported beside the engine when None),
    or, for fp16 without an FP16 builder flag (TensorRT 11), a half-precision ONNX export beside
    the engine (``NAME.fp16.onnx``), built strongly typed."""
    trt = ensure_tensorrt()
    engine_path = Path(engine_path)
    if onnx_dtype_for(trt, precision) == "float16":
        onnx_path = export_onnx(model, x, engine_path.with_suffix(".fp16.onnx"), opset=opset, dtype="float16")
    elif onnx_path is None:
        onnx_path = export_onnx(model, x, engine_path.with_suffix(".onnx"), opset=opset)
    build_trt_engine(onnx_path, engine_path, precision=precision, batch_size=int(x.shape[0]),
                     timing_cache=timing_cache)
    return Path(onnx_path)


def engine_parity(model: torch.nn.Module, engine: str | os.PathLike, x: torch.Tensor, precision: str) -> dict:
    """The engine's output against ``model``'s (eval, float32, on the CPU) on ``x``:
    ``max_abs_diff``, ``max_rel_diff`` (over ``max|torch output|``), ``top1_agree``, the
    ``tolerance`` of the precision (:data:`PARITY_RTOL`, relative) and ``passed``."""
    run = trt_runner(engine, x)
    out = run()
    run.sync()
    got = next(iter(out.values())).detach().float().cpu().numpy()
    agreement = output_agreement(reference_output(model, x.float()), got)
    tol = PARITY_RTOL[precision]
    return {**agreement, "tolerance": tol, "relative_to": "max |torch float32 output|",
            "passed": bool(agreement["max_rel_diff"] <= tol)}
