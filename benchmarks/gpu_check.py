"""The GPU check of issue 15: one prepared run on a bare CUDA machine, one table of results.

Five parts, on torchvision ResNet-50 (untrained weights: latency does not depend on them), torch
backend, CUDA, fp16, channels-last, batch 256:

  (a) the latency table of every prunable layer (``measure_table``, 32-channel grid) and its build time;
  (b) predicted vs measured latency of the dense model and three slimmed variants (uniform 75 %,
      uniform 50 %, uniform 75 % with one in four removable groups removed: half of ResNet-50's
      bottleneck branches): the table's layer sum, scaled by measured/layer-sum of the dense model
      (so the dense row matches by construction; the others are out of sample), the measured median;
  (c) the model pruned by the allocator against the table to 2x (calibrated) and slimmed, measured
      against the dense one in paired rounds: the measured speed-up, not the predicted one;
  (d) AMP fp16 and bf16 pruning steps (GradScaler, importance, pruned decay, mask updates) with one
      forced overflow each (inf loss / inf gradient): importance and weights stay finite;
  (e) a plain training step vs a pruning step (soft masks + importance + pruned decay), timed
      interleaved, plus the mask update (the allocator's solve) amortised over the rn50_fps2x
      recipe's update interval (20480 samples = 80 steps of 256).

``--dry-run`` runs the same code on the CPU in well under a minute (ResNet-18 at 32x32, batch 2,
float32 timing, a small grid).  The table is printed and written, with every number, to
``OUT/gpu_check.md`` and ``OUT/gpu_check.json`` (``--out``, default ``$OUT`` or
``benchmarks/results/gpu_check``).

    python benchmarks/gpu_check.py                # on a GPU machine (see gpu_check.sh)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from smcp_core import api  # noqa: E402
from smcp_core.config.recipe import recipe_from  # noqa: E402
from smcp_core.errors import SmcpError  # noqa: E402
from smcp_core.models import build_model  # noqa: E402
from smcp_core.profile.cost_model import CostModel  # noqa: E402
from smcp_core.profile.measure import measure_table  # noqa: E402
from smcp_core.profile.table import TableBudgetExceeded  # noqa: E402
from smcp_core.profile.timing import device_timer, time_interleaved  # noqa: E402
from smcp_core.prune.allocator import Allocator  # noqa: E402
from smcp_core.stages.measure import Bench, measure_models, measure_pair, slim_structure  # noqa: E402

RECIPE_INTERVAL_STEPS = 80  # rn50_fps2x: a mask update every 20480 samples = 80 steps of 256


@dataclass(frozen=True)
class Setting:
    """What one run measures: the model and input, the device and precision, the grid, the budgets."""

    model: str
    classes: int
    size: int
    batch: int
    device: str
    dtype: str  # timing precision (tables and whole models)
    channel_step: int
    grid_points: int
    channel_round: int
    table_seconds: float
    measure_seconds: float
    min_runs: int
    train_amp: str | None  # autocast dtype of the (e) training steps (None: float32)


GPU = Setting("torchvision/resnet50", 1000, 224, 256, "cuda", "float16", 32, 32, 32, 150.0, 20.0, 20, "float16")
DRY = Setting("torchvision/resnet18", 10, 32, 2, "cpu", "float32", 64, 4, 16, 15.0, 2.0, 5, None)


# --------------------------------------------------------------------------------------------------
# (a) the latency table


def build(s: Setting):
    """The dense model (eval, CPU), its example input and its channel graph (the public API)."""
    torch.manual_seed(0)
    model = build_model(s.model, num_classes=s.classes).eval()
    example = torch.randn(1, 3, s.size, s.size)
    return model, example, api.channel_graph(model, example)


def table_at(s: Setting, graph, grid_points: int, seconds: float, existing=None):
    """``measure_table`` of every layer of ``graph`` on torch/``s.device``/``s.dtype``/channels-last:
    the coarse sub-grid first, the rest measured until ``seconds`` are up, then interpolated."""
    return measure_table([layer.sig for layer in graph.layers], backend="torch", batch_size=s.batch,
                         dtype=s.dtype, layout="nhwc", device=s.device, channel_step=s.channel_step,
                         warmup=3, min_runs=5, max_runs=20, point_max_seconds=2.0, max_seconds=seconds,
                         max_grid_points=grid_points, existing=existing)


def part_a(s: Setting, graph, log) -> tuple[object, dict]:
    """The table and its build time; when even the coarse sub-grid does not fit the budget, the
    points measured so far are kept and the rest measured on a grid of at most 8 widths per axis."""
    t0 = time.perf_counter()
    points = s.grid_points
    try:
        table = table_at(s, graph, points, s.table_seconds)
    except TableBudgetExceeded as exc:
        log(f"(a) {exc.done}/{exc.total} points in {s.table_seconds:g} s: finishing on an 8-point grid")
        points = 8
        table = table_at(s, graph, points, s.table_seconds / 2, existing=exc.partial)
    m = table.meta.get("measure", {})
    return table, {"build_s": time.perf_counter() - t0, "entries": len(table.entries), "grid_points": points,
                   "measured_points": m.get("measured_points"), "interpolated_points": m.get("interpolated_points"),
                   "complete": bool(table.complete)}


# --------------------------------------------------------------------------------------------------
# (b) predicted vs measured


def uniform_keep(graph, frac: float, rnd: int) -> torch.Tensor:
    """Every prunable group keeps its first ``frac`` of channels (a multiple of ``rnd``, at least ``rnd``)."""
    keep = graph.full_keep()
    for g in graph.groups:
        if g.prunable and g.n_frozen == 0:
            k = min(g.size, max(rnd, int(round(frac * g.size / rnd)) * rnd))
            keep[g.classes[k:]] = False
    return keep


def removal_keep(graph, base: torch.Tensor) -> torch.Tensor:
    """``base`` with one in four removable groups emptied (each removes a residual block's branch)."""
    keep = base.clone()
    removable = [g for g in graph.groups if g.prunable and g.removable and g.n_frozen == 0]
    for g in removable[::4]:
        keep[g.classes] = False
    return keep


def bench_for(s: Setting) -> Bench:
    prof = recipe_from({"profile": {"backend": "torch", "device": s.device, "batch_size": s.batch, "dtype": s.dtype,
                                    "layout": "channels_last", "warmup": 6}}).profile
    return Bench(prof, torch.randn(1, 3, s.size, s.size))


def part_b(s: Setting, model, graph, table, workdir: Path) -> tuple[list[dict], float]:
    """Dense and three slimmed variants: the layer sum, the prediction (layer sum x the dense
    model's measured/layer-sum; removed layers cost 0) and the measured median."""
    keeps = {"dense": graph.full_keep(), "uniform75": uniform_keep(graph, 0.75, s.channel_round),
             "uniform50": uniform_keep(graph, 0.5, s.channel_round)}
    keeps["removal"] = removal_keep(graph, keeps["uniform75"])
    models = {k: (model if k == "dense" else slim_structure(model, graph, keep)) for k, keep in keeps.items()}
    got = measure_models(models, bench_for(s), batch=s.batch, backend="torch", workdir=workdir,
                         min_runs=s.min_runs, max_seconds=s.measure_seconds * 2)["stats"]
    cost = CostModel(graph, "latency", table)
    points = [(cost.total(keep), graph.removed_layers(keep), got[k]["median_ms"]) for k, keep in keeps.items()]
    scale = points[0][2] / points[0][0]
    rows = []
    for (name, keep), (layer_sum, n_rm, measured) in zip(keeps.items(), points):
        pred = scale * layer_sum
        rows.append({"variant": name, "kept_classes": int(keep.sum()), "removed_layers": n_rm,
                     "layer_sum_ms": layer_sum, "predicted_ms": pred, "measured_ms": measured,
                     "measured_over_predicted": measured / pred})
    return rows, scale


# --------------------------------------------------------------------------------------------------
# (c) a table-pruned 2x model, measured


def solve_2x(s: Setting, graph, table, dense_ms: float, scale: float) -> tuple[torch.Tensor, dict]:
    """The allocator's masks for half the dense model's measured latency (the table scaled to it), random scores."""
    table.model = {"measured_ms": dense_ms, "calibration": {"scale": scale, "offset_ms": 0.0}}
    cost = CostModel(graph, "latency", table)
    alloc = Allocator(graph, cost, channel_round=s.channel_round, min_channels=s.channel_round)
    scores = torch.randn(graph.n_classes, generator=torch.Generator().manual_seed(0), dtype=torch.float64).exp()
    # (a noisy CPU table in a dry run can put 2x out of reach: then just above the fastest reachable)
    budget = max(cost.budget_for(dense_ms / 2.0), 1.05 * alloc.min_cost())
    t0 = time.perf_counter()
    res = alloc.solve(scores, budget, graph.full_keep())
    solve_ms = (time.perf_counter() - t0) * 1e3
    return res.keep, {"solve_ms": solve_ms, "budget_layer_sum_ms": budget, "predicted_ms": cost.predict(res.keep),
                      "predicted_speedup": dense_ms / cost.predict(res.keep), "kept_classes": int(res.keep.sum())}


def part_c(s: Setting, model, graph, table, dense_ms: float, scale: float, workdir: Path) -> tuple[dict, torch.Tensor]:
    """The 2x masks slimmed and timed in paired rounds against the dense model; the row and the masks."""
    keep, info = solve_2x(s, graph, table, dense_ms, scale)
    slim = slim_structure(model, graph, keep)
    pair = measure_pair(model, slim, bench_for(s), batch=s.batch, backend="torch", workdir=workdir, kind=None,
                        target=None, min_rounds=s.min_runs, max_seconds=s.measure_seconds)
    dense_stats, slim_stats = pair.timing.stats()
    macs = _macs_ratio(graph, keep)
    return {**info, "dense_ms": dense_stats.median_ms, "pruned_ms": slim_stats.median_ms,
            "measured_speedup": pair.speedup.median, "speedup_lo": pair.speedup.lo, "speedup_hi": pair.speedup.hi,
            "rounds": len(pair.timing.a_s), "macs_ratio": macs}, keep


def _macs_ratio(graph, keep: torch.Tensor) -> float:
    flops = CostModel(graph, "flops")
    return flops.total(keep) / flops.total(graph.full_keep())


# --------------------------------------------------------------------------------------------------
# (d) AMP pruning steps with a forced overflow


def amp_step(model, opt, scaler, pruner, x, y, dtype: torch.dtype, overflow: str | None) -> None:
    """One pruning step under autocast with GradScaler; ``overflow``: inf in the loss or a gradient."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype):
        loss = F.cross_entropy(model(x), y)
    if overflow == "loss":
        loss = loss * float("inf")
    scaler.scale(loss).backward()
    if overflow == "grad":
        next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
    scaler.unscale_(opt)
    pruner.before_step()
    scaler.step(opt)
    scaler.update()
    pruner.after_step()


def amp_case(s: Setting, model, graph, dtype: torch.dtype, overflow: str, steps: int = 4) -> dict:
    """``steps`` pruning steps at ``dtype`` (the second one overflows); what stayed finite."""
    m = copy.deepcopy(model).train().to(s.device)
    pruner = api.pruner(m, graph, flops_ratio=0.5, schedule=api.StepSchedule(warmup=0, ramp=steps - 1, update_every=2),
                        config={"channel_round": s.channel_round, "min_channels": s.channel_round})
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(torch.device(s.device).type)
    x, y = _batch(s)
    finite_after_overflow = None
    t0 = time.perf_counter()
    for i in range(steps):
        amp_step(m, opt, scaler, pruner, x, y, dtype, overflow if i == 1 else None)
        if i == 1:
            finite_after_overflow = bool(torch.isfinite(pruner.tracker.scores()).all())
    _sync(s)
    imp = pruner.tracker.scores()
    return {"dtype": str(dtype).replace("torch.", ""), "overflow": overflow, "steps": steps,
            "step_ms": (time.perf_counter() - t0) * 1e3 / steps, "mask_updates": len(pruner.history),
            "importance_finite_after_overflow": finite_after_overflow,
            "importance_finite": bool(torch.isfinite(imp).all()), "importance_max": float(imp.abs().max()),
            "weights_finite": all(bool(torch.isfinite(p).all()) for p in m.parameters()),
            "scale": float(scaler.get_scale())}


def part_d(s: Setting, model, graph) -> list[dict]:
    return [amp_case(s, model, graph, torch.float16, "loss"), amp_case(s, model, graph, torch.bfloat16, "grad")]


def _batch(s: Setting) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(s.batch, 3, s.size, s.size, generator=g)
    y = torch.randint(0, s.classes, (s.batch,), generator=g)
    x = x.to(s.device).contiguous(memory_format=torch.channels_last)
    return x, y.to(s.device)


def _sync(s: Setting) -> None:
    if s.device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------
# (e) plain vs pruning training step


def train_step(model, opt, scaler, x, y, dtype: torch.dtype | None, pruner=None) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    if pruner is not None:
        pruner.before_step()
    scaler.step(opt)
    scaler.update()
    if pruner is not None:
        pruner.after_step()


def step_fn(s: Setting, model, graph, keep: torch.Tensor | None):
    """A zero-argument training step of a copy of ``model``: plain, or pruning at the masks ``keep``."""
    m = copy.deepcopy(model).train().to(s.device).to(memory_format=torch.channels_last)
    pruner = None
    if keep is not None:  # importance every step, no mask update while timed
        never = api.StepSchedule(warmup=0, ramp=10**9, update_every=10**9)
        pruner = api.pruner(m, graph, flops_ratio=0.5, schedule=never,
                            config={"channel_round": s.channel_round, "min_channels": s.channel_round})
        pruner.apply_keep(keep, torch.zeros(graph.n_classes))
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(torch.device(s.device).type, enabled=s.train_amp == "float16")
    x, y = _batch(s)
    dtype = getattr(torch, s.train_amp) if s.train_amp else None
    return lambda: train_step(m, opt, scaler, x, y, dtype, pruner)


def part_e(s: Setting, model, graph, keep: torch.Tensor, solve_ms: float) -> dict:
    fns = {"plain": step_fn(s, model, graph, None), "pruning": step_fn(s, model, graph, keep)}
    st = time_interleaved(fns, warmup=3, min_runs=max(6, s.min_runs // 2), max_seconds=s.measure_seconds * 2,
                          timer=device_timer(s.device))
    plain, prune = st["plain"].median_ms, st["pruning"].median_ms
    amortised = solve_ms / RECIPE_INTERVAL_STEPS
    return {"plain_ms": plain, "pruning_ms": prune, "step_overhead_pct": 100 * (prune - plain) / plain,
            "mask_update_ms": solve_ms, "interval_steps": RECIPE_INTERVAL_STEPS,
            "amortised_update_ms": amortised, "amortised_update_pct": 100 * amortised / plain,
            "total_overhead_pct": 100 * (prune - plain + amortised) / plain, "runs": st["plain"].n}


# --------------------------------------------------------------------------------------------------
# the report


def machine(s: Setting) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": s.device}
    if s.device.startswith("cuda"):
        info.update(gpu=torch.cuda.get_device_name(), cudnn=torch.backends.cudnn.version(),
                    capability=".".join(map(str, torch.cuda.get_device_capability())))
    return info


def rows_of(res: dict) -> list[tuple[str, str, float, str, str]]:
    """The report's lines: (part, what, value, unit, detail)."""
    a, c, e = res["a"], res["c"], res["e"]
    out = [("a", "table build", a["build_s"], "s", f"{a['entries']} entries, {a['measured_points']} measured, "
            f"{a['interpolated_points']} interpolated points, <= {a['grid_points']} widths per axis")]
    for r in res["b"]:
        out.append(("b", f"{r['variant']} measured", r["measured_ms"], "ms",
                    f"predicted {r['predicted_ms']:.3f} ms (layer sum {r['layer_sum_ms']:.3f}), "
                    f"measured/predicted {r['measured_over_predicted']:.3f}, {r['removed_layers']} layers removed"))
    out.append(("c", "2x measured speed-up", c["measured_speedup"], "x",
                f"90% [{c['speedup_lo']:.3f}, {c['speedup_hi']:.3f}], {c['dense_ms']:.3f} -> {c['pruned_ms']:.3f} ms, "
                f"predicted {c['predicted_speedup']:.2f}x, MACs ratio {c['macs_ratio']:.3f}"))
    for r in res["d"]:
        out.append(("d", f"{r['dtype']} step, inf {r['overflow']}", r["step_ms"], "ms",
                    f"importance finite {r['importance_finite']} "
                    f"(after overflow {r['importance_finite_after_overflow']}), "
                    f"weights finite {r['weights_finite']}, {r['mask_updates']} mask updates"))
    out += [("e", "plain step", e["plain_ms"], "ms", f"median of {e['runs']} interleaved"),
            ("e", "pruning step", e["pruning_ms"], "ms", f"step overhead {e['step_overhead_pct']:+.2f} %"),
            ("e", "mask update", e["mask_update_ms"], "ms",
             f"/{e['interval_steps']} steps = {e['amortised_update_pct']:.2f} %; "
             f"total overhead {e['total_overhead_pct']:+.2f} %")]
    return out


def render(res: dict) -> str:
    s = res["setting"]
    where = res["machine"].get("gpu", s["device"])
    head = (f"gpu_check: {s['model']} batch {s['batch']} {s['size']}x{s['size']} on {where}, torch {s['dtype']} "
            f"channels-last, grid {s['channel_step']}, {res['seconds']:.0f} s in all")
    lines = [head, "", "| part | what | value | unit | detail |", "|---|---|---:|---|---|"]
    lines += [f"| {p} | {w} | {v:.4g} | {u} | {d} |" for p, w, v, u, d in rows_of(res)]
    return "\n".join(lines)


def run(s: Setting, workdir: Path, log) -> dict:
    t0 = time.perf_counter()
    model, _, graph = build(s)
    log(f"{s.model}: {len(graph.groups)} groups, {graph.n_classes} channel classes")
    table, a = part_a(s, graph, log)
    log(f"(a) table: {a['build_s']:.1f} s")
    b, scale = part_b(s, model, graph, table, workdir)
    log(f"(b) dense {b[0]['measured_ms']:.3f} ms, layer sum {b[0]['layer_sum_ms']:.3f} ms")
    c, keep = part_c(s, model, graph, table, b[0]["measured_ms"], scale, workdir)
    log(f"(c) 2x: measured {c['measured_speedup']:.3f}x (solve {c['solve_ms']:.0f} ms)")
    d = part_d(s, model, graph)
    log(f"(d) amp: importance finite {[r['importance_finite'] for r in d]}")
    e = part_e(s, model, graph, keep, c["solve_ms"])
    log(f"(e) overhead {e['total_overhead_pct']:+.2f} %")
    return {"setting": asdict(s), "machine": machine(s), "table_scale": scale,
            "a": a, "b": b, "c": c, "d": d, "e": e, "seconds": time.perf_counter() - t0}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU with a tiny setting")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else benchmarks/results/gpu_check)")
    ap.add_argument("--table-seconds", type=float, default=None, help="time budget of the table (a)")
    ap.add_argument("--grid-points", type=int, default=None, help="at most this many widths per axis in the table")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    s = DRY if args.dry_run else GPU
    if args.table_seconds or args.grid_points:
        s = Setting(**{**asdict(s), "table_seconds": args.table_seconds or s.table_seconds,
                       "grid_points": args.grid_points or s.grid_points})
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; run with --dry-run on a CPU", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(1)  # tiny tensors: more threads only add contention on a shared CPU
    out = Path(args.out or os.environ.get("OUT") or REPO / "benchmarks" / "results" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        with tempfile.TemporaryDirectory(prefix="smcp-gpu-check-") as tmp:
            res = run(s, Path(tmp), log)
    except SmcpError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 1
    text = render(res)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=_jsonable))
    (out / "gpu_check.md").write_text(text + "\n")
    print(text)
    return 0


def _jsonable(x):
    return float(x) if isinstance(x, (int, float)) else str(x)


if __name__ == "__main__":
    sys.exit(main())
