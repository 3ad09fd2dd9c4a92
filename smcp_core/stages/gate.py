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
    engine = (report.tensorrt or {}).get("parity") or {"passed": True}
    if not engine["passed"]:
        raise GateFailed(f"TensorRT engine parity failed: {engine.get('max_rel_diff', float('nan')):.3g} relative "
                         f"difference to PyTorch float32 > {engine.get('tolerance')} "
                         f"({report.tensorrt.get('precision')}); try export.trt_precision=fp32")
    t = report.target
    verdict = (report.gate or {}).get("verdict") or {}
    why = f"; {verdict['reason']}" if verdict.get("reason") else ""
    raise GateFailed(
        f"target missed: measured speed-up {report.speedup:.2f}x on {report.backend} at batch "
        f"{report.batch_size} ({report.baseline['latency_ms']:.3f} -> {report.pruned['latency_ms']:.3f} ms), "
        f"target {t['kind']}={t['value']}{why}"
    )
