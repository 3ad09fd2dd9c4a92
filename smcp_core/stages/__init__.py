"""The pipeline's stages on a run directory, driven by a recipe: profile, prune, slim, export (and the
gate), with the builders and artifact checks they share.

Run directory layout (each file written atomically)::

    OUT/recipe.resolved.yaml      the fully resolved recipe of the last command
    OUT/latency.json              latency table + whole-model measurements and calibration
    OUT/prune/checkpoint.pt       last epoch (resume)
    OUT/prune/pruned.pt           dense weights with masks baked in + class keep-mask
    OUT/prune/summary.json        target, predicted cost, per-group widths, history
    OUT/slim/weights.pt           slim model tensors (torch.load(weights_only=True))
    OUT/slim/channel_spec.json    how to rebuild it from the original model definition
    OUT/slim/model.pt2            torch.export program of the slim model
    OUT/export/model.onnx, baseline.onnx, report.json

Each stage records a *stamp* (a hash of the recipe sections and upstream stamps it depends on);
``run`` skips a stage whose stamp is unchanged and whose outputs exist and are intact.

Integrity: every artifact's SHA-256 is recorded in ``SHA256SUMS`` in its directory
(:mod:`smcp_core.utils.fsutil`).  A stage that reads a corrupt or truncated artifact stops with a
one-line :class:`SmcpError` and leaves the file as it is; re-running the stage that produces it (or
``smcp run --force``) re-creates it.
"""

from smcp_core.stages.artifacts import (
                                       STAGE_OUTPUTS,
                                       STAGES,
                                       check_artifacts,
                                       stamp,
                                       up_to_date,
                                       write_resolved,
)
from smcp_core.stages.builders import (
                                       build_data,
                                       build_graph,
                                       build_model,
                                       example_input,
                                       input_shape,
                                       load_table,
                                       num_classes,
                                       target_budget,
)
from smcp_core.stages.exporting import export
from smcp_core.stages.gate import gate
from smcp_core.stages.measure import (
    measure_against_baseline,
    measure_as_export,
    measure_in_one_loop,
    measure_lowest,
    measure_models,
    slim_structure,
)
from smcp_core.stages.profiling import profile
from smcp_core.stages.pruning import prune
from smcp_core.stages.registry import PIPELINE, Stage
from smcp_core.stages.results import (
                                       ExportResult,
                                       ProfileResult,
                                       PruneResult,
                                       SlimResult,
)
from smcp_core.stages.slimming import load_pruned, load_slim, rebuild_slim, slim

__all__ = [
    "STAGES", "STAGE_OUTPUTS", "check_artifacts", "stamp", "up_to_date", "write_resolved",
    "build_data", "build_graph", "build_model", "example_input", "input_shape", "load_table", "num_classes",
    "target_budget", "export", "gate", "measure_against_baseline", "measure_as_export", "measure_in_one_loop",
    "measure_lowest",
    "measure_models", "slim_structure",
    "profile", "prune",
    "load_pruned", "load_slim", "rebuild_slim", "slim", "ExportResult", "ProfileResult", "PruneResult", "SlimResult",
    "PIPELINE", "Stage",
]
