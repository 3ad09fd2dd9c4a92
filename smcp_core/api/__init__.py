"""Prune inside a training loop you own: SMCP as a library.

The same steps as ``smcp profile / prune / slim / export``, on a model object instead of a recipe
(``smcp prune`` itself drives the same :class:`~smcp_core.prune.pruner.Pruner`)::

    import torch
    from smcp_core import api

    model = torchvision.models.resnet18(num_classes=10)         # your model, your data, your loss
    example = torch.randn(1, 3, 64, 64)
    graph = api.channel_graph(model, example)                   # or submodule="backbone"
    table = api.profile(model, graph, example)                  # latency table (onnxruntime CPU), or api.load_table
    pruner = api.pruner(model, graph, table, speedup=2.0,       # 2x the measured dense speed
                        schedule=api.StepSchedule(warmup=100, ramp=400, update_every=50))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.before_step()                                    # importance, pruned decay
        opt.step()
        pruner.after_step()                                     # mask updates on the schedule
    slim = api.slim(model, pruner)                              # channels removed; outputs == masked model
    api.export_onnx(slim, example, "model.onnx")
    print(api.measure_speedup(model, slim, example).speedup.median)

Create the optimizer after the pruner (the pruner re-parametrises the masked weights; their
parameters are the same tensors, but build it after to be safe with optimizers that copy).
The pruner's state goes into your checkpoint with ``pruner.state_dict()`` / ``load_state_dict``.
After a mask change, ``api.recalibrate_bn(model, batches, n)`` re-estimates the batch norms'
running statistics at the current masks from ``n`` ``(x, ...)`` batches (as ``smcp prune`` does
before evaluating; ``pruner.bn_stale`` says whether the masks changed since).  Under DDP pass the
unwrapped module: scores are all-reduced and masks broadcast from rank 0.

Distillation from the dense model (as ``prune.distill``): take ``teacher = api.Teacher(model)``
before ``api.pruner(...)`` (a frozen copy of the dense model) and train on
``api.distillation_loss(model(x), teacher(x), y, alpha=0.5, temperature=4.0)``.

Bad input is one line (:class:`~smcp_core.errors.SmcpError`), worded like the CLI's.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smcp_core.config import presets
from smcp_core.config.presets import UNSTRUCTURED
from smcp_core.config.recipe import PruneConfig, recipe_from
from smcp_core.errors import SmcpError
from smcp_core.events import Reporter
from smcp_core.export.onnx import export_onnx as _export_onnx
from smcp_core.export.onnx import onnx_parity
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.profile.cost_model import CostModel
from smcp_core.profile.measure import measure_table
from smcp_core.profile.table import LatencyTable
from smcp_core.prune.allocator import Allocator
from smcp_core.prune.bn_recalibration import recalibrate_bn as _recalibrate_bn
from smcp_core.prune.closed_loop import ClosedLoop, LatencyCheck
from smcp_core.prune.distill import Teacher, distillation_loss
from smcp_core.prune.pruner import Pruner, StepSchedule
from smcp_core.slim.surgery import slim_submodule
from smcp_core.stages.builders import budget_for_target
from smcp_core.stages.measure import Bench, PairMeasurement, keep_measurer, measure_pair
from smcp_core.stages.profiling import calibrate
from smcp_core.stages.pruning import check_reachable

__all__ = ["ChannelGraph", "LatencyTable", "Pruner", "StepSchedule", "Teacher", "channel_graph", "distillation_loss",
           "export_onnx", "load_table", "measure_speedup", "profile", "pruner", "recalibrate_bn", "slim"]


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise SmcpError(f"model {type(model).__name__} has no submodule {name!r}; its children are "
                        f"{', '.join(names) or '(none)'} (use a dotted name such as 'backbone.body')") from None


def _input_of(model: nn.Module, sub: nn.Module, name: str, example: Any) -> torch.Tensor:
    """What ``sub`` receives when ``model`` runs on ``example`` (one tensor)."""
    seen: list = []
    handle = sub.register_forward_pre_hook(lambda _m, args: seen.append(args) if not seen else None)
    try:
        with _evaluating(model), torch.no_grad():
            model(example)
    except SmcpError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model: one line, not its traceback
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SmcpError(f"model {type(model).__name__} failed on the example input: {line}") from None
    finally:
        handle.remove()
    if not seen:
        raise SmcpError(f"submodule {name!r} is not called by {type(model).__name__}.forward on the example input")
    args = seen[0]
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        raise SmcpError(f"submodule {name!r} takes {len(args)} inputs; smcp prunes a submodule that takes one "
                        "tensor (wrap the part you want pruned in a module of its own)")
    return args[0].detach()


@contextlib.contextmanager
def _evaluating(*models: nn.Module) -> Iterator[None]:
    """The models in eval mode inside, their own modes restored after (a training loop's model)."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, was in zip(models, modes):
            m.train(was)


def _profile_settings(**settings: Any):
    """A checked ``profile`` section from keyword settings (None values left at their defaults)."""
    return recipe_from({"profile": {k: v for k, v in settings.items() if v is not None}}).profile


def channel_graph(model: nn.Module, example: Any, *, submodule: str | None = None,
                  unpruned: list[str] | tuple[str, ...] = (),
                  leaf_modules: list[str] | tuple[str, ...] = ()) -> ChannelGraph:
    """The channel graph of ``model`` (traced with ``torch.fx`` at ``example``), or of its
    ``submodule`` (a dotted name, e.g. a detector's ``"backbone.body"``): the submodule's input is
    captured from one forward of the whole model, and its outputs (features) stay unpruned.
    ``unpruned``: layer names (relative to the submodule) whose output channels are kept;
    ``leaf_modules``: module type names the trace keeps whole (their channels are frozen)."""
    target = model
    x = example
    if submodule:
        target = _submodule(model, submodule)
        x = _input_of(model, target, submodule, example)
    elif not isinstance(example, torch.Tensor):
        raise SmcpError(f"the example input must be a tensor, got {type(example).__name__}")
    as_list = (lambda v: [v] if isinstance(v, str) else list(v))  # noqa: E731 - "fc" means ["fc"]
    return ChannelGraph(target, x, unpruned=as_list(unpruned), submodule=submodule,
                        leaf_modules=as_list(leaf_modules))


def profile(model: nn.Module, graph: ChannelGraph, example: torch.Tensor, *, backend: str = "onnxruntime",
            batch_size: int = 1, threads: int | None = None, channel_step: int = 8, max_seconds: float = 600.0,
            device: str = "cpu", calibration: str = "global", reporter: Reporter | None = None) -> LatencyTable:
    """The latency table of ``graph``'s layers on ``backend`` (as ``smcp profile``), with the
    whole-model calibration measured on ``model`` (the whole model, e.g. the whole detector, when
    the graph is of a submodule) and slimmed copies of it; ``calibration``: ``"global"`` or
    ``"per_resolution"`` (as the recipe key ``profile.calibration``).  Call it before :func:`pruner`
    (the model must not carry masks yet).  ``example`` is the whole model's input (one sample is
    repeated to ``batch_size``)."""
    if not isinstance(example, torch.Tensor):
        raise SmcpError(f"profile: the example input must be a tensor, got {type(example).__name__}")
    rep = reporter or Reporter()
    prof = _profile_settings(backend=backend, batch_size=batch_size, threads=threads, channel_step=channel_step,
                             max_seconds=max_seconds, device=device, calibration=calibration)
    table = measure_table([layer.sig for layer in graph.layers], backend=prof.backend, batch_size=prof.batch_size,
                          device=prof.device, channel_step=prof.channel_step, threads=prof.threads,
                          warmup=prof.warmup, min_runs=prof.min_runs, max_seconds=prof.max_seconds,
                          progress=lambda d, t, k: rep.progress("profile", d, t, k))
    with tempfile.TemporaryDirectory(prefix="smcp-profile-") as tmp, _evaluating(model):
        whole = calibrate(graph, table, model=model, source=model, where=Bench(prof, example.detach().cpu()),
                          workdir=Path(tmp) / "models", reporter=rep, min_rounds=max(100, 5 * prof.min_runs),
                          max_seconds=min(20.0, prof.max_seconds / 20))
    table.model = {"model_source": f"python:{type(model).__name__}", "submodule": graph.submodule,
                   "input_shape": list(example.shape[1:]), **whole}
    return table


def load_table(path: str | Path) -> LatencyTable:
    """A latency table written by ``smcp profile`` (``OUT/latency.json``) or ``table.save(path)``."""
    table = LatencyTable.load(path)
    if not table.model or "measured_ms" not in table.model:
        raise SmcpError(f"latency table {path} has no whole-model measurement; re-measure it with api.profile "
                        "or `smcp profile`")
    return table


def _one_target(speedup: float | None, latency_ms: float | None, flops_ratio: float | None) -> tuple[str, float]:
    given = [(k, v) for k, v in (("speedup", speedup), ("latency_ms", latency_ms), ("flops_ratio", flops_ratio))
             if v is not None]
    if len(given) != 1:
        raise SmcpError("give exactly one target: speedup=, latency_ms= or flops_ratio= "
                        f"(got {', '.join(k for k, _ in given) or 'none'})")
    kind, value = given[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SmcpError(f"target {kind}={value!r} must be a number")
    ok = value > 1 if kind == "speedup" else (0 < value < 1 if kind == "flops_ratio" else value > 0)
    if not ok:
        need = {"speedup": "> 1", "flops_ratio": "between 0 and 1", "latency_ms": "> 0"}[kind]
        raise SmcpError(f"target {kind}={value!r} must be {need}")
    return kind, float(value)


def pruner(model: nn.Module, graph: ChannelGraph, table: LatencyTable | None = None, *,
           speedup: float | None = None, latency_ms: float | None = None, flops_ratio: float | None = None,
           schedule: StepSchedule, config: PruneConfig | Mapping[str, Any] | None = None,
           example: torch.Tensor | None = None, closed_loop: int = 2,
           reporter: Reporter | None = None) -> Pruner:
    """A :class:`Pruner` of ``model`` (the graph's submodule of it) to one target: ``speedup``
    (times the table's measured dense latency) or ``latency_ms`` (both need ``table``), or
    ``flops_ratio``.  ``config``: keys of the recipe's ``prune`` section (method, masking,
    importance, pruned_decay, channel_round, min_channels, layer_pruning, target_margin, ...);
    the epoch keys do not apply (``schedule`` is in optimizer steps).  An unreachable target is one
    line naming the fastest reachable model, before any step.

    With ``example`` (the whole model's input) and a latency target, the window's last mask update
    is followed by the closed loop (as ``smcp prune``'s ``prune.closed_loop``): a copy of the dense
    model and the model slimmed to the masks are timed in paired rounds on the table's backend, and
    the masks corrected (up to ``closed_loop`` times) until the measured interval meets the target."""
    kind, value = _one_target(speedup, latency_ms, flops_ratio)
    if config is not None and not isinstance(config, (PruneConfig, Mapping)):
        raise SmcpError(f"config must be a mapping of prune-section keys, got {type(config).__name__}")
    pc = config if isinstance(config, PruneConfig) else recipe_from({"prune": dict(config or {})}).prune
    method = presets.spec(pc.method)
    if method.soft_filter or pc.method in UNSTRUCTURED or pc.method == "none":
        raise SmcpError(f"prune.method {pc.method} is not available in the Python API (its updates are per epoch, "
                        "or it removes no channel); use smcp, halp, l1 or uniform")
    if not isinstance(schedule, StepSchedule):
        raise SmcpError("schedule must be an api.StepSchedule(warmup=..., ramp=..., update_every=...)")
    if schedule.ramp + schedule.hold < 1:
        raise SmcpError(f"the schedule has no pruning window (ramp={schedule.ramp}, hold={schedule.hold}): give "
                        "ramp >= 1 optimizer steps, so that importance is scored before the masks are chosen")
    if kind != "flops_ratio" and (table is None or not table.model or "measured_ms" not in table.model):
        raise SmcpError(f"a {kind} target needs a latency table with a whole-model measurement: "
                        "table = api.profile(model, graph, example) (or api.load_table)")
    cost = CostModel(graph, "flops" if kind == "flops_ratio" else "latency", table)
    budget, tdesc = budget_for_target(kind, value, pc.target_margin, cost, table)
    alloc = Allocator.from_recipe(graph, cost, pc)
    rep = reporter or Reporter()
    if budget >= alloc.full_cost:
        rep.log(f"target {kind}={value:g} is not below the dense model's cost: nothing to prune")
    relax = {"speedup": "lower speedup=", "latency_ms": "raise latency_ms=", "flops_ratio": "raise flops_ratio="}[kind]
    relax = f"{relax} or allow smaller widths (config min_channels, channel_round, layer_pruning)"
    check_reachable(alloc, cost, graph, budget, tdesc, relax=relax)
    if method.allocation == "uniform" and budget < alloc.full_cost:  # one fraction everywhere: reachable?
        alloc.solve_uniform(torch.zeros(graph.n_classes), budget)
    target = _submodule(model, graph.submodule) if graph.submodule else model
    # the dense model the closed loop times against (on the CPU: only its structure is used)
    dense = (copy.deepcopy(model).cpu() if example is not None and closed_loop > 0 and kind != "flops_ratio"
             else None)
    p = Pruner(target, graph, cost, target_cost=budget, config=pc, schedule=schedule, reporter=rep,
               allocator=alloc)
    p.target = tdesc
    if dense is not None:
        p.on_window_end = _closed_loop(dense, example, table, tdesc, rounds=closed_loop)
    return p


def _closed_loop(dense: nn.Module, example: torch.Tensor, table: LatencyTable, tdesc: dict, *, rounds: int):
    """``on_window_end`` of a pruner: :class:`~smcp_core.prune.closed_loop.ClosedLoop` with ``dense``
    (the model before masking) and its slimmed copies timed on the table's backend and batch."""
    prof = _profile_settings(**{k: table.meta.get(k) for k in ("backend", "batch_size", "threads", "device")})
    cal = (table.model or {}).get("calibration") or {}
    points = [(q["layer_sum_ms"], int(q.get("removed_layers", 0)), q["measured_ms"]) for q in cal.get("points", [])]

    def run(pruner: Pruner, epoch: int) -> None:
        with tempfile.TemporaryDirectory(prefix="smcp-closed-loop-") as tmp, _evaluating(dense):
            measure = keep_measurer(dense, dense, Bench(prof, example.detach().cpu()), pruner.graph, Path(tmp),
                                    target_speedup=tdesc["baseline_ms"] / tdesc["target_ms"])
            check = LatencyCheck(measure=measure, baseline_ms=tdesc["baseline_ms"], target_ms=tdesc["target_ms"],
                                 aim_ms=tdesc["aim_ms"], points=list(points), rounds=rounds,
                                 relax_hint="raise closed_loop= or config target_margin")
            ClosedLoop(pruner, check).run(epoch)

    return run


def slim(model: nn.Module, pruner: Pruner) -> nn.Module:
    """The model with the pruned channels removed (the graph's submodule slimmed and put in its
    place in a copy).  Training that ended inside the pruning window gets one last mask update at
    the target first (as ``smcp prune`` does).  Finalizes the pruner (:meth:`Pruner.finalize`):
    ``model`` itself is then the plain masked model, whose outputs the slim model's equal."""
    if not pruner.finalized:
        if pruner.enforce_target() is not None:
            pruner.rep.log(f"slim: training stopped at step {pruner.steps}, before the pruning window's end; the "
                           "masks were set to the target once more without fine-tuning after it")
        pruner.finalize()
    return slim_submodule(model, pruner.graph, pruner.keep())


def recalibrate_bn(model: nn.Module, batches, n_batches: int, *, pruner: Pruner | None = None,
                   device: torch.device | str | None = None) -> int:
    """Re-estimate the running statistics of ``model``'s batch norms at its current masks from the
    first ``n_batches`` ``(x, ...)`` batches of ``batches`` (training batches, no augmentation
    needed); clears ``pruner.bn_stale`` when given.  Returns the number of batches used."""
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    used = _recalibrate_bn(model, batches, n_batches, device=device)
    if pruner is not None and used:
        pruner.bn_stale = False
    return used


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, opset: int = 18,
                dynamic_batch: bool = True) -> dict:
    """Write ``model`` as ONNX (as ``smcp export``) and return its parity with the torch model on
    ``example`` (``max_abs_diff``, ``max_rel_diff``, ``top1_agree``, ...)."""
    out = _export_onnx(model, example, path, opset=opset, dynamic_batch=dynamic_batch)
    return {"path": str(out), **onnx_parity(model, out, example)}


def measure_speedup(dense: nn.Module, slim_model: nn.Module, example: torch.Tensor, *,
                    backend: str = "onnxruntime", batch_size: int = 1, threads: int | None = None,
                    target: float | None = None, confidence: float = 0.9, max_seconds: float = 60.0,
                    device: str = "cpu") -> PairMeasurement:
    """``dense`` and ``slim_model`` timed in paired alternating rounds on ``backend`` (as the export
    gate): ``.speedup`` is the median per-round ratio with its ``confidence`` interval; with a
    ``target`` speed-up, ``.verdict`` says whether the interval meets it."""
    prof = _profile_settings(backend=backend, batch_size=batch_size, threads=threads, device=device)
    with tempfile.TemporaryDirectory(prefix="smcp-measure-") as tmp, _evaluating(dense, slim_model):
        return measure_pair(dense, slim_model, Bench(prof, example.detach().cpu()), batch=prof.batch_size,
                            backend=prof.backend, workdir=Path(tmp), kind="speedup" if target else None,
                            target=target, confidence=confidence, max_seconds=max_seconds)
