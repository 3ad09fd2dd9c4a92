"""Channel graph: which channels of which layers must be pruned together.

The model is traced with :func:`torch.fx.symbolic_trace` and run once with an example input
(shape propagation).  Every channel of every intermediate tensor gets a *class* id; operations that
tie channels together (a residual ``add``, the channel-wise ``mul`` of squeeze-excitation, the
zero-pad shortcut of CIFAR ResNets, ...) merge classes with a union-find.  A class is the unit of
pruning: removing it removes the matching output channel from every layer that produces it and the
matching input channel from every layer that consumes it.

A *group* is a set of classes read by the same consumer layers (a connected component of the
"read by one layer" relation).  In a plain network a group is simply the input channel space of
one or more convs (e.g. the whole residual stream of a ResNet stage is one group); concatenation or
channel padding can make a consumer read several producers' classes, and they then fall into one
group whose options are "keep the k most important classes".  Groups carry one soft mask during
training and one option list in the knapsack.

Channel-wise convs are *acting* layers, not consumers: a depthwise conv maps input channel ``i``
to output channel ``i``; a grouped conv with as many inputs as outputs per group (ResNeXt, RegNet)
makes each of its groups one class (the group's input channels, its output channels and everything
tied to them are pruned together), so pruning removes whole groups and the slim conv keeps its
group size with fewer groups.

Channels need not be on dimension 1: a ``permute``/``transpose`` moves them (ConvNeXt's blocks run
``Linear`` layers on ``(N, H, W, C)`` tensors), and elementwise ops, binary ops, ``Linear`` on the
last dimension and ``LayerNorm`` follow them there; any other op on such a tensor is a barrier.  A
``LayerNorm`` over the channels freezes them (its statistics need all of them).

Anything the tracer does not understand is never guessed at: the classes flowing into it are
*frozen* (never pruned), with a reason that ``smcp inspect`` shows.
"""

from __future__ import annotations

import difflib
import fnmatch
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from smcp_core.errors import SmcpError
from smcp_core.graph.ops import (
    _BINARY,
    _BINARY_METHODS,
    _BN_MODULES,
    _CAT,
    _ELEMENTWISE_MODULES,
    _FLATTEN,
    _MEAN,
    _PASS_METHODS,
    _PASS_MODULES,
    _PERMUTE,
    _PERMUTE_METHODS,
    _SHUFFLE,
    _SPLIT,
    _channels_last_ok,
    _known_pass_function,
    is_inplace,
)
from smcp_core.graph.signature import LayerSig
from smcp_core.models import check_logits


@dataclass
class LayerInfo:
    """A conv/linear layer whose weight the pruner masks (a *consumer*), or a channel-wise conv
    (``kind == "dwconv"``): a depthwise conv, or a grouped conv with ``sig.group_size`` input and
    output channels per group, whose output channel classes are its input channel classes (every
    group of a grouped conv is one class: groups are kept or removed whole)."""

    index: int
    name: str
    kind: str  # "conv", "linear" or "dwconv"
    sig: LayerSig
    in_labels: torch.Tensor  # class id of each input channel / feature (resolved)
    out_labels: torch.Tensor  # class id of each output channel (resolved)
    node: str = ""
    group: int = -1

    @property
    def is_consumer(self) -> bool:
        return self.kind in ("conv", "linear")


@dataclass
class Group:
    """A set of channel classes read by the same layers; one mask, one knapsack option list."""

    index: int
    classes: torch.Tensor  # class ids (sorted)
    frozen: torch.Tensor  # bool per class: never pruned
    consumers: list[int] = field(default_factory=list)  # LayerInfo indices (conv/linear)
    dw: list[int] = field(default_factory=list)  # depthwise LayerInfo indices in this group
    producers: list[str] = field(default_factory=list)  # names of layers producing these classes
    reason: str = ""  # why (part of) the group is frozen
    removable: bool = False  # may keep 0 classes without disconnecting input from output

    @property
    def size(self) -> int:
        return int(self.classes.numel())

    @property
    def n_frozen(self) -> int:
        return int(self.frozen.sum())

    @property
    def prunable(self) -> bool:
        return self.n_frozen < self.size


