"""Export a (pruned, slimmed) model: ONNX, ONNX-vs-torch parity, TensorRT engines and runners.

All heavy imports (torch.onnx, onnx, onnxruntime, tensorrt) happen inside the functions.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import SmcpError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "export_onnx",
    "onnx_parity",
    "ensure_tensorrt",
    "build_trt_engine",
    "trt_runner",
]

INPUT_NAME = "input"
OUTPUT_NAME = "output"

_TRT_MISSING = "TensorRT is not installed: pip install 'smcp[trt]' on a machine with an NVIDIA GPU and driver"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(e: BaseException, limit: int = 300) -> str:
    for line in _ANSI.sub("", str(e)).strip().splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(e).__name__


def _reason(e: BaseException) -> str:
    """One line: the innermost cause of an exporter error (torch.onnx wraps the real one)."""
    root = e
    seen = {id(root)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    return _first_line(root)


@contextlib.contextmanager
def _quiet():
    """Silence exporter chatter: warnings, stdout/stderr prints and torch's logging below ERROR."""
    torch_logger = logging.getLogger("torch")
    old_level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
    finally:
        torch_logger.setLevel(old_level)


# --------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------


def export_onnx(
    model: "torch.nn.Module",
    example: "torch.Tensor",
    path: str | os.PathLike,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` (an ``nn.Module`` or ``torch.fx.GraphModule``) to a single ONNX file.

    * eval mode during export (the previous train/eval mode is restored afterwards);
    * the ``torch.export``-based exporter (``dynamo=True``), input ``"input"``, output ``"output"``,
      weights inside the file (no external data);
    * ``dynamic_batch``: dimension 0 is symbolic (``"batch"``).  The exporter specialises a batch of
      1, so an example of batch < 2 is repeated to batch 2 for tracing;
    * if the dynamo exporter fails, the legacy TorchScript exporter is tried once;
    * the file is checked with ``onnx.checker.check_model`` and moved into place atomically.

    Any failure raises :class:`SmcpError` with the exporter's one-line reason.
    """
    import torch

    from .fsutil import make_temp_beside

    path = Path(path)
    if not isinstance(example, torch.Tensor):
        raise SmcpError("export_onnx needs an example input tensor")
    if example.dim() == 0:
        raise SmcpError("export_onnx needs an example input with a batch dimension")
    try:
        dev = next(iter(model.parameters())).device
    except StopIteration:
        dev = example.device
    example = example.detach().to(dev)
    if dynamic_batch and example.shape[0] < 2:
        reps = [2] + [1] * (example.dim() - 1)
        example = example[:1].repeat(*reps)

    tmp = make_temp_beside(path)
    was_training = model.training
    model.eval()
    try:
        dynamo_err = None
        try:
            _export_dynamo(model, example, tmp, opset=opset, dynamic_batch=dynamic_batch)
        except Exception as e:  # the exporter raises many exception types
            dynamo_err = e
        if dynamo_err is not None:
            try:
                _export_legacy(model, example, tmp, opset=opset, dynamic_batch=dynamic_batch)
            except Exception as legacy_err:
                r1, r2 = _reason(dynamo_err), _reason(legacy_err)
                also = "" if r1 == r2 else f" (legacy exporter: {r2})"
                raise SmcpError(f"ONNX export of {type(model).__name__} failed: {r1}{also}") from dynamo_err
            warnings.warn(
                f"torch.export-based ONNX export failed ({_reason(dynamo_err)}); used the legacy "
                "TorchScript exporter, which bakes data-dependent branches in: check parity",
                RuntimeWarning,
                stacklevel=2,
            )
        _check_onnx_file(tmp)
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass
        extra = tmp.parent / (tmp.name + ".data")  # external data is never asked for; be tidy anyway
        if extra.exists():
            try:
                extra.unlink()
            except OSError:
                pass
    return path


def _export_dynamo(model, example, out: Path, *, opset: int, dynamic_batch: bool) -> None:
    import torch

    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(out),
            dynamo=True,
            opset_version=opset,
            external_data=False,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
        )


def _export_legacy(model, example, out: Path, *, opset: int, dynamic_batch: bool) -> None:
    import torch

    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(out),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
        )


def _check_onnx_file(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise SmcpError(f"exported ONNX model failed onnx.checker: {_first_line(e)}") from e


def onnx_parity(model: "torch.nn.Module", onnx_path: str | os.PathLike, x: "torch.Tensor") -> dict:
    """Run ``model`` (eval, float32) and the ONNX file (onnxruntime CPU) on the same input.

    Returns ``max_abs_diff``; ``max_rel_diff`` = ``max_abs_diff / max|torch output|`` (error
    relative to the output's scale; robust to outputs near zero); ``top1_agree`` = fraction of
    samples whose argmax over dim 1 agrees (for outputs of rank >= 2; spatial positions count as
    samples); ``n`` the batch size and ``output_shape``.
    """
    import numpy as np
    import torch

    from .bench import ort_session

    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        raise SmcpError(f"ONNX model {onnx_path} does not exist")
    try:
        dev = next(iter(model.parameters())).device
    except StopIteration:
        dev = torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ref = model(x.to(dev))
    finally:
        model.train(was_training)
    if isinstance(ref, (tuple, list)):
        ref = ref[0]
    ref_np = ref.detach().float().cpu().numpy()
    sess = ort_session(onnx_path)
    feeds = {sess.get_inputs()[0].name: x.detach().float().cpu().numpy()}
    try:
        got = sess.run(None, feeds)[0]
    except Exception as e:
        raise SmcpError(f"onnxruntime failed to run {onnx_path} on input of shape {tuple(x.shape)}: {_first_line(e)}") from e
    got = np.asarray(got, dtype=np.float32)
    if got.shape != ref_np.shape:
        raise SmcpError(
            f"ONNX model {onnx_path} returns shape {got.shape}, but the torch model returns {ref_np.shape}"
        )
    diff = np.abs(got.astype(np.float64) - ref_np.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref_np).max()) if ref_np.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    top1 = None
    if ref_np.ndim >= 2 and ref_np.size:
        a = ref_np.reshape(ref_np.shape[0], ref_np.shape[1], -1).argmax(axis=1)
        b = got.reshape(got.shape[0], got.shape[1], -1).argmax(axis=1)
        top1 = float((a == b).mean())
    return {
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "top1_agree": top1,
        "n": int(ref_np.shape[0]) if ref_np.ndim else 1,
        "output_shape": list(ref_np.shape),
    }


# --------------------------------------------------------------------------------------------------
# TensorRT
# --------------------------------------------------------------------------------------------------


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
    from .fsutil import atomic_write_bytes

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


def trt_runner(engine_path: str | os.PathLike, x: "torch.Tensor") -> Callable[[], object]:
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
