"""Timing loops, fingerprints and latency tables.  No assertion here depends on measured speed."""

from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import pytest
import torch

from smcp_core.errors import SmcpError
from smcp_core.graph.signature import LayerSig
from smcp_core.profile import fingerprint as profile_fingerprint
from smcp_core.profile import measure as profile_measure
from smcp_core.profile import table as profile_table
from smcp_core.profile import timing
from smcp_core.profile.measure import measure_table
from smcp_core.profile.table import (
    LatencyTable,
    MissingEntry,
    TableBudgetExceeded,
    channel_grid,
)

# ---------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------


def _recorder():
    calls: list[str] = []

    def make(name):
        def fn():
            calls.append(name)

        return fn

    return calls, make


def test_time_interleaved_alternates_and_stops_at_max_runs():
    calls, make = _recorder()
    res = timing.time_interleaved(
        {"a": make("a"), "b": make("b")}, warmup=3, min_runs=5, max_runs=12, max_seconds=30, rel_tol=0.0
    )
    assert set(res) == {"a", "b"}
    # warm-up rounds and timed rounds are all round-robin
    assert calls == ["a", "b"] * (3 + 12)
    for st in res.values():
        assert isinstance(st, timing.Stats)
        assert st.n == 12
        assert 0 <= st.min_ms <= st.p10_ms <= st.median_ms <= st.p90_ms
        assert st.stable is False  # rel_tol=0 can only be met by identical medians... not with real clocks


def test_time_interleaved_stops_at_max_seconds():
    def slow():
        time.sleep(0.01)

    t0 = time.perf_counter()
    st = timing.time_one(slow, warmup=1, min_runs=1000, max_runs=10**6, max_seconds=0.15, rel_tol=0.0)
    assert time.perf_counter() - t0 < 30.0  # generous: this VM stalls for seconds at times
    assert 1 <= st.n < 100
    # max_seconds is a hard cap even before min_runs; every fn still gets one timed run
    st = timing.time_one(slow, warmup=0, min_runs=10, max_seconds=0.0)
    assert st.n == 1


def test_time_interleaved_stops_when_stable(monkeypatch):
    # a fake clock advancing exactly 1 ms per reading: every call "takes" 1 ms, medians are stable
    ticks = {"t": 0.0}

    def fake_clock():
        ticks["t"] += 0.001
        return ticks["t"]

    monkeypatch.setattr(timing.time, "perf_counter", fake_clock)
    calls, make = _recorder()
    res = timing.time_interleaved({"a": make("a"), "b": make("b")}, warmup=0, min_runs=8, max_runs=1000)
    assert res["a"].n == 8 and res["b"].n == 8
    assert res["a"].stable and res["b"].stable
    assert res["a"].median_ms == pytest.approx(1.0)


def test_time_one_calls_sync_after_each_call():
    order: list[str] = []
    st = timing.time_one(lambda: order.append("f"), warmup=2, min_runs=4, max_runs=4, sync=lambda: order.append("s"))
    assert st.n == 4
    timed = order[2 * 2 :]  # warm-up: f, s per round
    assert timed == ["s", "f", "s"] * 4
    d = st.to_dict()
    assert set(d) >= {"median_ms", "p10_ms", "p90_ms", "min_ms", "n"}


def test_stats_percentiles_match_numpy():
    xs = [0.003, 0.001, 0.002, 0.010, 0.004, 0.005]
    st = timing.Stats.from_samples(xs)
    ms = np.array(xs) * 1e3
    assert st.median_ms == pytest.approx(np.median(ms))
    assert st.p10_ms == pytest.approx(np.percentile(ms, 10))
    assert st.p90_ms == pytest.approx(np.percentile(ms, 90))
    assert st.min_ms == pytest.approx(1.0)
    assert st.n == 6


def test_runners_run():
    m = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    out = timing.torch_runner(m, x, channels_last=True)()
    assert out.shape == (1, 4, 6, 6)
    model = profile_measure.single_layer_onnx(LayerSig("conv", 3, 4, kernel=(3, 3), in_hw=(8, 8)), 3, 4)
    sess = timing.ort_session(model, threads=1)
    res = timing.ort_runner(sess, x)()
    assert res[0].shape == (1, 4, 6, 6)


