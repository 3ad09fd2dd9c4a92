"""Prune while PyTorch Lightning trains: smcp's Lightning callback.

    python examples/lightning_callback.py --smoke   # seconds: random data, a FLOPs target (the tests run it)
    python examples/lightning_callback.py           # CIFAR-10 ResNet-20 from ../shared/data, 1.5x on onnxruntime CPU

Needs the ``lightning`` extra (``pip install -e ".[lightning]"``).  The LightningModule is
ordinary; the callback builds the channel graph, the latency table and the pruner in ``setup``
and does the pruning bookkeeping around every optimizer step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from smcp_core import api
from smcp_core.integrations.lightning import SMCPCallback, pl  # (imports lightning after torchvision's schemas)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from custom_loop import cifar_or_random, pretrained_resnet20, top1  # noqa: E402  (the same data and model)


class Classifier(pl.LightningModule):
    def __init__(self, net: torch.nn.Module, steps: int) -> None:
        super().__init__()
        self.net = net
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=0.1)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny run on random data (seconds)")
    ap.add_argument("--speedup", type=float, default=1.5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    xtr, ytr, xte, yte, real = cifar_or_random(args.smoke)
    steps, batch = (12, 16) if args.smoke else (600, 64)
    module = Classifier(pretrained_resnet20(args.smoke), steps)
    example = xtr[:1]
    schedule = api.StepSchedule(warmup=steps // 6, ramp=steps // 2, update_every=max(1, steps // 12))
    target = {"flops_ratio": 0.6} if args.smoke else {"speedup": args.speedup, "config": {"layer_pruning": True}}
    smcp = SMCPCallback(example=example, schedule=schedule, submodule="net", **target)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr, ytr), batch_size=batch, shuffle=True,
                                         drop_last=True)
    with tempfile.TemporaryDirectory(prefix="smcp-lightning-") as tmp:
        trainer = pl.Trainer(max_steps=steps, callbacks=[smcp], accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
        trainer.fit(module, loader)
        slim = smcp.slim(module)
        parity = api.export_onnx(slim, example, Path(tmp) / "model.onnx")
        updates = [r for r in smcp.pruner.history if r.get("event") == "mask_update"]
        print(f"{len(updates)} mask updates; kept {int(smcp.pruner.keep().sum())}/{smcp.pruner.graph.n_classes} "
              f"channel classes; top-1 {top1(slim, xte, yte):.2f} % (masked {top1(module, xte, yte):.2f} %)"
              + ("" if real else " on random data") + f"; ONNX parity max |diff| {parity['max_abs_diff']:.2g}")
    if args.smoke:
        return 0
    meas = api.measure_speedup(module, slim, example, target=args.speedup)
    print(f"measured speed-up {meas.speedup.median:.2f}x: {meas.verdict.reason}")
    return 0 if meas.verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
