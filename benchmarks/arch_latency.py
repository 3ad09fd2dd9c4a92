"""Uniform channel cuts vs latency-table-guided cuts at the same FLOPs, measured on onnxruntime CPU.

For torchvision MobileNetV2 and EfficientNet-B0 (224x224, batch 1, random weights: latency does not
depend on them) and each width fraction ``f`` in ``--fracs``:

* **uniform**: every prunable channel group keeps about ``f`` of its channels (of each stage's part of a stream)
  (``smcp_core.prune.allocator.uniform_keep``, the variants ``smcp profile`` calibrates with);
* **guided**: the SMCP allocator (``smcp_core.prune.allocator.Allocator``: per-group options on the channel
  grid, exact multiple-choice knapsack) with a latency cost model from an onnxruntime latency table
  measured here by ``smcp_core.profile.measure.measure_table``, and importance ``--importance`` (``ones``: every
  channel worth the same, so it keeps as many channels as the latency budget allows; ``weight``:
  L1 norm of the weights reading each channel).  The latency budget is bisected to the smallest one
  whose solution keeps at least the uniform model's FLOPs (MACs), so *guided* has >= the FLOPs of
  *uniform* and any latency gain is not bought with fewer FLOPs.

Both slim models (and the dense model) are exported to ONNX and timed **interleaved** in one loop
(``smcp_core.profile.timing.time_interleaved``: A, B, C, A, B, C, ... until the medians settle), one
onnxruntime session each, ``--threads`` intra-op threads, spinning off.  The script prints a table
per model and writes every number plus the machine description to ``--out``
(default ``benchmarks/results/arch_latency_cpu.json``).

    python benchmarks/arch_latency.py --quick   # smoke run: coarse table, short timing (3-5 min on a 2-core VM)
    python benchmarks/arch_latency.py           # full run: table at channel step 16, longer timing (~20-30 min)

``--quick`` writes ``arch_latency_cpu_quick.json`` instead, so a smoke run never replaces the
published numbers.

A latency table takes most of the time; ``--table-dir DIR`` keeps the tables there and re-uses
their points on the next run (same machine fingerprint only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smcp_core.errors import InfeasibleTarget  # noqa: E402
from smcp_core.export.onnx import export_onnx  # noqa: E402
from smcp_core.graph.channel_graph import ChannelGraph  # noqa: E402
from smcp_core.models import build_model  # noqa: E402
from smcp_core.profile.cost_model import CostModel  # noqa: E402
from smcp_core.profile.fingerprint import environment_report  # noqa: E402
from smcp_core.profile.measure import measure_table  # noqa: E402
from smcp_core.profile.table import LatencyTable  # noqa: E402
from smcp_core.profile.timing import ort_runner, ort_session, time_interleaved  # noqa: E402
from smcp_core.prune.allocator import Allocator, uniform_keep  # noqa: E402
from smcp_core.slim.surgery import count_params, slim_model  # noqa: E402

MODELS = ["mobilenet_v2", "efficientnet_b0"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def weight_importance(model: torch.nn.Module, graph: ChannelGraph) -> torch.Tensor:
    """Per class: sum over the layers reading it of the L1 norm of the weights reading it."""
    mods = dict(model.named_modules())
    s = torch.zeros(graph.n_classes, dtype=torch.float64)
    for layer in graph.consumers:
        w = mods[layer.name].weight.detach().abs().to(torch.float64)
        per_in = w.sum(dim=[d for d in range(w.dim()) if d != 1])
        s.index_add_(0, layer.in_labels, per_in)
    return s


def guided_keep(graph: ChannelGraph, alloc: Allocator, scores: torch.Tensor, flops_target: int,
                start: float, iters: int) -> tuple[torch.Tensor, float, int]:
    """Bisect the latency budget to the smallest whose allocation keeps >= ``flops_target`` MACs,
    starting from the bracket [0.6, 1.1] x ``start`` (the uniform model's table cost), widened to
    [minimum, full cost] where it does not bracket.  Returns (keep, layer-sum budget, solver calls)."""
    full = graph.full_keep()
    calls = 0

    def flops_at(budget: float):
        nonlocal calls
        calls += 1
        try:
            keep = alloc.solve(scores, budget, full).keep
        except InfeasibleTarget:
            return None, -1
        return keep, graph.flops_params(keep)[0]

    lo, hi = max(alloc.min_cost(), 0.6 * start), min(alloc.full_cost, 1.1 * start)
    best_keep, f_hi = flops_at(hi)
    if f_hi < flops_target:
        lo, hi = hi, alloc.full_cost
        best_keep = full
    elif lo > alloc.min_cost() and flops_at(lo)[1] >= flops_target:
        lo = alloc.min_cost()
    best = (best_keep, hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        keep, f = flops_at(mid)
        if f >= flops_target:
            best, hi = (keep, mid), mid
        else:
            lo = mid
    return best[0], best[1], calls


def get_table(name: str, graph: ChannelGraph, args, table_dir: Path | None) -> LatencyTable:
    existing = None
    path = table_dir / f"{name}_b1_t{args.threads}_s{args.channel_step}.json" if table_dir else None
    if path is not None and path.exists():
        existing = LatencyTable.load(path)
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int, key: str) -> None:
        now = time.perf_counter()
        if now - last[0] > 15 or done == total:
            last[0] = now
            log(f"  [{name}] table {done}/{total} points ({now - t0:.0f} s)")

    table = measure_table(
        [layer.sig for layer in graph.layers], backend="onnxruntime", batch_size=1, threads=args.threads,
        channel_step=args.channel_step, warmup=args.table_warmup, min_runs=args.table_runs,
        max_runs=max(args.table_runs, 3 * args.table_runs), point_max_seconds=args.point_seconds,
        max_seconds=args.table_seconds, existing=existing, progress=progress,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
    return table


def run_model(name: str, args, workdir: Path, table_dir: Path | None) -> dict:
    size = args.size
    torch.manual_seed(args.seed)
    model = build_model(f"torchvision/{name}", num_classes=1000).eval()
    x = torch.randn(1, 3, size, size)
    graph = ChannelGraph(model, x)
    log(f"[{name}] {len(graph.layers)} layers, {len(graph.groups)} groups "
        f"({sum(g.prunable for g in graph.groups)} prunable); measuring the latency table")
    table = get_table(name, graph, args, table_dir)
    cost = CostModel(graph, "latency", table)
    alloc = Allocator(graph, cost, channel_round=args.channel_round, min_channels=args.min_channels)
    if args.importance == "ones":
        scores = torch.ones(graph.n_classes, dtype=torch.float64)
    else:
        scores = weight_importance(model, graph)

    full = graph.full_keep()
    keeps: dict[str, torch.Tensor] = {"dense": full}
    info: dict[str, dict] = {"dense": {"frac": 1.0}}
    for f in args.fracs:
        ku = uniform_keep(graph, f)
        fu = graph.flops_params(ku)[0]
        t0 = time.perf_counter()
        kg, budget, calls = guided_keep(graph, alloc, scores, fu, cost.total(ku), args.bisect)
        log(f"[{name}] f={f:g}: uniform {fu / 1e6:.1f} MMAC; guided {graph.flops_params(kg)[0] / 1e6:.1f} MMAC "
            f"({calls} solves, {time.perf_counter() - t0:.1f} s)")
        keeps[f"uniform{f:g}"], info[f"uniform{f:g}"] = ku, {"frac": f}
        keeps[f"guided{f:g}"], info[f"guided{f:g}"] = kg, {"frac": f, "budget_layer_sum_ms": budget, "solves": calls}

    fns = {}
    for v, keep in keeps.items():
        slim = slim_model(model, graph, keep)
        flops, _ = graph.flops_params(keep)
        info[v].update(
            macs=int(flops),
            params=int(count_params(slim)),
            kept_classes=int(keep.sum()),
            table_layer_sum_ms=float(cost.total(keep)),
            widths={str(g.index): int(keep[g.classes].sum()) for g in graph.groups if g.prunable},
        )
        path = export_onnx(slim, x, workdir / f"{name}_{v}.onnx", dynamic_batch=False)
        fns[v] = ort_runner(ort_session(path, threads=args.threads), x.numpy())
    log(f"[{name}] timing {len(fns)} models interleaved (up to {args.time_seconds:g} s)")
    stats = time_interleaved(fns, warmup=args.warmup, min_runs=args.min_runs, max_seconds=args.time_seconds)
    dense_ms = stats["dense"].median_ms
    for v, st in stats.items():
        info[v]["latency"] = st.to_dict()
        info[v]["speedup_vs_dense"] = dense_ms / st.median_ms
    comparisons = []
    for f in args.fracs:
        u, g = info[f"uniform{f:g}"], info[f"guided{f:g}"]
        comparisons.append({
            "frac": f,
            "macs_ratio_guided_over_uniform": g["macs"] / u["macs"],
            "latency_ratio_guided_over_uniform": g["latency"]["median_ms"] / u["latency"]["median_ms"],
            "p10_ratio_guided_over_uniform": g["latency"]["p10_ms"] / u["latency"]["p10_ms"],
            "table_ratio_guided_over_uniform": g["table_layer_sum_ms"] / u["table_layer_sum_ms"],
        })
    return {"model": f"torchvision/{name}", "input_shape": [1, 3, size, size], "variants": info,
            "comparisons": comparisons,
            "table_meta": {k: table.meta.get(k) for k in ("channel_step", "threads", "measure")}}


def print_report(res: dict) -> None:
    print(f"\n### {res['model']} (batch 1, {res['input_shape'][2]}x{res['input_shape'][3]}, onnxruntime CPU)\n")
    print("| variant | MMAC | params | table ms (layer sum) | median ms | p10 ms | p90 ms | n | speed-up vs dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v, d in res["variants"].items():
        lat = d["latency"]
        print(f"| {v} | {d['macs'] / 1e6:.1f} | {d['params']:,} | {d['table_layer_sum_ms']:.3f} | "
              f"{lat['median_ms']:.3f} | "
              f"{lat['p10_ms']:.3f} | {lat['p90_ms']:.3f} | {lat['n']}{'' if lat['stable'] else '*'} | "
              f"{d['speedup_vs_dense']:.2f}x |")
    print("\n(* the timing loop stopped before the medians settled)" if any(
        not d["latency"]["stable"] for d in res["variants"].values()) else "")
    print("| width fraction | guided/uniform MACs | guided/uniform latency (median) | (p10) | (table) |")
    print("|---|---|---|---|---|")
    for c in res["comparisons"]:
        print(f"| {c['frac']:g} | {c['macs_ratio_guided_over_uniform']:.3f} | "
              f"{c['latency_ratio_guided_over_uniform']:.3f} | "
              f"{c['p10_ratio_guided_over_uniform']:.3f} | {c['table_ratio_guided_over_uniform']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="coarse table (channel step 32, 3 runs/point), one fraction, short timing")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    p.add_argument("--fracs", default=None, help="width fractions of the uniform cuts (default 0.5,0.75; quick: 0.5)")
    p.add_argument("--importance", choices=["ones", "weight"], default="ones")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (table and timing)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--channel-step", type=int, default=None, help="latency table grid step (default 16; quick: 32)")
    p.add_argument("--channel-round", type=int, default=8, help="allocator: kept widths are multiples of this")
    p.add_argument("--min-channels", type=int, default=8)
    p.add_argument("--bisect", type=int, default=None, help="budget bisection steps (default 10; quick: 6)")
    p.add_argument("--table-dir", default=None, help="keep/re-use latency tables in this folder")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/arch_latency_cpu.json; "
                   "quick: arch_latency_cpu_quick.json)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    q = args.quick
    args.fracs = [float(v) for v in (args.fracs or ("0.5" if q else "0.5,0.75")).split(",") if v]
    args.channel_step = args.channel_step or (32 if q else 16)
    args.bisect = args.bisect or (6 if q else 10)
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" / f"arch_latency_cpu{'_quick' if q else ''}.json")
    args.table_warmup, args.table_runs = (1, 3) if q else (5, 10)
    args.point_seconds = 0.1 if q else 1.0
    args.table_seconds = 900 if q else 7200
    args.warmup, args.min_runs, args.time_seconds = (3, 10, 15.0) if q else (10, 50, 120.0)
    models = [m for m in args.models.split(",") if m]

    torch.set_num_threads(max(1, args.threads))
    t_start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="arch_latency_") as tmp:
        table_dir = Path(args.table_dir) if args.table_dir else None
        for name in models:
            res = run_model(name, args, Path(tmp), table_dir)
            print_report(res)
            results.append(res)
    doc = {
        "benchmark": "arch_latency",
        "quick": q,
        "args": {k: v for k, v in vars(args).items()},
        "environment": environment_report(backend="onnxruntime", device="cpu", threads=args.threads, batch_size=1,
                                          precision="float32", input_shape=[1, 3, args.size, args.size], layout="nchw"),
        "seconds": round(time.perf_counter() - t_start, 1),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    log(f"wrote {out} ({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
