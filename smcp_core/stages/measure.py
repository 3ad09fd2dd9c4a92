"""Whole-model latency on the profile backend: models timed interleaved in one loop, and the slimmed
structures (random weights) the calibration and the closed loop measure."""

from __future__ import annotations

import copy
import math
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smcp_core.config.recipe import ProfileConfig, Recipe
from smcp_core.errors import SmcpError
from smcp_core.export.onnx import export_onnx
from smcp_core.export.tensorrt import build_model_engine, trt_runner
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.profile.cost_model import layer_site
from smcp_core.profile.paired import Interval, PairedTiming, Verdict, judge, median_interval, time_paired
from smcp_core.profile.timing import (
    Stats,
    canonical_dtype,
    device_timer,
    host_timer,
    ort_providers,
    ort_runner,
    ort_session,
    rotating,
    time_interleaved,
    torch_runner,
)
from smcp_core.profile.trt import engine_timer, trt_precision
from smcp_core.prune.allocator import uniform_keep
from smcp_core.prune.masking import Masker
from smcp_core.slim.surgery import slim_submodule
from smcp_core.stages.builders import build_model, example_input


@dataclass(frozen=True)
class Bench:
    """Where whole models are timed without a recipe (the Python API): the profile settings
    (backend, device, threads, warm-up) and one example input batch, repeated to the batch size."""

    profile: ProfileConfig
    example: torch.Tensor

    def batch(self, n: int) -> torch.Tensor:
        x = self.example[:1]
        return x.expand(n, *x.shape[1:]).contiguous()


def _bench(where: Recipe | Bench) -> Bench:
    """A recipe's bench: its profile section and its example input."""
    return where if isinstance(where, Bench) else Bench(where.profile, example_input(where, 1))


def _onnx_bytes(model: torch.nn.Module, example: torch.Tensor, tmpdir: Path, name: str,
                dtype: str = "float32") -> Path:
    """``model`` exported to ``tmpdir/NAME.onnx`` (float16 when the profile's table is float16, so
    the calibration and the closed loop time what the table timed)."""
    path = tmpdir / f"{name}.onnx"
    export_onnx(model, example, path, dynamic_batch=True, dtype="float16" if dtype == "float16" else "float32")
    return path


def _ort_input(sess, x: torch.Tensor):
    """``x`` as the numpy array the session's first input takes (float16 or float32)."""
    xn = x.numpy()
    return xn.astype("float16") if sess.get_inputs()[0].type == "tensor(float16)" else xn


@dataclass(frozen=True)
class TrtPlan:
    """How whole models become TensorRT engines: their ``precision`` (None: the profile's dtype),
    where each model's engine goes (by name; default ``WORKDIR/NAME.engine``) and the persistent
    timing cache (default ``trt_timing.cache`` beside ``WORKDIR``, which may be a scratch folder)."""

    precision: str | None = None
    engines: dict[str, Path] = field(default_factory=dict)
    timing_cache: Path | None = None

    def engine(self, name: str, workdir: Path) -> Path:
        return self.engines.get(name, workdir / f"{name}.engine")

    def cache(self, workdir: Path) -> Path:
        return self.timing_cache if self.timing_cache is not None else workdir.parent / "trt_timing.cache"


def _trt_runners(models: dict[str, torch.nn.Module], x: torch.Tensor, prof: ProfileConfig, workdir: Path,
                 onnx_paths: dict[str, Path], plan: TrtPlan | None) -> tuple[dict, Any, dict[str, Path]]:
    """Engines of ``models`` at ``x``'s batch (one build each, the timing cache shared), their runners
    (enqueued on the current CUDA stream) and the CUDA-event timer."""
    plan = plan or TrtPlan()
    precision = plan.precision or trt_precision(prof.dtype)
    fns = {}
    for name, m in models.items():
        eng = plan.engine(name, workdir)
        if not _built_from(eng, onnx_paths.get(name)):  # measure_lowest's second loop reuses its engines
            onnx_paths[name] = build_model_engine(m, x, eng, precision=precision, timing_cache=plan.cache(workdir),
                                                  onnx_path=onnx_paths.get(name))
        fns[name] = trt_runner(eng, x)
    return fns, engine_timer(), onnx_paths