class _UF:
    """Union-find over channel classes, with a frozen flag and reasons."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.zero: list[bool] = []  # class created by constant zero padding
        self.frozen: dict[int, str] = {}

    def new(self, n: int, *, zero: bool = False) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.zero.extend([zero] * n)
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def freeze(self, labels: torch.Tensor, reason: str) -> None:
        for c in labels.tolist():
            self.frozen.setdefault(c, reason)

    def resolve(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.find(c) for c in labels.tolist()], dtype=torch.long)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        return None
    return tuple(tm.shape)


# Subclasses of these torch.nn layers from other libraries are kept whole by the trace when their
# forward is the parent's (not overridden) or one of _FUSED's: the parent's computation, then only
# per-channel modules (checked in _visit_module).  Traced into, they would end in functional
# F.batch_norm / F.linear calls on parameters, which the graph cannot slice.
_LEAF_SUBCLASSES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, nn.Linear)
_FUSED = {
    "timm.layers.norm_act.BatchNormAct2d",  # batch norm, then its drop and act modules
    "timm.layers.norm_act.SyncBatchNormAct",
    "timm.layers.linear.Linear",  # nn.Linear with a dtype cast for TorchScript
}


def _type_names(cls: type) -> tuple[str, str]:
    """The names ``model.leaf_modules`` may give a module type: ``Class`` and ``module.path.Class``."""
    return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"


def _opaque_subclass(m: nn.Module) -> bool:
    cls = type(m)
    if not isinstance(m, _LEAF_SUBCLASSES):
        return False
    return cls.forward.__module__.startswith("torch.nn") or _type_names(cls)[1] in _FUSED


class _Tracer(fx.Tracer):
    """torch.fx's tracer, also keeping opaque: subclasses of :data:`_LEAF_SUBCLASSES` and the
    module types named in ``leaf_modules`` (class names, or ``module.path.ClassName``)."""

    def __init__(self, leaf_modules: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.leaf_names = set(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_names.intersection(_type_names(type(m))):
            return True
        if _opaque_subclass(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _inside(node: fx.Node) -> str:
    """`` (in <module path>: <type>)`` of the innermost module of another library than torch.nn whose
    forward made ``node`` (what froze a model's channels, named by the module type), else ``""``."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, (_, cls) in reversed(list(stack.items())):
        module = getattr(cls, "__module__", "") if isinstance(cls, type) else str(cls)
        if not module.startswith("torch.nn") and path:
            return f" (in {path}: {getattr(cls, '__name__', cls)})"
    return ""


def _channelwise(mod: nn.Module) -> bool:
    """A module inside a norm-act layer that keeps channels independent and unchanged in number:
    an activation, dropout or identity (torch.nn's, or timm's activation modules)."""
    if isinstance(mod, nn.PReLU):
        return mod.num_parameters == 1
    if isinstance(mod, (*_ELEMENTWISE_MODULES, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
        return True
    return type(mod).__module__.startswith("timm.layers.activations") and next(mod.parameters(), None) is None


def check_leaf_modules(model: nn.Module, leaf_modules: tuple[str, ...] | list[str]) -> None:
    """Every name of ``model.leaf_modules`` must name a module type used in ``model``."""
    used = {name for mod in model.modules() for name in _type_names(type(mod))}
    for name in leaf_modules:
        if name not in used:
            close = difflib.get_close_matches(name, sorted(u for u in used if "." not in u), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "`smcp inspect` lists the model's layers"
            raise SmcpError(f"model.leaf_modules: no module of type '{name}' in the model "
                            f"{type(model).__name__}; {hint}")


def trace(model: nn.Module, leaf_modules: tuple[str, ...] | list[str] = ()) -> fx.GraphModule:
    """``symbolic_trace`` with a one-line error naming the cause when the model is not traceable;
    module types named in ``leaf_modules`` (and norm/linear subclasses of other libraries) stay
    whole (one node each)."""
    before = set(vars(model))
    try:
        tracer = _Tracer(tuple(leaf_modules))
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        # the tracer stores tensor constants of forward() (torch.tensor(...) etc.) as attributes
        # `_tensor_constantN` of the traced module; the GraphModule has its own references, so
        # remove them: otherwise the next trace of this model (e.g. by slim, of a copy) numbers its
        # constants differently and no longer matches this one
        for k in set(vars(model)) - before:
            if k.startswith("_tensor_constant"):
                delattr(model, k)
        return gm
    except Exception as exc:  # noqa: BLE001 - any tracer failure becomes one clear line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = ""
        tb = exc.__traceback__
        last = None
        culprit = "<its class name>"  # the module whose code failed (the innermost nn.Module `self`)
        while tb is not None:
            fname = tb.tb_frame.f_code.co_filename
            if "torch/fx" not in fname and "torch\\fx" not in fname:
                last = (fname, tb.tb_lineno)
                owner = tb.tb_frame.f_locals.get("self")
                if isinstance(owner, nn.Module) and owner is not model:
                    culprit = type(owner).__name__
            tb = tb.tb_next
        if last is not None:
            where = f" at {last[0]}:{last[1]}"
        raise SmcpError(
            f"model {type(model).__name__} cannot be traced by torch.fx{where}: {msg}; "
            "remove data-dependent control flow from forward(), or keep the module that has it opaque "
            f"to the trace with model.leaf_modules: [{culprit}] (it is then not pruned)"
        ) from None


class ChannelGraph:
    """fx trace + shape propagation + channel classes + groups of one model."""

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        *,
        unpruned: list[str] | tuple[str, ...] = (),
        submodule: str | None = None,
        leaf_modules: list[str] | tuple[str, ...] = (),
    ) -> None:
        """``model``'s graph traced at ``example``.  ``submodule``: the name of ``model`` inside a
        larger model (a detector's backbone): its outputs may then be any tensors (features), not
        logits, and slimming replaces it in the larger model
        (:func:`~smcp_core.slim.surgery.slim_submodule`).  ``leaf_modules``: module types kept
        opaque to the trace (see :func:`trace`); the channels around them are frozen."""
        self.submodule = submodule or None
        self.leaf_modules = tuple(leaf_modules)
        check_leaf_modules(model, self.leaf_modules)
        was_training = model.training
        model.eval()
        try:
            self.gm = trace(model, self.leaf_modules)
            try:
                with torch.no_grad():
                    output = self.gm(example)  # fails cleanly (ShapeProp would print its own traceback)
                    ShapeProp(self.gm).propagate(example)
            except Exception as exc:  # noqa: BLE001
                line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SmcpError(
                    f"model {type(model).__name__} failed on an input of shape {tuple(example.shape)}: "
                    f"{line}; check model.input_size in the recipe"
                ) from None
        finally:
            model.train(was_training)
        if self.submodule is None:  # a dict or tuple output is one line here, not after profiling
            check_logits(output, type(model).__name__)
        self.input_shape = tuple(example.shape[1:])
        self.modules = dict(self.gm.named_modules())
        self._uf = _UF()
        self.node_labels: dict[str, Any] = {}
        # the dimension holding the channels of a node's output, where it is not 1 (channels-last
        # tensors between a permute and its inverse, e.g. ConvNeXt's LayerNorm/Linear MLP)
        self.node_cdim: dict[str, int] = {}
        self._cdim_out = 1
        self._split_views: set[str] = set()  # outputs of a view splitting the channels (+ permutes of them)
        self.layers: list[LayerInfo] = []
        self.bns: dict[str, str] = {}  # bn module name -> node name (labels via node_labels)
        self.unsupported: list[str] = []  # human-readable notes on frozen spots
        self._shared = self._shared_modules()
        self._shared_seen: set[str] = set()
        self._propagate()
        self._apply_unpruned(list(unpruned))
        self._finalise()

    # ---------------------------------------------------------------- propagation
    def _freeze(self, labels: Any, reason: str) -> None:
        if isinstance(labels, torch.Tensor):
            self._uf.freeze(labels, reason)
        elif isinstance(labels, (list, tuple)):
            for item in labels:
                self._freeze(item, reason)

    def _fresh_like(self, node: fx.Node, reason: str | None) -> torch.Tensor | None:
        self._cdim_out = 1
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        lab = self._uf.new(shape[1])
        if reason:
            self._uf.freeze(lab, reason)
        return lab

    def _in_labels(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.node_labels.get(arg.name)
        return None

    def _barrier(self, node: fx.Node, reason: str) -> torch.Tensor | None:
        """Freeze every channel tensor flowing into ``node``; its output gets frozen new classes."""
        for a in node.all_input_nodes:
            lab = self.node_labels.get(a.name)
            if lab is not None:
                self._freeze(lab, reason)
        if node.op in ("call_function", "call_method"):
            reason += _inside(node)
        if any(self.node_labels.get(a.name) is not None for a in node.all_input_nodes):
            self.unsupported.append(f"{node.name}: {reason}")
        out = self._fresh_like(node, reason)
        return out

    def _cdim(self, arg: Any) -> int:
        return self.node_cdim.get(arg.name, 1) if isinstance(arg, fx.Node) else 1

    def _propagate(self) -> None:
        for node in self.gm.graph.nodes:
            # pass-through ops keep the channel dimension of their (first) input; ops that create
            # channels or change where they are set it (a barrier's fresh classes are on dim 1)
            self._cdim_out = self._cdim(node.args[0]) if node.args else 1
            try:
                if any(self._cdim(a) != 1 for a in node.all_input_nodes) and not _channels_last_ok(node, self.modules):
                    what = (type(self.modules[str(node.target)]).__name__ if node.op == "call_module"
                            else getattr(node.target, "__name__", str(node.target)))
                    if what in ("view", "reshape") and node.args[0].name in self._split_views:
                        why = _SHUFFLE.replace("splits the channel dimension",
                                               "merges the split channel dimension back")
                    elif what in ("view", "reshape"):
                        why = "reshape/view of a permuted tensor"
                    else:
                        why = f"{what} on a permuted tensor (channels not on dimension 1) is not understood"
                    out = self._barrier(node, why)
                else:
                    out = self._visit(node)
            except SmcpError:
                raise
            except Exception as exc:  # noqa: BLE001 - never mis-group silently: freeze instead
                self._cdim_out = 1
                out = self._barrier(node, f"could not analyse ({type(exc).__name__}: {exc})")
            if out is not None:
                if (node.op in ("call_method", "call_function") and node.args
                        and isinstance(node.args[0], fx.Node) and node.args[0].name in self._split_views
                        and (node.target in _PERMUTE or node.target in _PERMUTE_METHODS
                             or node.target == "contiguous")):
                    self._split_views.add(node.name)
                self.node_labels[node.name] = out
                if self._cdim_out != 1:
                    self.node_cdim[node.name] = self._cdim_out

    def _visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            lab = self._fresh_like(node, "network input")
            return lab
        if node.op == "output":
            lab = self._in_labels(node.args[0])
            self._freeze(lab, "network output")
            if lab is None and isinstance(node.args[0], (tuple, list, dict)):
                for a in node.all_input_nodes:
                    self._freeze(self.node_labels.get(a.name), "network output")
            return None
        if node.op == "get_attr":
            return None  # constants: an elementwise op with a channel tensor freezes it (below)
        if node.op == "call_module" and str(node.target) in self._shared:
            return self._visit_shared(node)
        if node.op == "call_module":
            return self._visit_module(node, self.modules[str(node.target)])
        if node.op == "call_function":
            return self._visit_function(node, node.target)
        if node.op == "call_method":
            return self._visit_method(node, str(node.target))
        return self._barrier(node, f"unknown node kind {node.op}")

    def _shared_modules(self) -> dict[str, int]:
        """Modules with weights (or per-channel buffers) called more than once, and how often: the
        same weights read different channel spaces, which one slicing cannot serve."""
        calls: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        out = {}
        for name, n in calls.items():
            mod = self.modules[name]
            if n > 1 and (next(mod.parameters(), None) is not None or next(mod.buffers(), None) is not None):
                out[name] = n
        return out

    def _visit_shared(self, node: fx.Node) -> Any:
        """A module called several times (shared weights): every channel it reads or writes is
        frozen.  Its first call is analysed as usual (so its cost is counted), the others are
        barriers."""
        name = str(node.target)
        reason = f"{name}: called {self._shared[name]} times (shared weights)"
        if name in self._shared_seen:
            return self._barrier(node, reason)
        self._shared_seen.add(name)
        n_layers = len(self.layers)
        self._freeze(self._inp(node), reason)
        out = self._visit_module(node, self.modules[name])
        self._freeze(out, reason)
        for layer in self.layers[n_layers:]:
            self._uf.freeze(layer.in_labels, reason)
            self._uf.freeze(layer.out_labels, reason)
        self.unsupported.append(reason)
        return out

    def _inp(self, node: fx.Node, i: int = 0) -> Any:
        return self._in_labels(node.args[i]) if len(node.args) > i else None

    def _visit_module(self, node: fx.Node, mod: nn.Module) -> Any:
        """The channel labels of a module call's output (a barrier where the module is not understood)."""
        name = str(node.target)
        x = self._inp(node)
        ishape = _shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if isinstance(mod, nn.Conv2d) and not isinstance(mod, nn.LazyConv2d):
            return self._visit_conv(node, mod, name, x, ishape)
        if isinstance(mod, nn.Linear):
            return self._visit_linear(node, mod, name, x, ishape)
        if isinstance(mod, nn.LayerNorm):
            return self._layer_norm(node, x, tuple(mod.normalized_shape), name)
        if isinstance(mod, _BN_MODULES):
            return self._visit_bn(node, mod, name, x)
        if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
            return self._barrier(node, f"{name}: PReLU with one slope per channel is not sliced")
        if isinstance(mod, _PASS_MODULES):
            return x if x is not None else self._fresh_like(node, None)
        if isinstance(mod, nn.Flatten):
            return self._flatten(node, x, mod.start_dim, mod.end_dim)
        if type(mod).__name__ == "StochasticDepth":
            return x
        return self._barrier(node, f"{name}: module type {type(mod).__name__} is not understood")

    def _visit_conv(self, node: fx.Node, mod: nn.Conv2d, name: str, x: Any, ishape) -> Any:
        """A plain conv (new output classes), a depthwise or channel-grouped conv (its output is its
        input's classes) or a barrier."""
        uf = self._uf
        if x is None or ishape is None or len(ishape) != 4:
            return self._barrier(node, f"{name}: conv input without channel dimension")
        g, cin, cout = mod.groups, mod.in_channels, mod.out_channels
        sig_common = dict(
            kernel=_pair(mod.kernel_size), stride=_pair(mod.stride), dilation=_pair(mod.dilation),
            in_hw=(int(ishape[2]), int(ishape[3])), bias=mod.bias is not None,
        )
        if isinstance(mod.padding, str):
            return self._barrier(node, f"{name}: string padding '{mod.padding}' is not supported")
        if mod.padding_mode != "zeros":
            return self._barrier(node, f"{name}: padding_mode {mod.padding_mode} is not supported")
        sig_common["padding"] = _pair(mod.padding)
        if g == 1:
            out = uf.new(cout)
            sig = LayerSig(kind="conv", cin=cin, cout=cout, **sig_common)
            self.layers.append(LayerInfo(len(self.layers), name, "conv", sig, x, out, node.name))
            return out
        if g == cin and cout == cin:
            sig = LayerSig(kind="conv", cin=cin, cout=cout, depthwise=True, **sig_common)
            self.layers.append(LayerInfo(len(self.layers), name, "dwconv", sig, x, x, node.name))
            return x
        if cin == cout:
            # grouped conv (ResNeXt, RegNet): every group of gs channels becomes one class that
            # runs from the producer of its input, through this conv, to the layers reading its
            # output; pruning keeps or removes whole groups, so the group size never changes
            gs = cin // g
            for j in range(g):
                blk = x[j * gs:(j + 1) * gs].tolist()
                for c in blk[1:]:
                    uf.union(blk[0], c)
            sig = LayerSig(kind="conv", cin=cin, cout=cout, depthwise=True, group_size=gs, **sig_common)
            self.layers.append(LayerInfo(len(self.layers), name, "dwconv", sig, x, x, node.name))
            return x
        reason = (f"{name}: grouped convolution with different input and output widths "
                  f"(groups={g}, {cin} -> {cout} channels) is not pruned")
        self._freeze(x, reason)
        self.unsupported.append(reason)
        return self._fresh_like(node, reason)

    def _visit_linear(self, node: fx.Node, mod: nn.Linear, name: str, x: Any, ishape) -> Any:
        """A Linear on (N, C), or on (N, ..., C) costed as a 1x1 conv over the positions."""
        if x is None or ishape is None or len(ishape) < 2:
            return self._barrier(node, f"{name}: linear layer on a tensor without a feature dimension")
        cd = self._cdim(node.args[0])
        if cd != len(ishape) - 1:
            return self._barrier(node, f"{name}: linear layer on a tensor of rank {len(ishape)} whose "
                                       "channels are not on the last dimension")
        out = self._uf.new(mod.out_features)
        if len(ishape) == 2:
            sig = LayerSig(kind="linear", cin=mod.in_features, cout=mod.out_features, bias=mod.bias is not None)
        else:
            pos = [int(v) for v in ishape[1:-1]]
            rest = 1
            for v in pos[1:]:
                rest *= v
            sig = LayerSig(kind="conv", cin=mod.in_features, cout=mod.out_features, in_hw=(pos[0], rest),
                           bias=mod.bias is not None)
            self._cdim_out = cd
        self.layers.append(LayerInfo(len(self.layers), name, "linear", sig, x, out, node.name))
        return out

    def _visit_bn(self, node: fx.Node, mod: nn.Module, name: str, x: Any) -> Any:
        """A batch norm passes its input's classes on (and is recorded for slimming)."""
        if x is None:
            return self._barrier(node, f"{name}: batch norm without channel input")
        odd = [f"{type(c).__name__}" for c in mod.modules() if c is not mod and not _channelwise(c)]
        if odd:  # a norm-act layer (timm's BatchNormAct2d) with more than per-channel ops inside
            return self._barrier(node, f"{name}: {type(mod).__name__} holds {', '.join(odd)}, "
                                       "which is not a per-channel operation")
        self.bns[name] = node.name
        return x

    def _layer_norm(self, node: fx.Node, x: Any, normalized: tuple[int, ...], name: str) -> Any:
        """LayerNorm over the last ``len(normalized)`` dims: when they include the channels its
        statistics mix all channels, so none of them can be removed; otherwise per channel."""
        ishape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        what = f"{name}: " if name else ""
        if x is None or ishape is None or not isinstance(x, torch.Tensor):
            return self._barrier(node, f"{what}layer norm of an unknown tensor")
        cd = self._cdim(node.args[0])
        if cd >= len(ishape) - len(normalized):
            reason = f"{what}LayerNorm normalises over the channels (its statistics need all of them)"
            self._freeze(x, reason)
            self.unsupported.append(f"{node.name}: {reason}")
        self._cdim_out = cd
        return x

    def _permute(self, node: fx.Node, x: Any, dims: Any, swap: bool) -> Any:
        ishape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if x is None or ishape is None or not isinstance(x, torch.Tensor):
            return self._barrier(node, "permute of an unknown tensor")
        rank = len(ishape)
        if any(isinstance(d, fx.Node) for d in dims):
            return self._barrier(node, "permute with computed dimensions")
        dims = [int(d) % rank for d in dims]
        cd = self._cdim(node.args[0])
        if swap:
            a, b = dims
            if a != b and 0 in (a, b):
                return self._barrier(node, "transpose of the batch dimension")
            new = b if cd == a else a if cd == b else cd
        else:
            if sorted(dims) != list(range(rank)):
                return self._barrier(node, "permute with an invalid dimension order")
            if dims[0] != 0:
                return self._barrier(node, "permute that moves the batch dimension")
            new = dims.index(cd)
        self._cdim_out = new
        return x

    def _flatten(self, node: fx.Node, x: Any, start: int, end: int) -> Any:
        ishape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if x is None or ishape is None:
            return self._barrier(node, "flatten of an unknown tensor")
        rank = len(ishape)
        start = start % rank
        end = end % rank
        if start >= 2:
            return x
        if start == 1 and end == rank - 1:
            hw = 1
            for s in ishape[2:]:
                hw *= int(s)
            return torch.repeat_interleave(x, hw) if hw > 1 else x
        return self._barrier(node, "flatten that mixes the batch and channel dimensions")

    def _binary(self, node: fx.Node, args: list[Any]) -> Any:
        oshape = _shape(node)
        if oshape is None or len(oshape) < 2:
            return self._barrier(node, "elementwise op without channel output")
        cds = {self._cdim(a) for a in args if isinstance(a, fx.Node) and self.node_labels.get(a.name) is not None
               and isinstance(self.node_labels.get(a.name), torch.Tensor)}
        if len(cds) > 1:
            return self._barrier(node, "elementwise op between tensors with channels on different dimensions")
        cd = cds.pop() if cds else 1
        rank = len(oshape)
        c = oshape[cd]
        labs = []
        for a in args:
            if isinstance(a, fx.Node):
                sh = _shape(a)
                lab = self.node_labels.get(a.name)
                if lab is not None and not isinstance(lab, torch.Tensor):
                    return self._barrier(node, "elementwise op on a tuple of tensors")
                if lab is not None and sh is not None and len(sh) == rank and sh[cd] == c:
                    labs.append(lab)
                elif sh is not None and len(sh) >= 1 and a.op == "get_attr":
                    # a constant/parameter tensor broadcast over channels: it would need slicing
                    j = cd - (rank - len(sh))
                    if 0 <= j < len(sh) and sh[j] == c and c > 1:
                        rest = [self.node_labels.get(b.name) for b in node.all_input_nodes if b is not a]
                        self._freeze([r for r in rest if r is not None],
                                     f"elementwise op with a per-channel constant ({a.target})")
                elif lab is not None and sh is not None and len(sh) == rank and sh[cd] == 1:
                    continue  # broadcast over channels (e.g. a 1-channel attention map)
                elif lab is not None:
                    return self._barrier(node, "elementwise op with mismatched channel shapes")
        if not labs:
            return self._fresh_like(node, "elementwise op on non-channel tensors")
        first = labs[0]
        for other in labs[1:]:
            for a, b in zip(first.tolist(), other.tolist()):
                self._uf.union(a, b)
        self._cdim_out = cd
        return first

    def _getitem(self, node: fx.Node) -> Any:
        src, idx = node.args[0], node.args[1]
        lab = self._in_labels(src)
        if isinstance(lab, (list, tuple)):
            return lab[idx] if isinstance(idx, int) else None
        if lab is None:
            return None  # e.g. indexing x.shape
        if not isinstance(idx, tuple):
            idx = (idx,)
        if len(idx) == 0 or any(i is Ellipsis for i in idx):
            return self._barrier(node, "indexing with an ellipsis")
        if not isinstance(idx[0], slice) or idx[0] != slice(None):
            return self._barrier(node, "indexing the batch dimension")
        if len(idx) < 2:
            return lab
        ch = idx[1]
        if isinstance(ch, slice):
            if any(isinstance(v, fx.Node) for v in (ch.start, ch.stop, ch.step)):
                return self._barrier(node, "channel slice with computed bounds")
            if ch == slice(None):
                return lab
            return lab[ch]
        return self._barrier(node, "integer or tensor index on the channel dimension")

    def _visit_function(self, node: fx.Node, fn: Any) -> Any:
        if fn is operator.getitem:
            return self._getitem(node)
        if fn is getattr:
            return None
        if fn in _BINARY:
            return self._binary(node, list(node.args[:2]))
        if _known_pass_function(fn):
            return self._inp(node)
        if fn in _CAT:
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            oshape = _shape(node)
            if oshape is None:
                return self._barrier(node, "concatenation of unknown tensors")
            if dim < 0:
                dim += len(oshape)
            labs = [self.node_labels.get(t.name) if isinstance(t, fx.Node) else None for t in tensors]
            if any(lab is None for lab in labs):
                return self._barrier(node, "concatenation with a non-channel tensor")
            if dim == 1:
                return torch.cat(labs)
            if dim == 0:
                return self._binary(node, list(tensors))
            return self._binary(node, list(tensors))
        if fn in _FLATTEN:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, self._inp(node), start, end)
        if fn is F.pad:
            return self._pad(node)
        if fn in _MEAN:
            return self._reduce(node)
        if fn in _SPLIT:
            return self._split(node, fn is torch.chunk)
        if fn in _PERMUTE:
            swap = fn is not torch.permute
            dims = list(node.args[1:3]) if swap else node.args[1] if len(node.args) == 2 else node.args[1:]
            if not swap and not dims:
                dims = node.kwargs.get("dims", ())
            return self._permute(node, self._inp(node), list(dims), swap)
        if fn is F.layer_norm:
            shp = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            shp = (shp,) if isinstance(shp, int) else tuple(shp or ())
            return self._layer_norm(node, self._inp(node), shp, "")
        if fn is F.batch_norm:
            return self._barrier(node, "functional batch_norm (use nn.BatchNorm2d)")
        return self._barrier(node, f"function {getattr(fn, '__name__', fn)} is not understood")

    def _visit_method(self, node: fx.Node, m: str) -> Any:
        if m in ("size", "dim", "numel"):
            return None
        if m in _PASS_METHODS:
            return self._inp(node)
        if m in _BINARY_METHODS:
            return self._binary(node, list(node.args[:2]))
        if m == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, self._inp(node), start, end)
        if m in ("view", "reshape"):
            return self._view(node)
        if m in ("mean", "sum", "amax"):
            return self._reduce(node)
        if m in ("chunk", "split"):
            return self._split(node, m == "chunk")
        if m in _PERMUTE_METHODS:
            swap = m != "permute"
            rest = list(node.args[1:])
            if not swap and len(rest) == 1 and isinstance(rest[0], (tuple, list)):
                rest = list(rest[0])
            if not swap and not rest:
                rest = list(node.kwargs.get("dims", ()))
            return self._permute(node, self._inp(node), rest, swap)
        return self._barrier(node, f"tensor method .{m}() is not understood")

    def _view(self, node: fx.Node) -> Any:
        x = self._inp(node)
        ishape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        oshape = _shape(node)
        if x is None or ishape is None or oshape is None:
            return self._barrier(node, "reshape of an unknown tensor")
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        # x.view(x.size(0), -1): a flatten whose argument does not depend on the channel count
        if len(oshape) == 2 and len(sizes) == 2 and sizes[1] == -1 and oshape[0] == ishape[0]:
            return self._flatten(node, x, 1, -1)
        if len(oshape) > len(ishape) and oshape[0] == ishape[0] and oshape[1] * oshape[2] == ishape[1]:
            self._split_views.add(node.name)
            return self._barrier(node, _SHUFFLE)
        return self._barrier(node, "reshape/view with explicit sizes (channel counts may be hard-coded)")

    def _reduce(self, node: fx.Node) -> Any:
        x = self._inp(node)
        ishape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if x is None or ishape is None:
            return self._barrier(node, "reduction of an unknown tensor")
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            return self._barrier(node, "reduction over all dimensions")
        if isinstance(dims, int):
            dims = (dims,)
        dims = {d % len(ishape) for d in dims}
        if 0 in dims or 1 in dims:
            return self._barrier(node, "reduction over the channel dimension")
        return x

    def _pad(self, node: fx.Node) -> Any:
        x = self._inp(node)
        ishape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if x is None or ishape is None or not isinstance(pad, (tuple, list)):
            return self._barrier(node, "pad of an unknown tensor")
        rank = len(ishape)
        npad = len(pad) // 2
        # pad pairs run from the last dimension backwards; the channel dim is rank-1-1 from the end
        ch_pair = rank - 2  # index of the (front, back) pair for dim 1
        if ch_pair >= npad:
            return x
        front, back = int(pad[2 * ch_pair]), int(pad[2 * ch_pair + 1])
        if front == 0 and back == 0:
            return x
        if mode != "constant" or (value not in (None, 0, 0.0)) or front < 0 or back < 0:
            return self._barrier(node, "non-zero or non-constant channel padding")
        return torch.cat([self._uf.new(front, zero=True), x, self._uf.new(back, zero=True)])

    def _split(self, node: fx.Node, is_chunk: bool) -> Any:
        x = self._inp(node)
        ishape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if x is None or ishape is None:
            return self._barrier(node, "split of an unknown tensor")
        arg = (node.args[1] if len(node.args) > 1
               else node.kwargs.get("chunks" if is_chunk else "split_size_or_sections"))
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if dim % len(ishape) != 1:
            return self._barrier(node, "split along a non-channel dimension")
        c = x.numel()
        if is_chunk:
            pieces = list(torch.chunk(torch.arange(c), int(arg)))
        elif isinstance(arg, int):
            pieces = list(torch.split(torch.arange(c), arg))
        else:
            pieces = list(torch.split(torch.arange(c), list(arg)))
        return [x[p] for p in pieces]

    # ---------------------------------------------------------------- groups
    def _apply_unpruned(self, patterns: list[str]) -> None:
        self.unpruned_matched: dict[str, list[str]] = {}
        if not patterns:
            return
        names = [layer.name for layer in self.layers]
        for pat in patterns:
            hits = [n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise SmcpError(
                    f"model.unpruned: pattern '{pat}' matches no conv/linear layer; "
                    f"layers are e.g. {', '.join(names[:5])} (run `smcp inspect` for the full list)"
                )
            self.unpruned_matched[pat] = hits
            for layer in self.layers:
                if layer.name in hits:
                    reason = f"kept by model.unpruned ({pat})"
                    self._uf.freeze(layer.in_labels, reason)
                    if layer.kind != "dwconv":
                        self._uf.freeze(layer.out_labels, reason)

    def _finalise(self) -> None:
        """Union-find labels -> compact channel classes, frozen classes (with reasons), groups of
        classes read by the same consumer layers, their depthwise layers and producers."""
        frozen, reasons = self._compact_classes()
        self._freeze_unconsumed(frozen, reasons)
        self.class_frozen = frozen
        self.class_reason = reasons
        self._build_groups(self._consumer_components(), frozen)
        self._attach_dw_and_producers(reasons)
        self._mark_removable()

    def _compact_classes(self) -> tuple[torch.Tensor, dict[int, str]]:
        """Number the union-find roots 0..n_classes-1 and relabel every layer and node with them;
        returns the frozen classes and why each is frozen."""
        uf = self._uf
        n = len(uf.parent)
        root = torch.tensor([uf.find(i) for i in range(n)], dtype=torch.long)
        uniq, compact = torch.unique(root, return_inverse=True)
        self.n_classes = int(uniq.numel())
        self._raw_to_class = compact
        frozen = torch.zeros(self.n_classes, dtype=torch.bool)
        reasons: dict[int, str] = {}
        for raw, why in uf.frozen.items():
            c = int(compact[raw])
            frozen[c] = True
            reasons.setdefault(c, why)
        zero = torch.ones(self.n_classes, dtype=torch.bool)
        for raw in range(n):
            if not uf.zero[raw]:
                zero[int(compact[raw])] = False
        self.class_is_zero = zero

        def res(t: Any) -> Any:
            if isinstance(t, torch.Tensor):
                return compact[t]
            if isinstance(t, (list, tuple)):
                return [res(x) for x in t]
            return t

        self.node_labels = {k: res(v) for k, v in self.node_labels.items()}
        for layer in self.layers:
            layer.in_labels = compact[layer.in_labels]
            layer.out_labels = compact[layer.out_labels]
        return frozen, reasons

    def _freeze_unconsumed(self, frozen: torch.Tensor, reasons: dict[int, str]) -> None:
        """Classes read by no masked layer cannot be pruned (nothing would mask them)."""
        consumed = torch.zeros(self.n_classes, dtype=torch.bool)
        for layer in self.layers:
            if layer.is_consumer:
                consumed[layer.in_labels] = True
        for c in torch.nonzero(~consumed & ~frozen).flatten().tolist():
            frozen[c] = True
            reasons[c] = "not read by any conv/linear layer"

    def _consumer_components(self) -> torch.Tensor:
        """Per class, the root of its connected component of "read by the same consumer layer"."""
        parent = list(range(self.n_classes))

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for layer in self.layers:
            if not layer.is_consumer:
                continue
            ids = torch.unique(layer.in_labels).tolist()
            r0 = find(ids[0])
            for c in ids[1:]:
                rc = find(c)
                if rc != r0:
                    parent[max(rc, r0)] = min(rc, r0)
                    r0 = min(rc, r0)
        return torch.tensor([find(i) for i in range(self.n_classes)], dtype=torch.long)

    def _build_groups(self, comp: torch.Tensor, frozen: torch.Tensor) -> None:
        """One group per component, ordered by its first consumer (graph order, for readable
        output); every consumer layer joins its group."""
        consumer_roots = {int(comp[layer.in_labels[0]]) for layer in self.layers if layer.is_consumer}
        self.groups: list[Group] = []
        self.class_group = torch.full((self.n_classes,), -1, dtype=torch.long)
        root_to_group: dict[int, int] = {}
        for layer in self.layers:
            if not layer.is_consumer:
                continue
            r = int(comp[layer.in_labels[0]])
            if r not in root_to_group:
                gi = len(self.groups)
                root_to_group[r] = gi
                classes = torch.nonzero(comp == r).flatten()
                self.groups.append(Group(gi, classes, frozen[classes].clone()))
                self.class_group[classes] = gi
            gi = root_to_group[r]
            self.groups[gi].consumers.append(layer.index)
            layer.group = gi
        assert len(root_to_group) == len(consumer_roots)

    def _attach_dw_and_producers(self, reasons: dict[int, str]) -> None:
        """Depthwise layers join the group they read; each group learns its producer layers and why
        (some of) its classes are frozen."""
        for layer in self.layers:
            if layer.kind == "dwconv":
                gi = int(self.class_group[layer.in_labels[0]])
                if gi >= 0:
                    self.groups[gi].dw.append(layer.index)
                    layer.group = gi
        producers_of: dict[int, list[str]] = {}
        for layer in self.layers:
            if layer.kind == "dwconv":
                continue
            for gi in torch.unique(self.class_group[layer.out_labels]).tolist():
                if gi >= 0:
                    producers_of.setdefault(gi, []).append(layer.name)
        for g in self.groups:
            g.producers = producers_of.get(g.index, [])
            rs = [reasons[c] for c in g.classes.tolist() if c in reasons]
            if rs:
                uniq_r = list(dict.fromkeys(rs))
                g.reason = "; ".join(uniq_r[:2]) + (f" (+{len(uniq_r) - 2} more)" if len(uniq_r) > 2 else "")

    def _mark_removable(self) -> None:
        """A group may be pruned to zero channels iff the output still depends on the input
        when every consumer of the group stops depending on its input (its output becomes a
        constant)."""
        nodes = list(self.gm.graph.nodes)
        for g in self.groups:
            if not g.prunable or g.n_frozen > 0:
                continue
            dead = {self.layers[i].node for i in g.consumers}
            live: set[str] = set()
            out_live = False
            for node in nodes:
                if node.op == "placeholder":
                    live.add(node.name)
                    continue
                if node.name in dead:
                    continue
                if any(a.name in live for a in node.all_input_nodes):
                    live.add(node.name)
                    if node.op == "output":
                        out_live = True
                    if is_inplace(node, self.modules) and node.args and isinstance(node.args[0], fx.Node):
                        live.add(node.args[0].name)  # it writes into its input: later readers see it
            g.removable = out_live

    # ---------------------------------------------------------------- helpers
    @property
    def consumers(self) -> list[LayerInfo]:
        return [layer for layer in self.layers if layer.is_consumer]

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def full_keep(self) -> torch.Tensor:
        return torch.ones(self.n_classes, dtype=torch.bool)

    def widths(self, keep: torch.Tensor) -> list[tuple[int, int]]:
        """(cin, cout) of every layer for a class keep-mask (bool, n_classes)."""
        k = keep.to(torch.long)
        return [(int(k[layer.in_labels].sum()), int(k[layer.out_labels].sum())) for layer in self.layers]

    def removed_layers(self, keep: torch.Tensor) -> int:
        """How many layers a class keep-mask removes (no input or no output channel left)."""
        return sum(1 for ci, co in self.widths(keep) if ci == 0 or co == 0)

    def flops_params(self, keep: torch.Tensor | None = None) -> tuple[int, int]:
        """MACs per sample and parameters of conv/linear layers (+BN) at a keep-mask."""
        keep = self.full_keep() if keep is None else keep
        flops = params = 0
        for layer, (cin, cout) in zip(self.layers, self.widths(keep)):
            s = layer.sig
            flops += s.flops(cin, cout)
            kk = s.kernel[0] * s.kernel[1]
            if layer.kind == "dwconv":
                params += cout * kk * s.group_size + (cout if s.bias else 0)
            elif layer.kind == "conv":
                params += cin * cout * kk + (cout if s.bias else 0)
            else:
                params += cin * cout + (cout if s.bias else 0)
        for node_name in self.bns.values():
            lab = self.node_labels[node_name]
            params += 2 * int(keep[lab].sum())
        return flops, params

    def summary(self) -> dict:
        """A JSON-friendly description (for `smcp inspect`)."""
        flops, params = self.flops_params()
        # a class is one channel, except a group of a grouped conv (group_size channels)
        width = torch.ones(self.n_classes, dtype=torch.long)
        for layer in self.layers:
            if layer.kind == "dwconv" and layer.sig.group_size > 1:
                width[layer.in_labels] = layer.sig.group_size
        groups = []
        for g in self.groups:
            groups.append({
                "group": g.index,
                "channels": int(width[g.classes].sum()),
                "classes": g.size,  # the pruning units (whole conv groups for grouped convs)
                "prunable": g.prunable,
                "frozen_channels": int(width[g.classes[g.frozen]].sum()),
                "removable": g.removable,
                "reason": g.reason,
                "consumers": [self.layers[i].name for i in g.consumers],
                "depthwise": [self.layers[i].name for i in g.dw],
                "producers": g.producers,
            })
        return {
            "input_shape": list(self.input_shape),
            "layers": len(self.layers),
            "classes": self.n_classes,
            "flops": flops,
            "params": params,
            "groups": groups,
            "frozen_spots": list(dict.fromkeys(self.unsupported)),
        }
