"""Issue 17: a module called more than once (shared weights) must not be pruned: the same weight
would have to be sliced for two channel spaces.  Its channels are frozen with a reason naming it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from chain_support import TOL, masked_then_slim, random_keep, randomise

from smcp_core.graph.channel_graph import ChannelGraph


class TwiceInARow(nn.Module):
    """``self.conv(self.conv(x))``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn(self.conv(self.conv(x))))
        x = torch.relu(self.bn2(self.c2(x)))
        return self.head(torch.flatten(x.mean((2, 3), keepdim=True), 1))


class TwoBranches(nn.Module):
    """One conv applied to two branches (a siamese pair), then added."""

    def __init__(self):
        super().__init__()
        self.s1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.s2 = nn.Conv2d(3, 8, 1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 10, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(10)
        self.c3 = nn.Conv2d(10, 6, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        a = self.shared(torch.relu(self.b1(self.s1(x))))
        b = self.shared(torch.relu(self.b2(self.s2(x))))
        y = torch.relu(self.bn(a + b))
        y = torch.relu(self.bn3(self.c3(y)))
        return self.head(torch.flatten(y.mean((2, 3), keepdim=True), 1))


CASES = [(TwiceInARow, "conv"), (TwoBranches, "shared")]


@pytest.mark.parametrize("cls,shared", CASES, ids=[c[0].__name__ for c in CASES])
def test_shared_module_is_frozen_with_reason(cls, shared):
    model = cls().eval()
    graph = ChannelGraph(model, torch.randn(1, 3, 8, 8))
    why = f"{shared}: called 2 times (shared weights)"
    layer = graph.layer(shared)
    for labels in (layer.in_labels, layer.out_labels):
        assert bool(graph.class_frozen[labels].all())
        assert all(why in graph.class_reason[c] for c in labels.unique().tolist())
    assert why in graph.groups[layer.group].reason
    assert any(why in s for s in graph.summary()["frozen_spots"])
    assert sum(1 for lay in graph.layers if lay.name == shared) == 1  # masked once, not twice
    assert any(g.prunable for g in graph.groups)  # the rest of the model still prunes


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cls,shared", CASES, ids=[c[0].__name__ for c in CASES])
def test_slim_of_shared_module_equals_masked(cls, shared, seed):
    gen = torch.Generator().manual_seed(seed)
    model = randomise(cls(), gen)
    full = model.get_submodule(shared).weight.shape
    x = torch.randn(2, 3, 8, 8, generator=gen)
    graph = ChannelGraph(model, x[:1])
    keep, _ = random_keep(graph, gen, n_remove=0)
    ref, slim, out = masked_then_slim(model, graph, keep, x)
    assert float(ref.abs().max()) > 1e-2
    assert float((out - ref).abs().max()) <= TOL
    assert slim.get_submodule(shared).weight.shape == full  # nothing of the shared layer pruned
