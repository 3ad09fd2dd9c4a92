"""Run-directory artifacts: the files each stage writes, their stamps (what they were made from) and
integrity checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from smcp_core.config.recipe import Recipe, resolved_dump
from smcp_core.models import user_model_file
from smcp_core.utils.fsutil import (
    atomic_write_text,
    read_json,
    sha256_file,
    verify_artifact,
)

STAGES = ("profile", "prune", "slim", "export")


def _digest(*parts: Any) -> str:
    m = hashlib.sha256()
    for p in parts:
        m.update(json.dumps(p, sort_keys=True, default=str).encode())
    return m.hexdigest()[:16]


_SIG_CACHE: dict[tuple, list] = {}


def _file_sig(path: str | None) -> Any:
    """What the stamps record of a checkpoint: its size and SHA-256, so a copied, re-downloaded or
    moved file with the same bytes (new mtime, new path) keeps its runs up to date and a changed one
    does not.  Hashed once per (path, size, mtime) in a process."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        return str(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SIG_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SIG_CACHE[key] = [st.st_size, h.hexdigest()]
    return _SIG_CACHE[key]


def stamp(recipe: Recipe, stage: str) -> str:
    """The hash of what ``stage``'s outputs are made from: the recipe sections it depends on, the
    bytes of the checkpoint and, for a ``file.py:factory`` model, the bytes of that file (editing its
    ``forward`` makes every stage out of date; modules it imports in turn are not covered)."""
    r = recipe.model_dump(mode="json")
    model = {**r["model"], "checkpoint": _file_sig(recipe.model.checkpoint)}  # its bytes, not its path
    src_file = user_model_file(recipe.model.source)  # read as the model registry reads it
    if src_file is not None:  # only then: the stamps of registry models stay as they were
        model["source_file"] = _file_sig(str(src_file))
    prof = _digest(model, r["profile"], r["data"]["source"], r["data"]["image_size"])
    if stage == "profile":
        return prof
    pr = _digest(prof, model, r["data"], r["prune"], r["seed"])
    if stage == "prune":
        return pr
    sl = _digest(pr, "slim")
    if stage == "slim":
        return sl
    return _digest(sl, r["export"])


# the files each stage writes (the first one carries the stage's stamp), with what they are
STAGE_OUTPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "profile": (("latency.json", "latency table"),),
    "prune": (("prune/summary.json", "prune summary"), ("prune/pruned.pt", "pruned checkpoint")),
    "slim": (("slim/slim.json", "slim summary"), ("slim/weights.pt", "slim weights"),
             ("slim/channel_spec.json", "channel spec"), ("slim/model.pt2", "torch.export program")),
    "export": (("export/report.json", "export report"), ("export/model.onnx", "ONNX model"),
               ("export/baseline.onnx", "baseline ONNX model")),
}


def _redo_hint(stage: str) -> str:
    return f"delete it and re-run `smcp {stage}` (or `smcp run --force`)"


def up_to_date(recipe: Recipe, out: Path, stage: str) -> bool:
    """True when ``stage``'s outputs exist, are intact and were made from the same inputs.

    A corrupt or truncated output raises :class:`SmcpError` (it is never silently re-created).

    Failed gates: a slim model that differs from the masked one never gets a ``slim/slim.json``
    (:func:`smcp_core.stages.slimming.slim` removes it first and keeps its figures in
    ``slim/slim.failed.json``), so slim is never up to date after a failed gate and export refuses
    to use it.  A failed ``export/report.json`` (target missed, parity out of tolerance) *is* up to
    date: it is the verdict on exactly these inputs, and ``smcp run`` re-applies the gate from it
    (exit 2 again) rather than re-measuring until timing noise lets it pass; ``--force`` (or
    ``smcp export``) measures again on purpose."""
    outputs = STAGE_OUTPUTS[stage]
    f = out / outputs[0][0]
    if not f.exists():
        return False
    d = read_json(f, outputs[0][1], _redo_hint(stage))
    st = d.get("stamp") or (d.get("model") or {}).get("stamp") if isinstance(d, dict) else None
    if st != stamp(recipe, stage):
        return False
    if stage == "profile" and ((d.get("meta") or {}).get("measure") or {}).get("interpolated_points"):
        return False  # the time budget ran out: the next profile measures the interpolated points
    for rel, what in outputs[1:]:
        if not (out / rel).exists():
            return False
        verify_artifact(out / rel, what, _redo_hint(stage))
    return True


def check_artifacts(out: Path) -> list[dict]:
    """Verify every artifact present in a run directory (checksum, else structure); raises
    :class:`SmcpError` on the first corrupt one.  Returns what was checked."""

    done = []
    extra = (("prune", ("prune/checkpoint.pt", "prune checkpoint")), ("prune", ("prune/metrics.csv", "metrics")))
    items = [(st, o) for st, outs in STAGE_OUTPUTS.items() for o in outs] + list(extra)
    for st, (rel, what) in items:
        p = out / rel
        if p.exists():
            verify_artifact(p, what, _redo_hint(st))
            done.append({"file": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return done


def write_resolved(recipe: Recipe, out: Path) -> None:

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.resolved.yaml", resolved_dump(recipe))
