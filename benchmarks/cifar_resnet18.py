"""SMCP on ResNet-18 / CIFAR-10 at several pruning ratios, plus the no-warm-up ablation (shortened).

There is no pretrained CIFAR ResNet-18 in ``../shared/data`` and no network, so the script first
trains torchvision's ``resnet18`` (``num_classes`` 10, ImageNet stem: stride-2 conv + max-pool, so a
32x32 image is 8x8 after the stem -- ~37 MMAC instead of the 0.56 GMAC of the CIFAR-stem variant,
which a 2-core CPU cannot train in minutes) from scratch with ``prune.method none``.  From that
checkpoint it then runs, with one fine-tune schedule (``--epochs``: 1 warm-up epoch, the budget ramp,
the rest frozen):

* ``smcp`` (the base recipe: soft masks, Taylor importance, knapsack, layer pruning) at every FLOPs
  target of ``--targets`` (kept FLOPs fractions; default 0.7, 0.5, 0.3);
* ``none`` (the dense model fine-tuned for the same epochs) as reference;
* the ablation ``no_warmup``: smcp at the middle target with no warm-up epoch (masks from the first
  step; the epoch goes to the frozen cooldown, so the total stays the same).

Every target is one :func:`smcp_core.analysis.compare.compare`, so speed-ups are measured (dense and slim
models timed interleaved on onnxruntime CPU at batch 1).  FLOPs targets need no latency table (a
ResNet-18 table takes long to profile on a 2-core CPU); the recipes with ``prune.target.speedup``
work the same way.  Top-1 on the 10k JPEG-75 test images and the 1017 exact test images.

Shortened to fit a CPU: a fixed 10k-image JPEG-75 training subset per epoch, ``--dense-epochs``
(default 10) from scratch and ``--epochs`` (default 6) of fine-tuning; the published schedules are
hundreds of epochs on the full training set, so absolute accuracies are far lower.

    python benchmarks/cifar_resnet18.py            # ~25 min on a quiet 2-core CPU
"""

from __future__ import annotations

from _cifar_common import (
    from_scratch_then_prune,
    publish,
    scratch_args,
    scratch_schedules,
    targets_markdown,
)


def main() -> None:
    a = scratch_args("cifar_resnet18", __doc__, "0.7,0.5,0.3", "runs/bench_rn18")
    e = a.epochs
    model = ["model.source=torchvision/resnet18", "model.checkpoint=null", "profile.channel_step=32"]
    dense, prune, ramp = scratch_schedules(a.dense_epochs, 0.1, 5e-4, e)
    ablations = {"no_warmup": ["prune.warmup_epochs=0", f"prune.cooldown_epochs={e - ramp}"]}
    res = from_scratch_then_prune(model, dense, prune, a.target_list,
                                  ["smcp"], a.out, a.sets, ablations=ablations)
    res.update({"benchmark": "cifar_resnet18", "dense_epochs": a.dense_epochs, "epochs": e})
    intro = (f"torchvision `resnet18` (ImageNet stem) trained from scratch for {a.dense_epochs} epochs of 10k JPEG-75 "
             f"CIFAR-10 training images, then pruned with SMCP and fine-tuned for {e} epochs (1 warm-up, {ramp} ramp, "
             f"{e - 1 - ramp} frozen); `no_warmup` = 0 warm-up, {e - ramp} frozen. Speed-ups measured on onnxruntime "
             "CPU at batch 1, each target's models timed interleaved with the dense model.")
    publish("cifar_resnet18", a.out, res, targets_markdown("SMCP on ResNet-18 / CIFAR-10 (shortened)", intro, res),
            a.publish)


if __name__ == "__main__":
    main()
