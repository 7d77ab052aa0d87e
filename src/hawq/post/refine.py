"""Plan refinement: a local search that checks an allocated plan on the whole quantized model.

Every allocator here sums per-layer costs (Omega_i(b)) and so assumes the layers' errors add up.
They do not quite: errors interact through the network. :func:`refine_plan` starts from an
allocated plan and tries *exchanges* within the same budget — one layer one bit width up and,
to pay for it, one or more layers one bit width down, or one layer down and the budget it frees
spent on raising others — ranked by their predicted cost change; it measures the candidates on
calibration data with every layer quantized at once and keeps the best exchange that lowers the
measured objective, until none does. Only the measured objective decides, so a refined plan
never scores worse than its start on the data it was refined on.

Objectives, both through a :class:`hawq.feed.tasks.Task` (default ``"classification"``): ``"kl"``
(default), the task's divergence of the quantized model's output from the float model's per
sample (for classifiers and causal LMs the KL divergence of the softmaxes; squared error for
other outputs), needs no labels (it works on distilled ZeroQ inputs); ``"loss"``, the task's mean
loss (cross-entropy against labels for classifiers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from hawq.base import dist
from hawq.maths.allocation import Allocation, make_allocation
from hawq.maths.budgets import (Budget, as_bits, as_matrix, as_omega, as_params, fits, resource_limit,
                          size_limit_bits, size_matrix, slack)
from hawq.base.errors import BudgetError, ConfigError, NumericalError
from hawq.modules.passes import model_device, naming, read_batches
from hawq.maths.plan import QuantConfig
from hawq.maths.quantizers import is_float
from hawq.analysis.sensitivity import fake_quantized_weight, layer_weights
from hawq.feed.tasks import Task, as_task, batch_len, batch_to

__all__ = ["AUTO_REFINE_MAX_BITS", "OBJECTIVES", "Refinement", "auto_refines", "refine_plan"]

OBJECTIVES = ("kl", "loss")
#: ``refine="auto"`` (the default of :class:`hawq.post.pipeline.CompressConfig`) refines a plan whose
#: weights average at most this many bits per parameter (above ~9x weight compression of FP32).
#: Measured on CIFAR-10 ResNet-20/56 (``benchmarks/refinement.py``): below 4 bits the per-layer
#: cost model misses how layer errors interact; refinement never lost there and gained up to 7.3
#: points; at 4-5.3 average bits it changed accuracy by -0.19 to +0.07 points, within the
#: held-out data's noise.
AUTO_REFINE_MAX_BITS = 3.5


@dataclass
class Refinement:
    """A refined plan. ``choices[l]`` indexes ``bits``; ``start_*`` describe the plan it began
    from; ``value``/``start_value`` are the measured objective (mean KL or cross-entropy on the
    refinement data); ``moves`` lists the accepted exchanges in order (``layers``: name ->
    [old bits, new bits], ``value`` after it, ``predicted_delta`` in ``omega``); ``evaluations``
    counts the forward passes over the data; ``allocation`` is the refined plan as
    :func:`hawq.maths.allocation.allocate` reports one (method ``"refined"``, ``total_omega`` under the
    ranking ``omega``); ``value``/``start_value`` are per sample of the data."""

    choices: list[int]
    bits: list[float]
    start_choices: list[int]
    start_bits: list[float]
    objective: str
    value: float
    start_value: float
    rounds: int
    evaluations: int
    moves: list[dict[str, Any]] = field(default_factory=list)
    allocation: Allocation | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


def auto_refines(bits: Sequence[float], params: Sequence[float]) -> bool:
    """Whether ``refine="auto"`` refines a plan with per-layer weight ``bits`` over layers of
    ``params`` weights: True when the parameter-weighted mean bit width is at most
    :data:`AUTO_REFINE_MAX_BITS`. Free (no data)."""
    b, p = np.asarray(bits, dtype=float), np.asarray(params, dtype=float)
    return bool(p.sum() > 0 and float(b @ p) / float(p.sum()) <= AUTO_REFINE_MAX_BITS + 1e-9)


def _limits(params: np.ndarray, bits: np.ndarray, shape: tuple[int, int], budget: Budget | None,
            size: Any, bops: Any, bops_limit: Any, latency: Any, latency_limit: Any
            ) -> list[tuple[str, np.ndarray, float]]:
    out = []
    if budget is not None:
        if not isinstance(budget, Budget):
            raise ConfigError(f"budget={budget!r}: give a Budget, e.g. Budget('compression', 8), "
                              "or None for no size limit")
        out.append(("budget", size_matrix(params, bits, size),
                    size_limit_bits(budget, params, bits, size=size)))
    for name, matrix, lim in (("bops", bops, bops_limit), ("latency", latency, latency_limit)):
        if lim is None:
            continue
        if matrix is None:
            raise ConfigError(f"{name}_limit given without the {name} matrix: pass {name}=(L, B) "
                              "array")
        m = as_matrix(matrix, shape, name)
        out.append((f"{name}_limit", m, resource_limit(lim, m, f"{name}_limit")))
    return out


class _Moves:
    """Candidate moves around a plan ``c`` (choice indices): every one changes bits one step at a
    time along ``order`` (choice indices from fewest to most bits) and keeps every limit."""

    def __init__(self, omega: np.ndarray, limits: list[tuple[str, np.ndarray, float]],
                 frozen: np.ndarray, order: np.ndarray) -> None:
        self.omega, self.limits, self.frozen, self.order = omega, limits, frozen, order
        self.rank = np.empty_like(order)
        self.rank[order] = np.arange(order.size)
        self.rows = np.arange(omega.shape[0])

    def steps(self, c: np.ndarray) -> tuple[np.ndarray, ...]:
        """(up choice, down choice, can go up, can go down) per layer."""
        cur, top = self.rank[c], self.order.size - 1
        return (self.order[np.minimum(cur + 1, top)], self.order[np.maximum(cur - 1, 0)],
                (cur < top) & ~self.frozen, (cur > 0) & ~self.frozen)

    def excess(self, c: np.ndarray) -> np.ndarray:
        """How far ``c`` is over each limit (<= 0: fits)."""
        return np.array([float(m[self.rows, c].sum()) - lim - slack(lim)
                         for _, m, lim in self.limits])

    def repair(self, c: np.ndarray, locked: int) -> tuple[np.ndarray, float] | None:
        """Lower layers (not ``locked``) one step at a time, cheapest predicted cost per unit of
        the excess freed first, until ``c`` fits; None when it cannot."""
        c, delta = c.copy(), 0.0
        for _ in range(self.rows.size * self.order.size):
            over = self.excess(c)
            if (over <= 0).all():
                return c, delta
            _, down, _, can_down = self.steps(c)
            can_down[locked] = False
            freed = sum((m[self.rows, c] - m[self.rows, down]) / e
                        for (_, m, _), e in zip(self.limits, over) if e > 0)
            cost = self.omega[self.rows, down] - self.omega[self.rows, c]
            score = np.where(can_down & (freed > 0), cost / np.maximum(freed, 1e-300), np.inf)
            k = int(np.argmin(score))
            if not np.isfinite(score[k]):
                return None
            delta += float(cost[k])
            c[k] = down[k]
        return None

    def fill(self, c: np.ndarray, locked: int) -> tuple[np.ndarray, float]:
        """Raise layers (not ``locked``) one step at a time while one still fits, largest
        predicted saving first."""
        c, delta = c.copy(), 0.0
        for _ in range(self.rows.size * self.order.size):
            up, _, can_up, _ = self.steps(c)
            can_up[locked] = False
            gain = self.omega[self.rows, up] - self.omega[self.rows, c]
            ok = can_up & (gain < 0)
            for _, m, lim in self.limits:
                ok &= float(m[self.rows, c].sum()) + m[self.rows, up] - m[self.rows, c] \
                    <= lim + slack(lim)
            if not ok.any():
                break
            k = int(np.argmin(np.where(ok, gain, np.inf)))
            delta += float(gain[k])
            c[k] = up[k]
        return c, delta

    def candidates(self, c: np.ndarray) -> list[tuple[float, np.ndarray]]:
        """Feasible moves as (predicted omega change, new plan), cheapest first: one layer up
        (alone where it fits, else with one other layer down, else with as many layers down as
        the limits need) and one layer down with the freed budget spent on raising others."""
        n, rows, om = c.size, self.rows, self.omega
        up, down, can_up, can_down = self.steps(c)
        d_up = om[rows, up] - om[rows, c]
        d_dn = om[rows, down] - om[rows, c]
        single = can_up.copy()
        pair = can_up[:, None] & can_down[None, :] & ~np.eye(n, dtype=bool)
        for _, m, lim in self.limits:
            total = float(m[rows, c].sum())
            grow, shrink = m[rows, up] - m[rows, c], m[rows, down] - m[rows, c]
            single &= total + grow <= lim + slack(lim)
            pair &= total + grow[:, None] + shrink[None, :] <= lim + slack(lim)
        pair &= ~single[:, None]          # an up move that fits alone needs no partner
        out: dict[bytes, tuple[float, np.ndarray]] = {}

        def add(delta: float, trial: np.ndarray) -> None:
            key = trial.tobytes()
            if not np.array_equal(trial, c) and (key not in out or delta < out[key][0]):
                out[key] = (delta, trial)

        for i in np.flatnonzero(can_up):
            trial = c.copy()
            trial[i] = up[i]
            if single[i]:
                add(float(d_up[i]), trial)
                continue
            for j in np.flatnonzero(pair[i]):
                t2 = trial.copy()
                t2[j] = down[j]
                add(float(d_up[i] + d_dn[j]), t2)
            fixed = self.repair(trial, int(i))
            if fixed is not None:
                add(float(d_up[i]) + fixed[1], fixed[0])
        for j in np.flatnonzero(can_down):
            trial = c.copy()
            trial[j] = down[j]
            filled, gain = self.fill(trial, int(j))
            if gain < 0:
                add(float(d_dn[j]) + gain, filled)
        return sorted(out.values(), key=lambda m: m[0])


def refine_plan(model: nn.Module, data: Any, names: Sequence[str], bits: Sequence[float],
                omega: Any, start: Sequence[int], params: Any, budget: Budget | None = None, *,
                size: Any = None, bops: Any = None, bops_limit: Any = None, latency: Any = None,
                latency_limit: Any = None, pinned: Mapping[int, int] | Sequence[int] | None = None,
                objective: str = "kl", candidates: int = 16, max_rounds: int = 50,
                config: QuantConfig | None = None, batch_size: int = 256,
                progress: bool = False, task: Task | str | None = None) -> Refinement:
    """Refine the plan ``start`` (choice indices into ``bits``, e.g. ``allocate(...).choices``).

    ``omega`` (L, B) ranks the candidate exchanges (the allocator's own cost matrix); ``params``,
    ``budget``, ``size`` and the BOPs/latency matrices and limits are those given to
    :func:`hawq.maths.allocation.allocate`: every exchange keeps the plan within all of them. Layers in
    ``pinned`` (layer indices, or allocate's index -> choice mapping) keep their start bits.
    Exchanges: one layer one bit width up, paid for by one other layer one step down (or, where
    no single one frees enough, by as many steps down as the limits need, cheapest per freed
    unit first), or one layer one step down with what it frees spent on raising others.
    Each round measures the ``candidates`` exchanges with the lowest predicted cost change and
    keeps the best one that lowers the objective; the search stops when none does or after
    ``max_rounds``. Weights only (activations float during the search), with
    the weight quantizer of ``config`` (as :func:`hawq.quantize_`). The model is restored.

    ``data``: held-out data in any form :func:`hawq.feed.tasks.iter_batches` reads (labels needed only
    by ``objective="loss"`` for tasks with labels); ``task`` (default ``"classification"``) feeds
    the model and gives the objective: ``"kl"`` sums ``task.divergence`` of the quantized output
    from the float output (computed once and kept) over the batches, ``"loss"`` sums
    ``task.loss`` times each batch's samples; both are divided by the number of samples. A task
    that compares with the float model (``"embedding"``) and is not bound yet is bound to
    ``model`` as it comes in (float weights).

    Returns a :class:`Refinement`. Cost: at most 1 + max_rounds * candidates forward passes over
    ``data`` (plus one float pass for ``"kl"``); no Hessian-vector products.

    Distributed (:mod:`hawq.base.dist`, every rank calling it with the same arguments): a
    round's candidates are independent, so rank r measures candidates r, r+N, ... on all of
    ``data`` and one all-reduce of the round's (at most ``candidates``) values gives every rank
    all of them; every rank then takes the same decision, so the result (moves, plan, values,
    ``evaluations`` counted over all ranks) is exactly the single-process one. Per rank: the
    float and start passes plus ceil(candidates / N) passes per round, and per round one
    all-reduce of the round's candidate values (at most ``candidates`` numbers, the same count
    on every rank) after :mod:`hawq.base.dist`'s failure check. A rank that fails stops the others with
    :class:`hawq.base.dist.RankFailedError` naming it.
    """
    with dist.guard():
        return _refine_plan(model, data, names, bits, omega, start, params, budget, size=size,
                            bops=bops, bops_limit=bops_limit, latency=latency,
                            latency_limit=latency_limit, pinned=pinned, objective=objective,
                            candidates=candidates, max_rounds=max_rounds, config=config,
                            batch_size=batch_size, progress=progress, task=task)


def _refine_plan(model: nn.Module, data: Any, names: Sequence[str], bits: Sequence[float],
                 omega: Any, start: Sequence[int], params: Any, budget: Budget | None, *,
                 size: Any, bops: Any, bops_limit: Any, latency: Any, latency_limit: Any,
                 pinned: Mapping[int, int] | Sequence[int] | None, objective: str,
                 candidates: int, max_rounds: int, config: QuantConfig | None, batch_size: int,
                 progress: bool, task: Task | str | None) -> Refinement:
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective={objective!r}: use one of {OBJECTIVES}")
    if candidates < 1 or max_rounds < 0:
        raise ConfigError(f"candidates={candidates}, max_rounds={max_rounds}: need candidates "
                          ">= 1 and max_rounds >= 0")
    config = config or QuantConfig()
    task = as_task(task)
    batches = read_batches(data, batch_size, "data")
    samples = batches.samples
    b, n = as_bits(bits), as_params(params)
    om = as_omega(omega)
    if om.shape != (n.size, b.size) or len(names) != n.size:
        raise ConfigError(f"omega has shape {om.shape}, {len(names)} names and {n.size} params: "
                          "give len(names) = len(params) layers and (L, len(bits)) omega")
    c = np.asarray(start, dtype=int)
    if c.shape != (n.size,) or c.min() < 0 or c.max() >= b.size:
        raise ConfigError(f"start must give one choice index in [0, {b.size}) per layer")
    limits = _limits(n, b, om.shape, budget, size, bops, bops_limit, latency, latency_limit)
    for what, m, lim in limits:
        if not fits(float(m[np.arange(n.size), c].sum()), lim):
            raise BudgetError(f"the start plan already exceeds {what}: refine a plan from "
                              "allocate() with the same limits")
    frozen = np.zeros(n.size, dtype=bool)
    frozen[[int(k) for k in (pinned or ())]] = True
    space = _Moves(om, limits, frozen, np.argsort(b, kind="stable"))

    device = model_device(model)
    if task.reference is None:
        task = task.bind(model)   # a copy of the float model where the task needs one
    weights = layer_weights(model, names)
    originals = [w.detach().clone() for w in weights]
    quantized = [[orig if is_float(bb) else fake_quantized_weight(orig, int(bb), config) for bb in b]
                 for orig in originals]
    was_training = model.training
    model.eval()

    try:
        with torch.no_grad(), naming("data"):
            ref = ([task.forward(model, batch_to(bt, device)) for bt in batches]
                   if objective == "kl" else None)
        loaded = np.full(n.size, -1)     # choice whose weights each layer holds (-1: float)

        @torch.no_grad()
        def measure(choice: np.ndarray) -> float:
            for i in np.flatnonzero(choice != loaded):   # only the layers that change
                weights[i].data.copy_(quantized[i][choice[i]])
                loaded[i] = choice[i]
            total = 0.0
            with naming("data"):
                for i, bt in enumerate(batches):
                    bt = batch_to(bt, device)
                    out = task.forward(model, bt)
                    if ref is not None:
                        total += float(task.divergence(out, ref[i], bt))
                    else:
                        total += float(task.loss(out, bt)) * batch_len(bt)
            if not np.isfinite(total):
                raise NumericalError(f"the {objective} objective is NaN/inf for plan "
                                     f"{[float(b[k]) for k in choice]}: check the data and model")
            return total / samples

        def measure_all(trials: list[np.ndarray]) -> list[float]:
            """Every trial's value: this rank measures its share (all of them in a single
            process), one all-reduce of len(trials) numbers fills in the others'."""
            values = torch.zeros(len(trials), dtype=torch.float64)
            for k in dist.shard(range(len(trials))):
                values[k] = measure(trials[k])
            return dist.all_reduce_sum(values).tolist()

        start_c = c.copy()
        value = start_value = measure(c)   # on every rank: cheaper than sending it
        evaluations = 1
        moves: list[dict[str, Any]] = []
        rounds = 0
        bar = tqdm(total=max_rounds, desc="refining plan", disable=not progress or
                   not dist.is_main(), leave=False)
        while rounds < max_rounds:
            rounds += 1
            best = None
            ranked = space.candidates(c)[:candidates]
            values = measure_all([trial for _, trial in ranked])
            evaluations += len(ranked)
            for (predicted, trial), v in zip(ranked, values):
                if v < value and (best is None or v < best[0]):
                    best = (v, trial, predicted)
            bar.update()
            if best is None:
                break
            v, trial, predicted = best
            changed = np.flatnonzero(trial != c)
            moves.append({"layers": {names[k]: [float(b[c[k]]), float(b[trial[k]])]
                                     for k in changed},
                          "value": v, "predicted_delta": predicted})
            value, c = v, trial
            bar.set_postfix({objective: f"{value:.4g}"})
        bar.close()
    finally:
        for w, orig in zip(weights, originals):
            w.data.copy_(orig)
        model.train(was_training)
    bm, lm = (None if m is None else as_matrix(m, om.shape, what)
              for what, m in (("bops", bops), ("latency", latency)))
    alloc = make_allocation(c, om, n, b, size_matrix(n, b, size), bm, lm, "refined",
                             optimal=False)
    return Refinement(choices=[int(k) for k in c], bits=[float(b[k]) for k in c],
                      start_choices=[int(k) for k in start_c],
                      start_bits=[float(b[k]) for k in start_c], objective=objective,
                      value=value, start_value=start_value, rounds=rounds,
                      evaluations=evaluations, moves=moves, allocation=alloc)
