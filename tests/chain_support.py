"""Helpers the graph, slim and zoo tests share: random BN statistics, random keep-masks, the
masked-then-slim comparison, and a small model with concatenation, split and squeeze-excitation."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.profile.table import LatencyTable, channel_grid
from smcp_core.prune.masking import Masker
from smcp_core.slim.surgery import slim_model

TOL = 1e-4


def randomise(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random BN statistics/affine parameters and conv/linear biases, so that a pruned channel is
    never trivially zero downstream (BN of a zero input gives a non-zero constant)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if mod.affine:
                    mod.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
                    mod.bias.copy_(torch.randn(n, generator=gen) * 0.5)
            elif isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
    return model.eval()


def randomise_layer_norms_and_scales(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Beyond :func:`randomise`: LayerNorm affine parameters and ConvNeXt-style layer scales
    (torchvision's ``layer_scale``, timm's ``gamma``; 1e-6 at init, which would hide every block's
    contribution from an output comparison)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) * 0.5 + 0.75)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                continue
            for name in ("layer_scale", "gamma"):
                ls = getattr(mod, name, None)
                if isinstance(ls, torch.Tensor):
                    ls.copy_(torch.rand(ls.shape, generator=gen) * 0.5 + 0.25)
    return model


def random_keep(graph: ChannelGraph, gen: torch.Generator, n_remove: int = 2):
    """A random class keep-mask: frozen classes kept, >= 1 class kept in every prunable group except
    ``n_remove`` randomly chosen *removable* groups, which keep nothing (layer pruning).

    In a kept group every producing layer keeps at least one of its output channels there: a layer
    left with no output channel while its output is still used crashes slim (a known bug, see
    ``test_slim_when_the_stem_loses_all_outputs``)."""
    keep = graph.full_keep()
    removable = [g.index for g in graph.groups if g.removable]
    perm = torch.randperm(len(removable), generator=gen).tolist()
    removed = [removable[i] for i in perm[:n_remove]]
    for g in graph.groups:
        if not g.prunable:
            continue
        free = g.classes[~g.frozen]
        keep[free] = False
        if g.index in removed:
            continue
        k = int(torch.randint(1, len(free) + 1, (1,), generator=gen))
        keep[free[torch.randperm(len(free), generator=gen)[:k]]] = True
        for l in graph.layers:
            if l.kind == "dwconv":
                continue
            mine = l.out_labels[graph.class_group[l.out_labels] == g.index]
            if mine.numel() and not bool(keep[mine].any()):
                keep[mine[int(torch.randint(0, mine.numel(), (1,), generator=gen))]] = True
    keep[graph.class_frozen] = True
    return keep, removed


def masked_then_slim(model: nn.Module, graph: ChannelGraph, keep: torch.Tensor, x: torch.Tensor):
    """(masked model output, slim model, slim output); ``model`` ends up with baked weights."""
    mk = Masker(model, graph)
    mk.set_keep(keep)
    with torch.no_grad():
        ref = model(x)
    mk.remove(bake=True)
    slim = slim_model(model, graph, keep)
    with torch.no_grad():
        out = slim(x)
    return ref, slim, out


def check_slim_shapes(slim: nn.Module, graph: ChannelGraph, keep: torch.Tensor) -> None:
    """Every layer still present in the slim model has exactly the kept widths."""
    mods = dict(slim.named_modules())
    for l, (cin, cout) in zip(graph.layers, graph.widths(keep)):
        m = mods.get(l.name)
        if m is None:
            continue
        if l.kind == "dwconv":
            assert m.weight.shape[0] == cin and m.groups == cin, l.name
        elif l.kind == "conv":
            assert tuple(m.weight.shape[:2]) == (cout, cin), l.name
        else:
            assert tuple(m.weight.shape) == (cout, cin), l.name


def group_of(graph: ChannelGraph, layer: str):
    return graph.groups[graph.layer(layer).group]


class CatSplitSE(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(16, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(20)
        self.c = nn.Conv2d(10, 10, 3, padding=1, bias=True)
        self.d = nn.Conv2d(6, 10, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(24)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(24, 6, 1)
        self.fc2 = nn.Conv2d(6, 24, 1)
        self.e = nn.Conv2d(24, 24, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = self.bn1(torch.cat([self.a(x), self.b(x)], dim=1))  # 8 + 12 channels
        y1, y2 = torch.chunk(y, 2, dim=1)  # 10 + 10
        p, q = y2.split([4, 6], dim=1)
        u = self.bn2(torch.cat([self.c(F.relu(y1)), self.d(q), p], 1))  # 10 + 10 + 4
        u = u * torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(u)))))  # squeeze-excitation
        z = F.relu(self.bn3(self.e(u)))
        return self.head(torch.flatten(self.pool(z), 1))


def fake_layer_latency(sig, cin, cout, **kw) -> float:
    """A deterministic 'latency' of one layer (stands in for ``profile.measure._measure_point``): a
    fixed overhead plus its multiply-adds."""
    hw = sig.in_hw[0] * sig.in_hw[1] // (sig.stride[0] * sig.stride[1])
    k = sig.kernel[0] * sig.kernel[1]
    macs = (cin * k * hw) if sig.depthwise else (cin * cout * k * hw)
    return 0.002 + macs * kw.get("batch_size", 1) * 1e-7


def fake_whole_model_latency(models, recipe, **kw) -> dict:
    """Whole-model 'latency' (stands in for ``stages.profiling.measure_lowest``): proportional to the
    parameter count (deterministic)."""
    stats = {k: {"median_ms": 0.01 + 1e-5 * sum(p.numel() for p in m.parameters())} for k, m in models.items()}
    return {"stats": stats, "repeats": [stats]}


def fake_table(graph: ChannelGraph, step: int = 8) -> LatencyTable:
    """A complete latency table whose values are a fixed overhead plus a FLOPs term, with a
    calibration section, built through the public (de)serialisation format."""
    by_key: dict[str, list] = {}
    for layer in graph.layers:
        by_key.setdefault(layer.sig.key(), []).append(layer.sig)
    entries = {}
    for key, sigs in by_key.items():
        rep = sigs[0]
        cin_max, cout_max = max(s.cin for s in sigs), max(s.cout for s in sigs)
        cin_grid = sorted({c for s in sigs for c in channel_grid(s.cin, step)})
        d = {**rep.to_dict(), "cin": cin_max, "cout": cout_max}
        if rep.depthwise:
            ms = [0.002 + rep.flops(c, c) * 1e-8 for c in cin_grid]
            entries[key] = {"sig": d, "depthwise": True, "cin_grid": cin_grid, "cout_grid": None, "ms": ms}
        else:
            cout_grid = sorted({c for s in sigs for c in channel_grid(s.cout, step)})
            # a step in the cost every 16 input channels (like a vector width), on top of the FLOPs
            ms = [[0.005 + rep.flops(ci, co) * 1e-8 + 0.001 * math.ceil(ci / 16) for co in cout_grid]
                  for ci in cin_grid]
            entries[key] = {"sig": d, "depthwise": False, "cin_grid": cin_grid, "cout_grid": cout_grid, "ms": ms}
    return LatencyTable.from_dict({
        "format": "smcp-latency-table", "schema_version": 1,
        "meta": {"backend": "onnxruntime", "device": "cpu", "batch_size": 1, "dtype": "float32",
                 "layout": "nchw", "channel_step": step},
        "model": {"measured_ms": 1.0, "calibration": {"scale": 1.25, "offset_ms": 0.1}},
        "entries": entries,
    })


def paired_from_ms(ms: dict[str, float], baseline: str = "baseline") -> dict:
    """What :func:`smcp_core.stages.measure.measure_against_baseline` returns for these latencies
    (ms by name; every other model paired with ``baseline``), without timing anything."""
    from smcp_core.profile.paired import Interval

    base = ms[baseline]
    speedup = {k: Interval(base / v, base / v, base / v, 0.9, 30) for k, v in ms.items() if k != baseline}
    return {"stats": {k: {"median_ms": v} for k, v in ms.items()}, "speedup": speedup,
            "ms": {baseline: base, **{k: base / iv.median for k, iv in speedup.items()}}}


def fake_paired_latency(models, where, *, baseline: str = "baseline", **kw) -> dict:
    """Stands in for ``stages.profiling.measure_against_baseline``: the latencies of
    :func:`fake_whole_model_latency`, each model paired with ``baseline``."""
    stats = fake_whole_model_latency(models, where)["stats"]
    return paired_from_ms({k: v["median_ms"] for k, v in stats.items()}, baseline)
