"""Unstructured (per-weight) pruning: SNIP and global magnitude pruning.

These are *not* SMCP: they zero individual weights rather than whole channels, so the model keeps
its shape and a dense runtime (PyTorch, onnxruntime, TensorRT without sparse kernels) runs exactly
as many multiply-adds as before -- **no speed-up, no memory saving**.  They are here as the
classical baselines for accuracy-vs-parameter-count comparisons (see :func:`unstructured_speed_note`).

Methods
-------
* :func:`snip_masks` -- SNIP, "connection sensitivity" (Lee, Ajanthan & Torr, ICLR 2019): at
  initialisation, from **one** batch, every weight ``w`` of the selected layers gets the score
  ``|w * dL/dw|`` normalised by the sum over all selected weights; the globally top ``1 - sparsity``
  fraction is kept.  The masks are decided once and never re-decided: apply them with
  :func:`apply_masks` and train.
* :func:`magnitude_masks` -- global magnitude pruning: keep the globally largest ``|w|``.  Usually
  applied to a *trained* model, followed by fine-tuning with the masks applied (Han et al. 2015);
  applied at initialisation it is a (layer-scale biased) random pruning baseline.

Both return ``{module_name: bool mask}`` where ``mask`` has the shape of
``model.get_submodule(module_name).weight`` and ``True`` means *kept*.  Exactly
``round((1 - sparsity) * N)`` weights are kept (``N`` = number of weights in the selected layers;
at least one when ``sparsity > 0``), ties broken deterministically.  Biases are never pruned.

Masks during training
---------------------
:func:`apply_masks` uses :func:`torch.nn.utils.prune.custom_from_mask`: the module's ``weight``
Parameter is re-registered as ``weight_orig`` (the *same* Parameter object, so an optimizer built
before the call keeps working) and a forward pre-hook computes ``weight = weight_orig * weight_mask``.
The gradient reaching ``weight_orig`` is masked too, so pruned weights stay exactly zero in every
forward pass whatever the optimizer does (momentum, weight decay, Adam).  Weight decay may still
move the hidden ``weight_orig`` entries, which is harmless: they are multiplied by zero.
:func:`remove_masks` bakes the masks in (``weight = weight_orig * mask`` as a plain Parameter).
Call it before ``torch.fx`` tracing, ONNX export or saving a plain ``state_dict`` -- a masked
module's ``state_dict`` has ``weight_orig``/``weight_mask`` instead of ``weight``, and its
``named_parameters()`` order changes.

:func:`sparsity_report` counts the zeros of the *effective* weights (``weight_orig * mask`` when a
mask is applied), per layer and globally.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from smcp_core.errors import SmcpError

__all__ = [
    "prunable_layers",
    "snip_scores",
    "snip_masks",
    "magnitude_scores",
    "magnitude_masks",
    "masks_from_scores",
    "apply_masks",
    "remove_masks",
    "is_masked",
    "sparsity_report",
    "unstructured_speed_note",
]


_DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


LayerSpec = Iterable["str | nn.Module"] | None


def _check_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise SmcpError(
            f"sparsity must be a number in [0, 1) (the fraction of weights to remove), got {sparsity!r}"
        )
    s = float(sparsity)
    if not (0.0 <= s < 1.0):  # also rejects NaN
        raise SmcpError(
            f"sparsity must be in [0, 1) (the fraction of weights to remove, e.g. 0.9), got {sparsity!r}"
        )
    return s


def is_masked(module: nn.Module, name: str = "weight") -> bool:
    """True when ``module.<name>`` is currently masked by :mod:`torch.nn.utils.prune`."""
    return hasattr(module, name + "_orig") and hasattr(module, name + "_mask")


def _effective_weight(module: nn.Module) -> Tensor:
    """The weight the forward pass uses: ``weight_orig * weight_mask`` when masked (the ``weight``
    attribute of a masked module is only refreshed at the next forward pass)."""
    if is_masked(module):
        return module.weight_orig.detach() * module.weight_mask
    return module.weight.detach()


def _has_weight(module: nn.Module) -> bool:
    w = module._parameters.get("weight_orig") if is_masked(module) else module._parameters.get("weight")
    return isinstance(w, torch.Tensor)


def prunable_layers(model: nn.Module, layers: LayerSpec = None) -> dict[str, nn.Module]:
    """The layers whose weights are scored/pruned, ``{qualified_name: module}`` in model order.

    ``layers=None``: every ``nn.Linear`` and convolution (``nn.Conv1d/2d/3d`` and transposed
    convolutions).  Otherwise an iterable of module names (as in ``model.named_modules()``) and/or
    module objects; each must have a ``weight`` Parameter.  A module reached under several names
    (shared) is listed once.
    """
    named: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in seen:
            continue
        seen.add(id(m))
        named[name] = m
    if layers is None:
        out = {n: m for n, m in named.items() if isinstance(m, _DEFAULT_TYPES) and _has_weight(m)}
        if not out:
            raise SmcpError(
                f"{type(model).__name__} has no nn.Linear or convolution layer with a weight to prune"
            )
        return out
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    by_id = {id(m): n for n, m in named.items()}
    wanted: set[str] = set()
    for item in layers:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise SmcpError(f"layers: a {type(item).__name__} module that is not part of the model was given")
            name = by_id[id(item)]
        elif isinstance(item, str):
            if item not in named:
                close = difflib.get_close_matches(item, [n for n in named if n], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SmcpError(f"layers: the model has no module named {item!r}{hint}")
            name = item
        else:
            raise SmcpError(f"layers: expected module names or modules, got {type(item).__name__}")
        if not _has_weight(named[name]):
            raise SmcpError(f"layers: module {name!r} ({type(named[name]).__name__}) has no weight to prune")
        wanted.add(name)
    if not wanted:
        raise SmcpError("layers: an empty selection was given (pass None for every conv/linear layer)")
    return {n: m for n, m in named.items() if n in wanted}


def masks_from_scores(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Keep the globally highest-scoring ``round((1 - sparsity) * N)`` entries (at least one when
    ``sparsity > 0``); return ``{name: bool mask}``.  Ties are broken by position (earlier layer,
    then earlier flat index, first), so the result is deterministic."""
    s = _check_sparsity(sparsity)
    if not scores:
        raise SmcpError("no scores to build masks from (no layer selected)")
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).to(torch.float64).cpu() for n in names])
    n_total = flat.numel()
    n_keep = n_total if s == 0.0 else max(1, min(n_total, int(round((1.0 - s) * n_total))))
    if torch.isnan(flat).any():
        raise SmcpError("pruning scores contain NaN (the loss or the weights are not finite)")
    keep = torch.zeros(n_total, dtype=torch.bool)
    if n_keep == n_total:
        keep[:] = True
    else:
        # stable descending sort: equal scores keep their order, earlier positions win
        order = torch.sort(flat, descending=True, stable=True).indices
        keep[order[:n_keep]] = True
    out: dict[str, Tensor] = {}
    start = 0
    for n in names:
        t = scores[n]
        out[n] = keep[start : start + t.numel()].reshape(t.shape).to(t.device)
        start += t.numel()
    return out


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, Mapping):
        raise SmcpError("batch must be an (inputs, targets) pair, got a mapping")
    if not isinstance(batch, Sequence) or len(batch) != 2:
        raise SmcpError(f"batch must be an (inputs, targets) pair, got {type(batch).__name__}")
    return batch[0], batch[1]


