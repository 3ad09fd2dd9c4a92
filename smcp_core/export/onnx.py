"""Export a (pruned, slimmed) model: ONNX, ONNX-vs-torch parity, TensorRT engines and runners.

All heavy imports (torch.onnx, onnx, onnxruntime, tensorrt) happen inside the functions.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from smcp_core.errors import SmcpError
from smcp_core.profile.timing import ort_session
from smcp_core.utils.fsutil import make_temp_beside
from smcp_core.utils.text import first_line

if TYPE_CHECKING:  # pragma: no cover
    import torch


INPUT_NAME = "input"


OUTPUT_NAME = "output"






def _reason(e: BaseException) -> str:
    """One line: the innermost cause of an exporter error (torch.onnx wraps the real one)."""
    root = e
    seen = {id(root)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    return first_line(root)


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


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    dtype: str = "float32",
) -> Path:
    """Export ``model`` (an ``nn.Module`` or ``torch.fx.GraphModule``) to a single ONNX file.

    * eval mode during export (the previous train/eval mode is restored afterwards);
    * the ``torch.export``-based exporter (``dynamo=True``), input ``"input"``, output ``"output"``,
      weights inside the file (no external data);
    * ``dynamic_batch``: dimension 0 is symbolic (``"batch"``).  The exporter specialises a batch of
      1, so an example of batch < 2 is repeated to batch 2 for tracing;
    * if the dynamo exporter fails, the legacy TorchScript exporter is tried once;
    * the file is checked with ``onnx.checker.check_model`` and moved into place atomically;
    * ``dtype="float16"``: a half-precision copy of the model (the caller's is left alone) exported
      with a half input: an fp16 ONNX model (what TensorRT 11 builds fp16 engines from).

    Any failure raises :class:`SmcpError` with the exporter's one-line reason.
    """
    path = Path(path)
    model, example = _export_inputs(model, example, dtype, dynamic_batch)
    tmp = make_temp_beside(path)
    was_training = model.training
    model.eval()
    try:
        _export_either(model, example, tmp, opset=opset, dynamic_batch=dynamic_batch)
        _check_onnx_file(tmp)
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        for leftover in (tmp, tmp.parent / (tmp.name + ".data")):  # external data is never asked for
            try:
                leftover.unlink(missing_ok=True)
            except OSError:
                pass
    return path


def _export_inputs(model: torch.nn.Module, example, dtype: str, dynamic_batch: bool):
    """The model and example to trace: the example on the model's device (repeated to batch 2 for a
    dynamic batch), both in half precision for ``float16`` (a copy of the model)."""
    import torch

    if not isinstance(example, torch.Tensor):
        raise SmcpError("export_onnx needs an example input tensor")
    if example.dim() == 0:
        raise SmcpError("export_onnx needs an example input with a batch dimension")
    try:
        dev = next(iter(model.parameters())).device
    except StopIteration:
        dev = example.device
    example = example.detach().to(dev)
    if dtype == "float16":
        model, example = copy.deepcopy(model).half(), example.half()
    elif dtype != "float32":
        raise SmcpError(f"ONNX export supports dtype float32 or float16, not {dtype}")
    if dynamic_batch and example.shape[0] < 2:
        example = example[:1].repeat(2, *[1] * (example.dim() - 1))
    return model, example


def _export_either(model, example, out: Path, *, opset: int, dynamic_batch: bool) -> None:
    """The torch.export-based exporter, or once it fails the legacy TorchScript one (with a warning);
    both failing is one :class:`SmcpError` with both reasons."""
    try:
        _export_dynamo(model, example, out, opset=opset, dynamic_batch=dynamic_batch)
        return
    except Exception as e:  # the exporter raises many exception types
        dynamo_err = e
    try:
        _export_legacy(model, example, out, opset=opset, dynamic_batch=dynamic_batch)
    except Exception as legacy_err:
        r1, r2 = _reason(dynamo_err), _reason(legacy_err)
        also = "" if r1 == r2 else f" (legacy exporter: {r2})"
        raise SmcpError(f"ONNX export of {type(model).__name__} failed: {r1}{also}") from dynamo_err
    warnings.warn(
        f"torch.export-based ONNX export failed ({_reason(dynamo_err)}); used the legacy "
        "TorchScript exporter, which bakes data-dependent branches in: check parity",
        RuntimeWarning,
        stacklevel=3,
    )


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
        raise SmcpError(f"exported ONNX model failed onnx.checker: {first_line(e)}") from e


def onnx_parity(model: torch.nn.Module, onnx_path: str | os.PathLike, x: torch.Tensor) -> dict:
    """Run ``model`` (eval, float32) and the ONNX file (onnxruntime CPU) on the same input.

    Returns ``max_abs_diff``; ``max_rel_diff`` = ``max_abs_diff / max|torch output|`` (error
    relative to the output's scale; robust to outputs near zero); ``top1_agree`` = fraction of
    samples whose argmax over dim 1 agrees (for outputs of rank >= 2; spatial positions count as
    samples); ``n`` the batch size and ``output_shape``.
    """
    import numpy as np

    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        raise SmcpError(f"ONNX model {onnx_path} does not exist")
    ref_np = reference_output(model, x)
    sess = ort_session(onnx_path)
    feeds = {sess.get_inputs()[0].name: x.detach().float().cpu().numpy()}
    try:
        got = sess.run(None, feeds)[0]
    except Exception as e:
        raise SmcpError(f"onnxruntime failed to run {onnx_path} on input of shape {tuple(x.shape)}: "
                        f"{first_line(e)}") from e
    got = np.asarray(got, dtype=np.float32)
    if got.shape != ref_np.shape:
        raise SmcpError(
            f"ONNX model {onnx_path} returns shape {got.shape}, but the torch model returns {ref_np.shape}"
        )
    return {
        **output_agreement(ref_np, got),
        "n": int(ref_np.shape[0]) if ref_np.ndim else 1,
        "output_shape": list(ref_np.shape),
    }


def reference_output(model: torch.nn.Module, x: torch.Tensor):
    """``model``'s output on ``x`` (eval mode, then its mode restored; the first of a tuple) as a
    float32 numpy array: what an exported model is compared against."""
    import torch

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
    return ref.detach().float().cpu().numpy()


def output_agreement(ref, got) -> dict:
    """How closely ``got`` matches ``ref`` (numpy arrays of one shape): ``max_abs_diff``,
    ``max_rel_diff`` (over ``max|ref|``) and ``top1_agree`` (argmax over dim 1; spatial positions
    count as samples; None below rank 2)."""
    import numpy as np

    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    top1 = None
    if ref.ndim >= 2 and ref.size:
        a = ref.reshape(ref.shape[0], ref.shape[1], -1).argmax(axis=1)
        b = got.reshape(got.shape[0], got.shape[1], -1).argmax(axis=1)
        top1 = float((a == b).mean())
    return {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "top1_agree": top1}
