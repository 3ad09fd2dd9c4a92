"""The channel grid of a latency table stays bounded for wide layers and never grows with the step;
a profile that runs out of its time budget writes the points measured so far and the next profile
measures only the missing ones.  Layer latencies are deterministic stand-ins (no assertion depends
on measured speed); the budget runs on a fake clock."""

from __future__ import annotations

import json
import types

import pytest
from chain_support import fake_layer_latency, fake_paired_latency, fake_whole_model_latency
from conftest import tiny_recipe

from smcp_core import stages
from smcp_core.graph.signature import LayerSig
from smcp_core.profile import measure as profile_measure
from smcp_core.profile.measure import _group_signatures, _plan_entry, measure_table
from smcp_core.profile.table import MAX_GRID_POINTS, LatencyTable, TableBudgetExceeded, channel_grid
from smcp_core.stages import profiling
from smcp_core.utils.fsutil import CHECKSUMS, verify_checksum

# ---------------------------------------------------------------------------------------------------
# layer sets of ImageNet ResNets at 224 x 224 (the signatures the channel graph gives)
# ---------------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, k: int, s: int, hw: int) -> LayerSig:
    return LayerSig("conv", cin, cout, kernel=(k, k), stride=(s, s), padding=(k // 2, k // 2), in_hw=(hw, hw))


def _bottleneck_net(blocks, stem, avg_down: bool, classes: int) -> list[LayerSig]:
    sigs, cin, hw = list(stem), 64, 56
    for i, (n, w) in enumerate(zip(blocks, (64, 128, 256, 512))):
        for b in range(n):
            s = 2 if b == 0 and i > 0 else 1
            out_hw = hw // s
            sigs += [_conv(cin, w, 1, 1, hw), _conv(w, w, 3, s, hw), _conv(w, 4 * w, 1, 1, out_hw)]
            if b == 0:  # the shortcut: a strided 1x1 conv, or (avg_down) an average pool and a 1x1 conv
                sigs.append(_conv(cin, 4 * w, 1, 1, out_hw) if avg_down else _conv(cin, 4 * w, 1, s, hw))
            cin, hw = 4 * w, out_hw
    return sigs + [LayerSig("linear", 2048, classes, bias=True)]


def resnet50() -> list[LayerSig]:
    """torchvision's / timm's ResNet-50, 1000 classes."""
    return _bottleneck_net([3, 4, 6, 3], [_conv(3, 64, 7, 2, 224)], False, 1000)


def resnet26d() -> list[LayerSig]:
    """timm's resnet26d (deep stem, average-pool shortcuts) with one input channel and 10 classes:
    the model of the issue (393,096 points at channel step 4 before the grid was bounded)."""
    stem = [_conv(1, 32, 3, 2, 224), _conv(32, 32, 3, 1, 112), _conv(32, 64, 3, 1, 112)]
    return _bottleneck_net([2, 2, 2, 2], stem, True, 10)


def n_points(sigs: list[LayerSig], step: int, cap: int | None = MAX_GRID_POINTS) -> int:
    """The points :func:`measure_table` measures for ``sigs`` (its own plan)."""
    return sum(_plan_entry(k, ss, step, cap).n_points() for k, ss in _group_signatures(sigs).items())


def _old_grid(c: int, step: int) -> list[int]:
    """The grid before the fix: unbounded, and dense (1..c) for a layer narrower than the step."""
    if c < step:
        return list(range(1, c + 1))
    g = list(range(step, c + 1, step))
    return g if g[-1] == c else g + [c]


def _old_points(sigs: list[LayerSig], step: int) -> int:
    total = 0
    for ss in _group_signatures(sigs).values():
        ci = len({c for s in ss for c in _old_grid(s.cin, step)})
        total += ci * (1 if ss[0].depthwise else len({c for s in ss for c in _old_grid(s.cout, step)}))
    return total


# ---------------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------------


def test_the_grid_of_a_wide_layer_is_bounded():
    g = channel_grid(2048, 4)
    assert MAX_GRID_POINTS == 32 and g == list(range(64, 2049, 64))  # the step grows to 2048 / 32
    assert len(channel_grid(1000, 4)) == 32 and channel_grid(1000, 4)[-1] == 1000
    assert all(c % 4 == 0 for c in channel_grid(1000, 4))
    # a 2048 x 2048 layer: 32 x 32 points at any step up to 64 (512 x 512 = 262,144 at step 4 before)
    wide = [LayerSig("conv", 2048, 2048, in_hw=(7, 7))]
    assert [n_points(wide, s) for s in (1, 4, 64, 128)] == [1024, 1024, 1024, 256]
    assert _old_points(wide, 4) == 262_144
    # small layers keep their plain grid; no cap: the plain grid of every layer
    assert channel_grid(64, 4) == list(range(4, 65, 4)) and channel_grid(20, 8) == [8, 16, 20]
    assert channel_grid(2048, 4, None) == list(range(4, 2049, 4))
    assert channel_grid(2048, 4, 1) == [2048]
    with pytest.raises(ValueError, match="max grid points"):
        channel_grid(64, 4, 0)


def test_resnet_profiles_stay_bounded():
    r50, r26d = resnet50(), resnet26d()
    # before: 691,504 and 393,096 points at step 4 (the 600 s budget ran out on the latter)
    assert _old_points(r50, 4) == 691_504 and _old_points(r26d, 4) == 393_096
    assert n_points(r50, 4) == 22_736 and n_points(r26d, 4) == 20_328
    assert n_points(r50, 8) == 18_440 and n_points(r26d, 8) == 15_780
    for sigs in (r50, r26d):
        for k, ss in _group_signatures(sigs).items():
            for s in ss:  # every layer: at most 32 widths per axis
                assert len(channel_grid(s.cin, 4)) <= 32 and len(channel_grid(s.cout, 4)) <= 32
            e = _plan_entry(k, ss, 4)  # a key shared by layers of several widths: the union of their grids
            assert len(e.cin_grid) <= 64 and len(e.cout_grid) <= 64
            assert {s.cin for s in ss} <= set(e.cin_grid) and {s.cout for s in ss} <= set(e.cout_grid)


def test_a_larger_step_never_gives_more_points():
    prev = {}
    for step in range(1, 300):
        for c in list(range(1, 260)) + [300, 384, 512, 640, 1000, 1024, 1280, 2047, 2048, 4096]:
            g = channel_grid(c, step)
            assert g == sorted(set(g)) and g[-1] == c and all(x % step == 0 for x in g[:-1]), (c, step)
            assert len(g) == (1 if c <= step else min(-(-c // step), MAX_GRID_POINTS)), (c, step)
            assert len(g) <= prev.get(c, len(g)), (c, step)
            prev[c] = len(g)
    # whole networks: the steps 64 / 128 / 256 gave 2,716 / 9,318 / 62,505 points on ResNet-50 before
    # (the layers narrower than the step were measured on a dense grid)
    r50 = resnet50()
    assert [_old_points(r50, s) for s in (64, 128, 256)] == [2_716, 9_318, 62_505]
    for sigs in (r50, resnet26d()):
        totals = [n_points(sigs, 2**k) for k in range(12)]
        assert totals == sorted(totals, reverse=True), totals
    assert [n_points(r50, s) for s in (64, 128, 256, 512, 2048)] == [2_714, 685, 183, 64, 34]


# ---------------------------------------------------------------------------------------------------
# a budget that runs out writes the points measured so far; the next run measures the rest
# ---------------------------------------------------------------------------------------------------

CONV = LayerSig("conv", 16, 24, kernel=(3, 3), padding=(1, 1), in_hw=(8, 8))
LIN = LayerSig("linear", 64, 10)
SIGS = [CONV, LIN]
N = 2 * 3 + 8 * 2  # grid(16, 8) x grid(24, 8) + grid(64, 8) x grid(10, 8)
FAST = dict(warmup=1, min_runs=1, max_runs=1, point_max_seconds=1.0)


@pytest.fixture
def fake_clock(monkeypatch):
    """Every measured point takes one second of a fake clock; returns the points measured."""
    clock = [0.0]
    seen: list[tuple] = []
    monkeypatch.setattr(profile_measure, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def point(sig, ci, co, **kw):
        clock[0] += 1.0
        seen.append((sig.key(), ci, co))
        return fake_layer_latency(sig, ci, co, **kw)

    monkeypatch.setattr(profile_measure, "_measure_point", point)
    return seen


def test_budget_exhausted_writes_a_partial_table_that_the_next_run_resumes(fake_clock, tmp_path):
    path = tmp_path / "latency.partial.json"
    with pytest.raises(TableBudgetExceeded) as ei:
        measure_table(SIGS, backend="torch", channel_step=8, max_seconds=3, partial_path=path, **FAST)
    err = ei.value
    assert len(fake_clock) == 3 and err.done == 3 and err.total == N
    msg = str(err)
    assert f"the 3 points measured so far are saved in {path}" in msg and "reused by the next run" in msg
    assert "\n" not in msg
    assert verify_checksum(path, "latency table")  # written atomically, with its checksum
    assert sorted(f.name for f in tmp_path.iterdir()) == [CHECKSUMS, path.name]  # no temp file left
    partial = LatencyTable.load(path)
    assert partial.meta["partial"] is True and partial.meta["complete"] is False
    assert partial.meta["measure"]["measured_points"] == 3 and partial.meta["max_grid_points"] == 32
    assert partial.to_dict()["entries"] == err.partial.to_dict()["entries"]
    first = list(fake_clock)
    fake_clock.clear()
    full = measure_table(SIGS, backend="torch", channel_step=8, max_seconds=1000, existing=partial, **FAST)
    assert full.complete and "partial" not in full.meta
    assert len(fake_clock) == N - 3 and not set(fake_clock) & set(first)  # only the missing points
    assert full.meta["measure"]["reused_points"] == 3 and full.meta["measure"]["measured_points"] == N - 3
    for sig in SIGS:
        for ci, co, ms in full.points(sig):
            assert ms == fake_layer_latency(sig, ci, co)


def test_without_a_path_the_message_points_at_the_error_table(fake_clock):
    with pytest.raises(TableBudgetExceeded) as ei:
        measure_table(SIGS, backend="torch", channel_step=8, max_seconds=2, **FAST)
    assert "the 2 points measured so far are in this error's `partial` table" in str(ei.value)
    assert "saved" not in str(ei.value)


def test_an_interrupted_profile_keeps_its_points(monkeypatch, tmp_path):
    calls = []

    def point(sig, ci, co, **kw):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(1)
        return 1.0

    monkeypatch.setattr(profile_measure, "_measure_point", point)
    path = tmp_path / "p.json"
    with pytest.raises(KeyboardInterrupt):
        measure_table(SIGS, backend="torch", channel_step=8, partial_path=path, **FAST)
    t = LatencyTable.load(path)
    assert t.meta["partial"] and sum(e.n_measured() for e in t.entries.values()) == 5


def test_existing_tables_in_order(monkeypatch):
    """Several ``existing`` tables: the first one that has a point wins; an incompatible one is ignored."""
    monkeypatch.setattr(profile_measure, "_measure_point", lambda sig, ci, co, **kw: 1.0)
    a = measure_table([CONV], backend="torch", channel_step=8, **FAST)
    monkeypatch.setattr(profile_measure, "_measure_point", lambda sig, ci, co, **kw: 2.0)
    b = measure_table(SIGS, backend="torch", channel_step=8, **FAST)
    other = measure_table([LIN], backend="torch", channel_step=8, batch_size=2, **FAST)
    calls = []
    monkeypatch.setattr(profile_measure, "_measure_point", lambda sig, ci, co, **kw: calls.append(1) or 3.0)
    t = measure_table(SIGS, backend="torch", channel_step=8, existing=[other, a, b], **FAST)
    assert not calls and t.meta["measure"]["reused_points"] == N
    assert {ms for *_, ms in t.points(CONV)} == {1.0} and {ms for *_, ms in t.points(LIN)} == {2.0}


def test_smcp_profile_resumes_after_its_budget_ran_out(fake_clock, monkeypatch, tmp_path):
    """The profile stage: a budget that runs out leaves ``latency.partial.json`` (and no latency.json);
    the next ``smcp profile`` measures only the missing points, writes latency.json and removes the
    partial table."""
    monkeypatch.setattr(profiling, "measure_lowest", fake_whole_model_latency)
    monkeypatch.setattr(profiling, "measure_against_baseline", fake_paired_latency)
    short = tiny_recipe("profile.max_seconds=4", "profile.min_runs=1", "profile.warmup=1")
    with pytest.raises(TableBudgetExceeded) as ei:
        stages.profile(short, tmp_path)
    partial = tmp_path / profiling.PARTIAL_TABLE
    assert f"saved in {partial}" in str(ei.value) and not (tmp_path / "latency.json").exists()
    assert LatencyTable.load(partial).meta["partial"]
    first, total = list(fake_clock), ei.value.total
    assert len(first) == ei.value.done == 4
    fake_clock.clear()
    long = tiny_recipe("profile.max_seconds=100000", "profile.min_runs=1", "profile.warmup=1")
    stages.profile(long, tmp_path)
    assert len(fake_clock) == total - len(first) and not set(fake_clock) & set(first)
    table = LatencyTable.load(tmp_path / "latency.json")
    assert table.complete and table.meta["measure"]["reused_points"] == len(first)
    assert not partial.exists() and partial.name not in (tmp_path / CHECKSUMS).read_text()
    assert json.loads((tmp_path / "latency.json").read_text())["meta"]["complete"] is True
