"""Input-channel masks as weight re-parameterisations.

Every consumer layer (conv with groups=1, linear) of the channel graph gets a parametrisation of its
``weight``: the forward uses ``W * m`` where ``m`` is the layer's input-channel mask, gathered from
one shared per-class mask vector (so all layers of a group see the same mask).  The dense ``W`` stays
the trainable parameter.

* ``soft`` (SMCP): the gradient reaches ``W`` unchanged (straight-through), so masked channels keep
  learning and can come back at the next mask update.
* ``hard``: the gradient is masked too; masked weights are frozen but keep their values.
* ``permanent`` (HALP-like): as ``hard``, and every mask change also zeroes the masked weights in
  place, so a channel that comes back at a later update starts again from zero.

Pruned decay adds ``lambda * (1 - m) * W`` to the gradient of every masked weight, pulling pruned
weights towards zero without touching kept ones.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from smcp_core.graph.channel_graph import ChannelGraph


class MaskBank(nn.Module):
    """Holds the shared per-class mask (1 = kept) as a buffer so it moves with ``.to(device)``."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("class_mask", torch.ones(n_classes))


class InputChannelMask(nn.Module):
    """Parametrisation ``W -> W * m[labels]`` broadcast over the input-channel dimension."""

    def __init__(self, bank: MaskBank, labels: torch.Tensor, ndim: int, soft: bool) -> None:
        super().__init__()
        # the bank is shared: keep it out of this module's state dict and children
        object.__setattr__(self, "bank", bank)
        self.register_buffer("labels", labels.clone(), persistent=False)
        self.shape = [1, -1] + [1] * (ndim - 2)
        self.soft = soft

    def mask(self) -> torch.Tensor:
        return self.bank.class_mask[self.labels].view(self.shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        m = self.mask().to(w.dtype)
        if self.soft:
            # value W*m, gradient straight through to W
            return w - (w * (1 - m)).detach()
        return w * m


class Masker:
    """Applies/removes masks on a model according to a channel graph."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, *, mode: str = "soft") -> None:
        if mode not in ("soft", "hard", "permanent"):
            raise ValueError(f"mask mode {mode!r}")
        self.model = model
        self.graph = graph
        self.mode = mode
        self.bank = MaskBank(graph.n_classes)
        modules = dict(model.named_modules())
        self.layers: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        device = next(model.parameters()).device
        self.bank.to(device)
        for layer in graph.consumers:
            mod = modules[layer.name]
            labels = layer.in_labels.to(device)
            parametrize.register_parametrization(
                mod, "weight", InputChannelMask(self.bank, labels, mod.weight.dim(), mode == "soft")
            )
            self.layers.append((mod, labels, layer.out_labels.to(device)))

    # ------------------------------------------------------------------
    @property
    def class_mask(self) -> torch.Tensor:
        return self.bank.class_mask

    def set_keep(self, keep: torch.Tensor) -> None:
        self.bank.class_mask.copy_(keep.to(self.bank.class_mask.device, self.bank.class_mask.dtype))
        if self.mode == "permanent":
            with torch.no_grad():
                for mod, lin, _ in self.layers:
                    w = self.dense_weight(mod)
                    w.mul_(self.bank.class_mask[lin].view([1, -1] + [1] * (w.dim() - 2)).to(w.dtype))

    def keep(self) -> torch.Tensor:
        return self.bank.class_mask > 0.5

    def to(self, device: torch.device | str) -> Masker:
        self.bank.to(device)
        self.layers = [(m, i.to(device), o.to(device)) for m, i, o in self.layers]
        for mod, _, _ in self.layers:
            p = mod.parametrizations.weight[0]
            p.labels = p.labels.to(device)
        return self

    @staticmethod
    def dense_weight(mod: nn.Module) -> torch.Tensor:
        return mod.parametrizations.weight.original

    def weights_and_grads(self):
        """Yield (dense weight, its grad, in_labels, out_labels) for every masked layer."""
        for mod, lin, lout in self.layers:
            w = self.dense_weight(mod)
            yield w, w.grad, lin, lout

    @torch.no_grad()
    def apply_pruned_decay(self, strength: float) -> None:
        """grad += strength * (1 - m) * W on every masked weight (call after AMP unscaling)."""
        if strength <= 0:
            return
        for mod, lin, _ in self.layers:
            w = self.dense_weight(mod)
            if w.grad is None:
                continue
            inv = (1 - self.bank.class_mask[lin]).view([1, -1] + [1] * (w.dim() - 2)).to(w.dtype)
            w.grad.add_(w * inv, alpha=strength)

    def remove(self, *, bake: bool = True) -> None:
        """Remove the parametrisations; with ``bake`` the weights become ``W * m``."""
        for mod, _, _ in self.layers:
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=bake)
        self.layers = []


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with parametrised weights under their plain names (dense, unmasked values)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if ".parametrizations." in k:
            if not k.endswith(".original"):
                continue
            k = k.replace(".parametrizations.weight.original", ".weight")
        out[k] = v
    return out


def masked_state_dict(model: nn.Module, masker: Masker) -> dict[str, torch.Tensor]:
    """Like :func:`dense_state_dict` but with every masked weight multiplied by its mask."""
    sd = dense_state_dict(model)
    modules = {id(m): n for n, m in model.named_modules()}
    for mod, _, _ in masker.layers:
        name = modules[id(mod)]
        p = mod.parametrizations.weight[0]
        sd[f"{name}.weight"] = (sd[f"{name}.weight"] * p.mask().to(sd[f"{name}.weight"].dtype)).detach()
    return sd
