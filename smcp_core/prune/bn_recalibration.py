"""Batch-norm recalibration after mask changes (``prune.bn_recalibration_batches``).

Masks zero input channels in the forward pass (:mod:`smcp_core.prune.masking`).  The running mean
and variance a batch norm collected before a mask change describe activations that no longer occur,
so an eval-mode forward (validation, the saved model) normalises with the wrong statistics: on the
quickstart, validation top-1 fell to ~10 % at the end of the budget ramp while train-mode top-1
(batch statistics) stayed above 70 %.  :func:`recalibrate_bn` resets every batch norm's running
statistics and re-estimates them as a cumulative average (``momentum=None``) over a few training
batches in train mode, under ``torch.no_grad()``.  Weights, gradients and the optimizer are not
touched; torch's global RNG (which augmentation and dropout draw from) is saved and restored, so the
training run's batches are the same with and without recalibration; each batch norm's momentum and
the model's train/eval mode are restored.

Data parallel: every rank runs the same number of batches of its own shard through the plain
module (never the DDP wrapper, whose forward would broadcast rank 0's buffers at every batch);
under ``sync_bn`` each forward already reduces the batch statistics over the ranks.  The running
mean and variance are then averaged over the ranks (the usual "reduce" of distributed batch norm),
so every rank holds identical statistics.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from smcp_core.utils import dist


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch norms of ``model`` that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, n_batches: int, *, device: torch.device | str = "cpu",
                   channels_last: bool = False) -> int:
    """Re-estimate the running statistics of every batch norm of ``model`` (as it is masked now)
    from the first ``n_batches`` of ``batches`` (``(x, y)`` pairs); returns the number of batches
    used (0: nothing changed, e.g. ``n_batches`` is 0, the model has no batch norm or
    ``batches`` is empty).  Under DDP every rank must pass the same number of batches."""
    module = _unwrap(model)
    bns = batchnorms(module)
    if n_batches <= 0 or not bns:
        return 0
    device = torch.device(device)
    saved = [(bn.momentum, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in bns]
    was_training = module.training
    rng = _rng_state(device)
    used = 0
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches below
        module.train()
        for x, *_ in batches:
            if used >= n_batches:
                break
            x = x.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            module(x)
            used += 1
    finally:
        for bn, (momentum, mean, var, count) in zip(bns, saved):
            bn.momentum = momentum
            if used == 0:  # no batch: the old statistics are better than none
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
        module.train(was_training)
        _set_rng_state(rng, device)
    if used and dist.active():
        for bn in bns:
            dist.all_reduce_mean_(bn.running_mean)
            dist.all_reduce_mean_(bn.running_var)
    return used
