"""Latency measurement: one definition of "latency" per backend.

Latency is always the **median** wall-clock time of one forward call, measured with
:func:`time.perf_counter` after warm-up (and after ``sync()`` for asynchronous devices).  Two models
are compared by :func:`time_interleaved` in one process, calls alternating A, B, A, B, ... so that
slow phases of a noisy machine hit both alike.

Runners (``torch_runner``, ``ort_runner``; ``smcp_core.profile.trt.trt_runner`` for TensorRT) turn a model and an
input into a zero-argument callable that runs one forward pass; the timing functions only ever see
such callables.

torch, onnxruntime and friends are imported lazily inside functions: importing this module is cheap.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from smcp_core.errors import SmcpError
from smcp_core.utils.text import first_line

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class Stats:
    """Summary of the timed runs of one callable (milliseconds).

    ``stable`` is False when the loop stopped on ``max_runs``/``max_seconds`` before the median had
    settled to within ``rel_tol``.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    n: int
    stable: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_samples(cls, samples_s: list[float], *, stable: bool = True) -> Stats:
        """Build from raw per-call durations in **seconds**."""
        if not samples_s:
            raise ValueError("no samples")
        ms = sorted(s * 1e3 for s in samples_s)
        return cls(
            median_ms=_percentile_sorted(ms, 50.0),
            p10_ms=_percentile_sorted(ms, 10.0),
            p90_ms=_percentile_sorted(ms, 90.0),
            min_ms=ms[0],
            n=len(ms),
            stable=stable,
        )


