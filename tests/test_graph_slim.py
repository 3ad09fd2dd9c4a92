"""Channel graph + masking + slim: the slim model computes exactly what the masked model computes.

Every test here is CPU-only and small (64x64 inputs for torchvision models, 32x32 for CIFAR models).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from smcp_core.errors import SmcpError
from smcp_core.graph import ChannelGraph
from smcp_core.masking import Masker
from smcp_core.models import build_model
from smcp_core.slim import count_params, slim_model



@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    yield

TOL = 1e-4


# --------------------------------------------------------------------------------------------------
# helpers


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


# --------------------------------------------------------------------------------------------------
# slim == masked under random masks (with layer pruning)

MODELS = [
    ("torchvision/resnet18", (3, 64, 64)),
    ("torchvision/resnet50", (3, 64, 64)),
    ("cifar/resnet20", (3, 32, 32)),
    ("cifar/resnet56", (3, 32, 32)),
    ("torchvision/mobilenet_v2", (3, 64, 64)),
    ("mobilenet_v1", (3, 64, 64)),
]


@pytest.mark.parametrize("source,shape", MODELS, ids=[m[0] for m in MODELS])
def test_slim_equals_masked_under_random_masks(source, shape):
    gen = torch.Generator().manual_seed(1234)
    model = randomise(build_model(source, num_classes=10), gen)
    x = torch.randn(2, *shape, generator=gen)
    graph = ChannelGraph(model, x[:1])
    n_params = count_params(model)
    keep, removed = random_keep(graph, gen, n_remove=2)
    assert bool(keep[graph.class_frozen].all())
    assert not bool(keep.all())

    ref, slim, out = masked_then_slim(model, graph, keep, x)

    assert out.shape == ref.shape
    assert float(ref.abs().max()) > 1e-2  # not a trivially-zero output
    assert float((out - ref).abs().max()) <= TOL
    assert count_params(slim) < n_params
    check_slim_shapes(slim, graph, keep)
    mods = dict(slim.named_modules())
    has_removable = any(g.removable for g in graph.groups)
    assert len(removed) == (2 if has_removable else 0)
    for gi in removed:
        for li in graph.groups[gi].consumers:
            assert graph.layers[li].name not in mods, f"{graph.layers[li].name} of removed group {gi} is still there"


@pytest.mark.parametrize("seed", range(6))
def test_slim_equals_masked_resnet20_many_masks(seed):
    """Cheap model, many masks: 0..3 removed blocks and random widths everywhere."""
    gen = torch.Generator().manual_seed(seed)
    model = randomise(build_model("cifar/resnet20"), gen)
    x = torch.randn(3, 3, 32, 32, generator=gen)
    graph = ChannelGraph(model, x[:1])
    keep, removed = random_keep(graph, gen, n_remove=seed % 4)
    ref, slim, out = masked_then_slim(model, graph, keep, x)
    assert float((out - ref).abs().max()) <= TOL
    check_slim_shapes(slim, graph, keep)
    # a removed block's conv1 (producer of the removed group) and conv2 (its consumer) are both gone
    mods = dict(slim.named_modules())
    for gi in removed:
        (cons,) = graph.groups[gi].consumers
        name = graph.layers[cons].name
        assert name.endswith(".conv2") and name not in mods
        assert name.replace(".conv2", ".conv1") not in mods


def test_slim_when_the_stem_loses_all_outputs():
    """resnet20's residual-stream group keeps 8 of its 64 classes, all of them stage-3 classes (a
    mask the allocator can pick: it keeps the top-k classes of a group by importance)."""
    gen = torch.Generator().manual_seed(0)
    model = randomise(build_model("cifar/resnet20"), gen)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    graph = ChannelGraph(model, x[:1])
    stream = group_of(graph, "linear")
    s2 = set(graph.layer("layer2.1.conv1").in_labels.tolist())
    s3_only = [c for c in graph.layer("layer3.1.conv1").in_labels.tolist() if c not in s2]
    keep = graph.full_keep()
    keep[stream.classes] = False
    keep[torch.tensor(s3_only[:8])] = True
    assert int(keep[graph.layer("conv1").out_labels].sum()) == 0
    ref, slim, out = masked_then_slim(model, graph, keep, x)
    assert float((out - ref).abs().max()) <= TOL


def test_slim_full_keep_is_identity_function():
    gen = torch.Generator().manual_seed(0)
    model = randomise(build_model("cifar/resnet20"), gen)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    graph = ChannelGraph(model, x[:1])
    n_params = count_params(model)
    ref, slim, out = masked_then_slim(model, graph, graph.full_keep(), x)
    assert float((out - ref).abs().max()) <= 1e-6
    assert count_params(slim) == n_params


# --------------------------------------------------------------------------------------------------
# group structure


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


# --------------------------------------------------------------------------------------------------
# refusals: freeze or fail clearly, never mis-group


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
    assert "control flow" in msg and "leaf module" in msg  # says how to fix it


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


# --------------------------------------------------------------------------------------------------
# a user model: concatenation, chunk/split, squeeze-excitation


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


def _user_keep(graph, gen, n_remove):
    """Random masks for which every conv still produces >= 1 channel (see the xfail test below)."""
    for _ in range(200):
        keep, removed = random_keep(graph, gen, n_remove=n_remove)
        dead_consumers = {li for gi in removed for li in graph.groups[gi].consumers}
        # fc1's output only feeds fc2, so it may lose all its channels (when fc2's group is removed)
        live = [l for l in graph.layers if l.index not in dead_consumers and l.name != "fc1"]
        if all(int(keep[l.out_labels].sum()) > 0 for l in live):
            return keep, removed
    raise AssertionError("no suitable mask drawn")


@pytest.mark.parametrize("seed", range(8))
def test_user_model_slim_equals_masked(user_graph, seed):
    graph = user_graph
    gen = torch.Generator().manual_seed(seed)
    model = randomise(CatSplitSE(), gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    keep, removed = _user_keep(graph, gen, n_remove=seed % 3)
    ref, slim, out = masked_then_slim(model, graph, keep, x)
    assert float(ref.abs().max()) > 1e-2
    assert float((out - ref).abs().max()) <= TOL
    check_slim_shapes(slim, graph, keep)
    mods = dict(slim.named_modules())
    for gi in removed:
        for li in graph.groups[gi].consumers:
            assert graph.layers[li].name not in mods


@pytest.mark.parametrize("case", ["group_kept_from_other_branch", "group_removed"])
def test_user_model_producer_losing_all_outputs(user_graph, case):
    graph = user_graph
    gen = torch.Generator().manual_seed(0)
    model = randomise(CatSplitSE(), gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    keep = graph.full_keep()
    gc = group_of(graph, "c")
    keep[gc.classes] = False
    if case == "group_kept_from_other_branch":
        # c keeps (>= 1 class) only the two channels that come from b: a loses all its outputs
        keep[graph.layer("b").out_labels[:2]] = True
    assert int(keep[graph.layer("a").out_labels].sum()) == 0
    ref, slim, out = masked_then_slim(model, graph, keep, x)
    assert float((out - ref).abs().max()) <= TOL


class GlobalContext(nn.Module):
    """``y = block(x) + mean_hw(x)`` (a global-context add), then concatenated with ``x``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.bn2(self.c2(F.relu(self.c1(x)))) + x.mean((2, 3), keepdim=True)
        z = F.relu(self.c3(torch.cat([y, x], 1)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def test_removed_layer_constant_added_to_broadcast_tensor():
    gen = torch.Generator().manual_seed(0)
    model = randomise(GlobalContext(), gen)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    graph = ChannelGraph(model, x[:1])
    g = group_of(graph, "c2")
    assert g.removable
    keep = graph.full_keep()
    keep[g.classes] = False
    ref, slim, out = masked_then_slim(model, graph, keep, x)
    assert float((out - ref).abs().max()) <= TOL


# --------------------------------------------------------------------------------------------------
# exported / rebuilt slim models


def test_slim_resnet20_onnx_export_parity(tmp_path):
    from smcp_core.export import export_onnx, onnx_parity

    gen = torch.Generator().manual_seed(3)
    model = randomise(build_model("cifar/resnet20"), gen)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    graph = ChannelGraph(model, x[:1])
    keep, removed = random_keep(graph, gen, n_remove=2)
    ref, slim, _ = masked_then_slim(model, graph, keep, x)
    path = export_onnx(slim, x, tmp_path / "slim.onnx")
    assert path.exists()
    x3 = torch.randn(3, 3, 32, 32, generator=gen)  # dynamic batch
    par = onnx_parity(slim, path, x3)
    assert par["output_shape"] == [3, 10]
    assert par["max_abs_diff"] <= TOL
    assert par["top1_agree"] == 1.0


def test_pipeline_slim_and_rebuild_round_trip(tmp_path):
    from smcp_core import pipeline
    from smcp_core.fsutil import read_json
    from smcp_core.recipe import load_recipe

    recipe = load_recipe("quickstart", [])
    model = pipeline.build_model(recipe)
    graph = pipeline.build_graph(recipe, model)
    gen = torch.Generator().manual_seed(11)
    randomise(model, gen)
    keep, removed = random_keep(graph, gen, n_remove=2)
    mk = Masker(model, graph)
    mk.set_keep(keep)
    mk.remove(bake=True)
    (tmp_path / "prune").mkdir()
    torch.save({"state_dict": model.state_dict(), "keep": keep, "n_classes": graph.n_classes},
               tmp_path / "prune" / "pruned.pt")

    res = pipeline.slim(recipe, tmp_path)
    assert res["max_abs_diff"] <= TOL and res["params"] < res["params_full"] and res["flops"] < res["flops_full"]
    sdir = tmp_path / "slim"
    for f in ("weights.pt", "channel_spec.json", "model.pt2", "slim.json"):
        assert (sdir / f).exists(), f
    weights = torch.load(sdir / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    spec = read_json(sdir / "channel_spec.json", "spec")
    assert spec["kept_classes"] == torch.nonzero(keep).flatten().tolist()
    assert [(l["cin"], l["cout"]) for l in spec["layers"]] == graph.widths(keep)

    rebuilt = pipeline.rebuild_slim(sdir / "channel_spec.json", sdir / "weights.pt")
    direct = slim_model(model, graph, keep)
    x = pipeline.example_input(recipe, 3)
    with torch.no_grad():
        y_masked, y_direct, y_rebuilt = model(x), direct(x), rebuilt(x)
    assert torch.equal(y_rebuilt, y_direct)
    assert float((y_rebuilt - y_masked).abs().max()) <= TOL
    assert count_params(rebuilt) == res["params"]
    mods = dict(rebuilt.named_modules())
    for gi in removed:
        for li in graph.groups[gi].consumers:
            assert graph.layers[li].name not in mods
    # the torch.export program loads and computes the same thing
    ep = torch.export.load(str(sdir / "model.pt2"))
    with torch.no_grad():
        assert float((ep.module()(x) - y_direct).abs().max()) <= TOL
