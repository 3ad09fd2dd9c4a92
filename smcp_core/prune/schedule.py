"""How the cost budget falls from the full model's cost to the target during the ramp."""

from __future__ import annotations

import math

SCHEDULES = ("exp", "geometric", "linear")


_EXP_RATE = 2.8  # exp: most of the reduction early in the ramp, easing off towards the target


def ramp_fraction(progress: float, kind: str = "exp") -> float:
    """Fraction (0..1) of the way from the full cost to the target at ``progress`` (0..1)."""
    p = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return p
    if kind == "exp":
        return (1.0 - math.exp(-_EXP_RATE * p)) / (1.0 - math.exp(-_EXP_RATE))
    if kind == "geometric":
        return p  # interpolated in log space by budget_at
    raise ValueError(f"unknown schedule {kind!r}; use one of {', '.join(SCHEDULES)}")


def budget_at(progress: float, full: float, target: float, kind: str = "exp") -> float:
    """The cost budget at ``progress``; exactly ``target`` at progress 1."""
    p = min(max(progress, 0.0), 1.0)
    if p >= 1.0:
        return target
    if kind == "geometric" and full > 0 and target > 0:
        return full ** (1.0 - p) * target ** p
    f = ramp_fraction(p, kind)
    return full - f * (full - target)
