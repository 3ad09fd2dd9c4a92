"""The four stages (profile, prune, slim, export) on a run directory, driven by a recipe.

Run directory layout (each file written atomically)::

    OUT/recipe.resolved.yaml      the fully resolved recipe of the last command
    OUT/latency.json              latency table + whole-model measurements and calibration
    OUT/prune/checkpoint.pt       last epoch (resume)
    OUT/prune/pruned.pt           dense weights with masks baked in + class keep-mask
    OUT/prune/summary.json        target, predicted cost, per-group widths, history
    OUT/slim/weights.pt           slim model tensors (torch.load(weights_only=True))
    OUT/slim/channel_spec.json    how to rebuild it from the original model definition
    OUT/slim/model.pt2            torch.export program of the slim model
    OUT/export/model.onnx, baseline.onnx, report.json

Each stage records a *stamp* (a hash of the recipe sections and upstream stamps it depends on);
``run`` skips a stage whose stamp is unchanged and whose outputs exist and are intact.

Integrity: every artifact's SHA-256 is recorded in ``SHA256SUMS`` in its directory
(:mod:`smcp_core.fsutil`).  A stage that reads a corrupt or truncated artifact stops with a one-line
:class:`SmcpError` and leaves the file as it is; re-running the stage that produces it (or
``smcp run --force``) re-creates it.
"""

from __future__ import annotations

import os

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import GateFailed, SmcpError
from .fsutil import (atomic_torch_save, atomic_write_json, atomic_write_text, forget_checksum, load_torch,
                     read_json, record_checksum, remove_artifact, verify_artifact)
from .graph import ChannelGraph
from .train import Reporter

STAGES = ("profile", "prune", "slim", "export")

_DEFAULT_SHAPES = {"digits": (1, 32, 32), "cifar10": (3, 32, 32), "imagefolder": (3, 224, 224),
                   "imagenet_samples": (3, 224, 224), "synthetic": (3, 32, 32)}
_DEFAULT_CLASSES = {"digits": 10, "cifar10": 10, "imagenet_samples": 1000, "synthetic": 10}


# --------------------------------------------------------------------------------------------------
# recipe -> model


def input_shape(recipe) -> tuple[int, int, int]:
    if recipe.model.input_size:
        return tuple(int(v) for v in recipe.model.input_size)
    c, h, w = _DEFAULT_SHAPES.get(recipe.data.source, (3, 224, 224))
    if recipe.data.image_size:
        h = w = int(recipe.data.image_size)
    return (c, h, w)


def num_classes(recipe) -> int | None:
    if recipe.model.num_classes:
        return int(recipe.model.num_classes)
    return _DEFAULT_CLASSES.get(recipe.data.source)


def build_model(recipe, *, load_weights: bool = True, trust: bool | None = None) -> torch.nn.Module:
    """The recipe's model with its checkpoint loaded.  ``trust`` (default: the environment variable
    ``SMCP_TRUST_CHECKPOINT=1``, set by ``smcp --trust-checkpoint``) allows checkpoints that need full
    unpickling; otherwise they load with ``weights_only=True``."""
    if trust is None:
        trust = os.environ.get("SMCP_TRUST_CHECKPOINT") == "1"
    from .models import build_model as _build, load_checkpoint

    torch.manual_seed(recipe.seed)  # from-scratch initial weights depend on the recipe only
    model = _build(recipe.model.source, num_classes=num_classes(recipe), kwargs=dict(recipe.model.kwargs or {}))
    if load_weights and recipe.model.checkpoint:
        load_checkpoint(model, recipe.model.checkpoint, trust=trust)
    return model.eval()


