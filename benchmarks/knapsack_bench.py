"""Benchmark of :func:`smcp_core.prune.knapsack.solve_mckp` on ResNet-50-like pruning instances.

Each prunable channel group of a ResNet-50 (the stem, the two inner convs of every bottleneck and
the four residual streams) gets one option per width in steps of 8 channels.  The value of keeping
``k`` channels is the sum of the ``k`` largest of random log-normal channel importances (concave,
nondecreasing); the cost is a staircase latency model, ``a * ceil(k / 32) * 32`` plus a constant and
a little per-option noise, so it is not monotone and not convex.  The budget is a fraction of the
full model's cost.

``--model resnet50`` instead times a whole mask update, :meth:`Allocator.solve` (options, the
knapsack at a few corrected capacities, the hub search), on torchvision ResNet-50's real channel
graph at the rn50_fps2x recipe's grid (``channel_round`` 32, ``min_channels`` 32) with a latency
table on a 32-channel grid whose per-layer cost is proportional to the layer's MACs, random
log-normal importances, from the unpruned masks and re-solved from the previous answer (as the
mask updates of a ramp do).  ``--profile`` prints where the time goes (cProfile); ``--linearised``
times the linearised hub-candidate solve (``Allocator.EXACT_COMPONENTS = False``) instead of the
exact one over components.

    python benchmarks/knapsack_bench.py [--repeats 7] [--groups 200]
    python benchmarks/knapsack_bench.py --model resnet50 [--threads 1] [--profile] [--linearised]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from smcp_core.prune.knapsack import solve_mckp  # noqa: E402

STEP = 8


def resnet50_channels() -> list[int]:
    """Channel counts of ResNet-50's prunable groups (stem, bottleneck inner convs, residual streams)."""
    chans = [64]  # stem conv
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for _ in range(blocks):
            chans += [width, width]  # conv1 and conv2 of the bottleneck
        chans.append(4 * width)  # the residual stream shared by all blocks of the stage
    return chans


def make_instance(channels: list[int], rng: np.random.Generator):
    values, costs = [], []
    for ch in channels:
        imp = np.sort(rng.lognormal(mean=0.0, sigma=1.0, size=ch))[::-1]
        k = np.arange(STEP, ch + 1, STEP)
        values.append(torch.from_numpy(np.cumsum(imp)[k - 1].copy()))
        a = rng.uniform(0.5, 2.0) / ch  # ms per channel
        lat = a * np.ceil(k / 32) * 32 + 0.01 + rng.normal(0.0, 0.01 * a * ch / 8, size=k.size)
        costs.append(torch.from_numpy(np.maximum(lat, 0.0)))
    return values, costs


