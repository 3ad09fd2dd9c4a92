"""benchmarks/peers.py: Torch-Pruning's pruning step on the pretrained ResNet-56 with the residual stream
ignored, and what Torch-Pruning does to the option-A zero-pad shortcut without the ignores.

Skips without ``torch_pruning`` (a benchmark-only dependency) and without the shared data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import require_shared

REPO = Path(__file__).resolve().parents[2]
tp = pytest.importorskip("torch_pruning")
sys.path.insert(0, str(REPO / "benchmarks"))
import peers  # noqa: E402

CKPT = "models/resnet56-4bfd9763.th"


@pytest.fixture(scope="module")
def dense():
    root = require_shared(CKPT)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    from smcp_core import stages
    from smcp_core.config.recipe import load_recipe

    recipe = load_recipe(peers.RECIPE, [f"model.checkpoint={root / CKPT}"])
    yield stages.build_model(recipe).eval(), stages.example_input(recipe, 1)
    torch.set_num_threads(old)


def _stream(model) -> list[int]:
    return [m.out_channels if isinstance(m, torch.nn.Conv2d) else m.in_features for m in peers.stream_layers(model)]


@pytest.mark.parametrize("kind", ["l1", "taylor"])
def test_only_block_inner_widths_change_on_the_grid_of_16(dense, kind, tmp_path):
    model, x = dense
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    grads = peers.taylor_grads(model, [batch]) if kind == "taylor" else None
    pruned = peers.prune_copy(model, x, 0.3, kind, grads=grads)
    assert _stream(pruned) == _stream(model)  # stem, every conv2, the linear: untouched
    before, after = peers.inner_widths(model), peers.inner_widths(pruned)
    assert after != before and all(a <= b for a, b in zip(after, before))
    assert all(w % 16 == 0 and w >= 16 for w in after)
    for b in peers.blocks(pruned):  # conv1 out = bn1 = conv2 in
        assert b.bn1.num_features == b.conv2.in_channels == b.conv1.out_channels
    assert not any(p.grad is not None for p in pruned.parameters())
    with torch.no_grad():
        assert pruned(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    from smcp_core.api import export_onnx

    par = export_onnx(pruned, x, tmp_path / "pruned.onnx")
    assert Path(par["path"]).exists() and par["max_abs_diff"] < 1e-3


def test_without_the_ignores_torch_pruning_breaks_the_padded_stream(dense):
    model, x = dense
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0, 1])
    targets = {dep.target.module for dep, _ in group}
    # the zero-pad is taken for element-wise: the stem's group reaches the 32- and 64-channel streams
    assert model.layer2[0].conv2 in targets and model.layer3[8].conv2 in targets and model.linear in targets
    assert any("ConstantPadNd" in str(dep.target) for dep, _ in group)
    pruned = peers.prune_copy(model, x, 0.3, "l1", round_to=8, ignore_stream=False)
    assert pruned.conv1.out_channels < 16  # the stream was pruned ...
    with torch.no_grad(), pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        pruned(x)  # ... and the model no longer runs


def test_without_torch_pruning_the_script_says_so_and_exits_3(monkeypatch, capsys):
    monkeypatch.setattr(peers, "tp", None)
    with pytest.raises(SystemExit) as exc:
        peers.main([])
    assert exc.value.code == 3
    assert capsys.readouterr().err.strip() == ('peers.py needs torch-pruning: pip install -e ".[peers]" '
                                               "(or pip install torch-pruning)")
