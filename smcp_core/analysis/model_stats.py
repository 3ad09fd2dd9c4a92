"""Parameters and MACs of a whole model, measured with a forward pass (for `smcp inspect`).

The channel graph (:meth:`smcp_core.graph.channel_graph.ChannelGraph.flops_params`) counts only the
conv/linear/BN layers it understood; a model with parts it does not understand (attention, custom
modules) is larger than that.  These are the numbers of the whole model:

* parameters: ``sum(p.numel() for p in model.parameters())`` (a shared parameter once);
* MACs of one sample: :class:`torch.utils.flop_counter.FlopCounterMode` over one forward pass (it counts
  the matmuls and convolutions torch dispatches, ``F.linear``, ``@``, ``einsum`` and attention included,
  as FLOPs = 2 x MACs); should it fail, forward hooks on every ``nn.Conv*``/``nn.Linear`` module (which
  miss functional matmuls).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from smcp_core.slim.surgery import count_params

FLOP_COUNTER = "torch.utils.flop_counter.FlopCounterMode"
HOOKS = "forward hooks on nn.Conv*/nn.Linear"


def _run(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of ``model(x)`` (all samples of ``x``) counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _run(model, x)
    return int(counter.get_total_flops()) // 2


def hook_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of ``model(x)`` (all samples of ``x``) of its nn.Conv*/nn.Linear modules, from forward hooks."""
    total = 0

    def hook(mod, inputs, out):
        nonlocal total
        if not isinstance(out, torch.Tensor):
            return
        if isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features
        elif isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            # every input element is scattered to out_channels/groups x kernel outputs
            total += inputs[0].numel() * (mod.out_channels // mod.groups) * math.prod(mod.kernel_size)
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            total += out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        _run(model, x)
    finally:
        for h in handles:
            h.remove()
    return int(total)


def _share(part: int, whole: int | None) -> float | None:
    return part / whole if whole else None


def model_stats(model: nn.Module, x: torch.Tensor, graph_flops: int, graph_params: int) -> dict:
    """Whole-model parameters and MACs per sample of ``x`` (a batch), with the channel graph's
    understood ``graph_flops`` (MACs) / ``graph_params`` and their shares of the whole (0..1).

    ``macs`` is None (and ``macs_error`` says why) when no forward pass could be counted."""
    params = count_params(model)
    n = int(x.shape[0]) if x.dim() else 1
    macs = error = None
    method = FLOP_COUNTER
    try:
        macs = flop_counter_macs(model, x) // max(n, 1)
    except Exception as e:  # noqa: BLE001 - a counter failure must not stop inspect; try the hooks
        error = f"{type(e).__name__}: {e}"
        method = HOOKS
        try:
            macs = hook_macs(model, x) // max(n, 1)
            error = None
        except Exception as e2:  # noqa: BLE001
            error = f"{error}; hooks: {type(e2).__name__}: {e2}"
            method = None
    out = {
        "params": params,
        "macs": macs,
        "macs_method": method,
        "graph_params": int(graph_params),
        "graph_flops": int(graph_flops),
        "graph_params_share": _share(int(graph_params), params),
        "graph_flops_share": _share(int(graph_flops), macs),
    }
    if error:
        out["macs_error"] = error.splitlines()[0][:300]
    return out