def _built_from(engine: Path, onnx: Path | None) -> bool:
    """Whether ``engine`` was built after ``onnx`` was written (both exist)."""
    return (onnx is not None and engine.exists() and Path(onnx).exists()
            and engine.stat().st_mtime_ns >= Path(onnx).stat().st_mtime_ns)


ORT_CPU_SESSIONS = 4
"""Sessions per model when whole models are timed on onnxruntime CPU; the timing loops call them in
turn (:func:`~smcp_core.profile.timing.rotating`), so no one session's offset (1-2 %, seen on ResNet-56
at batch 1) decides a speed-up."""


def _ort_model_runner(onnx_path: Path, x: torch.Tensor, prof: ProfileConfig, providers) -> Any:
    """A forward call of one new onnxruntime session of ``onnx_path`` (IO binding on CUDA, as the
    table), run once so that the session's first-call allocations are not in any timing loop."""
    sess = ort_session(onnx_path, threads=prof.threads, providers=providers)
    fn = ort_runner(sess, _ort_input(sess, x), device=prof.device)
    fn()
    return fn


def _runners(models: dict[str, torch.nn.Module], where: Recipe | Bench, *, batch: int, backend: str, workdir: Path,
             onnx_paths: dict[str, Path] | None = None,
             trt: TrtPlan | None = None) -> tuple[dict, Any, dict[str, Path]]:
    """One zero-argument forward call per model on ``backend`` (ONNX files exported into ``workdir``
    unless given), the timer for them (CUDA events for torch on a GPU and for TensorRT engines;
    onnxruntime's IO-bound CUDA run synchronises its own stream, so wall clock) and the ONNX files
    used.  TensorRT: engines built as ``trt`` says (:class:`TrtPlan`)."""
    bench = _bench(where)
    prof = bench.profile
    x = bench.batch(batch)
    fns = {}
    onnx_paths = dict(onnx_paths or {})
    if backend == "onnxruntime":
        providers = ort_providers(prof.device) if prof.device != "cpu" else None
        n_sessions = ORT_CPU_SESSIONS if prof.device == "cpu" else 1
        for name, m in models.items():
            if name not in onnx_paths:
                onnx_paths[name] = _onnx_bytes(m, x, workdir, name, canonical_dtype(prof.dtype))
            fns[name] = rotating([_ort_model_runner(onnx_paths[name], x, prof, providers) for _ in range(n_sessions)])
        return fns, host_timer(), onnx_paths
    if backend == "torch":
        if prof.threads:
            torch.set_num_threads(prof.threads)
        for name, m in models.items():
            fns[name] = torch_runner(m, x, device=prof.device, dtype=prof.dtype,
                                     channels_last=prof.layout == "channels_last")
        return fns, device_timer(prof.device), onnx_paths
    if backend == "tensorrt":
        return _trt_runners(models, x, prof, workdir, onnx_paths, trt)
    raise SmcpError(f"unknown backend {backend!r}")


