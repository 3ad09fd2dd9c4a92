"""Device fingerprints (which latency tables a machine may reuse) and the environment report every
measurement records (device, driver, library versions, batch, precision)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from smcp_core import __version__
from smcp_core.errors import SmcpError
from smcp_core.profile.timing import canonical_dtype

if TYPE_CHECKING:  # pragma: no cover
    pass


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _ort_version() -> str | None:
    return _dist_version("onnxruntime") or _dist_version("onnxruntime-gpu")


# fields of a fingerprint that define "the same machine and software" for a latency table (CPU)
_STABLE_FIELDS = (
    "backend",
    "device_type",
    "cpu_model",
    "cpu_count",
    "cpus_available",
    "machine",
    "system",
    "threads",
    "backend_version",
    "gpu_name",
    "gpu_capability",
    "gpu_count_visible",
    "cuda_version",
)

# the same for a CUDA device: the GPU and its software stack, not the host's CPUs, its visible GPU
# count (CUDA_VISIBLE_DEVICES) or its CPU affinity (a SLURM mask), which do not change a GPU latency
_CUDA_STABLE_FIELDS = (
    "backend",
    "device_type",
    "gpu_name",
    "gpu_capability",
    "cuda_version",
    "cudnn_version",
    "driver_version",
    "backend_version",
    "cudnn_allow_tf32",
    "matmul_allow_tf32",
)


def device_fingerprint(backend: str, device: str = "cpu", threads: int | None = None) -> dict:
    """Describe the machine and software a latency is measured on (no host name, no user data).

    Always: backend, device, cpu model/count, OS and architecture, python/torch versions, threads.
    ``backend_version`` is the version of the library that runs the model (torch, onnxruntime or
    tensorrt).  On CUDA devices also the GPU name, compute capability, memory, visible GPU count,
    CUDA/cuDNN versions, the cuDNN autotuner and TF32 settings (:func:`cudnn_settings`) and the driver
    version (:func:`nvidia_driver_version`).
    """
    import torch

    dev = str(device)
    device_type = "cuda" if dev.startswith("cuda") else dev.split(":", 1)[0]
    fp: dict[str, Any] = {
        "backend": backend,
        "device": dev,
        "device_type": device_type,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count() or 1,
        "cpus_available": _cpus_available(),
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "threads": threads,
    }
    if backend == "onnxruntime":
        fp["onnxruntime_version"] = _ort_version()
        fp["backend_version"] = fp["onnxruntime_version"]
    elif backend == "tensorrt":
        fp["tensorrt_version"] = _dist_version("tensorrt") or _dist_version("tensorrt-cu12") or _dist_version(
            "tensorrt-cu13"
        )
        fp["backend_version"] = fp["tensorrt_version"]
    else:
        fp["backend_version"] = torch.__version__
    if device_type == "cuda":
        fp.update(_cuda_fingerprint(dev))
    return fp


def _cuda_fingerprint(dev: str) -> dict:
    import torch

    out: dict[str, Any] = {"cuda_version": torch.version.cuda, **cudnn_settings()}
    out["driver_version"] = nvidia_driver_version()
    if not torch.cuda.is_available():
        out["gpu_name"] = None
        return out
    idx = torch.device(dev).index
    idx = torch.cuda.current_device() if idx is None else idx
    props = torch.cuda.get_device_properties(idx)
    out["gpu_name"] = props.name
    out["gpu_capability"] = f"{props.major}.{props.minor}"
    out["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    out["gpu_count_visible"] = torch.cuda.device_count()  # reported, not in the id
    return out


def cudnn_settings() -> dict:
    """cuDNN's version, autotuner (``cudnn.benchmark``) and TF32 switches (cuDNN convolutions and
    matmuls): they change what a float32 GPU latency means."""
    import torch

    def read(get):
        try:
            return get()
        except Exception:  # depends on the build
            return None

    return {
        "cudnn_version": read(torch.backends.cudnn.version),
        "cudnn_benchmark": read(lambda: bool(torch.backends.cudnn.benchmark)),
        "cudnn_allow_tf32": read(lambda: bool(torch.backends.cudnn.allow_tf32)),
        "matmul_allow_tf32": read(lambda: bool(torch.backends.cuda.matmul.allow_tf32)),
    }


_PROC_DRIVER = "/proc/driver/nvidia/version"


def nvidia_driver_version(path: str | None = None) -> str | None:
    """The NVIDIA kernel driver's version from ``/proc/driver/nvidia/version`` (Linux; ``path``),
    else from ``pynvml`` when it is installed, else None."""
    try:
        with open(path or _PROC_DRIVER, encoding="utf-8", errors="replace") as f:
            m = re.search(r"\b(\d{2,}\.\d+(?:\.\d+)*)\b", f.readline())
        if m:
            return m.group(1)
    except OSError:
        pass
    try:  # optional
        import pynvml  # type: ignore

        pynvml.nvmlInit()
        drv = pynvml.nvmlSystemGetDriverVersion()
        return drv.decode() if isinstance(drv, bytes) else str(drv)
    except Exception:
        return None


def fingerprint_id(fp: Mapping[str, Any]) -> str:
    """A short (12 hex digits) sha256 of the fields of ``fp`` that define the measuring setup.

    CPU: backend and its version, CPU model/count/affinity, OS, architecture, threads.  CUDA: the
    GPU (name, compute capability), CUDA, cuDNN and driver versions, the backend's version and the
    TF32 switches -- not the host's CPUs, the number of visible GPUs or the device index, so a table
    made on one GPU of a machine (``CUDA_VISIBLE_DEVICES=1``, a SLURM CPU mask) is reused on the
    same model of GPU.  The Python version is left out everywhere.
    """
    cuda = fp.get("device_type") == "cuda"
    stable = {k: fp.get(k) for k in (_CUDA_STABLE_FIELDS if cuda else _STABLE_FIELDS)}
    if cuda:
        stable["id_version"] = 2  # never equal to an id of the fields above (CPU or old CUDA tables)
    blob = json.dumps(stable, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:12]


def describe_fingerprint(fp: Mapping[str, Any]) -> str:
    """A short human description, e.g. ``"AMD EPYC (2 cpus, 4 threads)"`` or ``"NVIDIA H100"``."""
    if fp.get("device_type") == "cuda" and fp.get("gpu_name"):
        return str(fp["gpu_name"])
    cpus = fp.get("cpus_available") or fp.get("cpu_count")
    thr = fp.get("threads")
    extra = f"{cpus} cpus" + (f", {thr} threads" if thr else "")
    return f"{fp.get('cpu_model', 'unknown cpu')} ({extra})"


def _precision_name(precision: Any) -> str | None:
    if precision is None:
        return None
    try:
        return canonical_dtype(precision)
    except SmcpError:  # e.g. "int8" for TensorRT
        return str(precision).replace("torch.", "").lower()


def environment_report(
    *,
    backend: str,
    device: str = "cpu",
    threads: int | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
    input_shape: tuple[int, ...] | list[int] | None = None,
    layout: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Everything needed to interpret a latency number, for ``report.json``.

    Library versions are read from installed distribution metadata (nothing heavy is imported
    except torch, which the fingerprint needs).
    """

    fp = device_fingerprint(backend, device, threads)
    libs = {
        "smcp": __version__,
        "python": platform.python_version(),
        "torch": _dist_version("torch"),
        "torchvision": _dist_version("torchvision"),
        "numpy": _dist_version("numpy"),
        "onnx": _dist_version("onnx"),
        "onnxscript": _dist_version("onnxscript"),
        "onnxruntime": _dist_version("onnxruntime"),
        "onnxruntime-gpu": _dist_version("onnxruntime-gpu"),
        "tensorrt": _dist_version("tensorrt"),
    }
    rep: dict[str, Any] = {
        "backend": backend,
        "device": str(device),
        "threads": threads,
        "batch_size": batch_size,
        "precision": _precision_name(precision),
        "layout": layout,
        "input_shape": list(input_shape) if input_shape is not None else None,
        "libraries": {k: v for k, v in libs.items() if v is not None},
        "platform": platform.platform(terse=True),
        "fingerprint": fp,
        "fingerprint_id": fingerprint_id(fp),
    }
    if extra:
        rep.update(dict(extra))
    return rep
