"""Import torchvision safely next to a CPU-only torch.

The torchvision wheel on PyPI is a CUDA build.  Installed next to a CPU-only torch its compiled
extension does not load, so ``import torchvision`` dies at import time with
``RuntimeError: operator torchvision::nms does not exist`` (the Python side registers fake/meta
kernels for ``torchvision::nms`` and expects the schema to have been defined by the C++ library).

:func:`import_torchvision` first tries torchvision's own compiled extension (a matching torch and
torchvision: nothing else is done); only when it does not load it defines the missing operator
schemas, gives ``nms`` a CPU kernel of its own (greedy non-maximum suppression in plain torch, what
torchvision's detectors call after their heads; ``qnms`` stays without one) and then imports
torchvision.
All project code imports torchvision through this helper.  torchvision's image decoders
(``torchvision.io.decode_jpeg`` ...) are compiled ops as well and unavailable; decode images with
Pillow.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import ModuleType

import torch

from smcp_core.errors import SmcpError

# Kept at module level: a torch.library.Library's definitions live as long as the object.
_LIB: torch.library.Library | None = None


_LOCK = threading.Lock()


_TV: ModuleType | None = None


_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _nms_defined() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute lookup resolves the operator
    except (AttributeError, RuntimeError):
        return False
    return True


def _own_extension_loads() -> bool:
    """Whether torchvision's compiled extension (``torchvision/_C*.so``) loads next to this torch:
    it then defines the operators itself, and defining them here first would make its own
    registration fail (a matching CUDA torch + torchvision pair, for example)."""
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        for lib in sorted(Path(folder).glob("_C*.so")) + sorted(Path(folder).glob("_C*.pyd")):
            try:
                torch.ops.load_library(str(lib))
            except (OSError, RuntimeError):
                return False
            return _nms_defined()
    return False


def _define_missing_schemas() -> None:
    global _LIB
    if _LIB is not None or _nms_defined() or _own_extension_loads():
        return
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        name = schema.split("(", 1)[0]
        try:
            getattr(torch.ops.torchvision, name)
        except (AttributeError, RuntimeError):
            lib.define(schema)
            if name == "nms":
                lib.impl("nms", _greedy_nms, "CPU")
    _LIB = lib


def _greedy_nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``torchvision::nms`` on CPU: indices of the boxes kept (by decreasing score), each box
    suppressing the lower-scored ones whose IoU with it is above ``iou_threshold``."""
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    order = torch.argsort(scores, descending=True)
    b = dets[order].to(torch.float64)
    area = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    over = inter / (area[:, None] + area[None, :] - inter).clamp_min(1e-12) > iou_threshold
    suppressed = torch.zeros(len(b), dtype=torch.bool)
    kept = []
    for i in range(len(b)):
        if not suppressed[i]:
            kept.append(i)
            suppressed |= over[i]
    return order[torch.tensor(kept, dtype=torch.long)]


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, working around a CUDA torchvision next to CPU torch.

    Idempotent and thread-safe.  Raises :class:`SmcpError` when torchvision cannot be imported.
    """
    global _TV
    if _TV is not None:
        return _TV
    with _LOCK:
        if _TV is not None:
            return _TV
        try:
            _define_missing_schemas()
        except Exception as exc:  # pragma: no cover - depends on the installed torch
            raise SmcpError(
                f"torchvision: could not register the missing torchvision operator schemas "
                f"({type(exc).__name__}: {exc}); install matching builds, e.g. "
                f"`pip install torch=={torch.__version__.split('+')[0]} torchvision` from the same index"
            ) from None
        try:
            import torchvision  # noqa: PLC0415 - deliberate late import
        except Exception as exc:
            summary = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SmcpError(
                f"torchvision could not be imported ({type(exc).__name__}: {summary}); torch is "
                f"{torch.__version__}: install a torchvision built for it (CPU torch: "
                f"`pip install torchvision --index-url https://download.pytorch.org/whl/cpu`)"
            ) from None
        if _LIB is not None and not torchvision.extension._has_ops():
            _route_nms(torchvision)
        _TV = torchvision
        return torchvision


def _route_nms(torchvision: ModuleType) -> None:
    """Without its compiled extension torchvision refuses ``ops.nms`` before calling the operator;
    route ``torchvision.ops.nms`` (and the ``batched_nms`` of its detectors) to the operator, whose
    CPU kernel is :func:`_greedy_nms`."""

    def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
        return torch.ops.torchvision.nms(boxes, scores, iou_threshold)

    torchvision.ops.boxes.nms = nms
    torchvision.ops.nms = nms
