"""The pipeline as data: the stages ``smcp run`` executes in order, and the options each one takes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from smcp_core.stages.exporting import export
from smcp_core.stages.profiling import profile
from smcp_core.stages.pruning import prune
from smcp_core.stages.slimming import slim


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable  # (recipe, out, *, reporter, **options) -> a result of smcp_core.stages.results
    options: tuple[str, ...] = ()  # the keyword options of `smcp run` this stage takes


PIPELINE: tuple[Stage, ...] = (
    Stage("profile", profile),
    Stage("prune", prune, ("resume",)),
    Stage("slim", slim),
    Stage("export", export, ("trt",)),
)
