"""``timm/<name>`` model sources: timm (pytorch-image-models) architectures, built offline.

The model is built with ``timm.create_model(name, pretrained=False, num_classes=..., **kwargs)``:
weights come only from ``model.checkpoint`` (nothing is downloaded at run time).  timm is an
optional extra (``pip install 'smcp[timm]'``); it imports torchvision, so the torchvision shim
(:func:`~smcp_core.utils.tv.import_torchvision`) runs first.

Re-parameterisable architectures (RepVGG, MobileOne, FastViT, RepViT, LeViT, ...: every module
with timm's ``fuse()``, ``reparameterize()`` or ``switch_to_deploy()``) are pruned in their *deployed* form: :func:`deploy_form` folds the
training-time branches into one conv per block, as ``timm.utils.reparameterize_model`` does before
export, and smcp profiles, prunes, fine-tunes, slims and exports that form.
"""

from __future__ import annotations

import difflib
from types import ModuleType

from torch import nn

from smcp_core.errors import SmcpError
from smcp_core.utils.tv import import_torchvision

PREFIX = "timm/"
# create_model arguments that would fetch or load weights: weights come from model.checkpoint only
_WEIGHT_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


def import_timm(what: str) -> ModuleType:
    """The ``timm`` module (after the torchvision shim), or one line saying how to install it."""
    import_torchvision()
    try:
        import timm  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise SmcpError(f"model {what}: timm is not installed ({exc}); install it with "
                        "`pip install 'smcp[timm]'` (or `pip install timm`)") from None
    return timm


def build_timm(source: str, num_classes: int | None, kwargs: dict, call_builder) -> nn.Module:
    """``timm.create_model`` for ``source`` = ``timm/<name>``, without downloading anything."""
    name = source[len(PREFIX):]
    timm = import_timm(source)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(PREFIX + c for c in close)}?" if close else \
            "timm.list_models() shows the valid names"
        raise SmcpError(f"model {source}: unknown timm model '{name}'; {hint}")
    bad = [k for k in _WEIGHT_KWARGS if k in kwargs]
    if bad:
        raise SmcpError(f"model {source}: model.kwargs.{bad[0]} is not allowed: smcp never downloads "
                        "weights at run time; give the weights file as model.checkpoint")
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    return call_builder(source, lambda **kw: timm.create_model(name, pretrained=False, **kw), kwargs)


_FOLD_METHODS = ("fuse", "reparameterize", "switch_to_deploy")  # what timm.utils.reparameterize_model calls


def reparameterizable(model: nn.Module) -> bool:
    """Whether ``model`` has blocks timm folds for deployment (RepVGG/MobileOne branches, RepViT and
    LeViT conv + BN pairs, ...); still true once folded (folding again changes nothing)."""
    return any(m is not model and any(callable(getattr(m, a, None)) for a in _FOLD_METHODS)
               for m in model.modules())


def deploy_form(model: nn.Module) -> nn.Module:
    """``model`` with its re-parameterisable blocks folded (in place, eval mode), as timm deploys
    them; any other model unchanged."""
    if not reparameterizable(model):
        return model
    timm = import_timm(type(model).__name__)
    was_training = model.training
    model.eval()
    model = timm.utils.reparameterize_model(model, inplace=True)
    return model.train(was_training)
