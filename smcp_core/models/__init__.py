"""Model registry: build a model from a source string and load checkpoints into it.

Sources accepted by :func:`build_model`:

* ``torchvision/<name>`` — a torchvision classification model, built with ``weights=None`` (no
  downloads); ``num_classes`` and ``kwargs`` are passed to its builder.
* ``timm/<name>`` — a timm model (optional extra ``timm``), built with ``pretrained=False``;
  ``num_classes`` and ``kwargs`` are passed to ``timm.create_model``.  Re-parameterisable models
  are built in their deployed form (:mod:`smcp_core.models.timm_source`).
* ``cifar/resnet20`` | ``resnet32`` | ``resnet44`` | ``resnet56`` | ``resnet110`` — CIFAR ResNets
  (option-A shortcuts), kwargs ``in_channels`` (default 3); ``num_classes`` defaults to 10.
* ``mobilenet_v1`` — MobileNetV1, kwargs ``width`` (default 1.0), ``in_channels`` (default 3);
  ``num_classes`` defaults to 1000.
* ``path/to/file.py:factory`` — user code: the file is imported by path and ``factory(**kwargs)``
  is called (with ``num_classes=`` too when given and the factory accepts it).  A relative path is
  resolved against ``base_dir`` (e.g. the recipe's folder) when given, else the working directory.
  The built model runs once on a small guessed input (eval mode, no grad): one that returns a dict
  or tuple instead of a tensor of logits is an error here (:func:`check_logits`).

Every user mistake raises :class:`~smcp_core.errors.SmcpError` with a one-line message.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import itertools
import pickle
import sys
import traceback
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from smcp_core.errors import SmcpError
from smcp_core.models.cifar_resnet import DEPTHS as _CIFAR_DEPTHS
from smcp_core.models.cifar_resnet import CifarResNet, PadShortcut, cifar_resnet
from smcp_core.models import timm_source
from smcp_core.models.mobilenet_v1 import MobileNetV1
from smcp_core.utils.tv import import_torchvision

__all__ = [
    "build_model",
    "check_logits",
    "load_checkpoint",
    "list_models",
    "CifarResNet",
    "PadShortcut",
    "MobileNetV1",
]

_BUILTIN = [f"cifar/{n}" for n in _CIFAR_DEPTHS] + ["mobilenet_v1"]
_FORMS = "torchvision/<name>, timm/<name>, cifar/resnet20|32|44|56|110, mobilenet_v1, or path/to/file.py:factory"
_counter = itertools.count()


def _torchvision_names() -> list[str]:

    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models))


def list_models() -> list[str]:
    """All registry names (built-ins first, then ``torchvision/<name>`` classification models)."""
    return list(_BUILTIN) + [f"torchvision/{n}" for n in _torchvision_names()]


def _close(name: str, choices: list[str], n: int = 4) -> str:
    matches = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    return f"did you mean {', '.join(matches)}?" if matches else ""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _call_builder(what: str, fn, kwargs: dict, accepted: list[str] | None = None) -> nn.Module:
    if accepted is not None:
        bad = sorted(k for k in kwargs if k not in accepted)
        if bad:
            raise SmcpError(
                f"model {what}: unknown kwargs {', '.join(bad)}; it accepts: "
                f"{', '.join(accepted) if accepted else '(none)'}, plus num_classes"
            )
    try:
        return fn(**kwargs)
    except SmcpError:
        raise
    except TypeError as exc:
        try:
            params = [n for n, p in inspect.signature(fn).parameters.items()
                      if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        except (TypeError, ValueError):
            params = []
        hint = f"; it accepts: {', '.join(params)}" if params else ""
        raise SmcpError(f"model {what}: bad kwargs {sorted(kwargs)} ({_one_line(exc)}){hint}") from None
    except Exception as exc:
        raise SmcpError(f"model {what}: building it failed with {_one_line(exc)}; check its kwargs") from None


def build_model(
    source: str,
    *,
    num_classes: int | None = None,
    kwargs: dict | None = None,
    base_dir: str | Path | None = None,
    deploy: bool = True,
) -> nn.Module:
    """Build a model from ``source`` (see the module docstring for the accepted forms).
    ``deploy=False``: a re-parameterisable timm model in its training form (to load a checkpoint
    of that form; :func:`~smcp_core.models.timm_source.deploy_form` then folds it)."""
    source, num_classes, kwargs = _checked_build_args(source, num_classes, kwargs)
    if ".py:" in source or source.endswith(".py"):
        return _build_user(source, num_classes, kwargs, base_dir)
    if source.startswith(timm_source.PREFIX):
        model = timm_source.build_timm(source, num_classes, kwargs, _call_builder)
        return timm_source.deploy_form(model) if deploy else model
    if source.startswith("torchvision/"):
        return _build_torchvision(source, num_classes, kwargs)
    if source.startswith("cifar/"):
        return _build_cifar(source, num_classes, kwargs)
    if source == "mobilenet_v1":
        return _call_builder(
            source,
            lambda **kw: MobileNetV1(num_classes=1000 if num_classes is None else num_classes, **kw),
            kwargs,
            ["width", "in_channels"],
        )
    raise SmcpError(_unknown_source(source))


def _checked_build_args(source, num_classes, kwargs) -> tuple[str, int | None, dict]:
    """``source`` stripped, ``num_classes`` (given directly or in ``kwargs``, not both differently)
    and the other keyword arguments; anything malformed is a one-line :class:`SmcpError`."""
    if not isinstance(source, str) or not source.strip():
        raise SmcpError(f"model source must be a non-empty string such as {_FORMS} (got {source!r})")
    source = source.strip()
    if kwargs is not None and not isinstance(kwargs, dict):
        raise SmcpError(f"model {source}: kwargs must be a mapping of argument names to values (got {kwargs!r})")
    kwargs = dict(kwargs or {})
    if "num_classes" in kwargs:
        if num_classes is not None and kwargs["num_classes"] != num_classes:
            raise SmcpError(
                f"model {source}: num_classes given twice ({num_classes} and kwargs.num_classes="
                f"{kwargs['num_classes']}); give it once"
            )
        num_classes = kwargs.pop("num_classes")
    if not isinstance(num_classes, (int, type(None))) or isinstance(num_classes, bool) or (
        num_classes is not None and num_classes < 1
    ):
        raise SmcpError(f"model {source}: num_classes must be a positive integer (got {num_classes!r})")
    return source, num_classes, kwargs


def _build_torchvision(source: str, num_classes: int | None, kwargs: dict) -> nn.Module:
    name = source.split("/", 1)[1]
    names = _torchvision_names()
    if name not in names:
        hint = _close(name, names)
        raise SmcpError(
            f"model {source}: unknown torchvision classification model '{name}'"
            + (f"; {hint}" if hint else "; list_models() shows the valid names")
        )
    tv = import_torchvision()
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    kwargs.setdefault("weights", None)
    return _call_builder(source, lambda **kw: tv.models.get_model(name, **kw), kwargs)


def _build_cifar(source: str, num_classes: int | None, kwargs: dict) -> nn.Module:
    name = source.split("/", 1)[1]
    if name not in _CIFAR_DEPTHS:
        hint = _close(source, [f"cifar/{n}" for n in _CIFAR_DEPTHS])
        raise SmcpError(
            f"model {source}: unknown CIFAR model; valid: {', '.join('cifar/' + n for n in _CIFAR_DEPTHS)}"
            + (f"; {hint}" if hint else "")
        )
    return _call_builder(
        source,
        lambda **kw: cifar_resnet(name, num_classes=10 if num_classes is None else num_classes, **kw),
        kwargs,
        ["in_channels"],
    )


def _unknown_source(source: str) -> str:
    """The one line for a source of no known form, with the nearest valid names."""
    try:
        candidates = list_models()
    except SmcpError:
        candidates = list(_BUILTIN)
    # match the bare names too, so "resnt50" suggests torchvision/resnet50 first
    bare = {c.split("/", 1)[-1]: c for c in reversed(candidates)}
    matches = difflib.get_close_matches(source, list(bare), n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(bare[m] for m in matches)}?" if matches else _close(source, candidates)
    return f"unknown model source '{source}'; use {_FORMS}" + (f"; {hint}" if hint else "")


# ---------------------------------------------------------------------------------------- user code


def _error_location(exc: BaseException, file: Path) -> str:
    """``file:line`` of the deepest traceback frame inside ``file`` (or of a SyntaxError)."""
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        return f"{exc.filename or file}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == file]
    if frames:
        return f"{file}:{frames[-1].lineno}"
    return str(file)


def user_model_file(source: str) -> Path | None:
    """The Python file of a ``path/to/file.py:factory`` model source (relative paths as given), else None."""
    file_part, sep, _ = source.rpartition(":")
    return Path(file_part).expanduser() if sep and file_part.endswith(".py") else None


def _build_user(source: str, num_classes: int | None, kwargs: dict, base_dir) -> nn.Module:
    path, factory = user_model_file(source), source.rpartition(":")[2]
    if path is None or not factory:
        raise SmcpError(
            f"model {source}: user models are given as path/to/file.py:factory "
            f"(the function or class in that file that returns the nn.Module)"
        )
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    path = path.resolve()
    if not path.is_file():
        raise SmcpError(f"model {source}: file {path} not found; check the path (relative paths are "
                        f"resolved against {Path(base_dir).resolve() if base_dir else Path.cwd()})")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"smcp_user_model_{digest}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise SmcpError(f"model {source}: cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    import_torchvision()  # before the file's own imports (it may import torchvision or timm)
    sys.modules[mod_name] = module  # dataclasses, pickling etc. look the module up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # SyntaxError, ImportError, anything raised at import time
        sys.modules.pop(mod_name, None)
        raise SmcpError(
            f"model {source}: importing {_error_location(exc, path)} failed: {_one_line(exc)}; fix the file"
        ) from None
    fn = getattr(module, factory, None)
    if fn is None or not callable(fn):
        available = sorted(
            n for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == mod_name
        )
        what = "not found" if fn is None else "is not callable"
        raise SmcpError(
            f"model {source}: '{factory}' {what} in {path}; callables defined there: "
            f"{', '.join(available) if available else '(none)'}"
        )
    call_kwargs = dict(kwargs)
    if num_classes is not None and _accepts(fn, "num_classes"):
        call_kwargs["num_classes"] = num_classes
    try:
        model = fn(**call_kwargs)
    except Exception as exc:
        raise SmcpError(
            f"model {source}: calling {factory}(**{call_kwargs}) failed at "
            f"{_error_location(exc, path)}: {_one_line(exc)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise SmcpError(
            f"model {source}: {factory}() returned {type(model).__name__}, not a torch.nn.Module; "
            f"make it return the model"
        )
    _probe_output(model, source)
    return model


def _kind_of_output(out: Any) -> str:
    if isinstance(out, dict):
        keys = ", ".join(map(repr, list(out)[:4])) + (", ..." if len(out) > 4 else "")
        return f"a dict (keys {keys})" if out else "an empty dict"
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return f"a namedtuple {type(out).__name__} ({', '.join(out._fields[:4])})"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    return "None" if out is None else f"a {type(out).__name__}"


def check_logits(output: Any, what: str) -> None:
    """Raise a one-line :class:`SmcpError` unless ``output`` (of one forward of model ``what``) is a
    tensor of logits: every stage (graph, loss, accuracy, export) takes the output as one tensor."""
    if isinstance(output, torch.Tensor):
        return
    raise SmcpError(
        f"model {what} returns {_kind_of_output(output)}; smcp needs a tensor of logits (batch x classes) "
        "- wrap it in an nn.Module whose forward returns only the logits (e.g. `return self.net(x)['logits']`"
        " or `[0]`)"
    )


def _probe_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """Guessed inputs from the first layer: images for a conv, feature vectors for a linear layer;
    none for a model with lazy layers (a forward would fix their sizes)."""
    if any(isinstance(m, LazyModuleMixin) for m in model.modules()):
        return []
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d):
        return [(2, first.in_channels, 32, 32), (2, first.in_channels, 224, 224)]
    if isinstance(first, nn.Linear):
        return [(2, first.in_features)]
    return []


def _probe_output(model: nn.Module, what: str) -> None:
    """One eval-mode forward of a user model on a small guessed input (batch 2, 32x32, then
    224x224), so a model that returns a dict or tuple is reported now, in one line, not after
    profiling.  A forward that fails (the guess is wrong) is left to the channel graph, which runs
    the recipe's real input; the training flag and the RNG are left as they were."""
    shapes = _probe_shapes(model)
    if not shapes:
        return
    was_training = model.training
    try:
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for shape in shapes:
                try:
                    out = model(torch.zeros(shape))
                except Exception:  # noqa: BLE001, S112 - a wrong guess of the input, not the model's fault
                    continue
                check_logits(out, what)
                return
    finally:
        model.train(was_training)


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


