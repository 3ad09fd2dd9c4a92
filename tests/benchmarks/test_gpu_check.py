"""benchmarks/gpu_check.py --dry-run: the GPU check's code path on the CPU, with all five parts.

Timings are never asserted: only that every part ran and reported finite numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _numbers(x):
    """Every int/float inside ``x`` (bools excluded)."""
    if isinstance(x, bool):
        return []
    if isinstance(x, (int, float)):
        return [x]
    if isinstance(x, dict):
        return [n for v in x.values() for n in _numbers(v)]
    if isinstance(x, list):
        return [n for v in x for n in _numbers(v)]
    return []


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_the_dry_run_reports_all_five_parts_with_finite_numbers(dry_run):
    _, res, _ = dry_run
    for part in "abcde":
        assert res[part], part
        nums = _numbers(res[part])
        assert nums and all(math.isfinite(n) for n in nums), (part, res[part])
    assert [r["variant"] for r in res["b"]] == ["dense", "uniform75", "uniform50", "removal"]
    assert res["b"][3]["removed_layers"] > 0  # the structured variant removes whole branches
    assert res["a"]["complete"] and res["a"]["build_s"] > 0
    assert res["c"]["measured_speedup"] > 0 and res["c"]["rounds"] >= 1
    assert res["e"]["interval_steps"] == 80


@pytest.mark.slow
def test_the_forced_overflow_leaves_importance_and_weights_finite(dry_run):
    _, res, _ = dry_run
    assert {r["dtype"] for r in res["d"]} == {"float16", "bfloat16"}
    for r in res["d"]:
        assert r["importance_finite_after_overflow"] and r["importance_finite"] and r["weights_finite"], r
        assert r["mask_updates"] >= 1, r


@pytest.mark.slow
def test_one_table_is_printed_and_written(dry_run):
    stdout, _, md = dry_run
    assert stdout.strip() == md.strip()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| part")]
    assert {line.split("|")[1].strip() for line in rows} == set("abcde")
