"""Objects built from a recipe: the model (with its checkpoint), its example input, channel graph and
data, the latency table of a run directory, and the layer-sum budget of the target."""

from __future__ import annotations

from pathlib import Path

import torch

from smcp_core import data as data_sources
from smcp_core import models as model_sources
from smcp_core.config.recipe import Recipe
from smcp_core.errors import SmcpError
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.models.timm_source import deploy_form, reparameterizable
from smcp_core.profile.fingerprint import device_fingerprint, fingerprint_id
from smcp_core.profile.table import LatencyTable

_DEFAULT_SHAPES = {"digits": (1, 32, 32), "cifar10": (3, 32, 32), "imagefolder": (3, 224, 224),
                   "imagenet_samples": (3, 224, 224), "synthetic": (3, 32, 32)}


_DEFAULT_CLASSES = {"digits": 10, "cifar10": 10, "imagenet_samples": 1000, "synthetic": 10}


def input_shape(recipe: Recipe) -> tuple[int, int, int]:
    if recipe.model.input_size:
        return tuple(int(v) for v in recipe.model.input_size)
    c, h, w = _DEFAULT_SHAPES.get(recipe.data.source, (3, 224, 224))
    if recipe.data.image_size:
        h = w = int(recipe.data.image_size)
    return (c, h, w)


def num_classes(recipe: Recipe) -> int | None:
    if recipe.model.num_classes:
        return int(recipe.model.num_classes)
    return _DEFAULT_CLASSES.get(recipe.data.source) or data_sources.class_count(recipe.data.source,
                                                                      recipe.data.path)


# Whether checkpoints that need full unpickling may be loaded.  Off unless a caller in this process
# switches it on (the CLI's ``--trust-checkpoint``): deliberately not read from the environment, so
# an inherited ``SMCP_TRUST_CHECKPOINT=1`` (CI settings, a wrapper script, a shell profile) cannot
# turn unpickling on behind the user's back.
_TRUST_CHECKPOINT = False


def set_trust_checkpoint(on: bool) -> None:
    """Allow (``True``) or refuse (``False``, the default) pickled checkpoints for the rest of this
    process; called by the CLI for ``--trust-checkpoint`` on every command."""
    global _TRUST_CHECKPOINT
    _TRUST_CHECKPOINT = bool(on)


def trust_checkpoint() -> bool:
    """What :func:`set_trust_checkpoint` last set (never the environment)."""
    return _TRUST_CHECKPOINT


def build_model(recipe: Recipe, *, load_weights: bool = True, trust: bool | None = None) -> torch.nn.Module:
    """The recipe's model with its checkpoint loaded.  ``trust`` (default: :func:`trust_checkpoint`,
    i.e. ``smcp --trust-checkpoint``; the environment plays no part) allows checkpoints that need full
    unpickling; otherwise they load with ``weights_only=True``."""
    if trust is None:
        trust = _TRUST_CHECKPOINT

    torch.manual_seed(recipe.seed)  # from-scratch initial weights depend on the recipe only
    checkpoint = recipe.model.checkpoint if load_weights else None
    try:
        model = model_sources.build_model(recipe.model.source, num_classes=num_classes(recipe),
                                          kwargs=dict(recipe.model.kwargs or {}), deploy=not checkpoint)
    except SmcpError as exc:
        if recipe.model.kwargs and "kwargs" in str(exc):  # say where they came from
            where = ("by --set" if any(o.startswith("model.kwargs") for o in recipe.overrides)
                     else f"in {recipe.source_label}")
            raise SmcpError(f"{exc}; model.kwargs {dict(recipe.model.kwargs)} are set {where}: change "
                            "them there or override them, e.g. --set 'model.kwargs={}'") from None
        raise
    if checkpoint:
        _load_then_deploy(model, checkpoint, trust)
        model = deploy_form(model)
    return model.eval()


def _load_then_deploy(model: torch.nn.Module, checkpoint: str, trust: bool) -> None:
    """Load ``checkpoint`` into ``model`` (a re-parameterisable one in its training form, then folded
    by the caller); a checkpoint of the folded (deployed) form loads after folding."""
    try:
        model_sources.load_checkpoint(model, checkpoint, trust=trust)
    except SmcpError as training_form_error:
        if not reparameterizable(model):
            raise
        deploy_form(model)
        try:
            model_sources.load_checkpoint(model, checkpoint, trust=trust)
        except SmcpError:
            raise training_form_error from None


def example_input(recipe: Recipe, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(batch, *input_shape(recipe), generator=g)


def build_graph(recipe: Recipe, model: torch.nn.Module) -> ChannelGraph:
    return ChannelGraph(model, example_input(recipe), unpruned=list(recipe.model.unpruned or []),
                        leaf_modules=list(recipe.model.leaf_modules or []))


def build_data(recipe: Recipe):

    d = recipe.data
    return data_sources.build_data(d.source, path=d.path, image_size=d.image_size, train_subset=d.train_subset,
               val_subset=d.val_subset, seed=recipe.seed, augment=d.augment, val_source=d.val_source,
               val_path=d.val_path, num_classes=recipe.model.num_classes,
               input_shape=tuple(recipe.model.input_size) if recipe.model.input_size else None)


def load_table(recipe: Recipe, out: Path, *, force_table: bool = False):

    path = out / "latency.json"
    if not path.exists():
        raise SmcpError(f"latency table {path} not found; run `smcp profile` with the same --recipe/--out first")
    table = LatencyTable.load(path)
    prof = recipe.profile

    fid = fingerprint_id(device_fingerprint(prof.backend, prof.device, prof.threads))
    table.check_compatible(prof.backend, prof.device, prof.batch_size, prof.dtype, prof.layout, fid, force=force_table)
    if not table.model or "measured_ms" not in table.model:
        raise SmcpError(f"latency table {path} has no whole-model measurement; re-run `smcp profile`")
    return table


def target_budget(recipe: Recipe, cost, table) -> tuple[float, dict]:
    """Layer-sum budget for the recipe's target, and a description of it."""
    return budget_for_target(recipe.target_kind(), recipe.target_value(), recipe.prune.target_margin, cost, table)


def budget_for_target(kind: str, value: float, margin: float, cost, table) -> tuple[float, dict]:
    """Layer-sum budget for a ``speedup``/``latency_ms`` (from the table's measured dense latency)
    or ``flops_ratio`` target aimed ``margin`` below it, and a description of it."""
    if kind == "flops_ratio":
        full = cost.total(cost.graph.full_keep())
        return value * (1 - margin) * full, {"kind": kind, "value": value, "full": full, "unit": cost.unit,
                                             "margin": margin}
    base = float(table.model["measured_ms"])
    lat = base / value if kind == "speedup" else value
    return cost.budget_for(lat * (1 - margin)), {"kind": kind, "value": value, "baseline_ms": base,
                                                 "target_ms": lat, "aim_ms": lat * (1 - margin),
                                                 "margin": margin, "unit": "ms"}
