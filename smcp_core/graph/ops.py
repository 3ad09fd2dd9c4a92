"""What the channel graph knows of each fx node kind: modules, functions and tensor methods that pass
channels through unchanged, act channel-wise, join channel spaces (binary ops, concatenation), or
reshape them (flatten, split, permute, shuffle)."""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

_PASS_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d, nn.ConstantPad2d,
)


_BN_MODULES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# elementwise (per-value) modules/functions/methods: they pass channels through whichever dimension
# holds them, so they are also understood on channels-last tensors (after a permute)
_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.AlphaDropout,
)


_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.elu, F.selu,
    F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout2d,
    torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.clip,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
    F.interpolate, torch.neg, torch.abs, torch.exp,
}


_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.elu, F.selu,
    F.mish, F.softplus, F.hardtanh, F.dropout, torch.relu, torch.sigmoid, torch.tanh, torch.clamp,
    torch.clip, torch.neg, torch.abs, torch.exp,
}


_PASS_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "clip", "contiguous",
    "clone", "float", "half", "to", "detach", "neg", "abs", "exp", "type_as",
}


_BINARY = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}


_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}


_CAT = {torch.cat, torch.concat}


_FLATTEN = {torch.flatten}


_MEAN = {torch.mean, torch.sum, torch.amax}


_SPLIT = {torch.split, torch.chunk}


_PERMUTE = {torch.permute, torch.transpose, torch.swapaxes, torch.swapdims}


_PERMUTE_METHODS = {"permute", "transpose", "swapaxes", "swapdims"}


_SHUFFLE = ("reshape/view that splits the channel dimension (a channel shuffle: the channel order "
            "it interleaves cannot be pruned)")


def _known_pass_function(target: Any) -> bool:
    if target in _PASS_FUNCTIONS:
        return True
    name = getattr(target, "__name__", "")
    mod = getattr(target, "__module__", "") or ""
    # torchvision.ops.stochastic_depth is fx-wrapped; it is identity-shaped (drops whole samples).
    return name == "stochastic_depth" and mod.startswith("torchvision")


def _channels_last_ok(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is understood when an input carries its channels on a dimension other than
    1 (elementwise ops, binary ops, permutes, Linear on the last dimension, LayerNorm)."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        return isinstance(mod, (*_ELEMENTWISE_MODULES, nn.Linear, nn.LayerNorm)) or (
            type(mod).__name__ == "StochasticDepth")
    if node.op == "call_function":
        t = node.target
        return (t in _ELEMENTWISE_FUNCTIONS or t in _BINARY or t in _PERMUTE or t is F.layer_norm
                or t is getattr or (_known_pass_function(t) and t not in _PASS_FUNCTIONS))
    if node.op == "call_method":
        m = str(node.target)
        return (m in _PASS_METHODS or m in _BINARY_METHODS or m in _PERMUTE_METHODS
                or m in ("size", "dim", "numel"))
    return node.op == "output"


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


# ops whose output may share memory with their (first) input: an in-place op on their output
# also writes into that input
_ALIAS_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "swapaxes", "swapdims", "t",
    "flatten", "unflatten", "contiguous", "expand", "expand_as", "squeeze", "unsqueeze", "narrow",
    "chunk", "split", "unbind", "select", "detach", "to", "float", "half", "type_as",
}
_ALIAS_FUNCTIONS = {operator.getitem, torch.flatten, torch.permute, torch.transpose, torch.reshape,
                    torch.split, torch.chunk, torch.squeeze, torch.unsqueeze, torch.narrow}
_ALIAS_MODULES: tuple[type, ...] = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d,
                                    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` writes into its first argument (``x.relu_()``, ``x.add_(y)``,
    ``torch.relu_(x)``, ``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``, ``x += y``): it
    has an effect even when its result is unused, so it must never be dropped as dead code."""
    if node.op == "call_method":
        m = str(node.target)
        return m.endswith("_") and not m.startswith("_")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
            return True
        if len(node.args) > 1 and callable(node.target):  # F.relu(x, True), F.dropout(x, p, False, True)
            try:
                bound = inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments
            except (TypeError, ValueError):
                bound = {}
            if bound.get("inplace") is True:
                return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_module":
        return getattr(modules.get(str(node.target)), "inplace", False) is True
    return False


def is_alias(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s output may be (a view of) its first argument's memory."""
    if node.op == "call_method":
        return str(node.target) in _ALIAS_METHODS or is_inplace(node, modules)
    if node.op == "call_function":
        return node.target in _ALIAS_FUNCTIONS or is_inplace(node, modules)
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _ALIAS_MODULES) or is_inplace(node, modules)
    return False
