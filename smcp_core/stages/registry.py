"""The pipeline as data: the stages ``smcp run`` executes in order, and the options each one takes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from smcp_core.config.presets import UNSTRUCTURED
from smcp_core.config.recipe import Recipe
from smcp_core.errors import SmcpError
from smcp_core.stages.builders import build_graph, build_model, example_input
from smcp_core.stages.exporting import export
from smcp_core.stages.profiling import profile
from smcp_core.stages.pruning import prune
from smcp_core.stages.slimming import slim


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable  # (recipe, out, *, reporter, **options) -> a result of smcp_core.stages.results
    options: tuple[str, ...] = ()  # the keyword options of `smcp run` this stage takes
    needs_prunable: bool = False  # pointless for a model with no prunable channel (checked before it runs)


PIPELINE: tuple[Stage, ...] = (
    # --force re-measures the table from scratch: a corrupt or truncated latency.json is re-created
    Stage("profile", profile, ("force",), needs_prunable=True),
    Stage("prune", prune, ("resume",), needs_prunable=True),
    Stage("slim", slim),
    Stage("export", export, ("trt",)),
)


def removes_channels(recipe: Recipe) -> bool:
    """The recipe's method removes channels (not ``none``, not the unstructured ``snip``/``magnitude``)."""
    return not (recipe.prune.method == "none" or recipe.prune.method in UNSTRUCTURED)


def check_prunable(recipe: Recipe) -> None:
    """Before the chain starts (profiling can take minutes): a channel-pruning method on a model
    whose channel graph has no prunable group is one line naming why, not a profile followed by an
    unreachable target."""
    if not removes_channels(recipe):
        return
    model = build_model(recipe, load_weights=False)
    graph = build_graph(recipe, model)
    _check_output_rows(recipe, model)
    if any(g.prunable for g in graph.groups):
        return
    why = "; ".join(dict.fromkeys([*(g.reason for g in graph.groups if g.reason), *graph.unsupported]))
    raise SmcpError(
        f"model {recipe.model.source} has nothing to prune: no channel group is prunable"
        f"{f' (frozen: {why[:200]})' if why else ''}; see `smcp inspect {recipe.model.source}`, and change the "
        f"model or model.unpruned, or use prune.method none/snip/magnitude")


def _check_output_rows(recipe: Recipe, model: torch.nn.Module) -> None:
    """The model's output for a batch of 2 is a batch x classes tensor (a scalar, or one row for
    the whole batch, would fail only in the loss after profiling)."""
    with torch.no_grad():
        out = model(example_input(recipe, batch=2))
    if isinstance(out, torch.Tensor) and (out.dim() != 2 or out.shape[0] != 2):
        raise SmcpError(f"model {recipe.model.source} returns a tensor of shape {list(out.shape)} for a batch of 2; "
                        "smcp needs logits of shape [batch, classes]: make forward() return one row per input")
