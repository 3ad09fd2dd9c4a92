"""``smcp compare``: several pruning methods on one recipe, measured side by side.

Every method gets the same recipe (same target, epochs, learning rate, data, seed) with only
``prune.method`` changed, and the same latency table: the table is profiled once into
``OUT/latency.json`` (when the target is a speed-up or a latency) and copied into each method's run
directory.  Layout::

    OUT/recipe.resolved.yaml        the base recipe
    OUT/latency.json                the shared latency table (latency targets only)
    OUT/<method>/                   a normal run directory: recipe.resolved.yaml, latency.json,
                                    prune/, slim/ (so `smcp export -o OUT/<method>` works on it)
    OUT/compare.json, compare.md    the comparison

After pruning and slimming every method, every slim model is timed paired with the dense model on
the recipe's export backend and batch, as the export gate times it
(:func:`smcp_core.stages.measure.measure_as_export`): its speed-up is the median of the per-round
ratios, what ``smcp export`` would measure.  (In one loop over all models, each call starts colder
and small models looked 5-17 % slower at batch 1 than the gate measures them.)  A method whose
prune stamp is unchanged and whose artifacts exist is not re-trained (``force`` re-runs it).  A
method that fails (e.g. an unreachable target for a uniform allocation) is reported with its error;
the others go on.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smcp_core import stages
from smcp_core.config.presets import METHODS
from smcp_core.config.recipe import load_recipe
from smcp_core.data import make_loader
from smcp_core.errors import GateFailed, SmcpError
from smcp_core.events import Reporter
from smcp_core.profile.fingerprint import environment_report
from smcp_core.prune.trainer import evaluate
from smcp_core.slim.surgery import count_params
from smcp_core.utils.fsutil import (
    atomic_write_json,
    atomic_write_text,
    forget_checksum,
    read_json,
    record_checksum,
)
from smcp_core.utils.text import markdown_table

DEFAULT_METHODS = ("smcp", "halp", "l1", "uniform")


def parse_methods(spec: str | Sequence[str] | None, flag: str = "--methods") -> list[str]:
    """``"smcp,halp"`` (or a list) -> ``["smcp", "halp"]``; unknown names are a one-line error that
    starts with ``flag``."""
    if spec is None:
        return list(DEFAULT_METHODS)
    items = spec.split(",") if isinstance(spec, str) else [x for s in spec for x in str(s).split(",")]
    out: list[str] = []
    for raw in items:
        m = raw.strip().lower()
        if not m:
            continue
        if m not in METHODS:
            import difflib

            close = difflib.get_close_matches(m, METHODS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise SmcpError(f"{flag}: unknown method {raw.strip()!r} ({hint}choose from {', '.join(METHODS)})")
        if m not in out:
            out.append(m)
    if not out:
        raise SmcpError(f"{flag}: no method given; e.g. --methods {','.join(DEFAULT_METHODS)}")
    return out


def parse_method_sets(specs: Sequence[str] | None, methods: Sequence[str]) -> dict[str, list[str]]:
    """``["l1,uniform:prune.target_margin=0.05"]`` -> ``{"l1": [...], "uniform": [...]}``: recipe
    overrides for some methods only (applied after the shared ``--set`` values)."""
    out: dict[str, list[str]] = {}
    for raw in specs or ():
        head, sep, assignment = str(raw).partition(":")
        if not sep or "=" not in assignment or not head.strip():
            raise SmcpError(f"--set-for {raw!r}: expected METHOD[,METHOD]:KEY=VALUE, "
                            "e.g. --set-for uniform:prune.target_margin=0.05")
        key = assignment.split("=", 1)[0].strip()
        if key == "prune.method" or key.split(".")[0] in ("profile", "export"):
            raise SmcpError(f"--set-for {raw!r}: {key} is shared by every method (one latency table, one timing "
                            "loop, the method named in --methods); set it with --set")
        for m in head.split(","):
            m = m.strip().lower()
            if m not in methods:
                raise SmcpError(f"--set-for {raw!r}: method {m!r} is not among --methods ({','.join(methods)})")
            out.setdefault(m, []).append(assignment.strip())
    return out


def copy_table(src: Path, dst_dir: Path) -> None:
    """Copy the latency table ``src`` to ``dst_dir/latency.json`` (atomically, checksum recorded), so
    several runs share one table."""

    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / "latency.json"
    forget_checksum(dst)
    tmp = dst_dir / ".latency.json.tmp"
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
    record_checksum(dst)


def _dense_top1(base, first_summary: dict | None) -> tuple[float | None, str]:
    """Top-1 of the dense model on the validation set (a from-scratch model: the dense top-1 at the
    end of the warm-up, from the prune history)."""

    if base.model.checkpoint:
        import torch


        bundle = stages.build_data(base)
        if bundle.val is None:
            return None, "no validation set"
        loader = make_loader(bundle.val, batch_size=128, shuffle=False, seed=base.seed)
        return evaluate(stages.build_model(base), loader, torch.device("cpu")), "checkpoint"
    hist = (first_summary or {}).get("history", [])
    warm = [r for r in hist if r.get("event") == "epoch" and r["epoch"] <= base.prune.warmup_epochs
            and r.get("top1") is not None]
    if warm:
        return warm[-1]["top1"], f"trained from scratch: dense model at the end of warm-up (epoch {warm[-1]['epoch']})"
    return None, "trained from scratch: no dense weights to evaluate"


def compare(spec, overrides: Sequence[str], methods: Sequence[str], out: Path, *,
            reporter: Reporter | None = None, force: bool = False, force_table: bool = False,
            env: Any = None, method_overrides: dict[str, list[str]] | None = None, resume: bool = False) -> dict:
    """Prune + slim the recipe ``spec`` (with ``overrides``) once per method into ``out/<method>``,
    then time every slim model paired with the dense model; writes ``compare.json`` and
    ``compare.md`` and returns the same dict.  ``method_overrides`` (see :func:`parse_method_sets`)
    adds recipe overrides for single methods; they are recorded in each row.  ``resume`` continues a
    method's interrupted prune from its ``prune/checkpoint.pt`` instead of starting it over."""

    rep = reporter or Reporter()
    out = Path(out)
    methods = parse_methods(list(methods))
    overrides = list(overrides or [])
    base = load_recipe(spec, overrides, env=env)
    # every method's recipe first: an invalid combination stops before any work
    per = {m: list((method_overrides or {}).get(m, [])) for m in methods}
    recipes = {m: load_recipe(spec, overrides + [f"prune.method={m}"] + per[m], env=env) for m in methods}
    dense_model = stages.build_model(base)  # a missing checkpoint fails here, before any work
    out.mkdir(parents=True, exist_ok=True)
    stages.write_resolved(base, out)
    t_all = time.perf_counter()
    kind = base.target_kind()
    table_info = _shared_table(base, out, rep, force=force) if kind != "flops_ratio" else None

    rows: list[dict] = []
    first_summary = None
    for m in methods:
        row, summary = _run_method(m, recipes[m], out, per[m], rep, shared_table=kind != "flops_ratio",
                                   force=force, force_table=force_table, resume=resume)
        rows.append(row)
        first_summary = first_summary or summary

    ok = [row for row in rows if "error" not in row]
    if not ok:
        raise SmcpError(f"every method failed; {rows[0]['method']}: {rows[0]['error']}")

    batch, backend = base.export_batch_size(), base.export_backend()
    models, stats = _time_models(base, dense_model, ok, recipes, out, rep)
    dense = _dense_row(base, models, stats, first_summary)
    result = {
        "recipe": base.name,
        "source": base.source,
        "overrides": overrides,
        "method_overrides": {m: v for m, v in per.items() if v},
        "methods": methods,
        "target": _target_info(base, ok),
        "fine_tune": {"epochs": base.prune.epochs, "warmup_epochs": base.prune.warmup_epochs,
                      "ramp_epochs": base.prune.ramp_epochs, "cooldown_epochs": base.prune.cooldown_epochs,
                      "lr": base.prune.optimizer.lr},
        "latency_table": table_info["path"] if table_info else None,
        "backend": backend,
        "device": base.profile.device,
        "batch_size": batch,
        "input_shape": [batch, *stages.input_shape(base)],
        "dense": dense,
        "rows": rows,
        "seconds": time.perf_counter() - t_all,
        "environment": environment_report(backend=backend, device=base.profile.device,
                                          threads=base.profile.threads, batch_size=batch),
    }
    atomic_write_json(out / "compare.json", result, checksum=True)
    atomic_write_text(out / "compare.md", markdown(result), checksum=True)
    return result


