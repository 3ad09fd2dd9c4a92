"""Method presets applied while a recipe is validated (``prune.method``): the keys a method forces
and the defaults it brings (see :mod:`smcp_core.prune.methods` for what each method does in training)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smcp_core.errors import SmcpError

METHODS = ("smcp", "halp", "l1", "sfp", "uniform", "none", "snip", "magnitude")


UNSTRUCTURED = ("snip", "magnitude")


# forced: the method is defined by these values (a conflicting explicit value is an error);
# defaults: applied where the recipe leaves the key at its schema default and --set did not name it
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "smcp": {"forced": {}, "defaults": {}},
    "halp": {"forced": {"masking": "permanent"},
             "defaults": {"importance.type": "bn_taylor", "importance.accumulate": "average",
                          "cost_weight": 0.0, "schedule": "geometric"}},
    "l1": {"forced": {"masking": "permanent", "importance.type": "l1_filter"}, "defaults": {}},
    "sfp": {"forced": {"masking": "permanent", "importance.type": "l2_filter"}, "defaults": {}},
    "uniform": {"forced": {}, "defaults": {}},
    "none": {"forced": {}, "defaults": {}},
    "snip": {"forced": {}, "defaults": {}},
    "magnitude": {"forced": {}, "defaults": {}},
}


def _get(pc: Any, key: str) -> Any:
    obj = pc
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set(pc: Any, key: str, value: Any) -> None:
    parts = key.split(".")
    obj = pc
    for part in parts[:-1]:
        obj = getattr(obj, part)
    setattr(obj, parts[-1], value)


def _schema_default(pc: Any, key: str) -> Any:
    parts = key.split(".")
    cls = type(pc)
    obj = pc
    for part in parts[:-1]:
        obj = getattr(obj, part)
        cls = type(obj)
    return cls.model_fields[parts[-1]].get_default(call_default_factory=True)


def _is_explicit(pc: Any, key: str, explicit: tuple[str, ...]) -> bool:
    full = "prune." + key
    if any(full == e or full.startswith(e + ".") for e in explicit):
        return True
    return _get(pc, key) != _schema_default(pc, key)


def apply_preset(pc: Any, explicit: tuple[str, ...] = ()) -> str | None:
    """Apply the preset of ``pc.method`` to a validated ``PruneConfig`` in place.  ``explicit``:
    dotted recipe keys given by ``--set`` (they count as chosen even at their default value).
    Returns a one-line problem (a forced key set to something else), or None."""
    preset = PRESETS.get(pc.method) or {}
    for key, value in (preset.get("forced") or {}).items():
        cur = _get(pc, key)
        if cur != value and _is_explicit(pc, key, explicit):
            return (f"method {pc.method} needs {key} = {value} (got {cur}); drop prune.{key} "
                    f"or choose another prune.method")
        _set(pc, key, value)
    for key, value in (preset.get("defaults") or {}).items():
        if not _is_explicit(pc, key, explicit):
            _set(pc, key, value)
    return None


def describe(pc: Any) -> dict:
    """The effective method settings of a ``PruneConfig`` (recorded in the prune history)."""
    s = spec(pc.method)
    return {"method": pc.method, "allocation": s.allocation, "monotone": s.monotone,
            "soft_filter": s.soft_filter, "masking": pc.masking, "importance": pc.importance.type,
            "accumulate": pc.importance.accumulate, "cost_weight": pc.cost_weight, "schedule": pc.schedule}



@dataclass(frozen=True)
class MethodSpec:
    name: str
    allocation: str  # "knapsack", "uniform" or "none" (nothing is pruned)
    monotone: bool  # a pruned class never comes back
    rezero: bool  # re-zero pruned (masked) weights after every optimizer step
    soft_filter: bool  # SFP: zero producers' filters at epoch ends instead of masking


SPECS = {
    "smcp": MethodSpec("smcp", "knapsack", False, False, False),
    "halp": MethodSpec("halp", "knapsack", True, True, False),
    "l1": MethodSpec("l1", "uniform", True, True, False),
    "sfp": MethodSpec("sfp", "uniform", False, True, True),
    "uniform": MethodSpec("uniform", "uniform", False, False, False),
    "none": MethodSpec("none", "none", False, False, False),
    "snip": MethodSpec("snip", "none", False, False, False),
    "magnitude": MethodSpec("magnitude", "none", False, False, False),
}


def spec(method: str) -> MethodSpec:
    try:
        return SPECS[method]
    except KeyError:

        raise SmcpError(f"unknown prune.method {method!r}; choose one of {', '.join(METHODS)}") from None
