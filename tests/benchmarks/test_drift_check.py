"""benchmarks/drift_check.py without timing: the estimators of one loop and the split of the spread."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import drift_check  # noqa: E402

from smcp_core.profile.paired import PairedTiming  # noqa: E402


def test_estimators_of_one_loop():
    # three estimators that differ here: median of per-round ratios 3.5, ratio of medians 7 / 1,
    # ratio of the 10th percentiles 2 / 1
    a = [7.0, 5.0, 8.0, 9.0, 7.0, 8.0, 7.0, 2.0, 7.0, 9.0, 2.0]
    b = [2.0, 2.0, 2.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 4.0, 1.0]
    e = drift_check.estimates(PairedTiming(a_s=a, b_s=b))
    assert e == {"median_of_ratios": pytest.approx(3.5), "ratio_of_medians": pytest.approx(7.0),
                 "ratio_of_p10": pytest.approx(2.0)}


def test_summary_splits_the_spread_between_processes_sets_and_loops():
    # process 1 measures 10 % higher than process 0; inside a process the two session sets differ
    # by 2 % and the two loops of a set are equal
    rows = [{"process": p, "session_set": s, "loop": lp, **{k: (1.0 + 0.1 * p) * (1.0 + 0.02 * s)
                                                           for k in drift_check.ESTIMATORS}}
            for p in (0, 1) for s in (0, 1) for lp in (0, 1)]
    s = drift_check.summary(rows)["median_of_ratios"]
    assert s["between_loops"] == pytest.approx(0.0)
    assert s["between_session_sets"] == pytest.approx(0.02)
    assert s["between_processes"] == pytest.approx(0.1)
    assert s["all"] == pytest.approx(1.1 * 1.02 - 1)
