"""ChannelGraph: channel groups, removable groups, frozen channels and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from chain_support import (
    CatSplitSE,
    group_of,
    masked_then_slim,
    random_keep,
    randomise,
)

from smcp_core.errors import SmcpError
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.models import build_model
from smcp_core.prune.masking import Masker


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    yield


@pytest.fixture(scope="module")
def resnet20_graph():
    model = build_model("cifar/resnet20")
    return model, ChannelGraph(model, torch.randn(1, 3, 32, 32))


def test_resnet20_residual_stream_is_one_group(resnet20_graph):
    _, graph = resnet20_graph
    assert len(graph.groups) == 11
    stream = group_of(graph, "linear")
    names = {graph.layers[i].name for i in stream.consumers}
    expected = {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)} | {"linear"}
    assert names == expected
    assert stream.size == 16 + 16 + 32 == 64
    assert stream.prunable and stream.n_frozen == 0 and not stream.removable
    # the zero-pad shortcut carries stage-1 classes into the middle of the stage-2 stream, and so on
    s1 = graph.layer("layer1.0.conv1").in_labels
    assert torch.equal(graph.layer("layer2.0.conv1").in_labels, s1)
    s2 = graph.layer("layer2.1.conv1").in_labels
    assert s2.numel() == 32 and torch.equal(s2[8:24], s1)
    s3 = graph.layer("layer3.1.conv1").in_labels
    assert s3.numel() == 64 and torch.equal(s3[16:48], s2)
    assert torch.equal(graph.layer("linear").in_labels, s3)
    assert set(s3.tolist()) == set(stream.classes.tolist())
    # the stream is produced by the stem and every block's conv2
    assert set(stream.producers) == {"conv1"} | {f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)}


def test_resnet20_block_groups_removable_and_stem_input_frozen(resnet20_graph):
    _, graph = resnet20_graph
    for s, width in ((1, 16), (2, 32), (3, 64)):
        for b in range(3):
            g = group_of(graph, f"layer{s}.{b}.conv2")
            assert [graph.layers[i].name for i in g.consumers] == [f"layer{s}.{b}.conv2"]
            assert g.producers == [f"layer{s}.{b}.conv1"]
            assert g.size == width and g.prunable and g.removable
    stem = group_of(graph, "conv1")
    assert not stem.prunable and not stem.removable
    assert stem.size == 3 and "network input" in stem.reason
    # the classifier's outputs are frozen (network output) but belong to no group
    out_lab = graph.layer("linear").out_labels
    assert bool(graph.class_frozen[out_lab].all())
    assert bool((graph.class_group[out_lab] == -1).all())
    summary = graph.summary()
    json.dumps(summary)  # JSON-friendly
    assert len(summary["groups"]) == 11 and summary["frozen_spots"] == []


@pytest.fixture(scope="module")
def resnet50_graph():
    gen = torch.Generator().manual_seed(5)
    model = randomise(build_model("torchvision/resnet50", num_classes=10), gen)
    return model, ChannelGraph(model, torch.randn(1, 3, 64, 64, generator=gen))


def test_resnet50_downsample_shares_group_with_conv1(resnet50_graph):
    _, graph = resnet50_graph
    for stage in (1, 2, 3, 4):
        g1 = graph.layer(f"layer{stage}.0.conv1").group
        assert graph.layer(f"layer{stage}.0.downsample.0").group == g1
        assert not graph.groups[g1].removable
    # the bottleneck's inner groups (read by conv2 / conv3 only) may be removed
    for name in ("layer1.0.conv2", "layer1.0.conv3", "layer3.5.conv3"):
        g = group_of(graph, name)
        assert [graph.layers[i].name for i in g.consumers] == [name]
        assert g.removable


def test_removable_means_output_still_depends_on_input(resnet50_graph):
    """Zeroing a group's mask makes every consumer output a constant: the model output must still
    vary with the input exactly for the groups marked removable."""
    model, graph = resnet50_graph
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    mk = Masker(model, graph)
    try:
        seen = {True: 0, False: 0}
        for g in graph.groups:
            if not g.prunable:
                continue
            keep = graph.full_keep()
            keep[g.classes] = False
            mk.set_keep(keep)
            with torch.no_grad():
                y = model(x)
            depends = float((y[0] - y[1]).abs().max()) > 1e-4
            assert depends == g.removable, (g.index, [graph.layers[i].name for i in g.consumers])
            seen[g.removable] += 1
        assert seen[True] > 0 and seen[False] > 0
    finally:
        mk.remove(bake=False)


class ShuffleNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_channel_shuffle_view_freezes_its_channels():
    model = ShuffleNetLike().eval()
    graph = ChannelGraph(model, torch.randn(1, 3, 16, 16))
    conv1, conv2 = graph.layer("conv1"), graph.layer("conv2")
    # the shuffled classes are frozen with a reason naming the reshape
    assert bool(graph.class_frozen[conv1.out_labels].all())
    reasons = {graph.class_reason[c] for c in conv1.out_labels.tolist()}
    assert any("reshape/view" in r for r in reasons), reasons
    g = graph.groups[conv2.group]
    assert not g.prunable and g.n_frozen == g.size == 8
    assert "reshape/view" in g.reason
    assert any("reshape/view" in s for s in graph.unsupported)
    # the groups after the shuffle stay prunable
    assert group_of(graph, "fc").prunable


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = F.relu(x)
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_raises_one_line_smcp_error():
    with pytest.raises(SmcpError) as ei:
        ChannelGraph(DataDependent(), torch.randn(1, 3, 16, 16))
    msg = str(ei.value)
    assert "\n" not in msg
    assert "DataDependent" in msg and "torch.fx" in msg
    assert "control flow" in msg and "model.leaf_modules" in msg  # says how to fix it


def test_wrong_input_shape_raises_smcp_error():
    with pytest.raises(SmcpError, match=r"CifarResNet failed on an input of shape \(1, 5, 32, 32\)"):
        ChannelGraph(build_model("cifar/resnet20"), torch.randn(1, 5, 32, 32))


def test_unpruned_freezes_layer_channels():
    model = build_model("cifar/resnet20")
    graph = ChannelGraph(model, torch.randn(1, 3, 32, 32), unpruned=["conv1", "layer3.*.conv1"])
    stem = graph.layer("conv1")
    assert bool(graph.class_frozen[stem.out_labels].all())
    stream = group_of(graph, "linear")
    assert stream.n_frozen == stream.size  # layer3.*.conv1 read the whole 64-class stream
    assert not stream.prunable and not stream.removable
    assert "model.unpruned" in stream.reason
    assert graph.unpruned_matched["layer3.*.conv1"] == [f"layer3.{b}.conv1" for b in range(3)]
    # the outputs of layer3.*.conv1 (inner block groups) are frozen too
    for b in range(3):
        assert not group_of(graph, f"layer3.{b}.conv2").prunable
    # untouched blocks are still prunable and removable
    assert group_of(graph, "layer1.0.conv2").removable

    only_stem = ChannelGraph(model, torch.randn(1, 3, 32, 32), unpruned=["conv1"])
    g = group_of(only_stem, "linear")
    assert g.n_frozen == 16 and g.prunable and not g.removable  # stage-1 classes only


def test_unpruned_pattern_without_match_is_an_error():
    with pytest.raises(SmcpError, match=r"pattern 'layer9\.\*' matches no conv/linear layer.*smcp inspect"):
        ChannelGraph(build_model("cifar/resnet20"), torch.randn(1, 3, 32, 32), unpruned=["layer9.*"])


@pytest.fixture(scope="module")
def user_graph():
    return ChannelGraph(CatSplitSE().eval(), torch.randn(1, 3, 16, 16))


def test_user_model_groups(user_graph):
    graph = user_graph
    assert graph.unsupported == [] and not bool(graph.class_frozen[graph.layer("stem").out_labels].any())
    # y1 = a's 8 channels + b's first 2: read by c only
    gc = group_of(graph, "c")
    assert gc.size == 10 and gc.removable and set(gc.producers) == {"a", "b"}
    assert torch.equal(graph.layer("c").in_labels[:8], graph.layer("a").out_labels)
    assert torch.equal(graph.layer("c").in_labels[8:], graph.layer("b").out_labels[:2])
    # q = the last 6 channels of b
    assert torch.equal(graph.layer("d").in_labels, graph.layer("b").out_labels[6:])
    # the SE multiplication ties fc2's outputs to the concatenation [c, d, p]; e and fc1 read it
    gse = group_of(graph, "e")
    assert gse.index == graph.layer("fc1").group and gse.size == 24 and not gse.removable
    assert torch.equal(graph.layer("fc2").out_labels, graph.layer("e").in_labels)
    assert torch.equal(graph.layer("e").in_labels[20:], graph.layer("b").out_labels[2:6])  # p
    assert group_of(graph, "fc2").removable  # removing the SE bottleneck leaves a constant gate


class _Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        return x if float(x.mean()) > 0 else -x


class _GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.gate = _Gate()
        self.c = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.gate(self.b(torch.relu(self.a(x))))
        return self.head(self.c(x).relu().mean((2, 3)))


def test_leaf_modules_keep_untraceable_code_opaque_and_slim_equals_masked():
    gen = torch.Generator().manual_seed(3)
    model = randomise(_GatedNet(), gen)
    x = torch.randn(2, 3, 12, 12, generator=gen)
    with pytest.raises(SmcpError) as ei:
        ChannelGraph(model, x[:1])
    assert "model.leaf_modules: [_Gate]" in str(ei.value)  # names the module to keep whole
    graph = ChannelGraph(model, x[:1], leaf_modules=["_Gate"])
    assert any("_Gate is not understood" in s for s in graph.unsupported)
    assert bool(graph.class_frozen[graph.layer("b").out_labels].all())  # what flows into the gate
    assert not bool(graph.class_frozen[graph.layer("a").out_labels].any())  # elsewhere: pruned
    keep, _ = random_keep(graph, gen, n_remove=0)
    assert not bool(keep.all())
    ref, slim, out = masked_then_slim(model, graph, keep, x)
    assert float((out - ref).abs().max()) <= 1e-5
    assert any(type(m).__name__ == "_Gate" for m in slim.modules())  # still one module in the slim model


def test_leaf_modules_naming_no_module_type_is_one_clear_line():
    with pytest.raises(SmcpError, match=r"model.leaf_modules: no module of type '_Gat' .*did you mean _Gate"):
        ChannelGraph(_GatedNet(), torch.randn(1, 3, 12, 12), leaf_modules=["_Gat"])
