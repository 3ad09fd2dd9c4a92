"""Latency lookup tables: the measured cost model used by SMCP's cost-constrained pruning.

A :class:`LatencyTable` maps each layer signature (:meth:`LayerSig.key`, i.e. everything but the
channel counts) to latencies in milliseconds measured on a grid of channel counts:

* ``groups=1`` conv and linear layers: a 2-D grid ``cin' x cout'`` with ``cin' in grid(cin)`` and
  ``cout' in grid(cout)``;
* depthwise convs: a 1-D grid ``c' in grid(cin)`` (``cin' == cout' == groups == c'``);

where ``grid(c)`` is :func:`channel_grid` ``(c, step)``: the multiples of ``step`` up to ``c`` plus
``c`` itself, thinned to at most :data:`MAX_GRID_POINTS` widths (evenly spread multiples of ``step``)
for wide layers, and just ``{c}`` when ``c <= step``.  Several layers may share one key (same
kernel/stride/padding/dilation/input size/bias, different widths); the key's grid is then the union of
their grids, so every full width is an exact grid point.

Queries (:meth:`LatencyTable.latency`, :meth:`LatencyTable.latency_many`) are exact on grid points and
bilinear (1-D: linear) between grid neighbours.  A width of 0 (a removed layer) costs 0.  A width
between 0 and the smallest grid point costs the smallest grid point's latency (constant
extrapolation, never an underestimate of the fixed overhead).  A layer missing from the table, or a
width above the largest measured one, raises :class:`MissingEntry` -- a missing layer never silently
costs 0.

Tables are measured by :func:`measure_table` and stored as JSON (:meth:`LatencyTable.save`,
:meth:`LatencyTable.load`).
"""

from __future__ import annotations

import bisect
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smcp_core.errors import SmcpError
from smcp_core.graph.signature import LayerSig
from smcp_core.profile.fingerprint import describe_fingerprint
from smcp_core.profile.timing import canonical_dtype
from smcp_core.utils.fsutil import atomic_write_json, read_json

if TYPE_CHECKING:  # pragma: no cover
    import torch


SCHEMA_VERSION = 1


_FORMAT = "smcp-latency-table"


MEASURABLE_BACKENDS = ("onnxruntime", "torch")


_LAYOUTS = {"nchw": "nchw", "nhwc": "nhwc", "channels_last": "nhwc", "channels_first": "nchw"}


class MissingEntry(SmcpError):
    """A latency query the table cannot answer (layer not measured, or width out of range)."""


class TableBudgetExceeded(SmcpError):
    """:func:`measure_table` ran out of its time budget.

    ``partial`` is the table measured so far (``meta["complete"] is False``; its unfinished entries
    raise :class:`MissingEntry` on lookup).  Save it and/or pass it as ``existing=`` to a later
    :func:`measure_table` call to resume: measured points are reused.
    """

    def __init__(self, message: str, partial: LatencyTable, done: int, total: int):
        super().__init__(message)
        self.partial = partial
        self.done = done
        self.total = total


MAX_GRID_POINTS = 32
"""Default cap on the distinct widths of one layer's grid along one axis (:func:`channel_grid`)."""


