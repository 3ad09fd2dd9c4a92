"""Issue 17: an in-place tensor op whose result is unused (``x.relu_()``, ``y.add_(x)``,
``z.mul_(s)``) still changes its input; slim must keep it (it was dropped as dead code)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from chain_support import TOL, check_slim_shapes, masked_then_slim, random_keep, randomise

from smcp_core.graph.channel_graph import ChannelGraph


class InplaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.c1 = nn.Conv2d(16, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 16, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.se = nn.Conv2d(16, 16, 1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.bn0(self.stem(x))
        x.relu_()
        y = self.bn1(self.c1(x))
        y.relu_()
        y = self.bn2(self.c2(y))
        y.add_(x)  # residual, in place, result unused
        y.relu_()
        z = self.bn3(self.c3(y))
        z.mul_(torch.sigmoid(self.se(self.pool(z))))
        z.add_(1.0)
        self.act(z)  # an in-place module, result unused
        return self.head(torch.flatten(self.pool(z), 1))


class SimpleInplace(nn.Module):
    """The issue's reproducer: ``x = self.bn(self.conv(x)); x.relu_()``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn(self.conv(x))
        x.relu_()
        x = self.bn2(self.conv2(x))
        x.relu_()
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("seed", range(4))
def test_slim_keeps_unused_inplace_relu(seed):
    gen = torch.Generator().manual_seed(seed)
    model = randomise(SimpleInplace(), gen)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    graph = ChannelGraph(model, x[:1])
    keep, _ = random_keep(graph, gen, n_remove=0)
    ref, slim, out = masked_then_slim(model, graph, keep, x)
    assert float((out - ref).abs().max()) <= TOL
    assert sum(1 for n in slim.graph.nodes if n.target == "relu_") == 2


@pytest.mark.parametrize("seed", range(6))
def test_slim_equals_masked_with_inplace_ops(seed):
    """relu_/add_/mul_ and an inplace ReLU module with unused results, with random widths and
    (where the graph allows it) the residual block removed: its constant output is written in place."""
    gen = torch.Generator().manual_seed(seed)
    model = randomise(InplaceNet(), gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    graph = ChannelGraph(model, x[:1])
    assert any(g.removable for g in graph.groups)  # the block through c1/c2 (in-place residual)
    keep, removed = random_keep(graph, gen, n_remove=seed % 2)
    ref, slim, out = masked_then_slim(model, graph, keep, x)
    assert float(ref.abs().max()) > 1e-2
    assert float((out - ref).abs().max()) <= TOL
    check_slim_shapes(slim, graph, keep)
    if removed:
        assert "c2" not in dict(slim.named_modules())
        with torch.no_grad():  # the constant's buffer is not written into: a second call agrees
            assert float((slim(x) - ref).abs().max()) <= TOL
