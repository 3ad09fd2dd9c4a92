"""Batch-norm rescaling after mask changes (``prune.bn_rescaling``).

Removing input channels of a conv shrinks the variance of its output; a training-mode batch norm
right after it re-normalises that output, so its backward gain ``gamma / sigma`` grows and the
gradient reaching the surviving weights is amplified.  Rescaling the batch norm's ``gamma`` by one
scalar ``s`` per layer counters this:

* ``off``: ``s = 1`` always;
* ``kept_fraction``: ``s`` = kept input channels / all input channels of the conv;
* ``kept_importance``: ``s`` = importance of the kept input channels / importance of all of them.

``s = 0`` when nothing is kept (the layer is dead until its inputs come back).  ``gamma`` is
re-parameterised as ``gamma_orig * s`` with a backward that divides by ``s``: the effective
``gamma`` then receives exactly the update a plain parameter would, and the unscaled value is
remembered so that a channel coming back finds its old scale.  :meth:`BNScaler.bake` writes
``gamma_orig * s`` back into a plain parameter at the end.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from smcp_core.graph.channel_graph import ChannelGraph

MODES = ("off", "kept_fraction", "kept_importance")


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # noqa: D401
        ctx.save_for_backward(s)
        return g * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (s,) = ctx.saved_tensors
        safe = torch.where(s != 0, s, torch.ones_like(s))
        return torch.where(s != 0, grad / safe, torch.zeros_like(grad)), None


class GammaScale(nn.Module):
    """Parametrisation ``gamma -> gamma * s`` (gradient of ``gamma`` divided by ``s``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("s", torch.ones(()))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return _ScaleGrad.apply(g, self.s.to(g.dtype))


def following_batchnorms(graph: ChannelGraph) -> dict[str, int]:
    """Batch norms that directly normalise a masked conv's output: name -> layer index."""
    names = {layer.node: layer.index for layer in graph.layers if layer.kind == "conv"}
    out: dict[str, int] = {}
    for node in graph.gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = graph.modules.get(node.target)
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or not mod.affine:
            continue
        src = node.args[0] if node.args else None
        if isinstance(src, torch.fx.Node) and src.name in names and len(src.users) == 1:
            out[str(node.target)] = names[src.name]
    return out


class BNScaler:
    def __init__(self, model: nn.Module, graph: ChannelGraph, mode: str = "off") -> None:
        if mode not in MODES:
            raise ValueError(f"bn_rescaling {mode!r}")
        self.mode = mode
        self.graph = graph
        self.items: list[tuple[nn.Module, torch.Tensor]] = []  # (bn, input labels of its conv)
        if mode == "off":
            return
        modules = dict(model.named_modules())
        for name, li in following_batchnorms(graph).items():
            bn = modules[name]
            parametrize.register_parametrization(bn, "weight", GammaScale())
            self.items.append((bn, graph.layers[li].in_labels))

    def to(self, device) -> BNScaler:
        self.items = [(bn, lab.to(device)) for bn, lab in self.items]
        return self

    @torch.no_grad()
    def update(self, keep: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Set every scale from the new keep-mask (and, for ``kept_importance``, the scores that
        chose it)."""
        for bn, lab in self.items:
            k = keep.to(lab.device)[lab].to(torch.float32)
            if self.mode == "kept_importance" and scores is not None:
                sc = scores.to(lab.device)[lab].to(torch.float32)
                tot = sc.sum()
                s = torch.where(tot > 0, (sc * k).sum() / tot.clamp_min(1e-30), torch.zeros_like(tot))
            else:
                s = k.sum() / k.numel()
            bn.parametrizations.weight[0].s.copy_(s)

    def scales(self) -> list[float]:
        return [float(bn.parametrizations.weight[0].s) for bn, _ in self.items]

    def bake(self) -> None:
        """Replace every re-parameterised ``gamma`` by its effective value ``gamma_orig * s``."""
        for bn, _ in self.items:
            parametrize.remove_parametrizations(bn, "weight", leave_parametrized=True)
        self.items = []