def channel_grid(c: int, step: int, max_points: int | None = MAX_GRID_POINTS) -> list[int]:
    """The widths a layer of full width ``c`` is measured at, for channel step ``step``.

    * ``c <= step``: ``[c]`` (the layer is measured at its full width only; a narrower width costs
      the full width's latency, never an underestimate);
    * otherwise ``{step, 2*step, ...} ∪ {c}`` (values ``<= c``), that is ``ceil(c / step)`` widths;
    * when that is more than ``max_points`` (a wide layer; ``None``: no cap), ``max_points`` widths:
      ``c`` and the ``max_points - 1`` multiples of ``step`` nearest to ``i * c / max_points``
      (``i = 1 .. max_points - 1``), i.e. the step grows to about ``c / max_points`` for that layer,
      rounded to the nearest multiple of ``step`` point by point.

    So a layer has ``1`` width when ``c <= step`` and ``min(ceil(c / step), max_points)`` otherwise:
    never more than ``max_points``, never more for a larger ``step`` (or a smaller ``max_points``),
    and every width but ``c`` is a multiple of ``step``.  E.g. ``channel_grid(2048, 4)`` has 32
    widths ``64, 128, ..., 2048``; ``channel_grid(20, 8) == [8, 16, 20]``; ``channel_grid(5, 8) == [5]``.
    (That holds per layer: a key shared by layers of several widths is measured on the union of their
    grids, which for a step that does not divide those widths can hold a few more points, e.g.
    ResNet-50 at 224: 6,310 points at step 32, 6,533 at step 33; along steps that are powers of two
    its total only falls: 22,736 at step 4, 2,714 at 64, 685 at 128, 183 at 256.)
    """
    c, step = int(c), int(step)
    if c < 1:
        raise ValueError(f"channel count must be >= 1, got {c}")
    if step < 1:
        raise ValueError(f"channel step must be >= 1, got {step}")
    if max_points is not None and int(max_points) < 1:
        raise ValueError(f"max grid points must be >= 1, got {max_points}")
    if c <= step:
        return [c]
    n = -(-c // step)  # widths of the plain grid: the multiples of step below c, and c
    if max_points is None or n <= int(max_points):
        g = list(range(step, c + 1, step))
        if g[-1] != c:
            g.append(c)
        return g
    m = int(max_points)
    # c > step * m here, so the multiples round(i * c / (step * m)) * step are distinct, >= step, < c
    return [step * ((2 * i * c + step * m) // (2 * step * m)) for i in range(1, m)] + [c]


def params(sig: LayerSig, cin: Any = None, cout: Any = None) -> Any:
    """Number of parameters (weights + bias) of the layer at widths ``cin``/``cout``.

    Defaults to the full widths.  Works on ints as well as on tensors/arrays of widths.  For a
    depthwise conv the width is ``cin`` (``cout`` must equal it).
    """
    cin = sig.cin if cin is None else cin
    cout = sig.cout if cout is None else cout
    b = 1 if sig.bias else 0
    if sig.kind == "linear":
        return cin * cout + b * cout
    kk = sig.kernel[0] * sig.kernel[1]
    if sig.depthwise:  # depthwise (group_size 1) or grouped: group_size weights per output channel
        return cin * kk * sig.group_size + b * cin
    return cout * cin * kk + b * cout


def _canonical_layout(layout: str) -> str:
    try:
        return _LAYOUTS[str(layout).lower()]
    except KeyError:
        raise SmcpError(f"unknown layout {layout!r}: use nchw or nhwc (channels_last)") from None


def _device_type(device: Any) -> str:
    d = str(device)
    return d.split(":", 1)[0]


class _Entry:
    """Grid and values of one layer key.  ``cout_grid is None`` for depthwise (1-D) entries."""

    __slots__ = ("key", "sig", "cin_grid", "cout_grid", "values", "_compiled")

    def __init__(
        self,
        key: str,
        sig: LayerSig,
        cin_grid: list[int],
        cout_grid: list[int] | None,
        values: list | None = None,
    ):
        self.key = key
        self.sig = sig
        self.cin_grid = [int(c) for c in cin_grid]
        self.cout_grid = None if cout_grid is None else [int(c) for c in cout_grid]
        if values is None:
            values = (
                [None] * len(self.cin_grid)
                if self.cout_grid is None
                else [[None] * len(self.cout_grid) for _ in self.cin_grid]
            )
        self.values = values
        self._compiled = None

    @property
    def depthwise(self) -> bool:
        return self.cout_grid is None

    def n_points(self) -> int:
        return len(self.cin_grid) * (1 if self.cout_grid is None else len(self.cout_grid))

    def n_measured(self) -> int:
        if self.cout_grid is None:
            return sum(v is not None for v in self.values)
        return sum(v is not None for row in self.values for v in row)

    @property
    def complete(self) -> bool:
        return self.n_measured() == self.n_points()

    def points(self) -> list[tuple[int, int, float | None]]:
        """``(cin, cout, ms)`` for every grid point (``cout == cin`` for depthwise entries)."""
        if self.cout_grid is None:
            return [(c, c, v) for c, v in zip(self.cin_grid, self.values)]
        return [
            (ci, co, self.values[i][j])
            for i, ci in enumerate(self.cin_grid)
            for j, co in enumerate(self.cout_grid)
        ]

    def get(self, cin: int, cout: int) -> float | None:
        """The stored value at an exact grid point, or None (not a grid point / not measured)."""
        try:
            i = self.cin_grid.index(cin)
            if self.cout_grid is None:
                return self.values[i]
            j = self.cout_grid.index(cout)
        except ValueError:
            return None
        return self.values[i][j]

    def set(self, cin: int, cout: int, ms: float) -> None:
        i = self.cin_grid.index(cin)
        if self.cout_grid is None:
            self.values[i] = float(ms)
        else:
            self.values[i][self.cout_grid.index(cout)] = float(ms)
        self._compiled = None

    # ---- lookup structures ----------------------------------------------------------------------

    def compiled(self) -> dict:
        """Padded python lists (scalar path) and float64 tensors (vectorised path).

        An axis with a single grid point is padded with a copy at ``g + 1`` so that every axis has
        at least two points; queries above the real last point are rejected before interpolation.
        """
        if self._compiled is not None:
            return self._compiled
        import torch

        gi = [float(c) for c in self.cin_grid]
        vals = self.values
        if self.cout_grid is None:
            v = [float(x) for x in vals]
            if len(gi) == 1:
                gi, v = gi + [gi[0] + 1.0], v + v
            comp = {
                "gi": gi,
                "v": v,
                "gi_t": _axis_lookup(gi),
                "v_t": torch.tensor(v, dtype=torch.float64),
            }
        else:
            go = [float(c) for c in self.cout_grid]
            v2 = [[float(x) for x in row] for row in vals]
            if len(gi) == 1:
                gi, v2 = gi + [gi[0] + 1.0], v2 + [list(v2[0])]
            if len(go) == 1:
                go, v2 = go + [go[0] + 1.0], [row + row for row in v2]
            comp = {
                "gi": gi,
                "go": go,
                "v": v2,
                "gi_t": _axis_lookup(gi),
                "go_t": _axis_lookup(go),
                "v_t": torch.tensor(v2, dtype=torch.float64),
            }
        comp["cin_max"] = float(self.cin_grid[-1])
        comp["cout_max"] = None if self.cout_grid is None else float(self.cout_grid[-1])
        self._compiled = comp
        return comp

    # ---- (de)serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "sig": self.sig.to_dict(),
            "depthwise": self.depthwise,
            "cin_grid": list(self.cin_grid),
            "cout_grid": None if self.cout_grid is None else list(self.cout_grid),
            "ms": self.values if self.cout_grid is None else [list(r) for r in self.values],
        }

    @classmethod
    def from_dict(cls, key: str, d: dict) -> _Entry:
        sig = LayerSig.from_dict(d["sig"])
        cin_grid = [int(c) for c in d["cin_grid"]]
        cout_grid = None if d.get("cout_grid") is None else [int(c) for c in d["cout_grid"]]
        ms = d["ms"]
        for name, grid in (("cin_grid", cin_grid), ("cout_grid", cout_grid)):
            if grid is None:
                continue
            if not grid or any(c < 1 for c in grid) or any(a >= b for a, b in zip(grid, grid[1:])):
                raise ValueError(f"entry {key}: {name} must be strictly increasing positive integers")
        if bool(d.get("depthwise", False)) != (cout_grid is None):
            raise ValueError(f"entry {key}: depthwise entries have no cout_grid, others need one")

        def val(x):
            if x is None:
                return None
            x = float(x)
            if not math.isfinite(x) or x < 0:
                raise ValueError(f"entry {key}: latency {x} is not a finite non-negative number")
            return x

        if cout_grid is None:
            if not isinstance(ms, list) or len(ms) != len(cin_grid):
                raise ValueError(f"entry {key}: ms must be a list of {len(cin_grid)} values")
            values: list = [val(x) for x in ms]
        else:
            if (
                not isinstance(ms, list)
                or len(ms) != len(cin_grid)
                or any(not isinstance(r, list) or len(r) != len(cout_grid) for r in ms)
            ):
                raise ValueError(f"entry {key}: ms must be a {len(cin_grid)}x{len(cout_grid)} list of lists")
            values = [[val(x) for x in r] for r in ms]
        if sig.key() != key:
            raise ValueError(f"entry {key}: its sig has key {sig.key()}")
        return cls(key, sig, cin_grid, cout_grid, values)


def _axis_py(grid: list[float], c: float) -> tuple[int, float]:
    """Left neighbour index and fraction for ``c`` in ``grid`` (len >= 2), clamped to the grid."""
    c = max(c, grid[0])
    i = bisect.bisect_right(grid, c) - 1
    i = min(max(i, 0), len(grid) - 2)
    g0, g1 = grid[i], grid[i + 1]
    return i, (c - g0) / (g1 - g0)


def _axis_lookup(grid: list[float]):
    """Tensors for :func:`_axis_t`: grid, gaps to the next point, and a left-neighbour index table.

    ``left[c]`` for every integer ``0 <= c <= grid[-1]`` is the index of the largest grid point
    ``<= c`` (clamped to ``[0, len(grid) - 2]``).  Grid points are integers, so the left neighbour of
    a fractional width ``c`` is ``left[floor(c)]``: one gather instead of a binary search
    (``torch.searchsorted`` can be very slow on small inputs on some CPUs).
    """
    import torch

    n = len(grid)
    top = int(grid[-1])
    left = [min(max(bisect.bisect_right(grid, float(c)) - 1, 0), n - 2) for c in range(top + 1)]
    g = torch.tensor(grid, dtype=torch.float64)
    return g, g[1:] - g[:-1], torch.tensor(left, dtype=torch.long)


def _axis_t(lookup, c: torch.Tensor, cmin: float):
    """Left neighbour indices and fractions of ``c`` (already checked ``<=`` the last real point)."""
    g, gap, left = lookup
    cc = c.clamp(min=cmin)
    i = left[cc.long()]
    return i, (cc - g[i]) / gap[i]


def _interp_t(e: _Entry, comp: dict, cin_t: torch.Tensor, cout_t: torch.Tensor) -> torch.Tensor:
    """Interpolated latencies for float64 width tensors of equal shape (range already checked)."""
    zero = (cin_t == 0) | (cout_t == 0)
    i, ti = _axis_t(comp["gi_t"], cin_t, comp["gi"][0])
    v = comp["v_t"]
    if e.cout_grid is None:
        out = v[i] * (1.0 - ti) + v[i + 1] * ti
    else:
        j, tj = _axis_t(comp["go_t"], cout_t, comp["go"][0])
        lo = v[i, j] * (1.0 - ti) + v[i + 1, j] * ti
        hi = v[i, j + 1] * (1.0 - ti) + v[i + 1, j + 1] * ti
        out = lo * (1.0 - tj) + hi * tj
    return out.masked_fill(zero, 0.0)


_DENSE_MAX = 1 << 22  # entries (32 MiB of float64) per layer key; larger keys interpolate per query


def _dense_lut(e: _Entry, comp: dict):
    """Latency of every integer width (pair), flattened row-major; None when it would be too big."""
    if "dense" in comp:
        return comp["dense"]
    import torch

    n_in = int(comp["cin_max"]) + 1
    if e.cout_grid is None:
        c = torch.arange(n_in, dtype=torch.float64)
        dense = _interp_t(e, comp, c, torch.ones_like(c))
    else:
        n_out = int(comp["cout_max"]) + 1
        if n_in * n_out > _DENSE_MAX:
            dense = None
        else:
            ci, co = torch.meshgrid(
                torch.arange(n_in, dtype=torch.float64), torch.arange(n_out, dtype=torch.float64), indexing="ij"
            )
            dense = _interp_t(e, comp, ci.reshape(-1), co.reshape(-1))
    comp["dense"] = dense
    return dense


class LatencyTable:
    """Measured per-layer latencies (ms) on channel grids, plus the measuring setup.

    ``meta``: backend, device, batch_size, dtype, layout, threads, channel_step, fingerprint,
    fingerprint_id, created, smcp_version, complete, measure (timing settings and counts).
    ``model``: free-form section owned by the caller (whole-model measured latency, calibration).
    ``path``: where it was loaded from / last saved to (used in error messages), or None.
    """

    def __init__(self, meta: dict | None = None, entries: dict[str, _Entry] | None = None, model: dict | None = None):
        self.meta: dict = dict(meta or {})
        self.entries: dict[str, _Entry] = dict(entries or {})
        self.model: dict = dict(model or {})
        self.path: Path | None = None
        self._sig_cache: dict[LayerSig, _Entry] = {}

    # ---- metadata shortcuts -----------------------------------------------------------------------

    @property
    def backend(self) -> str | None:
        return self.meta.get("backend")

    @property
    def device(self) -> str | None:
        return self.meta.get("device")

    @property
    def batch_size(self) -> int | None:
        return self.meta.get("batch_size")

    @property
    def dtype(self) -> str | None:
        return self.meta.get("dtype")

    @property
    def layout(self) -> str | None:
        return self.meta.get("layout")

    @property
    def threads(self) -> int | None:
        return self.meta.get("threads")

    @property
    def channel_step(self) -> int | None:
        return self.meta.get("channel_step")

    @property
    def fingerprint(self) -> dict:
        return self.meta.get("fingerprint") or {}

    @property
    def fingerprint_id(self) -> str | None:
        return self.meta.get("fingerprint_id")

    @property
    def complete(self) -> bool:
        return all(e.complete for e in self.entries.values())

    # ---- containers -------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, item: LayerSig | str) -> bool:
        key = item.key() if isinstance(item, LayerSig) else item
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def grid(self, item: LayerSig | str) -> tuple[list[int], list[int] | None]:
        """``(cin_grid, cout_grid)`` of a key (``cout_grid`` None for depthwise)."""
        e = self._entry_for_key(item.key() if isinstance(item, LayerSig) else item)
        return list(e.cin_grid), None if e.cout_grid is None else list(e.cout_grid)

    def points(self, item: LayerSig | str) -> list[tuple[int, int, float | None]]:
        """Every grid point ``(cin, cout, ms)`` of a key (ms None where not measured)."""
        return self._entry_for_key(item.key() if isinstance(item, LayerSig) else item).points()

    def _where(self) -> str:
        return f" {self.path}" if self.path is not None else ""

    def _entry_for_key(self, key: str) -> _Entry:
        e = self.entries.get(key)
        if e is None:
            raise MissingEntry(
                f"latency table{self._where()} has no entry for layer {key}: "
                "re-run `smcp profile` for this model"
            )
        return e

    def _entry(self, sig: LayerSig) -> _Entry:
        e = self._sig_cache.get(sig)
        if e is not None:
            return e
        e = self._entry_for_key(sig.key())
        if not e.complete:
            raise MissingEntry(
                f"latency table{self._where()} is incomplete for layer {e.key} "
                f"({e.n_measured()} of {e.n_points()} points measured): re-run `smcp profile` to finish it"
            )
        if sig.depthwise != e.depthwise:  # pragma: no cover - the key encodes depthwise
            raise MissingEntry(f"latency table{self._where()}: layer {e.key} depthwise mismatch")
        self._sig_cache[sig] = e
        return e

    def _out_of_range(self, e: _Entry, what: str, value: float, limit: float) -> MissingEntry:
        return MissingEntry(
            f"latency table{self._where()} covers layer {e.key} only up to {what}={int(limit)}, "
            f"but {what}={value:g} was asked: re-run `smcp profile` for this model"
        )

    # ---- lookups ----------------------------------------------------------------------------------

    def latency(self, sig: LayerSig, cin: float, cout: float) -> float:
        """Latency (ms) of ``sig`` at widths ``cin``/``cout``; 0.0 when either is 0.

        Depthwise layers use ``cin`` as their width.  Raises :class:`MissingEntry` for an unknown
        layer or a width above the measured range.
        """
        cin = float(cin)
        cout = float(cout)
        if cin < 0 or cout < 0:
            raise ValueError(f"channel counts must be >= 0, got cin={cin}, cout={cout}")
        e = self._entry(sig)
        if cin == 0 or cout == 0:
            return 0.0
        comp = e.compiled()
        if cin > comp["cin_max"]:
            raise self._out_of_range(e, "cin", cin, comp["cin_max"])
        i, ti = _axis_py(comp["gi"], cin)
        v = comp["v"]
        if e.cout_grid is None:
            return v[i] * (1.0 - ti) + v[i + 1] * ti
        if cout > comp["cout_max"]:
            raise self._out_of_range(e, "cout", cout, comp["cout_max"])
        j, tj = _axis_py(comp["go"], cout)
        lo = v[i][j] * (1.0 - ti) + v[i + 1][j] * ti
        hi = v[i][j + 1] * (1.0 - ti) + v[i + 1][j + 1] * ti
        return lo * (1.0 - tj) + hi * tj

    def latency_many(self, sig: LayerSig, cin: Any, cout: Any) -> torch.Tensor:
        """Vectorised :meth:`latency`: float64 tensor of the broadcast shape of ``cin`` and ``cout``.

        ``cin``/``cout`` may be tensors, arrays, lists or numbers.  Integer inputs are answered from a
        dense per-layer table of every integer width pair (built on first use; one gather per
        query); floating inputs are interpolated (fractional widths allowed, differentiable between
        grid points).  Both give the same values as :meth:`latency`.
        """
        import torch

        e = self._entry(sig)
        comp = e.compiled()
        cin_t = torch.as_tensor(cin)
        cout_t = torch.as_tensor(cout)
        if cin_t.shape != cout_t.shape:
            cin_t, cout_t = torch.broadcast_tensors(cin_t, cout_t)
        if cin_t.numel() == 0:
            return torch.zeros(cin_t.shape, dtype=torch.float64)
        lo_i, hi_i = torch.aminmax(cin_t)
        lo_o, hi_o = torch.aminmax(cout_t)
        if float(lo_i) < 0 or float(lo_o) < 0:
            raise ValueError("channel counts must be >= 0")
        if float(hi_i) > comp["cin_max"]:
            raise self._out_of_range(e, "cin", float(hi_i), comp["cin_max"])
        if e.cout_grid is not None and float(hi_o) > comp["cout_max"]:
            raise self._out_of_range(e, "cout", float(hi_o), comp["cout_max"])
        if not cin_t.is_floating_point() and not cout_t.is_floating_point():
            dense = _dense_lut(e, comp)
            if dense is not None:
                if e.cout_grid is None:
                    return dense[cin_t.long()].masked_fill(cout_t == 0, 0.0)
                return dense[cin_t.long() * (int(comp["cout_max"]) + 1) + cout_t.long()]
        return _interp_t(e, comp, cin_t.to(torch.float64), cout_t.to(torch.float64))

    def latency_full(self, sig: LayerSig) -> float:
        """Latency of the unpruned layer (its full widths)."""
        return self.latency(sig, sig.cin, sig.cout)

    # ---- compatibility ----------------------------------------------------------------------------

    def describe(self) -> str:
        """``"<machine> with <backend> <device> batch <b> <dtype> <layout>"``."""

        machine = describe_fingerprint(self.fingerprint) if self.fingerprint else "an unknown machine"
        return (
            f"{machine} with {self.backend} {self.device} batch {self.batch_size} "
            f"{self.dtype} {self.layout}"
        )

    def check_compatible(
        self,
        backend: str,
        device: str,
        batch_size: int,
        dtype: str,
        layout: str,
        fingerprint_id: str | None,
        force: bool = False,
        *,
        fingerprint: dict | None = None,
    ) -> list[str]:
        """Check that this table was measured for the setup a run targets.

        Compares backend, device type, batch size, dtype, layout and the machine fingerprint id.
        Returns the list of mismatches (empty when compatible).  With mismatches and ``force=False``
        raises :class:`SmcpError` explaining them; with ``force=True`` returns them so the caller can
        warn.  ``fingerprint`` (the target's full fingerprint) only improves the message.
        """

        problems: list[str] = []
        if self.backend != backend:
            problems.append(f"backend {self.backend} vs {backend}")
        if _device_type(self.device) != _device_type(device):
            problems.append(f"device {self.device} vs {device}")
        if self.batch_size != int(batch_size):
            problems.append(f"batch {self.batch_size} vs {batch_size}")
        if self.dtype != canonical_dtype(dtype):
            problems.append(f"dtype {self.dtype} vs {canonical_dtype(dtype)}")
        if self.layout != _canonical_layout(layout):
            problems.append(f"layout {self.layout} vs {_canonical_layout(layout)}")
        if fingerprint_id is not None and self.fingerprint_id != fingerprint_id:
            problems.append(f"machine/software fingerprint {self.fingerprint_id} vs {fingerprint_id}")
        if problems and not force:
            target_machine = (
                describe_fingerprint(fingerprint) if fingerprint else f"machine fingerprint {fingerprint_id}"
            )
            where = str(self.path) if self.path is not None else "(in memory)"
            raise SmcpError(
                f"latency table {where} was measured on {self.describe()}, but this run targets "
                f"{target_machine} with {backend} {device} batch {batch_size} {canonical_dtype(dtype)} "
                f"{_canonical_layout(layout)} ({'; '.join(problems)}); re-run smcp profile or pass --force-table"
            )
        return problems

    # ---- (de)serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        meta = dict(self.meta)
        meta["complete"] = self.complete
        return {
            "format": _FORMAT,
            "schema_version": SCHEMA_VERSION,
            "meta": meta,
            "model": self.model,
            "entries": {k: e.to_dict() for k, e in self.entries.items()},
        }

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "latency table") -> LatencyTable:
        """Build from :meth:`to_dict` output; malformed input raises :class:`SmcpError`."""
        try:
            if not isinstance(d, dict):
                raise ValueError("top level is not an object")
            if d.get("format") != _FORMAT:
                raise ValueError(f"not an smcp latency table (format {d.get('format')!r})")
            ver = d.get("schema_version")
            if not isinstance(ver, int):
                raise ValueError("schema_version missing")
            if ver > SCHEMA_VERSION:
                raise SmcpError(
                    f"{source} has schema version {ver}, newer than this smcp supports ({SCHEMA_VERSION}): "
                    "upgrade smcp or re-run smcp profile"
                )
            if ver < 1:
                raise ValueError(f"bad schema_version {ver}")
            meta = d.get("meta")
            if not isinstance(meta, dict):
                raise ValueError("meta missing")
            model = d.get("model") or {}
            if not isinstance(model, dict):
                raise ValueError("model section is not an object")
            raw = d.get("entries")
            if not isinstance(raw, dict):
                raise ValueError("entries missing")
            entries = {k: _Entry.from_dict(k, v) for k, v in raw.items()}
        except SmcpError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise SmcpError(f"{source} is malformed ({msg}): re-run smcp profile") from e
        return cls(meta=meta, entries=entries, model=model)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as JSON; remembers ``path``."""

        path = Path(path)
        atomic_write_json(path, self.to_dict(), indent=1)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        """Read a table written by :meth:`save`; missing/corrupt files raise :class:`SmcpError`."""

        path = Path(path)
        d = read_json(path, "latency table")
        t = cls.from_dict(d, source=f"latency table {path}")
        t.path = path
        return t

    def __repr__(self) -> str:
        return (
            f"LatencyTable({len(self.entries)} layers, {self.backend} {self.device} batch {self.batch_size} "
            f"{self.dtype} {self.layout}, fingerprint {self.fingerprint_id})"
        )
