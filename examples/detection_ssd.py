"""Prune a detector's backbone with the detector's own loss: an SSD with a ResNet-50 backbone (or
torchvision's SSDlite), to a measured latency target of the whole deployed detector.

    python examples/detection_ssd.py --smoke                        # seconds (the tests run it)
    python examples/detection_ssd.py --detector ssd_resnet50 --size 128 --speedup 1.5
    python examples/detection_ssd.py --detector ssdlite --size 160 --speedup 1.3

Data: a generated shapes data set (:mod:`smcp_core.data.shapes`; no real detection set can be
downloaded here), so mAP says whether pruning kept what the detector learnt, not how it does on
natural images.  The "whole detector" timed on onnxruntime CPU is backbone + heads
(:class:`~smcp_core.models.detection.DetectorCore`, what is deployed); anchor decoding and NMS
follow it unchanged.  Without ``--smoke`` the run trains the dense detector from scratch, measures
its mAP, profiles, prunes (with the closed loop) while training on, and reports mAP, the measured
speed-up, and whether the slim detector's boxes, scores and labels equal the masked detector's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from smcp_core import api
from smcp_core.data.shapes import CLASSES, shapes_dataset
from smcp_core.models.detection import DetectorCore, ssd_resnet50
from smcp_core.utils.tv import import_torchvision


def build(name: str, size: int) -> torch.nn.Module:
    if name == "ssd_resnet50":
        return ssd_resnet50(size=size, num_classes=len(CLASSES))
    det = import_torchvision().models.detection
    m = det.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=len(CLASSES))
    m.transform.min_size, m.transform.max_size = (size,), size  # the input size is a parameter
    return m


def train(det: torch.nn.Module, data: list, steps: int, *, lr: float, pruner=None, batch: int = 8,
          seed: int = 0) -> None:
    """``steps`` SGD steps of the detector's own loss (``det(images, targets)``), with the pruner's
    calls around each optimizer step when given."""
    opt = torch.optim.SGD([p for p in det.parameters() if p.requires_grad], lr=lr, momentum=0.9, weight_decay=4e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    det.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g).tolist()
        losses = det([data[i][0] for i in idx], [data[i][1] for i in idx])
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(det.parameters(), 10.0)
        if pruner is not None:
            pruner.before_step()
        opt.step()
        if pruner is not None:
            pruner.after_step()
        sched.step()


@torch.no_grad()
def detect(det: torch.nn.Module, images: list) -> list[dict]:
    det.eval()
    return [o for i in range(0, len(images), 16) for o in det(images[i:i + 16])]


def mean_ap(det: torch.nn.Module, data: list) -> float:
    """COCO-style mAP@[.5:.95] (torchmetrics, pycocotools backend) in %."""
    from torchmetrics.detection import MeanAveragePrecision  # the detection extra

    metric = MeanAveragePrecision(iou_type="bbox")
    metric.update(detect(det, [d[0] for d in data]), [d[1] for d in data])
    return 100.0 * float(metric.compute()["map"])


def same_detections(a: list[dict], b: list[dict], *, box_px: float = 1e-2, score: float = 1e-4) -> dict:
    """How far two detectors' outputs are apart, order-independently: every detection of ``a`` is
    matched to one of ``b`` with the same label, its box within ``box_px`` pixels and its score
    within ``score``.  Detections left unmatched are only allowed where the two score lists tie
    (scores within ``score`` of each other swap places in NMS and in the top-k cut)."""
    unmatched, ties_only, box_max, score_max, n = 0, True, 0.0, 0.0, 0
    for x, y in zip(a, b):
        free = list(range(len(y["labels"])))
        for i in range(len(x["labels"])):
            n += 1
            cands = [j for j in free if int(y["labels"][j]) == int(x["labels"][i])
                     and float((x["boxes"][i] - y["boxes"][j]).abs().max()) <= box_px
                     and abs(float(x["scores"][i] - y["scores"][j])) <= score]
            if not cands:
                unmatched += 1
                # a tie: another detection of either list has (almost) the same score
                s_i = float(x["scores"][i])
                near = [t for t in list(x["scores"][:i]) + list(x["scores"][i + 1:]) + list(y["scores"])
                        if abs(float(t) - s_i) <= score]
                ties_only = ties_only and bool(near)
                continue
            j = cands[0]
            free.remove(j)
            box_max = max(box_max, float((x["boxes"][i] - y["boxes"][j]).abs().max()))
            score_max = max(score_max, abs(float(x["scores"][i] - y["scores"][j])))
    return {"detections": n, "unmatched": unmatched, "unmatched_are_ties": ties_only,
            "max_box_diff_px": box_max, "max_score_diff": score_max}


def core_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    """Max difference of two detectors' backbone + head outputs (what is deployed) relative to the
    first's scale."""
    with torch.no_grad():
        ra, rb = DetectorCore(a).eval()(x), DetectorCore(b).eval()(x)
    return float((ra - rb).abs().max() / ra.abs().max().clamp_min(1e-12))