def snip_scores(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch: Sequence[Tensor],
    *,
    layers: LayerSpec = None,
) -> dict[str, Tensor]:
    """SNIP connection sensitivity of every weight of the selected layers, from one batch.

    ``score = |w * dL/dw| / sum over all selected weights of |w * dL/dw|`` (the scores sum to 1),
    ``L = loss_fn(model(inputs), targets)`` with ``batch = (inputs, targets)`` moved to the model's
    device.  The model runs in its current mode (``train()``/``eval()``, your choice); it is left
    unchanged: no ``.grad`` is written (``torch.autograd.grad`` is used) and buffers such as
    BatchNorm running statistics are restored afterwards.  The model must not be masked already
    (SNIP is defined on the dense network at initialisation).
    """
    sel = prunable_layers(model, layers)
    masked = [n for n, m in sel.items() if is_masked(m)]
    if masked:
        raise SmcpError(
            f"SNIP scores the dense model at initialisation, but layer {masked[0]!r} already has a mask "
            "(call remove_masks first or score a fresh model)"
        )
    x, y = _split_batch(batch)
    p0 = next(iter(sel.values())).weight
    if isinstance(x, Tensor):
        x = x.to(p0.device)
    if isinstance(y, Tensor):
        y = y.to(p0.device)
    weights = [m.weight for m in sel.values()]
    if not all(w.requires_grad for w in weights):
        frozen = [n for n, m in sel.items() if not m.weight.requires_grad]
        raise SmcpError(f"SNIP needs gradients, but the weight of layer {frozen[0]!r} has requires_grad=False")
    saved_buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    try:
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise SmcpError("loss_fn must return a scalar tensor")
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in saved_buffers:
                    b.copy_(saved_buffers[k])
    raw: dict[str, Tensor] = {}
    for (name, _m), w, g in zip(sel.items(), weights, grads):
        if g is None:
            g = torch.zeros_like(w)
        raw[name] = (w.detach() * g.detach()).abs()
    total = sum(float(r.sum(dtype=torch.float64)) for r in raw.values())
    if not math.isfinite(total):
        raise SmcpError("SNIP: the sensitivities are not finite (the loss or the gradients overflowed)")
    if total == 0.0:
        raise SmcpError(
            "SNIP: every connection sensitivity is zero (the loss does not depend on the selected weights "
            "for this batch)"
        )
    return {n: (r / total) for n, r in raw.items()}


