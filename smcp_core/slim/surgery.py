"""Physical channel removal.

Given a model whose masked weights are already baked in (``W * m``) and a keep-mask over channel
classes, :func:`slim_model` re-traces the model and

1. slices every conv/linear/BN/depthwise layer to its kept input and output channels;
2. rewrites the few functional ops whose arguments count channels (channel ``F.pad``, channel
   slices ``x[:, a:b]``, ``split``/``chunk``);
3. replaces a consumer that keeps no input channel (a removed layer) by the constant it computes
   (its bias, or zeros), folds that constant through the following BN/activations, and lets
   dead-code elimination drop the producers that fed it.

Because a pruned class is masked in *every* layer that reads it, removing it changes nothing: the
slim model computes the same function as the masked model (checked by :func:`max_abs_diff`).
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from smcp_core.errors import SmcpError
from smcp_core.graph.channel_graph import ChannelGraph, trace
from smcp_core.graph.ops import (
    _BN_MODULES,
    _ELEMENTWISE_FUNCTIONS,
    _ELEMENTWISE_MODULES,
    _PASS_FUNCTIONS,
    _known_pass_function,
    is_alias,
    is_inplace,
)
from smcp_core.utils.fsutil import atomic_write_with


class ConstantChannels(nn.Module):
    """Outputs a per-channel constant map; the batch size is taken from ``ref``.

    ``value`` has shape ``(1, C, 1, ...)`` (or, with ``cdim`` > 1, ``C`` on that dimension, for
    channels-last tensors); ``spatial`` are the sizes of the other non-batch dimensions, in order."""

    def __init__(self, value: torch.Tensor, spatial: tuple[int, ...], cdim: int = 1) -> None:
        super().__init__()
        self.register_buffer("value", value)
        self.spatial = tuple(int(s) for s in spatial)
        self.cdim = int(cdim)

    @property
    def channels(self) -> int:
        return int(self.value.shape[self.cdim])

    def forward(self, ref: torch.Tensor) -> torch.Tensor:
        shape = list(self.spatial)
        shape.insert(self.cdim - 1, self.value.shape[self.cdim])
        return self.value.expand(ref.shape[0], *shape)


def _sl(t: torch.Tensor | None, idx: torch.Tensor, dim: int = 0) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().index_select(dim, idx).clone()


def _new_conv(old: nn.Conv2d, cin: int, cout: int, groups: int) -> nn.Conv2d:
    # skip_init: the weights are overwritten right away, so don't pay for (or warn about) init
    return torch.nn.utils.skip_init(
        nn.Conv2d, cin, cout, old.kernel_size, old.stride, old.padding, old.dilation, groups,
        bias=old.bias is not None, padding_mode=old.padding_mode,
        device=old.weight.device, dtype=old.weight.dtype,
    )


def _set_module(gm: fx.GraphModule, name: str, mod: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, mod)


def slim_model(model: nn.Module, graph: ChannelGraph, keep: torch.Tensor) -> fx.GraphModule:
    """Return a new GraphModule with the pruned channels physically removed.

    ``model`` must have plain (un-parametrised) weights with the masks baked in; it is not modified.
    ``keep`` is a bool tensor over the graph's channel classes.
    """
    keep = keep.to(torch.bool).cpu()
    model = copy.deepcopy(model).cpu().eval()
    gm = trace(model, graph.leaf_modules)
    ref_names = [n.name for n in graph.gm.graph.nodes]
    names = [n.name for n in gm.graph.nodes]
    if names != ref_names:
        raise SmcpError("slim: the model traces differently from when it was analysed; re-run smcp prune")
    ref_nodes = {n.name: n for n in graph.gm.graph.nodes}
    nodes = {n.name: n for n in gm.graph.nodes}

    # ---- 1. layers
    dead = _slim_layers(gm, graph, keep)
    _slim_bns(gm, graph, keep)
    # ---- 2. functional ops that count channels
    _rewrite_channel_ops(gm, ref_nodes, graph.node_labels, keep)
    # ---- 3. removed layers become constants; so does any other node left with no channels
    dead += _channelless_nodes(gm, graph.node_labels, keep, {n for n, _ in dead})
    _replace_by_constants(gm, graph, keep, dead, nodes, ref_nodes)

    # an in-place op whose result is unused (``x.relu_()``) still changes ``x``: never dead code
    mods = dict(gm.named_modules())
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or is_inplace(n, mods))
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def slim_submodule(model: nn.Module, graph: ChannelGraph, keep: torch.Tensor) -> nn.Module:
    """:func:`slim_model` of ``graph``'s submodule of ``model`` (``graph.submodule``; the whole
    model when None), put in its place in a copy of ``model``; the rest is unchanged (copied)."""
    name = getattr(graph, "submodule", None)
    if not name:
        return slim_model(model, graph, keep)
    slim = slim_model(model.get_submodule(name), graph, keep)
    whole = copy.deepcopy(model).cpu().eval()
    parent, _, leaf = name.rpartition(".")
    setattr(whole.get_submodule(parent) if parent else whole, leaf, slim)
    return whole


def _kept_idx(keep: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
    """Positions of the kept channels among those labelled ``lab``."""
    return torch.nonzero(keep[lab]).flatten()


def _slim_layers(gm: fx.GraphModule, graph: ChannelGraph, keep: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """Replace every conv/linear/channel-wise layer of ``gm`` by one with only its kept channels;
    returns the layers left with no channel (their node name and module), in graph layer order."""
    dead: list[tuple[str, nn.Module]] = []
    done: set[str] = set()
    for layer in graph.layers:
        if layer.name in done:
            continue
        done.add(layer.name)
        old = gm.get_submodule(layer.name)
        iin, iout = _kept_idx(keep, layer.in_labels), _kept_idx(keep, layer.out_labels)
        if layer.kind == "dwconv":
            new = _slim_channelwise(layer.name, old, iin)
        elif len(iin) == 0 or len(iout) == 0:
            new = None
        else:
            new = _slim_consumer(layer.kind, old, iin, iout)
        if new is None:
            dead.append((layer.node, old))
        else:
            _set_module(gm, layer.name, new)
    return dead


def _slim_channelwise(name: str, old: nn.Conv2d, iin: torch.Tensor) -> nn.Conv2d | None:
    """A depthwise (group_size 1) or grouped conv with only the kept channels ``iin``: kept channels
    are whole groups (one class each).  ``None`` when it keeps none."""
    gs = int(old.weight.shape[1])
    if len(iin) % gs:
        raise SmcpError(f"slim: {name} keeps {len(iin)} channels, not whole groups of {gs}")
    if not len(iin):
        return None
    new = _new_conv(old, len(iin), len(iin), len(iin) // gs)
    new.weight.data.copy_(_sl(old.weight, iin))
    if old.bias is not None:
        new.bias.data.copy_(_sl(old.bias, iin))
    return new


def _slim_consumer(kind: str, old: nn.Module, iin: torch.Tensor, iout: torch.Tensor) -> nn.Module:
    """A conv (``kind == "conv"``) or linear layer with only the input channels ``iin`` and the
    output channels ``iout``."""
    w = _sl(_sl(old.weight, iout, 0), iin, 1)
    if kind == "conv":
        new = _new_conv(old, len(iin), len(iout), 1)
    else:
        new = torch.nn.utils.skip_init(nn.Linear, len(iin), len(iout), bias=old.bias is not None,
                                       device=old.weight.device, dtype=old.weight.dtype)
    new.weight.data.copy_(w)
    if old.bias is not None:
        new.bias.data.copy_(_sl(old.bias, iout))
    return new


def _slim_bns(gm: fx.GraphModule, graph: ChannelGraph, keep: torch.Tensor) -> None:
    """Replace every batch norm of ``gm`` that keeps a channel by one with only its kept channels
    (one that keeps none becomes a 0-channel constant later)."""
    for bn_name, node_name in graph.bns.items():
        bn = gm.get_submodule(bn_name)
        idx = _kept_idx(keep, graph.node_labels[node_name])
        if len(idx) == 0:
            continue  # its node becomes a 0-channel constant below
        _set_module(gm, bn_name, _sliced_bn(bn_name, bn, idx))


def _sliced_bn(name: str, bn: nn.Module, idx: torch.Tensor) -> nn.Module:
    """A copy of the batch norm ``bn`` (of any subclass: timm's BatchNormAct2d keeps its activation
    and dropout) with only the channels ``idx``."""
    if nn.utils.parametrize.is_parametrized(bn):
        raise SmcpError(f"slim: batch norm {name} still carries a parametrization (masks or BN scales); "
                        "bake the pruner's masks first (api.slim and smcp slim do)")
    new = copy.deepcopy(bn)
    new.num_features = len(idx)
    with torch.no_grad():
        for pname in ("weight", "bias"):
            if getattr(bn, pname, None) is not None:
                setattr(new, pname, nn.Parameter(_sl(getattr(bn, pname), idx).clone(),
                                                 requires_grad=getattr(bn, pname).requires_grad))
        for bname in ("running_mean", "running_var"):
            if getattr(bn, bname, None) is not None:
                setattr(new, bname, _sl(getattr(bn, bname), idx).clone())
    return new.eval()


def _rewrite_channel_ops(gm: fx.GraphModule, ref_nodes: dict, labels: dict, keep: torch.Tensor) -> None:
    """Rewrite the functional ops whose arguments count channels: channel ``F.pad``, channel slices
    ``x[:, a:b]``, ``split``/``chunk``."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is F.pad:
            _rewrite_pad(node, ref_nodes, labels, keep)
        elif node.op == "call_function" and node.target is operator.getitem:
            _rewrite_getitem(node, labels, keep)
        elif (node.op == "call_function" and node.target in (torch.split, torch.chunk)) or (
            node.op == "call_method" and node.target in ("split", "chunk")
        ):
            _rewrite_split(gm, node, labels, keep)