def test_fingerprint_is_stable_and_host_free():
    import socket

    fp = profile_fingerprint.device_fingerprint("onnxruntime", "cpu", 2)
    assert fp["cpu_model"] and fp["cpu_count"] >= 1
    assert fp["onnxruntime_version"] and fp["torch_version"] == torch.__version__
    assert fp["threads"] == 2
    host = socket.gethostname()
    if len(host) > 3:
        assert host not in json.dumps(fp)
    fid = profile_fingerprint.fingerprint_id(fp)
    assert re.fullmatch(r"[0-9a-f]{12}", fid)
    assert fid == profile_fingerprint.fingerprint_id(profile_fingerprint.device_fingerprint("onnxruntime", "cpu", 2))
    assert fid != profile_fingerprint.fingerprint_id(profile_fingerprint.device_fingerprint("onnxruntime", "cpu", 1))
    assert fid != profile_fingerprint.fingerprint_id(profile_fingerprint.device_fingerprint("torch", "cpu", 2))
    # non-stable fields (python version) do not change the id
    assert fid == profile_fingerprint.fingerprint_id({**fp, "python": "0.0"})


def test_environment_report():
    rep = profile_fingerprint.environment_report(
        backend="onnxruntime", device="cpu", threads=1, batch_size=4, precision="fp32", input_shape=(4, 3, 32, 32)
    )
    assert profile_fingerprint.environment_report(backend="tensorrt", precision="int8")["precision"] == "int8"
    assert rep["batch_size"] == 4 and rep["precision"] == "float32" and rep["input_shape"] == [4, 3, 32, 32]
    assert rep["libraries"]["torch"] and rep["libraries"]["onnxruntime"]
    assert rep["fingerprint_id"] == profile_fingerprint.fingerprint_id(rep["fingerprint"])
    json.dumps(rep)


def test_onnxruntime_missing_or_doubled(monkeypatch):
    monkeypatch.setattr(timing, "_ORT_MODULE", None)
    monkeypatch.setattr(timing, "_installed", lambda dist: True)
    with pytest.raises(SmcpError, match="overwrite each other"):
        timing.ensure_onnxruntime()
    monkeypatch.setattr(timing, "_installed", lambda dist: dist == "onnxruntime")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(SmcpError, match=r"onnxruntime is not installed: pip install 'smcp\[cpu\]'"):
        timing.ensure_onnxruntime()
    with pytest.raises(SmcpError, match="onnxruntime is not installed"):
        timing.ort_session(b"")


# ---------------------------------------------------------------------------------------------------
# grids and params
# ---------------------------------------------------------------------------------------------------


def test_channel_grid():
    assert channel_grid(16, 8) == [8, 16]
    assert channel_grid(20, 8) == [8, 16, 20]
    assert channel_grid(5, 8) == [5]  # narrower than the step: its full width only (never a dense grid)
    assert channel_grid(8, 8) == [8]
    assert channel_grid(1, 8) == [1]


@pytest.mark.parametrize(
    "sig",
    [
        LayerSig("conv", 16, 24, kernel=(3, 3), padding=(1, 1), in_hw=(8, 8)),
        LayerSig("conv", 16, 16, kernel=(3, 3), depthwise=True, in_hw=(8, 8), bias=True),
        LayerSig("linear", 64, 10, bias=True),
    ],
)
def test_params_match_torch(sig):
    m = profile_measure.single_layer_module(sig, 12, 7)
    assert profile_table.params(sig, 12, 7) == sum(p.numel() for p in m.parameters())
    full = profile_measure.single_layer_module(sig, sig.cin, sig.cout)
    assert profile_table.params(sig) == sum(p.numel() for p in full.parameters())


def test_single_layer_onnx_matches_torch_shapes():
    sig = LayerSig("conv", 8, 8, kernel=(3, 3), stride=(2, 2), padding=(1, 1), in_hw=(9, 9), bias=True)
    sess = timing.ort_session(profile_measure.single_layer_onnx(sig, 5, 6, batch_size=2))
    x = np.random.default_rng(0).standard_normal((2, 5, 9, 9)).astype(np.float32)
    out = sess.run(None, {"input": x})[0]
    ref = profile_measure.single_layer_module(sig, 5, 6)(torch.from_numpy(x))
    assert out.shape == tuple(ref.shape)


# ---------------------------------------------------------------------------------------------------
# latency tables
# ---------------------------------------------------------------------------------------------------

