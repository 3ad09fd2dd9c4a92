"""Whole-model parameters and MACs (smcp_core.analysis.model_stats), used by `smcp inspect`."""

from __future__ import annotations

import torch
from torch import nn

from smcp_core.analysis.model_stats import (
    FLOP_COUNTER,
    HOOKS,
    flop_counter_macs,
    hook_macs,
    model_stats,
)
from smcp_core.slim.surgery import count_params


def _convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False), nn.ReLU(),
                         nn.ConvTranspose2d(8, 4, 2, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5)).eval()


def test_flop_counter_and_hooks_agree_on_conv_linear_net():
    m, x = _convnet(), torch.randn(2, 3, 8, 8)
    hw = 8 * 8
    expect = (3 * 8 * 9 * hw) + (8 * 2 * 9 * hw) + (8 * 4 * 4 * hw) + 4 * 5  # per sample
    assert flop_counter_macs(m, x) == 2 * expect
    assert hook_macs(m, x) == 2 * expect
    st = model_stats(m, x, graph_flops=expect, graph_params=count_params(m))
    assert st["macs"] == expect and st["macs_method"] == FLOP_COUNTER  # per sample of the batch
    assert st["graph_flops_share"] == 1.0 and st["graph_params_share"] == 1.0


def test_shared_parameter_counted_once():
    lin = nn.Linear(4, 4)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    assert count_params(m) == 20 == sum(p.numel() for p in m.parameters())


def test_functional_matmul_counted_by_flop_counter_not_by_hooks():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 6))
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x @ self.w)

    m, x = Mix().eval(), torch.randn(1, 6)
    st = model_stats(m, x, graph_flops=18, graph_params=21)
    assert st["params"] == 36 + 21 and st["macs"] == 36 + 18
    assert st["graph_params_share"] == 21 / 57 and st["graph_flops_share"] == 18 / 54
    assert hook_macs(m, x) == 18  # hooks see only the nn.Linear


def test_falls_back_to_hooks_when_the_counter_fails(monkeypatch):
    import smcp_core.analysis.model_stats as ms

    def broken(*a, **k):
        raise RuntimeError("no counter")

    monkeypatch.setattr(ms, "flop_counter_macs", broken)
    m = _convnet()
    st = ms.model_stats(m, torch.randn(1, 3, 8, 8), graph_flops=1, graph_params=1)
    assert st["macs_method"] == HOOKS and st["macs"] == hook_macs(m, torch.randn(1, 3, 8, 8))
    assert "macs_error" not in st
