"""Detection through the Python API: SSD-ResNet-50 and torchvision's SSDlite pruned with their own
loss to a measured speed-up of the whole deployed detector (backbone + heads) on onnxruntime CPU.

    python benchmarks/detection.py                       # both detectors (SSD-ResNet-50: 24 min on 2 busy cores)
    python benchmarks/detection.py --only ssdlite --dense-steps 200 --prune-steps 200

Each row: mAP@[.5:.95] before (dense, trained from scratch on the generated shapes set) and after
(pruned and fine-tuned for the same number of steps), the measured speed-up (paired rounds, 90 %
interval) and whether the slim detector's boxes/scores/labels equal the masked one's.  Results go
to benchmarks/results/detection.json; the README's table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
from detection_ssd import run  # noqa: E402

SETTINGS = {"ssd_resnet50": {"size": 96, "speedup": 1.5}, "ssdlite": {"size": 128, "speedup": 1.3}}


def _equality(eq: dict) -> str:
    """The slim == masked cell; rows recorded before detections were matched order-independently
    carry ``labels_equal`` instead of ``unmatched``."""
    same = eq["unmatched"] == 0 if "unmatched" in eq else eq["labels_equal"]
    return f"labels equal, boxes within {eq['max_box_diff_px']:.1g} px |" if same else "DIFFER |"


def table(rows: list[dict]) -> str:
    lines = ["| detector | input | target | measured speed-up (90 % interval) | mAP dense | mAP pruned "
             "| slim == masked |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        eq = r["slim_equals_masked"]
        lines.append(f"| {r['detector']} | {r['size']} px | {r['target_speedup']}x | {r['speedup']:.2f}x "
                     f"({r['speedup_interval'][0]:.2f}-{r['speedup_interval'][1]:.2f}) | {r['map_dense']:.1f} | "
                     f"{r['map_pruned']:.1f} | " + _equality(eq))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(SETTINGS), default=None)
    ap.add_argument("--dense-steps", type=int, default=200)
    ap.add_argument("--prune-steps", type=int, default=200)
    args = ap.parse_args()
    rows = []
    for name, s in SETTINGS.items():
        if args.only and name != args.only:
            continue
        rows.append(run(name, size=s["size"], speedup=s["speedup"], dense_steps=args.dense_steps,
                        prune_steps=args.prune_steps, profile_seconds=180))
        print(json.dumps(rows[-1]), flush=True)
    out = HERE / "results" / "detection.json"
    old = json.loads(out.read_text()) if out.exists() else []
    keep = [r for r in old if r["detector"] not in {r2["detector"] for r2 in rows}]
    out.write_text(json.dumps(keep + rows, indent=1) + "\n")
    print(table(keep + rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