def example_input(recipe, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(batch, *input_shape(recipe), generator=g)


def build_graph(recipe, model: torch.nn.Module) -> ChannelGraph:
    return ChannelGraph(model, example_input(recipe), unpruned=list(recipe.model.unpruned or []))


def build_data(recipe):
    from .data import build_data as _bd

    d = recipe.data
    return _bd(d.source, path=d.path, image_size=d.image_size, train_subset=d.train_subset,
               val_subset=d.val_subset, seed=recipe.seed, augment=d.augment, val_source=d.val_source,
               val_path=d.val_path, num_classes=recipe.model.num_classes,
               input_shape=tuple(recipe.model.input_size) if recipe.model.input_size else None)


# --------------------------------------------------------------------------------------------------
# stamps


def _h(*parts: Any) -> str:
    m = hashlib.sha256()
    for p in parts:
        m.update(json.dumps(p, sort_keys=True, default=str).encode())
    return m.hexdigest()[:16]


_SIG_CACHE: dict[tuple, list] = {}


def _file_sig(path: str | None) -> Any:
    """What the stamps record of a checkpoint: its size and SHA-256, so a copied, re-downloaded or
    moved file with the same bytes (new mtime, new path) keeps its runs up to date and a changed one
    does not.  Hashed once per (path, size, mtime) in a process."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        return str(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SIG_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SIG_CACHE[key] = [st.st_size, h.hexdigest()]
    return _SIG_CACHE[key]


def stamp(recipe, stage: str) -> str:
    r = recipe.model_dump(mode="json")
    model = {**r["model"], "checkpoint": _file_sig(recipe.model.checkpoint)}  # its bytes, not its path
    prof = _h(model, r["profile"], r["data"]["source"], r["data"]["image_size"])
    if stage == "profile":
        return prof
    pr = _h(prof, model, r["data"], r["prune"], r["seed"])
    if stage == "prune":
        return pr
    sl = _h(pr, "slim")
    if stage == "slim":
        return sl
    return _h(sl, r["export"])


# the files each stage writes (the first one carries the stage's stamp), with what they are
STAGE_OUTPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "profile": (("latency.json", "latency table"),),
    "prune": (("prune/summary.json", "prune summary"), ("prune/pruned.pt", "pruned checkpoint")),
    "slim": (("slim/slim.json", "slim summary"), ("slim/weights.pt", "slim weights"),
             ("slim/channel_spec.json", "channel spec"), ("slim/model.pt2", "torch.export program")),
    "export": (("export/report.json", "export report"), ("export/model.onnx", "ONNX model"),
               ("export/baseline.onnx", "baseline ONNX model")),
}


def _fix(stage: str) -> str:
    return f"delete it and re-run `smcp {stage}` (or `smcp run --force`)"


def up_to_date(recipe, out: Path, stage: str) -> bool:
    """True when ``stage``'s outputs exist, are intact and were made from the same inputs.

    A corrupt or truncated output raises :class:`SmcpError` (it is never silently re-created)."""
    outputs = STAGE_OUTPUTS[stage]
    f = out / outputs[0][0]
    if not f.exists():
        return False
    d = read_json(f, outputs[0][1], _fix(stage))
    st = d.get("stamp") or (d.get("model") or {}).get("stamp") if isinstance(d, dict) else None
    if st != stamp(recipe, stage):
        return False
    if stage == "profile" and ((d.get("meta") or {}).get("measure") or {}).get("interpolated_points"):
        return False  # the time budget ran out: the next profile measures the interpolated points
    for rel, what in outputs[1:]:
        if not (out / rel).exists():
            return False
        verify_artifact(out / rel, what, _fix(stage))
    return True


def check_artifacts(out: Path) -> list[dict]:
    """Verify every artifact present in a run directory (checksum, else structure); raises
    :class:`SmcpError` on the first corrupt one.  Returns what was checked."""
    from .fsutil import sha256_file

    done = []
    extra = (("prune", ("prune/checkpoint.pt", "prune checkpoint")), ("prune", ("prune/metrics.csv", "metrics")))
    items = [(st, o) for st, outs in STAGE_OUTPUTS.items() for o in outs] + list(extra)
    for st, (rel, what) in items:
        p = out / rel
        if p.exists():
            verify_artifact(p, what, _fix(st))
            done.append({"file": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return done


def write_resolved(recipe, out: Path) -> None:
    from .recipe import resolved_dump

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.resolved.yaml", resolved_dump(recipe))


# --------------------------------------------------------------------------------------------------
# whole-model latency on a backend


def _onnx_bytes(model: torch.nn.Module, example: torch.Tensor, tmpdir: Path, name: str) -> Path:
    from .export import export_onnx

    path = tmpdir / f"{name}.onnx"
    export_onnx(model, example, path, dynamic_batch=True)
    return path


def measure_models(models: dict[str, torch.nn.Module], recipe, *, batch: int, backend: str,
                   workdir: Path, min_runs: int = 30, max_seconds: float = 60.0,
                   onnx_paths: dict[str, Path] | None = None) -> dict[str, Any]:
    """Median latency of each model, measured interleaved in one loop on one backend."""
    from .bench import ort_runner, ort_session, time_interleaved, torch_runner, torch_sync

    prof = recipe.profile
    x = example_input(recipe, batch)
    fns = {}
    onnx_paths = dict(onnx_paths or {})
    if backend == "onnxruntime":
        if prof.device != "cpu":
            from .bench import ort_providers
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


# --------------------------------------------------------------------------------------------------
# profile


def slim_structure(recipe, graph: ChannelGraph, keep: torch.Tensor) -> torch.nn.Module:
    """The recipe's model slimmed to ``keep`` with random weights (latency does not depend on them)."""
    from .masking import Masker
    from .slim import slim_model

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


def fit_calibration(points: list[tuple[float, int, float]]) -> tuple[float, float]:
    """``(layer_sum, removed_layers, measured_ms)`` points -> ``(scale, removed_ms)`` with
    measured ~= scale * (layer_sum + removed_ms * removed_layers), both >= 0 (least squares; a
    proportional fit when no point removes a layer or the fitted residual is negative)."""
    xs = torch.tensor([p[0] for p in points], dtype=torch.float64)
    ns = torch.tensor([float(p[1]) for p in points], dtype=torch.float64)
    ys = torch.tensor([p[2] for p in points], dtype=torch.float64)

    def proportional() -> float:
        sc = float((xs * ys).sum() / (xs * xs).sum())
        return sc if sc > 0 else float(ys[0] / xs[0])

    if len(points) < 2 or not bool((ns > 0).any()) or not bool((ns == 0).any()):
        return proportional(), 0.0
    sol = torch.linalg.lstsq(torch.stack([xs, ns], 1), ys.view(-1, 1)).solution.view(-1)
    a, b = float(sol[0]), float(sol[1])
    if not (a > 0) or b < 0:
        return proportional(), 0.0
    return a, b / a


def profile(recipe, out: Path, *, reporter: Reporter | None = None, force: bool = False) -> dict:
    """Measure the latency table of the recipe's model and the whole-model calibration."""
    from .cost import LatencyTable, measure_table
    from .pruner import CostModel

    rep = reporter or Reporter()
    prof = recipe.profile
    out.mkdir(parents=True, exist_ok=True)
    path = out / "latency.json"
    if prof.backend == "tensorrt":
        from .export import ensure_tensorrt  # noqa: F401 - raises a clear error when missing
    model = build_model(recipe, load_weights=False)  # latency does not depend on the weights
    graph = build_graph(recipe, model)
    existing = None
    if path.exists() and not force:
        try:  # a corrupt cached table stops here: it is never silently replaced
            existing = LatencyTable.load(path)
        except SmcpError as exc:
            raise SmcpError(f"{exc}; `smcp profile --force` re-measures it from scratch") from None
    t0 = time.perf_counter()
    sigs = [l.sig for l in graph.layers]
    table = measure_table(
        sigs, backend=prof.backend, batch_size=prof.batch_size, dtype=prof.dtype, layout=prof.layout,
        device=prof.device, channel_step=prof.channel_step, threads=prof.threads, warmup=prof.warmup,
        min_runs=prof.min_runs, max_seconds=prof.max_seconds, existing=existing,
        progress=lambda d, t, k: rep.progress("profile", d, t, k),
    )
    t_layers = time.perf_counter() - t0
    # whole-model latency of the baseline, two uniformly thinned variants and (when layers can be
    # removed) two variants with every other removable group removed -> calibration
    cost = CostModel(graph, "latency", table)
    cost.removed_cost = 0.0  # plain layer sums (a reused table carries the previous calibration)
    keeps = {"baseline": graph.full_keep(), "uniform75": _uniform_keep(graph, 0.75),
             "uniform50": _uniform_keep(graph, 0.5)}
    for name, frac in (("removed", 1.0), ("removed_uniform75", 0.75)):
        k = _removal_keep(graph, frac)
        if k is not None:
            keeps[name] = k
    rep.log(f"measuring whole-model latency ({', '.join(keeps)}) for calibration")
    sums = {k: cost.total(v) for k, v in keeps.items()}
    removed = {k: _removed_layers(graph, v) for k, v in keeps.items()}
    variants = {name: (model if name == "baseline" else slim_structure(recipe, graph, keep))
                for name, keep in keeps.items()}
    # two independent interleaved loops, the lower median per model
    meas = measure_lowest(variants, recipe, workdir=out / ".profile_tmp", repeats=2,
                          min_runs=max(20, prof.min_runs), max_seconds=min(60.0, prof.max_seconds / 2))
    names = list(variants)
    ms = [meas["stats"][k]["median_ms"] for k in names]
    # proportional fit, measured ~= scale * (sum of layer latencies + removed_ms * removed layers):
    # the work outside conv/linear layers (activations, adds, pooling, per-op overhead) shrinks with
    # the layers, so a constant offset would be wrong for strongly pruned models (seen on onnxruntime
    # CPU: a fitted offset made a 2x target demand a 4x cut of the layer time); a removed layer
    # leaves its residual join behind, hence the per-removed-layer term
    scale, removed_ms = fit_calibration([(sums[k], removed[k], m_) for k, m_ in zip(names, ms)])
    offset = 0.0
    pred = [scale * (sums[k] + removed_ms * removed[k]) + offset for k in names]
    xs = torch.tensor([sums[k] for k in names], dtype=torch.float64)
    ys = torch.tensor(ms, dtype=torch.float64)
    table.model = {
        "stamp": stamp(recipe, "profile"),
        "model_source": recipe.model.source,
        "input_shape": list(input_shape(recipe)),
        "measured_ms": float(ys[0]),
        "layer_sum_ms": float(xs[0]),
        "calibration": {
            "scale": scale, "offset_ms": offset, "removed_layer_ms": removed_ms,
            "points": [{"name": k, "layer_sum_ms": float(s), "removed_layers": removed[k], "measured_ms": float(m),
                        "predicted_ms": float(p)}
                       for k, s, m, p in zip(names, xs.tolist(), ys.tolist(), pred)],
        },
        "seconds": {"layers": t_layers, "total": time.perf_counter() - t0},
        "stats": meas["stats"],
    }
    atomic_write_json(path, table.to_dict(), indent=1, checksum=True)
    table.path = path
    return {"path": str(path), "layers": len(table), "baseline_ms": float(ys[0]), "scale": scale,
            "offset_ms": offset, "removed_layer_ms": removed_ms, "seconds": time.perf_counter() - t0,
            "interpolated_points": int(table.meta.get("measure", {}).get("interpolated_points", 0) or 0),
            "calibration": table.model["calibration"]["points"]}


# --------------------------------------------------------------------------------------------------
# prune


def load_table(recipe, out: Path, *, force_table: bool = False):
    from .cost import LatencyTable

    path = out / "latency.json"
    if not path.exists():
        raise SmcpError(f"latency table {path} not found; run `smcp profile` with the same --recipe/--out first")
    table = LatencyTable.load(path)
    prof = recipe.profile
    from .bench import device_fingerprint, fingerprint_id

    fid = fingerprint_id(device_fingerprint(prof.backend, prof.device, prof.threads))
    table.check_compatible(prof.backend, prof.device, prof.batch_size, prof.dtype, prof.layout, fid, force=force_table)
    if not table.model or "measured_ms" not in table.model:
        raise SmcpError(f"latency table {path} has no whole-model measurement; re-run `smcp profile`")
    return table


def target_budget(recipe, cost, table) -> tuple[float, dict]:
    """Layer-sum budget for the recipe's target, and a description of it."""
    kind, value = recipe.target_kind(), recipe.target_value()
    margin = recipe.prune.target_margin
    if kind == "flops_ratio":
        full = cost.total(cost.graph.full_keep())
        return value * (1 - margin) * full, {"kind": kind, "value": value, "full": full, "unit": cost.unit,
                                             "margin": margin}
    base = float(table.model["measured_ms"])
    lat = base / value if kind == "speedup" else value
    return cost.budget_for(lat * (1 - margin)), {"kind": kind, "value": value, "baseline_ms": base,
                                                 "target_ms": lat, "aim_ms": lat * (1 - margin),
                                                 "margin": margin, "unit": "ms"}


def prune(recipe, out: Path, *, reporter: Reporter | None = None, resume: bool = False,
          force_table: bool = False, return_result: bool = False) -> dict:
    """SMCP fine-tuning to the recipe's target.  Under ``torchrun`` every rank calls this; they
    train data-parallel and only rank 0 writes artifacts.  ``return_result`` adds the in-memory
    :class:`~smcp_core.train.TrainResult` under ``"result"`` (not written to disk)."""
    from . import dist as D
    from .data import make_loader
    from .pruner import Allocator, CostModel, PruneConfigLite
    from .train import prune_train

    rep = reporter or Reporter()
    D.init_from_env(recipe.prune.device)
    pdir = out / "prune"
    pdir.mkdir(parents=True, exist_ok=True)
    model = build_model(recipe)
    graph = build_graph(recipe, model)
    kind = "flops" if recipe.target_kind() == "flops_ratio" else "latency"
    table = load_table(recipe, out, force_table=force_table) if kind == "latency" else None
    cost = CostModel(graph, kind, table)
    budget, tdesc = target_budget(recipe, cost, table)
    pc = recipe.prune
    alloc = Allocator(graph, cost, PruneConfigLite(pc.channel_round, pc.min_channels, pc.layer_pruning, pc.stickiness,
                                                   cost_weight=pc.cost_weight))
    from .errors import InfeasibleTarget

    from .methods import UNSTRUCTURED

    no_channels = pc.method == "none" or pc.method in UNSTRUCTURED
    if no_channels:  # the full model is the channel budget: no channel is masked
        budget = cost.total(graph.full_keep())
        note = ("target ignored, nothing pruned" if pc.method == "none" else
                f"unstructured: {pc.sparsity:g} of the conv/linear weights zeroed, no channel removed; "
                "the channel target is ignored")
        tdesc = {**tdesc, "method": pc.method, "note": note}
    try:  # feasibility up front, with the real solver (importance not known yet: all zero)
        if not no_channels:
            alloc.solve(torch.zeros(graph.n_classes), budget, graph.full_keep(), rounds=1, inner=2)
        feasible = True
    except InfeasibleTarget:
        feasible = False
    if not feasible:
        lo = alloc.min_cost()
        pred_lo = cost.calibrated(lo) if kind == "latency" else lo
        hint = (f"the fastest reachable model is predicted at about {pred_lo:.4g} ms "
                f"({tdesc['baseline_ms'] / pred_lo:.2f}x)" if kind == "latency" else f"minimum {lo:.4g} {cost.unit}")
        raise InfeasibleTarget(
            f"target {tdesc['kind']}={tdesc['value']} is out of reach: {hint}; lower the target or allow smaller "
            "widths (prune.min_channels, prune.channel_round, prune.layer_pruning)"
        )
    bundle = build_data(recipe)
    if not resume and D.is_main():  # a fresh run, past every input check: the previous run's checkpoint and metrics go
        remove_artifact(pdir / "checkpoint.pt")
        remove_artifact(pdir / "metrics.csv")
        remove_artifact(pdir / "weight_masks.pt")
    D.barrier()
    weight_masks = _weight_masks(recipe, model, bundle, pdir, rep) if pc.method in UNSTRUCTURED else None
    check = None
    if kind == "latency" and pc.closed_loop > 0 and not no_channels:
        from .train import LatencyCheck

        cal = (table.model or {}).get("calibration") or {}
        pts = [(p_["layer_sum_ms"], int(p_.get("removed_layers", 0)), p_["measured_ms"]) for p_ in cal.get("points", [])]
        check = LatencyCheck(measure=_keep_measurer(recipe, graph, pdir), baseline_ms=float(table.model["measured_ms"]),
                             target_ms=tdesc["target_ms"], aim_ms=tdesc["aim_ms"], points=pts, rounds=pc.closed_loop)
    t0 = time.perf_counter()
    res = prune_train(recipe=recipe, model=model, graph=graph, cost=cost, target_cost=budget,
                      train_set=bundle.train, val_set=bundle.val, out_dir=pdir, resume=resume, reporter=rep,
                      make_loader=lambda ds, **kw: make_loader(ds, workers=recipe.data.workers, **kw),
                      weight_masks=weight_masks, latency_check=check)
    budget = res.target_cost  # the closed loop may have tightened it
    flops_full, params_full = graph.flops_params()
    flops_kept, params_kept = graph.flops_params(res.keep)
    groups = [{"group": g.index, "kept": int(res.keep[g.classes].sum()), "channels": g.size,
               "consumers": [graph.layers[i].name for i in g.consumers]} for g in graph.groups]
    layers = [{"name": l.name, "kind": l.kind, "cin": ci, "cout": co, "cin_full": l.sig.cin, "cout_full": l.sig.cout}
              for l, (ci, co) in zip(graph.layers, graph.widths(res.keep))]
    if D.is_main():
        atomic_torch_save({"state_dict": res.state_dict,
                           "keep": res.keep.cpu(), "n_classes": graph.n_classes,
                           "smcp_version": __version__}, pdir / "pruned.pt", checksum=True)
    summary = {
        "stamp": stamp(recipe, "prune"),
        "target": tdesc,
        "budget": budget,
        "cost_unit": cost.unit,
        "full_cost": res.full_cost,
        "final_cost": res.final_cost,
        "meets_budget": res.final_cost <= budget * (1 + 1e-9),
        "predicted_ms": cost.predict(res.keep) if kind == "latency" else None,
        "predicted_speedup": (float(table.model["measured_ms"]) / cost.predict(res.keep)) if kind == "latency" else None,
        "flops_ratio": flops_kept / flops_full,
        "params_ratio": params_kept / params_full,
        "top1": res.final_top1,
        "seconds": time.perf_counter() - t0,
        "groups": groups,
        "layers": layers,
        "history": res.history,
        "world_size": D.world(),
    }
    if weight_masks is not None:
        from .unstructured import unstructured_speed_note

        zeros = sum(int((res.state_dict[f"{n}.weight"] == 0).sum()) for n in weight_masks)
        total = sum(int(m.numel()) for m in weight_masks.values())
        summary["unstructured"] = {"method": pc.method, "sparsity_target": pc.sparsity,
                                   "sparsity": zeros / total, "weights": total, "layers": len(weight_masks),
                                   "note": unstructured_speed_note(zeros / total)}
    if D.is_main():
        atomic_write_json(pdir / "summary.json", summary, checksum=True)
    D.barrier()
    if return_result:
        summary = dict(summary, result=res)
    return summary


def _keep_measurer(recipe, graph: ChannelGraph, workdir: Path):
    """``measure(keep) -> (dense_ms, slim_ms)``: the dense model and the model slimmed to ``keep``
    (random weights: latency does not depend on them) timed interleaved on the profile backend."""
    dense = build_model(recipe, load_weights=False)
    prof = recipe.profile

    def measure(keep: torch.Tensor) -> tuple[float, float]:
        st = measure_lowest({"dense": dense, "slim": slim_structure(recipe, graph, keep)}, recipe,
                            workdir=workdir / ".closed_loop_tmp", repeats=1, min_runs=max(20, prof.min_runs),
                            max_seconds=min(60.0, prof.max_seconds / 2))["stats"]
        return st["dense"]["median_ms"], st["slim"]["median_ms"]

    return measure


def _weight_masks(recipe, model, bundle, pdir: Path, rep) -> dict:
    """The unstructured method's weight masks: decided once (before the first step) and stored in
    ``prune/weight_masks.pt``, so a resumed run keeps them."""
    from . import dist as D
    from .data import make_loader
    from .methods import unstructured_masks

    path = pdir / "weight_masks.pt"
    pc = recipe.prune
    if D.world() > 1 and not D.is_main():  # rank 0 decides (below) and writes the file; every rank loads it
        D.barrier()
        ck = load_torch(path, "weight masks", "delete it (and prune/checkpoint.pt) to start over", keys=("masks",))
        return {k: v.to(torch.bool) for k, v in ck["masks"].items()}
    if path.exists():
        ck = load_torch(path, "weight masks", "delete it (and prune/checkpoint.pt) to start over", keys=("masks",))
        if ck.get("method") == pc.method and ck.get("sparsity") == pc.sparsity:
            rep.log(f"{pc.method}: weight masks from {path}")
            D.barrier()
            return {k: v.to(torch.bool) for k, v in ck["masks"].items()}
    batch = None
    if pc.method == "snip":
        loader = make_loader(bundle.train, batch_size=recipe.data.batch_size, shuffle=True, seed=recipe.seed)
        batch = next(iter(loader))
        model.train()
    masks = unstructured_masks(pc.method, model, pc.sparsity, batch, exclude=tuple(recipe.model.unpruned or ()),
                               label_smoothing=pc.label_smoothing)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(int(m.numel()) for m in masks.values())
    rep.log(f"{pc.method}: {total - kept}/{total} weights of {len(masks)} layers set to zero "
            f"(sparsity {1 - kept / total:.3f}); they stay zero while fine-tuning")
    atomic_torch_save({"masks": {k: v.cpu() for k, v in masks.items()}, "method": pc.method,
                       "sparsity": pc.sparsity}, path, checksum=True)
    D.barrier()
    return masks


# --------------------------------------------------------------------------------------------------
# slim


def load_pruned(recipe, out: Path) -> tuple[torch.nn.Module, ChannelGraph, torch.Tensor]:
    path = out / "prune" / "pruned.pt"
    if not path.exists():
        raise SmcpError(f"pruned checkpoint {path} not found; run `smcp prune` with the same --recipe/--out first")
    ck = load_torch(path, "pruned checkpoint", "re-run `smcp prune`", keys=("state_dict", "keep", "n_classes"))
    model = build_model(recipe, load_weights=False)
    graph = build_graph(recipe, model)
    if int(ck.get("n_classes", -1)) != graph.n_classes:
        raise SmcpError(f"{path} was made for a different model than {recipe.model.source}; re-run `smcp prune`")
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as exc:
        raise SmcpError(f"{path} does not match the recipe's model: {str(exc).splitlines()[0]}") from None
    return model.eval(), graph, ck["keep"].to(torch.bool)


def slim(recipe, out: Path, *, reporter: Reporter | None = None) -> dict:
    from .slim import count_params, export_program, slim_model

    rep = reporter or Reporter()
    model, graph, keep = load_pruned(recipe, out)
    t0 = time.perf_counter()
    slim_gm = slim_model(model, graph, keep)
    t_slim = time.perf_counter() - t0
    x = example_input(recipe, 4)
    with torch.no_grad():
        diff = float((model(x) - slim_gm(x)).abs().max())
    tol = recipe.export.tolerance
    sdir = out / "slim"
    sdir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({k: v.detach().cpu() for k, v in slim_gm.state_dict().items()}, sdir / "weights.pt",
                      checksum=True)
    spec = {
        "format": "smcp-channel-spec/1",
        "model": {"source": recipe.model.source, "kwargs": dict(recipe.model.kwargs or {}),
                  "num_classes": num_classes(recipe), "unpruned": list(recipe.model.unpruned or [])},
        "input_shape": list(input_shape(recipe)),
        "n_classes": graph.n_classes,
        "kept_classes": torch.nonzero(keep).flatten().tolist(),
        "layers": [{"name": l.name, "cin": ci, "cout": co} for l, (ci, co) in zip(graph.layers, graph.widths(keep))],
    }
    atomic_write_json(sdir / "channel_spec.json", spec, checksum=True)
    rep.log("saving torch.export program")
    forget_checksum(sdir / "model.pt2")  # written by slim.export_program: record it afterwards
    export_program(slim_gm, example_input(recipe, 2), sdir / "model.pt2")
    record_checksum(sdir / "model.pt2")
    flops_full, params_full = graph.flops_params()
    flops_kept, _ = graph.flops_params(keep)
    res = {
        "stamp": stamp(recipe, "slim"),
        "max_abs_diff": diff,
        "tolerance": tol,
        "params": count_params(slim_gm),
        "params_full": count_params(model),
        "flops": flops_kept,
        "flops_full": flops_full,
        "seconds": t_slim,
    }
    atomic_write_json(sdir / "slim.json", res, checksum=True)
    if diff > tol:
        raise GateFailed(f"slim model differs from the masked model by {diff:.3g} (> tolerance {tol:g}); "
                         "please report this model")
    return res


def load_slim(recipe, out: Path) -> torch.nn.Module:
    """The slim model, rebuilt from the original model definition + ``slim/channel_spec.json`` +
    ``slim/weights.pt`` (no pickled modules involved)."""
    sdir = out / "slim"
    spec, weights = sdir / "channel_spec.json", sdir / "weights.pt"
    if not spec.exists() or not weights.exists():
        raise SmcpError(f"slim model not found in {sdir}; run `smcp slim` with the same --recipe/--out first")
    return rebuild_slim(spec, weights)


def rebuild_slim(spec_path: Path, weights_path: Path) -> torch.nn.Module:
    """Rebuild a slim model from the original model definition + channel spec + tensors."""
    from .models import build_model as _build
    from .slim import slim_model

    spec = read_json(spec_path, "channel spec")
    m = spec["model"]
    model = _build(m["source"], num_classes=m.get("num_classes"), kwargs=m.get("kwargs") or {}).eval()
    graph = ChannelGraph(model, torch.randn(1, *spec["input_shape"]), unpruned=m.get("unpruned") or [])
    if graph.n_classes != spec["n_classes"]:
        raise SmcpError(f"{spec_path}: the model definition changed since slimming; cannot rebuild")
    keep = torch.zeros(graph.n_classes, dtype=torch.bool)
    keep[spec["kept_classes"]] = True
    gm = slim_model(model, graph, keep)
    weights = load_torch(weights_path, "slim weights", "re-run `smcp slim`")
    try:
        gm.load_state_dict(weights)
    except Exception as exc:  # noqa: BLE001
        from .fsutil import first_line

        raise SmcpError(f"cannot load {weights_path}: {first_line(exc)}; re-run `smcp slim`") from None
    return gm.eval()


# --------------------------------------------------------------------------------------------------
# export


def export(recipe, out: Path, *, reporter: Reporter | None = None, trt: bool | None = None) -> dict:
    from .bench import environment_report
    from .export import export_onnx, onnx_parity

    rep = reporter or Reporter()
    ec = recipe.export
    formats = list(ec.formats)
    if trt:
        formats = list(dict.fromkeys(formats + ["trt"]))
    if "trt" in formats:
        from .export import ensure_tensorrt

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
    meas = measure_models({"baseline": base, "pruned": slim_m}, recipe, batch=batch, backend=backend,
                          workdir=edir, min_runs=ec.min_runs, max_seconds=ec.max_seconds,
                          onnx_paths={"baseline": onnx_base, "pruned": onnx_slim})
    sb, sp = meas["stats"]["baseline"], meas["stats"]["pruned"]
    speedup = sb["median_ms"] / sp["median_ms"]
    kind, value = recipe.target_kind(), recipe.target_value()
    slim_info = read_json(out / "slim" / "slim.json", "slim summary") if (out / "slim" / "slim.json").exists() else {}
    flops_ratio = slim_info["flops"] / slim_info["flops_full"] if slim_info else None
    params_ratio = slim_info["params"] / slim_info["params_full"] if slim_info else None
    if kind == "speedup":
        passed = speedup >= value
    elif kind == "latency_ms":
        passed = sp["median_ms"] <= value
    else:
        passed = flops_ratio is not None and flops_ratio <= value + 1e-9
    # absolute, or relative for outputs larger than 1 (e.g. the logits of a barely trained model)
    parity_ok = par["max_abs_diff"] <= ec.tolerance or par.get("max_rel_diff", 1.0) <= ec.tolerance
    acc = None
    if recipe.data.val_path or recipe.data.source in ("digits", "cifar10", "imagenet_samples", "synthetic", "imagefolder"):
        try:
            acc = _accuracy(recipe, base, slim_m, out)
        except SmcpError as exc:
            rep.log(f"accuracy skipped: {exc}")
    pred = None
    summ = out / "prune" / "summary.json"
    if summ.exists():
        pred = read_json(summ, "prune summary").get("predicted_ms")
    report = {
        "stamp": stamp(recipe, "export"),
        "backend": backend,
        "device": recipe.profile.device,
        "batch_size": batch,
        "dtype": "float32",
        "input_shape": [batch, *input_shape(recipe)],
        "baseline": {"latency_ms": sb["median_ms"], "stats": sb},
        "pruned": {"latency_ms": sp["median_ms"], "stats": sp, "predicted_ms": pred},
        "speedup": speedup,
        "target": {"kind": kind, "value": value},
        "target_speedup": value if kind == "speedup" else None,
        "passed": bool(passed and parity_ok),
        "parity": {**par, "tolerance": ec.tolerance, "passed": parity_ok},
        "flops_ratio": flops_ratio,
        "params_ratio": params_ratio,
        "accuracy": acc,
        "environment": environment_report(backend=backend, device=recipe.profile.device,
                                          threads=recipe.profile.threads, batch_size=batch),
        "files": {"onnx": str(onnx_slim), "baseline_onnx": str(onnx_base)},
    }
    if "trt" in formats:
        from .export import build_trt_engine

        eng = build_trt_engine(onnx_slim, edir / "model.engine", precision=ec.trt_precision, batch_size=batch)
        report["files"]["engine"] = str(eng)
    atomic_write_json(edir / "report.json", report, checksum=True)
    return report


def _accuracy(recipe, base, slim_m, out: Path) -> dict | None:
    """Top-1 of the pruned model and of the dense baseline on the validation set.  A model trained
    from scratch has no meaningful baseline weights: its dense reference is the top-1 at the end
    of the dense warm-up, taken from the prune history."""
    from .data import make_loader
    from .train import evaluate

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


def gate(report: dict) -> None:
    """Raise GateFailed (exit 2) when an export report did not pass."""
    if report["passed"]:
        return
    if not report["parity"]["passed"]:
        raise GateFailed(f"ONNX parity failed: max abs diff {report['parity']['max_abs_diff']:.3g} > "
                         f"{report['parity']['tolerance']:g}")
    t = report["target"]
    raise GateFailed(
        f"target missed: measured speed-up {report['speedup']:.2f}x on {report['backend']} at batch "
        f"{report['batch_size']} ({report['baseline']['latency_ms']:.3f} -> {report['pruned']['latency_ms']:.3f} ms), "
        f"target {t['kind']}={t['value']}"
    )
