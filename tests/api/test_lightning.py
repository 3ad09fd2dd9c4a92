"""The Lightning callback: the pruner counts optimizer steps (not batches), and a fit resumed from a
Lightning checkpoint continues the pruner where it stopped."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from smcp_core import api
from smcp_core.models.cifar_resnet import cifar_resnet

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                reason="the lightning extra is not installed")

SCHEDULE = api.StepSchedule(warmup=1, ramp=5, update_every=2)


def _fit(max_steps: int, *, ckpt_in=None, ckpt_out=None, accumulate: int = 1):
    from smcp_core.integrations.lightning import SMCPCallback, pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = cifar_resnet("resnet20", num_classes=4)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    pl.seed_everything(0, verbose=False)
    module = Module()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 16, 16, generator=g),
                                          torch.randint(0, 4, (32,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)  # 4 batches: one epoch per 4 steps
    smcp = SMCPCallback(example=torch.randn(1, 3, 16, 16), flops_ratio=0.6, schedule=SCHEDULE, submodule="net")
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[smcp], accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accumulate_grad_batches=accumulate)
    trainer.fit(module, loader, ckpt_path=ckpt_in)
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)
    return trainer, smcp


def test_the_pruner_counts_optimizer_steps_under_gradient_accumulation():
    trainer, smcp = _fit(4, accumulate=2)  # 8 batches, 4 optimizer steps
    assert trainer.global_step == smcp.pruner.steps == 4
    assert [r["step"] for r in smcp.pruner.history if r["event"] == "mask_update"] == [3]


def test_a_resumed_fit_continues_the_pruner_where_it_stopped(tmp_path):
    """The checkpoint's pruner state comes back as it was saved, and the resumed fit updates the
    masks at the schedule's steps, as an uninterrupted fit does.  (Its masks may still differ: Lightning restarts an
    epoch it stopped in with a different batch order, which is Lightning's resume, not smcp's.)"""
    _, first = _fit(4, ckpt_out=tmp_path / "half.ckpt")
    _, restored = _fit(4, ckpt_in=tmp_path / "half.ckpt")  # nothing left to train: the state as loaded
    assert restored.pruner.steps == first.pruner.steps == 4 and not restored.pruner.frozen
    assert torch.equal(restored.pruner.keep(), first.pruner.keep()) and not bool(first.pruner.keep().all())
    assert torch.equal(restored.pruner.tracker.acc, first.pruner.tracker.acc)
    assert restored.pruner.history == first.pruner.history
    trainer, resumed = _fit(8, ckpt_in=tmp_path / "half.ckpt")
    assert trainer.global_step == resumed.pruner.steps == 8 and resumed.pruner.frozen
    # the schedule's steps (warm-up 1, ramp 5, every 2: 3, 5 and the window's end 6), as a fit without a stop
    assert [r["step"] for r in resumed.pruner.history] == [3, 5, 6]
