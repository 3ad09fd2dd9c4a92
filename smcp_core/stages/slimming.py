"""The slim stage: the masked model's pruned channels physically removed, and its rebuild."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from smcp_core import models as model_sources
from smcp_core.config.recipe import Recipe
from smcp_core.errors import GateFailed, SmcpError
from smcp_core.events import Reporter
from smcp_core.graph.channel_graph import ChannelGraph
from smcp_core.slim.surgery import count_params, export_program, slim_model
from smcp_core.stages.artifacts import stamp
from smcp_core.stages.builders import (
    build_graph,
    build_model,
    example_input,
    input_shape,
    num_classes,
)
from smcp_core.stages.results import SlimResult
from smcp_core.utils.fsutil import (
    atomic_torch_save,
    atomic_write_json,
    forget_checksum,
    load_torch,
    read_json,
    record_checksum,
    remove_artifact,
)
from smcp_core.utils.text import first_line

FAILED = "slim.failed.json"  # a failed gate's figures (kept for the user, never read by a stage)


def load_pruned(recipe: Recipe, out: Path) -> tuple[torch.nn.Module, ChannelGraph, torch.Tensor]:
    path = out / "prune" / "pruned.pt"
    if not path.exists():
        raise SmcpError(f"pruned checkpoint {path} not found; run `smcp prune` with the same --recipe/--out first")
    ck = load_torch(path, "pruned checkpoint", "re-run `smcp prune`", keys=("state_dict", "keep", "n_classes"))
    model = build_model(recipe, load_weights=False)
    graph = build_graph(recipe, model)
    if int(ck.get("n_classes", -1)) != graph.n_classes:
        raise SmcpError(f"{path} was made for a different model than {recipe.model.source}; re-run `smcp prune`")
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as exc:
        raise SmcpError(f"{path} does not match the recipe's model: {str(exc).splitlines()[0]}") from None
    return model.eval(), graph, ck["keep"].to(torch.bool)


def slim(recipe: Recipe, out: Path, *, reporter: Reporter | None = None) -> SlimResult:

    rep = reporter or Reporter()
    model, graph, keep = load_pruned(recipe, out)
    t0 = time.perf_counter()
    slim_gm = slim_model(model, graph, keep)
    t_slim = time.perf_counter() - t0
    x = example_input(recipe, 4)
    with torch.no_grad():
        diff = float((model(x) - slim_gm(x)).abs().max())
    tol = recipe.export.tolerance
    sdir = out / "slim"
    sdir.mkdir(parents=True, exist_ok=True)
    # slim.json is the stamp that lets later stages use the files below: gone until they pass the gate
    remove_artifact(sdir / "slim.json")
    remove_artifact(sdir / FAILED)
    atomic_torch_save({k: v.detach().cpu() for k, v in slim_gm.state_dict().items()}, sdir / "weights.pt",
                      checksum=True)
    spec = {
        "format": "smcp-channel-spec/1",
        "model": _model_fields(recipe),
        "input_shape": list(input_shape(recipe)),
        "n_classes": graph.n_classes,
        "kept_classes": torch.nonzero(keep).flatten().tolist(),
        "layers": [{"name": layer.name, "cin": ci, "cout": co}
                   for layer, (ci, co) in zip(graph.layers, graph.widths(keep))],
    }
    atomic_write_json(sdir / "channel_spec.json", spec, checksum=True)
    rep.log("saving torch.export program")
    forget_checksum(sdir / "model.pt2")  # written by slim.export_program: record it afterwards
    export_program(slim_gm, example_input(recipe, 2), sdir / "model.pt2")
    record_checksum(sdir / "model.pt2")
    flops_full, params_full = graph.flops_params()
    flops_kept, _ = graph.flops_params(keep)
    res = SlimResult(stamp=stamp(recipe, "slim"), max_abs_diff=diff, tolerance=tol, params=count_params(slim_gm),
                     params_full=count_params(model), flops=flops_kept, flops_full=flops_full, seconds=t_slim)
    if diff > tol:  # the evidence stays (weights, spec, program, figures), unstamped: no stage uses it
        atomic_write_json(sdir / FAILED, {**res.to_dict(), "passed": False}, checksum=True)
        raise GateFailed(f"slim model differs from the masked model by {diff:.3g} (> tolerance {tol:g}); "
                         f"please report this model (figures in {sdir / FAILED})")
    atomic_write_json(sdir / "slim.json", res.to_dict(), checksum=True)
    return res


def _model_fields(recipe: Recipe) -> dict:
    """The model definition a slim model is made for, as ``channel_spec.json`` records it."""
    return {"source": recipe.model.source, "kwargs": dict(recipe.model.kwargs or {}),
            "num_classes": num_classes(recipe), "unpruned": list(recipe.model.unpruned or []),
            "leaf_modules": list(recipe.model.leaf_modules or [])}


def load_slim(recipe: Recipe, out: Path) -> torch.nn.Module:
    """The slim model of ``out`` for ``recipe``: rebuilt from the *recipe's* model definition +
    ``slim/channel_spec.json`` (data only: kept classes, shapes) + ``slim/weights.pt`` (tensors).
    Refused unless ``slim/slim.json`` exists (the slim gate passed) with the stamp of this recipe."""
    sdir = out / "slim"
    spec, weights, summary = sdir / "channel_spec.json", sdir / "weights.pt", sdir / "slim.json"
    if (sdir / FAILED).exists() and not summary.exists():
        raise SmcpError(f"the slim model in {sdir} failed its gate (slim != masked model, see {sdir / FAILED}); "
                        "it is not used: fix the cause and re-run `smcp slim`")
    if not spec.exists() or not weights.exists() or not summary.exists():
        raise SmcpError(f"slim model not found in {sdir}; run `smcp slim` with the same --recipe/--out first")
    st = read_json(summary, "slim summary", "re-run `smcp slim`")
    if not isinstance(st, dict) or st.get("stamp") != stamp(recipe, "slim"):
        raise SmcpError(f"the slim model in {sdir} was made from another recipe (or another model, checkpoint "
                        "or pruning run) than this one; re-run `smcp slim` with this --recipe/--out")
    return rebuild_slim(spec, weights, recipe)


def rebuild_slim(spec_path: Path, weights_path: Path, recipe: Recipe | None = None) -> torch.nn.Module:
    """Rebuild a slim model from a model definition + channel spec + tensors.

    The model definition is the recipe's (``recipe``); the spec is only data, and a spec whose model
    fields differ from the recipe's is refused.  Artifacts never name code to run: without a recipe
    only the registry's built-in models (``cifar/…``, ``mobilenet_v1``, ``torchvision/…``) are
    rebuilt from the spec, never a ``file.py:factory``."""
    spec = read_json(spec_path, "channel spec", "re-run `smcp slim`")
    m = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(m, dict):
        raise SmcpError(f"{spec_path}: not a channel spec (no model fields); re-run `smcp slim`")
    if recipe is not None:
        want = json.loads(json.dumps(_model_fields(recipe), default=str))  # as the spec's JSON holds it
        got = {k: m.get(k, [] if k == "leaf_modules" else None) for k in want}  # (specs before leaf_modules)
        if got != want or list(spec.get("input_shape") or []) != list(input_shape(recipe)):
            raise SmcpError(f"{spec_path}: the slim model was made for another model than the recipe's "
                            f"({recipe.model.source}); re-run `smcp slim`")
        model = model_sources.build_model(recipe.model.source, num_classes=num_classes(recipe),
                                          kwargs=dict(recipe.model.kwargs or {}))
        shape = tuple(input_shape(recipe))
    else:
        src = str(m.get("source"))
        if ".py:" in src or src.endswith(".py"):
            raise SmcpError(f"{spec_path}: names the user model {src}; a run directory never says which code "
                            "to run: rebuild it with the recipe (load_slim(recipe, out))")
        model = model_sources.build_model(src, num_classes=m.get("num_classes"), kwargs=m.get("kwargs") or {})
        shape = tuple(spec["input_shape"])
    model.eval()
    graph = ChannelGraph(model, torch.randn(1, *shape), unpruned=list(m.get("unpruned") or []),
                         leaf_modules=list(m.get("leaf_modules") or []))
    if graph.n_classes != spec.get("n_classes"):
        raise SmcpError(f"{spec_path}: the model definition changed since slimming; cannot rebuild")
    keep = torch.zeros(graph.n_classes, dtype=torch.bool)
    keep[spec["kept_classes"]] = True
    gm = slim_model(model, graph, keep)
    weights = load_torch(weights_path, "slim weights", "re-run `smcp slim`")
    try:
        gm.load_state_dict(weights)
    except Exception as exc:  # noqa: BLE001

        raise SmcpError(f"cannot load {weights_path}: {first_line(exc)}; re-run `smcp slim`") from None
    return gm.eval()
