"""Bit allocation: DP frontier, ILP and HAWQ-V1 rule against brute force on small problems."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hawq.maths.allocation import (Allocation, allocate, hawq_v1_allocate, ilp_allocate,
                             pareto_frontier, select_on_frontier, uniform_points)
from hawq.maths.budgets import Budget, fits, size_in_unit, size_limit_bits
from hawq.base.errors import BudgetError, ConfigError

BIT_POOL = np.array([1, 2, 3, 4, 5, 6, 8, 16])


# ----------------------------------------------------------------------------- helpers

def make_problem(rng, L=None, B=None, ints=True, forbid=0.0):
    L = int(rng.integers(1, 9)) if L is None else L
    B = int(rng.integers(1, 5)) if B is None else B
    bits = np.sort(rng.choice(BIT_POOL, B, replace=False))
    params = rng.choice([3, 5, 8, 9, 16], L).astype(float)  # many layers share a count
    if ints:
        omega = rng.integers(0, 15, (L, B)).astype(float)
    else:
        omega = rng.random((L, B)) * 10 ** rng.uniform(-3, 3)
    if forbid:
        mask = rng.random((L, B)) < forbid
        mask[np.arange(L), rng.integers(0, B, L)] = False  # every layer keeps a choice
        omega[mask] = np.inf
    bops = rng.integers(0, 40, (L, B)).astype(float)
    latency = rng.integers(0, 30, (L, B)).astype(float)
    return omega, params, bits, bops, latency


def all_plans(L, B):
    return np.indices((B,) * L).reshape(L, -1).T  # (B**L, L)


def plan_sums(plans, matrix):
    total = np.zeros(plans.shape[0])
    for layer in range(plans.shape[1]):  # layer by layer, like the DP
        total = total + matrix[layer, plans[:, layer]]
    return total


def structural_ok(plans, tied=(), pinned=None):
    ok = np.ones(plans.shape[0], dtype=bool)
    for i, j in tied:
        ok &= plans[:, i] == plans[:, j]
    for i, c in (pinned or {}).items():
        ok &= plans[:, i] == c
    return ok


def brute_frontier(sizes, omegas):
    keep = np.isfinite(omegas)
    sizes, omegas = sizes[keep], omegas[keep]
    order = np.lexsort((omegas, sizes))
    out_s, out_w, best = [], [], np.inf
    for s, w in zip(sizes[order], omegas[order]):
        if w < best and (not out_s or s != out_s[-1]):
            out_s.append(s)
            out_w.append(w)
            best = w
    return np.array(out_s), np.array(out_w)


def brute_best(omega, plans, limits):
    """Least total omega over ``plans`` meeting every (matrix, limit); None if infeasible."""
    w = plan_sums(plans, omega)
    ok = np.isfinite(w)
    for matrix, limit in limits:
        ok &= plan_sums(plans, matrix) <= limit + 1e-9 * max(1.0, abs(limit))
    return float(w[ok].min()) if ok.any() else None


def stated(msg, pattern=r"smallest feasible (?:value|size|\w+) is (?:r=)?([-0-9.e+]+)"):
    m = re.search(pattern, msg)
    assert m, msg
    return float(m.group(1))


# ----------------------------------------------------------------------------- budgets

def test_budget_conversions():
    n, b = np.array([100.0, 300.0]), np.array([2, 4, 8])
    assert size_limit_bits(Budget("compression", 8), n, b) == 4 * 400  # all-4-bit is exactly 8x
    assert size_limit_bits(Budget("avg_bits", 3), n, b) == 1200
    assert size_limit_bits(Budget("bytes", 500), n, b) == 4000
    assert size_limit_bits(Budget("bytes", 500), n, b, fixed_bits=800) == 3200
    assert size_limit_bits(Budget("fraction", 0), n, b) == 800
    assert size_limit_bits(Budget("fraction", 1), n, b) == 3200
    assert size_limit_bits(Budget("fraction", 0.5), n, b) == 2000
    assert size_in_unit("compression", 1600, n, b) == 8
    assert size_in_unit("bytes", 3200, n, b, fixed_bits=800) == 500
    assert size_in_unit("fraction", 2000, n, b) == 0.5


@pytest.mark.parametrize("kind,value,word", [
    ("ratio", 8, "kind"), ("compression", 0, "> 0"), ("bytes", -1, "> 0"),
    ("fraction", 1.5, "[0, 1]"), ("avg_bits", float("nan"), "finite"), ("bytes", "x", "number")])
def test_budget_validation(kind, value, word):
    with pytest.raises(ConfigError, match=re.escape(word)):
        Budget(kind, value)


def test_argument_errors():
    omega, params, bits, bops, _ = make_problem(np.random.default_rng(0), L=3, B=3)
    with pytest.raises(ConfigError, match="method"):
        allocate(omega, params, bits, None, method="greedy")
    with pytest.raises(ConfigError, match="shape"):
        allocate(omega[:, :2], params, bits)
    with pytest.raises(ConfigError, match="method='ilp'"):
        allocate(omega, params, bits, None, bops=bops, bops_limit=10)
    with pytest.raises(ConfigError, match="bops matrix"):
        allocate(omega, params, bits, None, method="ilp", bops_limit=10)
    with pytest.raises(ConfigError, match="Budget"):
        allocate(omega, params, bits, 1000)
    with pytest.raises(ConfigError, match="out of range"):
        allocate(omega, params, bits, None, tied=[(0, 7)])
    with pytest.raises(ConfigError, match="repeats"):
        allocate(omega, params, [4, 4, 8])
    bad = omega.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ConfigError, match=r"omega\[1, 2\]"):
        pareto_frontier(bad, params, bits)
    forb = omega.copy()
    forb[0, 1] = np.inf
    with pytest.raises(ConfigError, match="forbidden"):
        allocate(forb, params, bits, None, pinned={0: 1})
    with pytest.raises(ConfigError, match="no choice allowed"):
        allocate(omega, params, bits, None, method="ilp", tied=[(0, 1)], pinned={0: 0, 1: 2})
    with pytest.raises(ConfigError, match="max_points"):
        pareto_frontier(omega, params, bits, max_points=1)
    dead = omega.copy()
    dead[2] = np.inf
    with pytest.raises(ConfigError, match="layer 2 has no allowed choice"):
        allocate(dead, params, bits)
    with pytest.raises(ConfigError, match="time_limit"):
        ilp_allocate(omega, time_limit=0)
    a = allocate(omega, params, bits, None, "ilp", tied=np.array([[0, 1], [1, 2]]))
    assert len(set(a.choices)) == 1


# ----------------------------------------------------------------------------- frontier

def check_frontier(omega, params, bits, tied=(), pinned=None, exact_omega=True):
    size = params[:, None] * bits[None, :]
    front = pareto_frontier(omega, params, bits, tied=tied, pinned=pinned)
    plans = all_plans(*omega.shape)
    plans = plans[structural_ok(plans, tied, pinned)]
    bs, bw = brute_frontier(plan_sums(plans, size), plan_sums(plans, omega))
    np.testing.assert_array_equal(front.sizes, bs)
    if exact_omega:
        np.testing.assert_array_equal(front.omegas, bw)
    else:
        np.testing.assert_allclose(front.omegas, bw, rtol=1e-12, atol=0)
    assert front.exact and front.size_slack == 0
    C = front.choices
    assert C.shape == (len(front), omega.shape[0])
    np.testing.assert_array_equal(plan_sums(C, size), front.sizes)
    np.testing.assert_allclose(plan_sums(C, omega), front.omegas, rtol=1e-12)
    assert structural_ok(C, tied, pinned).all()
    np.testing.assert_array_equal(front.plan(-1), C[-1])
    return front, plans, size


def test_frontier_matches_brute_force_seeded():
    rng = np.random.default_rng(1)
    for trial in range(120):
        ints = trial % 2 == 0
        L, B = (8, 4) if trial < 6 else (None, None)
        omega, params, bits, _, _ = make_problem(rng, L, B, ints=ints,
                                                 forbid=0.2 if trial % 3 == 0 else 0.0)
        check_frontier(omega, params, bits, exact_omega=ints)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6).flatmap(lambda L: st.tuples(
    st.just(L), st.integers(1, 4), st.lists(st.integers(0, 6), min_size=24, max_size=24),
    st.lists(st.integers(1, 4), min_size=L, max_size=L))))
def test_frontier_matches_brute_force_hypothesis(case):
    L, B, costs, counts = case
    omega = np.array(costs[:L * B], dtype=float).reshape(L, B)  # small ints: many ties
    bits = BIT_POOL[:B].astype(float)
    check_frontier(omega, np.array(counts, dtype=float), bits)


def test_frontier_tied_pinned_and_selection():
    rng = np.random.default_rng(2)
    for trial in range(30):
        omega, params, bits, _, _ = make_problem(rng, L=int(rng.integers(3, 8)), B=3)
        tied = [(0, 2)] + ([(1, 2)] if trial % 2 else [])
        pinned = {omega.shape[0] - 1: int(rng.integers(0, 3))}
        front, plans, size = check_frontier(omega, params, bits, tied=tied, pinned=pinned)
        for limit in rng.uniform(front.sizes[0] - 5, front.sizes[-1] + 5, 5):
            want = brute_best(omega, plans, [(size, limit)])
            if want is None:
                with pytest.raises(BudgetError, match="smallest feasible size"):
                    select_on_frontier(front, limit)
            else:
                k = select_on_frontier(front, limit)
                assert front.sizes[k] <= limit and front.omegas[k] == want


def test_frontier_thinned_is_real_and_covers():
    rng = np.random.default_rng(3)
    for _ in range(10):
        omega, params, bits, _, _ = make_problem(rng, L=8, B=4, ints=False)
        params = rng.integers(1, 1000, 8).astype(float)
        exact = pareto_frontier(omega, params, bits)
        thin = pareto_frontier(omega, params, bits, max_points=12)
        assert len(thin) <= 12 and thin.sizes[0] == exact.sizes[0]
        size = params[:, None] * bits
        np.testing.assert_array_equal(plan_sums(thin.choices, size), thin.sizes)
        np.testing.assert_allclose(plan_sums(thin.choices, omega), thin.omegas, rtol=1e-12)
        if len(exact) > 12:
            assert not thin.exact and thin.size_slack > 0
        for s, w in zip(exact.sizes, exact.omegas):  # the documented coverage guarantee
            assert np.any((thin.sizes <= s + thin.size_slack) & (thin.omegas <= w * (1 + 1e-12)))


# ----------------------------------------------------------------------------- ILP / allocate

SIZE_KINDS = ["bytes", "compression", "avg_bits", "fraction"]


def budget_for(kind, params, bits, size_bits, fixed_bits=0.0):
    return Budget(kind, size_in_unit(kind, size_bits, params, bits, fixed_bits=fixed_bits))


def test_ilp_and_frontier_match_brute_force_every_budget_kind():
    rng = np.random.default_rng(4)
    for trial in range(32):
        ints = trial % 4 != 3
        omega, params, bits, bops, latency = make_problem(
            rng, L=int(rng.integers(2, 7)), B=int(rng.integers(2, 5)), ints=ints,
            forbid=0.15 if trial % 5 == 0 else 0.0)
        size = params[:, None] * bits
        plans = all_plans(*omega.shape)
        fixed = 64.0 if trial % 2 else 0.0
        target = rng.uniform(size.min(1).sum(), size.max(1).sum())
        budget = budget_for(SIZE_KINDS[trial % 4], params, bits, target, fixed)
        limit = size_limit_bits(budget, params, bits, fixed_bits=fixed)
        want = brute_best(omega, plans, [(size, limit)])
        for method in ("ilp", "frontier"):
            if want is None:
                with pytest.raises(BudgetError):
                    allocate(omega, params, bits, budget, method, fixed_bits=fixed)
                continue
            got = allocate(omega, params, bits, budget, method, fixed_bits=fixed, bops=bops)
            assert fits(got.size_bits, limit)
            assert got.total_omega == pytest.approx(want, rel=1e-9, abs=1e-12)
            assert got.bops == plan_sums(np.array([got.choices]), bops)[0]
        # bops, latency, and combinations with tied and pinned layers
        L = omega.shape[0]
        bl = float(rng.uniform(bops.min(1).sum(), bops.max(1).sum()))
        ll = float(rng.uniform(latency.min(1).sum(), latency.max(1).sum()))
        tied = [(0, L - 1)] if trial % 3 == 0 else []
        pinned = {1: int(np.flatnonzero(np.isfinite(omega[1]))[0])} if trial % 4 == 1 else None
        ok = structural_ok(plans, tied, pinned)
        if not (ok & np.isfinite(plan_sums(plans, omega))).any():
            with pytest.raises(ConfigError):
                ilp_allocate(omega, tied=tied, pinned=pinned)
            continue
        for combo in ([(bops, bl)], [(latency, ll)], [(size, limit), (bops, bl)],
                      [(size, limit), (bops, bl), (latency, ll)]):
            want = brute_best(omega, plans[ok], combo)
            kw = {}
            for matrix, lim in combo:
                name = "size" if matrix is size else "bops" if matrix is bops else "latency"
                kw[name] = (matrix, lim)
            if want is None:
                with pytest.raises(BudgetError, match="smallest feasible"):
                    ilp_allocate(omega, tied=tied, pinned=pinned, **kw)
                continue
            choices = ilp_allocate(omega, tied=tied, pinned=pinned, **kw)
            plan = np.array([choices])
            assert structural_ok(plan, tied, pinned)[0]
            for matrix, lim in combo:
                assert fits(plan_sums(plan, matrix)[0], lim)
            assert plan_sums(plan, omega)[0] == pytest.approx(want, rel=1e-9, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2 ** 32 - 1))
def test_ilp_matches_brute_force_hypothesis(seed):
    rng = np.random.default_rng(seed)
    omega, params, bits, bops, _ = make_problem(rng, forbid=0.1)
    size = params[:, None] * bits
    plans = all_plans(*omega.shape)
    limit = float(rng.uniform(size.min(1).sum() - 3, size.max(1).sum()))
    bl = float(rng.uniform(bops.min(1).sum() - 3, bops.max(1).sum()))
    want = brute_best(omega, plans, [(size, limit), (bops, bl)])
    if want is None:
        with pytest.raises(BudgetError):
            ilp_allocate(omega, size=(size, limit), bops=(bops, bl))
    else:
        choices = ilp_allocate(omega, size=(size, limit), bops=(bops, bl))
        assert plan_sums(np.array([choices]), omega)[0] == want


def test_no_budget_gives_least_omega_and_to_dict():
    omega, params, bits, bops, latency = make_problem(np.random.default_rng(5), L=5, B=3)
    for method in ("frontier", "ilp"):
        a = allocate(omega, params, bits, None, method, bops=bops, latency=latency)
        assert isinstance(a, Allocation) and a.method == method and a.optimal
        assert a.total_omega == omega.min(axis=1).sum()
        assert a.bits == [int(bits[c]) for c in a.choices]
        assert a.avg_bits == pytest.approx(a.size_bits / params.sum())
        assert a.compression == pytest.approx(32 * params.sum() / a.size_bits)
        d = json.loads(json.dumps(a.to_dict()))
        assert d["choices"] == a.choices and d["method"] == method


def test_fraction_limits_for_bops_and_latency():
    rng = np.random.default_rng(6)
    omega, params, bits, bops, latency = make_problem(rng, L=6, B=3)
    plans = all_plans(6, 3)
    for r in (0.0, 0.3, 1.0):
        bl = bops.min(1).sum() + r * (bops.max(1).sum() - bops.min(1).sum())
        a = allocate(omega, params, bits, None, "ilp", bops=bops, bops_limit=Budget("fraction", r))
        assert a.bops <= bl + 1e-9
        assert a.total_omega == brute_best(omega, plans, [(bops, bl)])
    with pytest.raises(ConfigError, match="fraction"):
        allocate(omega, params, bits, None, "ilp", bops=bops,
                 bops_limit=Budget("compression", 4))


# ----------------------------------------------------------------------------- infeasible

@pytest.mark.parametrize("method", ["frontier", "ilp"])
@pytest.mark.parametrize("kind", SIZE_KINDS)
def test_infeasible_size_budget_states_smallest_value(kind, method):
    rng = np.random.default_rng(7)
    omega, params, bits, _, _ = make_problem(rng, L=6, B=3, forbid=0.3)
    omega[:, 2] = np.where(np.isfinite(omega[:, 2]), omega[:, 2], 7.0)
    if kind == "fraction":
        omega[:, 0] = np.inf  # lowest bits forbidden everywhere: the smallest feasible r is > 0
    omega[0, :] = [np.inf, 1.0, 2.0]
    size = params[:, None] * bits
    tied, pinned = [(2, 3)], {5: int(np.flatnonzero(np.isfinite(omega[5]))[-1])}
    plans = all_plans(6, 3)
    ok = structural_ok(plans, tied, pinned) & np.isfinite(plan_sums(plans, omega))
    smallest = plan_sums(plans[ok], size).min()
    fixed = 40.0 if kind == "bytes" else 0.0
    best = size_in_unit(kind, smallest, params, bits, fixed_bits=fixed)
    tight = best * 1.05 if kind == "compression" else best * 0.95
    if kind == "fraction":
        tight = 0.0
    with pytest.raises(BudgetError) as err:
        allocate(omega, params, bits, Budget(kind, tight), method, fixed_bits=fixed, tied=tied,
                 pinned=pinned)
    msg = str(err.value)
    pattern = (r"highest achievable compression is ([0-9.e+-]+)x" if kind == "compression"
               else r"smallest feasible value is ([0-9.e+-]+)")
    value = stated(msg, pattern)
    assert value == pytest.approx(best, rel=1e-9)
    assert f"Budget({kind!r}" in msg
    a = allocate(omega, params, bits, Budget(kind, value), method, fixed_bits=fixed, tied=tied,
                 pinned=pinned)  # the stated value is feasible
    assert a.size_bits == smallest


def test_infeasible_fraction_when_only_highest_allowed():
    omega = np.array([[np.inf, np.inf, 1.0], [1.0, 2.0, 3.0]])
    params, bits = np.array([10.0, 10.0]), np.array([2, 4, 8])
    for method in ("frontier", "ilp"):
        with pytest.raises(BudgetError, match=r"smallest feasible value is 1 \(fraction r\) "
                                              r"\(160 weight bits\)"):
            allocate(omega, params, bits, Budget("fraction", 0.99), method, tied=[(0, 1)])
        assert allocate(omega, params, bits, Budget("fraction", 1), method, tied=[(0, 1)]).bits \
            == [8, 8]


def test_infeasible_bops_and_latency_state_smallest_value():
    rng = np.random.default_rng(8)
    for trial in range(12):
        omega, params, bits, bops, latency = make_problem(rng, L=5, B=3)
        size = params[:, None] * bits
        plans = all_plans(5, 3)
        limit = float(np.quantile(plan_sums(plans, size), 0.3))
        fit = plan_sums(plans, size) <= limit
        # BOPs alone, then BOPs under the size limit
        for combo, ok in (({}, np.ones_like(fit)), ({"size": (size, limit)}, fit)):
            least = plan_sums(plans[ok], bops).min()
            with pytest.raises(BudgetError) as err:
                ilp_allocate(omega, bops=(bops, least - 0.5), **combo)
            assert stated(str(err.value)) == least
            if combo:
                assert "together with size" in str(err.value)
            ilp_allocate(omega, bops=(bops, least), **combo)
        # latency binding under size and bops (allocate front-end, plain numbers)
        bl = float(np.quantile(plan_sums(plans[fit], bops), 0.5))
        ok = fit & (plan_sums(plans, bops) <= bl)
        least = plan_sums(plans[ok], latency).min()
        budget = Budget("avg_bits", limit / params.sum())
        with pytest.raises(BudgetError, match="latency_limit") as err:
            allocate(omega, params, bits, budget, "ilp", bops=bops, bops_limit=bl,
                     latency=latency, latency_limit=least - 0.5)
        assert stated(str(err.value)) == least
        a = allocate(omega, params, bits, budget, "ilp", bops=bops, bops_limit=bl,
                     latency=latency, latency_limit=least)
        assert a.latency <= least and a.bops <= bl


# ----------------------------------------------------------------------------- HAWQ-V1

def test_hawq_v1_rule():
    rng = np.random.default_rng(9)
    for trial in range(60):
        L, B = int(rng.integers(1, 12)), int(rng.integers(1, 5))
        bits = rng.permutation(rng.choice(BIT_POOL, B, replace=False))  # any order
        params = rng.integers(1, 100, L).astype(float)
        sens = rng.integers(0, 4, L).astype(float) if trial % 2 else rng.random(L)
        size = params[:, None] * bits
        limit = float(rng.uniform(size.min(1).sum() * 0.9, size.max(1).sum() * 1.05))
        if limit < size.min(1).sum():
            with pytest.raises(BudgetError, match="smallest"):
                hawq_v1_allocate(sens, params, bits, limit)
            continue
        a = hawq_v1_allocate(sens, params, bits, limit)
        got = np.array(a.bits, dtype=float)
        assert a.size_bits <= limit and a.method == "hawq-v1"
        more = sens[:, None] > sens[None, :]
        assert not np.any(more & (got[:, None] < got[None, :]))  # the ordering holds
        # level sweeps: layers span at most two adjacent levels, or the top level and the one
        # below it; minimal: raising the most recently lowered layer one step would not fit
        ladder = np.sort(bits)
        lev = np.searchsorted(ladder, got)
        assert lev.max() - lev.min() <= 1 or lev.max() == len(ladder) - 1
        if lev.min() < len(ladder) - 1:
            low = lev.min()
            order = list(np.lexsort((np.arange(L), sens)))
            at_low = [i for i in order if lev[i] == low]
            last = at_low[-1]
            up = ladder[low + 1]
            assert a.size_bits + params[last] * (up - got[last]) > limit
        else:
            assert a.bits == [int(ladder[-1])] * L


def test_hawq_v1_budget_and_omega():
    params, bits = np.array([10.0, 20.0, 30.0]), [8, 4, 2]
    sens = np.array([3.0, 1.0, 2.0])
    a = hawq_v1_allocate(sens, params, bits, Budget("compression", 8),
                         omega=np.ones((3, 3)))
    assert a.compression >= 8 and a.total_omega == 3.0
    assert a.bits == [4, 4, 4]  # one sweep 8 -> 4 (least sensitive first) reaches the budget
    b = hawq_v1_allocate(sens, params, bits, Budget("compression", 10))
    assert b.bits == [4, 2, 2]  # second sweep 4 -> 2, least sensitive first, until it fits
    with pytest.raises(BudgetError, match="highest achievable compression is 16x"):
        hawq_v1_allocate(sens, params, bits, Budget("compression", 20))


# ----------------------------------------------------------------------------- scale

def realistic(L, rng, resnet_counts=True):
    base = [9 * 64 * 64, 64 * 64, 64 * 256, 9 * 128 * 128, 128 * 512, 256 * 1024, 9 * 256 * 256,
            512 * 2048, 9 * 512 * 512, 2048 * 1000]
    if resnet_counts:
        n = np.array([base[i % len(base)] for i in range(L)], dtype=float)
    else:
        n = rng.integers(100, 2_000_000, L).astype(float)
    bits = np.array([2, 3, 4, 8])
    trace = 10 ** rng.uniform(-3, 1, L)
    noise = rng.uniform(0.8, 1.2, (L, 4))
    return trace[:, None] * n[:, None] * 4.0 ** -bits[None, :] * noise, n, bits


@pytest.mark.parametrize("resnet_counts", [True, False])
def test_timing_200_layers(resnet_counts):
    omega, params, bits = realistic(200, np.random.default_rng(10), resnet_counts)
    t0 = time.perf_counter()
    front = pareto_frontier(omega, params, bits)
    t_front = time.perf_counter() - t0
    budget = Budget("compression", 8.5)
    limit = size_limit_bits(budget, params, bits)
    k = select_on_frontier(front, limit)
    t0 = time.perf_counter()
    a = allocate(omega, params, bits, budget, "ilp")
    t_ilp = time.perf_counter() - t0
    print(f"\n200x4 ({'resnet' if resnet_counts else 'random'} counts): frontier "
          f"{t_front:.3f} s, K={len(front)}; ILP {t_ilp:.3f} s")
    assert t_front < 10 and t_ilp < 10
    assert a.total_omega == pytest.approx(front.omegas[k], rel=1e-9)
    assert a.size_bits <= limit and front.sizes[k] <= limit


def test_uniform_points():
    omega = np.array([[3.0, 2.0, np.inf], [5.0, 1.0, 0.5]])
    pts = uniform_points(omega, [10, 20], [2, 4, 8])
    assert pts == {2: (60.0, 8.0), 4: (120.0, 3.0)}


def test_highs_prints_nothing(capfd):
    omega, params, bits = realistic(60, np.random.default_rng(11))
    for r in (0.1, 0.3, 0.5):
        allocate(omega, params, bits, Budget("fraction", r), "ilp")
    out, _ = capfd.readouterr()
    assert "tmpSolver" not in out


def test_format_value_rounds_towards_feasible():
    from hawq.maths.budgets import format_value
    assert format_value(160.0) == "160" and format_value(123456.375) == "123456.375"
    assert format_value(1e-05) == "1e-05" and format_value(8.0) == "8"
    x = 1 / 3
    assert float(format_value(x, "up")) >= x and float(format_value(x, "down")) <= x
    assert float(format_value(x, "up")) == pytest.approx(x, rel=1e-9)


def test_infeasible_bops_fraction_states_r():
    omega = np.array([[np.inf, 1.0, 2.0], [1.0, 2.0, 3.0]])
    params, bits = np.array([10.0, 10.0]), np.array([2, 4, 8])
    bops = np.array([[4.0, 16.0, 64.0], [4.0, 16.0, 64.0]])  # range 8..128
    with pytest.raises(BudgetError, match=r"bops_limit=Budget\('fraction', 0\) is infeasible: "
                                          r"the smallest feasible value is r=0\.1\b"):
        allocate(omega, params, bits, None, "ilp", bops=bops, bops_limit=Budget("fraction", 0))
    a = allocate(omega, params, bits, None, "ilp", bops=bops, bops_limit=Budget("fraction", 0.1))
    assert a.bops == 20 and a.choices == [1, 0]
