"""What each stage returns: typed results whose ``to_dict()`` is the stage's JSON artifact (the
export report, the prune/slim summaries) and the ``--json`` document of its command."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from smcp_core.prune.trainer import TrainResult
from smcp_core.utils.text import spread


class _Result:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def brief(self) -> dict[str, Any]:
        """What ``smcp run --json`` reports of this stage (the artifact keeps everything)."""
        return self.to_dict()

    def headline(self) -> str | None:
        """One log line for ``smcp run`` after the stage, or None."""
        return None

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Rebuilt from its JSON artifact (keys it does not know are ignored, missing ones are None)."""
        return cls(**{f.name: data.get(f.name) for f in fields(cls) if f.init})


@dataclass
class ProfileResult(_Result):
    """``smcp profile``: where the table is and how the layer sum is calibrated to the whole model."""

    path: str
    layers: int  # layer shapes (table keys)
    baseline_ms: float  # the dense model, measured (median)
    scale: float
    offset_ms: float
    removed_layer_ms: float
    seconds: float
    interpolated_points: int  # grid points left unmeasured when the time budget ran out
    calibration: list[dict]  # per calibration structure: layer sum, measured and predicted ms
    baseline_spread_ms: list[float] | None = None  # p10, p90 of the dense model's runs
    calibration_form: str | None = None  # "global" or "per_resolution" (the fit used, see latency.json)
    layer_weights: dict[str, float] | None = None  # per_resolution: weight per output resolution

    def headline(self) -> str:
        return f"baseline {self.baseline_ms:.3f} ms{spread(self.baseline_spread_ms)}; table {self.path}"


@dataclass
class PruneResult(_Result):
    """``smcp prune`` (``prune/summary.json``); ``train`` is the in-memory training result (not written)."""

    stamp: str
    target: dict
    budget: float
    cost_unit: str
    full_cost: float
    final_cost: float
    meets_budget: bool
    predicted_ms: float | None
    predicted_speedup: float | None
    flops_ratio: float
    params_ratio: float
    top1: float | None
    seconds: float
    groups: list[dict]
    layers: list[dict]
    history: list[dict]
    world_size: int
    unstructured: dict | None = None
    train: TrainResult | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "train"}
        if d["unstructured"] is None:
            del d["unstructured"]
        return d

    def brief(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in ("history", "layers")}


@dataclass
class SlimResult(_Result):
    """``smcp slim`` (``slim/slim.json``)."""

    stamp: str
    max_abs_diff: float  # slim vs masked model outputs
    tolerance: float
    params: int
    params_full: int
    flops: int
    flops_full: int
    seconds: float


@dataclass
class ExportResult(_Result):
    """``smcp export`` (``export/report.json``): the measured speed-up and the gate's inputs."""

    stamp: str
    backend: str
    device: str
    batch_size: int
    dtype: str
    input_shape: list[int]
    baseline: dict  # latency_ms, stats
    pruned: dict  # latency_ms, stats, predicted_ms
    speedup: float  # median of the per-round ratios of the paired measurement
    gate: dict | None  # the measurement and the verdict: interval, rounds, decided_by, reason
    target: dict  # kind, value
    target_speedup: float | None
    passed: bool
    parity: dict
    flops_ratio: float | None
    params_ratio: float | None
    accuracy: dict | None
    environment: dict
    files: dict
    tensorrt: dict | None = None  # the engines' precision, FPS, latency percentiles, parity (--trt)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["tensorrt"] is None:  # reports of the other backends stay as they were
            del d["tensorrt"]
        return d
