"""prune.bn_recalibration_batches: batch-norm running statistics re-estimated after mask changes.

The must-show: a small conv + BN net trained on scikit-learn's digits loses most of its validation
top-1 when half of a group's channels are masked (stale running statistics), and recalibration brings
it back to what the masked weights can do.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from smcp_core.config.recipe import load_recipe
from smcp_core.data import make_loader
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.profile.cost_model import CostModel
from smcp_core.prune.bn_recalibration import batchnorms, recalibrate_bn
from smcp_core.prune.masking import Masker
from smcp_core.prune.trainer import CHECKPOINT, PruneTrainer


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    yield


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(1, 16), *block(16, 16), *block(16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits (the ``digits`` data source), read from its CSV without importing
    scikit-learn (3 s on a busy 2-core machine)."""
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.exists():
        data = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        return torch.from_numpy(data[:, :-1]).view(-1, 8, 8), torch.from_numpy(data[:, -1]).long()
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32), torch.tensor(d.target)


@pytest.fixture(scope="module")
def digits():
    """The 8x8 digits, normalised: (train x, train y, val x, val y)."""
    x, y = _load_digits()
    x = x.unsqueeze(1)
    x = (x - x.mean()) / x.std()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:1200], perm[1200:]
    return x[tr], y[tr], x[va], y[va]


@pytest.fixture(scope="module")
def trained(digits):
    """The net trained dense for 3 epochs (deterministic; the last at a tenth of the learning rate so that
    the running statistics settle), its graph and masker, and the state dict to reset to."""
    xt, yt, _, _ = digits
    model = _net()
    graph = ChannelGraph(model, xt[:1])
    masker = Masker(model, graph, mode="soft")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    model.train()
    for epoch in range(3):
        for group in opt.param_groups:
            group["lr"] = 0.1 if epoch < 2 else 0.01
        p = torch.randperm(len(xt), generator=g)
        for i in range(0, len(p), 64):
            b = p[i:i + 64]
            loss = F.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, graph, masker, copy.deepcopy(model.state_dict())


@pytest.fixture()
def net(trained):
    model, graph, masker, state = trained
    model.load_state_dict(state)
    masker.set_keep(graph.full_keep())
    model.train()
    return model, graph, masker


def _top1(model, x, y, *, batch_stats: bool = False) -> float:
    was = model.training
    model.train(batch_stats)  # batch statistics of the whole set: what the masked weights can do
    with torch.no_grad():
        acc = 100.0 * float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


def _batches(x, y, n, bs=64):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n * bs, bs)]


def _mask_half_of_group(graph, masker, consumer: str) -> None:
    group = graph.groups[graph.layer(consumer).group]
    keep = graph.full_keep()
    keep[group.classes[: group.size // 2]] = False
    masker.set_keep(keep)


def test_recalibration_brings_val_top1_back_after_a_mask_change(net, digits):
    model, graph, masker = net
    xt, yt, xv, yv = digits
    dense = _top1(model, xv, yv)
    _mask_half_of_group(graph, masker, "3")  # half the inputs of the second conv
    capable = _top1(model, xv, yv, batch_stats=True)
    stale = _top1(model, xv, yv)
    assert dense > 60 and capable > 60  # (measured: 90.6 dense, 78.6 masked with fresh statistics)
    assert stale < dense - 35 and stale < capable - 35  # stale statistics: it falls (measured 12.6)
    used = recalibrate_bn(model, _batches(xt, yt, 8), 8)
    recal = _top1(model, xv, yv)
    assert used == 8
    assert recal > stale + 35 and recal > capable - 5  # back (measured 79.4)


def test_weights_rng_momentum_and_mode_are_unchanged(net, digits):
    model, graph, masker = net
    xt, yt, _, _ = digits
    _mask_half_of_group(graph, masker, "6")
    model.eval()
    for m in batchnorms(model)[:1]:
        m.momentum = 0.3
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expect_next = torch.rand(5)
    torch.set_rng_state(state)

    def noisy():  # augmentation that draws from torch's global RNG, like the data transforms
        for x, y in _batches(xt, yt, 4):
            yield x + 0.1 * torch.randn_like(x), y

    before = [bn.running_mean.clone() for bn in batchnorms(model)]
    assert recalibrate_bn(model, noisy(), 4) == 4
    assert torch.equal(torch.rand(5), expect_next)  # the training run's RNG stream goes on unchanged
    assert not model.training
    assert [bn.momentum for bn in batchnorms(model)] == [0.3, 0.1, 0.1]
    assert all(int(bn.num_batches_tracked) == 4 for bn in batchnorms(model))
    assert not torch.equal(before[1], batchnorms(model)[1].running_mean)
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), params[k]), k
        assert torch.equal(p.grad, torch.ones_like(p)), k
    model.train()
    assert recalibrate_bn(model, noisy(), 2) == 2 and model.training
    batchnorms(model)[0].momentum = 0.1


