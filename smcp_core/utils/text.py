"""Text helpers shared by every stage: one-line error messages and markdown tables."""

from __future__ import annotations

import re
from collections.abc import Sequence

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (colour codes removed, at most ``limit``
    characters), or its type name when the message is empty."""
    for line in _ANSI.sub("", str(exc)).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(exc).__name__


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], *,
                   numeric_from: int | None = None) -> list[str]:
    """A markdown table as lines (``|`` in cells escaped); columns from ``numeric_from`` on are
    right-aligned."""
    def cells(values: Sequence[object]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    align = ["---:" if numeric_from is not None and i >= numeric_from else "---" for i in range(len(header))]
    return [cells(header), "|" + "|".join(align) + "|"] + [cells(r) for r in rows]


def spread(p10_p90: Sequence[float] | None) -> str:
    """`` (p10-p90 A-B)`` for a timing's spread in ms, shown beside its median; "" without one."""
    return f" (p10-p90 {p10_p90[0]:.3f}-{p10_p90[1]:.3f})" if p10_p90 else ""


def layer_weights_text(weights: dict) -> str:
    """A per-resolution calibration's layer weights as ``32x32 1.14, 16x16 1.08, 8x8 0.82``: the
    largest resolution first, ``n/a`` for a value that is not a number (a hand-edited table)."""
    def pixels(site: str) -> int:
        h, _, w = str(site).partition("x")
        return int(h) * int(w) if h.isdigit() and w.isdigit() else 0

    def number(v) -> str:
        return f"{v:.2f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "n/a"

    return ", ".join(f"{k} {number(v)}" for k, v in sorted(weights.items(), key=lambda kv: -pixels(kv[0])))
