"""TensorRT as a timing backend: engines built from ONNX (TensorRT 10/11 Python API, explicit batch,
name-based I/O) and a runner that enqueues them on torch's current CUDA stream.

Precision: ``fp32``; ``fp16`` -- TensorRT 10: ``BuilderFlag.FP16`` on an fp32 ONNX model (weakly
typed); TensorRT 11 has no precision flags (strongly typed networks only), so the ONNX model must be
fp16 already (:func:`onnx_dtype_for` says which ONNX a precision needs); ``int8`` only from an ONNX
model with QuantizeLinear/DequantizeLinear nodes.  An fp16 ONNX model is always built strongly
typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``), and every model on TensorRT 11.

``tensorrt``, torch and onnx are imported inside the functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from smcp_core.errors import SmcpError
from smcp_core.profile.timing import Timer, device_timer, host_timer
from smcp_core.utils.fsutil import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    import torch

PRECISIONS = ("fp32", "fp16", "int8")

_TRT_MISSING = ("TensorRT is not installed (no python module tensorrt): pip install 'smcp[trt]' on a machine "
                "with an NVIDIA GPU and driver")

OnnxSource = str | os.PathLike | bytes


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _cuda_buffers() -> bool:
    """Whether engine buffers live on the GPU (always with a real TensorRT; tests of a stand-in
    module that reads host memory turn it off)."""
    import torch

    return bool(torch.cuda.is_available())


def ensure_tensorrt():
    """Import and return ``tensorrt``; SmcpError when it is missing or there is no CUDA GPU."""
    try:
        import tensorrt  # type: ignore
    except ImportError as e:  # includes a broken install missing its CUDA libraries
        raise SmcpError(_TRT_MISSING) from e
    if not _cuda_available():
        raise SmcpError(
            "no CUDA GPU is visible (torch.cuda.is_available() is False): TensorRT needs "
            "pip install 'smcp[trt]' on a machine with an NVIDIA GPU and driver"
        )
    return tensorrt


def trt_version(trt=None) -> str:
    """The TensorRT version string (of ``trt``, else of the installed module)."""
    trt = trt if trt is not None else ensure_tensorrt()
    return str(getattr(trt, "__version__", "unknown"))


def _trt_major(trt) -> int:
    try:
        return int(str(getattr(trt, "__version__", "10")).split(".")[0])
    except ValueError:
        return 10


def has_precision_flags(trt) -> bool:
    """Whether this TensorRT has ``BuilderFlag.FP16`` (10.x; removed in 11)."""
    return hasattr(getattr(trt, "BuilderFlag", None), "FP16")


def trt_precision(dtype: str) -> str:
    """The TensorRT precision of a profile dtype (``float32`` -> ``fp32``, ``float16`` -> ``fp16``)."""
    table = {"float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16", "int8": "int8"}
    if str(dtype) not in table:
        raise SmcpError(f"TensorRT timing supports float32 and float16 (or int8 from a Q/DQ ONNX model), not {dtype}")
    return table[str(dtype)]


def dtype_name(precision: str) -> str:
    """The report's dtype of a TensorRT precision (``fp16`` -> ``float16``)."""
    return {"fp32": "float32", "fp16": "float16"}.get(precision, precision)


def onnx_dtype_for(trt, precision: str) -> str:
    """The dtype of the ONNX model an engine of ``precision`` is built from: ``float16`` for fp16
    without an FP16 builder flag (TensorRT 11: strongly typed), else ``float32``."""
    return "float16" if precision == "fp16" and not has_precision_flags(trt) else "float32"


def _load_onnx(src: OnnxSource):
    import onnx

    if isinstance(src, (bytes, bytearray)):
        return onnx.load_from_string(bytes(src))
    return onnx.load(str(src), load_external_data=False)


def _onnx_has_qdq(model) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def _onnx_is_fp16(model) -> bool:
    import onnx

    fp16 = onnx.TensorProto.FLOAT16
    return (any(init.data_type == fp16 for init in model.graph.initializer)
            or any(i.type.tensor_type.elem_type == fp16 for i in model.graph.input))


def _where(src: OnnxSource) -> str:
    return "the in-memory ONNX model" if isinstance(src, (bytes, bytearray)) else str(src)