def measure_models(models: dict[str, torch.nn.Module], where: Recipe | Bench, *, batch: int, backend: str,
                   workdir: Path, min_runs: int = 30, max_seconds: float = 60.0,
                   onnx_paths: dict[str, Path] | None = None) -> dict[str, Any]:
    """Median latency of each model, measured interleaved in one loop on one backend."""
    fns, timer, onnx_paths = _runners(models, where, batch=batch, backend=backend, workdir=workdir,
                                     onnx_paths=onnx_paths)
    stats = time_interleaved(fns, warmup=max(3, _bench(where).profile.warmup // 2), min_runs=min_runs,
                             max_seconds=max_seconds, timer=timer)
    return {"stats": {k: v.to_dict() for k, v in stats.items()}, "onnx": onnx_paths}


def measure_in_one_loop(models: dict[str, torch.nn.Module], recipe: Recipe, workdir: Path) -> dict[str, dict]:
    """Every model timed interleaved in ONE loop on ``recipe``'s export backend and batch
    (``export.min_runs`` rounds, ``export.max_seconds`` per two models): name -> timing stats.  Every
    model is timed at the same moments; but each call starts colder than in the export gate's pairs
    (:func:`measure_as_export`), which slows small models more than large ones.  The ONNX files go to
    a scratch folder in ``workdir``, removed afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    with scratch_dir(Path(tempfile.mkdtemp(prefix=".measure_", dir=workdir))) as tmp:
        meas = measure_models(models, recipe, batch=recipe.export_batch_size(), backend=recipe.export_backend(),
                              workdir=tmp, min_runs=recipe.export.min_runs,
                              max_seconds=recipe.export.max_seconds * max(1.0, len(models) / 2))
    return meas["stats"]


def measure_as_export(models: dict[str, torch.nn.Module], recipe: Recipe, workdir: Path, *,
                      baseline: str = "dense") -> dict[str, dict]:
    """Every model paired with ``baseline`` the way ``recipe``'s export gate measures (its backend and
    batch, at least ``export.min_runs`` rounds, at most ``export.max_seconds`` per pair;
    :func:`measure_against_baseline`): name -> timing stats, with the paired ``speedup`` (median of
    the per-round ratios) and its ``speedup_interval`` (at ``export.confidence``, as the gate) beside
    each model's own (the baseline's: 1).  The ONNX files go to a scratch folder in ``workdir``, removed afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    max_s = recipe.export.max_seconds
    meas = measure_against_baseline(models, recipe, workdir=Path(tempfile.mkdtemp(prefix=".measure_", dir=workdir)),
                                    baseline=baseline, batch=recipe.export_batch_size(),
                                    backend=recipe.export_backend(), min_rounds=recipe.export.min_runs,
                                    min_seconds=min(10.0, max_s / 4), max_seconds=max_s,
                                    confidence=recipe.export.confidence)  # removes its workdir
    out = {}
    for name, st in meas["stats"].items():
        iv = meas["speedup"].get(name)
        out[name] = {**st, "speedup": iv.median if iv else 1.0,
                     "speedup_interval": [iv.lo, iv.hi] if iv else [1.0, 1.0], "rounds": iv.n if iv else None}
    return out


@dataclass
class PairMeasurement:
    """What :func:`measure_pair` measured: the rounds, the speed-up (median of the per-round
    ratios, with its interval) and the verdict on the target (None without a timed target)."""

    timing: PairedTiming
    speedup: Interval
    verdict: Verdict | None

    def gate_doc(self) -> dict[str, Any]:
        """What ``export/report.json`` records of the measurement under ``gate``."""
        t, iv = self.timing, self.speedup
        return {"rule": "median of per-round ratios (paired, alternating order); decided by the "
                        f"{100 * iv.confidence:g} % order-statistics interval, by the median while it straddles",
                "speedup": iv.median, "speedup_interval": [iv.lo, iv.hi], "confidence": iv.confidence,
                "rounds": len(t.a_s), "seconds": t.seconds, "stopped": t.stopped,
                "verdict": self.verdict.to_dict() if self.verdict is not None else None}


