"""EfficientNet-B0 (depthwise convolutions + squeeze-excitation) on CIFAR-10, then pruned (shortened).

torchvision's ``efficientnet_b0`` (``num_classes`` 10) is trained on CIFAR-10 at 32x32 with
``prune.method none``.  The ImageNet weights cannot be downloaded here (no network, not in
``../shared/data``), so it starts from scratch instead of from ImageNet (``--set
model.checkpoint=PATH`` starts from a 10-class state dict of the same model instead).  From the
trained checkpoint, at every kept-FLOPs target of ``--targets`` (default 0.5):

* ``smcp``: the base recipe's SMCP (soft masks, Taylor importance, knapsack).  Depthwise
  convolutions tie their input and output channels (one group with the expand conv before them), and
  the squeeze-excitation convs read and gate the same channels, so every channel decision removes
  the matching depthwise filter, SE input and SE gate together; the SE bottleneck itself is a group
  of its own;
* ``uniform``: the same kept fraction in every group (bisection against the FLOPs budget);
* ``none`` (first target): the trained model fine-tuned for the same epochs.

Each target is one :func:`smcp_core.analysis.compare.compare` (dense and slim models timed interleaved on
onnxruntime CPU at batch 1); top-1 on the 10k JPEG-75 test images and the 1017 exact test images.
Shortened to fit a 2-core CPU: a fixed 10k-image JPEG-75 training subset per epoch,
``--dense-epochs`` (default 10) and ``--epochs`` (default 6) of fine-tuning.

    python benchmarks/efficientnet_cifar.py        # ~20 min on a quiet 2-core CPU

From scratch at 32x32 with the recipe's SGD, 6 epochs reach only ~15 % top-1 (measured): start from
trained weights for a meaningful accuracy comparison.
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
    a = scratch_args("efficientnet_cifar", __doc__, "0.5", "runs/bench_effnet")
    e = a.epochs
    model = ["model.source=torchvision/efficientnet_b0", "model.checkpoint=null", "profile.channel_step=32",
             "prune.channel_round=8", "prune.min_channels=8"]
    dense, prune, ramp = scratch_schedules(a.dense_epochs, 0.05, 5e-5, e)
    res = from_scratch_then_prune(model, dense, prune, a.target_list,
                                  ["smcp", "uniform"], a.out, a.sets)
    res.update({"benchmark": "efficientnet_cifar", "dense_epochs": a.dense_epochs, "epochs": e})
    intro = (f"torchvision `efficientnet_b0` trained on CIFAR-10 (32x32) from scratch for {a.dense_epochs} "
             "epochs of 10k "
             f"JPEG-75 training images, then pruned and fine-tuned for {e} epochs (1 warm-up, {ramp} ramp, "
             f"{e - 1 - ramp} frozen); channel grid 8. Speed-ups measured on onnxruntime CPU at batch 1, timed "
             "interleaved with the dense model.")
    publish("efficientnet_cifar", a.out, res,
            targets_markdown("EfficientNet-B0 on CIFAR-10, pruned (shortened)", intro, res), a.publish)


if __name__ == "__main__":
    main()
