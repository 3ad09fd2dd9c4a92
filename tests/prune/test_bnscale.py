"""prune.bn_rescaling: gamma re-parameterised as gamma_orig * s after mask changes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.models import build_model
from smcp_core.prune.bnscale import BNScaler, following_batchnorms
from smcp_core.prune.masking import Masker


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    yield


@pytest.fixture()
def r20():
    torch.manual_seed(0)
    model = build_model("cifar/resnet20").train()
    return model, ChannelGraph(model, torch.randn(1, 3, 32, 32))


def test_finds_the_batchnorm_after_every_conv(r20):
    model, graph = r20
    found = following_batchnorms(graph)
    assert len(found) == 19  # stem + 2 per block x 9 blocks
    assert graph.layers[found["layer1.0.bn1"]].name == "layer1.0.conv1"
    assert graph.layers[found["layer3.2.bn2"]].name == "layer3.2.conv2"


@pytest.mark.parametrize("mode", ["kept_fraction", "kept_importance"])
def test_scale_follows_the_mask_and_gamma_learns_like_a_plain_parameter(r20, mode):
    model, graph = r20
    g = graph.groups[graph.layer("layer2.1.conv2").group]  # block inner group (32 classes)
    keep = graph.full_keep()
    keep[g.classes[:24]] = False  # keep 8 of 32
    scores = torch.rand(graph.n_classes, generator=torch.Generator().manual_seed(3))
    plain = copy.deepcopy(model)
    mk = Masker(model, graph, mode="soft")
    bs = BNScaler(model, graph, mode)
    mk.set_keep(keep)
    bs.update(keep, scores)
    s = model.layer2[1].bn2.parametrizations.weight[0].s
    expect = 0.25 if mode == "kept_fraction" else float(scores[g.classes[24:]].sum() / scores[g.classes].sum())
    assert float(s) == pytest.approx(expect, rel=1e-6)
    assert float(model.layer1[0].bn2.parametrizations.weight[0].s) == 1.0  # untouched groups
    # the same network written plainly: gamma_eff as a parameter, masked weights zeroed
    with torch.no_grad():
        plain.layer2[1].bn2.weight.mul_(float(s))
        plain.layer2[1].conv2.weight[:, :24] = 0
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(5))
    for m in (model, plain):
        F.cross_entropy(m(x), y).backward()
        with torch.no_grad():
            for p in m.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
    with torch.no_grad():
        plain.layer2[1].conv2.weight[:, :24] = 0  # the masked model masks them in its forward
        assert torch.allclose(model.layer2[1].bn2.weight, plain.layer2[1].bn2.weight, atol=1e-6)
        assert torch.allclose(model(x), plain(x), atol=1e-4)
    # bake: a plain parameter with the effective value, same function
    with torch.no_grad():
        ref = model(x)
    bs.bake()
    assert not parametrize_registered(model.layer2[1].bn2)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-6)


def parametrize_registered(mod: nn.Module) -> bool:
    return hasattr(mod, "parametrizations")


def test_empty_layer_gets_zero_scale_and_no_nan(r20):
    model, graph = r20
    g = graph.groups[graph.layer("layer1.1.conv2").group]
    keep = graph.full_keep()
    keep[g.classes] = False
    mk = Masker(model, graph)
    bs = BNScaler(model, graph, "kept_importance")
    mk.set_keep(keep)
    bs.update(keep, torch.zeros(graph.n_classes))  # zero importance -> 0, not NaN
    assert float(model.layer1[1].bn2.parametrizations.weight[0].s) == 0.0
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    gr = model.layer1[1].bn2.parametrizations.weight.original.grad
    assert gr is not None and bool(torch.isfinite(gr).all()) and float(gr.abs().sum()) == 0.0


def test_off_registers_nothing(r20):
    model, graph = r20
    bs = BNScaler(model, graph, "off")
    assert bs.items == [] and not parametrize_registered(model.bn1)
    with pytest.raises(ValueError):
        BNScaler(model, graph, "sometimes")