def snip_masks(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch: Sequence[Tensor],
    sparsity: float,
    *,
    layers: LayerSpec = None,
) -> dict[str, Tensor]:
    """SNIP masks: keep the globally most sensitive ``1 - sparsity`` fraction of the weights.

    Call it once on the freshly initialised model with one batch, then :func:`apply_masks` and train;
    the masks are never re-computed.  Returns ``{module_name: bool mask}`` (``True`` = kept).
    """
    s = _check_sparsity(sparsity)
    return masks_from_scores(snip_scores(model, loss_fn, batch, layers=layers), s)


def magnitude_scores(model: nn.Module, *, layers: LayerSpec = None) -> dict[str, Tensor]:
    """``|w|`` of every weight of the selected layers (the effective weight when already masked, so
    already pruned weights score 0).  No forward pass, no data."""
    sel = prunable_layers(model, layers)
    return {n: _effective_weight(m).abs().clone() for n, m in sel.items()}


def magnitude_masks(model: nn.Module, sparsity: float, *, layers: LayerSpec = None) -> dict[str, Tensor]:
    """Global magnitude pruning: keep the ``1 - sparsity`` fraction of the selected weights with the
    largest ``|w|`` (one threshold for all layers).  Returns ``{module_name: bool mask}``."""
    s = _check_sparsity(sparsity)
    return masks_from_scores(magnitude_scores(model, layers=layers), s)


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Make ``masks`` stick: ``weight = weight_orig * mask`` in every forward pass, gradients of
    pruned weights masked (:func:`torch.nn.utils.prune.custom_from_mask`).

    A layer that is already masked gets its mask *replaced* in place (the optimizer's references stay
    valid); weights pruned by the old mask and kept by the new one restart from zero.  Layers not named
    in ``masks`` are untouched.  Returns ``model``.
    """
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SmcpError(f"masks: the model has no module named {name!r}{hint}")
        m = modules[name]
        if not _has_weight(m):
            raise SmcpError(f"masks: module {name!r} ({type(m).__name__}) has no weight to mask")
        w = m.weight_orig if is_masked(m) else m.weight
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(w.shape):
            raise SmcpError(
                f"masks: the mask for {name!r} has shape {tuple(mask.shape)}, its weight {tuple(w.shape)}"
            )
        mask = (mask != 0).to(device=w.device, dtype=w.dtype)
        if is_masked(m):
            with torch.no_grad():
                # hidden values of weights pruned so far are dropped: a weight revived by the new
                # mask restarts from zero instead of from a stale value
                m.weight_orig.mul_(m.weight_mask)
                m.weight_mask.copy_(mask)
                m.weight = m.weight_orig * m.weight_mask  # refresh before the next forward, too
        else:
            prune.custom_from_mask(m, "weight", mask)
    return model


def remove_masks(model: nn.Module) -> list[str]:
    """Bake every applied mask into a plain ``weight`` Parameter (``weight_orig * mask``) and drop the
    hooks; returns the names of the modules that were unmasked."""
    done = []
    for name, m in model.named_modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(m, hook._tensor_name)
                done.append(name)
    return done


def sparsity_report(model: nn.Module, *, layers: LayerSpec = None) -> dict:
    """Zero fraction of the effective weights, per layer and globally (biases not counted in the
    ``layers``/``global`` figures; ``model`` counts every parameter, biases included).

    Returns ``{"layers": {name: {"shape", "weights", "zeros", "sparsity", "masked"}},
    "global": {"weights", "zeros", "kept", "sparsity"}, "model": {"params", "nonzero"},
    "fully_pruned": [names of layers with every weight zero], "note": unstructured_speed_note(...)}``.
    """
    sel = prunable_layers(model, layers)
    per: dict[str, dict] = {}
    tot = zer = 0
    fully = []
    for name, m in sel.items():
        w = _effective_weight(m)
        n = w.numel()
        z = int((w == 0).sum())
        per[name] = {
            "shape": list(w.shape),
            "weights": n,
            "zeros": z,
            "sparsity": z / n if n else 0.0,
            "masked": is_masked(m),
        }
        tot += n
        zer += z
        if n and z == n:
            fully.append(name)
    params = nonzero = 0
    for m in model.modules():
        for pname, p in m._parameters.items():
            if p is None:
                continue
            if pname == "weight_orig" and is_masked(m):
                t = _effective_weight(m)
            else:
                t = p.detach()
            params += t.numel()
            nonzero += int((t != 0).sum())
    glob = {"weights": tot, "zeros": zer, "kept": tot - zer, "sparsity": zer / tot if tot else 0.0}
    return {
        "layers": per,
        "global": glob,
        "model": {"params": params, "nonzero": nonzero},
        "fully_pruned": fully,
        "note": unstructured_speed_note(glob["sparsity"]),
    }


def unstructured_speed_note(sparsity: float | None = None) -> str:
    """One honest paragraph on what unstructured sparsity does (not) buy at inference time."""
    head = f"{sparsity:.1%} of the pruned layers' weights are zero, but unstructured" if sparsity is not None \
        else "Unstructured"
    return (
        f"{head} sparsity gives no speed-up and no memory saving on dense runtimes (PyTorch, onnxruntime, "
        "TensorRT's dense kernels): the zeros are still stored and multiplied. A gain needs sparse "
        "storage plus sparse kernels (typically only at very high sparsity, mostly for linear layers), "
        "or NVIDIA's 2:4 semi-structured sparsity (exactly 2 non-zeros in every 4 consecutive weights, "
        "Ampere or newer, TensorRT with sparsity enabled; at most ~2x on the matrix multiplies, not "
        "implemented here). For a measured speed-up on any runtime, prune channels (smcp's SMCP)."
    )