def _check_precision(trt, model, precision: str, where: str) -> bool:
    """Whether the network is built strongly typed; SmcpError for a precision the model cannot get."""
    fp16_onnx = _onnx_is_fp16(model)
    if precision == "int8" and not _onnx_has_qdq(model):
        raise SmcpError(
            f"int8 TensorRT engines need an ONNX model with QuantizeLinear/DequantizeLinear nodes, "
            f"and {where} has none: quantize it first (e.g. NVIDIA ModelOpt) or use --precision fp16"
        )
    if precision == "fp16" and not has_precision_flags(trt) and not fp16_onnx:
        raise SmcpError(
            f"TensorRT {_trt_major(trt)} builds strongly typed networks only (no FP16 builder flag): "
            f"convert {where} to FP16 first (NVIDIA ModelOpt AutoCast) or use --precision fp32"
        )
    if precision == "fp32" and fp16_onnx:
        raise SmcpError(f"{where} is an fp16 ONNX model: build it with precision fp16")
    return _trt_major(trt) >= 11 or fp16_onnx


def _network_flags(trt, strongly_typed: bool) -> int:
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 1 << int(flag) if strongly_typed and flag is not None else 0


def _parse(trt, network, logger, src: OnnxSource) -> None:
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(bytes(src)) if isinstance(src, (bytes, bytearray)) else parser.parse_from_file(str(src))
    if not ok:
        errs = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)]
        raise SmcpError(f"TensorRT cannot parse {_where(src)}: " + ("; ".join(errs[:3]) or "unknown parser error"))


def _set_precision_flags(trt, config, precision: str, strongly_typed: bool) -> None:
    """TensorRT 10 weakly typed builds: FP16 (and INT8 + FP16) builder flags."""
    if strongly_typed or not has_precision_flags(trt):
        return
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)


def _add_profile(builder, network, config, *, batch: int, dynamic_batch: bool, where: str) -> None:
    """An optimisation profile for a dynamic batch: min 1 (dynamic_batch) or ``batch``, opt = max = ``batch``."""
    profile = None
    for k in range(network.num_inputs):
        inp = network.get_input(k)
        shape = tuple(int(d) for d in inp.shape)
        if any(d < 0 for d in shape[1:]):
            raise SmcpError(f"input {inp.name} of {where} has dynamic non-batch dimensions {shape}: "
                            "export with fixed spatial size")
        if shape and shape[0] < 0:
            profile = profile if profile is not None else builder.create_optimization_profile()
            rest = shape[1:]
            profile.set_shape(inp.name, (1 if dynamic_batch else batch, *rest), (batch, *rest), (batch, *rest))
        elif dynamic_batch:
            raise SmcpError(f"{where} has a fixed batch size {shape[0] if shape else '?'}: export it with a "
                            "dynamic batch to build a dynamic-batch engine")
        elif shape and shape[0] != batch:
            raise SmcpError(f"{where} has fixed batch size {shape[0]}, but batch size {batch} was asked")
    if profile is not None:
        config.add_optimization_profile(profile)


def _use_timing_cache(config, path: Path | None):
    if path is None:
        return
    blob = path.read_bytes() if path.exists() else b""
    config.set_timing_cache(config.create_timing_cache(blob), False)


def _save_timing_cache(config, path: Path | None) -> None:
    tc = config.get_timing_cache() if path is not None else None
    if tc is not None:
        atomic_write_bytes(path, bytes(tc.serialize()))


