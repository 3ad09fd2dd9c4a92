"""Recipes: one YAML file that says which model to prune, on which data, to which measured target.

A recipe is validated into a tree of pydantic models (:class:`Recipe`). Every section forbids
unknown keys so that typos are caught, and every problem with user input is reported as a
:class:`~smcp_core.errors.SmcpError` whose message is a single line naming the offending key::

    recipe quickstart.yaml: prune.target.speedup = -1: must be greater than 1 (a speed-up such as 2.0)

Loading (:func:`load_recipe`) goes through these steps:

1. find the file: a path, or a bare built-in name (``quickstart``) looked up in the package's
   ``recipes/`` directory and then in ``./recipes/``;
2. parse the YAML (duplicate keys are an error, merge keys ``<<: *base`` are not: explicit keys
   override merged ones; ``1e-4`` is read as a number); a recipe is a regular file of at most
   1 MiB, nested at most 50 levels, with at most 100,000 values once aliases are expanded (the
   ``MAX_*`` constants; checked on the YAML node graph, before any Python object is built);
3. reject unknown keys, with a "did you mean" suggestion;
4. apply ``--set a.b.c=value`` overrides (values parsed as YAML; setting one target key clears the
   other two);
5. expand ``${VAR}`` and ``${VAR:-default}`` in every string value (``$$`` stands for a literal ``$``);
6. validate with pydantic and turn the first error into one plain sentence.

Relative paths in a recipe are kept as written; they are resolved against the current directory
by whoever opens them.
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
import re
import stat
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from smcp_core.config.presets import apply_preset
from smcp_core.errors import SmcpError

__all__ = [
    "BUILTIN_RECIPE_DIR",
    "DataConfig",
    "ExportConfig",
    "ImportanceConfig",
    "LrScheduleConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ProfileConfig",
    "PruneConfig",
    "Recipe",
    "TARGET_KEYS",
    "TargetConfig",
    "builtin_recipe_names",
    "find_recipe",
    "load_recipe",
    "resolved_dump",
]




def _builtin_recipe_dir() -> Path:
    """The built-in recipes: the top-level ``recipes/`` folder, installed as the package data
    ``smcp_core.recipes`` (``pyproject.toml`` maps it), or read from a source checkout."""
    try:
        return Path(str(importlib.resources.files("smcp_core.recipes")))
    except ModuleNotFoundError:  # run from a source checkout that is not installed
        return Path(__file__).resolve().parents[2] / "recipes"


BUILTIN_RECIPE_DIR = _builtin_recipe_dir()


DEFAULT_RECIPE = "quickstart"


TARGET_KEYS = ("speedup", "latency_ms", "flops_ratio")


# Custom pydantic error types, rendered by _format_error:
#   smcp_value: "<loc> = <value>: <message>"
#   smcp_rel:   "<loc>: <message>"    (a relation between several keys of one section)
_VALUE_ERR = "smcp_value"


_REL_ERR = "smcp_rel"


def _no_bool(value: Any) -> Any:
    # pydantic's lax mode would turn true/false into 1/0 for numeric fields; that is always a mistake.
    if isinstance(value, bool):
        raise PydanticCustomError(_VALUE_ERR, "must be a number, not true/false")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]


Float = Annotated[float, BeforeValidator(_no_bool), Field(allow_inf_nan=False)]


PosInt = Annotated[Int, Field(ge=1)]


NonNegInt = Annotated[Int, Field(ge=0)]


PosFloat = Annotated[Float, Field(gt=0)]


NonNegFloat = Annotated[Float, Field(ge=0)]


Fraction = Annotated[Float, Field(ge=0, lt=1)]  # 0 <= x < 1


Device = str


Backend = Literal["onnxruntime", "torch", "tensorrt"]


DataSource = Literal["digits", "cifar10", "imagefolder", "imagenet_samples", "synthetic"]


_DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?")


_CIFAR_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")


_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def _check_device(value: str) -> str:
    if not _DEVICE_RE.fullmatch(value):
        raise PydanticCustomError(_VALUE_ERR, "must be cpu, cuda or cuda:N")
    return value


def _as_list(value: Any) -> Any:
    # Accept a single string where a list of strings is expected (unpruned: fc, formats: onnx).
    return [value] if isinstance(value, str) else value


class _Section(BaseModel):
    """Base of every recipe section: unknown keys are errors; equality compares values only."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BaseModel) or type(other) is not type(self):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]