def _percentile_sorted(xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (same as ``numpy.percentile`` default) of a sorted list."""
    n = len(xs)
    if n == 1:
        return xs[0]
    pos = (n - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return xs[lo] + (xs[hi] - xs[lo]) * frac


def _median(xs: list[float]) -> float:
    return _percentile_sorted(sorted(xs), 50.0)


Timer = Callable[[Callable[[], object]], float]
"""Runs a zero-argument callable once and returns how long it took, in seconds."""


def host_timer(sync: Callable[[], object] | None = None, clock: Callable[[], float] | None = None) -> Timer:
    """Wall-clock time of one call (``clock``: :func:`time.perf_counter`); ``sync`` (if any) runs
    before the clock starts and before it stops."""
    clock = clock if clock is not None else time.perf_counter

    def timed(fn: Callable[[], object]) -> float:
        if sync is not None:
            sync()
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        return clock() - t0

    return timed


def cuda_event_timer(device: Any = "cuda") -> Timer:
    """GPU time of one call, like ``trtexec``'s compute time: a CUDA event recorded on the device's
    current stream before and after the call, then the end event synchronised.  The callable must
    enqueue its work on that stream (torch does; :func:`~smcp_core.profile.trt.trt_runner`
    does); host launch overhead before the first kernel and the final synchronisation are not
    counted, unlike a ``perf_counter`` around a synchronised call."""
    import torch

    dev = torch.device(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)

    def timed(fn: Callable[[], object]) -> float:
        stream = torch.cuda.current_stream(dev)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds

    return timed


def device_timer(device: Any = "cpu") -> Timer:
    """The timer for ``device``: CUDA events on ``cuda[:i]``, ``perf_counter`` elsewhere."""
    return cuda_event_timer(device) if str(device).startswith("cuda") else host_timer()


def rotating(fns: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One callable that calls ``fns`` in turn, one per call (A, B, C, A, ...).

    Timing a model through several sessions of it: on onnxruntime CPU one session of a model can
    run 1-2 % faster or slower than another for as long as it lives (where its buffers landed), an
    offset no number of rounds on that one session averages out (measured on ResNet-56, batch 1:
    four sessions of each model in one interleaved loop gave speed-ups 1.60-1.66x)."""
    calls = list(fns)
    if not calls:
        raise ValueError("rotating() needs at least one callable")
    if len(calls) == 1:
        return calls[0]
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    warmup: int = 5,
    min_runs: int = 20,
    max_runs: int = 2000,
    max_seconds: float = 60.0,
    rel_tol: float = 0.02,
    sync: Callable[[], object] | None = None,
    timer: Timer | None = None,
) -> dict[str, Stats]:
    """Time several callables round-robin (A, B, A, B, ...) and return a :class:`Stats` per name.

    * ``warmup`` untimed rounds first (also round-robin).
    * Then at least ``min_runs`` timed rounds.  After that the loop continues in blocks of
      ``max(1, min_runs // 2)`` rounds until, for **every** callable, the median of all its runs and
      the median of its runs without the last block differ by less than ``rel_tol`` (relative), or
      ``max_runs`` rounds were made, or ``max_seconds`` (wall clock, warm-up included) have passed.
      ``max_seconds`` is a hard cap: it can stop the loop even before ``min_runs``; every callable
      still gets at least one timed run.
    * Each call is timed by ``timer`` (:func:`device_timer`: CUDA events on a GPU); without one,
      with :func:`time.perf_counter`, ``sync`` (e.g. ``torch.cuda.synchronize``) called before the
      clock starts and before it stops, so asynchronous work is included.
    """
    names = list(fns)
    if not names:
        return {}
    if min_runs < 1 or max_runs < 1:
        raise ValueError("min_runs and max_runs must be >= 1")
    min_runs = min(min_runs, max_runs)
    calls = [fns[k] for k in names]
    clock = time.perf_counter
    timed = timer if timer is not None else host_timer(sync)
    t_start = clock()
    deadline = t_start + max_seconds

    for _ in range(max(0, warmup)):
        for fn in calls:
            fn()
        if sync is not None:
            sync()
        if clock() >= deadline:
            break

    samples: list[list[float]] = [[] for _ in names]

    def one_round() -> None:
        for i, fn in enumerate(calls):
            samples[i].append(timed(fn))

    block = max(1, min_runs // 2)
    stable = False
    rounds = 0
    while True:
        one_round()
        rounds += 1
        if rounds >= max_runs or clock() >= deadline:
            break
        if rounds >= min_runs and (rounds - min_runs) % block == 0:
            # the last `block` rounds form the "last block" of the stability check
            if rounds - block >= 1 and all(_is_stable(s, block, rel_tol) for s in samples):
                stable = True
                break
    if not stable and rounds >= min_runs and rounds - block >= 1:
        stable = all(_is_stable(s, block, rel_tol) for s in samples)
    return {k: Stats.from_samples(s, stable=stable) for k, s in zip(names, samples)}


def _is_stable(samples: list[float], block: int, rel_tol: float) -> bool:
    m_all = _median(samples)
    m_prev = _median(samples[:-block])
    if m_prev <= 0.0:
        return m_all == m_prev
    return abs(m_all - m_prev) / m_prev < rel_tol


def time_one(
    fn: Callable[[], object],
    *,
    warmup: int = 5,
    min_runs: int = 20,
    max_runs: int = 2000,
    max_seconds: float = 60.0,
    rel_tol: float = 0.02,
    sync: Callable[[], object] | None = None,
    timer: Timer | None = None,
) -> Stats:
    """:func:`time_interleaved` for one callable."""
    return time_interleaved(
        {"fn": fn},
        warmup=warmup,
        min_runs=min_runs,
        max_runs=max_runs,
        max_seconds=max_seconds,
        rel_tol=rel_tol,
        sync=sync,
        timer=timer,
    )["fn"]


_DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def canonical_dtype(dtype: Any) -> str:
    """``"float32" | "float16" | "bfloat16"`` from a string alias or a ``torch.dtype``."""
    name = str(dtype).replace("torch.", "").lower()
    try:
        return _DTYPE_ALIASES[name]
    except KeyError:
        raise SmcpError(
            f"unsupported precision {dtype!r}: use float32 (fp32), float16 (fp16) or bfloat16 (bf16)"
        ) from None


def resolve_dtype(dtype: Any) -> torch.dtype:
    """A ``torch.dtype`` from a string alias (``"fp16"``, ``"float32"``, ...) or a ``torch.dtype``."""
    import torch

    return getattr(torch, canonical_dtype(dtype))


def torch_runner(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    device: Any = "cpu",
    dtype: Any = "float32",
    channels_last: bool = False,
) -> Callable[[], object]:
    """A callable running a copy of ``model`` on ``x`` once (eval mode, ``torch.inference_mode``).

    The runner works on its own deep copy of the model, moved to ``device``/``dtype`` (and to
    channels-last memory format for 4-D inputs when asked) once, here: the caller's model keeps its
    device, dtype, memory format and training mode (an evaluation after timing runs it as it was).
    On CUDA the call is asynchronous: time it with ``timer=device_timer(device)``; the cuDNN
    autotuner is switched on (``torch.backends.cudnn.benchmark = True``, for the process: GPU
    timing like trtexec's, :func:`enable_cudnn_benchmark`).
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SmcpError(f"device {device!r} requested but torch sees no CUDA GPU")
    if dev.type == "cuda":
        enable_cudnn_benchmark()
    tdtype = resolve_dtype(dtype)
    model = copy.deepcopy(model).eval().to(device=dev, dtype=tdtype)
    x = x.to(device=dev, dtype=tdtype)
    if channels_last and x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run


def enable_cudnn_benchmark() -> None:
    """Let cuDNN pick the fastest algorithm per shape (what a deployed model gets; the first calls
    autotune, so warm up before timing).  Set for the whole process."""
    import torch

    torch.backends.cudnn.benchmark = True


_ORT_MISSING = (
    "onnxruntime is not installed: pip install 'smcp[cpu]' "
    "(or 'smcp[gpu]' for onnxruntime-gpu; never both)"
)


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


_ORT_MODULE = None  # set once onnxruntime was imported and checked


def ensure_onnxruntime():
    """Import and return ``onnxruntime``, or raise :class:`SmcpError` saying how to install it.

    Also refuses an environment holding both ``onnxruntime`` and ``onnxruntime-gpu``: the two
    distributions install the same ``onnxruntime`` package and overwrite each other's files.
    The result is cached for the process.
    """
    global _ORT_MODULE
    if _ORT_MODULE is not None:
        return _ORT_MODULE
    if _installed("onnxruntime") and _installed("onnxruntime-gpu"):
        raise SmcpError(
            "both onnxruntime and onnxruntime-gpu are installed; they overwrite each other's files: "
            "pip uninstall -y onnxruntime onnxruntime-gpu, then install exactly one "
            "(pip install 'smcp[cpu]' or 'smcp[gpu]')"
        )
    try:
        import onnxruntime
    except ImportError as e:
        raise SmcpError(_ORT_MISSING) from e
    _ORT_MODULE = onnxruntime
    return onnxruntime


def ort_providers(device: Any = "cpu") -> list:
    """Execution providers for a device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""
    dev = str(device)
    if dev.startswith("cuda"):
        idx = int(dev.split(":", 1)[1]) if ":" in dev else 0
        return [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session_options(ort, threads: int | None, spinning: bool):
    """All graph optimisations, sequential execution, warnings off (a fallback is checked instead)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def ort_session(
    onnx_path_or_bytes: str | os.PathLike | bytes,
    *,
    threads: int | None = None,
    providers: list | None = None,
    spinning: bool = False,
):
    """An ``onnxruntime.InferenceSession`` set up for timing.

    All graph optimisations on; ``threads`` sets ``intra_op_num_threads`` (None: ORT default);
    thread spinning off unless ``spinning=True`` (spinning ORT threads steal CPU from torch when the
    two are timed side by side, and distort interleaved comparisons).  ``providers`` defaults to
    CPU only.  A provider that is asked for but not available, or that the session does not run on
    (onnxruntime's silent fallback to the CPU, :meth:`InferenceSession.get_providers`), raises
    :class:`SmcpError`.
    """
    ort = ensure_onnxruntime()
    so = _session_options(ort, threads, spinning)
    providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
    available = set(ort.get_available_providers())
    for name in map(_provider_name, providers):
        if name not in available:
            raise SmcpError(
                f"onnxruntime execution provider {name} is not available here "
                f"(available: {', '.join(sorted(available))}); for CUDA install 'smcp[gpu]'"
            )
    model = onnx_path_or_bytes if isinstance(onnx_path_or_bytes, (bytes, bytearray)) else str(onnx_path_or_bytes)
    if isinstance(model, str) and not os.path.exists(model):
        raise SmcpError(f"ONNX model {model} does not exist")
    where = "in-memory model" if isinstance(model, (bytes, bytearray)) else model
    try:
        sess = ort.InferenceSession(model, sess_options=so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        raise SmcpError(f"onnxruntime cannot load {where}: {first_line(e)}") from e
    _check_session_providers(sess, providers, where)
    return sess


def _provider_name(p) -> str:
    return p[0] if isinstance(p, tuple) else str(p)


def _check_session_providers(sess, providers: list, where: str) -> None:
    """Refuse a session that silently fell back to the CPU: onnxruntime drops a provider it cannot
    create (e.g. CUDA without its libraries) with only a logged warning, and the CPU would be timed."""
    running = list(sess.get_providers())
    lost = [n for n in map(_provider_name, providers) if n != "CPUExecutionProvider" and n not in running]
    if lost:
        raise SmcpError(
            f"onnxruntime could not use {', '.join(lost)} for {where} (the session runs on "
            f"{', '.join(running) or 'nothing'}); check the CUDA/cuDNN libraries onnxruntime-gpu needs"
        )


def ort_runner(session, x_numpy, *, device: Any = "cpu") -> Callable[[], object]:
    """A callable running ``session`` once on ``x_numpy`` (bound to the session's first input).

    On CPU this is ``session.run``.  For ``device="cuda[:i]"`` the input is copied to the GPU once and
    inputs/outputs are bound there with IO binding, so host<->device copies are not timed.
    """
    import numpy as np

    if hasattr(x_numpy, "detach"):  # a torch tensor
        x_numpy = x_numpy.detach().cpu().numpy()
    x_numpy = np.ascontiguousarray(x_numpy)
    name = session.get_inputs()[0].name
    dev = str(device)
    if dev.startswith("cuda"):
        ort = ensure_onnxruntime()
        idx = int(dev.split(":", 1)[1]) if ":" in dev else 0
        x_dev = ort.OrtValue.ortvalue_from_numpy(x_numpy, "cuda", idx)
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, x_dev)
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda", idx)

        def run_cuda() -> object:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
            return None

        return run_cuda

    feeds = {name: x_numpy}

    def run() -> object:
        return session.run(None, feeds)

    return run
