"""The gate's statistics on synthetic timing streams: a known ratio under noise and under the stalls
of a shared machine (20-50x for a while), through the real paired loop with a fake clock."""

from __future__ import annotations

import math
import random

import pytest

from smcp_core.profile.paired import _median_rank, judge, median_interval, time_paired
from smcp_core.profile.timing import rotating


class FakeMachine:
    """Two "models" whose calls advance a fake clock: the baseline takes ``base_ms`` and the pruned
    one ``base_ms / ratio``, each with log-normal noise ``sigma``; with probability ``stall_p`` per
    call a stall starts that slows every call by 20-50x for the next 20-200 calls (both models)."""

    def __init__(self, ratio: float, *, seed: int, base_ms: float = 10.0, sigma: float = 0.08,
                 stall_p: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.ms = {"a": base_ms, "b": base_ms / ratio}
        self.sigma, self.stall_p = sigma, stall_p
        self.stall_left, self.stall_factor = 0, 1.0

    def clock(self) -> float:
        return self.now

    def call(self, which: str, bias: float = 1.0):
        """One "session" of a model: every call of it takes ``bias`` times the model's time."""

        def fn():
            if self.stall_left == 0 and self.rng.random() < self.stall_p:
                self.stall_left, self.stall_factor = self.rng.randint(20, 200), self.rng.uniform(20, 50)
            factor = self.stall_factor if self.stall_left > 0 else 1.0
            self.stall_left = max(0, self.stall_left - 1)
            self.now += self.ms[which] * bias * 1e-3 * factor * math.exp(self.rng.gauss(0.0, self.sigma))
        return fn


def gate(machine: FakeMachine, target: float, *, max_seconds: float = 120.0, min_rounds: int = 50):
    timing = time_paired(machine.call("a"), machine.call("b"), warmup=3, min_rounds=min_rounds,
                         max_seconds=max_seconds, clock=machine.clock,
                         decided=lambda t: judge(t.ratios(), target, at_least=True).decided_by == "interval")
    return judge(timing.ratios(), target, at_least=True), timing


@pytest.mark.parametrize("stall_p", [0.0, 0.01])
def test_a_model_faster_than_the_target_passes_every_time(stall_p):
    verdicts = [gate(FakeMachine(1.6, seed=s, stall_p=stall_p), 1.5)[0] for s in range(20)]
    assert all(v.passed for v in verdicts)
    assert all(v.decided_by == "interval" for v in verdicts)


@pytest.mark.parametrize("stall_p", [0.0, 0.01])
def test_a_target_3_percent_above_the_true_speedup_fails_every_time(stall_p):
    verdicts = [gate(FakeMachine(1.6, seed=s, stall_p=stall_p), 1.6 * 1.03)[0] for s in range(20)]
    assert not any(v.passed for v in verdicts)
    assert all(v.hi < 1.6 * 1.03 for v in verdicts)  # decided by the interval, not by luck


def test_stalls_of_20_to_50x_leave_the_paired_median_at_the_true_ratio():
    """A stall slows both calls of the rounds it covers alike, and the one call at each of its
    edges makes an outlying ratio: the median of the per-round ratios stays at the true one."""
    m = FakeMachine(1.6, seed=3, sigma=0.05, stall_p=0.02)
    verdict, timing = gate(m, 1.5)
    assert verdict.passed and verdict.value == pytest.approx(1.6, rel=0.03)
    a, b = timing.stats()
    assert max(timing.a_s) > 10 * a.median_ms * 1e-3  # the stream really had stalls


def test_a_stream_straddling_the_target_runs_to_the_time_budget_and_is_decided_by_the_median():
    m = FakeMachine(1.5, seed=0, sigma=0.1)
    verdict, timing = gate(m, 1.5, max_seconds=5.0)
    assert timing.stopped == "max_seconds" and timing.seconds >= 5.0
    assert verdict.decided_by == "median" and "straddles" in verdict.reason
    assert verdict.lo < 1.5 < verdict.hi


def test_an_obvious_result_stops_after_the_minimum_rounds():
    verdict, timing = gate(FakeMachine(3.0, seed=1), 1.5)
    assert timing.stopped == "decided" and len(timing.a_s) == 50 and verdict.passed


def test_rounds_alternate_which_model_runs_first():
    order = []
    time_paired(lambda: order.append("a"), lambda: order.append("b"), warmup=0, min_rounds=4)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_max_seconds_is_a_hard_cap_even_before_min_rounds():
    m = FakeMachine(2.0, seed=0, base_ms=1000.0)
    timing = time_paired(m.call("a"), m.call("b"), warmup=0, min_rounds=50, max_seconds=3.0, clock=m.clock)
    assert len(timing.a_s) == 3 and timing.stopped == "max_seconds"  # rounds of ~1.5 s: the one begun at 2.9 s ends


def test_latency_targets_are_judged_at_most():
    v = judge([9.0, 9.5, 9.2, 9.1, 9.3, 9.4, 9.6, 9.0, 9.2, 9.3], 10.0, at_least=False, unit=" ms")
    assert v.passed and v.decided_by == "interval"
    v = judge([10.5, 10.9, 11.0, 10.7, 10.8, 10.6, 11.2, 10.4, 10.9, 10.7], 10.0, at_least=False, unit=" ms")
    assert not v.passed and v.decided_by == "interval"


def test_the_interval_covers_the_median_with_the_stated_confidence():
    rng = random.Random(0)
    hits = 0
    for _ in range(400):
        iv = median_interval([rng.lognormvariate(0.0, 0.3) for _ in range(41)], 0.9)
        hits += iv.lo <= 1.0 <= iv.hi  # the true median of lognormal(0, s) is 1
    assert 0.88 <= hits / 400 <= 0.97


def test_too_few_rounds_give_no_interval_and_no_decided_verdict():
    iv = median_interval([1.0, 2.0, 3.0, 4.0], 0.9)
    assert iv.lo == -math.inf and iv.hi == math.inf and iv.median == 2.5
    assert judge([2.0, 2.1, 2.2], 1.5, at_least=True).decided_by == "median"


def test_the_normal_approximation_agrees_with_the_exact_rank(monkeypatch):
    import smcp_core.profile.paired as paired
    approx = {n: _median_rank(n, 0.9) for n in (401, 777, 2000)}
    monkeypatch.setattr(paired, "_EXACT_UP_TO", 10**9)
    assert all(abs(_median_rank(n, 0.9) - k) <= 1 for n, k in approx.items())


def _session_gate(seed: int, n_sessions: int, target: float) -> bool:
    """The gate on a machine where every session of a model keeps its own offset (log-normal,
    1.5 %, about what four onnxruntime CPU sessions of one ResNet-56 showed), true speed-up 1.6."""
    m = FakeMachine(1.6, seed=seed, sigma=0.05)
    offsets = random.Random(1000 + seed)
    a = rotating([m.call("a", offsets.lognormvariate(0.0, 0.015)) for _ in range(n_sessions)])
    b = rotating([m.call("b", offsets.lognormvariate(0.0, 0.015)) for _ in range(n_sessions)])
    timing = time_paired(a, b, warmup=3, min_rounds=50, max_seconds=60.0, clock=m.clock,
                         decided=lambda t: judge(t.ratios(), target, at_least=True).decided_by == "interval")
    return judge(timing.ratios(), target, at_least=True).passed


def test_rotating_sessions_keep_one_sessions_offset_from_deciding_a_miss():
    """3 % above the true speed-up: timed through one session per model the gate passes whenever the
    two sessions' offsets add up to more than 3 %; through four sessions in turn it fails every time."""
    single = [_session_gate(s, 1, 1.6 * 1.03) for s in range(40)]
    rotated = [_session_gate(s, 4, 1.6 * 1.03) for s in range(40)]
    assert any(single)  # the hazard is real at this offset
    assert not any(rotated)
    assert all(_session_gate(s, 4, 1.5) for s in range(20))  # and a real pass still passes


def test_rotating_calls_each_callable_in_turn():
    calls = []
    f = rotating([lambda i=i: calls.append(i) for i in range(3)])
    for _ in range(7):
        f()
    assert calls == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError):
        rotating([])