class ModelConfig(_Section):
    """Which network to prune and how to build it."""

    source: str = "cifar/resnet20"
    checkpoint: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    num_classes: PosInt | None = None
    input_size: list[Int] | None = None
    unpruned: list[str] = Field(default_factory=list)
    # module types (class names, or module.path.ClassName) the fx trace keeps whole; their channels
    # are frozen (never pruned): for code fx cannot trace, e.g. data-dependent control flow
    leaf_modules: list[str] = Field(default_factory=list)

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        v = value.strip()
        if v.startswith(("torchvision/", "timm/")):
            if _IDENT_RE.fullmatch(v.split("/", 1)[1]):
                return v
        elif v.startswith("cifar/"):
            if v[len("cifar/"):] in _CIFAR_RESNETS:
                return v
            raise PydanticCustomError(
                _VALUE_ERR, "must be cifar/resnet20, cifar/resnet32, cifar/resnet44, "
                "cifar/resnet56 or cifar/resnet110")
        elif v == "mobilenet_v1":
            return v
        elif ":" in v:
            file, _, factory = v.rpartition(":")
            if file.endswith(".py") and _IDENT_RE.fullmatch(factory):
                return v
        raise PydanticCustomError(
            _VALUE_ERR, "must be torchvision/<name>, timm/<name>, cifar/resnet<20|32|44|56|110>, "
            "mobilenet_v1 or path/to/file.py:factory")

    @field_validator("input_size")
    @classmethod
    def _check_input_size(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) != 3 or any(v < 1 for v in value)):
            raise PydanticCustomError(
                _VALUE_ERR, "must be [C, H, W]: three positive integers, or null to take it from the data")
        return value

    @field_validator("unpruned", "leaf_modules", mode="before")
    @classmethod
    def _unpruned_list(cls, value: Any) -> Any:
        return _as_list(value)


class DataConfig(_Section):
    """Training and evaluation data."""

    source: DataSource = "digits"
    path: str | None = None
    val_source: DataSource | None = None
    val_path: str | None = None
    image_size: PosInt | None = None
    train_subset: PosInt | None = None
    val_subset: PosInt | None = None
    batch_size: PosInt = 128
    workers: NonNegInt = 0
    augment: bool = True


class ProfileConfig(_Section):
    """How latency is measured to build the latency lookup table."""

    backend: Backend = "onnxruntime"
    device: Device = "cpu"
    batch_size: PosInt = 1
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    layout: Literal["nchw", "channels_last"] = "nchw"
    channel_step: PosInt = 8
    threads: Annotated[PosInt, Field(le=1024)] | None = None
    warmup: NonNegInt = 10
    min_runs: PosInt = 20
    max_seconds: PosFloat = 600.0
    calibration: Literal["global", "per_resolution"] = "global"

    @field_validator("device")
    @classmethod
    def _device_ok(cls, value: str) -> str:
        return _check_device(value)

    @model_validator(mode="after")
    def _check_backend_device(self) -> ProfileConfig:
        if self.backend == "tensorrt" and not self.device.startswith("cuda"):
            raise PydanticCustomError(
                _REL_ERR, "backend tensorrt needs device cuda (or cuda:N), got device {device}",
                {"device": self.device})
        return self


