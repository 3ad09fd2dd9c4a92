"""TensorRT engines: build from ONNX (explicit batch, name-based I/O), load and time."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smcp_core.errors import SmcpError
from smcp_core.utils.fsutil import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    import torch


_TRT_MISSING = "TensorRT is not installed: pip install 'smcp[trt]' on a machine with an NVIDIA GPU and driver"


def _cuda_available() -> bool:
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


def _trt_major(trt) -> int:
    try:
        return int(str(getattr(trt, "__version__", "10")).split(".")[0])
    except ValueError:
        return 10


def _onnx_has_qdq(onnx_path: Path) -> bool:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)


def build_trt_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    precision: str = "fp16",
    batch_size: int,
    dynamic_batch: bool = False,
    workspace_gb: float = 4,
    timing_cache: str | os.PathLike | None = None,
) -> Path:
    """Build a serialized TensorRT engine from an ONNX file (TensorRT 10/11 Python API).

    * network created with flags 0 (explicit batch is the only mode since TensorRT 10), parsed with
      ``OnnxParser.parse_from_file``;
    * ``precision``: ``"fp32"``; ``"fp16"`` (TensorRT 10: ``BuilderFlag.FP16``; TensorRT 11 has no
      precision flags -- networks are strongly typed -- so the ONNX model must already be FP16,
      e.g. converted with NVIDIA ModelOpt AutoCast); ``"int8"`` needs an ONNX model with explicit
      QuantizeLinear/DequantizeLinear nodes (TensorRT 10: ``BuilderFlag.INT8`` + ``FP16``);
    * an optimisation profile for the input when its batch dimension is dynamic:
      ``min = 1 if dynamic_batch else batch_size``, ``opt = max = batch_size``;
    * ``workspace_gb`` via ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``;
    * ``timing_cache``: a file read before and written (atomically) after the build;
    * the engine is written atomically.
    """

    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path)
    precision = str(precision).lower()
    if precision not in ("fp32", "fp16", "int8"):
        raise SmcpError(f"unknown TensorRT precision {precision!r}: use fp32, fp16 or int8")
    if int(batch_size) < 1:
        raise SmcpError(f"batch size must be >= 1, got {batch_size}")
    trt = ensure_tensorrt()
    if not onnx_path.exists():
        raise SmcpError(f"ONNX model {onnx_path} does not exist")

    major = _trt_major(trt)
    flags = getattr(trt, "BuilderFlag", None)
    has_fp16_flag = flags is not None and hasattr(flags, "FP16")
    has_int8_flag = flags is not None and hasattr(flags, "INT8")
    if precision == "int8" and not _onnx_has_qdq(onnx_path):
        raise SmcpError(
            f"int8 TensorRT engines need an ONNX model with QuantizeLinear/DequantizeLinear nodes, "
            f"and {onnx_path} has none: quantize it first (e.g. NVIDIA ModelOpt) or use --precision fp16"
        )

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise SmcpError(
            f"TensorRT cannot parse {onnx_path}: " + ("; ".join(e.strip() for e in errs[:3]) or "unknown parser error")
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(float(workspace_gb) * (1 << 30)))
    if precision == "fp16":
        if has_fp16_flag:
            config.set_flag(trt.BuilderFlag.FP16)
        elif not _onnx_is_fp16(onnx_path):
            raise SmcpError(
                f"TensorRT {major} builds strongly typed networks only (no FP16 builder flag): "
                f"convert {onnx_path} to FP16 first (NVIDIA ModelOpt AutoCast) or use --precision fp32"
            )
    elif precision == "int8" and has_int8_flag:
        config.set_flag(trt.BuilderFlag.INT8)
        if has_fp16_flag:
            config.set_flag(trt.BuilderFlag.FP16)

    # optimisation profile for dynamic input dimensions
    b = int(batch_size)
    profile = None
    for k in range(network.num_inputs):
        inp = network.get_input(k)
        shape = tuple(int(d) for d in inp.shape)
        if any(d < 0 for d in shape[1:]):
            raise SmcpError(
                f"input {inp.name} of {onnx_path} has dynamic non-batch dimensions {shape}: "
                "export with fixed spatial size"
            )
        if shape and shape[0] < 0:
            if profile is None:
                profile = builder.create_optimization_profile()
            rest = shape[1:]
            lo = 1 if dynamic_batch else b
            profile.set_shape(inp.name, (lo, *rest), (b, *rest), (b, *rest))
        elif dynamic_batch:
            raise SmcpError(
                f"{onnx_path} has a fixed batch size {shape[0] if shape else '?'}: export it with a dynamic batch "
                "to build a dynamic-batch engine"
            )
        elif shape and shape[0] != b:
            raise SmcpError(f"{onnx_path} has fixed batch size {shape[0]}, but batch size {b} was asked")
    if profile is not None:
        config.add_optimization_profile(profile)

    cache = None
    if timing_cache is not None:
        tc_path = Path(timing_cache)
        blob = tc_path.read_bytes() if tc_path.exists() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SmcpError(
            f"TensorRT failed to build an engine from {onnx_path} (precision {precision}, batch {b}); "
            "see the TensorRT log above"
        )
    atomic_write_bytes(engine_path, bytes(serialized))
    if timing_cache is not None:
        tc = config.get_timing_cache()
        if tc is not None:
            atomic_write_bytes(Path(timing_cache), bytes(tc.serialize()))
    return engine_path


def _onnx_is_fp16(onnx_path: Path) -> bool:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in m.graph.initializer)


def _trt_to_torch_dtype(trt, dt):
    import torch

    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
        "UINT8": torch.uint8,
    }
    for name, tdt in table.items():
        if hasattr(trt.DataType, name) and dt == getattr(trt.DataType, name):
            return tdt
    raise SmcpError(f"unsupported TensorRT tensor dtype {dt}")


def trt_runner(engine_path: str | os.PathLike, x: torch.Tensor) -> Callable[[], object]:
    """A callable running a serialized TensorRT engine once on ``x`` (synchronously).

    Buffers are CUDA torch tensors bound with ``set_tensor_address(name, tensor.data_ptr())``; each
    call is ``execute_async_v3`` on a dedicated CUDA stream followed by a stream synchronisation,
    so the callable can be timed directly with :func:`bench.time_one` (no ``sync`` needed).  The
    returned callable has ``.outputs`` (dict name -> CUDA tensor) and ``.engine`` attributes.
    """
    import torch

    trt = ensure_tensorrt()
    engine_path = Path(engine_path)
    if not engine_path.exists():
        raise SmcpError(f"TensorRT engine {engine_path} does not exist")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise SmcpError(
            f"TensorRT cannot load engine {engine_path}: it was built by another TensorRT version or for "
            "another GPU; rebuild it here"
        )
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]
    if len(inputs) != 1:
        raise SmcpError(f"TensorRT engine {engine_path} has {len(inputs)} inputs; smcp expects exactly one")
    buffers: dict[str, Any] = {}
    name = inputs[0]
    xin = x.detach().to("cuda", dtype=_trt_to_torch_dtype(trt, engine.get_tensor_dtype(name))).contiguous()
    if not context.set_input_shape(name, tuple(xin.shape)):
        raise SmcpError(f"TensorRT engine {engine_path} does not accept input shape {tuple(xin.shape)}")
    buffers[name] = xin
    context.set_tensor_address(name, xin.data_ptr())
    outs = {}
    for n in outputs:
        shape = tuple(context.get_tensor_shape(n))
        t = torch.empty(shape, dtype=_trt_to_torch_dtype(trt, engine.get_tensor_dtype(n)), device="cuda")
        outs[n] = t
        context.set_tensor_address(n, t.data_ptr())
    torch.cuda.synchronize()

    def run() -> object:
        if not context.execute_async_v3(stream.cuda_stream):
            raise SmcpError(f"TensorRT execution of {engine_path} failed")
        stream.synchronize()
        return outs

    run.outputs = outs  # type: ignore[attr-defined]
    run.engine = engine  # type: ignore[attr-defined]
    run._keep = (runtime, context, stream, buffers)  # type: ignore[attr-defined]  # keep alive
    return run
