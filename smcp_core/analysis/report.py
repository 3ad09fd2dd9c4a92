"""Training metrics (``prune/metrics.csv``) and the run report (``smcp report RUN_DIR``).

``metrics.csv`` has one row per training epoch, rebuilt from the history stored in the checkpoint
every time a checkpoint is written (so a resumed run never duplicates rows):

=================== ================================================================================
``epoch``           1-based epoch number
``lr``              learning rate at the last step of the epoch
``loss``            mean training loss
``train_top1``      training top-1 (%) on the (augmented) training batches, with the masks applied
``val_top1``        validation top-1 (%) at the end of the epoch (empty when not evaluated)
``budget``          layer-sum budget of the last mask update (the dense cost before pruning starts)
``budget_predicted`` the same budget as a whole-model prediction (calibrated; ms for latency targets)
``cost``            layer-sum cost of the masks at the end of the epoch
``predicted``       whole-model prediction of ``cost`` (calibrated; ms for latency targets)
``unit``            unit of the four columns above (``ms`` or ``MMAC``)
``kept_channels``   channel classes kept by the masks / ``total_channels`` classes in the graph
``mask_updates``    mask updates during the epoch
``seconds``         wall time of the epoch's training steps
=================== ================================================================================

The report needs matplotlib (``pip install 'smcp[report]'``); everything else here does not.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import time
from pathlib import Path
from typing import Any

from smcp_core import __version__
from smcp_core.errors import SmcpError
from smcp_core.prune.metrics import metrics_rows, read_metrics_csv
from smcp_core.stages.artifacts import check_artifacts, check_json_artifacts
from smcp_core.utils.fsutil import (
    atomic_write_bytes,
    atomic_write_text,
    read_json,
)
from smcp_core.utils.text import layer_weights_text, markdown_table


def _opt_json(path: Path, what: str) -> dict | None:
    return read_json(path, what, "re-create it by re-running its stage") if path.exists() else None


def load_run(run: Path) -> dict:
    """Everything the report shows, read from a run directory (artifacts are verified first)."""

    run = Path(run)
    if run.exists() and not run.is_dir():
        inside = next((d for d in run.parents if (d / "recipe.resolved.yaml").is_file()), None)
        hint = f"`smcp report {inside}`" if inside is not None else "the --out of an `smcp run`/`smcp prune`"
        what = "a file" if run.is_file() else "not a directory"
        raise SmcpError(f"{run} is {what}, not a run directory; `smcp report` takes a run directory: give {hint}")
    if not run.is_dir():
        raise SmcpError(f"run directory {run} does not exist; give the --out of an `smcp run`/`smcp prune`")
    integrity = check_artifacts(run)
    check_json_artifacts(run, "report")
    d: dict[str, Any] = {"run": run, "integrity": integrity}
    d["table"] = _opt_json(run / "latency.json", "latency table")
    d["summary"] = _opt_json(run / "prune" / "summary.json", "prune summary")
    d["slim"] = _opt_json(run / "slim" / "slim.json", "slim summary")
    d["export"] = _opt_json(run / "export" / "report.json", "export report")
    metrics_path = run / "prune" / "metrics.csv"
    if metrics_path.exists():
        d["metrics"], d["metrics_from"] = read_metrics_csv(metrics_path), "prune/metrics.csv"
    elif d["summary"] is not None:
        d["metrics"] = metrics_rows(d["summary"].get("history", []), d["summary"].get("cost_unit", ""))
        d["metrics_from"] = "prune/summary.json (history)"
    else:
        d["metrics"], d["metrics_from"] = [], None
    d["recipe"] = None
    rp = run / "recipe.resolved.yaml"
    if rp.exists():
        import yaml

        try:
            d["recipe"] = yaml.safe_load(rp.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            d["recipe"] = None
    if not any(d[k] for k in ("table", "summary", "export", "metrics")):
        raise SmcpError(f"{run} has no smcp artifacts (latency.json, prune/summary.json, prune/metrics.csv, "
                        f"export/report.json); run `smcp run --out {run}` first")
    return d


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise SmcpError("smcp report needs matplotlib, which is not installed: install smcp[report] "
                        "(pip install 'smcp[report]' or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_channels(d: dict, path: Path) -> Path | None:
    s = d["summary"]
    if not s or not s.get("layers"):
        return None
    plt = _plt()
    layers = s["layers"]
    n = len(layers)
    x = list(range(n))
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.28 * n + 2), 6.4), sharex=True)
    for ax, key, title in ((axes[0], "cout", "output channels"), (axes[1], "cin", "input channels")):
        full = [layer[f"{key}_full"] for layer in layers]
        kept = [layer[key] for layer in layers]
        ax.bar(x, full, color="#d0d0d0", label="original", width=0.8)
        ax.bar(x, kept, color="#1f77b4", label="kept", width=0.8)
        ax.set_ylabel(title)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    tot_full = sum(layer["cout_full"] for layer in layers)
    tot_kept = sum(layer["cout"] for layer in layers)
    axes[0].legend(loc="upper left", fontsize=8)
    axes[0].set_title(f"kept channels per layer: {tot_kept}/{tot_full} output channels "
                      f"({100 * tot_kept / max(tot_full, 1):.0f}%), FLOPs x{s.get('flops_ratio', float('nan')):.3f}")
    axes[1].set_xticks(x)
    axes[1].set_xticklabels([layer["name"] for layer in layers], rotation=90, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _phases(d: dict) -> tuple[int, int, int] | None:
    pr = (d.get("recipe") or {}).get("prune") or {}
    try:
        return int(pr["warmup_epochs"]), int(pr["ramp_epochs"]), int(pr["cooldown_epochs"])
    except (KeyError, TypeError, ValueError):
        return None


def plot_training(d: dict, path: Path) -> Path | None:
    rows = d["metrics"]
    if not rows:
        return None
    plt = _plt()
    ep = [r["epoch"] for r in rows]
    unit = next((r.get("unit") for r in rows if r.get("unit")), "") or ""
    latency = unit == "ms"
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7.5, 6.4), sharex=True)

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in rows]

    a1.plot(ep, series("budget_predicted"), "--", color="#ff7f0e", marker=".", label="budget (mask schedule)")
    a1.plot(ep, series("predicted"), "-", color="#1f77b4", marker="o", ms=4, label="predicted cost of the masks")
    tgt = (d["summary"] or {}).get("target") or {}
    if latency and tgt.get("target_ms"):
        a1.axhline(tgt["target_ms"], color="#d62728", lw=1, label=f"target {tgt['target_ms']:.3g} ms")
        if tgt.get("aim_ms"):
            a1.axhline(tgt["aim_ms"], color="#d62728", lw=1, ls=":", label=f"aim (margin) {tgt['aim_ms']:.3g} ms")
    if latency and tgt.get("baseline_ms"):
        a1.axhline(tgt["baseline_ms"], color="grey", lw=1, ls="-.",
                   label=f"dense, measured {tgt['baseline_ms']:.3g} ms")
    a1.set_ylabel("predicted latency (ms)" if latency else f"cost ({unit})")
    a1.set_title("latency budget, predicted cost and accuracy over training" if latency
                 else "budget, cost and accuracy over training")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=7, loc="upper right")
    a2.plot(ep, series("val_top1"), "-", color="#2ca02c", marker="o", ms=4, label="val top-1")
    if any(r.get("train_top1") is not None for r in rows):
        a2.plot(ep, series("train_top1"), "-", color="#98df8a", marker=".", label="train top-1")
    a2.set_ylabel("top-1 (%)")
    a2.set_xlabel("epoch")
    a2.grid(alpha=0.3)
    a3 = a2.twinx()
    a3.plot(ep, series("loss"), ":", color="#7f7f7f", label="train loss")
    a3.set_ylabel("loss")
    h1, l1 = a2.get_legend_handles_labels()
    h2, l2 = a3.get_legend_handles_labels()
    a2.legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")
    ph = _phases(d)
    if ph:
        w, r, _ = ph
        for ax in (a1, a2):
            if w:
                ax.axvspan(0.5, w + 0.5, color="#eeeeee", zorder=0)
            if r:
                ax.axvspan(w + 0.5, w + r + 0.5, color="#fff2e0", zorder=0)
        a1.text(0.6, a1.get_ylim()[0], " warm-up", fontsize=7, va="bottom", color="grey")
        if r:
            a1.text(w + 0.6, a1.get_ylim()[0], " ramp", fontsize=7, va="bottom", color="#c07000")
    fig.tight_layout()
    return _save(fig, path)


def latency_points(d: dict) -> list[dict]:
    """(predicted, measured) latency pairs: the profile's calibration models and the pruned model."""
    pts: list[dict] = []
    t = d["table"]
    cal = ((t or {}).get("model") or {}).get("calibration") or {}
    for p in cal.get("points", []):
        pts.append({"name": p["name"], "stage": "profile", "predicted_ms": p["predicted_ms"],
                    "measured_ms": p["measured_ms"], "p10_ms": None, "p90_ms": None})
    e = d["export"]
    if e and e.get("backend") == ((t or {}).get("meta") or {}).get("backend") and pts:
        base_pred = next((p["predicted_ms"] for p in pts if p["name"] == "baseline"), None)
        if base_pred is not None and e.get("batch_size") == ((t or {}).get("meta") or {}).get("batch_size"):
            st = e["baseline"].get("stats") or {}
            pts.append({"name": "baseline", "stage": "export", "predicted_ms": base_pred,
                        "measured_ms": e["baseline"]["latency_ms"], "p10_ms": st.get("p10_ms"),
                        "p90_ms": st.get("p90_ms")})
    if e and e["pruned"].get("predicted_ms") is not None:
        st = e["pruned"].get("stats") or {}
        pts.append({"name": "pruned", "stage": "export", "predicted_ms": e["pruned"]["predicted_ms"],
                    "measured_ms": e["pruned"]["latency_ms"], "p10_ms": st.get("p10_ms"), "p90_ms": st.get("p90_ms")})
    for p in pts:
        p["error_pct"] = 100.0 * (p["predicted_ms"] - p["measured_ms"]) / p["measured_ms"] if p["measured_ms"] else None
    return pts


