"""Whole-model latency on the profile backend: models timed interleaved in one loop, and the slimmed
structures (random weights) the calibration and the closed loop measure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from smcp_core.config.recipe import Recipe
from smcp_core.errors import SmcpError
from smcp_core.export.onnx import export_onnx
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.profile.timing import (
    ort_providers,
    ort_runner,
    ort_session,
    time_interleaved,
    torch_runner,
    torch_sync,
)
from smcp_core.prune.masking import Masker
from smcp_core.slim.surgery import slim_model
from smcp_core.stages.builders import build_model, example_input


def _onnx_bytes(model: torch.nn.Module, example: torch.Tensor, tmpdir: Path, name: str) -> Path:

    path = tmpdir / f"{name}.onnx"
    export_onnx(model, example, path, dynamic_batch=True)
    return path


def measure_models(models: dict[str, torch.nn.Module], recipe, *, batch: int, backend: str,
                   workdir: Path, min_runs: int = 30, max_seconds: float = 60.0,
                   onnx_paths: dict[str, Path] | None = None) -> dict[str, Any]:
    """Median latency of each model, measured interleaved in one loop on one backend."""

    prof = recipe.profile
    x = example_input(recipe, batch)
    fns = {}
    onnx_paths = dict(onnx_paths or {})
    if backend == "onnxruntime":
        if prof.device != "cpu":
            providers = ort_providers(prof.device)
        else:
            providers = None
        for name, m in models.items():
            if name not in onnx_paths:
                onnx_paths[name] = _onnx_bytes(m, x, workdir, name)
            sess = ort_session(onnx_paths[name], threads=prof.threads, providers=providers)
            fns[name] = ort_runner(sess, x.numpy())
        sync = None
    elif backend == "torch":
        if prof.threads:
            torch.set_num_threads(prof.threads)
        for name, m in models.items():
            fns[name] = torch_runner(m, x, device=prof.device, dtype=prof.dtype,
                                     channels_last=prof.layout == "channels_last")
        sync = torch_sync(prof.device)
    elif backend == "tensorrt":
        raise SmcpError("whole-model timing on tensorrt is done by `smcp export --trt`; "
                        "profile with backend torch or onnxruntime on this machine")
    else:
        raise SmcpError(f"unknown backend {backend!r}")
    stats = time_interleaved(fns, warmup=max(3, prof.warmup // 2), min_runs=min_runs, max_seconds=max_seconds,
                             sync=sync)
    return {"stats": {k: v.to_dict() for k, v in stats.items()}, "onnx": onnx_paths}


def slim_structure(recipe: Recipe, graph: ChannelGraph, keep: torch.Tensor) -> torch.nn.Module:
    """The recipe's model slimmed to ``keep`` with random weights (latency does not depend on them)."""

    m = build_model(recipe, load_weights=False)
    mk = Masker(m, graph)
    mk.set_keep(keep)
    mk.remove(bake=True)
    return slim_model(m, graph, keep)


def measure_lowest(models: dict[str, torch.nn.Module], recipe, *, workdir: Path, repeats: int = 2,
                   min_runs: int = 30, max_seconds: float = 60.0) -> dict[str, Any]:
    """:func:`measure_models` ``repeats`` times (ONNX files exported once); per model the run with
    the lower median is kept: a shared machine's stalls only ever add time, and one stalled loop
    would skew every ratio.  ``{"stats": {name: stats}, "repeats": [per-loop stats]}``."""
    prof = recipe.profile
    workdir.mkdir(parents=True, exist_ok=True)
    onnx_cache: dict = {}
    runs = []
    try:
        for _ in range(repeats):
            m_ = measure_models(models, recipe, batch=prof.batch_size, backend=prof.backend, workdir=workdir,
                                min_runs=min_runs, max_seconds=max_seconds, onnx_paths=onnx_cache)
            onnx_cache = m_["onnx"]
            runs.append(m_["stats"])
    finally:
        for f in workdir.glob("*"):
            f.unlink()
        workdir.rmdir()
    return {"stats": {k: min((r[k] for r in runs), key=lambda st: st["median_ms"]) for k in models},
            "repeats": runs}


def _uniform_keep(graph: ChannelGraph, frac: float) -> torch.Tensor:
    keep = graph.full_keep()
    for g in graph.groups:
        if not g.prunable:
            continue
        k = max(g.n_frozen, 1, int(round(frac * g.size)))
        order = torch.argsort(g.frozen.to(torch.int8), descending=True, stable=True)
        keep[g.classes] = False
        keep[g.classes[order[:k]]] = True
    return keep


def _removal_keep(graph: ChannelGraph, frac: float) -> torch.Tensor | None:
    """Every other removable group (layer pruning) removed, the rest uniformly thinned to ``frac``;
    None when the graph has no removable group."""
    removable = [g for g in graph.groups if g.prunable and g.removable and g.n_frozen == 0]
    if not removable:
        return None
    keep = _uniform_keep(graph, frac)
    for g in removable[::2]:
        keep[g.classes] = False
    return keep


def _removed_layers(graph: ChannelGraph, keep: torch.Tensor) -> int:
    return sum(1 for ci, co in graph.widths(keep) if ci == 0 or co == 0)
