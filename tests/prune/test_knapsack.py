"""Tests of the exact multiple-choice knapsack solver (smcp_core.prune.knapsack)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from smcp_core.errors import InfeasibleTarget, SmcpError
from smcp_core.prune.knapsack import REL_TOL, McKpInstance, McKpResult, solve_mckp

# --------------------------------------------------------------------------------------------------
# helpers


def brute_force(values, costs, capacity):
    """Best total value over all choices within capacity (same tolerance as the solver), or None."""
    cap = capacity + REL_TOL * abs(capacity)
    best = None
    for combo in itertools.product(*[range(len(v)) for v in values]):
        c = sum(float(costs[g][j]) for g, j in enumerate(combo))
        if c <= cap:
            v = sum(float(values[g][j]) for g, j in enumerate(combo))
            if best is None or v > best:
                best = v
    return best


def check_result(res, values, costs, capacity):
    """The reported choice is well formed and its totals match the reported value/cost."""
    assert isinstance(res, McKpResult)
    assert res.choice.dtype == torch.long
    assert res.choice.shape == (len(values),)
    ch = res.choice.tolist()
    for g, j in enumerate(ch):
        assert 0 <= j < len(values[g])
    v = sum(float(values[g][j]) for g, j in enumerate(ch))
    c = sum(float(costs[g][j]) for g, j in enumerate(ch))
    assert res.value == pytest.approx(v, rel=1e-12, abs=1e-12)
    assert res.cost == pytest.approx(c, rel=1e-12, abs=1e-12)
    assert c <= capacity + REL_TOL * abs(capacity) + 1e-12


def assert_optimal(res, best):
    assert res.value == pytest.approx(best, rel=1e-9, abs=1e-9)


def random_instance(rng, max_groups=6, max_opts=6):
    n_groups = int(rng.integers(1, max_groups + 1))
    values, costs = [], []
    for _ in range(n_groups):
        n = int(rng.integers(1, max_opts + 1))
        kind = rng.integers(0, 3)
        if kind == 0:  # anything: negative values, non-monotone both ways
            values.append(rng.normal(0.0, 3.0, n))
            costs.append(rng.uniform(0.0, 10.0, n))
        elif kind == 1:  # increasing-ish costs and values
            values.append(np.cumsum(rng.uniform(0.0, 2.0, n)))
            costs.append(np.cumsum(rng.uniform(0.0, 3.0, n)))
        else:  # few distinct numbers: ties in costs and values
            values.append(rng.integers(0, 4, n).astype(float))
            costs.append(rng.integers(0, 4, n).astype(float) * 0.5)
    return values, costs


def staircase_instance(rng, n_groups, max_channels, step=8, noise=0.05, integer_costs=False):
    """Concave cumulative-importance values with staircase (non-monotone) latencies."""
    values, costs = [], []
    for _ in range(n_groups):
        ch = step * int(rng.integers(1, max_channels // step + 1))
        imp = np.sort(rng.lognormal(0.0, 1.0, ch))[::-1]
        k = np.arange(step, ch + 1, step)
        values.append(np.cumsum(imp)[k - 1])
        a = rng.uniform(0.5, 2.0)
        lat = a * np.ceil(k / 32.0) + rng.normal(0.0, noise, k.size) * a
        if integer_costs:
            lat = np.round(lat * 3)
        costs.append(np.maximum(lat, 0.0))
    return values, costs


def capacities(rng, costs, n=4):
    lo = float(sum(np.min(c) for c in costs))
    hi = float(sum(np.max(c) for c in costs))
    caps = [lo, hi] + list(rng.uniform(lo, hi + 1e-9, n))
    return caps


# --------------------------------------------------------------------------------------------------
# exactness


def test_random_small_instances_match_brute_force():
    rng = np.random.default_rng(1234)
    n_checked = 0
    for _ in range(300):
        values, costs = random_instance(rng)
        for cap in capacities(rng, costs, n=2):
            res = solve_mckp(values, costs, cap)
            check_result(res, values, costs, cap)
            assert_optimal(res, brute_force(values, costs, cap))
            n_checked += 1
    assert n_checked == 1200


def test_torch_inputs_match_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(50):
        values, costs = random_instance(rng, max_groups=5, max_opts=5)
        tv = [torch.as_tensor(v, dtype=torch.float64) for v in values]
        tc = [torch.as_tensor(c, dtype=torch.float64) for c in costs]
        for cap in capacities(rng, costs, n=2):
            res = solve_mckp(tv, tc, cap)
            check_result(res, values, costs, cap)
            assert_optimal(res, brute_force(values, costs, cap))


def test_staircase_concave_instances_match_brute_force():
    rng = np.random.default_rng(99)
    for _ in range(60):
        n_groups = int(rng.integers(1, 5))
        values, costs = staircase_instance(rng, n_groups, max_channels=48)
        for cap in capacities(rng, costs, n=3):
            res = solve_mckp(values, costs, cap)
            check_result(res, values, costs, cap)
            assert_optimal(res, brute_force(values, costs, cap))


def test_capacity_exactly_min_cost():
    rng = np.random.default_rng(5)
    for _ in range(50):
        values, costs = random_instance(rng)
        cap = float(sum(np.min(c) for c in costs))
        res = solve_mckp(values, costs, cap)
        check_result(res, values, costs, cap)
        assert_optimal(res, brute_force(values, costs, cap))


# --------------------------------------------------------------------------------------------------
# edge cases


def test_infeasible_raises_with_min_cost_in_message():
    costs = [[1.5, 2.0, 3.0], [0.75, 1.0], [2.0]]
    values = [[1.0, 2.0, 3.0], [1.0, 2.0], [5.0]]
    min_cost = 1.5 + 0.75 + 2.0
    with pytest.raises(InfeasibleTarget) as err:
        solve_mckp(values, costs, 4.0, unit="ms")
    msg = str(err.value)
    assert isinstance(err.value, SmcpError)
    assert "\n" not in msg
    assert f"{min_cost:.6g}" in msg and "4.25" in msg
    assert "4 ms" in msg and "ms" in msg


def test_infeasible_only_beyond_tolerance():
    costs = [[1.0, 2.0], [1.0, 2.0]]
    values = [[1.0, 2.0], [1.0, 2.0]]
    res = solve_mckp(values, costs, 2.0 * (1 - 1e-12))  # within round-off of the minimum
    assert res.choice.tolist() == [0, 0]
    with pytest.raises(InfeasibleTarget):
        solve_mckp(values, costs, 2.0 * (1 - 1e-6))


def test_large_capacity_takes_best_option_everywhere():
    rng = np.random.default_rng(3)
    for _ in range(20):
        values, costs = random_instance(rng, max_groups=8, max_opts=10)
        cap = float(sum(np.max(c) for c in costs))
        for c in (cap, 2 * cap + 1.0, math.inf):
            res = solve_mckp(values, costs, c)
            best = [float(np.max(v)) for v in values]
            picked = [float(values[g][j]) for g, j in enumerate(res.choice.tolist())]
            assert picked == best


def test_single_group():
    values = [[0.0, 5.0, 3.0, 7.0, 6.0]]
    costs = [[0.0, 2.0, 1.0, 4.0, 3.0]]
    assert solve_mckp(values, costs, 3.5).choice.tolist() == [4]
    assert solve_mckp(values, costs, 2.5).choice.tolist() == [1]
    assert solve_mckp(values, costs, 0.0).choice.tolist() == [0]
    assert solve_mckp(values, costs, 10.0).choice.tolist() == [3]


def test_fixed_groups_with_one_option():
    values = [[2.0], [1.0, 4.0, 6.0], [3.0], [0.5, 0.25]]
    costs = [[1.0], [0.5, 1.5, 2.5], [2.0], [0.1, 0.2]]
    res = solve_mckp(values, costs, 1.0 + 1.5 + 2.0 + 0.1)
    assert res.choice.tolist() == [0, 1, 0, 0]
    assert res.value == pytest.approx(2.0 + 4.0 + 3.0 + 0.5)
    assert res.cost == pytest.approx(4.6)
    # every group fixed
    res = solve_mckp([[1.0], [2.0]], [[3.0], [4.0]], 7.0)
    assert res.choice.tolist() == [0, 0] and res.value == 3.0 and res.cost == 7.0


def test_float32_and_list_inputs():
    rng = np.random.default_rng(11)
    values, costs = staircase_instance(rng, 4, max_channels=40)
    lo = float(sum(np.min(c) for c in costs))
    hi = float(sum(np.max(c) for c in costs))
    cap = lo + 0.6 * (hi - lo)
    v32 = [torch.as_tensor(v, dtype=torch.float32) for v in values]
    c32 = [torch.as_tensor(c, dtype=torch.float32) for c in costs]
    res = solve_mckp(v32, c32, cap)
    vv = [v.double().numpy() for v in v32]
    cc = [c.double().numpy() for c in c32]
    check_result(res, vv, cc, cap)
    assert_optimal(res, brute_force(vv, cc, cap))

    lv = [list(map(float, v)) for v in values]
    lc = [list(map(float, c)) for c in costs]
    res = solve_mckp(lv, lc, cap)
    check_result(res, lv, lc, cap)
    assert_optimal(res, brute_force(lv, lc, cap))
    # mixed: numpy values, list costs
    res2 = solve_mckp(values, lc, cap)
    assert res2.value == pytest.approx(res.value, rel=1e-12)


def test_bad_input_rejected():
    with pytest.raises(ValueError):
        solve_mckp([[1.0, 2.0]], [[1.0]], 1.0)
    with pytest.raises(ValueError):
        solve_mckp([[1.0]], [[1.0], [2.0]], 1.0)
    with pytest.raises(ValueError):
        solve_mckp([[]], [[]], 1.0)
    with pytest.raises(ValueError):
        solve_mckp([[1.0, float("nan")]], [[1.0, 2.0]], 1.0)
    with pytest.raises(ValueError):
        solve_mckp([[1.0]], [[1.0]], float("nan"))


def test_no_groups():
    res = solve_mckp([], [], 1.0)
    assert res.choice.shape == (0,) and res.value == 0.0 and res.cost == 0.0


# --------------------------------------------------------------------------------------------------
# exactness at scale against an independent integer-cost DP


def integer_dp(values, costs, capacity):
    """Classic MCKP dynamic programme over integer capacities 0..capacity: best value (or -inf)."""
    neg = -np.inf
    best = np.full(capacity + 1, neg)
    best[0] = 0.0  # best[w] = best value with total cost exactly w
    for v, c in zip(values, costs):
        c = np.asarray(c, dtype=np.int64)
        new = np.full(capacity + 1, neg)
        for vj, cj in zip(v, c):
            if cj <= capacity:
                cand = best[: capacity + 1 - cj] + vj
                np.maximum(new[cj:], cand, out=new[cj:])
        best = new
    return float(best.max())


@pytest.mark.parametrize("seed", [0, 1])
def test_medium_instance_matches_integer_dp(seed):
    rng = np.random.default_rng(seed)
    values, costs = [], []
    for _ in range(40):
        n = int(rng.integers(80, 121))
        imp = np.sort(rng.lognormal(0.0, 1.0, n))[::-1]
        values.append(np.cumsum(imp))
        # staircase-ish small integer costs, not monotone
        steps = np.ceil(np.arange(1, n + 1) / 12.0)
        costs.append(np.maximum(steps + rng.integers(-1, 2, n), 0).astype(float))
    lo = int(sum(np.min(c) for c in costs))
    hi = int(sum(np.max(c) for c in costs))
    for frac in (0.0, 0.3, 0.55, 0.8, 0.97):
        cap = lo + int(frac * (hi - lo))
        res = solve_mckp(values, costs, float(cap))
        check_result(res, values, costs, cap)
        assert_optimal(res, integer_dp(values, costs, cap))


def test_medium_staircase_matches_integer_dp():
    rng = np.random.default_rng(42)
    values, costs = staircase_instance(rng, 40, max_channels=512, integer_costs=True, noise=0.3)
    lo = int(sum(np.min(c) for c in costs))
    hi = int(sum(np.max(c) for c in costs))
    for frac in (0.3, 0.5, 0.7, 0.9):
        cap = lo + int(frac * (hi - lo))
        res = solve_mckp(values, costs, float(cap))
        check_result(res, values, costs, cap)
        assert_optimal(res, integer_dp(values, costs, cap))


def test_medium_unstructured_instance_matches_integer_dp():
    """Weakly correlated, non-monotone values (incl. negative) on integer costs."""
    rng = np.random.default_rng(17)
    for _ in range(3):
        n_groups = int(rng.integers(10, 20))
        costs = [rng.integers(0, 15, int(rng.integers(1, 30))).astype(float) for _ in range(n_groups)]
        values = [c + rng.normal(0.0, 2.0, c.size) for c in costs]
        lo = int(sum(np.min(c) for c in costs))
        hi = int(sum(np.max(c) for c in costs))
        for frac in (0.1, 0.4, 0.7):
            cap = lo + int(frac * (hi - lo))
            res = solve_mckp(values, costs, float(cap))
            check_result(res, values, costs, cap)
            assert_optimal(res, integer_dp(values, costs, cap))


def test_chunked_frontier_search_is_exact(monkeypatch):
    """Tiny candidate chunks (the path taken for huge frontiers) give the same optimum."""
    from smcp_core.prune import knapsack

    rng = np.random.default_rng(8)
    cases = []
    for _ in range(40):
        values, costs = random_instance(rng)
        cases.append((values, costs, capacities(rng, costs, n=2)))
    monkeypatch.setattr(knapsack, "_CHUNK", 3)
    for values, costs, caps in cases:
        for cap in caps:
            res = solve_mckp(values, costs, cap)
            check_result(res, values, costs, cap)
            assert_optimal(res, brute_force(values, costs, cap))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensor_inputs():
    rng = np.random.default_rng(2)
    values, costs = staircase_instance(rng, 5, max_channels=32)
    cap = 0.5 * (sum(np.min(c) for c in costs) + sum(np.max(c) for c in costs))
    tv = [torch.as_tensor(v, device="cuda") for v in values]
    tc = [torch.as_tensor(c, device="cuda", dtype=torch.float32) for c in costs]
    res = solve_mckp(tv, tc, cap)
    cc = [c.double().cpu().numpy() for c in tc]
    check_result(res, values, cc, cap)
    assert_optimal(res, brute_force(values, cc, cap))


# --------------------------------------------------------------------------------------------------
# the prepared instance and the vectorised reduction give the same answers


def test_one_instance_solved_at_several_capacities_matches_fresh_solves():
    rng = np.random.default_rng(23)
    for _ in range(30):
        values, costs = random_instance(rng)
        inst = McKpInstance(values, costs)
        for cap in capacities(rng, costs, n=4):
            try:
                fresh = solve_mckp(values, costs, cap)
            except InfeasibleTarget:
                with pytest.raises(InfeasibleTarget):
                    inst.solve(cap)
                continue
            again = inst.solve(cap)
            assert torch.equal(again.choice, fresh.choice) and again.value == fresh.value
            assert_optimal(again, brute_force(values, costs, cap))


def test_vectorised_reduction_keeps_what_the_per_group_one_keeps():
    """All options reduced at once (one LP table per group, zeroed own segments) = one group at a time."""
    from smcp_core.prune import knapsack

    rng = np.random.default_rng(5)
    for _ in range(5):
        values, costs = staircase_instance(rng, 30, max_channels=512, integer_costs=False, noise=0.2)
        inst = McKpInstance(values, costs)
        segs = knapsack._Segments(inst.p_c, inst.p_v)
        full = float(sum(c.max() for c in inst.p_c))
        for frac in (0.3, 0.5, 0.8):
            cap = frac * full
            lb = float(sum(inst.p_v[g][k] for g, k in
                           enumerate(knapsack._greedy_feasible(inst.p_c, inst.p_v, segs, cap))))
            thr = lb - inst.eps
            fast = knapsack._reduce(inst.p_c, inst.p_v, segs, cap, thr)
            slow = knapsack._reduce_per_group(inst.p_c, inst.p_v, segs, cap, thr)
            assert (fast is None) == (slow is None)
            if fast is not None:
                assert all(np.array_equal(a, b) for a, b in zip(fast, slow))


def test_instances_sharing_a_memo_match_fresh_solves():
    """Instances built with a shared per-group memo (the allocator's: one per mask update, most
    groups' option lists shared between linearisations) solve like fresh ones."""
    rng = np.random.default_rng(31)
    memo: dict = {}
    values, costs = staircase_instance(rng, 12, max_channels=128, noise=0.1)
    values = [torch.as_tensor(v) for v in values]
    costs = [torch.as_tensor(c) for c in costs]
    for _ in range(20):
        g = int(rng.integers(0, len(costs)))  # one group's options change, the rest are reused
        costs = list(costs)
        costs[g] = torch.as_tensor(np.maximum(costs[g].numpy() + rng.normal(0.0, 0.1, costs[g].numel()), 0.0))
        shared, fresh = McKpInstance(values, costs, memo), McKpInstance(values, costs)
        for cap in capacities(rng, [c.numpy() for c in costs], n=3):
            try:
                want = fresh.solve(cap)
            except InfeasibleTarget:
                with pytest.raises(InfeasibleTarget):
                    shared.solve(cap)
                continue
            got = shared.solve(cap)
            assert torch.equal(got.choice, want.choice) and got.value == want.value and got.cost == want.cost
    assert len(memo) <= len(values) + 20  # an entry per distinct (values, costs) pair
    with pytest.raises(ValueError):
        McKpInstance([[1.0, 2.0]], [[1.0]], {})
    with pytest.raises(ValueError):
        McKpInstance([[1.0]], [[1.0], [2.0]], {})


def test_lp_upper_bound_is_above_the_optimum():
    """The LP bound (the hub search's test for skipping a candidate) is never below the optimum,
    is -inf exactly when nothing fits, and is the optimum when every group's best option fits."""
    from smcp_core.prune.knapsack import lp_upper_bound

    rng = np.random.default_rng(13)
    memo: dict = {}
    for it in range(300):
        if it % 2:
            values, costs = random_instance(rng)
        else:
            values, costs = staircase_instance(rng, int(rng.integers(1, 5)), max_channels=48)
        for cap in capacities(rng, costs, n=3):
            best = brute_force(values, costs, cap)
            ub = lp_upper_bound(values, costs, cap, memo if it % 3 else None)
            if best is None:
                assert ub == -math.inf
            else:
                assert ub >= best - 1e-9 * max(1.0, abs(best))
        top = float(sum(np.max(c) for c in costs))
        exact = brute_force(values, costs, top)
        assert lp_upper_bound(values, costs, top) == pytest.approx(exact, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError):
        lp_upper_bound([[1.0]], [[1.0], [2.0]], 1.0)