# -------------------------------------------------------------------------------------- checkpoints


def _strip_module(sd: dict) -> dict:
    out = OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in sd.items())
    meta = getattr(sd, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if k == "module" else k[len("module."):] if k.startswith("module.") else k, v)
            for k, v in meta.items()
        )
    return out


def _extract_state_dict(obj: Any, path: Path) -> tuple[dict, dict]:
    """Return ``(state_dict, metadata)`` from whatever ``torch.load`` gave."""
    if isinstance(obj, nn.Module):
        return obj.state_dict(), {}
    if not isinstance(obj, dict):
        raise SmcpError(
            f"checkpoint {path}: holds a {type(obj).__name__}, expected a state dict or a dict with "
            f"'state_dict'/'model'; re-save with torch.save(model.state_dict(), path)"
        )
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if key in obj and isinstance(obj[key], (dict, nn.Module)):
            sd = obj[key].state_dict() if isinstance(obj[key], nn.Module) else obj[key]
            meta = {}
            for k, v in obj.items():
                if k == key:
                    continue
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    v = v.item()
                if isinstance(v, (int, float, str, bool)):
                    meta[k] = v
            return sd, meta
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise SmcpError(
        f"checkpoint {path}: no state dict found (top-level keys: {', '.join(map(str, list(obj)[:8]))}); "
        f"expected a plain state dict or a dict with 'state_dict' or 'model'"
    )


