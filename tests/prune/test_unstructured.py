"""Unstructured pruning (SNIP, global magnitude): each method's defining behaviour, the mask
mechanics, the LeNets and the idx reader."""

from __future__ import annotations

import gzip
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smcp_core.data.idx import load_idx_pair, load_mnist_like, read_idx
from smcp_core.errors import SmcpError
from smcp_core.models.lenet import LeNet5Caffe, LeNet300100, lenet5_caffe, lenet_300_100
from smcp_core.prune.unstructured import (
    apply_masks,
    is_masked,
    magnitude_masks,
    masks_from_scores,
    prunable_layers,
    remove_masks,
    snip_masks,
    snip_scores,
    sparsity_report,
    unstructured_speed_note,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(torch_single_thread):
    yield


class Tiny(nn.Module):
    """conv(1->4, 3x3) + BN + ReLU -> linear(144->16) -> ReLU -> linear(16->10): 36 + 2304 + 160 weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


N_TINY = 36 + 144 * 16 + 16 * 10


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def _batch(seed: int, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _eff(m: nn.Module) -> torch.Tensor:
    """The weight the forward pass uses."""
    return (m.weight_orig * m.weight_mask).detach() if is_masked(m) else m.weight.detach()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 100) -> None:
    model.train()
    for i in range(steps):
        x, y = _batch(seed + i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# ------------------------------------------------------------------------------------- SNIP


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-3, nesterov=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd-momentum-wd", "adamw"],
)
def test_snip_decided_once_at_init_and_pruned_weights_stay_zero(make_opt):
    model = _tiny()
    opt = make_opt(model.parameters())  # built before the masks: the Parameters must stay the same objects
    init = {n: m.weight.detach().clone() for n, m in prunable_layers(model).items()}
    masks = snip_masks(model, F.cross_entropy, _batch(1), 0.8)  # before any training step
    # computed at initialisation: the weights were not touched
    for n, m in prunable_layers(model).items():
        assert torch.equal(m.weight, init[n])
    frozen = {n: k.clone() for n, k in masks.items()}
    apply_masks(model, masks)
    _train(model, opt, steps=25)
    layers = prunable_layers(model)
    for n, m in layers.items():
        # never re-decided: the applied mask is the one computed at initialisation
        assert torch.equal(m.weight_mask.bool(), frozen[n])
        w = _eff(m)
        assert torch.all(w[~frozen[n]] == 0)  # pruned weights exactly zero after momentum + weight decay
        assert torch.all(w[frozen[n]] != 0)  # kept ones trained (none collapsed to exactly 0)
        assert not torch.equal(w[frozen[n]], init[n][frozen[n]])
    # the forward pass really uses the masked weight
    x, _ = _batch(7)
    model.eval()
    model(x)
    for _n, m in layers.items():
        assert torch.equal(m.weight.detach(), _eff(m))  # the pre-hook refreshed it for this forward
    baked = remove_masks(model)
    assert sorted(baked) == sorted(layers)
    for n, m in prunable_layers(model).items():
        assert not is_masked(m) and isinstance(m.weight, nn.Parameter)
        assert torch.equal(m.weight.detach() == 0, ~frozen[n])


def test_snip_scores_are_normalised_connection_sensitivity():
    model = _tiny()
    x, y = _batch(3)
    scores = snip_scores(model, F.cross_entropy, (x, y))
    assert math.isclose(sum(float(s.sum(dtype=torch.float64)) for s in scores.values()), 1.0, rel_tol=1e-6)
    # reference: |w * dL/dw| / sum, with an ordinary backward on a copy in the same mode
    ref = _tiny()
    F.cross_entropy(ref(x), y).backward()
    raw = {n: (m.weight * m.weight.grad).abs().detach() for n, m in prunable_layers(ref).items()}
    total = sum(r.sum() for r in raw.values())
    for n in raw:
        torch.testing.assert_close(scores[n], raw[n] / total, rtol=1e-5, atol=1e-9)


def test_snip_has_no_side_effects():
    model = _tiny()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snip_masks(model, F.cross_entropy, _batch(2), 0.5)
    after = model.state_dict()
    for k, v in before.items():  # BN running stats (and num_batches_tracked) restored, weights untouched
        assert torch.equal(after[k], v), k
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_snip_depends_on_the_batch_magnitude_does_not():
    model = _tiny()
    s1 = snip_scores(model, F.cross_entropy, _batch(10))
    s2 = snip_scores(model, F.cross_entropy, _batch(11))
    s1b = snip_scores(model, F.cross_entropy, _batch(10))
    assert all(torch.equal(s1[n], s1b[n]) for n in s1)  # deterministic for one batch
    assert any(not torch.allclose(s1[n], s2[n]) for n in s1)  # gradient-based: another batch, other scores
    m1 = masks_from_scores(s1, 0.9)
    m2 = masks_from_scores(s2, 0.9)
    assert any(not torch.equal(m1[n], m2[n]) for n in m1)

    # magnitude needs no data at all: it never runs the model
    class NoForward(Tiny):
        def forward(self, x):  # pragma: no cover - must not be called
            raise AssertionError("magnitude pruning ran a forward pass")

    torch.manual_seed(0)
    nf = NoForward()
    a = magnitude_masks(nf, 0.9)
    b = magnitude_masks(nf, 0.9)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(a[n], magnitude_masks(_tiny(), 0.9)[n]) for n in a)  # same weights, same masks


def test_snip_refuses_a_masked_model_and_frozen_weights():
    model = _tiny()
    apply_masks(model, magnitude_masks(model, 0.5))
    with pytest.raises(SmcpError, match="already has a mask"):
        snip_masks(model, F.cross_entropy, _batch(0), 0.5)
    model = _tiny()
    model.fc1.weight.requires_grad_(False)
    with pytest.raises(SmcpError, match="requires_grad"):
        snip_masks(model, F.cross_entropy, _batch(0), 0.5)


# ------------------------------------------------------------------------------- global sparsity


@pytest.mark.parametrize("method", ["snip", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98, 0.999])
def test_global_sparsity_is_exact(method, sparsity):
    model = _tiny()
    if method == "snip":
        masks = snip_masks(model, F.cross_entropy, _batch(0), sparsity)
    else:
        masks = magnitude_masks(model, sparsity)
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == max(1, round((1 - sparsity) * N_TINY))
    apply_masks(model, masks)
    rep = sparsity_report(model)
    assert rep["global"]["weights"] == N_TINY
    assert rep["global"]["kept"] == kept
    assert abs(rep["global"]["sparsity"] - sparsity) <= 1.0 / N_TINY
    for name, layer in rep["layers"].items():
        assert layer["masked"] and layer["zeros"] == int((~masks[name]).sum())


def test_magnitude_keeps_the_globally_largest_weights_brute_force():
    model = _tiny()
    with torch.no_grad():  # distinct magnitudes with very different per-layer scales: one global threshold
        for i, m in enumerate(prunable_layers(model).values()):
            m.weight.copy_(torch.randn(m.weight.shape) * (0.05 * 10**i))
    entries = []  # (|w|, layer, flat index)
    for n, m in prunable_layers(model).items():
        for j, v in enumerate(m.weight.detach().reshape(-1).tolist()):
            entries.append((abs(v), n, j))
    assert len({e[0] for e in entries}) == len(entries)
    for sparsity in (0.3, 0.9, 0.99):
        k = round((1 - sparsity) * len(entries))
        best = {(n, j) for _, n, j in sorted(entries, reverse=True)[:k]}
        masks = magnitude_masks(model, sparsity)
        got = {(n, int(j)) for n, mk in masks.items() for j in torch.nonzero(mk.reshape(-1)).flatten()}
        assert got == best


def test_magnitude_on_a_masked_model_uses_the_effective_weights():
    model = _tiny()
    first = magnitude_masks(model, 0.5)
    apply_masks(model, first)
    second = magnitude_masks(model, 0.8)  # iterative: already-pruned weights score 0
    for n in first:
        assert not torch.any(second[n] & ~first[n])
    apply_masks(model, second)  # replaces the mask in place
    rep = sparsity_report(model)
    assert rep["global"]["kept"] == round(0.2 * N_TINY)
    assert remove_masks(model) and not any(is_masked(m) for m in model.modules())


def test_ties_are_broken_deterministically():
    scores = {"a": torch.ones(4), "b": torch.ones(6)}
    m = masks_from_scores(scores, 0.5)
    assert m["a"].tolist() == [True] * 4 and m["b"].tolist() == [True] + [False] * 5


# ------------------------------------------------------------------------------- layer selection


@pytest.mark.parametrize("method", ["snip", "magnitude"])
def test_layers_not_selected_are_untouched(method):
    model = _tiny()
    conv_before = model.conv.weight.detach().clone()
    sel = ["fc1", model.fc2]  # names and module objects both accepted
    if method == "snip":
        masks = snip_masks(model, F.cross_entropy, _batch(0), 0.9, layers=sel)
    else:
        masks = magnitude_masks(model, 0.9, layers=sel)
    assert sorted(masks) == ["fc1", "fc2"]
    n_sel = 144 * 16 + 160
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * n_sel)  # sparsity over the selection
    apply_masks(model, masks)
    assert not is_masked(model.conv) and isinstance(model.conv.weight, nn.Parameter)
    assert torch.equal(model.conv.weight, conv_before)
    rep = sparsity_report(model)
    assert rep["layers"]["conv"]["zeros"] == 0 and not rep["layers"]["conv"]["masked"]
    _train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), steps=3)
    assert int((model.conv.weight == 0).sum()) == 0  # trained normally, never masked
    assert remove_masks(model) == ["fc1", "fc2"]


def test_bad_layer_selection_and_bad_masks_raise_clear_errors():
    model = _tiny()
    with pytest.raises(SmcpError, match="did you mean 'fc1'"):
        magnitude_masks(model, 0.5, layers=["fc_1"])
    with pytest.raises(SmcpError, match="no weight"):
        magnitude_masks(model, 0.5, layers=[""])  # the root module has no weight of its own
    with pytest.raises(SmcpError, match="empty selection"):
        magnitude_masks(model, 0.5, layers=[])
    with pytest.raises(SmcpError, match="not part of the model"):
        magnitude_masks(model, 0.5, layers=[nn.Linear(2, 2)])
    with pytest.raises(SmcpError, match="has shape"):
        apply_masks(model, {"fc1": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(SmcpError, match="no module named"):
        apply_masks(model, {"nope": torch.ones(1)})
    with pytest.raises(SmcpError, match="no nn.Linear or convolution"):
        magnitude_masks(nn.Sequential(nn.ReLU()), 0.5)


# ------------------------------------------------------------------------------- edge sparsities


@pytest.mark.parametrize("method", ["snip", "magnitude"])
def test_sparsity_zero_is_identity(method):
    model = _tiny()
    model.eval()
    x, _ = _batch(5)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    out_before = model(x).detach()
    if method == "snip":
        masks = snip_masks(model, F.cross_entropy, _batch(0), 0.0)
    else:
        masks = magnitude_masks(model, 0)
    assert all(bool(m.all()) for m in masks.values())
    apply_masks(model, masks)
    assert torch.equal(model(x).detach(), out_before)
    remove_masks(model)
    after = model.state_dict()
    assert after.keys() == before_state.keys()
    assert all(torch.equal(after[k], v) for k, v in before_state.items())


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.5", True, None])
@pytest.mark.parametrize("method", ["snip", "magnitude"])
def test_invalid_sparsity_raises_one_line_smcp_error(method, bad):
    model = _tiny()
    with pytest.raises(SmcpError) as ei:
        if method == "snip":
            snip_masks(model, F.cross_entropy, _batch(0), bad)
        else:
            magnitude_masks(model, bad)
    msg = str(ei.value)
    assert "sparsity" in msg and "[0, 1)" in msg and "\n" not in msg


# ------------------------------------------------------------------------------- report


def test_sparsity_report_and_speed_note():
    model = _tiny()
    rep = sparsity_report(model)
    assert rep["global"]["zeros"] == 0 and rep["global"]["weights"] == N_TINY
    assert rep["model"]["params"] == sum(p.numel() for p in model.parameters())
    apply_masks(model, magnitude_masks(model, 0.95))
    rep = sparsity_report(model)
    assert rep["model"]["params"] == sum(p.numel() for p in model.parameters())
    assert rep["model"]["nonzero"] == rep["global"]["kept"] + 4 + 4 + 16 + 10  # + biases, BN weight (BN bias is 0)
    assert "no speed-up" in rep["note"] and "95.0%" in rep["note"]
    assert "2:4" in unstructured_speed_note()
    # a layer pruned away entirely is flagged (layer collapse)
    model = _tiny()
    apply_masks(model, {"fc2": torch.zeros(10, 16, dtype=torch.bool)})
    assert sparsity_report(model)["fully_pruned"] == ["fc2"]


# ------------------------------------------------------------------------------- LeNets


def test_lenets_shapes_and_parameter_counts():
    mlp, cnn = lenet_300_100(), lenet5_caffe()
    assert isinstance(mlp, LeNet300100) and isinstance(cnn, LeNet5Caffe)
    assert sum(p.numel() for p in mlp.parameters()) == 266_610
    assert sum(p.numel() for p in cnn.parameters()) == 431_080
    x = torch.randn(2, 1, 28, 28)
    assert mlp(x).shape == (2, 10) and mlp(x.flatten(1)).shape == (2, 10)
    assert cnn(x).shape == (2, 10)
    assert list(prunable_layers(cnn)) == ["conv1", "conv2", "fc1", "fc2"]
    assert list(prunable_layers(mlp)) == ["fc1", "fc2", "fc3"]
    torch.fx.symbolic_trace(cnn)
    torch.fx.symbolic_trace(mlp)
    assert lenet5_caffe(num_classes=3, conv_relu=True)(x).shape == (2, 3)


def test_snip_on_lenet5_prunes_globally_not_per_layer():
    cnn = lenet5_caffe()
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    masks = snip_masks(cnn, F.cross_entropy, (x, y), 0.98)
    per_layer = {n: 1 - float(m.float().mean()) for n, m in masks.items()}
    assert len({round(v, 2) for v in per_layer.values()}) > 1  # one global threshold, uneven per layer
    assert sum(int(m.sum()) for m in masks.values()) == round(0.02 * 430_500)


# ------------------------------------------------------------------------------- idx reader


def _write_idx(path, arr: np.ndarray, code: int, compress: bool = True):
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_idx_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs, 0x08)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, 0x08, compress=False)  # raw works too
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), imgs)
    f32 = rng.standard_normal((2, 3)).astype(np.float32)
    _write_idx(tmp_path / "f.idx", f32, 0x0D)
    assert np.array_equal(read_idx(tmp_path / "f.idx"), f32)

    x, y = load_mnist_like(tmp_path, "test", normalize=False)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.tensor([3, 1, 4, 1, 5]))
    torch.testing.assert_close(x[:, 0], torch.from_numpy(imgs).float() / 255)
    xn, _ = load_mnist_like(tmp_path, "test", dataset="fashion-mnist")
    torch.testing.assert_close(xn, (x - 0.2860) / 0.3530)

    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x08\x03\x00\x00junk"))
    with pytest.raises(SmcpError, match="not an idx file"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(SmcpError, match="header"):
        read_idx(tmp_path / "short")
    with pytest.raises(SmcpError, match="not found"):
        load_mnist_like(tmp_path, "train")
    with pytest.raises(SmcpError, match="split"):
        load_mnist_like(tmp_path, "val")
    _write_idx(tmp_path / "l4", labels[:4], 0x08)
    with pytest.raises(SmcpError, match="5 images but"):
        load_idx_pair(tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "l4")


def test_real_mnist_test_set(shared_data):
    root = shared_data / "mnist"
    if not (root / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST test files not found in {root}")
    x, y = load_mnist_like(root, "test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert y[:5].tolist() == [7, 2, 1, 0, 4]
    assert np.bincount(y.numpy(), minlength=10).min() >= 890
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
