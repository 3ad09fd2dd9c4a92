"""Benchmark of :func:`smcp_core.prune.knapsack.solve_mckp` on ResNet-50-like pruning instances.

Each prunable channel group of a ResNet-50 (the stem, the two inner convs of every bottleneck and
the four residual streams) gets one option per width in steps of 8 channels.  The value of keeping
``k`` channels is the sum of the ``k`` largest of random log-normal channel importances (concave,
nondecreasing); the cost is a staircase latency model, ``a * ceil(k / 32) * 32`` plus a constant and
a little per-option noise, so it is not monotone and not convex.  The budget is a fraction of the
full model's cost.

    python benchmarks/knapsack_bench.py [--repeats 7] [--groups 200]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--groups", type=int, default=200, help="group count of the scaled instance")
    ap.add_argument("--seeds", type=int, default=3, help="random instances per size")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}")
    base = resnet50_channels()
    for seed in range(args.seeds):
        bench(base, f"ResNet-50-like (seed {seed})", args.repeats, seed)
    big = (base * (args.groups // len(base) + 1))[: args.groups]
    for seed in range(args.seeds):
        bench(big, f"scaled (seed {seed})", args.repeats, seed)


if __name__ == "__main__":
    main()