def run(detector: str = "ssd_resnet50", *, size: int = 128, speedup: float = 1.5, dense_steps: int = 300,
        prune_steps: int = 300, n_train: int = 512, n_test: int = 128, profile_seconds: float = 300.0,
        smoke: bool = False) -> dict:
    """One detection row: dense training, profile, prune + fine-tune, measurements."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    det = build(detector, size)
    train_set, test_set = shapes_dataset(n_train, size=size, seed=0), shapes_dataset(n_test, size=size, seed=1)
    train(det, train_set, dense_steps, lr=0.02)
    row = {"detector": detector, "size": size, "target_speedup": speedup, "dense_steps": dense_steps,
           "prune_steps": prune_steps, "data": f"generated shapes ({n_train} train / {n_test} test images)"}
    if not smoke:
        row["map_dense"] = mean_ap(det, test_set)
    core = DetectorCore(det)
    x = det.transform([test_set[0][0]])[0].tensors  # the normalised, resized batch the backbone sees
    graph = api.channel_graph(core, x, submodule="backbone")
    schedule = api.StepSchedule(warmup=prune_steps // 10, ramp=prune_steps // 2, update_every=max(1, prune_steps // 10))
    if smoke:
        pruner = api.pruner(core, graph, flops_ratio=0.6, schedule=schedule)
    else:
        table = api.profile(core, graph, x, max_seconds=profile_seconds)
        pruner = api.pruner(core, graph, table, speedup=speedup, schedule=schedule, example=x,
                            config={"min_channels": 8})
    train(det, train_set, prune_steps, lr=0.01, pruner=pruner, seed=1)
    det.eval()
    slim_det = api.slim(core, pruner).put_into(copy.deepcopy(det))  # the masked detector's backbone, slimmed
    images = [d[0] for d in test_set[:16]]
    batch = det.transform(images)[0].tensors
    row["slim_equals_masked"] = {"core_max_rel_diff": core_diff(det, slim_det, batch),
                                 **same_detections(detect(det, images), detect(slim_det, images))}
    with tempfile.TemporaryDirectory(prefix="smcp-detection-") as tmp:
        parity = api.export_onnx(DetectorCore(slim_det), x, Path(tmp) / "detector.onnx")
    row["onnx_max_rel_diff"] = parity["max_rel_diff"]
    row["kept_classes"] = [int(pruner.keep().sum()), graph.n_classes]
    if not smoke:
        row["map_pruned"] = mean_ap(slim_det, test_set)
        meas = api.measure_speedup(DetectorCore(det), DetectorCore(slim_det), x, target=speedup)
        row.update(dense_ms=meas.timing.stats()[0].median_ms, slim_ms=meas.timing.stats()[1].median_ms,
                   speedup=meas.speedup.median, speedup_interval=[meas.speedup.lo, meas.speedup.hi],
                   verdict=meas.verdict.reason, passed=meas.verdict.passed,
                   closed_loop=[{k: r[k] for k in ("round", "measured_ms", "target_ms", "met")}
                                for r in pruner.history if r.get("event") == "closed_loop"])
    row["seconds"] = time.perf_counter() - t0
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="seconds: tiny sizes, a FLOPs target, no mAP or timing")
    ap.add_argument("--detector", choices=["ssd_resnet50", "ssdlite"], default="ssd_resnet50")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--speedup", type=float, default=1.5)
    ap.add_argument("--dense-steps", type=int, default=300)
    ap.add_argument("--prune-steps", type=int, default=300)
    args = ap.parse_args(argv)
    if args.smoke:
        row = run(args.detector, size=64, dense_steps=1, prune_steps=2, n_train=8, n_test=4, smoke=True)
    else:
        row = run(args.detector, size=args.size, speedup=args.speedup, dense_steps=args.dense_steps,
                  prune_steps=args.prune_steps)
    print(json.dumps(row, indent=1))
    same = row["slim_equals_masked"]
    ok = same["core_max_rel_diff"] < 1e-4 and same["unmatched_are_ties"] and row["onnx_max_rel_diff"] < 1e-3
    return 0 if ok and (args.smoke or row["passed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
