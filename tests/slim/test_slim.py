"""Channel graph + masking + slim: the slim model computes exactly what the masked model computes.

Every test here is CPU-only and small (64x64 inputs for torchvision models, 32x32 for CIFAR models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from chain_support import (
    TOL,
    CatSplitSE,
    check_slim_shapes,
    group_of,
    masked_then_slim,
    random_keep,
    randomise,
)

from smcp_core.errors import SmcpError
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.models import build_model
from smcp_core.prune.masking import Masker
from smcp_core.slim.surgery import count_params, slim_model


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    yield


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


@pytest.fixture(scope="module")
def user_graph():
    return ChannelGraph(CatSplitSE().eval(), torch.randn(1, 3, 16, 16))


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


def test_slim_resnet20_onnx_export_parity(tmp_path):
    from smcp_core.export.onnx import export_onnx, onnx_parity

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
    from smcp_core import stages
    from smcp_core.config.recipe import load_recipe
    from smcp_core.utils.fsutil import read_json

    recipe = load_recipe("quickstart", [])
    model = stages.build_model(recipe)
    graph = stages.build_graph(recipe, model)
    gen = torch.Generator().manual_seed(11)
    randomise(model, gen)
    keep, removed = random_keep(graph, gen, n_remove=2)
    mk = Masker(model, graph)
    mk.set_keep(keep)
    mk.remove(bake=True)
    (tmp_path / "prune").mkdir()
    torch.save({"state_dict": model.state_dict(), "keep": keep, "n_classes": graph.n_classes},
               tmp_path / "prune" / "pruned.pt")

    res = stages.slim(recipe, tmp_path).to_dict()
    assert res["max_abs_diff"] <= TOL and res["params"] < res["params_full"] and res["flops"] < res["flops_full"]
    sdir = tmp_path / "slim"
    for f in ("weights.pt", "channel_spec.json", "model.pt2", "slim.json"):
        assert (sdir / f).exists(), f
    weights = torch.load(sdir / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    spec = read_json(sdir / "channel_spec.json", "spec")
    assert spec["kept_classes"] == torch.nonzero(keep).flatten().tolist()
    assert [(l["cin"], l["cout"]) for l in spec["layers"]] == graph.widths(keep)

    rebuilt = stages.rebuild_slim(sdir / "channel_spec.json", sdir / "weights.pt")
    direct = slim_model(model, graph, keep)
    x = stages.example_input(recipe, 3)
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


class _Half(nn.Module):
    def forward(self, w):
        return 0.5 * w


def test_slim_of_a_still_parametrized_batch_norm_is_one_clear_line():
    """A batch norm whose weight still carries a parametrization (a pruner not baked, e.g. through
    the API) cannot be sliced: one SmcpError line, not a KeyError from deepcopy/setattr."""
    model = build_model("cifar/resnet20", num_classes=10).eval()
    graph = ChannelGraph(model, torch.randn(1, 3, 32, 32))
    nn.utils.parametrize.register_parametrization(model.bn1, "weight", _Half())
    keep = graph.full_keep()
    keep[graph.groups[1].classes[0]] = False
    with pytest.raises(SmcpError, match=r"slim: batch norm bn1 still carries a parametrization"):
        slim_model(model, graph, keep)
