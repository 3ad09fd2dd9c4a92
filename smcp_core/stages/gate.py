"""The export gate: exit 2 when a report did not pass."""

from __future__ import annotations

from smcp_core.errors import GateFailed
from smcp_core.stages.results import ExportResult


def gate(report: ExportResult) -> None:
    """Raise GateFailed (exit 2) when an export report did not pass."""
    if report.passed:
        return
    if not report.parity["passed"]:
        raise GateFailed(f"ONNX parity failed: max abs diff {report.parity['max_abs_diff']:.3g} > "
                         f"{report.parity['tolerance']:g}")
    t = report.target
    verdict = (report.gate or {}).get("verdict") or {}
    why = f"; {verdict['reason']}" if verdict.get("reason") else ""
    raise GateFailed(
        f"target missed: measured speed-up {report.speedup:.2f}x on {report.backend} at batch "
        f"{report.batch_size} ({report.baseline['latency_ms']:.3f} -> {report.pruned['latency_ms']:.3f} ms), "
        f"target {t['kind']}={t['value']}{why}"
    )
