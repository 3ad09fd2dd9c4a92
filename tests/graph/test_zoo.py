"""The torchvision classification zoo: channel graph -> random masks -> slim -> ONNX, per model.

For every model: random BN statistics and biases, a random keep-mask (frozen classes kept, two
removable groups removed entirely where the model has any), the masked model's output, then the
slim model: same output (<= 1e-4), strictly fewer parameters, every remaining layer at its kept
widths, and an ONNX export whose onnxruntime output matches the slim model on an input the export
never saw (of another batch size where the export has a dynamic batch).  What a model cannot prune
is frozen with a reason (checked per model below); a model that cannot be analysed at all would be
listed in ``REFUSED`` with the exact one-line error.

CPU only, one torch thread, 64x64 inputs, batch 2.
"""

from __future__ import annotations

import json
import zlib

import pytest
import torch
import torch.nn as nn
from chain_support import masked_then_slim, random_keep, randomise, randomise_layer_norms_and_scales

from smcp_core.errors import SmcpError
from smcp_core.export.onnx import export_onnx, onnx_parity
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.models import build_model
from smcp_core.slim.surgery import ConstantChannels, count_params


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    yield


TOL = 1e-4
SIZE = 64  # every model below runs at 64x64 (googlenet included)

# model -> what the channel graph must report for it:
#   grouped: it has grouped (non-depthwise) convs, pruned a whole group at a time
#   frozen: a substring of the reason of at least one partly/fully frozen group (what is not pruned)
ZOO: dict[str, dict] = {
    "resnet18": {},
    "resnet50": {},
    "resnext50_32x4d": {"grouped": True},
    "wide_resnet50_2": {},
    "mobilenet_v2": {},
    "mobilenet_v3_small": {},
    "mobilenet_v3_large": {},
    "efficientnet_b0": {},
    "regnet_x_400mf": {"grouped": True},
    "regnet_y_400mf": {"grouped": True},
    "densenet121": {},
    "googlenet": {},
    "shufflenet_v2_x0_5": {"frozen": "channel shuffle"},
    "mnasnet0_5": {},
    "convnext_tiny": {"frozen": "LayerNorm normalises over the channels"},
    "squeezenet1_0": {},
    "vgg11_bn": {},
}
# model -> the exact SmcpError it raises (a documented refusal); none at the moment
REFUSED: dict[str, str] = {}


def _check_widths(slim: nn.Module, graph: ChannelGraph, keep: torch.Tensor) -> int:
    """Every layer left in the slim model has its kept widths; grouped convs keep their group size.
    Returns how many grouped convs lost at least one group."""
    mods = dict(slim.named_modules())
    fewer_groups = 0
    for l, (cin, cout) in zip(graph.layers, graph.widths(keep)):
        m = mods.get(l.name)
        if m is None:
            continue
        if l.kind == "dwconv":
            gs = l.sig.group_size
            assert m.weight.shape[0] == cin == cout and m.weight.shape[1] == gs, l.name
            assert m.groups * gs == cin and m.in_channels == m.out_channels == cin, l.name
            if gs > 1 and cin < l.sig.cin:
                fewer_groups += 1
        elif l.kind == "conv":
            assert tuple(m.weight.shape[:2]) == (cout, cin) and m.groups == 1, l.name
        else:
            assert tuple(m.weight.shape) == (cout, cin), l.name
    return fewer_groups


@pytest.mark.parametrize("name", list(ZOO) + list(REFUSED))
def test_zoo_prune_slim_export(name, tmp_path):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    model = randomise(build_model(f"torchvision/{name}", num_classes=10), gen)
    randomise_layer_norms_and_scales(model, gen)
    x = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    if name in REFUSED:
        with pytest.raises(SmcpError) as ei:
            ChannelGraph(model, x[:1])
        assert str(ei.value) == REFUSED[name]
        return
    expect = ZOO[name]
    graph = ChannelGraph(model, x[:1])

    # what `smcp inspect` shows: JSON-friendly, every frozen group says why
    summary = graph.summary()
    json.dumps(summary)
    assert any(g["prunable"] for g in summary["groups"])
    for g in summary["groups"]:
        if g["frozen_channels"]:
            assert g["reason"], g
    assert all(s and "\n" not in s for s in summary["frozen_spots"])
    frozen_reasons = " | ".join(g.reason for g in graph.groups if g.n_frozen)
    if "frozen" in expect:
        assert expect["frozen"] in frozen_reasons, frozen_reasons
    else:  # only the network input (and the output classes, in no group) may be frozen
        assert summary["frozen_spots"] == [], summary["frozen_spots"]
        assert all(g.reason == "network input" for g in graph.groups if g.n_frozen), frozen_reasons
    grouped = [l for l in graph.layers if l.kind == "dwconv" and l.sig.group_size > 1]
    assert bool(grouped) == expect.get("grouped", False)

    # random masks (+ up to two whole removable groups); slim == masked
    n_params = count_params(model)
    keep, removed = random_keep(graph, gen, n_remove=2)
    if grouped:  # make sure some grouped conv loses some of its groups (and not all)
        g = graph.groups[grouped[0].group]
        free = g.classes[~g.frozen]
        if g.index not in removed and len(free) > 1 and bool(keep[free].all()):
            keep[free[0]] = False
    assert not bool(keep.all())
    ref, slim, out = masked_then_slim(model, graph, keep, x)
    assert out.shape == ref.shape == (2, 10)
    assert float(ref.abs().max()) > 1e-2  # not a trivially-constant output
    assert float((out - ref).abs().max()) <= TOL
    assert count_params(slim) < n_params
    fewer_groups = _check_widths(slim, graph, keep)
    if grouped:
        assert fewer_groups > 0
    mods = dict(slim.named_modules())
    for gi in removed:
        for li in graph.groups[gi].consumers:
            assert graph.layers[li].name not in mods, f"{graph.layers[li].name} of removed group {gi} is still there"

    # ONNX: exports, runs in onnxruntime on a new input, same output as the slim model.  A dynamic
    # batch dimension doubles the export time, so it is used where the slim model has a removed
    # layer's constant (whose batch size comes from the input); elsewhere the batch is fixed at 2
    dynamic = any(isinstance(m, ConstantChannels) for m in slim.modules())
    path = export_onnx(slim, x, tmp_path / "slim.onnx", dynamic_batch=dynamic)
    n = 3 if dynamic else 2
    par = onnx_parity(slim, path, torch.randn(n, 3, SIZE, SIZE, generator=gen))
    assert par["output_shape"] == [n, 10]
    assert par["max_abs_diff"] <= TOL, par