CONV = LayerSig("conv", 16, 16, kernel=(3, 3), padding=(1, 1), in_hw=(8, 8))
CONV_TWIN = LayerSig("conv", 16, 16, kernel=(3, 3), padding=(1, 1), in_hw=(8, 8))  # same key: measured once
CONV_WIDE = LayerSig("conv", 12, 20, kernel=(3, 3), padding=(1, 1), in_hw=(8, 8))  # same key, other widths
DW = LayerSig("conv", 16, 16, kernel=(3, 3), padding=(1, 1), in_hw=(8, 8), depthwise=True)
LIN = LayerSig("linear", 64, 10)
SIGS = [CONV, CONV_TWIN, CONV_WIDE, DW, LIN]

EXPECTED_GRIDS = {
    CONV.key(): ([8, 12, 16], [8, 16, 20]),
    DW.key(): ([8, 16], None),
    LIN.key(): ([8, 16, 24, 32, 40, 48, 56, 64], [8, 10]),
}
N_POINTS = 3 * 3 + 2 + 8 * 2
FAST = dict(warmup=2, min_runs=3, max_runs=6, point_max_seconds=2.0)


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def measured(request):
    backend = request.param
    calls: list[tuple] = []
    progress: list[tuple] = []
    real = profile_measure._measure_point

    def spy(sig, cin, cout, **kw):
        calls.append((sig.key(), cin, cout))
        return real(sig, cin, cout, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(profile_measure, "_measure_point", spy)
        t0 = time.perf_counter()
        table = measure_table(
            SIGS, backend=backend, channel_step=8, threads=1, progress=lambda *a: progress.append(a), **FAST
        )
        seconds = time.perf_counter() - t0
    return {"backend": backend, "table": table, "calls": calls, "progress": progress, "seconds": seconds}


def test_measure_table_covers_grid_once(measured):
    table, calls, progress = measured["table"], measured["calls"], measured["progress"]
    assert set(table.keys()) == set(EXPECTED_GRIDS)
    for key, (gi, go) in EXPECTED_GRIDS.items():
        assert table.grid(key) == (gi, go)
        pts = table.points(key)
        assert len(pts) == len(gi) * (1 if go is None else len(go))
        assert all(ms is not None and ms > 0 for _, _, ms in pts)
    # identical signatures measured once: one call per unique grid point
    assert len(calls) == N_POINTS == len(set(calls))
    assert [p[0] for p in progress] == list(range(1, N_POINTS + 1))
    assert all(p[1] == N_POINTS for p in progress)
    assert table.complete and table.meta["complete"]
    m = table.meta
    assert m["backend"] == measured["backend"] and m["batch_size"] == 1 and m["dtype"] == "float32"
    assert m["layout"] == "nchw" and m["channel_step"] == 8 and m["threads"] == 1
    assert m["fingerprint_id"] == profile_fingerprint.fingerprint_id(m["fingerprint"])
    assert m["measure"]["measured_points"] == N_POINTS


def test_lookup_exact_on_grid_and_interpolates(measured):
    t = measured["table"]
    for sig in (CONV, CONV_WIDE, DW, LIN):
        for ci, co, ms in t.points(sig):
            assert t.latency(sig, ci, co) == ms
            assert float(t.latency_many(sig, [ci], [co])[0]) == ms
    # 2-D: a point between grid neighbours lies within their range
    gi, go = t.grid(LIN)
    nb = [t.latency(LIN, a, b) for a in (16, 24) for b in (8, 10)]
    v = t.latency(LIN, 20, 9)
    assert min(nb) <= v <= max(nb)
    # 1-D depthwise
    v = t.latency(DW, 12, 12)
    assert min(t.latency(DW, 8, 8), t.latency(DW, 16, 16)) <= v <= max(t.latency(DW, 8, 8), t.latency(DW, 16, 16))
    # below the smallest grid point: the smallest grid point's latency
    assert t.latency(CONV, 3, 16) == t.latency(CONV, 8, 16)


def test_zero_width_costs_nothing(measured):
    t = measured["table"]
    assert t.latency(CONV, 0, 16) == 0.0
    assert t.latency(CONV, 16, 0) == 0.0
    assert t.latency(DW, 0, 0) == 0.0
    v = t.latency_many(CONV, torch.tensor([0, 16, 16]), torch.tensor([16, 0, 16]))
    assert v.dtype == torch.float64
    assert v[0] == 0 and v[1] == 0 and v[2] > 0


def test_latency_many_matches_scalar(measured):
    t = measured["table"]
    g = torch.Generator().manual_seed(0)
    for sig, hi_in, hi_out in ((CONV, 16, 20), (DW, 16, 16), (LIN, 64, 10)):
        ci = torch.randint(0, hi_in + 1, (256,), generator=g)
        co = ci.clone() if sig.depthwise else torch.randint(0, hi_out + 1, (256,), generator=g)
        vi = t.latency_many(sig, ci, co)  # integer path (dense lookup)
        vf = t.latency_many(sig, ci.double(), co.double())  # float path (interpolation)
        vs = torch.tensor([t.latency(sig, int(a), int(b)) for a, b in zip(ci, co)], dtype=torch.float64)
        assert vi.shape == (256,)
        assert torch.allclose(vi, vs, rtol=1e-12, atol=0) and torch.allclose(vf, vs, rtol=1e-12, atol=0)
    # fractional widths and numpy inputs
    assert float(t.latency_many(LIN, np.array([20.5]), np.array([9.5]))[0]) == pytest.approx(t.latency(LIN, 20.5, 9.5))
    # broadcasting
    assert t.latency_many(LIN, torch.tensor([8, 16, 24]), 10).shape == (3,)


def test_missing_entries_raise(measured):
    t = measured["table"]
    unknown = LayerSig("conv", 16, 16, kernel=(5, 5), padding=(2, 2), in_hw=(8, 8))
    for call in (
        lambda: t.latency(unknown, 8, 8),
        lambda: t.latency(unknown, 0, 8),  # never silently 0 for a missing layer
        lambda: t.latency_many(unknown, [8], [8]),
    ):
        with pytest.raises(MissingEntry, match=re.escape(unknown.key())) as ei:
            call()
        assert "smcp profile" in str(ei.value)
    with pytest.raises(MissingEntry, match="cin=16"):
        t.latency(CONV_WIDE, 17, 8)
    with pytest.raises(MissingEntry, match="cout=20"):
        t.latency_many(CONV, [8], [21])
    assert issubclass(MissingEntry, SmcpError)


def test_save_load_roundtrip(measured, tmp_path):
    t = measured["table"]
    t.model["latency_ms"] = 1.25  # the caller's section survives
    p = t.save(tmp_path / "runs" / "x" / "latency.json")
    assert not [f for f in p.parent.iterdir() if f.name != "latency.json"]  # no temp files left
    t2 = LatencyTable.load(p)
    assert t2.to_dict() == t.to_dict()
    assert t2.path == p and t2.model["latency_ms"] == 1.25
    for sig in (CONV, DW, LIN):
        assert t2.latency(sig, 12, 9 if sig is LIN else 12) == t.latency(sig, 12, 9 if sig is LIN else 12)
    d = json.loads(p.read_text())
    assert d["schema_version"] == profile_table.SCHEMA_VERSION


def test_check_compatible(measured, tmp_path):
    t = LatencyTable.load(measured["table"].save(tmp_path / "latency.json"))
    m = t.meta
    args = (m["backend"], "cpu", 1, "fp32", "nchw", m["fingerprint_id"])
    assert t.check_compatible(*args) == []
    with pytest.raises(SmcpError) as ei:
        t.check_compatible(m["backend"], "cpu", 1, "float32", "nchw", "0123456789ab")
    msg = str(ei.value)
    assert str(tmp_path / "latency.json") in msg and "--force-table" in msg and "smcp profile" in msg
    assert "\n" not in msg
    problems = t.check_compatible(m["backend"], "cpu", 8, "float16", "nhwc", "0123456789ab", force=True)
    assert len(problems) == 4
    with pytest.raises(SmcpError, match="batch 1 vs 4"):
        t.check_compatible(*args[:2], 4, *args[3:])


def test_corrupt_or_missing_table(tmp_path):
    p = tmp_path / "latency.json"
    with pytest.raises(SmcpError, match=re.escape(str(p))):
        LatencyTable.load(p)
    p.write_text('{"format": "smcp-latency-table", "schema_')
    with pytest.raises(SmcpError, match=re.escape(str(p))):
        LatencyTable.load(p)
    p.write_text(json.dumps({"format": "smcp-latency-table", "schema_version": 1, "meta": {}, "entries": {"x": {}}}))
    with pytest.raises(SmcpError, match="malformed"):
        LatencyTable.load(p)
    p.write_text(json.dumps({"format": "smcp-latency-table", "schema_version": 99, "meta": {}, "entries": {}}))
    with pytest.raises(SmcpError, match="newer"):
        LatencyTable.load(p)
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(SmcpError, match="malformed"):
        LatencyTable.load(p)


def test_existing_points_are_reused(measured, monkeypatch):
    t = measured["table"]
    calls = []
    monkeypatch.setattr(profile_measure, "_measure_point", lambda sig, ci, co, **kw: calls.append((ci, co)) or 1.0)
    extra = LayerSig("linear", 8, 4, bias=True)  # a new key: only its points are measured
    t2 = measure_table(SIGS + [extra], backend=measured["backend"], channel_step=8, threads=1, existing=t, **FAST)
    assert len(calls) == 1  # grid(8) x grid(4) = [8] x [4]
    assert t2.meta["measure"]["reused_points"] == N_POINTS
    for key in EXPECTED_GRIDS:
        assert t2.points(key) == t.points(key)
    # incompatible `existing` (other batch size) is ignored: everything is measured again
    calls.clear()
    measure_table([DW], backend=measured["backend"], batch_size=2, channel_step=8, threads=1, existing=t, **FAST)
    assert len(calls) == 2


def test_budget_exhaustion_keeps_partial_and_resumes(monkeypatch, tmp_path):
    def slow_point(sig, ci, co, **kw):
        time.sleep(0.05)
        return 1.0

    monkeypatch.setattr(profile_measure, "_measure_point", slow_point)
    with pytest.raises(TableBudgetExceeded) as ei:
        measure_table(SIGS, backend="torch", channel_step=8, max_seconds=0.4, **FAST)
    err = ei.value
    assert isinstance(err, SmcpError)
    assert 0 <= err.done < N_POINTS and err.total == N_POINTS  # 27 points x 50 ms > 0.4 s
    assert f"after {err.done} of {N_POINTS} points" in str(err) and "channel step" in str(err)
    partial = err.partial
    assert not partial.complete
    with pytest.raises(MissingEntry, match="incomplete"):
        for sig in (CONV, DW, LIN):
            partial.latency(sig, 8, 8)
    # the partial table can be saved, loaded and used to resume
    reloaded = LatencyTable.load(partial.save(tmp_path / "partial.json"))
    assert reloaded.to_dict() == partial.to_dict()
    calls = []
    monkeypatch.setattr(profile_measure, "_measure_point", lambda sig, ci, co, **kw: calls.append(1) or 1.0)
    full = measure_table(SIGS, backend="torch", channel_step=8, existing=reloaded, **FAST)
    assert full.complete and len(calls) == N_POINTS - err.done


def test_measure_table_rejects_bad_settings():
    with pytest.raises(SmcpError, match="tensorrt"):
        measure_table([CONV], backend="tensorrt")
    with pytest.raises(SmcpError, match="NCHW"):
        measure_table([CONV], backend="onnxruntime", layout="nhwc")
    with pytest.raises(SmcpError, match="precision"):
        measure_table([CONV], backend="torch", dtype="int3")


def test_torch_threads_restored(monkeypatch):
    monkeypatch.setattr(profile_measure, "_measure_point", lambda *a, **kw: torch.get_num_threads() * 1.0)
    before = torch.get_num_threads()
    t = measure_table([DW], backend="torch", channel_step=8, threads=1, **FAST)
    assert [ms for _, _, ms in t.points(DW)] == [1.0, 1.0]
    assert torch.get_num_threads() == before


def test_fsutil_atomic_writes(tmp_path):
    import os

    from smcp_core.utils import fsutil

    p = fsutil.atomic_write_json(tmp_path / "a" / "b.json", {"x": [1, 2]})
    assert fsutil.read_json(p, "thing") == {"x": [1, 2]}
    mask = os.umask(0)
    os.umask(mask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~mask)  # not mkstemp's 0600
    fsutil.atomic_write_text(p, "{broken")
    with pytest.raises(SmcpError, match=r"thing .*b\.json is not valid JSON"):
        fsutil.read_json(p, "thing")
    q = fsutil.atomic_torch_save({"w": torch.ones(2)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(q)["w"], torch.ones(2))
    assert sorted(f.name for f in tmp_path.rglob("*") if f.is_file()) == ["b.json", "m.pt"]


@pytest.mark.parametrize("group_size", [1, 4])
def test_grouped_conv_cost_layer_has_the_real_shape(group_size):
    """Depthwise (group_size 1) and grouped convs (ResNeXt/RegNet) are timed and counted with their
    real number of groups, never as depthwise when they are grouped."""
    from smcp_core.graph.signature import LayerSig
    from smcp_core.profile.measure import single_layer_module
    from smcp_core.profile.table import params

    sig = LayerSig("conv", 32, 32, kernel=(3, 3), padding=(1, 1), depthwise=True, in_hw=(8, 8),
                   group_size=group_size)
    for c in (32, 16, 8):
        m = single_layer_module(sig, c, c)
        assert m.groups == c // group_size and m.in_channels == c and m.out_channels == c
        assert params(sig, c, c) == sum(p.numel() for p in m.parameters())


def test_budget_after_the_coarse_grid_interpolates_the_rest(monkeypatch, tmp_path):
    """Coarse sub-grids first; when the budget runs out after them, the other points are
    interpolated (exact for a bilinear cost), flagged, and measured (not reused) on the next run."""
    import types

    clock = [0.0]
    monkeypatch.setattr(profile_measure, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def f(ci, co):
        return 0.5 + 0.01 * ci + 0.02 * co + 0.001 * ci * co

    seen = []

    def fake_point(sig, ci, co, **kw):
        clock[0] += 1.0
        seen.append((sig.key(), ci, co))
        return f(ci, co)

    monkeypatch.setattr(profile_measure, "_measure_point", fake_point)
    n_coarse = 4 + 2 + 6  # conv 2x2, depthwise 2, linear 3x2 (every 4th grid point plus both ends)
    t = measure_table(SIGS, backend="torch", channel_step=8, max_seconds=n_coarse + 1, **FAST)
    assert len(seen) == n_coarse + 1 and t.complete
    m = t.meta["measure"]
    assert m["interpolated_points"] == N_POINTS - n_coarse - 1 and m["measured_points"] == n_coarse + 1
    for key, (_gi, _go) in EXPECTED_GRIDS.items():
        e = t.entries[key]
        for ci, co, v in e.points():
            assert v == pytest.approx(f(ci, co), rel=1e-12), (key, ci, co)
    # the next run measures exactly the interpolated points
    again = LatencyTable.load(t.save(tmp_path / "t.json"))
    seen.clear()
    clock[0] = 0.0
    full = measure_table(SIGS, backend="torch", channel_step=8, existing=again, **FAST)
    assert len(seen) == N_POINTS - n_coarse - 1 and full.meta["measure"]["interpolated_points"] == 0
    assert {(k, ci, co) for k, ci, co in seen} == {(k, ci, co) for k, pts in m["interpolated"].items()
                                                   for ci, co in pts}


def test_host_timer_runs_sync_on_both_sides_of_the_clock():
    from smcp_core.profile.timing import host_timer

    events, now = [], [0.0]

    def clock():
        events.append("clock")
        return now[0]

    def fn():
        events.append("fn")
        now[0] += 0.25

    timed = host_timer(sync=lambda: events.append("sync"), clock=clock)
    assert timed(fn) == 0.25
    assert events == ["sync", "clock", "fn", "sync", "clock"]


def test_time_interleaved_uses_the_given_timer():
    from smcp_core.profile.timing import time_interleaved

    per_call = {"a": 0.002, "b": 0.001}
    calls = []

    def timer(fn):
        calls.append(fn)
        return per_call[fn()]

    st = time_interleaved({"a": lambda: "a", "b": lambda: "b"}, warmup=1, min_runs=4, max_runs=4, timer=timer)
    assert st["a"].median_ms == pytest.approx(2.0) and st["b"].median_ms == pytest.approx(1.0)
    assert len(calls) == 8  # warm-up calls are not timed


@pytest.mark.gpu
def test_cuda_event_timer_measures_gpu_work():
    import torch

    from smcp_core.profile.timing import cuda_event_timer

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    a = torch.randn(2048, 2048, device="cuda")
    timed = cuda_event_timer("cuda")
    one = min(timed(lambda: a @ a) for _ in range(5))
    four = min(timed(lambda: [a @ a for _ in range(4)]) for _ in range(5))
    assert one > 0 and four > 2 * one  # events see the queued kernels, not just the launch
