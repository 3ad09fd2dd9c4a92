"""Run-directory artifacts: the files each stage writes, their stamps (what they were made from) and
integrity checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from smcp_core.config.recipe import Recipe, resolved_dump
from smcp_core.errors import SmcpError
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
    # keys added by an smcp upgrade enter the stamp only when set, so that existing runs stay up to date
    if not model.get("leaf_modules"):
        model.pop("leaf_modules", None)
    if not r["prune"].get("distill", {}).get("enabled"):
        r["prune"].pop("distill", None)
    if r["profile"].get("calibration") == "global":
        r["profile"].pop("calibration")
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


# the structure every JSON artifact must have (key -> type, or a nested dict), checked after its
# checksum by check_json_artifacts() and up_to_date(): valid JSON of the wrong shape (a list, a
# string where a number belongs) is bad input, one line, never an exception deep inside a stage.
# Keys marked "!" are required; "num" is an int or float (not a bool), "num?" also null.
_SHAPES: dict[str, dict] = {
    "latency.json": {"!format": "str", "!schema_version": "int", "!meta": {"measure": "dict"},
                     "model": {"stamp": "str", "measured_ms": "num", "calibration": "dict", "input_shape": "ints"},
                     "!entries": "dict"},
    "prune/summary.json": {"!stamp": "str", "!target": "dict", "budget": "num?", "cost_unit": "str",
                           "full_cost": "num?", "final_cost": "num?", "meets_budget": "bool", "predicted_ms": "num?",
                           "predicted_speedup": "num?", "flops_ratio": "num?", "params_ratio": "num?",
                           "top1": "num?", "seconds": "num?", "groups": "dicts", "layers": "dicts",
                           "history": "dicts", "world_size": "int"},
    "slim/slim.json": {"!stamp": "str", "max_abs_diff": "num?", "tolerance": "num?", "params": "int",
                       "params_full": "int", "flops": "int", "flops_full": "int", "seconds": "num?"},
    "slim/channel_spec.json": {"!format": "str", "!model": {"!source": "str", "kwargs": "dict", "num_classes": "int?",
                                                              "unpruned": "strs"},
                               "!input_shape": "ints", "!n_classes": "int", "!kept_classes": "ints", "layers": "dicts"},
    "export/report.json": {"!stamp": "str", "backend": "str", "device": "str", "batch_size": "int",
                           "input_shape": "ints", "!baseline": {"!latency_ms": "num", "stats": "dict"},
                           "!pruned": {"!latency_ms": "num", "stats": "dict"}, "!speedup": "num",
                           "target": "dict", "target_speedup": "num?", "!passed": "bool", "parity": "dict?",
                           "flops_ratio": "num?", "params_ratio": "num?", "accuracy": "dict?", "gate": "dict?",
                           "environment": "dict", "files": "dict"},
}
_KIND_TEXT = {"str": "a string", "int": "an integer", "num": "a number", "bool": "true or false", "dict": "an object",
              "dicts": "a list of objects", "ints": "a list of integers", "strs": "a list of strings"}


def _is(kind: str, v: Any) -> bool:
    if kind.endswith("?"):
        return v is None or _is(kind[:-1], v)
    if kind in ("int", "num"):
        return not isinstance(v, bool) and isinstance(v, int if kind == "int" else (int, float))
    if kind in ("dicts", "ints", "strs"):
        return isinstance(v, list) and all(_is(kind[:-1], x) for x in v)
    return isinstance(v, {"str": str, "bool": bool, "dict": dict}[kind])


def _shape_error(data: Any, shape: dict, where: str = "") -> str | None:
    """What is wrong with ``data`` against ``shape`` (None when nothing)."""
    if not isinstance(data, dict):
        return f"{where or 'the top level'} must be an object, not {type(data).__name__}"
    for key, kind in shape.items():
        name = key.lstrip("!")
        path = f"{where}.{name}" if where else name
        if name not in data:
            if key.startswith("!"):
                return f"{path} is missing"
            continue
        if isinstance(kind, dict):
            err = _shape_error(data[name], kind, path)
            if err:
                return err
        elif not _is(kind, data[name]):
            return f"{path} must be {_KIND_TEXT[kind.rstrip('?')]}{' or null' if kind.endswith('?') else ''}"
    return None


def _spec_error(d: dict) -> str | None:
    """Channel spec values a model cannot have (negative or repeated kept classes, empty shapes)."""
    n, kept = d["n_classes"], d["kept_classes"]
    bad = next((c for c in kept if not 0 <= c < n), None)
    if bad is not None:
        return f"kept_classes has {bad}, outside 0..{n - 1} (n_classes {n})"
    if len(set(kept)) != len(kept):
        return "kept_classes repeats a class"
    if not d["input_shape"] or any(x < 1 for x in d["input_shape"]):
        return f"input_shape {d['input_shape']} is not a list of positive sizes"
    return None


def check_json_shape(path: Path, rel: str, data: Any, stage: str) -> None:
    """Raise :class:`SmcpError` (one line naming the file, the key and the fix) when ``data``, the
    content of ``rel`` in a run directory, does not have that artifact's structure."""
    err = _shape_error(data, _SHAPES[rel])
    if err is None and rel == "slim/channel_spec.json":
        err = _spec_error(data)
    if err:
        what = dict(o for outs in STAGE_OUTPUTS.values() for o in outs)[rel]
        raise SmcpError(f"{what} {path} is valid JSON of the wrong structure ({err}); {_redo_hint(stage)}")


# the JSON artifacts each command reads (checked before it writes anything)
COMMAND_READS: dict[str, tuple[str, ...]] = {
    "profile": ("latency.json",), "prune": ("latency.json",), "slim": ("prune/summary.json",),
    "export": ("prune/summary.json", "slim/slim.json", "slim/channel_spec.json"),
    "run": tuple(_SHAPES), "report": tuple(_SHAPES),
}


def check_json_artifacts(out: Path, command: str) -> None:
    """Every JSON artifact ``command`` reads that exists in ``out``: intact (checksum, parse) and of
    the right structure; the first one that is not raises a one-line :class:`SmcpError`."""
    owner = {rel: st for st, outs in STAGE_OUTPUTS.items() for rel, _ in outs}
    for rel in COMMAND_READS[command]:
        f = out / rel
        if f.exists():
            what = dict(STAGE_OUTPUTS[owner[rel]])[rel]
            check_json_shape(f, rel, read_json(f, what, _redo_hint(owner[rel])), owner[rel])


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
    check_json_shape(f, outputs[0][0], d, stage)  # a list or a string stamp is corrupt, not merely stale
    st = d.get("stamp") or (d.get("model") or {}).get("stamp")
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