def serialize_engine(src: OnnxSource, *, precision: str = "fp16", batch_size: int, dynamic_batch: bool = False,
                     workspace_gb: float = 4, timing_cache: str | os.PathLike | None = None) -> bytes:
    """A serialized TensorRT engine of an ONNX model (a file or its bytes).

    Network flags 0 (explicit batch is the only mode since TensorRT 10), or STRONGLY_TYPED for an
    fp16 ONNX model and on TensorRT 11; precision as the module docstring says; an optimisation
    profile when the batch is dynamic; ``workspace_gb`` as the workspace pool limit;
    ``timing_cache``: a file read before and written (atomically) after the build."""
    precision = str(precision).lower()
    if int(batch_size) < 1:
        raise SmcpError(f"batch size must be >= 1, got {batch_size}")
    if precision not in PRECISIONS:
        raise SmcpError(f"unknown TensorRT precision {precision!r}: use fp32, fp16 or int8")
    trt = ensure_tensorrt()
    if not isinstance(src, (bytes, bytearray)) and not Path(src).exists():
        raise SmcpError(f"ONNX model {src} does not exist")
    strongly = _check_precision(trt, _load_onnx(src), precision, _where(src))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, strongly))
    _parse(trt, network, logger, src)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(float(workspace_gb) * (1 << 30)))
    _set_precision_flags(trt, config, precision, strongly)
    _add_profile(builder, network, config, batch=int(batch_size), dynamic_batch=dynamic_batch, where=_where(src))
    cache = Path(timing_cache) if timing_cache is not None else None
    _use_timing_cache(config, cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SmcpError(f"TensorRT failed to build an engine from {_where(src)} (precision {precision}, "
                        f"batch {batch_size}); see the TensorRT log above")
    _save_timing_cache(config, cache)
    return bytes(serialized)


def build_trt_engine(onnx_path: OnnxSource, engine_path: str | os.PathLike, **kw) -> Path:
    """:func:`serialize_engine` written (atomically) to ``engine_path``."""
    engine_path = Path(engine_path)
    atomic_write_bytes(engine_path, serialize_engine(onnx_path, **kw))
    return engine_path


def _trt_to_torch_dtype(trt, dt):
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    for name, tdt in table.items():
        if hasattr(trt.DataType, name) and dt == getattr(trt.DataType, name):
            return tdt
    raise SmcpError(f"unsupported TensorRT tensor dtype {dt}")


def _deserialize(trt, engine: str | os.PathLike | bytes):
    where = "the in-memory engine" if isinstance(engine, (bytes, bytearray)) else str(engine)
    if not isinstance(engine, (bytes, bytearray)):
        if not Path(engine).exists():
            raise SmcpError(f"TensorRT engine {engine} does not exist")
        engine = Path(engine).read_bytes()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    eng = runtime.deserialize_cuda_engine(bytes(engine))
    if eng is None:
        raise SmcpError(f"TensorRT cannot load {where}: it was built by another TensorRT version or for "
                        "another GPU; rebuild it here")
    return runtime, eng, where


def _bind(trt, eng, context, x, device: str, where: str) -> tuple[dict, dict]:
    """Device buffers, allocated once and bound by address: the input (``x`` in the engine's
    dtype) and one output per engine output, shaped for the input."""
    import torch

    names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
    inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    if len(inputs) != 1:
        raise SmcpError(f"TensorRT engine {where} has {len(inputs)} inputs; smcp expects exactly one")
    name = inputs[0]
    xin = x.detach().to(device, dtype=_trt_to_torch_dtype(trt, eng.get_tensor_dtype(name))).contiguous()
    if not context.set_input_shape(name, tuple(xin.shape)):
        raise SmcpError(f"TensorRT engine {where} does not accept input shape {tuple(xin.shape)}")
    context.set_tensor_address(name, xin.data_ptr())
    outs = {}
    for n in names:
        if n != name:
            dt = _trt_to_torch_dtype(trt, eng.get_tensor_dtype(n))
            outs[n] = torch.empty(tuple(context.get_tensor_shape(n)), dtype=dt, device=device)
            context.set_tensor_address(n, outs[n].data_ptr())
    return {name: xin}, outs


def trt_runner(engine: str | os.PathLike | bytes, x: torch.Tensor) -> Callable[[], object]:
    """A callable running a serialized TensorRT engine (a file or its bytes) once on ``x``.

    Input and output buffers are allocated once, on the GPU, and bound with
    ``set_tensor_address``; each call is one ``execute_async_v3`` enqueued on torch's *current*
    CUDA stream and is asynchronous (no copies, no synchronisation): time it with
    :func:`engine_timer` (CUDA events on that stream, GPU compute time like trtexec's) and call
    ``.sync()`` before reading ``.outputs`` (dict name -> tensor).  Without CUDA (only a stand-in
    ``tensorrt`` module in tests) the buffers are CPU tensors and the call is synchronous."""
    import torch

    trt = ensure_tensorrt()
    runtime, eng, where = _deserialize(trt, engine)
    context = eng.create_execution_context()
    cuda = _cuda_buffers()
    inputs, outs = _bind(trt, eng, context, x, "cuda" if cuda else "cpu", where)
    if cuda:
        torch.cuda.synchronize()

    def run() -> object:
        stream = torch.cuda.current_stream().cuda_stream if cuda else 0
        if not context.execute_async_v3(stream):
            raise SmcpError(f"TensorRT execution of {where} failed")
        return outs

    run.outputs = outs  # type: ignore[attr-defined]
    run.engine = eng  # type: ignore[attr-defined]
    run.sync = torch.cuda.synchronize if cuda else (lambda: None)  # type: ignore[attr-defined]
    run._keep = (runtime, context, inputs)  # type: ignore[attr-defined]  # alive as long as the runner
    return run


def engine_timer() -> Timer:
    """The timer of :func:`trt_runner` calls: CUDA events on the current stream on a GPU (the
    runner enqueues there), wall clock around the synchronous call without one."""
    return device_timer("cuda") if _cuda_buffers() else host_timer()