def _fmt_keys(keys: list[str], n: int = 4) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _looks_like_torch_file(p: Path) -> bool:
    """torch.save writes a zip archive (legacy format: a pickle, whose first byte is 0x80)."""
    try:
        with open(p, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return zipfile.is_zipfile(p) or head[:1] == b"\x80"


def _checked_checkpoint_file(path: str | Path) -> Path:
    """``path`` as a regular, complete file, or a one-line :class:`SmcpError` saying what it is."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(q.name for q in p.iterdir() if q.is_file() and q.suffix.lower() in _CKPT_EXTS)
        raise SmcpError(f"checkpoint {p} is a directory, not a file; point model.checkpoint at the file "
                        "written by torch.save" + (f" (found there: {_fmt_keys(found)})" if found else ""))
    if p.exists() and not p.is_file():
        raise SmcpError(f"checkpoint {p} is not a regular file (a FIFO, socket or device?); give a torch.save file")
    if not p.is_file():
        raise SmcpError(f"checkpoint {p} not found; check the path")
    if _truncated_zip(p):
        raise SmcpError(f"checkpoint {p}: the file is truncated (a zip archive written by torch.save, cut off "
                        "before its end: an interrupted copy or download?); copy or save it again")
    return p


def _torch_load(p: Path, trust: bool):
    """``torch.load`` of ``p`` on the CPU (``weights_only`` unless ``trust``); every failure is one line."""
    try:
        return torch.load(p, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        looks_pickled = "unsupported global" in str(exc).lower() or _looks_like_torch_file(p)
        if not trust and "weights only" in str(exc).lower() and looks_pickled:
            raise SmcpError(
                f"checkpoint {p}: contains pickled objects; re-save with "
                f"torch.save(model.state_dict(), path) or pass --trust-checkpoint (only for files you trust)"
            ) from None
        raise SmcpError(
            f"checkpoint {p}: not a PyTorch checkpoint (expected a file written by torch.save)"
        ) from None
    except EOFError:
        raise SmcpError(f"checkpoint {p}: file is empty or truncated; re-save it with torch.save") from None
    except Exception as exc:  # corrupt data, or (trust=True) unpickling errors such as missing classes
        if not _looks_like_torch_file(p):
            raise SmcpError(
                f"checkpoint {p}: not a PyTorch checkpoint (expected a file written by torch.save)"
            ) from None
        if "unexpected eof" in str(exc).lower() or "truncated" in str(exc).lower():
            raise SmcpError(f"checkpoint {p}: the file is truncated or corrupt ({_one_line(exc)}); "
                            "copy or save it again") from None
        raise SmcpError(f"checkpoint {p}: loading failed ({_one_line(exc)})") from None


def _check_keys_and_shapes(p: Path, sd: dict, own: dict) -> None:
    """The checkpoint's keys and shapes against the model's, every difference named in one line."""
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and isinstance(sd[k], torch.Tensor) and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt_keys(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatch: {_fmt_keys(mismatched, 3)}")
        raise SmcpError(
            f"checkpoint {p} does not match the model ({'; '.join(parts)}); check the model source, "
            f"its kwargs and num_classes"
        )


def load_checkpoint(model: nn.Module, path: str | Path, *, trust: bool = False) -> dict:
    """Load a checkpoint into ``model`` strictly and return its metadata (e.g. ``best_prec1``).

    Accepts a plain state dict, ``{'state_dict': ...}`` or ``{'model': ...}``; a leading ``module.``
    (from ``DataParallel``) is stripped.  Loads with ``weights_only=True`` unless ``trust``.
    """
    p = _checked_checkpoint_file(path)
    sd, meta = _extract_state_dict(_torch_load(p, trust), p)
    sd = _strip_module(sd)
    own = model.state_dict()
    _check_keys_and_shapes(p, sd, own)
    _check_finite(p, sd, own)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise SmcpError(f"checkpoint {p}: load_state_dict failed ({_one_line(exc)})") from None
    return meta


_CKPT_EXTS = (".pt", ".pth", ".th", ".tar", ".ckpt", ".bin")


def _truncated_zip(p: Path) -> bool:
    """A file that starts like a zip archive (torch.save's format) but has no end record."""
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" and not zipfile.is_zipfile(p)


def _check_finite(p: Path, sd: dict, own: dict) -> None:
    """Weights and batch-norm statistics must be finite: NaN/Inf in a checkpoint (a diverged run)
    would otherwise surface much later as a NaN loss or a 0 % accuracy."""
    for k, v in sd.items():
        if k in own and isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
            bad = ~torch.isfinite(v)
            if bad.any():
                n = int(bad.sum())
                kinds = "/".join(w for w, hit in (("NaN", bool(torch.isnan(v).any())),
                                                 ("Inf", bool(torch.isinf(v).any()))) if hit)
                raise SmcpError(f"checkpoint {p}: {k} holds {kinds} values ({n} of {v.numel()}); the "
                                "checkpoint is broken (saved from a diverged run?): use an earlier one")
