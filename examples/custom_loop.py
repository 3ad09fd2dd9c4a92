"""Prune a model inside your own training loop with smcp's Python API.

    python examples/custom_loop.py --smoke    # seconds: random data, a FLOPs target, no profiling (the tests run it)
    python examples/custom_loop.py            # CIFAR-10 ResNet-20 from ../shared/data, 1.5x on onnxruntime CPU

The loop below is plain PyTorch; the smcp calls are marked ``# smcp``.  Without ``--smoke`` it
profiles the layers on onnxruntime CPU, fine-tunes the pretrained CIFAR-10 ResNet-20 of
``../shared/data`` (random weights and random data when that folder is missing: the speed-up is
then real, the accuracy meaningless) to a measured 1.5x, with the closed loop at the end of the
pruning window, and exits 1 if the measured speed-up misses the target.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from smcp_core import api
from smcp_core.models.cifar_resnet import cifar_resnet

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def cifar_or_random(smoke: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(train x, train y, test x, test y, real): the exact CIFAR-10 subset when present, else random."""
    npz = DATA / "cifar10" / "cifar10_exact_subset.npz"
    if npz.exists() and not smoke:
        d = np.load(npz)

        def images(a: np.ndarray) -> torch.Tensor:
            return (torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD

        return (images(d["train_x"]), torch.from_numpy(d["train_y_all"][d["train_idx"]]).long(),
                images(d["test_x"]), torch.from_numpy(d["test_y_all"][d["test_idx"]]).long(), True)
    g = torch.Generator().manual_seed(0)
    n = 64 if smoke else 2048
    return (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g),
            torch.randn(n // 4, 3, 32, 32, generator=g), torch.randint(0, 10, (n // 4,), generator=g), False)


def pretrained_resnet20(smoke: bool) -> torch.nn.Module:
    model = cifar_resnet("resnet20", num_classes=10)
    ck = DATA / "models" / "resnet20-12fca82f.th"
    if ck.exists() and not smoke:
        sd = torch.load(ck, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    return model


@torch.no_grad()
def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum()) for i in range(0, len(x), 256))
    model.train(was)
    return 100.0 * correct / len(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny run on random data (seconds)")
    ap.add_argument("--speedup", type=float, default=1.5)
    ap.add_argument("--out", type=Path, default=None,
                    help="where model.onnx goes (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    xtr, ytr, xte, yte, real = cifar_or_random(args.smoke)
    model = pretrained_resnet20(args.smoke)
    example = xtr[:1]
    steps, batch = (12, 16) if args.smoke else (600, 64)

    graph = api.channel_graph(model, example)                                   # smcp
    schedule = api.StepSchedule(warmup=steps // 6, ramp=steps // 2, update_every=max(1, steps // 12))
    if args.smoke:  # no latency table: a FLOPs target keeps the smoke run to seconds
        pruner = api.pruner(model, graph, flops_ratio=0.6, schedule=schedule)   # smcp
    else:
        table = api.profile(model, graph, example)                              # smcp: latency table
        pruner = api.pruner(model, graph, table, speedup=args.speedup, schedule=schedule,  # smcp
                            config={"layer_pruning": True}, example=example)    # example: the closed loop
        print(f"dense: {table.model['measured_ms']:.3f} ms on onnxruntime CPU")
    print(f"dense top-1 {top1(model, xte, yte):.2f} %" + ("" if real else " (random data)"))

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(1)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        x, y = xtr[idx], ytr[idx]
        if real:
            x = torch.where(torch.rand(batch, 1, 1, 1, generator=g) < 0.5, x.flip(3), x)  # horizontal flip
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        pruner.before_step()                                                    # smcp: importance, pruned decay
        opt.step()
        row = pruner.after_step()                                               # smcp: masks on the schedule
        sched.step()
        if row is not None:
            print(f"step {step + 1}: mask update, {row['kept_classes']}/{graph.n_classes} channel classes kept, "
                  f"predicted {row['predicted']:.4g} {pruner.cost.unit}")
    slim = api.slim(model, pruner)                                              # smcp
    masked_top1, slim_top1 = top1(model, xte, yte), top1(slim, xte, yte)
    with tempfile.TemporaryDirectory(prefix="smcp-example-") as tmp:
        parity = api.export_onnx(slim, example, (args.out or Path(tmp)) / "model.onnx")  # smcp
    print(f"pruned: top-1 {slim_top1:.2f} % (masked model {masked_top1:.2f} %); ONNX {parity['path']} "
          f"(max |diff| {parity['max_abs_diff']:.2g})")
    if args.smoke:
        return 0
    meas = api.measure_speedup(model, slim, example, target=args.speedup)      # smcp: paired rounds, as the gate
    print(f"measured speed-up {meas.speedup.median:.2f}x (90 % interval {meas.speedup.lo:.2f}-"
          f"{meas.speedup.hi:.2f}x): {meas.verdict.reason}")
    return 0 if meas.verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
