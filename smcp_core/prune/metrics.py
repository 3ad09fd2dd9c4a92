"""``prune/metrics.csv``: one row per epoch, written from the checkpointed training history."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from smcp_core.errors import SmcpError
from smcp_core.utils.fsutil import (
    atomic_write_text,
    verify_artifact,
)

METRICS_COLUMNS = ("epoch", "lr", "loss", "train_top1", "val_top1", "budget", "budget_predicted", "cost",
                   "predicted", "unit", "kept_channels", "total_channels", "mask_updates", "seconds")


_INT_COLUMNS = {"epoch", "kept_channels", "total_channels", "mask_updates"}


def metrics_rows(history: list[dict], unit: str = "") -> list[dict]:
    """One dict per epoch (``METRICS_COLUMNS``) from a prune history (``summary.json`` / checkpoint).

    Histories written before these columns existed get ``budget`` from the mask-update rows."""
    rows: list[dict] = []
    last_budget = None
    scale = None
    updates = 0
    for r in history:
        ev = r.get("event")
        if ev == "mask_update":
            updates += 1
            last_budget = r.get("budget", last_budget)
            if r.get("cost"):
                scale = r.get("predicted", r["cost"]) / r["cost"]
            continue
        if ev != "epoch":
            continue
        budget = r.get("budget")
        if budget is None:  # older histories: the last update's budget, else the dense cost
            budget = last_budget if last_budget is not None else r.get("cost")
        bpred = r.get("budget_predicted")
        if bpred is None and budget is not None:
            s = scale if scale is not None else (r["predicted"] / r["cost"] if r.get("cost") else None)
            bpred = budget * s if s is not None else None
        rows.append({
            "epoch": int(r["epoch"]), "lr": r.get("lr"), "loss": r.get("loss"), "train_top1": r.get("train_top1"),
            "val_top1": r.get("top1"), "budget": budget, "budget_predicted": bpred, "cost": r.get("cost"),
            "predicted": r.get("predicted"), "unit": unit, "kept_channels": r.get("kept_classes"),
            "total_channels": r.get("total_classes"), "mask_updates": updates, "seconds": r.get("seconds"),
        })
        updates = 0
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.8g}"
    return str(v)


def metrics_csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRICS_COLUMNS)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in METRICS_COLUMNS])
    return buf.getvalue()


def write_metrics_csv(path: Path, history: list[dict], unit: str = "") -> Path:
    """Rewrite ``path`` atomically (with its checksum) from the whole history."""
    return atomic_write_text(path, metrics_csv_text(metrics_rows(history, unit)), checksum=True)


def read_metrics_csv(path: Path) -> list[dict]:
    """Rows of a ``metrics.csv`` (numbers parsed, empty cells None); corrupt files raise SmcpError."""
    path = Path(path)
    verify_artifact(path, "metrics", "delete it; the next checkpoint of `smcp prune --resume` rewrites it")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SmcpError(f"cannot read metrics {path}: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "epoch" not in reader.fieldnames:
        raise SmcpError(f"metrics {path} has no header with an epoch column; delete it")
    rows = []
    for i, raw in enumerate(reader, start=2):
        row: dict[str, Any] = {}
        for k, v in raw.items():
            if k is None or k == "unit":
                row["unit"] = v or ""
                continue
            if v is None or v == "":
                row[k] = None
                continue
            try:
                row[k] = int(v) if k in _INT_COLUMNS else float(v)
            except ValueError:
                raise SmcpError(f"metrics {path} line {i}: {k} = {v!r} is not a number; delete the file") from None
        rows.append(row)
    return rows
