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

Each target is one :func:`smcp_core.compare.compare` (dense and slim models timed interleaved on
onnxruntime CPU at batch 1); top-1 on the 10k JPEG-75 test images and the 1017 exact test images.
Shortened to fit a 2-core CPU: a fixed 10k-image JPEG-75 training subset per epoch,
``--dense-epochs`` (default 10) and ``--epochs`` (default 6) of fine-tuning.

    python benchmarks/efficientnet_cifar.py        # ~20 min on a quiet 2-core CPU

From scratch at 32x32 with the recipe's SGD, 6 epochs reach only ~15 % top-1 (measured): start from
trained weights for a meaningful accuracy comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _cifar_common import from_scratch_then_prune, publish, targets_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="0.5", help="kept FLOPs fractions")
    ap.add_argument("--dense-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=6, help="fine-tune epochs of every pruned run (>= 3)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_effnet"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override for every run")
    ap.add_argument("--publish", action="store_true", help="also write benchmarks/results/efficientnet_cifar.{json,md}")
    a = ap.parse_args()
    e = a.epochs
    ramp = max(1, (e - 1) // 2)
    model = ["model.source=torchvision/efficientnet_b0", "model.checkpoint=null", "profile.channel_step=32",
             "prune.channel_round=8", "prune.min_channels=8"]
    dense = [f"prune.epochs={a.dense_epochs}", "prune.warmup_epochs=0", "prune.ramp_epochs=0",
             f"prune.cooldown_epochs={a.dense_epochs}", "prune.optimizer.lr=0.05", "prune.optimizer.weight_decay=5e-5"]
    prune = [f"prune.epochs={e}", "prune.warmup_epochs=1", f"prune.ramp_epochs={ramp}",
             f"prune.cooldown_epochs={e - 1 - ramp}", "prune.optimizer.lr=0.01", "prune.target_margin=0"]
    res = from_scratch_then_prune(model, dense, prune, [float(x) for x in a.targets.split(",") if x.strip()],
                                  ["smcp", "uniform"], a.out, a.sets)
    res.update({"benchmark": "efficientnet_cifar", "dense_epochs": a.dense_epochs, "epochs": e})
    intro = (f"torchvision `efficientnet_b0` trained on CIFAR-10 (32x32) from scratch for {a.dense_epochs} epochs of 10k "
             f"JPEG-75 training images, then pruned and fine-tuned for {e} epochs (1 warm-up, {ramp} ramp, "
             f"{e - 1 - ramp} frozen); channel grid 8. Speed-ups measured on onnxruntime CPU at batch 1, timed "
             "interleaved with the dense model.")
    publish("efficientnet_cifar", a.out, res,
            targets_markdown("EfficientNet-B0 on CIFAR-10, pruned (shortened)", intro, res), a.publish)


if __name__ == "__main__":
    main()