def plot_latency(d: dict, path: Path) -> Path | None:
    pts = latency_points(d)
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 5.4))
    lo = min(min(p["predicted_ms"], p["measured_ms"], p["p10_ms"] or math.inf) for p in pts)
    hi = max(max(p["predicted_ms"], p["measured_ms"], p["p90_ms"] or 0) for p in pts)
    pad = 0.08 * (hi - lo if hi > lo else hi)
    a, b = max(0.0, lo - pad), hi + pad
    ax.plot([a, b], [a, b], color="grey", lw=1, label="measured = predicted")
    ax.fill_between([a, b], [a * 0.9, b * 0.9], [a * 1.1, b * 1.1], color="grey", alpha=0.12, label="±10%")
    styles = {"profile": ("o", "#1f77b4", "profile (calibration)"), "export": ("s", "#d62728", "export (final check)")}
    seen = set()
    for p in pts:
        marker, color, label = styles[p["stage"]]
        yerr = None
        if p["p10_ms"] is not None and p["p90_ms"] is not None:
            yerr = [[max(0.0, p["measured_ms"] - p["p10_ms"])], [max(0.0, p["p90_ms"] - p["measured_ms"])]]
        ax.errorbar([p["predicted_ms"]], [p["measured_ms"]], yerr=yerr, fmt=marker, color=color, capsize=3,
                    label=None if p["stage"] in seen else label)
        seen.add(p["stage"])
        ax.annotate(f"{p['name']} ({p['error_pct']:+.0f}%)", (p["predicted_ms"], p["measured_ms"]),
                    textcoords="offset points", xytext=(6, -10 if p["stage"] == "export" else 4), fontsize=7)
    e = d["export"] or {}
    meta = ((d["table"] or {}).get("meta") or {})
    ax.set_xlim(a, b)
    ax.set_ylim(a, b)
    ax.set_xlabel("predicted by the latency table (ms)")
    ax.set_ylabel("measured median (ms; bars: p10-p90)")
    ax.set_title(f"predicted vs measured latency — {e.get('backend') or meta.get('backend', '?')} / "
                 f"{e.get('device') or meta.get('device', '?')}, "
                 f"batch {e.get('batch_size') or meta.get('batch_size', '?')}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def _number_or_na(v: Any, fmt: str = ".3f", suffix: str = "") -> str:
    """A number formatted with ``fmt`` and ``suffix``, or ``"n/a"`` when it is missing (``None``/NaN)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:{fmt}}{suffix}"


def markdown(d: dict, images: dict[str, Path | None]) -> str:

    run = d["run"]
    t = d["table"] or {}
    name = (d.get("recipe") or {}).get("name") or run.name
    model = (((d.get("recipe") or {}).get("model") or {}).get("source")
             or (t.get("model") or {}).get("model_source", "?"))
    L = [f"# smcp report — {name}", "",
         f"Run directory `{run}` · model `{model}` · generated {time.strftime('%Y-%m-%d %H:%M:%S')} "
         f"by smcp {__version__}", ""]
    L += _result_section(d)
    L += _channels_section(d, images)
    L += _training_section(d, images)
    L += _latency_section(d, images)
    L += _environment_section(d)
    L += _artifacts_section(d)
    return "\n".join(L)


def _result_section(d: dict) -> list[str]:
    """``## Result``: the export's verdict and its baseline/pruned table, else the prune prediction."""
    s, e, sl = d["summary"] or {}, d["export"] or {}, d["slim"] or {}
    L = ["## Result", ""]
    tgt = e.get("target") or s.get("target") or {}
    if e:
        verdict = "PASS" if e.get("passed") else "FAIL"
        L.append(f"Measured speed-up **{e['speedup']:.2f}x** on {e['backend']}/{e['device']} "
                 f"at batch {e['batch_size']} "
                 f"(target {tgt.get('kind')} = {tgt.get('value')}): **{verdict}**; ONNX parity max |diff| "
                 f"{e['parity']['max_abs_diff']:.2e} (tolerance {e['parity'].get('tolerance', 'n/a')}).")
        L.append("")
        acc = e.get("accuracy") or {}
        rows = [["latency, measured median (ms)", _number_or_na(e["baseline"]["latency_ms"]),
                 _number_or_na(e["pruned"]["latency_ms"])],
                ["latency, predicted by the table (ms)", "", _number_or_na(e["pruned"].get("predicted_ms"))],
                ["FLOPs / params ratio", "1 / 1",
                 f"{_number_or_na(e.get('flops_ratio'))} / {_number_or_na(e.get('params_ratio'))}"]]
        if acc:
            rows.append([f"top-1 ({acc.get('images')} images)", _number_or_na(acc.get("baseline_top1"), ".2f", "%"),
                         _number_or_na(acc.get("pruned_top1"), ".2f", "%")])
        L += markdown_table(["", "baseline", "pruned"], rows) + [""]
        if acc and acc.get("baseline_from") and acc.get("baseline_from") != "checkpoint":
            L += [f"Baseline top-1: {acc['baseline_from']}.", ""]
    elif s:
        L += [f"Pruned (not exported yet): predicted {_number_or_na(s.get('predicted_ms'))} ms "
              f"({_number_or_na(s.get('predicted_speedup'), '.2f', 'x')}) for target {tgt.get('kind')} = "
              f"{tgt.get('value')}; FLOPs x{_number_or_na(s.get('flops_ratio'))}, "
              f"params x{_number_or_na(s.get('params_ratio'))}.", ""]
    else:
        L += ["No prune or export results yet.", ""]
    if sl:
        L += [f"Slim model: {sl['params']:,} params (of {sl['params_full']:,}), {sl['flops']:,} MACs (of "
              f"{sl['flops_full']:,}); max |slim - masked| = {sl['max_abs_diff']:.2e}.", ""]
    return L


def _channels_section(d: dict, images: dict[str, Path | None]) -> list[str]:
    """``## Kept channels per layer``: the plot and the kept width of every group."""
    s = d["summary"] or {}
    L = ["## Kept channels per layer", ""]
    if images.get("channels"):
        L += [f"![kept channels per layer]({images['channels'].name})", ""]
    if s.get("groups"):
        rows = []
        for g in s["groups"]:
            cons = g["consumers"]
            rows.append([g["group"], f"{g['kept']}/{g['channels']}",
                         ", ".join(cons[:3]) + (f" (+{len(cons) - 3})" if len(cons) > 3 else "")])
        L += markdown_table(["group", "kept / channels", "layers reading it"], rows) + [""]
    else:
        L += ["(no prune summary yet)", ""]
    return L


def _training_section(d: dict, images: dict[str, Path | None]) -> list[str]:
    """``## Training``: the plot and one table row per epoch."""
    L = ["## Training", ""]
    rows = d["metrics"]
    if images.get("training"):
        L += [f"![budget, predicted cost and accuracy over training]({images['training'].name})", ""]
    if not rows:
        return L + ["(no training metrics yet)", ""]
    unit = next((r.get("unit") for r in rows if r.get("unit")), "") or "cost"
    L += [f"From `{d['metrics_from']}`; budget and predicted are whole-model predictions in {unit}.", ""]
    header = ["epoch", "lr", "loss", "train top-1", "val top-1", f"budget ({unit})", f"predicted ({unit})",
              "kept channels", "mask updates", "s"]
    cells = [[r["epoch"], _number_or_na(r.get("lr"), ".4g"), _number_or_na(r.get("loss"), ".4f"),
              _number_or_na(r.get("train_top1"), ".2f"), _number_or_na(r.get("val_top1"), ".2f"),
              _number_or_na(r.get("budget_predicted"), ".4g"), _number_or_na(r.get("predicted"), ".4g"),
              "n/a" if r.get("kept_channels") is None else f"{r['kept_channels']}/{r.get('total_channels') or '?'}",
              r.get("mask_updates", ""), _number_or_na(r.get("seconds"), ".1f")] for r in rows]
    return L + markdown_table(header, cells) + [""]


def _latency_section(d: dict, images: dict[str, Path | None]) -> list[str]:
    """``## Predicted vs measured latency``: the plot, the table's calibration and every point."""
    t = d["table"] or {}
    L = ["## Predicted vs measured latency", ""]
    pts = latency_points(d)
    if images.get("latency"):
        L += [f"![predicted vs measured latency]({images['latency'].name})", ""]
    if not pts:
        return L + ["(no latency measurements: FLOPs target, or not profiled yet)", ""]
    cal = (t.get("model") or {}).get("calibration") or {}
    weights = cal.get("layer_weights") or {}
    weighed = (f" weighted per output resolution ({layer_weights_text(weights)})"
               if isinstance(weights, dict) and weights else "")
    L += [f"Table calibration: measured = {_number_or_na(cal.get('scale'))} x (sum of layer latencies{weighed} + "
          f"{_number_or_na(cal.get('removed_layer_ms', 0.0))} ms per removed layer) + "
          f"{_number_or_na(cal.get('offset_ms'))} ms. Profile points are timed while profiling; export points in "
          "the final check (a separate measurement on a possibly busy machine).", ""]
    cells = [[p["name"], p["stage"], _number_or_na(p["predicted_ms"]), _number_or_na(p["measured_ms"]),
              f"{_number_or_na(p['p10_ms'])}-{_number_or_na(p['p90_ms'])}" if p["p10_ms"] is not None else "",
              _number_or_na(p["error_pct"], "+.1f", "%")] for p in pts]
    return L + markdown_table(["model", "measured in", "predicted (ms)", "measured (ms)", "p10-p90 (ms)", "error"],
                              cells) + [""]


def _environment_section(d: dict) -> list[str]:
    """``## Environment`` of the export's measurement (nothing without an export report)."""
    env = (d["export"] or {}).get("environment") or {}
    if not env:
        return []
    libs = env.get("libraries") or {}
    fp = env.get("fingerprint") or {}
    return ["## Environment", "",
            f"Backend {env.get('backend')} on {env.get('device')} ({fp.get('cpu_model') or fp.get('gpu_name') or '?'}, "
            f"{fp.get('cpus_available') or fp.get('cpu_count') or '?'} CPUs), batch {env.get('batch_size')}, "
            f"threads {env.get('threads') or 'default'}; platform {env.get('platform')}.", "",
            "Libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items()) + ".", ""]


def _artifacts_section(d: dict) -> list[str]:
    """``## Artifacts``: every checked file with its size and checksum."""
    L = ["## Artifacts", "",
         "Every file below was checked against its `SHA256SUMS` record (or parsed when it has none).", ""]
    return L + markdown_table(["file", "bytes", "sha256"],
                              [[f"`{a['file']}`", f"{a['bytes']:,}", f"`{a['sha256'][:16]}...`"]
                               for a in d["integrity"]]) + [""]


def _inline(text: str) -> str:
    t = html.escape(text, quote=False)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", t)


def markdown_to_html(md: str, image_dir: Path, title: str) -> str:
    """HTML for the subset of markdown written by :func:`markdown`, images inlined as base64."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
           "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
           "font-size:13px;text-align:right}th{background:#f3f3f3}img{max-width:100%}code{font-size:12px}"
           "</style></head><body>"]
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", r.strip()[1:-1])] for r in block]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells[0]) + "</tr>")
            for r in cells[2:]:
                out.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>")
            out.append("</table>")
            continue
        m = re.fullmatch(r"!\[(.*)\]\((.+)\)", line)
        if m:
            data = base64.b64encode((image_dir / m.group(2)).read_bytes()).decode()
            out.append(f"<p><img alt='{html.escape(m.group(1))}' src='data:image/png;base64,{data}'></p>")
        elif line.startswith("## "):
            out.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def make_report(run: Path, out: Path | None = None, *, html_report: bool = True) -> dict:
    """Write ``channels.png``, ``training.png``, ``latency.png``, ``report.md`` (and ``report.html``
    with the images inlined) into ``out`` (default ``RUN/report``)."""
    _plt()  # fail early, with one line, when matplotlib is missing
    run = Path(run)
    d = load_run(run)
    out = Path(out) if out else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = {"channels": plot_channels(d, out / "channels.png"),
              "training": plot_training(d, out / "training.png"),
              "latency": plot_latency(d, out / "latency.png")}
    md = markdown(d, images)
    files = {k: str(v) for k, v in images.items() if v is not None}
    files["markdown"] = str(atomic_write_text(out / "report.md", md + "\n"))
    if html_report:
        name = (d.get("recipe") or {}).get("name") or run.name
        files["html"] = str(atomic_write_text(out / "report.html", markdown_to_html(md, out, f"smcp report — {name}")))
    e, s = d["export"] or {}, d["summary"] or {}
    return {
        "run": str(run), "out": str(out), "files": files,
        "skipped": [k for k, v in images.items() if v is None],
        "epochs": len(d["metrics"]),
        "passed": e.get("passed"), "speedup": e.get("speedup"),
        "predicted_ms": s.get("predicted_ms"), "measured_ms": (e.get("pruned") or {}).get("latency_ms"),
        "latency_points": latency_points(d),
        "artifacts_checked": len(d["integrity"]),
    }
