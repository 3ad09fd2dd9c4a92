"""Calibration of the layer-sum latency against whole-model measurements."""

from __future__ import annotations

from collections.abc import Collection

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


def _nonnegative_lstsq(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x >= 0`` minimising ``|a x - y|`` by backward elimination: least squares on the free
    columns, the most negative coefficient fixed at 0, until none is negative (enough for the few,
    well-conditioned columns of a calibration)."""
    free = list(range(a.shape[1]))
    x = torch.zeros(a.shape[1], dtype=torch.float64)
    while free:
        sol = torch.linalg.lstsq(a[:, free], y.view(-1, 1)).solution.view(-1)
        worst = int(torch.argmin(sol))
        if float(sol[worst]) >= 0:
            x[free] = sol
            break
        free.pop(worst)
    return x


MIN_WEIGHT = 0.3
"""A per-resolution fit whose smallest layer weight falls below this (a resolution whose layers
would look nearly free to the allocator) is not trusted: the global fit is used instead."""


def fit_resolution_calibration(points: list[tuple[dict[str, float], float, float]],
                               dense_sums: dict[str, float], *, separated: Collection[str] | None = None,
                               ) -> tuple[float, float, dict[str, float]] | None:
    """``(layer sum per site, removed layers, measured_ms)`` points -> ``(scale, removed_ms,
    layer weights per site)`` with measured ~= scale * (sum over sites of weight * layer sum +
    removed_ms * removed layers), every coefficient >= 0; ``scale`` is the dense model's effective
    scale (``dense_sums``: its layer sum per site), so the weights are relative to it.  Sites with
    less than 5 % of the dense layer sum share the weight of the largest site.  ``separated``: the
    sites with a point of their own (blocks of that site removed, the rest whole); uniformly thinned
    points shrink every site alike and cannot tell the sites' weights apart.  None when a large
    site is not in ``separated`` (when given), when there are fewer points than coefficients or when
    a weight is below :data:`MIN_WEIGHT`: the caller falls back to :func:`fit_calibration`."""
    total = sum(dense_sums.values())
    big = sorted(s for s, v in dense_sums.items() if v >= 0.05 * total)
    if not big or total <= 0:
        return None
    if separated is not None and not set(big) <= set(separated):
        return None
    main = max(big, key=lambda s: dense_sums[s])
    col = {s: (s if s in big else main) for s in dense_sums}
    removal = any(n > 0 for _, n, _ in points)
    ncoef = len(big) + int(removal)
    if len(points) <= ncoef:
        return None
    rows = []
    for sums, n, _ in points:
        r = [0.0] * len(big)
        for s, v in sums.items():
            r[big.index(col.get(s, main))] += v
        rows.append(r + ([float(n)] if removal else []))
    sol = _nonnegative_lstsq(torch.tensor(rows, dtype=torch.float64),
                             torch.tensor([p[2] for p in points], dtype=torch.float64))
    coef = {s: float(sol[i]) for i, s in enumerate(big)}
    scale = sum(coef[col[s]] * v for s, v in dense_sums.items()) / total
    if not scale > 0:
        return None
    weights = {s: coef[col[s]] / scale for s in dense_sums}
    if min(weights.values()) < MIN_WEIGHT:
        return None
    return scale, (float(sol[-1]) / scale if removal else 0.0), weights