def _shared_table(base, out: Path, rep: Reporter, *, force: bool) -> dict:
    """Profile the latency table shared by every method into ``out/latency.json`` (unless it is up
    to date); its profile info (at least its ``path``)."""
    table_info = None
    if force or not stages.up_to_date(base, out, "profile"):
        rep.log("profile: measuring the latency table once for every method")
        table_info = stages.profile(base, out, reporter=rep).to_dict()
    else:
        rep.log(f"profile: {out / 'latency.json'} is up to date, shared by every method")
    return table_info or {"path": str(out / "latency.json")}


def _run_method(m: str, recipe, out: Path, extra: list[str], rep: Reporter, *, shared_table: bool,
                force: bool, force_table: bool, resume: bool = False) -> tuple[dict, dict | None]:
    """Prune + slim method ``m`` (its recipe ``recipe``, with the ``extra`` overrides) into
    ``out/m``: its row (with ``error`` when it failed) and its prune summary (``None`` when it failed)."""
    mdir = out / m
    mdir.mkdir(parents=True, exist_ok=True)
    stages.write_resolved(recipe, mdir)
    row: dict[str, Any] = {"method": m, "dir": str(mdir)}
    if extra:
        row["overrides"] = extra
    t0 = time.perf_counter()
    try:
        if shared_table:
            copy_table(out / "latency.json", mdir)
        summary, slim_info = _prune_and_slim(m, recipe, mdir, row, rep, force=force, force_table=force_table,
                                             resume=resume)
    except SmcpError as exc:
        row["error"] = str(exc)
        row["seconds"] = time.perf_counter() - t0
        rep.log(f"{m}: failed: {exc}")
        return row, None
    row["seconds"] = (time.perf_counter() - t0) if not row["reused"] else summary.get("seconds")
    row["train_seconds"] = summary.get("seconds")
    row.update({
        "target": summary.get("target"), "budget": summary.get("budget"), "final_cost": summary.get("final_cost"),
        "cost_unit": summary.get("cost_unit"), "meets_budget": summary.get("meets_budget"),
        "predicted_ms": summary.get("predicted_ms"), "top1": summary.get("top1"),
        "kept_widths": [g["kept"] for g in summary.get("groups", [])],
    })
    if slim_info:
        row.update({"flops": slim_info["flops"], "flops_ratio": slim_info["flops"] / slim_info["flops_full"],
                    "params": slim_info["params"], "params_ratio": slim_info["params"] / slim_info["params_full"],
                    "slim_max_abs_diff": slim_info.get("max_abs_diff")})
    return row, summary


