"""The Python API (smcp_core.api) and its examples: a loop the user owns prunes with the same code
as ``smcp prune`` (identical masks), slims the whole model with a submodule replaced in place,
keeps its state in the user's checkpoint, and answers bad input with one line."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import runpy
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN
from torch import nn

from smcp_core import api, stages
from smcp_core.config.recipe import load_recipe
from smcp_core.data import make_loader
from smcp_core.errors import InfeasibleTarget, SmcpError
from smcp_core.models.cifar_resnet import cifar_resnet
from smcp_core.prune.trainer import lr_at, sgd_for
from smcp_core.stages.builders import build_data, build_model, example_input

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class Detectorish(nn.Module):
    """A backbone (a CIFAR ResNet-20's trunk) inside a larger model with a head of its own that
    reads the backbone's features (like a detector's heads)."""

    def __init__(self) -> None:
        super().__init__()
        net = cifar_resnet("resnet20", num_classes=10)
        self.backbone = nn.Sequential(net.conv1, net.bn1, nn.ReLU(), net.layer1, net.layer2, net.layer3)
        self.head = nn.Conv2d(64, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone(x)
        return {"boxes": self.head(f).flatten(2), "features": f.mean((2, 3))}


def _train(model, pruner, steps: int, *, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32, generator=g)
        out = model(x)
        loss = sum(v.float().pow(2).mean() for v in out.values()) if isinstance(out, dict) else out.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        pruner.before_step()
        opt.step()
        pruner.after_step()


def test_cli_and_api_give_identical_masks_on_the_quickstart_with_a_fixed_table(tiny_run, tmp_path):
    """``smcp prune`` (the stage) and a hand-written loop driving api.pruner with the same batches,
    optimizer and schedule in steps end with the same masks, update for update."""
    recipe = load_recipe("quickstart", TINY_RUN + ["prune.closed_loop=0", "prune.epochs=5", "prune.ramp_epochs=3",
                                                  "prune.update_interval_samples=32"])
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_run / "latency.json", out / "latency.json")
    cli_res = stages.prune(recipe, out)
    cli_updates = [r for r in cli_res.history if r.get("event") == "mask_update"]

    pc, bs = recipe.prune, recipe.data.batch_size
    model = build_model(recipe)
    graph = api.channel_graph(model, example_input(recipe))
    bundle = build_data(recipe)
    spe = min(len(bundle.train) // bs, pc.max_steps)
    schedule = api.StepSchedule(warmup=pc.warmup_epochs * spe, ramp=pc.ramp_epochs * spe,
                                update_every=math.ceil(pc.update_interval_samples / bs),
                                hold=(pc.epochs - pc.cooldown_epochs - pc.warmup_epochs - pc.ramp_epochs) * spe)
    torch.manual_seed(recipe.seed)  # as the trainer does before its first step
    pruner = api.pruner(model, graph, api.load_table(out / "latency.json"), speedup=recipe.target_value(),
                        schedule=schedule, config=pc)
    opt = sgd_for(model, pc)
    for epoch in range(pc.epochs):
        model.train()
        loader = make_loader(bundle.train, batch_size=bs, shuffle=True, seed=recipe.seed + epoch, drop_last=True)
        for step, (x, y) in zip(range(1, spe + 1), loader):
            for group in opt.param_groups:
                group["lr"] = lr_at(pc, pc.optimizer.lr, epoch + (step - 1) / spe, pc.epochs)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y, label_smoothing=pc.label_smoothing).backward()
            pruner.before_step()
            opt.step()
            pruner.after_step()
    api_updates = [r for r in pruner.history if r.get("event") == "mask_update"]
    assert len(cli_updates) >= 2 and len(api_updates) == len(cli_updates)
    assert [r["kept_classes"] for r in api_updates] == [r["kept_classes"] for r in cli_updates]
    assert [r["budget"] for r in api_updates] == pytest.approx([r["budget"] for r in cli_updates], rel=1e-12)
    assert pruner.frozen and not bool(pruner.keep().all())
    assert torch.equal(pruner.keep(), cli_res.train.keep)


def test_a_submodule_is_pruned_and_slimmed_in_place_with_the_whole_models_outputs_unchanged():
    torch.manual_seed(0)
    model = Detectorish()
    example = torch.randn(2, 3, 32, 32)
    graph = api.channel_graph(model, example, submodule="backbone")
    pruner = api.pruner(model, graph, flops_ratio=0.5, schedule=api.StepSchedule(warmup=1, ramp=4, update_every=2))
    _train(model, pruner, 7)
    assert pruner.frozen
    kept = int(pruner.keep().sum())
    assert kept < graph.n_classes
    model.eval()
    slim = api.slim(model, pruner)  # the whole model, its backbone slimmed
    assert isinstance(slim, Detectorish) and slim.head is not model.head
    with torch.no_grad():
        a, b = model(example), slim(example)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    n_params = sum(p.numel() for p in slim.backbone.parameters())
    assert n_params < 0.8 * sum(p.numel() for p in model.backbone.parameters())
    # the backbone's output (the head's input) keeps its 64 channels: the head is not the graph's
    assert slim.head.in_channels == 64
    with pytest.raises(SmcpError, match="finalized"):
        pruner.after_step()  # the masks are baked into the model now


def test_pruner_state_goes_into_the_users_checkpoint_and_back(tmp_path):
    torch.manual_seed(0)
    schedule = api.StepSchedule(warmup=1, ramp=6, update_every=2)
    a = cifar_resnet("resnet20", num_classes=10)
    ga = api.channel_graph(a, torch.randn(1, 3, 32, 32))
    pa = api.pruner(a, ga, flops_ratio=0.6, schedule=schedule)
    _train(a, pa, 4)
    torch.save({"model": a.state_dict(), "pruner": pa.state_dict()}, tmp_path / "ck.pt")
    b = cifar_resnet("resnet20", num_classes=10)
    gb = api.channel_graph(b, torch.randn(1, 3, 32, 32))
    pb = api.pruner(b, gb, flops_ratio=0.6, schedule=schedule)
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    b.load_state_dict(ck["model"])
    pb.load_state_dict(ck["pruner"])
    assert pb.steps == pa.steps == 4 and torch.equal(pb.keep(), pa.keep())
    assert pb.history == pa.history and pb.since_update == pa.since_update
    _train(a, pa, 3, seed=5)  # both go on from the checkpoint: the same importance, the same next masks
    _train(b, pb, 3, seed=5)
    assert pa.frozen and pb.frozen and len(pb.history) == len(pa.history) > 2
    assert torch.equal(pb.keep(), pa.keep())
    small = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3))
    ps = api.pruner(small, api.channel_graph(small, torch.randn(1, 3, 8, 8)), flops_ratio=0.9,
                    schedule=schedule, config={"min_channels": 1, "channel_round": 1})
    with pytest.raises(SmcpError, match="16 channel classes|channel classes"):
        ps.load_state_dict(ck["pruner"])


def test_the_latency_table_and_the_closed_loop_measure_the_whole_model():
    """api.profile times the backbone's layers and calibrates on the whole model; with ``example``
    the pruner measures the slimmed whole model at the end of the window (closed-loop rows)."""
    torch.manual_seed(0)
    model = Detectorish()
    example = torch.randn(1, 3, 32, 32)
    graph = api.channel_graph(model, example, submodule="backbone")
    table = api.profile(model, graph, example, channel_step=32, max_seconds=20)
    assert table.model["submodule"] == "backbone" and table.model["measured_ms"] > 0
    assert {p["name"] for p in table.model["calibration"]["points"]} >= {"baseline", "uniform75", "uniform50"}
    assert model.training  # the user's mode is restored
    pruner = api.pruner(model, graph, table, speedup=1.1, example=example, closed_loop=1,
                        schedule=api.StepSchedule(warmup=1, ramp=2, update_every=1))
    _train(model, pruner, 3)
    assert model.training
    events = [r["event"] for r in pruner.history]
    rows = [r for r in pruner.history if r["event"] == "closed_loop"]
    assert 1 <= len(rows) <= 2 and all(r["measured_ms"] > 0 and r["dense_ms"] > 0 for r in rows)
    assert events.index("closed_loop") > max(i for i, e in enumerate(events[:events.index("closed_loop")])
                                             if e == "mask_update")  # after the window's last update


def test_api_profile_can_calibrate_per_resolution(monkeypatch):
    """``api.profile(calibration="per_resolution")`` times the per-resolution variants too, as the
    recipe key does; a value it does not know is one line."""
    from chain_support import fake_layer_latency, fake_paired_latency

    from smcp_core.profile import measure as profile_measure
    from smcp_core.stages import profiling
    from smcp_core.stages.measure import removal_site

    monkeypatch.setattr(profile_measure, "_measure_point", fake_layer_latency)
    monkeypatch.setattr(profiling, "measure_against_baseline", fake_paired_latency)
    model, example = cifar_resnet("resnet20", num_classes=10), torch.randn(1, 3, 32, 32)
    graph = api.channel_graph(model, example)
    names = {p["name"] for p in api.profile(model, graph, example, channel_step=16, max_seconds=60,
                                           calibration="per_resolution").model["calibration"]["points"]}
    assert names >= {"removed_32x32", "removed_16x16", "removed_8x8"}
    plain = {p["name"] for p in api.profile(model, graph, example, channel_step=16,
                                           max_seconds=60).model["calibration"]["points"]}
    assert not any(removal_site(n) for n in plain) and "removed" in plain
    with pytest.raises(SmcpError, match="calibration"):
        api.profile(model, graph, example, calibration="per_stage")


@pytest.mark.parametrize("call, match", [
    (lambda m, x: api.channel_graph(m, x, submodule="bakbone"),
     "has no submodule 'bakbone'; its children are backbone, head"),
    (lambda m, x: api.channel_graph(m, x, submodule="head.weight"), "no submodule"),
    (lambda m, x: api.pruner(m, api.channel_graph(m, x, submodule="backbone"), speedup=2.0,
                             schedule=api.StepSchedule(1, 1, 1)), "needs a latency table"),
    (lambda m, x: api.pruner(m, api.channel_graph(m, x, submodule="backbone"), flops_ratio=0.5, speedup=2.0,
                             schedule=api.StepSchedule(1, 1, 1)), "exactly one target"),
    (lambda m, x: api.pruner(m, api.channel_graph(m, x, submodule="backbone"), flops_ratio=0.5,
                             schedule=api.StepSchedule(1, 1, 1), config={"min_chanels": 4}), "min_chanels"),
    (lambda m, x: api.StepSchedule(warmup=1, ramp=1, update_every=0), "update_every=0"),
    (lambda m, x: api.pruner(m, api.channel_graph(m, x, submodule="backbone"), flops_ratio="0.5",
                             schedule=api.StepSchedule(1, 1, 1)), "must be a number"),
    (lambda m, x: api.pruner(m, api.channel_graph(m, x, submodule="backbone"), flops_ratio=0.5,
                             schedule=api.StepSchedule(5, 0, 1)), "no pruning window"),
    (lambda m, x: api.pruner(m, api.channel_graph(m, x, submodule="backbone"), flops_ratio=0.5,
                             schedule=api.StepSchedule(1, 1, 1), config={"method": "sfp"}), "not available"),
])
def test_bad_input_is_one_line(call, match):
    with pytest.raises(SmcpError, match=match) as exc:
        call(Detectorish(), torch.randn(1, 3, 32, 32))
    assert "\n" not in str(exc.value)


def test_an_unreachable_target_and_an_untraceable_backbone_are_one_line():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)  # data-dependent: fx cannot trace it

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = Branchy()

        def forward(self, x):
            return self.body(x).mean()

    with pytest.raises(SmcpError, match="control flow") as exc:
        api.channel_graph(Holder(), torch.randn(1, 3, 8, 8), submodule="body")
    assert "\n" not in str(exc.value)
    m = Detectorish()
    g = api.channel_graph(m, torch.randn(1, 3, 32, 32), submodule="backbone")
    with pytest.raises(InfeasibleTarget, match="out of reach.*raise flops_ratio="):
        api.pruner(m, g, flops_ratio=0.001, schedule=api.StepSchedule(1, 1, 1))


@pytest.mark.parametrize("name", ["custom_loop.py", "lightning_callback.py"])
def test_the_examples_run_in_smoke_mode(name, capsys):
    if name.startswith("lightning") and importlib.util.find_spec("lightning") is None:
        pytest.skip("the lightning extra is not installed")  # (importing it here would import torchvision early)
    main = runpy.run_path(str(EXAMPLES / name), run_name="smcp_example")["main"]
    assert main(["--smoke"]) == 0
    out = capsys.readouterr().out
    updates = re.search(r"(\d+) mask updates", out)
    assert (int(updates.group(1)) if updates else out.count("mask update")) >= 2, out
    kept, total = (int(v) for v in re.search(r"(\d+)/(\d+) channel classes", out).groups())
    assert kept < total
    assert float(re.search(r"max \|diff\| ([0-9.e+-]+)", out).group(1)) < 1e-3


@pytest.mark.parametrize("detector", ["ssd_resnet50", "ssdlite"])
def test_the_detection_example_runs_in_smoke_mode(detector, capsys):
    """SSD-ResNet-50 and torchvision's SSDlite pruned through their backbones with the detector's
    own loss: the slim detector's head outputs, boxes, scores and labels equal the masked one's
    (detections matched order-independently: random detectors tie scores), and its ONNX
    export matches."""
    main = runpy.run_path(str(EXAMPLES / "detection_ssd.py"), run_name="smcp_example")["main"]
    assert main(["--smoke", "--detector", detector]) == 0
    row = json.loads(capsys.readouterr().out)
    same = row["slim_equals_masked"]
    assert same["core_max_rel_diff"] < 1e-4  # backbone + heads: what is deployed
    # every detection matched (label, box, score), in whatever order near-tied scores came out
    assert same["detections"] > 0 and same["unmatched"] == 0 and same["max_box_diff_px"] < 1e-2
    assert row["kept_classes"][0] < row["kept_classes"][1]
    assert row["onnx_max_rel_diff"] < 1e-3


def test_greedy_nms_matches_the_definition():
    """The CPU kernel given to torchvision's nms operator (CPU-only torch): boxes by falling score,
    each suppressing the lower-scored boxes that overlap it by more than the threshold."""
    from smcp_core.utils.tv import _greedy_nms, import_torchvision

    tv = import_torchvision()
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 9, 9.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    for nms in (_greedy_nms, tv.ops.nms):  # smcp's kernel, and what torchvision runs here
        assert nms(boxes, scores, 0.5).tolist() == [3, 2]  # 3 suppresses 0 (IoU .81) and 1 (.55)
        assert nms(boxes, scores, 0.6).tolist() == [3, 1, 2]  # 1 survives: IoU .55 with 3 < .6
        assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    assert tv.ops.batched_nms(boxes, scores, torch.tensor([0, 0, 0, 1]), 0.5).tolist() == [3, 0, 2]
