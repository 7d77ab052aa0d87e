"""hawq.post.refine: the exchange search measures real quantized models, respects the budget, ends
at a local optimum of its objective and leaves the model as it found it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn as nn
import torch.nn.functional as F

from hawq import BitPlan, BudgetError, ConfigError, DataError, LayerSpec, quantize_
from hawq.maths.allocation import allocate
from hawq.maths.budgets import Budget
from hawq.post.refine import AUTO_REFINE_MAX_BITS, auto_refines, refine_plan

NAMES = ["0", "2", "4", "6"]
BITS = np.array([2, 3, 4, 8])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                         nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5))


def _data(n: int = 200):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def _params(model: nn.Module) -> np.ndarray:
    return np.array([model.get_submodule(n).weight.numel() for n in NAMES], dtype=float)


def _measure(bits, x, y=None) -> float:
    """The objective computed independently: quantize a fresh copy with hawq.quantize_."""
    ref = _model()
    q = _model()
    quantize_(q, BitPlan({n: LayerSpec(int(b), 32) for n, b in zip(NAMES, bits)}))
    with torch.no_grad():
        lq = F.log_softmax(q(x), -1)
        if y is not None:
            return float(F.nll_loss(lq, y))
        return float(F.kl_div(lq, F.log_softmax(ref(x), -1), log_target=True,
                              reduction="batchmean"))


def _start(params, budget, seed=3):
    # a deliberately poor start: the ILP over random costs
    rnd = np.random.default_rng(seed).random((len(NAMES), len(BITS)))
    return allocate(rnd, params, BITS, budget, "ilp").choices


def test_refined_plan_is_measured_right_fits_and_is_a_local_optimum():
    model, (x, _) = _model(), _data()
    params = _params(model)
    budget = Budget("avg_bits", 3.5)
    start = _start(params, budget)
    omega = np.zeros((len(NAMES), len(BITS)))   # no prediction: every move ranks alike
    r = refine_plan(model, x, NAMES, BITS, omega, start, params, budget, candidates=1000)
    assert r.start_choices == list(start)
    assert r.value <= r.start_value
    assert r.value == pytest.approx(_measure(r.bits, x), rel=1e-4, abs=1e-7)
    assert r.start_value == pytest.approx(_measure(r.start_bits, x), rel=1e-4, abs=1e-7)
    limit = 3.5 * params.sum()
    assert float((params * np.array(r.bits)).sum()) <= limit + 1e-6
    assert r.evaluations >= 1 + len(r.moves)
    # brute force: no exchange of one bit-width step up and one down that fits lowers the KL
    levels = list(BITS)
    for i, j in itertools.permutations(range(len(NAMES)), 2):
        bi, bj = levels.index(r.bits[i]), levels.index(r.bits[j])
        if bi + 1 >= len(levels):
            continue
        for dj in (0, -1):
            if bj + dj < 0:
                continue
            trial = list(r.bits)
            trial[i], trial[j] = levels[bi + 1], levels[bj + dj]
            if float((params * np.array(trial)).sum()) <= limit + 1e-6:
                assert _measure(trial, x) >= r.value - 1e-7, (i, j, trial)


def test_refinement_improves_a_poor_start_and_restores_the_model():
    model, (x, y) = _model(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = _params(model)
    budget = Budget("compression", 8)
    start = _start(params, budget, seed=5)
    r = refine_plan(model, (x, y), NAMES, BITS, np.zeros((4, 4)), start, params, budget,
                    objective="loss", candidates=1000)
    assert r.value == pytest.approx(_measure(r.bits, x, y), rel=1e-4)
    assert r.value < r.start_value           # the random start is far from the best plan
    assert r.moves and r.moves[-1]["value"] == r.value
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training


def test_pinned_layers_keep_their_bits_and_no_rounds_means_no_change():
    model, (x, _) = _model(), _data()
    params = _params(model)
    budget = Budget("avg_bits", 4)
    start = _start(params, budget)
    r = refine_plan(model, x, NAMES, BITS, np.zeros((4, 4)), start, params, budget,
                    pinned=[0, 3], candidates=1000)
    assert r.choices[0] == start[0] and r.choices[3] == start[3]
    r0 = refine_plan(model, x, NAMES, BITS, np.zeros((4, 4)), start, params, budget,
                     max_rounds=0)
    assert r0.choices == list(start) and r0.evaluations == 1


def test_refine_errors_name_the_fix():
    model, (x, _) = _model(), _data()
    params = _params(model)
    start = [3, 3, 3, 3]                     # all 8-bit: over a 4-bit average budget
    with pytest.raises(BudgetError, match="start plan already exceeds"):
        refine_plan(model, x, NAMES, BITS, np.zeros((4, 4)), start, params, Budget("avg_bits", 4))
    with pytest.raises(ConfigError, match="objective"):
        refine_plan(model, x, NAMES, BITS, np.zeros((4, 4)), start, params, objective="mse")
    with pytest.raises(DataError, match="data"):
        refine_plan(model, x, NAMES, BITS, np.zeros((4, 4)), start, params, objective="loss")
    with pytest.raises(ConfigError, match="omega"):
        refine_plan(model, x, NAMES, BITS, np.zeros((3, 4)), start, params)


def test_exchanges_that_need_several_layers_down_or_up_are_offered():
    from hawq.post.refine import _Moves

    # one 40-weight layer at 4 bits, four 10-weight layers at 8: raising the big one to 8 bits
    # needs all four small ones at 4, which no one-for-one exchange reaches
    params, bits = np.array([40.0, 10, 10, 10, 10]), np.array([4, 8])
    size = params[:, None] * bits[None, :]
    omega = np.array([[1.0, 0.0]] * 5)             # each layer costs 1 at 4 bits, 0 at 8
    space = _Moves(omega, [("budget", size, 160.0 + 320.0)], np.zeros(5, bool),
                   np.array([0, 1]))
    plans = [tuple(t) for _, t in space.candidates(np.array([0, 1, 1, 1, 1]))]
    assert (1, 0, 0, 0, 0) in plans
    # and back: the big layer down frees enough to raise all four small ones
    plans = [tuple(t) for _, t in space.candidates(np.array([1, 0, 0, 0, 0]))]
    assert (0, 1, 1, 1, 1) in plans


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(0, 10_000), st.floats(0.05, 0.95))
def test_every_candidate_fits_keeps_pins_and_predicts_its_omega_change(n, seed, r):
    from hawq.post.refine import _Moves

    rng = np.random.default_rng(seed)
    params = rng.integers(1, 50, n).astype(float)
    size = params[:, None] * BITS[None, :]
    limit = size[:, 0].sum() + r * (size[:, -1].sum() - size[:, 0].sum())
    omega = np.sort(rng.random((n, 4)), axis=1)[:, ::-1].copy()   # fewer bits, more cost
    c = allocate(rng.random((n, 4)), params, BITS, Budget("avg_bits", limit / params.sum()),
                 "ilp").choices
    c = np.array(c)
    frozen = rng.random(n) < 0.3
    space = _Moves(omega, [("budget", size, limit)], frozen, np.arange(4))
    rows = np.arange(n)
    for predicted, trial in space.candidates(c):
        assert size[rows, trial].sum() <= limit * (1 + 1e-9)
        assert (trial[frozen] == c[frozen]).all() and not (trial == c).all()
        assert predicted == pytest.approx(omega[rows, trial].sum() - omega[rows, c].sum(),
                                          abs=1e-9)


def test_auto_refine_threshold_is_on_the_parameter_weighted_mean_bits():
    assert AUTO_REFINE_MAX_BITS == 3.5
    assert auto_refines([2, 8], [3, 1])  # (6 + 8) / 4 = 3.5
    assert not auto_refines([2, 8], [2, 1])  # 12 / 3 = 4
    assert not auto_refines([8, 2], [3, 1])  # same bits, weights swap: 26 / 4 = 6.5
    assert auto_refines([3, 3, 3], [10, 1, 5]) and not auto_refines([4] * 3, [1, 1, 1])