def measure_pair(baseline: torch.nn.Module, pruned: torch.nn.Module, where: Recipe | Bench, *, batch: int,
                 backend: str,
                 workdir: Path, kind: str | None, target: float | None, confidence: float = 0.9,
                 min_rounds: int = 30, max_seconds: float = 60.0,
                 onnx_paths: dict[str, Path] | None = None, trt: TrtPlan | None = None) -> PairMeasurement:
    """``baseline`` and ``pruned`` timed in paired rounds (:func:`~smcp_core.profile.paired.time_paired`)
    until the verdict on a ``speedup`` or ``latency_ms`` target is decided by its interval (or
    ``max_seconds`` are up); for any other ``kind`` (or no target) ``min_rounds`` rounds.  On
    ``tensorrt`` the engines are built as ``trt`` says."""
    fns, timer, _ = _runners({"baseline": baseline, "pruned": pruned}, where, batch=batch,
                            backend=backend, workdir=workdir, onnx_paths=onnx_paths, trt=trt)
    timed_target = kind in ("speedup", "latency_ms") and target is not None

    def verdict(t: PairedTiming) -> Verdict:
        if kind == "latency_ms":
            return judge(t.latencies_ms(), target, at_least=False, confidence=confidence, unit=" ms")
        return judge(t.ratios(), target, at_least=True, confidence=confidence)

    timing = time_paired(fns["baseline"], fns["pruned"], warmup=max(3, _bench(where).profile.warmup // 2),
                         min_rounds=min_rounds, max_seconds=max_seconds, timer=timer,
                         decided=(lambda t: verdict(t).decided_by == "interval") if timed_target else None)
    return PairMeasurement(timing=timing, speedup=median_interval(timing.ratios(), confidence),
                           verdict=verdict(timing) if timed_target else None)


def measure_against_baseline(models: dict[str, torch.nn.Module], where: Recipe | Bench, *, workdir: Path,
                             baseline: str = "baseline", batch: int | None = None, backend: str | None = None,
                             min_rounds: int = 100, min_seconds: float = 2.0, max_seconds: float = 20.0,
                             confidence: float = 0.9) -> dict[str, Any]:
    """Every model of ``models`` but ``baseline`` timed in paired rounds against ``baseline``, one pair
    after the other, as the export gate times a pruned model (:func:`~smcp_core.profile.paired.time_paired`:
    at least ``min_rounds`` rounds and ``min_seconds`` of timed calls, at most ``max_seconds`` per pair)
    on ``backend`` at ``batch`` (default: ``where``'s profile settings); the speed-ups' intervals at
    ``confidence``.  ``workdir`` (its ONNX files) is removed afterwards, also on an error.

    Two models alternating keep each other's state warm as a deployed model is; in one loop over many
    models every call starts colder, which slowed small models more than large ones (ResNet-56 at
    batch 1 on onnxruntime CPU: 5-17 % lower speed-ups in a 14-model loop than in pairs, which
    reproduced within 2 %).  ``{"stats": {name: stats}, "speedup": {name: Interval}, "ms": {name:
    ms}}``: ``ms`` of a model is the baseline's median (over every pair) over its median speed-up."""
    with scratch_dir(workdir):
        prof = _bench(where).profile
        fns, timer, _ = _runners(models, where, batch=batch or prof.batch_size, backend=backend or prof.backend,
                                 workdir=workdir)
        timings = {name: time_paired(fns[baseline], fn, warmup=max(3, prof.warmup // 2), min_rounds=min_rounds,
                                     max_seconds=max_seconds, timer=timer,
                                     decided=lambda t: sum(t.a_s) + sum(t.b_s) >= min_seconds)
                   for name, fn in fns.items() if name != baseline}
    base = Stats.from_samples([a for t in timings.values() for a in t.a_s])
    speedup = {name: median_interval(t.ratios(), confidence) for name, t in timings.items()}
    return {"stats": {baseline: base.to_dict(), **{k: Stats.from_samples(t.b_s).to_dict() for k, t in timings.items()}},
            "speedup": speedup, "ms": {baseline: base.median_ms, **{k: base.median_ms / iv.median
                                                                    for k, iv in speedup.items()}}}


def slim_structure(source: Recipe | torch.nn.Module, graph: ChannelGraph, keep: torch.Tensor) -> torch.nn.Module:
    """The recipe's model (random weights: latency does not depend on them), or a copy of a plain
    model, slimmed to ``keep`` (the graph's submodule slimmed, the rest as it was)."""
    m = build_model(source, load_weights=False) if isinstance(source, Recipe) else copy.deepcopy(source)
    sub = m.get_submodule(graph.submodule) if graph.submodule else m
    mk = Masker(sub, graph)
    mk.set_keep(keep)
    mk.remove(bake=True)
    return slim_submodule(m, graph, keep)


def keep_measurer(dense: torch.nn.Module, source: Recipe | torch.nn.Module, where: Recipe | Bench,
                  graph: ChannelGraph, workdir: Path, *, target_speedup: float, confidence: float = 0.9,
                  min_rounds: int = 30, max_seconds: float = 20.0):
    """``measure(keep) -> (dense_ms, slim_ms, slim_slow_ms)`` for the closed loop: ``dense`` and
    ``source`` slimmed to ``keep`` (:func:`slim_structure`) timed in paired rounds on ``where``'s
    backend until the interval of the speed-up is on one side of ``target_speedup`` (as the export
    gate does); ``slim_ms`` is the dense median over the median per-round speed-up and
    ``slim_slow_ms`` the same at the slow end of its interval (inf when too few rounds for one)."""
    prof = _bench(where).profile

    def measure(keep: torch.Tensor) -> tuple[float, float, float]:
        with scratch_dir(workdir / ".closed_loop_tmp") as tmp:
            m = measure_pair(dense, slim_structure(source, graph, keep), where, batch=prof.batch_size,
                             backend=prof.backend, workdir=tmp, kind="speedup", target=target_speedup,
                             confidence=confidence, min_rounds=min_rounds, max_seconds=max_seconds)
        dense_ms = m.timing.stats()[0].median_ms
        lo = m.speedup.lo
        return dense_ms, dense_ms / m.speedup.median, (dense_ms / lo if lo > 0 else math.inf)

    return measure


@contextmanager
def scratch_dir(path: Path) -> Iterator[Path]:
    """``path`` created for the ONNX files of a measurement and removed (with them) afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        for f in path.glob("*"):
            f.unlink()
        path.rmdir()


def measure_lowest(models: dict[str, torch.nn.Module], where: Recipe | Bench, *, workdir: Path, repeats: int = 2,
                   min_runs: int = 30, max_seconds: float = 60.0) -> dict[str, Any]:
    """:func:`measure_models` ``repeats`` times (ONNX files exported once); per model the run with
    the lower median is kept: a shared machine's stalls only ever add time, and one stalled loop
    would skew every ratio.  ``{"stats": {name: stats}, "repeats": [per-loop stats]}``."""
    prof = _bench(where).profile
    onnx_cache: dict = {}
    runs = []
    with scratch_dir(workdir):
        for _ in range(repeats):
            m_ = measure_models(models, where, batch=prof.batch_size, backend=prof.backend, workdir=workdir,
                                min_runs=min_runs, max_seconds=max_seconds, onnx_paths=onnx_cache)
            onnx_cache = m_["onnx"]
            runs.append(m_["stats"])
    return {"stats": {k: min((r[k] for r in runs), key=lambda st: st["median_ms"]) for k in models},
            "repeats": runs}


def _removable_groups(graph: ChannelGraph) -> list:
    """The groups whose removal removes a residual block's branch (layer pruning), none frozen."""
    return [g for g in graph.groups if g.prunable and g.removable and g.n_frozen == 0]


def _removal_keep(graph: ChannelGraph, frac: float, step: int = 1) -> torch.Tensor | None:
    """Every other removable group (layer pruning) removed, the rest uniformly thinned to ``frac``
    on the ``step`` grid (:func:`~smcp_core.prune.allocator.uniform_keep`); None when the graph has
    no removable group."""
    removable = _removable_groups(graph)
    if not removable:
        return None
    keep = uniform_keep(graph, frac, step)
    for g in removable[::2]:
        keep[g.classes] = False
    return keep


def _site_removal_keeps(graph: ChannelGraph) -> dict[str, torch.Tensor]:
    """``removed_<site>``: every other removable group whose layers work at that output resolution
    (:func:`~smcp_core.profile.cost_model.layer_site`, the most common among the layers its removal
    removes) removed, the rest whole; none when all removable groups share one resolution."""
    by_site: dict[str, list] = {}
    for g in _removable_groups(graph):
        keep = graph.full_keep()
        keep[g.classes] = False
        sites = [layer_site(layer) for layer, (ci, co) in zip(graph.layers, graph.widths(keep)) if ci == 0 or co == 0]
        if sites:
            by_site.setdefault(max(set(sites), key=sites.count), []).append(g)
    out = {}
    for site, groups in sorted(by_site.items()) if len(by_site) > 1 else []:
        keep = graph.full_keep()
        for g in groups[::2]:
            keep[g.classes] = False
        out[f"removed_{site}"] = keep
    return out


def removal_site(name: str) -> str | None:
    """The output resolution a ``removed_<HxW>`` calibration variant (:func:`_site_removal_keeps`)
    removes blocks of; None for every other variant."""
    m = re.fullmatch(r"removed_(\d+x\d+)", name)
    return m.group(1) if m else None


def calibration_keeps(graph: ChannelGraph, step: int, *, per_resolution: bool = False) -> dict[str, torch.Tensor]:
    """The structures the profile's whole-model calibration is fitted on, by name: the baseline, two
    uniformly thinned variants and (when layers can be removed) two with every other removable group
    removed; widths on the ``step`` grid the allocator keeps, since off-block widths time differently.
    ``per_resolution`` adds one per output resolution with removable groups (:func:`_site_removal_keeps`),
    which separates the resolutions' weights."""
    keeps = {"baseline": graph.full_keep(), "uniform75": uniform_keep(graph, 0.75, step),
             "uniform50": uniform_keep(graph, 0.5, step)}
    for name, frac in (("removed", 1.0), ("removed_uniform75", 0.75)):
        k = _removal_keep(graph, frac, step)
        if k is not None:
            keeps[name] = k
    return {**keeps, **(_site_removal_keeps(graph) if per_resolution else {})}
