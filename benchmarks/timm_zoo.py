"""timm models in smcp: prunable channel groups, what freezes the rest, and the cost of one mask
update (an ``Allocator.solve`` at 0.6x FLOPs from random importance), per model.

    python benchmarks/timm_zoo.py [--size 64] [name ...]

Random weights (nothing is downloaded), one torch thread; re-parameterisable models in their
deployed form.  Writes ``benchmarks/results/timm_zoo.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smcp_core.graph.channel_graph import ChannelGraph  # noqa: E402
from smcp_core.models import build_model  # noqa: E402
from smcp_core.profile.cost_model import CostModel  # noqa: E402
from smcp_core.prune.allocator import Allocator  # noqa: E402

MODELS = ("resnet26d seresnext26d_32x4d ecaresnet26t regnetz_b16 efficientnet_b0 mobilenetv3_large_100 "
          "mobilenetv4_conv_small rexnet_100 cspresnet50 repvgg_a0 mobileone_s0 convnext_atto").split()


def row(name: str, size: int) -> dict:
    model = build_model(f"timm/{name}", num_classes=10).eval()
    graph = ChannelGraph(model, torch.randn(1, 3, size, size))
    alloc = Allocator(graph, CostModel(graph, "flops"), channel_round=8, min_channels=8, layer_pruning=False)
    scores = torch.rand(graph.n_classes, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    res = alloc.solve(scores, 0.6 * alloc.full_cost, graph.full_keep())
    spots = collections.Counter(s.split(": ", 1)[-1] for s in graph.unsupported)
    return {"model": name, "groups": len(graph.groups), "prunable": sum(g.prunable for g in graph.groups),
            "hubs": len(alloc.hubs), "solve_ms": round(1000 * (time.perf_counter() - t0)),
            "solve_iterations": res.iterations, "frozen_spots": dict(spots.most_common(3))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=list(MODELS))
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.names:
        r = row(name, args.size)
        rows.append(r)
        print(f"{name:24s} {r['prunable']:3d}/{r['groups']:<3d} prunable, {r['hubs']:2d} hubs, "
              f"solve {r['solve_ms']:5d} ms  {'; '.join(r['frozen_spots'])[:80]}", flush=True)
    out = ROOT / "benchmarks" / "results" / "timm_zoo.json"
    out.write_text(json.dumps({"size": args.size, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
