"""smcp inspect: prunable groups, channels, params, MACs (whole model, and the share the channel graph
understood) and what cannot be pruned and why."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape

from smcp_cli.common import JsonOpt, QuietOpt, SetOpt, console, emit, guarded


def inspect(
    target: Optional[str] = typer.Argument(None, help="A recipe (file or built-in name) or a model source "
                                           "(torchvision/resnet50, cifar/resnet56, mobilenet_v1, file.py:factory)."),
    set_: Optional[list[str]] = SetOpt,
    input_size: Optional[str] = typer.Option(None, "--input-size",
                                             help="C,H,W for a bare model source (default 3,224,224)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Classes for a bare model source."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Show the channel groups of a model."""
    with guarded(as_json):
        from smcp_core import stages
        from smcp_core.analysis.model_stats import model_stats

        r = _inspect_recipe(target or "quickstart", list(set_ or []), input_size, num_classes)
        model = stages.build_model(r, load_weights=False)
        s = stages.build_graph(r, model).summary()
        s["model"] = r.model.source
        if quiet and not as_json:
            return
        # params/flops: the whole model (every parameter; MACs of one sample, measured with a forward
        # pass); graph_*: what the channel graph understood (its conv/linear/BN layers) and their share
        st = model_stats(model, stages.example_input(r), graph_flops=s["flops"], graph_params=s["params"])
        s["params"], s["flops"] = st.pop("params"), st.pop("macs")
        s.update(st)
        if as_json:
            emit({"ok": True, **s}, True)
            return
        _print_groups(r.model.source, s)


def _inspect_recipe(t: str, sets: list[str], input_size: str | None, num_classes: int | None):
    """The recipe to inspect: ``t`` itself, or the quickstart with ``t`` as a bare model source
    (random weights, synthetic data, ``--input-size`` / ``--num-classes`` or their defaults)."""
    from smcp_core.config.recipe import builtin_recipe_names, load_recipe
    from smcp_core.errors import SmcpError

    if t.endswith((".yaml", ".yml")) or t in builtin_recipe_names():
        return load_recipe(t, sets)
    cifar = t.startswith("cifar/")
    extra = [f"model.source={t}", "model.checkpoint=null", "model.kwargs={}", "data.source=synthetic"]
    if input_size is not None:
        try:
            c, h, w = (int(v) for v in input_size.split(","))
        except ValueError:
            raise SmcpError(f"--input-size {input_size!r}: expected C,H,W such as 3,224,224") from None
        extra.append(f"model.input_size=[{c},{h},{w}]")
    else:
        extra.append("model.input_size=[3,32,32]" if cifar else "model.input_size=[3,224,224]")
    if num_classes is None:
        num_classes = 10 if cifar else 1000
    extra.append(f"model.num_classes={num_classes}")  # 0 or less: the recipe check says why
    return load_recipe("quickstart", extra + sets)


def _print_groups(source: str, s: dict) -> None:
    """The human output: one row per group, the understood share and the frozen spots."""
    from rich.table import Table

    tab = Table(title=f"{source}: input {tuple(s['input_shape'])}, {s['params']:,} params, "
                      f"{_mmac(s['flops'])}, {len(s['groups'])} groups", title_justify="left")
    for col in ("group", "channels", "prunable", "layers reading it", "note"):
        tab.add_column(col)
    for gr in s["groups"]:
        cons = gr["consumers"]
        names = ", ".join(cons[:3]) + (f" (+{len(cons) - 3})" if len(cons) > 3 else "")
        if gr["depthwise"]:
            names += f"; dw: {len(gr['depthwise'])}"
        if not gr["prunable"]:
            pr, note = "no", gr["reason"]
        elif gr["frozen_channels"]:
            pr, note = "partly", f"{gr['frozen_channels']} frozen: {gr['reason']}"
        else:
            pr, note = "yes", "removable (layer pruning)" if gr["removable"] else ""
        tab.add_row(str(gr["group"]), str(gr["channels"]), pr, names, note)
    console.print(tab)
    console.print(_understood_line(s))
    for spot in s["frozen_spots"]:
        console.print(f"[yellow]frozen:[/yellow] {escape(str(spot))}")


def _mmac(macs) -> str:
    return "? MMAC" if macs is None else f"{macs / 1e6:,.1f} MMAC"


def _pct(share) -> str:
    return "n/a" if share is None else f"{100 * share:.1f} %"


def _understood_line(s: dict) -> str:
    """Whole model vs what the channel graph understood (and can prune), for the human output."""
    line = (f"whole model: {s['params']:,} params, {_mmac(s['flops'])} per sample (one forward pass); the "
            f"channel graph understands {s['graph_params']:,} params ({_pct(s['graph_params_share'])}) and "
            f"{_mmac(s['graph_flops'])} ({_pct(s['graph_flops_share'])}) of it")
    if s.get("macs_error"):
        line += f"; MACs not measured: {escape(s['macs_error'])}"
    return line