def bench(channels: list[int], label: str, repeats: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    values, costs = make_instance(channels, rng)
    full = float(sum(c.max() for c in costs))
    n_opts = [len(v) for v in values]
    print(f"\n{label}: G={len(channels)} groups, options per group {min(n_opts)}..{max(n_opts)}, "
          f"{sum(n_opts)} options in all, full cost {full:.3f} ms")
    print(f"{'capacity':>10} {'median ms':>10} {'min ms':>8} {'max frontier':>13} {'value':>12}")
    for frac in (0.3, 0.5, 0.7, 0.9):
        cap = frac * full
        times = []
        res = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = solve_mckp(values, costs, cap, unit="ms")
            times.append((time.perf_counter() - t0) * 1e3)
        assert res is not None and res.cost <= cap * (1 + 1e-9)
        print(f"{int(frac * 100):>9}% {statistics.median(times):>10.2f} {min(times):>8.2f} "
              f"{res.max_frontier:>13d} {res.value:>12.3f}")


def mac_table(graph, step: int = 32, gmacs_per_ms: float = 50.0):
    """A complete latency table on ``step``-channel grids: 1 us plus the layer's MACs at 50 GMAC/s."""
    from smcp_core.profile.table import LatencyTable, channel_grid

    by_key: dict[str, list] = {}
    for layer in graph.layers:
        by_key.setdefault(layer.sig.key(), []).append(layer.sig)
    entries = {}
    for key, sigs in by_key.items():
        rep = sigs[0].from_dict({**sigs[0].to_dict(), "cin": max(s.cin for s in sigs),
                                 "cout": max(s.cout for s in sigs)})
        gi = sorted({c for s in sigs for c in channel_grid(s.cin, step)})
        if rep.depthwise:
            ms = [1e-3 + rep.flops(c, c) / (gmacs_per_ms * 1e9) for c in gi]
            entries[key] = {"sig": rep.to_dict(), "depthwise": True, "cin_grid": gi, "cout_grid": None, "ms": ms}
            continue
        go = sorted({c for s in sigs for c in channel_grid(s.cout, step)})
        ms = [[1e-3 + rep.flops(ci, co) / (gmacs_per_ms * 1e9) for co in go] for ci in gi]
        entries[key] = {"sig": rep.to_dict(), "depthwise": False, "cin_grid": gi, "cout_grid": go, "ms": ms}
    return LatencyTable.from_dict({"format": "smcp-latency-table", "schema_version": 1,
                                   "meta": {"backend": "synthetic", "device": "cpu", "batch_size": 256,
                                            "dtype": "float16", "layout": "nhwc", "channel_step": step},
                                   "model": {}, "entries": entries}, source="MAC-proportional table")


def bench_resnet50(repeats: int, profile: bool, linearised: bool = False) -> None:
    """Allocator.solve on ResNet-50 at the rn50_fps2x grid: from the full model and from the last answer."""
    from smcp_core.graph.channel_graph import ChannelGraph
    from smcp_core.models import build_model
    from smcp_core.profile.cost_model import CostModel
    from smcp_core.prune.allocator import Allocator

    graph = ChannelGraph(build_model("torchvision/resnet50"), torch.randn(1, 3, 224, 224))
    alloc = Allocator(graph, CostModel(graph, "latency", mac_table(graph)), channel_round=32, min_channels=32)
    alloc.EXACT_COMPONENTS = not linearised
    how = "linearised" if linearised else "exact over components"
    print(f"\nResNet-50 Allocator.solve ({how}): {len(graph.groups)} groups ({len(alloc.hubs)} hubs), "
          f"{graph.n_classes} channel classes, channel_round 32, min_channels 32, 32-step MAC table")
    print(f"{'budget':>8} {'start':>6} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'knapsacks':>10} {'value':>10}")
    for frac in (0.5, 0.7):
        for start in ("full", "prev"):
            times, iters = [], 0
            for r in range(repeats):
                g = torch.Generator().manual_seed(r)
                scores = torch.randn(graph.n_classes, generator=g, dtype=torch.float64).exp()
                keep0 = graph.full_keep()
                if start == "prev":
                    keep0 = alloc.solve(scores * 1.1, (frac + 0.05) * alloc.full_cost, keep0).keep
                t0 = time.perf_counter()
                res = alloc.solve(scores, frac * alloc.full_cost, keep0)
                times.append((time.perf_counter() - t0) * 1e3)
                iters, value = res.iterations, res.value
            print(f"{int(frac * 100):>7}% {start:>6} {statistics.median(times):>10.1f} {min(times):>8.1f} "
                  f"{max(times):>8.1f} {iters:>10d} {value:>10.1f}")
    if profile:
        import cProfile
        import pstats

        scores = torch.randn(graph.n_classes, generator=torch.Generator().manual_seed(99), dtype=torch.float64).exp()
        prof = cProfile.Profile()
        prof.runcall(alloc.solve, scores, 0.5 * alloc.full_cost, graph.full_keep())
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--groups", type=int, default=200, help="group count of the scaled instance")
    ap.add_argument("--seeds", type=int, default=3, help="random instances per size")
    ap.add_argument("--model", choices=("synthetic", "resnet50"), default="synthetic",
                    help="synthetic knapsack instances, or whole mask updates on ResNet-50's channel graph")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--profile", action="store_true", help="with --model resnet50: cProfile one solve")
    ap.add_argument("--linearised", action="store_true",
                    help="with --model resnet50: the linearised hub-candidate solve instead of the exact one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}")
    if args.model == "resnet50":
        bench_resnet50(args.repeats, args.profile, args.linearised)
        return
    base = resnet50_channels()
    for seed in range(args.seeds):
        bench(base, f"ResNet-50-like (seed {seed})", args.repeats, seed)
    big = (base * (args.groups // len(base) + 1))[: args.groups]
    for seed in range(args.seeds):
        bench(big, f"scaled (seed {seed})", args.repeats, seed)


if __name__ == "__main__":
    main()
