"""Two models timed in pairs, and the verdict on a target that goes with it.

One *round* times the baseline and the pruned model once each, back to back, in alternating order
(A B, then B A, ...), so that a slow phase of a shared machine hits both calls of a round alike and
neither model is always the one that runs second.  The speed-up of a round is the ratio of its two
times; the speed-up of a measurement is the **median of the per-round ratios**, with a
distribution-free confidence interval from order statistics (the interval of the median that the
binomial distribution gives, no normality assumed).  A stall that hits one call of a round makes one
outlying ratio, which moves the median by at most one rank.

:func:`judge` turns the values of a measurement into a verdict: when the interval lies wholly on one
side of the target the verdict is *decided by the interval*; while it straddles the target,
:func:`time_paired` keeps measuring (up to its time budget), and a measurement that still straddles
at the end is *decided by the median*, which the verdict says.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

from smcp_core.profile.timing import Stats, Timer, host_timer


@dataclass(frozen=True)
class Interval:
    """The median of ``n`` values and a ``confidence`` interval for it (``lo`` <= ``median`` <= ``hi``)."""

    median: float
    lo: float
    hi: float
    confidence: float
    n: int


_EXACT_UP_TO = 400  # values; above, the binomial tail is taken from the normal approximation


def _median_rank(n: int, confidence: float) -> int:
    """The largest ``k`` (1-based) with P(Binomial(n, 1/2) <= k - 1) <= (1 - confidence) / 2, so that
    ``[x_(k), x_(n+1-k)]`` of the sorted values covers the median with at least ``confidence``;
    0 when ``n`` is too small for any such interval."""
    alpha = (1.0 - confidence) / 2.0
    if n > _EXACT_UP_TO:  # the normal approximation (with continuity correction): exact to a rank here
        z = NormalDist().inv_cdf(1.0 - alpha)
        return max(0, math.floor(n / 2 + 0.5 - z * math.sqrt(n) / 2))
    log_half_n = n * math.log(0.5)
    cdf, k = 0.0, 0
    while k <= n // 2:
        log_pmf = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + log_half_n
        if cdf + math.exp(log_pmf) > alpha:
            break
        cdf += math.exp(log_pmf)
        k += 1
    return k


def median_interval(values: list[float], confidence: float = 0.9) -> Interval:
    """The median of ``values`` with its order-statistics ``confidence`` interval.  With too few
    values for that confidence (fewer than 5 at 90 %), the interval is the whole range, open-ended:
    ``(-inf, inf)``, so no verdict can rest on it."""
    if not values:
        raise ValueError("no values")
    xs = sorted(values)
    n = len(xs)
    mid = xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
    k = _median_rank(n, confidence)
    if k == 0:
        return Interval(mid, -math.inf, math.inf, confidence, n)
    return Interval(mid, xs[k - 1], xs[n - k], confidence, n)


@dataclass(frozen=True)
class Verdict:
    """Whether a measured value meets a target: ``at_least`` for a speed-up (higher is better),
    at most for a latency.  ``decided_by`` is ``"interval"`` when the whole interval is on one
    side of the target, else ``"median"``; ``reason`` says it in words."""

    passed: bool
    value: float
    lo: float
    hi: float
    target: float
    at_least: bool
    confidence: float
    rounds: int
    decided_by: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def judge(values: list[float], target: float, *, at_least: bool, confidence: float = 0.9,
          unit: str = "x") -> Verdict:
    """The verdict on ``values`` (per-round speed-ups, or per-round latencies) against ``target``."""
    iv = median_interval(values, confidence)
    pct = f"{100 * confidence:g} %"
    span = f"{iv.median:.4g}{unit} ({pct} interval {iv.lo:.4g}-{iv.hi:.4g}{unit}, {iv.n} rounds)"
    good, bad = (iv.lo >= target, iv.hi < target) if at_least else (iv.hi <= target, iv.lo > target)
    if good or bad:
        side = "meets" if good else "misses"
        return Verdict(bool(good), iv.median, iv.lo, iv.hi, target, at_least, confidence, iv.n, "interval",
                       f"{span} {side} the target {target:g}{unit}: the whole interval is on that side")
    passed = iv.median >= target if at_least else iv.median <= target
    return Verdict(passed, iv.median, iv.lo, iv.hi, target, at_least, confidence, iv.n, "median",
                   f"{span}: the interval straddles the target {target:g}{unit} (within the timing noise), "
                   f"decided by the median, which {'meets' if passed else 'misses'} it")


@dataclass
class PairedTiming:
    """Per-round times (seconds) of ``a`` (the baseline) and ``b`` (the pruned model)."""

    a_s: list[float] = field(default_factory=list)
    b_s: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = ""  # "decided", "min_rounds" (nothing to decide), "max_rounds" or "max_seconds"

    def ratios(self) -> list[float]:
        """Per-round speed-ups of ``b`` over ``a``."""
        return [a / b for a, b in zip(self.a_s, self.b_s)]

    def latencies_ms(self) -> list[float]:
        """Per-round latencies of ``b`` in milliseconds."""
        return [b * 1e3 for b in self.b_s]

    def stats(self) -> tuple[Stats, Stats]:
        return Stats.from_samples(self.a_s, stable=True), Stats.from_samples(self.b_s, stable=True)


def time_paired(fa: Callable[[], object], fb: Callable[[], object], *, warmup: int = 5, min_rounds: int = 30,
                max_rounds: int = 20000, max_seconds: float = 60.0, check_every: int = 10,
                decided: Callable[[PairedTiming], bool] | None = None,
                sync: Callable[[], object] | None = None,
                clock: Callable[[], float] = time.perf_counter,
                timer: Timer | None = None) -> PairedTiming:
    """Time ``fa`` and ``fb`` in rounds of one call each, alternating which goes first.

    After ``min_rounds`` (and every ``check_every`` rounds after that) ``decided(timing)`` is asked
    whether the measurement is conclusive; the loop stops when it says so, after ``max_rounds``
    rounds, or when ``max_seconds`` (wall clock, warm-up included) have passed.  ``max_seconds`` is
    a hard cap, even before ``min_rounds``; at least one round is always timed.  Without
    ``decided`` the loop runs ``min_rounds`` rounds (or until the time is up).  Each call is timed
    by ``timer`` (CUDA events on a GPU, :func:`~smcp_core.profile.timing.device_timer`), else by
    ``clock`` around it with ``sync`` on both sides."""
    timed = timer if timer is not None else host_timer(sync, clock)
    t_start = clock()
    deadline = t_start + max_seconds
    for _ in range(max(0, warmup)):
        fa(), fb()
        if clock() >= deadline:
            break
    res = PairedTiming()
    while True:
        first_a = len(res.a_s) % 2 == 0
        if first_a:
            ta = timed(fa)
            tb = timed(fb)
        else:
            tb = timed(fb)
            ta = timed(fa)
        res.a_s.append(ta)
        res.b_s.append(tb)
        n = len(res.a_s)
        if n >= min_rounds and (n - min_rounds) % max(1, check_every) == 0:
            if decided is None or decided(res):
                res.stopped = "decided" if decided is not None else "min_rounds"
                break
        if n >= max_rounds:
            res.stopped = "max_rounds"
            break
        if clock() >= deadline:
            res.stopped = "max_seconds"
            break
    res.seconds = clock() - t_start
    return res