def _prune_and_slim(m: str, recipe, mdir: Path, row: dict, rep: Reporter, *, force: bool,
                    force_table: bool, resume: bool = False) -> tuple[dict, dict | None]:
    """The prune summary and the slim info (``None`` when the slim check failed, recorded in
    ``row["error"]``) of method ``m`` in ``mdir``; either stage is re-used when it is up to date."""
    if not force and stages.up_to_date(recipe, mdir, "prune"):
        rep.log(f"{m}: prune up to date, re-used")
        summary = read_json(mdir / "prune" / "summary.json", "prune summary")
        row["reused"] = True
    else:
        resume = resume and (mdir / "prune" / "checkpoint.pt").exists()
        rep.log(f"{m}: prune" + (" (resumed from prune/checkpoint.pt)" if resume else ""))
        summary = stages.prune(recipe, mdir, reporter=rep, force_table=force_table, resume=resume).to_dict()
        row["reused"] = False
    if row["reused"] and stages.up_to_date(recipe, mdir, "slim"):
        return summary, read_json(mdir / "slim" / "slim.json", "slim summary")
    rep.log(f"{m}: slim")
    try:
        return summary, stages.slim(recipe, mdir, reporter=rep).to_dict()
    except GateFailed as exc:
        row["error"] = f"slim check failed: {exc}"
        return summary, None


def _time_models(base, dense_model, ok: list[dict], recipes: dict, out: Path,
                 rep: Reporter) -> tuple[dict, dict]:
    """Time the slim model of every row in ``ok`` paired with the dense model, as the export gate does
    (:func:`~smcp_core.stages.measure.measure_as_export`); adds the latencies and the paired speed-ups
    to the rows.  Returns the models and their timing stats, by name."""
    rep.log(f"measuring {len(ok)} slim models, each paired with the dense model, on {base.export_backend()} "
            f"(batch {base.export_batch_size()})")
    models = {"dense": dense_model}
    for row in ok:
        models[row["method"]] = stages.load_slim(recipes[row["method"]], Path(row["dir"]))
    stats = stages.measure_as_export(models, base, out)
    for row in ok:
        st = stats[row["method"]]
        row["latency_ms"] = st["median_ms"]
        row["latency_stats"] = st
        row["speedup"], row["speedup_interval"] = st["speedup"], st["speedup_interval"]
    return models, stats