def _channelless_nodes(gm: fx.GraphModule, labels: dict, keep: torch.Tensor,
                       dead_names: set[str]) -> list[tuple[str, None]]:
    """The other computing nodes (not in ``dead_names``) that keep none of their channels."""
    out: list[tuple[str, None]] = []
    for node in list(gm.graph.nodes):
        lab = labels.get(node.name)
        if (node.op in ("call_module", "call_function", "call_method") and node.name not in dead_names
                and isinstance(lab, torch.Tensor) and lab.numel() > 0 and not bool(keep[lab].any())):
            out.append((node.name, None))
            dead_names.add(node.name)
    return out


def _replace_by_constants(gm: fx.GraphModule, graph: ChannelGraph, keep: torch.Tensor,
                          dead: list[tuple[str, nn.Module | None]], nodes: dict, ref_nodes: dict) -> None:
    """Replace every node of ``dead`` (node name, removed module or ``None``) by the constant it
    computes, folded through the following per-value ops.  ``nodes``: the nodes of ``gm`` by name,
    as traced (before any rewrite)."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for k, (node_name, old) in enumerate(dead):
        node = nodes[node_name]
        if getattr(node, "_erased", False):
            continue  # already folded into an earlier constant
        cd = graph.node_cdim.get(node_name, 1)
        const = _constant_of(ref_nodes[node_name].meta["tensor_meta"], cd,
                             _kept_idx(keep, graph.node_labels[node_name]), old)
        const_name = f"_smcp_const_{k}"
        gm.add_submodule(const_name, const)
        with gm.graph.inserting_after(node):
            cnode = gm.graph.call_module(const_name, (placeholder,))
        node.replace_all_uses_with(cnode)
        gm.graph.erase_node(node)
        _fold_constant(gm, cnode, ref_nodes)
        _copy_if_written(gm, cnode)


def _copy_if_written(gm: fx.GraphModule, cnode: fx.Node) -> None:
    """A constant is an expanded view of a buffer: when an in-place op writes into it (or into a
    view of it), give that op a fresh copy (``clone``) instead."""
    if getattr(cnode, "_erased", False):
        return  # folded into a broadcast buffer (read by binary ops only)
    mods = dict(gm.named_modules())
    todo, written = [cnode], False
    while todo and not written:
        cur = todo.pop()
        for u in cur.users:
            if not u.args or u.args[0] is not cur:
                continue
            if is_inplace(u, mods):
                written = True
                break
            if is_alias(u, mods):
                todo.append(u)
    if not written:
        return
    with gm.graph.inserting_after(cnode):
        copy_node = gm.graph.call_method("clone", (cnode,))
    cnode.replace_all_uses_with(copy_node, delete_user_cb=lambda u: u is not copy_node)


def _constant_of(tensor_meta: Any, cd: int, iout: torch.Tensor, old: nn.Module | None) -> ConstantChannels:
    """What a node without input channels computes (output shape and dtype from ``tensor_meta``,
    channels on dimension ``cd``, kept output channels ``iout``): the bias of its removed layer
    ``old``, or zeros."""
    shape = tensor_meta.shape
    view = [1] * len(shape)
    view[cd] = len(iout)
    if old is None or getattr(old, "bias", None) is None or len(iout) == 0:
        value = torch.zeros(view, dtype=tensor_meta.dtype)
    else:
        value = _sl(old.bias, iout).view(view)
    spatial = tuple(int(v) for i, v in enumerate(shape) if i not in (0, cd))
    return ConstantChannels(value.detach().clone(), spatial, cd)


def _pos_keep(node_name: str, labels: dict, keep: torch.Tensor) -> torch.Tensor:
    return keep[labels[node_name]]


def _rewrite_pad(node: fx.Node, ref_nodes: dict, labels: dict, keep: torch.Tensor) -> None:
    if node.name not in labels or not isinstance(node.args[0], fx.Node):
        return
    pad = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
    rank = len(ref_nodes[node.name].meta["tensor_meta"].shape)
    ch_pair = rank - 2
    if ch_pair >= len(pad) // 2:
        return
    front, back = pad[2 * ch_pair], pad[2 * ch_pair + 1]
    if front == 0 and back == 0:
        return
    k = _pos_keep(node.name, labels, keep)
    n = k.numel()
    pad[2 * ch_pair] = int(k[:front].sum())
    pad[2 * ch_pair + 1] = int(k[n - back:].sum()) if back else 0
    if len(node.args) > 1:
        node.args = (node.args[0], tuple(pad), *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "pad": tuple(pad)}


def _rewrite_getitem(node: fx.Node, labels: dict, keep: torch.Tensor) -> None:
    src, idx = node.args
    if not isinstance(src, fx.Node) or not isinstance(idx, tuple) or len(idx) < 2:
        return
    ch = idx[1]
    if not isinstance(ch, slice) or ch == slice(None):
        return
    src_lab = labels.get(src.name)
    if not isinstance(src_lab, torch.Tensor):
        return
    k = keep[src_lab]
    c = k.numel()
    start, stop, step = ch.indices(c)
    if step != 1:
        if bool(k.all()):
            return
        raise SmcpError(f"slim: strided channel slice at {node.name} cannot be pruned through")
    new = slice(int(k[:start].sum()), int(k[:stop].sum()), None)
    node.args = (src, (idx[0], new, *idx[2:]))


def _rewrite_split(gm: fx.GraphModule, node: fx.Node, labels: dict, keep: torch.Tensor) -> None:
    pieces = labels.get(node.name)
    if not isinstance(pieces, list):
        return
    sizes = [int(keep[p].sum()) for p in pieces]
    if sizes == [int(p.numel()) for p in pieces]:
        return
    src = node.args[0]
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(torch.split, (src, sizes), {"dim": 1})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _fold_constant(gm: fx.GraphModule, cnode: fx.Node, ref_nodes: dict) -> None:
    """Push a ConstantChannels value through following BN/activation nodes, then feed it to
    elementwise binary users as a broadcast buffer (no expand)."""
    const: ConstantChannels = gm.get_submodule(str(cnode.target))
    if const.channels == 0:
        return  # nothing left to compute; its users are removed layers too (dead code)
    while len(cnode.users) == 1:
        user = next(iter(cnode.users))
        if user.args and user.args[0] is not cnode:
            break
        if len(user.all_input_nodes) != 1:
            break
        fn = None
        if user.op == "call_module":
            mod = gm.get_submodule(str(user.target))
            # per-value ops only: pooling/padding/resizing would change the constant's shape
            if isinstance(mod, (*_BN_MODULES, *_ELEMENTWISE_MODULES)) or type(mod).__name__ == "StochasticDepth":
                fn = mod
        elif user.op == "call_function" and (
            user.target in _ELEMENTWISE_FUNCTIONS
            or (_known_pass_function(user.target) and user.target not in _PASS_FUNCTIONS)  # stochastic_depth
        ):
            def fn(v, _u=user):  # noqa: E306
                return _u.target(v, *_u.args[1:], **_u.kwargs)
        if fn is None:
            break
        with torch.no_grad():
            const.value = fn(const.value).detach().clone()
        user.replace_all_uses_with(cnode)
        gm.graph.erase_node(user)
    # a binary op whose output has the constant's full shape can take the (1, C, 1, 1) value
    # directly (broadcast), saving the expand
    binary = {operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.sub}
    users = list(cnode.users)

    def full_shape(u: fx.Node) -> bool:
        ref = ref_nodes.get(u.name)
        if ref is None or "tensor_meta" not in ref.meta:
            return False
        out = tuple(ref.meta["tensor_meta"].shape[2:])
        return out == const.spatial and any(
            isinstance(a, fx.Node) and a is not cnode and a.name in ref_nodes
            and "tensor_meta" in ref_nodes[a.name].meta
            and tuple(ref_nodes[a.name].meta["tensor_meta"].shape[2:]) == const.spatial
            for a in u.args)

    if const.cdim == 1 and users and all(u.op == "call_function" and u.target in binary and full_shape(u)
                                         for u in users):
        attr = f"{cnode.target}_value"
        gm.register_buffer(attr, const.value.detach().clone())
        with gm.graph.inserting_after(cnode):
            g = gm.graph.get_attr(attr)
        cnode.replace_all_uses_with(g)
        gm.graph.erase_node(cnode)


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval()
    b.eval()
    ya, yb = a(x), b(x)
    return float((ya - yb).abs().max())


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def export_program(gm: nn.Module, example: torch.Tensor, path: Any) -> None:
    """Save ``gm`` as a ``torch.export`` program with a dynamic batch dimension."""
    ex = example
    if ex.shape[0] < 2:
        ex = ex.repeat(2, *([1] * (ex.dim() - 1)))
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(gm.eval(), (ex,), dynamic_shapes=({0: batch},), strict=False)

    atomic_write_with(path, lambda f: torch.export.save(ep, f))
