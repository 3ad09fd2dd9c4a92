"""Measuring a latency table: every prunable layer of a model timed alone, as a one-node ONNX model
(onnxruntime) or a one-layer module (torch), over its channel grid, within a time budget."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from smcp_core import __version__
from smcp_core.errors import SmcpError
from smcp_core.graph.signature import LayerSig
from smcp_core.profile import fingerprint as profile_fingerprint
from smcp_core.profile import timing as profile_timing
from smcp_core.profile import trt as profile_trt
from smcp_core.profile.table import (
    MAX_GRID_POINTS,
    MEASURABLE_BACKENDS,
    LatencyTable,
    TableBudgetExceeded,
    _canonical_layout,
    _device_type,
    _Entry,
    channel_grid,
)
from smcp_core.utils.fsutil import atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    pass


def single_layer_module(sig: LayerSig, cin: int, cout: int):
    """The torch layer of ``sig`` at widths ``cin``/``cout`` (random init); depthwise uses ``cin``."""
    from torch import nn

    if sig.kind == "linear":
        return nn.Linear(cin, cout, bias=sig.bias)
    c_out, groups = (cin, cin // sig.group_size) if sig.depthwise else (cout, 1)
    return nn.Conv2d(
        cin,
        c_out,
        kernel_size=sig.kernel,
        stride=sig.stride,
        padding=sig.padding,
        dilation=sig.dilation,
        groups=groups,
        bias=sig.bias,
    )


def _input_shape(sig: LayerSig, cin: int, batch: int) -> tuple[int, ...]:
    if sig.kind == "linear":
        return (batch, cin)
    return (batch, cin, sig.in_hw[0], sig.in_hw[1])


def single_layer_onnx(sig: LayerSig, cin: int, cout: int, *, batch_size: int = 1, dtype: str = "float32",
                      seed: int = 0) -> bytes:
    """A serialized ONNX model of one Conv (or Gemm for linear) node with random initializers.

    Built directly with ``onnx.helper`` (no torch export).  Input ``"input"``, output ``"output"``.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    if dtype == "float32":
        np_dt, elem = np.float32, TensorProto.FLOAT
    elif dtype == "float16":
        np_dt, elem = np.float16, TensorProto.FLOAT16
    else:
        raise SmcpError(f"onnxruntime latency tables support float32 and float16, not {dtype}")
    rng = np.random.default_rng(seed)
    inits = []
    if sig.kind == "linear":
        w = (rng.standard_normal((cout, cin)) / math.sqrt(cin)).astype(np_dt)
        inputs = ["input", "W"]
        inits.append(numpy_helper.from_array(w, "W"))
        if sig.bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np_dt), "B"))
            inputs.append("B")
        node = helper.make_node("Gemm", inputs, ["output"], transB=1)
        out_shape = [batch_size, cout]
    else:
        c_out, groups = (cin, cin // sig.group_size) if sig.depthwise else (cout, 1)
        kh, kw = sig.kernel
        fan_in = (cin // groups) * kh * kw
        w = (rng.standard_normal((c_out, cin // groups, kh, kw)) / math.sqrt(fan_in)).astype(np_dt)
        inputs = ["input", "W"]
        inits.append(numpy_helper.from_array(w, "W"))
        if sig.bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np_dt), "B"))
            inputs.append("B")
        node = helper.make_node(
            "Conv",
            inputs,
            ["output"],
            kernel_shape=[kh, kw],
            strides=list(sig.stride),
            pads=[sig.padding[0], sig.padding[1], sig.padding[0], sig.padding[1]],
            dilations=list(sig.dilation),
            group=groups,
        )
        oh, ow = sig.out_hw
        out_shape = [batch_size, c_out, oh, ow]
    graph = helper.make_graph(
        [node],
        "smcp_layer",
        [helper.make_tensor_value_info("input", elem, list(_input_shape(sig, cin, batch_size)))],
        [helper.make_tensor_value_info("output", elem, out_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="smcp")
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    return model.SerializeToString()


def _measure_point(
    sig: LayerSig,
    cin: int,
    cout: int,
    *,
    backend: str,
    batch_size: int,
    dtype: str,
    layout: str,
    device: str,
    threads: int | None,
    timing: dict,
    trt_timing_cache: str | os.PathLike | None = None,
) -> float:
    """Median latency (ms) of one layer at one grid point."""

    if backend == "tensorrt":
        return _measure_trt_point(sig, cin, cout, batch_size=batch_size, dtype=dtype, timing=timing,
                                  timing_cache=trt_timing_cache)
    if backend == "torch":
        import torch

        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            torch.manual_seed(cin * 100003 + cout)
            module = single_layer_module(sig, cin, cout)
            x = torch.randn(_input_shape(sig, cin, batch_size))
        fn = profile_timing.torch_runner(module, x, device=device, dtype=dtype, channels_last=(layout == "nhwc"))
        stats = profile_timing.time_one(fn, timer=profile_timing.device_timer(device), **timing)
    else:  # onnxruntime
        import numpy as np

        model = single_layer_onnx(sig, cin, cout, batch_size=batch_size, dtype=dtype)
        sess = profile_timing.ort_session(model, threads=threads, providers=profile_timing.ort_providers(device))
        rng = np.random.default_rng(cin * 100003 + cout)
        np_dt = np.float16 if dtype == "float16" else np.float32
        x = rng.standard_normal(_input_shape(sig, cin, batch_size)).astype(np_dt)
        fn = profile_timing.ort_runner(sess, x, device=device)
        stats = profile_timing.time_one(fn, **timing)
    return float(stats.median_ms)


def _measure_trt_point(sig: LayerSig, cin: int, cout: int, *, batch_size: int, dtype: str, timing: dict,
                       timing_cache: str | os.PathLike | None) -> float:
    """Median latency (ms) of one layer's TensorRT engine (built from :func:`single_layer_onnx`, the
    timing cache shared by all points), CUDA events on the runner's stream after warm-up."""
    import torch

    trt = profile_trt.ensure_tensorrt()
    precision = profile_trt.trt_precision(dtype)
    model = single_layer_onnx(sig, cin, cout, batch_size=batch_size, dtype=profile_trt.onnx_dtype_for(trt, precision))
    engine = profile_trt.serialize_engine(model, precision=precision, batch_size=batch_size, timing_cache=timing_cache)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cin * 100003 + cout)
        x = torch.randn(_input_shape(sig, cin, batch_size))
    fn = profile_trt.trt_runner(engine, x)
    return float(profile_timing.time_one(fn, timer=profile_trt.engine_timer(), **timing).median_ms)


def measure_table(
    sigs: Iterable[LayerSig],
    *,
    backend: str,
    batch_size: int = 1,
    dtype: str = "float32",
    layout: str = "nchw",
    device: str = "cpu",
    channel_step: int = 8,
    threads: int | None = None,
    warmup: int = 10,
    min_runs: int = 20,
    max_runs: int = 200,
    rel_tol: float = 0.02,
    point_max_seconds: float = 10.0,
    max_seconds: float = 600,
    existing: LatencyTable | Sequence[LatencyTable] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    coarse_stride: int = 4,
    max_grid_points: int | None = MAX_GRID_POINTS,
    partial_path: str | os.PathLike | None = None,
    trt_timing_cache: str | os.PathLike | None = None,
) -> LatencyTable:
    """Measure a :class:`LatencyTable` for the given layer signatures.

    * Signatures with the same key are measured once, on the union of their grids
      (:func:`channel_grid` of each width with ``channel_step`` and ``max_grid_points``: at most
      ``max_grid_points`` widths per layer and axis, ``None``: no cap).
    * ``backend="torch"``: the single ``nn.Conv2d``/``nn.Linear`` (random weights) in eval +
      inference mode, ``dtype``, channels-last when ``layout="nhwc"``, ``torch.set_num_threads(threads)``
      while measuring.  ``backend="onnxruntime"``: a one-node ONNX model built with ``onnx.helper``
      run by an ``InferenceSession`` (``threads`` intra-op threads, spinning off; NCHW only).
      ``backend="tensorrt"``: one engine per point from that ONNX model (fp16 via the FP16 builder
      flag on TensorRT 10, from an fp16 ONNX model on TensorRT 11; NCHW only), the persistent timing
      cache ``trt_timing_cache`` shared by every build, timed with CUDA events on the runner's stream.
    * Each point is timed with :func:`profile_timing.time_one` (``warmup``, ``min_runs``, ``max_runs``,
      ``rel_tol``, at most ``point_max_seconds``); the stored value is the median in ms.
    * ``existing``: a table (or a sequence of tables, the first one that has a point wins) measured
      with the same backend/device/batch/dtype/layout and the same machine fingerprint -- its grid
      points are reused instead of re-measured, and its entries for other keys are carried over.  An
      incompatible ``existing`` is ignored.  Points it only interpolated are measured again.
    * ``progress(done, total, key)`` is called after every measured point (``done`` counts reused
      points too) and once with key ``"interpolated"`` when the rest is interpolated.
    * Coarse to fine: first every layer's coarse sub-grid (every ``coarse_stride``-th grid point
      along each axis plus both ends), then the remaining points.
    * ``max_seconds`` bounds the whole measurement.  When it runs out after the coarse sub-grids
      are measured, the points not measured yet are interpolated (bilinearly, in channel counts)
      from the coarse sub-grid and counted in ``meta.measure.interpolated_points``; when it runs out
      earlier, :class:`TableBudgetExceeded` (an :class:`SmcpError`) is raised; its ``partial``
      attribute holds the points measured so far, usable as ``existing=`` to resume.
    * ``partial_path``: where the points measured so far are written (atomically, with a checksum;
      ``meta.partial`` true, ``meta.complete`` false) when the budget runs out before the coarse
      sub-grids are measured or the measurement is interrupted (``KeyboardInterrupt``); pass the
      table loaded from it as ``existing=`` to measure only the missing points.  The error's message
      says where they are (or that they could not be written).
    """

    dtype, layout, batch_size = _checked_settings(backend, dtype, layout, batch_size, channel_step)
    groups = _group_signatures(sigs)
    if max_grid_points is not None and int(max_grid_points) < 1:
        raise SmcpError(f"max grid points must be >= 1 (or None: no cap), got {max_grid_points}")
    plan = [_plan_entry(key, ss, channel_step, max_grid_points) for key, ss in groups.items()]
    setup = {"backend": backend, "batch_size": batch_size, "dtype": dtype, "layout": layout, "device": device,
             "threads": threads, "trt_timing_cache": trt_timing_cache}
    if backend == "torch" and str(device).startswith("cuda"):
        profile_timing.enable_cudnn_benchmark()  # before the fingerprint records the setting
    fp = profile_fingerprint.device_fingerprint(backend, device, threads)
    fpid = profile_fingerprint.fingerprint_id(fp)
    olds = [] if existing is None else [existing] if isinstance(existing, LatencyTable) else list(existing)
    olds = [t for t in olds if _reusable(t, setup, fpid)]
    timing = {"warmup": warmup, "min_runs": min_runs, "max_runs": max_runs, "rel_tol": rel_tol}
    meta = _table_meta(setup, channel_step, fp, fpid, {**timing, "point_max_seconds": point_max_seconds})
    meta["max_grid_points"] = None if max_grid_points is None else int(max_grid_points)
    table, carried_interp = _new_table(meta, plan, olds)
    # a partial table written below keeps the carried entries' interpolated flags
    table.meta["measure"]["interpolated"] = dict(carried_interp)

    budget = _Budget(total=sum(e.n_points() for e in plan), max_seconds=max_seconds,
                     point_max_seconds=point_max_seconds, progress=progress)
    old_threads = _set_torch_threads(backend, threads)
    coarse = {e.key: _coarse_indices(e, coarse_stride) for e in plan}
    budget.reused = budget.done = _reuse_points(plan, olds)
    order = [(lvl, e, ci, co) for lvl in (0, 1) for e in plan for ci, co, v in e.points()
             if v is None and _is_coarse(e, ci, co, coarse[e.key]) == (lvl == 0)]
    try:
        interpolated = _measure_in_order(table, plan, order, coarse, budget, setup, timing, channel_step)
    except TableBudgetExceeded as exc:
        raise _with_partial_saved(exc, table, partial_path) from None
    except KeyboardInterrupt:
        _record_counts(table, budget)
        _save_partial(table, partial_path)
        raise
    finally:
        _restore_torch_threads(old_threads)
    interpolated = {**carried_interp, **interpolated}  # other models' entries keep their flag
    table.meta["complete"] = table.complete
    table.meta["measure"].update(
        measured_points=budget.measured, reused_points=budget.reused,
        interpolated_points=sum(len(v) for v in interpolated.values()), interpolated=interpolated,
        seconds=budget.seconds()
    )
    return table


def _checked_settings(backend: str, dtype: str, layout: str, batch_size: int,
                      channel_step: int) -> tuple[str, str, int]:
    """``(dtype, layout, batch_size)`` in canonical form; :class:`SmcpError` for settings that
    cannot be measured."""
    if backend not in MEASURABLE_BACKENDS and backend != "tensorrt":
        raise SmcpError(f"unknown backend {backend!r}: use onnxruntime, torch or tensorrt")
    dtype = profile_timing.canonical_dtype(dtype)
    layout = _canonical_layout(layout)
    batch_size = int(batch_size)
    if batch_size < 1:
        raise SmcpError(f"batch size must be >= 1, got {batch_size}")
    if int(channel_step) < 1:
        raise SmcpError(f"channel step must be >= 1, got {channel_step}")
    if backend == "onnxruntime":
        profile_timing.ensure_onnxruntime()
        if layout != "nchw":
            raise SmcpError("onnxruntime models take NCHW input: use layout nchw with the onnxruntime backend")
        if dtype == "bfloat16":
            raise SmcpError("onnxruntime latency tables support float32 and float16, not bfloat16")
    if backend == "tensorrt":
        profile_trt.ensure_tensorrt()
        if layout != "nchw" or dtype == "bfloat16":
            raise SmcpError(f"TensorRT latency tables take NCHW float32 or float16 input, not {layout} {dtype}: "
                            "TensorRT picks its own internal layouts")
    return dtype, layout, batch_size


def _group_signatures(sigs: Iterable[LayerSig]) -> dict[str, list[LayerSig]]:
    """The signatures by key (first appearance first); :class:`SmcpError` for one that cannot be measured."""
    groups: dict[str, list[LayerSig]] = {}
    for s in sigs:
        if s.kind not in ("conv", "linear"):
            raise SmcpError(f"cannot measure layer kind {s.kind!r} ({s.key()}): only conv and linear")
        if s.depthwise and s.cin != s.cout:
            raise SmcpError(f"depthwise layer {s.key()} has cin={s.cin} != cout={s.cout}")
        if s.depthwise and s.cin % s.group_size:
            raise SmcpError(f"grouped layer {s.key()}: cin={s.cin} is not a multiple of its group size")
        groups.setdefault(s.key(), []).append(s)
    return groups


def _plan_entry(key: str, ss: list[LayerSig], channel_step: int,
                max_grid_points: int | None = MAX_GRID_POINTS) -> _Entry:
    """The empty entry of the signatures ``ss`` (one key): the widest of them, on the union of their grids."""
    cin_max = max(s.cin for s in ss)
    cout_max = max(s.cout for s in ss)
    rep = ss[0]
    rep = LayerSig.from_dict({**rep.to_dict(), "cin": cin_max, "cout": cout_max})
    # grouped convs (group_size > 1) are pruned a whole group at a time: widths are multiples of it
    gs = rep.group_size if rep.depthwise else 1
    cap = max_grid_points
    cin_grid = sorted({c * gs for s in ss for c in channel_grid(s.cin // gs, -(-int(channel_step) // gs), cap)})
    cout_grid = None if rep.depthwise else sorted({c for s in ss for c in channel_grid(s.cout, channel_step, cap)})
    return _Entry(key, rep, cin_grid, cout_grid)


def _reusable(existing: LatencyTable, setup: dict, fpid: str) -> bool:
    """Whether ``existing`` was measured with the same backend/device type/batch/dtype/layout on the
    machine with fingerprint id ``fpid``."""
    return (
        existing.backend == setup["backend"]
        and _device_type(existing.device) == _device_type(setup["device"])
        and existing.batch_size == setup["batch_size"]
        and existing.dtype == setup["dtype"]
        and existing.layout == setup["layout"]
        and existing.fingerprint_id == fpid
    )


def _table_meta(setup: dict, channel_step: int, fp: dict, fpid: str, measure: dict) -> dict:
    """The ``meta`` of a new table (``complete`` False until it is measured)."""
    return {
        "backend": setup["backend"],
        "device": str(setup["device"]),
        "batch_size": setup["batch_size"],
        "dtype": setup["dtype"],
        "layout": setup["layout"],
        "threads": setup["threads"],
        "channel_step": int(channel_step),
        "fingerprint": fp,
        "fingerprint_id": fpid,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smcp_version": __version__,
        "complete": False,
        "measure": {"statistic": "median", **measure},
    }


def _interpolated_meta(table: LatencyTable) -> dict:
    """``meta.measure.interpolated`` of a table: the points it interpolated, by key."""
    return (table.meta.get("measure") or {}).get("interpolated") or {}


def _new_table(meta: dict, plan: list[_Entry], olds: list[LatencyTable]) -> tuple[LatencyTable, dict]:
    """A table holding the (empty) entries of ``plan``, and the model and the entries of other keys
    carried over from the reusable tables ``olds`` (the first one that has a key wins); also returns
    the carried entries' interpolated points."""
    table = LatencyTable(meta=meta, model=dict(olds[0].model) if olds else None)
    keys = {e.key for e in plan}
    carried_interp = {}
    for old in olds:
        interp = _interpolated_meta(old)
        for k, e in old.entries.items():
            if k not in keys and k not in table.entries:
                table.entries[k] = _Entry.from_dict(k, e.to_dict())
                if k in interp:
                    carried_interp[k] = interp[k]
    for e in plan:
        table.entries[e.key] = e
    return table, carried_interp


def _reuse_points(plan: list[_Entry], olds: list[LatencyTable]) -> int:
    """Copy the points of the reusable tables ``olds`` (the first one that has a point wins) into
    the entries of ``plan``; returns how many.

    Runs before any interpolation, so that an interpolation never overwrites a reusable point.
    """
    reused = 0
    for old_table in olds:
        # points an earlier run interpolated (budget ran out) are measured now, never reused as if measured
        was_interp = {k: {tuple(x) for x in v} for k, v in _interpolated_meta(old_table).items()}
        for e in plan:
            old = old_table.entries.get(e.key)
            if old is None:
                continue
            for ci, co, v in e.points():
                if v is not None:  # already taken from an earlier table
                    continue
                prev = old.get(ci, co)
                if prev is not None and (ci, co) not in was_interp.get(e.key, ()):
                    e.set(ci, co, prev)
                    reused += 1
    return reused


@dataclass
class _Budget:
    """The clock, the time budget and the point counters of one :func:`measure_table` call
    (``done`` counts reused points too); the clock starts when it is made."""

    total: int
    max_seconds: float
    point_max_seconds: float
    progress: Callable[[int, int, str], None] | None
    done: int = 0
    measured: int = 0
    reused: int = 0
    t0: float = field(init=False)
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + float(self.max_seconds)

    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

    def report(self, key: str) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total, key)


def _measure_in_order(table: LatencyTable, plan: list[_Entry], order: list, coarse: dict, budget: _Budget,
                      setup: dict, timing: dict, channel_step: int) -> dict[str, list[list[int]]]:
    """Measure the points of ``order`` (``(level, entry, cin, cout)``; level 0: coarse sub-grid)
    until the budget runs out.  Returns the points interpolated when it runs out after the coarse
    sub-grids (by key); raises :class:`TableBudgetExceeded` when it runs out before."""
    for lvl, e, ci, co in order:
        remaining = budget.deadline - time.perf_counter()
        if remaining <= 0 and lvl == 1:
            # every coarse sub-grid is measured: interpolate the remaining points, stop measuring
            interpolated = {}
            for e2 in plan:
                pts = _fill_from_coarse(e2, coarse[e2.key])
                if pts:
                    interpolated[e2.key] = pts
            budget.done = budget.total
            budget.report("interpolated")
            return interpolated
        if remaining <= 0:
            raise _budget_exceeded(table, budget, len(plan), channel_step)
        ms = _measure_point(e.sig, ci, co, **setup,
                            timing={**timing, "max_seconds": min(float(budget.point_max_seconds), remaining)})
        e.set(ci, co, ms)
        budget.measured += 1
        budget.done += 1
        budget.report(e.key)
    return {}


def _record_counts(table: LatencyTable, budget: _Budget) -> None:
    table.meta["measure"].update(
        measured_points=budget.measured, reused_points=budget.reused, seconds=budget.seconds()
    )


def _budget_exceeded(table: LatencyTable, budget: _Budget, n_shapes: int, channel_step: int) -> TableBudgetExceeded:
    """The error for a budget that ran out before the coarse sub-grids were measured, with the
    partial ``table`` (its counters recorded); :func:`_with_partial_saved` completes its message."""
    _record_counts(table, budget)
    done, total = budget.done, budget.total
    return TableBudgetExceeded(
        f"latency profiling ran out of its {budget.max_seconds:g} s budget after {done} of {total} "
        f"points ({n_shapes} layer shapes, channel step {channel_step}) before the coarse grid was "
        "complete: raise the time budget (--budget-minutes) or use a larger channel step",
        partial=table,
        done=done,
        total=total,
    )


def _save_partial(table: LatencyTable, path: str | os.PathLike | None) -> str:
    """Write the unfinished ``table`` to ``path`` (atomically, with a checksum, ``meta.partial``
    true); returns the end of the budget message saying where the points are (or why not)."""
    m = table.meta.get("measure") or {}
    n = int(m.get("measured_points", 0) or 0) + int(m.get("reused_points", 0) or 0)
    table.meta["partial"] = True
    table.meta["complete"] = False
    if path is None:
        return (f"; the {n} points measured so far are in this error's `partial` table "
                "(pass it as existing= to measure only the missing points)")
    try:
        atomic_write_json(path, table.to_dict(), indent=1, checksum=True)
    except OSError as exc:
        return f"; the {n} points measured so far could not be saved to {path} ({exc}) and are lost"
    return (f"; the {n} points measured so far are saved in {path} and reused by the next run with the "
            "same settings (only the missing points are measured)")


def _with_partial_saved(exc: TableBudgetExceeded, table: LatencyTable,
                        path: str | os.PathLike | None) -> TableBudgetExceeded:
    """``exc`` with the partial table saved to ``path`` and the message saying so."""
    return TableBudgetExceeded(f"{exc}{_save_partial(table, path)}", partial=table, done=exc.done, total=exc.total)


def _set_torch_threads(backend: str, threads: int | None) -> int | None:
    """Set torch's thread count for measuring with the torch backend; returns the previous one
    (``None``: unchanged)."""
    if backend != "torch" or threads is None:
        return None
    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    return old_threads


def _restore_torch_threads(old_threads: int | None) -> None:
    if old_threads is not None:
        import torch

        torch.set_num_threads(old_threads)


def _coarse_indices(e: _Entry, stride: int) -> tuple[set[int], set[int] | None]:
    """Indices of the coarse sub-grid along each axis: every ``stride``-th point plus both ends."""
    def axis(n: int) -> set[int]:
        return set(range(0, n, max(1, int(stride)))) | {n - 1}

    return axis(len(e.cin_grid)), (None if e.cout_grid is None else axis(len(e.cout_grid)))


def _is_coarse(e: _Entry, ci: int, co: int, idx: tuple[set[int], set[int] | None]) -> bool:
    i = e.cin_grid.index(ci)
    if e.cout_grid is None:
        return i in idx[0]
    return i in idx[0] and e.cout_grid.index(co) in idx[1]


def _fill_from_coarse(e: _Entry, idx: tuple[set[int], set[int] | None]) -> list[list[int]]:
    """Set every unmeasured point of ``e`` by linear (1-D) / bilinear (2-D) interpolation, in
    channel counts, between the measured coarse points around it; returns the points set."""
    def bracket(grid: list[int], coarse: set[int], i: int) -> tuple[int, int, float]:
        lo = max(k for k in coarse if k <= i)
        hi = min(k for k in coarse if k >= i)
        t = 0.0 if hi == lo else (grid[i] - grid[lo]) / (grid[hi] - grid[lo])
        return lo, hi, t

    n: list[list[int]] = []
    if e.cout_grid is None:
        for i, v in enumerate(e.values):
            if v is None:
                lo, hi, t = bracket(e.cin_grid, idx[0], i)
                e.values[i] = (1 - t) * e.values[lo] + t * e.values[hi]
                n.append([e.cin_grid[i], e.cin_grid[i]])
    else:
        for i, row in enumerate(e.values):
            for j, v in enumerate(row):
                if v is None:
                    a, b, t = bracket(e.cin_grid, idx[0], i)
                    c, d, u = bracket(e.cout_grid, idx[1], j)
                    vv = e.values
                    row[j] = ((1 - t) * ((1 - u) * vv[a][c] + u * vv[a][d]) + t * ((1 - u) * vv[b][c] + u * vv[b][d]))
                    n.append([e.cin_grid[i], e.cout_grid[j]])
    e._compiled = None
    return n