def _dense_row(base, models: dict, stats: dict, first_summary: dict | None) -> dict:
    """The comparison's row of the dense model."""
    graph = stages.build_graph(base, models["dense"])
    flops_full, params_full = graph.flops_params()
    dense_top1, top1_from = _dense_top1(base, first_summary)
    return {"method": "dense", "latency_ms": stats["dense"]["median_ms"], "latency_stats": stats["dense"],
            "speedup": 1.0, "flops": flops_full, "flops_ratio": 1.0, "params": count_params(models["dense"]),
            "params_ratio": 1.0, "top1": dense_top1, "top1_from": top1_from}


def _target_info(base, ok: list[dict]) -> dict:
    """The target of the base recipe, with the dense/target latencies of a method that has no
    overrides of its own."""
    kind = base.target_kind()
    plain = [r for r in ok if not r.get("overrides")]
    tdesc = (plain[0].get("target") if plain else None) or {"kind": kind, "value": base.target_value()}
    return {"kind": kind, "value": base.target_value(),
            **({k: v for k, v in tdesc.items() if k in ("baseline_ms", "target_ms", "margin")})}


def _format_or_na(v: Any, fmt: str, na: str = "n/a") -> str:
    """``v`` formatted with ``fmt``, or ``na`` when it is missing (``None``)."""
    return na if v is None else format(v, fmt)


def table_rows(result: dict) -> list[list[str]]:
    """Formatted cells (method, latency, speed-up, FLOPs, params, top-1, time) for the report."""
    cells = []
    d = result["dense"]
    cells.append(["dense", f"{d['latency_ms']:.3f}", "1.00x", f"{d['flops'] / 1e6:.2f}M (1.000)",
                  f"{d['params'] / 1e6:.3f}M (1.000)",
                  _format_or_na(d.get("top1"), ".2f") + ("%" if d.get("top1") is not None else ""),
                  ""])
    for r in result["rows"]:
        if "error" in r:
            cells.append([r["method"], "failed", "", "", "", "", _format_or_na(r.get("seconds"), ".0f") + "s"])
            continue
        top1 = _format_or_na(r.get("top1"), ".2f") + ("%" if r.get("top1") is not None else "")
        t = _format_or_na(r.get("seconds"), ".0f") + "s" + (" (re-used)" if r.get("reused") else "")
        cells.append([r["method"], f"{r['latency_ms']:.3f}", f"{r['speedup']:.2f}x",
                      f"{r['flops'] / 1e6:.2f}M ({r['flops_ratio']:.3f})" if r.get("flops") is not None else "n/a",
                      f"{r['params'] / 1e6:.3f}M ({r['params_ratio']:.3f})" if r.get("params") is not None else "n/a",
                      top1, t])
    return cells


HEADERS = ["method", "latency (median ms)", "measured speed-up", "FLOPs (MMAC, ratio)", "params (ratio)",
           "top-1", "wall time"]


def markdown(result: dict) -> str:
    t = result["target"]
    lines = [
        f"# smcp compare: {result['recipe']}",
        "",
        f"Target {t['kind']} = {t['value']}; fine-tuning {result['fine_tune']['epochs']} epochs "
        f"(warm-up {result['fine_tune']['warmup_epochs']}, ramp {result['fine_tune']['ramp_epochs']}, "
        f"cooldown {result['fine_tune']['cooldown_epochs']}), lr {result['fine_tune']['lr']}. "
        f"Latency: every slim model timed paired with the dense model (as the export gate) on {result['backend']} / "
        f"{result['device']}, batch {result['batch_size']}, input {result['input_shape']}.",
        "",
        *markdown_table(HEADERS, table_rows(result), numeric_from=1),
    ]
    notes = []
    d = result["dense"]
    if d.get("top1_from") and d["top1_from"] != "checkpoint":
        notes.append(f"dense top-1: {d['top1_from']}")
    for r in result["rows"]:
        if r.get("overrides"):
            notes.append(f"{r['method']}: " + ", ".join(f"`{o}`" for o in r["overrides"]))
        if r["method"] == "none":
            notes.append("none: the unpruned model fine-tuned with the same schedule (the accuracy reference)")
        if "error" in r:
            notes.append(f"{r['method']}: {r['error']}")
        elif r.get("meets_budget") is False:
            notes.append(f"{r['method']}: final cost {r['final_cost']:.4g} above the budget {r['budget']:.4g}")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
