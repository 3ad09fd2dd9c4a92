"""timm models, pruned as torchvision's are: channel graph -> random masks -> slim -> ONNX, and a
short ``smcp prune`` of each.

For every model (``timm/<name>``, random weights, built offline; re-parameterisable ones in their
deployed form): the share of prunable channel groups (timm's fused ``BatchNormAct2d`` and its
``Linear`` must not freeze anything), random BN statistics and a random keep-mask (two removable
groups removed entirely where there are any), the slim model's output equal to the masked one's
relative to the output's scale, fewer parameters, every norm-act layer still followed by its own
activation, and an ONNX export whose onnxruntime output matches.  Then ``smcp prune`` (FLOPs
target, synthetic 64x64 data, one mask update) exits 0; the re-parameterisable ones start from a
checkpoint of their *training* form, which smcp folds after loading.

CPU only, one torch thread, 64x64 inputs.  Skipped when timm is not installed.
"""

from __future__ import annotations

import json
import zlib

import pytest
import torch
import torch.nn as nn
from chain_support import masked_then_slim, random_keep, randomise, randomise_layer_norms_and_scales
from conftest import cli, sets

from smcp_core.export.onnx import export_onnx, onnx_parity
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.models import build_model
from smcp_core.slim.surgery import count_params
from smcp_core.utils.tv import import_torchvision

import_torchvision()  # timm imports torchvision
timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d  # noqa: E402

SIZE = 64

# model -> (minimum share of prunable groups, substring of a frozen group's reason or None).
# Measured with timm 1.0.31 (prunable / groups): ResNets 23/24 (the stem's 3 input channels), the
# others (n-1)/n, ecaresnet26t 19/24 (ECA's Conv1d runs across the channels), convnext_atto 12/17
# (its LayerNorms normalise over the channels)
ZOO: dict[str, tuple[float, str | None]] = {
    "resnet26d": (0.95, None),
    "seresnext26d_32x4d": (0.95, None),
    "ecaresnet26t": (0.75, "EcaModule"),
    "regnetz_b16": (0.95, None),
    "efficientnet_b0": (0.95, None),
    "mobilenetv3_large_100": (0.95, None),
    "mobilenetv4_conv_small": (0.95, None),
    "rexnet_100": (0.95, None),
    "cspresnet50": (0.95, None),
    "repvgg_a0": (0.95, None),
    "mobileone_s0": (0.95, None),
    "convnext_atto": (0.7, "LayerNorm normalises over the channels"),
}
REPARAM = {"repvgg_a0", "mobileone_s0"}

FAST_PRUNE = [
    "data.source=synthetic", f"data.image_size={SIZE}", "data.train_subset=32", "data.val_subset=16",
    "data.batch_size=16", "prune.epochs=2", "prune.warmup_epochs=0", "prune.ramp_epochs=1",
    "prune.cooldown_epochs=1", "prune.max_steps=1", "prune.update_interval_samples=1000",
    "prune.target.flops_ratio=0.7", "prune.closed_loop=0", "model.kwargs={}",
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    yield


@pytest.mark.parametrize("name", list(ZOO))
def test_timm_model_prunes_slims_and_exports(name, tmp_path):
    min_share, frozen_note = ZOO[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    model = randomise_layer_norms_and_scales(randomise(build_model(f"timm/{name}", num_classes=10), gen), gen)
    if name in REPARAM:  # the deployed form: no multi-branch blocks left
        blocks = [m for m in model.modules() if callable(getattr(m, "reparameterize", None))]
        assert blocks and all(getattr(m, "reparam_conv", None) is not None for m in blocks)
    x = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    graph = ChannelGraph(model, x[:1])

    summary = graph.summary()
    json.dumps(summary)
    share = sum(g["prunable"] for g in summary["groups"]) / len(summary["groups"])
    assert share >= min_share, (share, summary["frozen_spots"][:5])
    frozen = " | ".join(g.reason for g in graph.groups if g.n_frozen)
    assert "functional batch_norm" not in frozen and "function linear" not in frozen, frozen
    if frozen_note:  # a frozen spot says what froze it (the module type, for a timm module)
        spots = " | ".join(summary["frozen_spots"])
        assert frozen_note in frozen + spots, spots
    assert not any(layer.is_consumer and layer.group < 0 for layer in graph.layers)

    n_params = count_params(model)
    keep, removed = random_keep(graph, gen, n_remove=2)
    assert not bool(keep.all())
    ref, slim, out = masked_then_slim(model, graph, keep, x)
    scale = float(ref.abs().max())
    assert scale > 0
    assert float((out - ref).abs().max()) <= 1e-4 * max(scale, 1.0)
    assert count_params(slim) < n_params
    # slimmed norm-act layers are the same layers with fewer channels: their activation is kept
    acts = {n: type(m.act) for n, m in model.named_modules() if isinstance(m, BatchNormAct2d)}
    slim_acts = {n: type(m.act) for n, m in slim.named_modules() if isinstance(m, BatchNormAct2d)}
    assert bool(slim_acts) == bool(acts) and all(acts[n] is a for n, a in slim_acts.items())
    assert any(a is not nn.Identity for a in slim_acts.values()) or not acts

    path = export_onnx(slim, x, tmp_path / "slim.onnx", dynamic_batch=False)
    par = onnx_parity(slim, path, torch.randn(2, 3, SIZE, SIZE, generator=gen))
    assert par["output_shape"] == [2, 10]
    assert par["max_rel_diff"] <= 1e-3, par


@pytest.mark.parametrize("name", list(ZOO))
def test_smcp_prune_runs_on_timm_model(name, tmp_path):
    extra = []
    if name in REPARAM:
        # a checkpoint of the training form (multi-branch blocks), BN scaled down so that random
        # weights do not overflow; smcp loads it, then folds the blocks
        train_form = build_model(f"timm/{name}", num_classes=10, deploy=False)
        with torch.no_grad():
            for mod in train_form.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.weight.mul_(0.3)
        torch.save(train_form.state_dict(), tmp_path / "train_form.pt")
        extra = [f"model.checkpoint={tmp_path / 'train_form.pt'}"]
    code, out, err = cli("prune", "--out", tmp_path / "run", *sets(FAST_PRUNE + [f"model.source=timm/{name}"] + extra),
                         "--quiet", "--json")
    assert code == 0, err[-2000:]
    doc = json.loads(out)
    assert doc["final_cost"] < doc["full_cost"]
    assert (tmp_path / "run" / "prune" / "pruned.pt").is_file()
