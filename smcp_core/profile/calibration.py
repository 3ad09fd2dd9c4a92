"""Calibration of the layer-sum latency against whole-model measurements."""

from __future__ import annotations

import torch


def fit_calibration(points: list[tuple[float, int, float]]) -> tuple[float, float]:
    """``(layer_sum, removed_layers, measured_ms)`` points -> ``(scale, removed_ms)`` with
    measured ~= scale * (layer_sum + removed_ms * removed_layers), both >= 0 (least squares; a
    proportional fit when no point removes a layer or the fitted residual is negative)."""
    xs = torch.tensor([p[0] for p in points], dtype=torch.float64)
    ns = torch.tensor([float(p[1]) for p in points], dtype=torch.float64)
    ys = torch.tensor([p[2] for p in points], dtype=torch.float64)

    def proportional() -> float:
        sc = float((xs * ys).sum() / (xs * xs).sum())
        return sc if sc > 0 else float(ys[0] / xs[0])

    if len(points) < 2 or not bool((ns > 0).any()) or not bool((ns == 0).any()):
        return proportional(), 0.0
    sol = torch.linalg.lstsq(torch.stack([xs, ns], 1), ys.view(-1, 1)).solution.view(-1)
    a, b = float(sol[0]), float(sol[1])
    if not (a > 0) or b < 0:
        return proportional(), 0.0
    return a, b / a