def test_zero_batches_and_an_empty_loader_change_nothing(net, digits):
    model, graph, masker = net
    xt, yt, _, _ = digits
    _mask_half_of_group(graph, masker, "3")
    state = copy.deepcopy(model.state_dict())
    assert recalibrate_bn(model, _batches(xt, yt, 4), 0) == 0
    assert recalibrate_bn(model, [], 8) == 0
    assert recalibrate_bn(nn.Sequential(nn.Linear(2, 2)), [(torch.zeros(1, 2), None)], 8) == 0  # no BN
    after = model.state_dict()
    for k, v in state.items():
        assert torch.equal(v, after[k]), k
    assert all(bn.momentum == 0.1 for bn in batchnorms(model))


def test_a_ddp_style_wrapper_is_unwrapped(net, digits):
    model, graph, masker = net
    xt, yt, _, _ = digits
    _mask_half_of_group(graph, masker, "3")

    class Wrapper(nn.DataParallel):  # DataParallel without devices: .module like DDP's
        def __init__(self, module):
            nn.Module.__init__(self)
            self.module = module

        def forward(self, *a):
            raise AssertionError("recalibration must run the plain module")

    assert recalibrate_bn(Wrapper(model), _batches(xt, yt, 2), 2) == 2
    assert int(batchnorms(model)[0].num_batches_tracked) == 2
    # prune.sync_bn's SyncBatchNorm is a batch norm too (one process here: no reduction)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert len(batchnorms(sync)) == 3 and recalibrate_bn(sync, _batches(xt, yt, 2), 2) == 2
    for a, b in zip(batchnorms(sync), batchnorms(model)):
        assert torch.allclose(a.running_var, b.running_var) and a.momentum == 0.1


# ---------------------------------------------------------------------------------------- trainer
def _trainer_run(out: Path, digits, batches: int):
    xt, yt, xv, yv = digits
    recipe = load_recipe("quickstart", [
        "data.batch_size=32", "prune.epochs=4", "prune.warmup_epochs=1", "prune.ramp_epochs=2",
        "prune.cooldown_epochs=1", "prune.max_steps=4", "prune.update_interval_samples=64",
        "prune.target.flops_ratio=0.5", f"prune.bn_recalibration_batches={batches}"])
    model = _net(3)
    graph = ChannelGraph(model, xt[:1])
    cost = CostModel(graph, "flops")
    trainer = PruneTrainer(recipe=recipe, model=model, graph=graph, cost=cost,
                           target_cost=0.5 * cost.total(graph.full_keep()),
                           train_set=TensorDataset(xt[:256], yt[:256]), val_set=TensorDataset(xv[:128], yv[:128]),
                           out_dir=out, make_loader=make_loader)
    torch.manual_seed(5)
    res = trainer.run()
    res.history = list(res.history)  # (the trainer's own list grows if finish() is called again)
    return trainer, res


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits):
    """A short PruneTrainer run with 2 recalibration batches and the same run with recalibration off."""
    out = tmp_path_factory.mktemp("recal")
    return _trainer_run(out / "on", digits, 2), _trainer_run(out / "off", digits, 0), out


def test_trainer_recalibrates_after_mask_changes_without_changing_the_training(runs):
    (on_trainer, on), (_, off), out = runs
    recal = [r for r in on.history if r.get("event") == "bn_recalibration"]
    assert not any(r.get("event") == "bn_recalibration" for r in off.history)
    # after the ramp's mask updates (epochs 1, 2), before their evaluations; none in warm-up or cooldown,
    # none in finish() (nothing changed since the last epoch's)
    assert [r["epoch"] for r in recal] == [1, 2] and all(r["batches"] == 2 for r in recal)
    assert not on_trainer.bn_stale
    assert torch.load(out / "on" / CHECKPOINT, weights_only=False)["bn_stale"] is False
    # the same training: masks, losses and weights; only the BN running statistics differ
    assert torch.equal(on.keep, off.keep) and not bool(on.keep.all())

    def strip(h):
        return [{k: v for k, v in r.items() if k not in ("seconds", "solve_ms", "top1")} for r in h
                if r.get("event") != "bn_recalibration"]

    assert strip(on.history) == strip(off.history)
    differ = [k for k in on.state_dict if not torch.equal(on.state_dict[k], off.state_dict[k])]
    assert differ and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in differ)


def test_finish_recalibrates_when_the_masks_changed_after_the_last_evaluation(runs):
    (trainer, _), (off_trainer, _), _ = runs
    for t in (trainer, off_trainer):
        t.bn_stale = True  # as after finish()'s own mask update (a target changed on resume)
        t.val_loader = None
        n = len(t.history)
        t.finish()
        assert [r["event"] for r in t.history[n:]] == (["bn_recalibration"] if t is trainer else [])
    assert not trainer.bn_stale and off_trainer.bn_stale  # (0 = off: nothing done)