class TargetConfig(_Section):
    """The pruning target: exactly one of the three keys is set."""

    speedup: Annotated[Float, Field(gt=1)] | None = None
    latency_ms: Annotated[Float, Field(gt=0)] | None = None
    flops_ratio: Annotated[Float, Field(gt=0, lt=1)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetConfig:
        given = [(k, getattr(self, k)) for k in TARGET_KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            got = " and ".join(f"{k}={_fmt_num(v)}" for k, v in given) or "none"
            raise PydanticCustomError(
                _REL_ERR, "set exactly one of speedup, latency_ms, flops_ratio (got {got})", {"got": got})
        return self

    def kind(self) -> str:
        for k in TARGET_KEYS:
            if getattr(self, k) is not None:
                return k
        raise SmcpError("prune.target: no target set")  # unreachable after validation

    def value(self) -> float:
        return float(getattr(self, self.kind()))

    @staticmethod
    def relax_hint_for(kind: str) -> str:
        """How to make an unreachable target of ``kind`` reachable: a speed-up is lowered; a
        latency_ms or flops_ratio target (the most it may cost) is raised."""
        return "lower the target" if kind == "speedup" else "raise the target"

    def relax_hint(self) -> str:
        return self.relax_hint_for(self.kind())


class OptimizerConfig(_Section):
    name: Literal["sgd"] = "sgd"
    lr: PosFloat = 0.1
    momentum: Fraction = 0.9
    nesterov: bool = False
    weight_decay: NonNegFloat = 5.0e-4

    @model_validator(mode="after")
    def _nesterov(self) -> OptimizerConfig:
        if self.nesterov and self.momentum == 0:
            raise PydanticCustomError(_REL_ERR, "nesterov: true needs momentum > 0")
        return self


class LrScheduleConfig(_Section):
    name: Literal["cosine", "constant", "step"] = "cosine"
    warmup_epochs: NonNegInt = 0
    min_lr: NonNegFloat = 0.0


class ImportanceConfig(_Section):
    type: Literal["taylor", "weight", "bn_taylor", "l1_filter", "l2_filter"] = "taylor"
    accumulate: Literal["latest", "momentum", "average"] = "momentum"
    momentum: Fraction = 0.9


class DistillConfig(_Section):
    """Knowledge distillation from the dense starting model during fine-tuning
    (smcp_core.prune.distill): loss = (1 - alpha) CE + alpha T^2 KL(teacher/T || student/T)."""

    enabled: bool = False
    alpha: Annotated[Float, Field(ge=0, le=1)] = 0.5
    temperature: PosFloat = 4.0


def _default_target() -> TargetConfig:
    return TargetConfig(speedup=2.0)


class PruneConfig(_Section):
    """The SMCP schedule and the fine-tuning that goes with it."""

    # smcp (default), or a classic baseline through the same graph/cost/slim/export: halp, l1, sfp,
    # uniform, or none (fine-tune only: the unpruned reference) (smcp_core.config.presets; a method's preset
    # replaces keys left at their schema default)
    method: Literal["smcp", "halp", "l1", "sfp", "uniform", "none", "snip", "magnitude"] = "smcp"
    # snip / magnitude (unstructured): the fraction of conv/linear weights set to zero
    sparsity: Annotated[Float, Field(gt=0, lt=1)] | None = None
    target: TargetConfig = Field(default_factory=_default_target)
    # aim this fraction below the target latency (or FLOPs) to absorb the table's prediction error
    target_margin: Annotated[Float, Field(ge=0, lt=0.5)] = 0.03
    epochs: NonNegInt = 10
    warmup_epochs: NonNegInt = 2
    ramp_epochs: NonNegInt = 5
    cooldown_epochs: NonNegInt = 3
    update_interval_samples: PosInt = 10240
    schedule: Literal["exp", "geometric", "linear"] = "exp"
    masking: Literal["soft", "hard", "permanent"] = "soft"
    # rescale the batch norm after a conv by the kept fraction of its inputs (or of their importance)
    bn_rescaling: Literal["off", "kept_fraction", "kept_importance"] = "off"
    # after a mask change, re-estimate the batch norms' running statistics on this many training
    # batches (at the current masks) before the next evaluation and before the final save (0 = off)
    bn_recalibration_batches: NonNegInt = 8
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_schedule: LrScheduleConfig = Field(default_factory=LrScheduleConfig)
    label_smoothing: Fraction = 0.1
    distill: DistillConfig = Field(default_factory=DistillConfig)
    pruned_decay: NonNegFloat = 2.0e-4
    importance: ImportanceConfig = Field(default_factory=ImportanceConfig)
    channel_round: PosInt = 8
    min_channels: PosInt = 8
    layer_pruning: bool = False
    # hysteresis: currently kept channels count (1 + stickiness) x their importance when masks are
    # re-solved, so a mask update switches structure only for a clear gain (0 = plain SMCP)
    stickiness: NonNegFloat = 0.0
    cost_weight: Annotated[Float, Field(ge=0, le=1)] = 1.0
    # latency targets: at the end of the pruning window, measure the slimmed model against the dense
    # one (paired rounds, as the export gate does); while it misses the target, re-fit the table's
    # calibration with the measured point and re-solve (at most this many corrections; 0 = off)
    closed_loop: NonNegInt = 2
    max_steps: PosInt | None = None
    eval_every: PosInt = 1
    amp: bool = False
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    channels_last: bool = False
    device: Device = "cpu"
    # data-parallel training under torchrun: batch norm statistics over all ranks
    sync_bn: bool = False
    # optimizer step every N batches (effective batch = data.batch_size x N x world size)
    grad_accum: PosInt = 1

    @field_validator("device")
    @classmethod
    def _device_ok(cls, value: str) -> str:
        return _check_device(value)

    @model_validator(mode="after")
    def _check_schedule(self) -> PruneConfig:
        total = self.warmup_epochs + self.ramp_epochs + self.cooldown_epochs
        if total > self.epochs:
            raise PydanticCustomError(
                _REL_ERR,
                "warmup_epochs + ramp_epochs + cooldown_epochs = {w} + {r} + {c} = {t} exceeds "
                "epochs = {e}; lower one of the three or raise epochs",
                {"w": self.warmup_epochs, "r": self.ramp_epochs, "c": self.cooldown_epochs,
                 "t": total, "e": self.epochs})
        if self.lr_schedule.warmup_epochs > self.epochs:
            raise PydanticCustomError(
                _REL_ERR, "lr_schedule.warmup_epochs = {w} exceeds epochs = {e}",
                {"w": self.lr_schedule.warmup_epochs, "e": self.epochs})
        if self.method in ("snip", "magnitude") and self.sparsity is None:
            raise PydanticCustomError(
                _REL_ERR, "method {m} needs prune.sparsity (the fraction of conv/linear weights to zero, e.g. 0.9)",
                {"m": self.method})
        if self.sparsity is not None and self.method not in ("snip", "magnitude"):
            raise PydanticCustomError(
                _REL_ERR, "prune.sparsity applies to the unstructured methods snip and magnitude only; "
                "remove it or set prune.method", {})
        if self.lr_schedule.min_lr > self.optimizer.lr:
            raise PydanticCustomError(
                _REL_ERR, "lr_schedule.min_lr = {m} is above optimizer.lr = {lr}",
                {"m": _fmt_num(self.lr_schedule.min_lr), "lr": _fmt_num(self.optimizer.lr)})
        return self

    @model_validator(mode="after")
    def _method_preset(self, info: ValidationInfo) -> PruneConfig:
        # the settings a baseline method implies (smcp_core.config.presets.PRESETS); keys named by --set
        # (passed as validation context by load_recipe) or holding a non-default value win
        if self.method == "smcp":
            return self

        explicit = tuple((info.context or {}).get("explicit_keys", ())) if info is not None else ()
        problem = apply_preset(self, explicit)
        if problem:
            raise PydanticCustomError(_REL_ERR, "{p}", {"p": problem})
        return self


class ExportConfig(_Section):
    """Export formats and the validation run after export."""

    formats: list[Literal["onnx", "trt"]] = Field(default_factory=lambda: ["onnx"])
    batch_size: PosInt | None = None
    tolerance: PosFloat = 1.0e-4
    opset: Annotated[Int, Field(ge=18)] = 18
    backend: Backend | None = None
    # the gate: paired rounds until the confidence interval of the speed-up is on one side of the
    # target (at least min_runs rounds, at most max_seconds); see the README's "The gate"
    min_runs: PosInt = 50
    max_seconds: PosFloat = 120.0
    confidence: Annotated[Float, Field(ge=0.5, lt=1)] = 0.9
    # the target the gate checks; null = prune.target (set it to gate a pruned model against another
    # target without pruning again: only the export stage re-runs)
    target: TargetConfig | None = None
    trt_precision: Literal["fp32", "fp16", "int8"] = "fp16"

    @field_validator("formats", mode="before")
    @classmethod
    def _formats_list(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("formats")
    @classmethod
    def _formats_nonempty(cls, value: list[str]) -> list[str]:
        if not value:
            raise PydanticCustomError(_VALUE_ERR, "must list at least one of onnx, trt")
        return list(dict.fromkeys(value))  # drop duplicates, keep order


def _check_name(value: str) -> str:
    # the name is the default output directory (runs/<name>): one plain path component
    if value in (".", "..") or any(c in value for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise PydanticCustomError(
            _VALUE_ERR, "must be a plain name without slashes or control characters (it names the default "
            "output directory runs/<name>; use --out for another place)")
    return value


class Recipe(_Section):
    """A fully validated recipe. Build it with :func:`load_recipe`."""

    name: Annotated[str, Field(min_length=1), AfterValidator(_check_name)] = "recipe"
    # torch, numpy and the data loaders all accept a 32-bit seed
    seed: Annotated[NonNegInt, Field(le=2**32 - 1)] = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    _source: str | None = PrivateAttr(default=None)
    _label: str | None = PrivateAttr(default=None)
    _overrides: tuple[str, ...] = PrivateAttr(default=())

    @property
    def source(self) -> str | None:
        """The file this recipe was loaded from (absolute for built-ins), or None if built in code."""
        return self._source

    @property
    def source_label(self) -> str:
        """Short name of the source as used in messages (``quickstart.yaml``, ``recipes/x.yaml``)."""
        return self._label or "<recipe>"

    @property
    def overrides(self) -> tuple[str, ...]:
        """The ``--set`` overrides that were applied, in order."""
        return self._overrides

    def target_kind(self) -> str:
        """``"speedup"``, ``"latency_ms"`` or ``"flops_ratio"``."""
        return self.prune.target.kind()

    def target_value(self) -> float:
        return self.prune.target.value()

    def gate_target(self) -> TargetConfig:
        """The target the export gate checks: ``export.target``, else ``prune.target``."""
        return self.export.target if self.export.target is not None else self.prune.target

    @staticmethod
    def relax_hint_for(kind: str) -> str:
        """``"lower the target"`` for speedup, ``"raise the target"`` for latency_ms and flops_ratio:
        the direction that makes an unreachable target reachable."""
        return TargetConfig.relax_hint_for(kind)

    def relax_hint(self) -> str:
        """:meth:`relax_hint_for` of this recipe's target kind."""
        return self.prune.target.relax_hint()

    def export_batch_size(self) -> int:
        """Batch size used to validate exports (``export.batch_size`` or ``profile.batch_size``)."""
        return self.export.batch_size if self.export.batch_size is not None else self.profile.batch_size

    def export_backend(self) -> str:
        """Latency backend used to validate exports (``export.backend`` or ``profile.backend``)."""
        return self.export.backend or self.profile.backend


# Limits on what one recipe (or one --set value) may hold: it is a small hand-written file, and
# without them a huge file or a YAML alias bomb (`b: &b [*a, *a, ...]`) takes minutes and all memory.
MAX_RECIPE_BYTES = 1 << 20  # 1 MiB
MAX_DEPTH = 50  # nested mappings/lists
MAX_NODES = 100_000  # values after expanding every alias


class _LimitError(yaml.YAMLError):
    """A recipe over one of the limits above (its message is the whole sentence)."""


def _measure(node: yaml.Node, depth: int, memo: dict, active: set) -> int:
    """Number of values ``node`` stands for once every alias is expanded (memoised per node, so an
    alias bomb is counted in linear time); raises :class:`_LimitError` past a limit."""
    if depth > MAX_DEPTH:
        raise _LimitError(f"values are nested more than {MAX_DEPTH} levels deep (line {node.start_mark.line + 1}); "
                          "a value is nested too deeply: recipes are plain mappings, lists and values")
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:  # a recursive alias: refused later with its own message (_TOO_DEEP)
        return 0
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    active.add(key)
    total = 1
    for child in children:
        total += _measure(child, depth + 1, memo, active)
        if total > MAX_NODES:
            raise _LimitError(
                f"more than {MAX_NODES:,} values once YAML aliases (*name) are expanded (at line "
                f"{node.start_mark.line + 1}); a recipe is a small file: write the values out or drop the aliases")
    active.discard(key)
    memo[key] = total
    return total


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float, rejects duplicate keys (merge keys ``<<`` are
    allowed; explicit keys override merged ones) and refuses documents over the limits above before
    building any Python object."""

    def construct_document(self, node: yaml.Node) -> Any:
        _measure(node, 0, {}, set())
        return super().construct_document(node)


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _ch, _resolvers in _Loader.yaml_implicit_resolvers.items():
    _resolvers[:] = [(tag, rx) for tag, rx in _resolvers if tag != "tag:yaml.org,2002:float"]
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # duplicates among the keys written here; merged keys (``<<: *base``) come first after
    # flatten_mapping, so an explicit key overrides a merged one
    explicit = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node in explicit:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "found an unhashable key", key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _yaml_error(err: yaml.YAMLError) -> str:
    if isinstance(err, _LimitError):
        return _one_line(err)
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None)
    if mark is not None and problem and str(problem).startswith("duplicate key"):
        return f"{_one_line(problem)} at line {mark.line + 1}, column {mark.column + 1}"
    if mark is not None and problem:
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {_one_line(problem)}"
    return f"YAML syntax error: {_one_line(err)}"


def builtin_recipe_names() -> list[str]:
    """Names of the recipes shipped with the package (``quickstart`` first)."""
    names = sorted(p.stem for p in BUILTIN_RECIPE_DIR.glob("*.yaml"))
    if DEFAULT_RECIPE in names:
        names.remove(DEFAULT_RECIPE)
        names.insert(0, DEFAULT_RECIPE)
    return names


def _is_bare_name(spec: str) -> bool:
    return bool(spec) and "/" not in spec and "\\" not in spec and not spec.lower().endswith((".yaml", ".yml"))


def find_recipe(spec: str | Path | None) -> tuple[Path, str]:
    """Locate a recipe: returns ``(path, label)``; label is what messages call it.

    A bare name (no directory, no ``.yaml``) is looked up in the package's built-in recipes and
    then in ``./recipes/``; anything else is a path.
    """
    if spec is None:
        spec = DEFAULT_RECIPE
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return path, text
    if not isinstance(spec, Path):
        stem = None
        if _is_bare_name(text):
            stem = text
        elif "/" not in text and "\\" not in text:
            stem = Path(text).stem  # "quickstart.yaml" -> built-in quickstart
        if stem:
            for candidate in (BUILTIN_RECIPE_DIR / f"{stem}.yaml", Path("recipes") / f"{stem}.yaml"):
                if candidate.is_file():
                    label = f"{stem}.yaml" if candidate.parent == BUILTIN_RECIPE_DIR else str(candidate)
                    return candidate, label
    if path.is_dir():
        raise SmcpError(f"recipe path is a directory, not a YAML file: {text}")
    if path.exists():  # a FIFO, socket or device: reading it could block forever
        raise SmcpError(f"recipe {text} is not a regular file (a FIFO, socket or device?); give a YAML file")
    names = builtin_recipe_names()
    close = difflib.get_close_matches(Path(text).stem, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise SmcpError(f"recipe file not found: {text} ({hint}built-in recipes: {', '.join(names)})")


_FREE = "free"  # a dict[str, Any] field: any keys allowed below it


def _field_kind(cls: type[BaseModel], name: str) -> Any:
    """The section class of a field, _FREE for a free-form mapping, or None for a leaf."""
    ann = cls.model_fields[name].annotation
    candidates = [ann]
    if typing.get_origin(ann) in (Union, types.UnionType):
        candidates = [a for a in typing.get_args(ann) if a is not type(None)]
    for a in candidates:
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        if a is dict or typing.get_origin(a) is dict:
            return _FREE
    return None


def _all_paths(cls: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name in cls.model_fields:
        path = prefix + name
        out.append(path)
        kind = _field_kind(cls, name)
        if isinstance(kind, type):
            out.extend(_all_paths(kind, path + "."))
    return out


def _unknown_key(cls: type[BaseModel], prefix: str, key: Any) -> str:
    valid = list(cls.model_fields)
    dotted = f"{prefix}{key}"
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key {dotted} (did you mean {prefix}{close[0]}?)"
    elsewhere = [p for p in _all_paths(Recipe) if p.rsplit(".", 1)[-1] == str(key)]
    if elsewhere:
        options = ", ".join(elsewhere[:-1]) + " or " + elsewhere[-1] if len(elsewhere) > 1 else elsewhere[0]
        return f"unknown key {dotted} (did you mean {options}?)"
    where = f" under {prefix[:-1]}" if prefix else ""
    return f"unknown key {dotted} (valid keys{where}: {', '.join(valid)})"


def _check_keys(data: Mapping, cls: type[BaseModel], prefix: str = "") -> None:
    for key, value in data.items():
        if not isinstance(key, str) or key not in cls.model_fields:
            raise SmcpError(_unknown_key(cls, prefix, key))
        kind = _field_kind(cls, key)
        if isinstance(kind, type) and isinstance(value, Mapping):
            _check_keys(value, kind, f"{prefix}{key}.")


def _apply_override(data: dict, item: str) -> None:
    if not isinstance(item, str) or "=" not in item:
        raise SmcpError(f"--set {item}: expected KEY=VALUE, e.g. --set prune.epochs=3")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise SmcpError(f"--set {item}: expected KEY=VALUE with a dotted key such as prune.target.speedup")
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as err:
        raise SmcpError(f"--set {item}: cannot parse the value: {_yaml_error(err)}") from None
    except RecursionError:
        raise SmcpError(f"--set {item}: {_TOO_DEEP}") from None
    try:
        value = _copy_plain(value)
    except SmcpError as err:
        raise SmcpError(f"--set {item}: {err}") from None

    cls: Any = Recipe
    node = data
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        last = i == len(parts) - 1
        if cls is not _FREE:
            if part not in cls.model_fields:
                raise SmcpError(f"--set {item}: " + _unknown_key(cls, prefix + "." if prefix else "", part))
            kind = _field_kind(cls, part)
            if kind is None and not last:
                raise SmcpError(
                    f"--set {item}: {'.'.join(parts[: i + 1])} is a single value, it has no key {parts[i + 1]}")
        else:
            kind = _FREE
        if last:
            node[part] = value
            if cls is TargetConfig and part in TARGET_KEYS and value is not None:
                for other in TARGET_KEYS:
                    if other != part:
                        node[other] = None
            return
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise SmcpError(
                f"--set {item}: {'.'.join(parts[: i + 1])} is {_fmt_value(child)} in the recipe, not a section")
        node, cls = child, kind


_VAR_RE = re.compile(r"\$\$|\$\{([^}]*)\}|\$\{")


_VAR_BODY_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.S)


def _expand_str(text: str, where: str, env: Mapping[str, str]) -> str:
    if "\x00" in text:  # would only fail later, deep inside a file-system call
        raise SmcpError(f"{where or 'recipe'}: contains a NUL character")

    def repl(m: re.Match) -> str:
        token = m.group(0)
        if token == "$$":
            return "$"
        body = m.group(1)
        spec = _VAR_BODY_RE.fullmatch(body) if body is not None else None
        if spec is None:
            shown = _one_line(token if body is not None else text[m.start():m.start() + 40])
            raise SmcpError(f"{where}: malformed variable reference {shown!r}; use ${{NAME}} or ${{NAME:-default}}")
        name, default = spec.group(1), spec.group(2)
        value = env.get(name)
        if default is not None and not value:
            return default
        if value is None:
            raise SmcpError(
                f"{where} uses ${{{name}}}, which is not set; export {name}={_env_hint(name, where)} "
                f"or pass --set {where}=...")
        return value

    return _VAR_RE.sub(repl, text)


def _env_hint(name: str, where: str) -> str:
    for suffix in ("_ROOT", "_DIR", "_PATH", "_HOME", "_FILE", "_DATA"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return f"/path/to/{name[: -len(suffix)].lower()}"
    if where.endswith(("path", "checkpoint")):
        return f"/path/to/{name.lower()}"
    return "..."


def _expand(value: Any, where: str, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return _expand_str(value, where, env)
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]", env) for i, v in enumerate(value)]
    return value


def _optional(cls: type[BaseModel], name: str) -> bool:
    ann = cls.model_fields[name].annotation
    return typing.get_origin(ann) in (Union, types.UnionType) and type(None) in typing.get_args(ann)


def _none_sections_to_empty(data: dict, cls: type[BaseModel]) -> None:
    """``prune:`` with every key commented out parses as null; treat it as an empty section."""
    for key in list(data):
        if key in cls.model_fields:
            kind = _field_kind(cls, key)
            if isinstance(kind, type):
                if data[key] is None and not _optional(cls, key):  # an optional section (export.target) may be null
                    data[key] = {}
                if isinstance(data[key], dict):
                    _none_sections_to_empty(data[key], kind)


_HINTS = {
    "prune.target.speedup": "a speed-up such as 2.0",
    "prune.target.latency_ms": "a latency in milliseconds",
    "prune.target.flops_ratio": "the fraction of FLOPs to keep, such as 0.5",
    "prune.cost_weight": "1 = input-side attribution, 0 = output-side",
    "export.opset": "the exporter needs ONNX opset 18 or newer",
    "export.tolerance": "the largest allowed absolute difference between outputs",
}


def _fmt_num(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return str(v)


def _fmt_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    text = _one_line(_fmt_num(v) if isinstance(v, float) else repr(v))
    return text if len(text) <= 80 else text[:77] + "..."


def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _section_keys(loc: Sequence[Any]) -> str:
    cls: Any = Recipe
    for part in loc:
        if not isinstance(part, str) or not isinstance(cls, type) or part not in cls.model_fields:
            return ""
        cls = _field_kind(cls, part)
    if isinstance(cls, type):
        return " with keys " + ", ".join(cls.model_fields)
    return ""


def _describe(err: Mapping[str, Any]) -> str:
    t = err["type"]
    ctx = err.get("ctx") or {}
    if t == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return "must be one of " + ", ".join(choices) if choices else _one_line(err["msg"])
    if t == "greater_than":
        return f"must be greater than {_fmt_num(ctx['gt'])}"
    if t == "greater_than_equal":
        return f"must be at least {_fmt_num(ctx['ge'])}"
    if t == "less_than":
        return f"must be less than {_fmt_num(ctx['lt'])}"
    if t == "less_than_equal":
        return f"must be at most {_fmt_num(ctx['le'])}"
    if t in ("int_type", "int_parsing", "int_from_float", "int_parsing_size"):
        return "must be a whole number"
    if t in ("float_type", "float_parsing"):
        return "must be a number"
    if t == "finite_number":
        return "must be a finite number"
    if t in ("bool_type", "bool_parsing"):
        return "must be true or false"
    if t in ("string_type", "string_unicode"):
        return "must be a string"
    if t == "string_too_short":
        return "must not be empty"
    if t in ("list_type", "tuple_type"):
        return "must be a list"
    if t in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a mapping" + _section_keys(err["loc"])
    if t == "missing":
        return "is required"
    if t == "extra_forbidden":
        return "is not a known key"
    return _one_line(err["msg"])


def _format_error(err: Mapping[str, Any]) -> str:
    loc = err.get("loc", ())
    where = _dotted(loc)
    t = err["type"]
    if t == "extra_forbidden":
        cls: Any = Recipe
        for part in loc[:-1]:
            cls = _field_kind(cls, part) if isinstance(cls, type) and part in cls.model_fields else None
        if isinstance(cls, type):
            prefix = ".".join(str(p) for p in loc[:-1])
            return _unknown_key(cls, prefix + "." if prefix else "", loc[-1])
        return f"unknown key {where}"
    if t == _REL_ERR:
        return f"{where}: {_one_line(err['msg'])}" if where else _one_line(err["msg"])
    msg = _one_line(err["msg"]) if t == _VALUE_ERR else _describe(err)
    hint = _HINTS.get(where)
    if hint and t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        msg += f" ({hint})"
    if t == "missing":
        return f"{where} {msg}"
    return f"{where or 'recipe'} = {_fmt_value(err.get('input'))}: {msg}"


def load_recipe(
    spec: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
) -> Recipe:
    """Load, override, expand and validate a recipe.

    ``spec`` is a YAML path or a built-in name (None = ``quickstart``); ``overrides`` are
    ``a.b.c=value`` strings (values parsed as YAML); ``env`` replaces ``os.environ`` for ``${VAR}``
    expansion. Raises :class:`SmcpError` with a one-line message on any problem.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    path, label = find_recipe(spec)
    text = _read_recipe_text(path, label)
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as err:
        raise SmcpError(f"recipe {label}: {_yaml_error(err)}") from None
    except RecursionError:
        raise SmcpError(f"recipe {label}: {_TOO_DEEP}") from None
    if data is None:
        raise SmcpError(f"recipe {label}: the file is empty; expected a mapping with keys "
                        f"{', '.join(Recipe.model_fields)}")
    if not isinstance(data, dict):
        raise SmcpError(f"recipe {label}: the top level must be a mapping with keys "
                        f"{', '.join(Recipe.model_fields)}, not a {_yaml_type(data)}")
    try:
        return _build(data, label, overrides, os.environ if env is None else env,
                      source=str(path.resolve() if path.is_relative_to(BUILTIN_RECIPE_DIR) else path),
                      default_name=path.stem)
    except SmcpError as err:
        raise SmcpError(f"recipe {label}: {err}") from None
    except RecursionError:
        raise SmcpError(f"recipe {label}: {_TOO_DEEP}") from None


def _read_recipe_text(path: Path, label: str) -> str:
    """The file's text: a regular file (a FIFO would block) of at most MAX_RECIPE_BYTES."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise SmcpError(f"recipe {label} is not a regular file (a FIFO, socket or device?); give a YAML file")
        if st.st_size > MAX_RECIPE_BYTES:
            raise SmcpError(f"recipe {label}: the file is {st.st_size:,} bytes, over the limit of "
                            f"{MAX_RECIPE_BYTES:,} (1 MiB); a recipe is a small YAML file")
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:  # it grew since the stat
            raise SmcpError(f"recipe {label}: the file is over the limit of {MAX_RECIPE_BYTES:,} bytes (1 MiB)")
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SmcpError(f"recipe {label}: cannot read the file: {_one_line(err)}") from None


_TOO_DEEP = ("a value is nested too deeply or refers to itself (a recursive YAML alias such as "
             "`&a [*a]`); recipes are plain mappings, lists and values")


def _yaml_type(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _build(data: dict, label: str, overrides: Sequence[str], env: Mapping[str, str], *,
           source: str | None, default_name: str) -> Recipe:
    data = _copy_plain(data)  # first: it refuses self-referencing structures
    _check_keys(data, Recipe)
    _none_sections_to_empty(data, Recipe)
    for item in overrides:
        _apply_override(data, item)
    data = _expand(data, "", env)
    _none_sections_to_empty(data, Recipe)
    data.setdefault("name", default_name)
    explicit = [o.partition("=")[0].strip() for o in overrides if isinstance(o, str)]
    try:
        recipe = Recipe.model_validate(data, context={"explicit_keys": explicit})
    except ValidationError as err:
        raise SmcpError(_format_error(err.errors(include_url=False)[0])) from None
    recipe._source = source
    recipe._label = label
    recipe._overrides = tuple(overrides)
    return recipe


def _copy_plain(value: Any, _active: frozenset = frozenset()) -> Any:
    """Deep copy of plain YAML data (dicts and lists), so overrides never touch shared objects.

    A structure that contains itself (a recursive YAML alias) is an error."""
    if isinstance(value, (dict, list)):
        if id(value) in _active:
            raise SmcpError(_TOO_DEEP)
        inner = _active | {id(value)}
        if isinstance(value, dict):
            return {k: _copy_plain(v, inner) for k, v in value.items()}
        return [_copy_plain(v, inner) for v in value]
    return value


def _escape_dollars(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, dict):
        return {k: _escape_dollars(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_dollars(v) for v in value]
    return value


def resolved_dump(recipe: Recipe) -> str:
    """YAML of the fully resolved recipe (every key, variables expanded, overrides applied).

    Loading the text again with :func:`load_recipe` gives an equal :class:`Recipe`.
    """
    data = _escape_dollars(recipe.model_dump(mode="json"))
    header = [f"# resolved recipe {recipe.name!r}"]
    if recipe.source:
        header.append(f"# source: {_one_line(recipe.source)}")
    if recipe.overrides:
        header.append("# overrides: " + _one_line(" ".join(f"--set {o}" for o in recipe.overrides)))
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
    return "\n".join(header) + "\n" + body


def recipe_from(data: Mapping[str, Any]) -> Recipe:
    """A recipe from plain Python values (the Python API's settings), checked and worded like a
    recipe file's: one-line :class:`SmcpError` naming the dotted key."""
    if not isinstance(data, Mapping):
        raise SmcpError(f"settings must be a mapping of recipe sections, got {type(data).__name__}")
    return _build(dict(data), "Python API settings", (), {}, source=None, default_name="api")
