"""The slim stage: the masked model's pruned channels physically removed, and its rebuild."""

from __future__ import annotations

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
)
from smcp_core.utils.text import first_line


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
    atomic_torch_save({k: v.detach().cpu() for k, v in slim_gm.state_dict().items()}, sdir / "weights.pt",
                      checksum=True)
    spec = {
        "format": "smcp-channel-spec/1",
        "model": {"source": recipe.model.source, "kwargs": dict(recipe.model.kwargs or {}),
                  "num_classes": num_classes(recipe), "unpruned": list(recipe.model.unpruned or [])},
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
    atomic_write_json(sdir / "slim.json", res.to_dict(), checksum=True)
    if diff > tol:
        raise GateFailed(f"slim model differs from the masked model by {diff:.3g} (> tolerance {tol:g}); "
                         "please report this model")
    return res


def load_slim(recipe: Recipe, out: Path) -> torch.nn.Module:
    """The slim model, rebuilt from the original model definition + ``slim/channel_spec.json`` +
    ``slim/weights.pt`` (no pickled modules involved)."""
    sdir = out / "slim"
    spec, weights = sdir / "channel_spec.json", sdir / "weights.pt"
    if not spec.exists() or not weights.exists():
        raise SmcpError(f"slim model not found in {sdir}; run `smcp slim` with the same --recipe/--out first")
    return rebuild_slim(spec, weights)


def rebuild_slim(spec_path: Path, weights_path: Path) -> torch.nn.Module:
    """Rebuild a slim model from the original model definition + channel spec + tensors."""

    spec = read_json(spec_path, "channel spec")
    m = spec["model"]
    model = model_sources.build_model(m["source"], num_classes=m.get("num_classes"),
                                      kwargs=m.get("kwargs") or {}).eval()
    graph = ChannelGraph(model, torch.randn(1, *spec["input_shape"]), unpruned=m.get("unpruned") or [])
    if graph.n_classes != spec["n_classes"]:
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
