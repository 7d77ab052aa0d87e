"""Mixed-precision bit allocation over arrays: Pareto frontier, integer program, HAWQ-V1 rule.

Problem form: ``L`` layers, ``B`` choices per layer (usually bit widths ``bits``). ``omega[l, b]``
is the cost of giving layer ``l`` choice ``b`` (the sum over layers is minimised; ``+inf`` forbids
a choice); ``params[l]`` is its weight count; resources are (L, B) matrices: ``size`` in bits
(default ``params[:, None] * bits[None, :]``), ``bops`` and ``latency``.

* :func:`pareto_frontier` (HAWQ-V2 / ZeroQ): the exact set of non-dominated (size, total omega)
  plans by dynamic programming over layers, with every point's plan recoverable.
* :func:`ilp_allocate` (HAWQ-V3): least total omega under size/BOPs/latency limits at once, with
  tied and pinned layers, as a binary program solved by ``scipy.optimize.milp`` (HiGHS).
* :func:`hawq_v1_allocate` (HAWQ-V1): a deterministic relative-precision-ordering rule.
* :func:`allocate`: one front-end taking a :class:`~hawq.maths.budgets.Budget` and returning an
  :class:`Allocation`; it dispatches by name through :data:`ALLOCATORS` (``frontier``, ``ilp``,
  ``v1-rule``; add one with ``@register_allocator("name")`` on ``fn(AllocationProblem)``).

Tied layers (``tied=[(i, j), ...]``) must get the same choice index; they are merged into one
group whose cost and resources are the sums of its members', which is exact for both methods.
Pinned layers (``pinned={i: choice}``) keep only that choice. No torch inside.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from hawq.maths.budgets import (Budget, as_bits, as_matrix, as_omega, as_params, fits, format_value,
                          resource_in_unit, resource_limit, size_budget_message,
                          size_limit_bits, size_matrix, slack)
from hawq.base.errors import BudgetError, ConfigError, HawqError
from hawq.base.registry import Registry

__all__ = ["ALLOCATORS", "Allocation", "AllocationProblem", "Budget", "Frontier", "allocate",
           "hawq_v1_allocate", "ilp_allocate", "make_allocation", "omega_allocators",
           "pareto_frontier",
           "register_allocator", "select_on_frontier", "uniform_points"]


# ----------------------------------------------------------------------------- results

@dataclass
class Allocation:
    """One plan: ``choices[l]`` indexes ``bits``; sizes in bits over the quantized weights.

    ``optimal`` is False when the plan is only near-optimal (a thinned frontier, an ILP stopped by
    its time limit, or an ILP limit tightened to absorb solver tolerance). ``total_omega`` is None
    when no cost matrix was given (HAWQ-V1 rule without ``omega``).
    """

    choices: list[int]
    bits: list[float]
    total_omega: float | None
    size_bits: float
    bops: float | None
    latency: float | None
    avg_bits: float
    compression: float
    method: str
    optimal: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (lists, floats, ints, str, bool, None)."""
        return asdict(self)


def _num(x: float) -> float | int:
    x = float(x)
    return int(x) if x.is_integer() and abs(x) < 2 ** 53 else x


def make_allocation(choices: np.ndarray, omega: np.ndarray | None, params: np.ndarray,
                    bits: np.ndarray, size: np.ndarray, bops: np.ndarray | None,
                    latency: np.ndarray | None, method: str, optimal: bool) -> Allocation:
    """The :class:`Allocation` of choice indices ``choices`` (L,) over ``bits`` (B,): totals of
    ``omega``/``size``/``bops``/``latency`` (L, B; None leaves that total None), average bits
    and compression over ``params``. For allocators (see :data:`ALLOCATORS`) and searches that
    build plans themselves. Cost: O(L)."""
    rows = np.arange(choices.size)
    size_bits = float(size[rows, choices].sum())
    total_n = float(params.sum())
    return Allocation(
        choices=[int(c) for c in choices], bits=[_num(bits[c]) for c in choices],
        total_omega=None if omega is None else float(omega[rows, choices].sum()),
        size_bits=_num(size_bits),
        bops=None if bops is None else _num(bops[rows, choices].sum()),
        latency=None if latency is None else float(latency[rows, choices].sum()),
        avg_bits=size_bits / total_n,
        compression=32.0 * total_n / size_bits if size_bits > 0 else math.inf,
        method=method, optimal=bool(optimal))




# ----------------------------------------------------------------------------- tied / pinned

@dataclass
class _Groups:
    """Layers merged by ``tied`` into groups; arrays summed per group."""

    of_layer: np.ndarray          # (L,) group index of each layer
    omega: np.ndarray             # (G, B), +inf where forbidden or unpinned
    mats: list[np.ndarray]        # (G, B) each

    def allowed(self) -> np.ndarray:
        return np.isfinite(self.omega)


def _index(value: Any, n: int, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{what}={value!r}: give an integer index")
    if not 0 <= int(value) < n:
        raise ConfigError(f"{what}={value!r} is out of range: valid indices are 0..{n - 1}")
    return int(value)


def _reduce(omega: np.ndarray, mats: Sequence[np.ndarray], tied: Iterable[Any],
            pinned: Mapping[Any, Any] | None) -> _Groups:
    L, B = omega.shape
    parent = list(range(L))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for pair in [] if tied is None else tied:
        if isinstance(pair, np.ndarray):
            pair = pair.tolist()
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ConfigError(f"tied entry {pair!r}: give pairs of layer indices, e.g. "
                              "tied=[(0, 3), (3, 5)]")
        i, j = (_index(p, L, f"tied layer in {tuple(pair)!r}") for p in pair)
        parent[root(i)] = root(j)
    roots = [root(i) for i in range(L)]
    _, of_layer = np.unique(roots, return_inverse=True)
    of_layer = of_layer.ravel()
    G = int(of_layer.max()) + 1
    om = np.array(omega, dtype=float)
    if pinned:
        if not isinstance(pinned, Mapping):
            raise ConfigError(f"pinned={pinned!r}: give a dict {{layer index: choice index}}")
        for layer, choice in pinned.items():
            layer = _index(layer, L, "pinned layer")
            choice = _index(choice, B, f"pinned[{layer}]")
            if not np.isfinite(om[layer, choice]):
                raise ConfigError(f"pinned[{layer}]={choice} but omega[{layer}, {choice}] is "
                                  "+inf (forbidden): pin an allowed choice")
            keep = om[layer, choice]
            om[layer] = np.inf
            om[layer, choice] = keep
    gom = np.zeros((G, B))
    np.add.at(gom, of_layer, om)
    gmats = []
    for m in mats:
        gm = np.zeros((G, B))
        np.add.at(gm, of_layer, m)
        gmats.append(gm)
    dead = ~np.isfinite(gom).any(axis=1)
    if dead.any():
        members = np.flatnonzero(of_layer == np.flatnonzero(dead)[0]).tolist()
        if len(members) == 1:
            raise ConfigError(f"layer {members[0]} has no allowed choice (omega is +inf in every "
                              "column): allow at least one bit width")
        raise ConfigError(f"layers {members} (tied together) have no choice allowed for all of "
                          "them: check their pinned choices and +inf entries of omega")
    return _Groups(of_layer, gom, gmats)


# ----------------------------------------------------------------------------- Pareto frontier

@dataclass(eq=False)
class Frontier:
    """Non-dominated plans: ``sizes`` ascending (bits), ``omegas`` strictly descending.

    ``choices`` is the (K, L) plan matrix, reconstructed lazily from compact per-step back-pointers
    (int32 parent + int8 choice per point) and cached; ``plan(k)`` reconstructs a single plan.
    ``exact`` is False when ``max_points`` thinned the frontier; then every plan listed is real
    (its size and omega are exact) and, for every true frontier point (s, w), some listed plan has
    size <= s + ``size_slack`` and omega <= w.
    """

    sizes: np.ndarray
    omegas: np.ndarray
    exact: bool = True
    size_slack: float = 0.0
    _steps: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)
    _step_group: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _of_layer: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _choices: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.sizes.size)

    @property
    def n_layers(self) -> int:
        return int(self._of_layer.size)

    def _trace(self, ks: np.ndarray) -> np.ndarray:
        dtype = self._steps[0][1].dtype if self._steps else np.int8
        out = np.empty((ks.size, len(self._steps)), dtype=dtype)
        idx = ks
        for step in range(len(self._steps) - 1, -1, -1):
            parents, choices = self._steps[step]
            out[:, self._step_group[step]] = choices[idx]
            idx = parents[idx]
        return out[:, self._of_layer]

    @property
    def choices(self) -> np.ndarray:
        """(K, L) choice indices of every frontier point (small int dtype, cached)."""
        if self._choices is None:
            self._choices = self._trace(np.arange(len(self)))
        return self._choices

    def plan(self, k: int) -> np.ndarray:
        """Choice indices (L,) of frontier point ``k`` (negative ``k`` counts from the end)."""
        k = _index(k + len(self) if isinstance(k, (int, np.integer)) and k < 0 else k,
                   len(self), "frontier point k")
        return self._trace(np.array([k]))[0].astype(np.int64)


def pareto_frontier(omega: Any, params: Any = None, bits: Any = None, *, size: Any = None,
                    tied: Iterable[Any] = (), pinned: Mapping[int, int] | None = None,
                    max_points: int | None = None) -> Frontier:
    """Exact (size, total omega) Pareto frontier by dynamic programming over layers.

    Give ``size`` (L, B) in bits, or ``params`` and ``bits`` (size = params x bits). Layers are
    merged one at a time (largest size range first, which keeps intermediate frontiers small):
    candidates = points x allowed choices, stable-sorted by size, pruned with a running minimum of
    omega; among equal sizes the lowest omega survives, and among equal (size, omega) the lowest
    choice index, then the lowest parent. ``max_points`` (default None = exact) caps the points
    kept after each layer by keeping the lowest-omega point per size bucket (the minimum-size point
    always survives); see :class:`Frontier` for the resulting guarantee.
    """
    om = as_omega(omega)
    if size is None:
        if params is None or bits is None:
            raise ConfigError("pareto_frontier needs size=(L, B) matrix in bits, or params and "
                              "bits")
        sz = size_matrix(params, bits)
    else:
        sz = as_matrix(size, om.shape, "size")
    if sz.shape != om.shape:
        raise ConfigError(f"omega has shape {om.shape} but params x bits gives {sz.shape}: give "
                          "one row per layer and one column per bit width")
    if max_points is not None and (isinstance(max_points, bool) or not
                                   isinstance(max_points, (int, np.integer)) or max_points < 3):
        raise ConfigError(f"max_points={max_points!r}: give an integer >= 3, or None for the "
                          "exact frontier")
    groups = _reduce(om, [sz], tied, pinned)
    gom, gsz = groups.omega, groups.mats[0]
    G, B = gom.shape
    choice_dtype = np.int8 if B <= 127 else np.int16
    allowed = groups.allowed()
    span = np.where(allowed, gsz, -np.inf).max(1) - np.where(allowed, gsz, np.inf).min(1)
    order = np.argsort(-span, kind="stable")
    S, W = np.zeros(1), np.zeros(1)
    steps: list[tuple[np.ndarray, np.ndarray]] = []
    slack_total, exact = 0.0, True
    for g in order:
        ch = np.flatnonzero(allowed[g])
        K = S.size
        cs = (gsz[g, ch][:, None] + S[None, :]).ravel()
        cw = (gom[g, ch][:, None] + W[None, :]).ravel()
        srt = np.argsort(cs, kind="stable")  # B sorted runs: a merge, deterministic on ties
        cs, cw = cs[srt], cw[srt]
        prev = np.empty_like(cw)
        prev[0] = np.inf
        np.minimum.accumulate(cw[:-1], out=prev[1:])
        idx = np.flatnonzero(cw < prev)
        if idx.size > 1:  # equal sizes: keep the last (lowest-omega) survivor of each size
            last = np.empty(idx.size, dtype=bool)
            last[-1] = True
            np.not_equal(cs[idx[1:]], cs[idx[:-1]], out=last[:-1])
            idx = idx[last]
        if max_points is not None and idx.size > max_points:
            width = (cs[idx[-1]] - cs[idx[0]]) / (max_points - 2)
            bucket = np.floor((cs[idx] - cs[idx[0]]) / width)
            keep = np.empty(idx.size, dtype=bool)
            keep[-1] = True
            np.not_equal(bucket[1:], bucket[:-1], out=keep[:-1])
            keep[0] = True
            idx = idx[keep]
            slack_total += float(width)
            exact = False
        flat = srt[idx]
        steps.append(((flat % K).astype(np.int32), ch[flat // K].astype(choice_dtype)))
        S, W = cs[idx], cw[idx]
    return Frontier(sizes=S, omegas=W, exact=exact, size_slack=slack_total, _steps=steps,
                    _step_group=order, _of_layer=groups.of_layer)


def select_on_frontier(frontier: Frontier, size_limit: float) -> int:
    """Index of the least-omega frontier plan with size <= ``size_limit`` (bits).

    Raises :class:`BudgetError` stating the smallest feasible size when none fits.
    """
    limit = float(size_limit)
    if math.isnan(limit):
        raise ConfigError("size_limit is NaN: give a size in bits")
    k = int(np.searchsorted(frontier.sizes, limit + slack(limit), side="right")) - 1
    if k < 0:
        raise BudgetError(f"size_limit={format_value(limit)} bits is infeasible: the smallest "
                          f"feasible size is {format_value(frontier.sizes[0], 'up')} bits; give "
                          "at least that or allow lower bit widths")
    return k


def uniform_points(omega: Any, params: Any, bits: Any, *, size: Any = None
                   ) -> dict[float, tuple[float, float]]:
    """{bit width: (size bits, total omega)} of each uniform plan allowed in every layer
    (for :func:`hawq.base.plots.plot_frontier`)."""
    om = as_omega(omega)
    b = as_bits(bits)
    sz = size_matrix(params, bits, size)
    out = {}
    for j, bw in enumerate(b):
        if np.all(np.isfinite(om[:, j])):
            out[_num(bw)] = (float(sz[:, j].sum()), float(om[:, j].sum()))
    return out


# ----------------------------------------------------------------------------- integer program

@dataclass
class _Limit:
    """One resource constraint: sum matrix[l, choice_l] <= limit."""

    name: str
    matrix: np.ndarray
    limit: float
    describe: Callable[[float, str], str]  # (smallest feasible raw value, context) -> message


@contextlib.contextmanager
def _quiet_stdout():
    """Silence fd 1 while HiGHS runs: HiGHS 1.12 prints a stray debug line
    ("HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();") even when
    silent (ERGO-Code/HiGHS#2783)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    libc = None
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        if libc is not None:
            with contextlib.suppress(Exception):
                libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _objective_scale(cost: np.ndarray, allowed: np.ndarray) -> float:
    """Cost multiplier for HiGHS, whose absolute MIP gap is 1e-6.

    Integer costs (up to 1e9 after dividing by their gcd) are divided by their gcd, so the optimum
    is exact. Otherwise the lower bound R = sum of each group's least |cost| (the optimum is >= R
    when costs are >= 0) is scaled to 1e3, leaving a gap <= 1e-9 R, with the largest coefficient
    capped at 1e9.
    """
    finite = np.abs(cost[allowed])
    top = float(finite.max()) if finite.size else 0.0
    if top == 0.0:
        return 1.0
    if np.all(finite == np.round(finite)) and top < 2 ** 53:
        g = float(np.gcd.reduce(finite.astype(np.int64)))
        if top / g <= 1e9:
            return 1.0 / g
    ref = float(np.where(allowed, np.abs(cost), np.inf).min(axis=1).sum())
    if ref <= 0.0:
        ref = float(np.median(finite[finite > 0]))
    return min(1e3 / ref, 1e9 / top)


def _milp(cost: np.ndarray, allowed: np.ndarray, mats: Sequence[np.ndarray],
          limits: Sequence[float], time_limit: float | None, mip_rel_gap: float
          ) -> tuple[np.ndarray | None, bool]:
    """argmin sum cost[g, c_g] subject to sum mats[k][g, c_g] <= limits[k]; one choice per group.

    Returns (choices or None if infeasible, optimal). Verifies the rounded plan against the limits
    exactly and tightens a limit and re-solves if solver tolerance let a plan exceed it.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix, kron, vstack
    from scipy.sparse import eye as speye

    if not (isinstance(mip_rel_gap, (int, float)) and 0.0 <= mip_rel_gap < 1.0):
        raise ConfigError(f"mip_rel_gap={mip_rel_gap!r}: give a number in [0, 1)")
    if time_limit is not None and not (isinstance(time_limit, (int, float)) and time_limit > 0):
        raise ConfigError(f"time_limit={time_limit!r}: give seconds > 0, or None")
    G, B = cost.shape
    c = np.where(allowed, cost, 0.0).ravel() * _objective_scale(cost, allowed)
    ub = allowed.ravel().astype(float)
    rows = [kron(speye(G), np.ones((1, B)), format="csr")]
    lo, hi = [np.ones(G)], [np.ones(G)]
    scales = []
    for m in mats:
        top = float(np.abs(m).max()) or 1.0
        scales.append(top)
        rows.append(csr_matrix((m * allowed).ravel()[None, :] / top))
        lo.append(np.array([-np.inf]))
    margins = np.zeros(len(mats))
    optimal = True
    options: dict[str, Any] = {"mip_rel_gap": mip_rel_gap}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    A = vstack(rows, format="csr")
    for _attempt in range(6):
        rhs = [np.array([(lim + slack(lim) - mg) / s])
               for lim, mg, s in zip(limits, margins, scales)]
        constraint = LinearConstraint(A, np.concatenate(lo), np.concatenate(hi + rhs))
        with _quiet_stdout():
            res = milp(c, integrality=np.ones(G * B), bounds=Bounds(0.0, ub),
                       constraints=constraint, options=options)
        if res.status == 2:
            return None, optimal
        if res.x is None:
            raise HawqError(f"the integer program stopped without a plan ({res.message}); give a "
                            "larger time_limit or use method='frontier' for a size-only budget")
        if res.status == 1:
            warnings.warn(f"ILP stopped at its time limit ({res.message}); the plan is feasible "
                          "but may not be optimal", RuntimeWarning, stacklevel=3)
            optimal = False
        x = res.x.reshape(G, B)
        choices = np.where(allowed, x, -np.inf).argmax(axis=1)
        values = [float(m[np.arange(G), choices].sum()) for m in mats]
        over = [v - (lim + slack(lim)) for v, lim in zip(values, limits)]
        if all(o <= 0 for o in over):
            return choices, optimal
        optimal = False  # a tightened limit may cut off the true optimum by a hair
        for k, o in enumerate(over):
            if o > 0:
                margins[k] += 2 * o + slack(limits[k])
    raise HawqError("the integer program kept returning plans that exceed a limit by more than "
                    "the solver tolerance; rescale the resource matrices or use "
                    "method='frontier'")


def _min_resource(groups: _Groups, k: int, others: Sequence[int], limits: Sequence[float],
                  time_limit: float | None) -> float:
    """Smallest achievable sum of resource ``k`` subject to the limits ``others``."""
    m = groups.mats[k]
    allowed = groups.allowed()
    if not others:
        return float(np.where(allowed, m, np.inf).min(axis=1).sum())
    choices, _ = _milp(m, allowed, [groups.mats[o] for o in others], [limits[o] for o in others],
                       time_limit, 0.0)
    if choices is None:  # cannot happen when the others were shown jointly feasible
        raise HawqError("internal: resource minimisation infeasible")
    return float(m[np.arange(m.shape[0]), choices].sum())


def _solve(omega: np.ndarray, limits: Sequence[_Limit], tied: Iterable[Any],
           pinned: Mapping[int, int] | None, time_limit: float | None,
           mip_rel_gap: float) -> tuple[np.ndarray, bool]:
    groups = _reduce(omega, [lim.matrix for lim in limits], tied, pinned)
    raw = [lim.limit for lim in limits]
    choices, optimal = _milp(groups.omega, groups.allowed(), groups.mats, raw, time_limit,
                             mip_rel_gap)
    if choices is not None:
        return choices[groups.of_layer], optimal
    # Infeasible: find the first limit that cannot be met under the ones before it.
    for k, lim in enumerate(limits):
        best = _min_resource(groups, k, list(range(k)), raw, time_limit)
        if not fits(best, lim.limit):
            context = ""
            if k:
                context = "together with " + " and ".join(limits[o].name for o in range(k))
            raise BudgetError(lim.describe(best, context))
    raise HawqError("HiGHS reported the integer program infeasible although each limit can be "
                    "met; loosen a limit slightly or use method='frontier'")


def _raw_limit(subject: str, what: str, unit: str) -> Callable[[float, str], str]:
    def describe(best: float, context: str) -> str:
        where = f" {context}" if context else ""
        return (f"{subject} is infeasible{where}: the smallest feasible {what} is "
                f"{format_value(best, 'up')}{unit}; give at least that, or relax the other "
                "limits / allow lower bit widths")
    return describe


def _as_pair(value: Any, shape: tuple[int, int], name: str) -> tuple[np.ndarray, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError(f"{name}={value!r}: give a (matrix, limit) pair, matrix of shape "
                          f"{shape}")
    matrix = as_matrix(value[0], shape, f"{name} matrix")
    return matrix, resource_limit(value[1], matrix, f"{name} limit")


def ilp_allocate(omega: Any, size: tuple[Any, float] | None = None,
                 bops: tuple[Any, float] | None = None,
                 latency: tuple[Any, float] | None = None, *, tied: Iterable[Any] = (),
                 pinned: Mapping[int, int] | None = None, time_limit: float | None = None,
                 mip_rel_gap: float = 0.0) -> np.ndarray:
    """Least-total-omega plan meeting every given limit at once (HAWQ-V3 integer program).

    Each of ``size``/``bops``/``latency`` is ``(matrix (L, B), limit)`` in raw units (bits, BOPs,
    latency; ``Budget('fraction', r)`` is accepted as limit). Binary one-hot variables per layer
    (tied layers share theirs), solved by ``scipy.optimize.milp`` (HiGHS) with ``mip_rel_gap``
    (default 0: exact for integer costs, else optimal to about 1e-9 of the no-budget optimum; see
    ``_objective_scale``). Returns the choice index per layer (int64 array).
    Raises :class:`BudgetError` naming the smallest feasible value of the binding limit.
    """
    om = as_omega(omega)
    limits = []
    for name, value, unit in (("size", size, " bits"), ("bops", bops, " BOPs"),
                              ("latency", latency, "")):
        if value is not None:
            matrix, lim = _as_pair(value, om.shape, name)
            subject = f"{name} limit {format_value(lim)}{unit}"
            limits.append(_Limit(name, matrix, lim, _raw_limit(subject, name, unit)))
    return _solve(om, limits, tied, pinned, time_limit, mip_rel_gap)[0]


# ----------------------------------------------------------------------------- front-end

@dataclass
class AllocationProblem:
    """What an allocator (an entry of :data:`ALLOCATORS`) is given, checked by :func:`allocate`.

    ``omega`` (L, B) costs, ``params`` (L,) weight counts, ``bits`` (B,) choices, ``size`` (L, B)
    sizes in bits; ``budget`` (or None) and ``size_limit`` (its limit in bits, or None);
    ``bops``/``latency`` (L, B) matrices (or None) and their limits (raw values or
    :class:`Budget`); ``tied``/``pinned`` as in :func:`allocate`; ``sensitivity`` (L,) per-layer
    scores for rules that order layers (the HAWQ-V1 rule: lambda_i / n_i), or None;
    ``size_message(best, context)`` the error text for an infeasible size budget."""

    omega: np.ndarray
    params: np.ndarray
    bits: np.ndarray
    size: np.ndarray
    budget: Budget | None
    size_limit: float | None
    size_message: Callable[[float, str], str]
    bops: np.ndarray | None = None
    bops_limit: float | Budget | None = None
    latency: np.ndarray | None = None
    latency_limit: float | Budget | None = None
    tied: Iterable[Any] = ()
    pinned: Mapping[int, int] | None = None
    max_points: int | None = None
    time_limit: float | None = None
    sensitivity: np.ndarray | None = None
    fixed_bits: float = 0.0


#: Allocators: name -> fn(AllocationProblem) -> Allocation. ``allocate(..., method=name)``
#: dispatches through it; ``hawq compress --allocator`` offers its names.
ALLOCATORS: Registry[Callable[[AllocationProblem], Allocation]] = Registry("allocator")


def register_allocator(name: str, *, needs_sensitivity: bool = False) -> Callable:
    """Decorator registering ``fn(problem: AllocationProblem) -> Allocation`` as ``name``.
    ``needs_sensitivity``: the allocator orders layers by ``problem.sensitivity`` (per-layer
    scores, e.g. Hessian eigenvalues) rather than choosing from Omega alone."""
    def add(fn: Callable[[AllocationProblem], Allocation]) -> Callable:
        fn.needs_sensitivity = needs_sensitivity  # type: ignore[attr-defined]
        return ALLOCATORS.register(name)(fn)
    return add


def omega_allocators() -> list[str]:
    """Names of the allocators that choose from the cost matrix Omega alone (not ordering rules
    that need per-layer sensitivities): those a plan can be refined with and ZeroQ can use."""
    return [n for n in ALLOCATORS.names()
            if not getattr(ALLOCATORS.get(n), "needs_sensitivity", False)]


def allocate(omega: Any, params: Any, bits: Any, budget: Budget | None = None,
             method: str = "frontier", *, size: Any = None, fixed_bits: float = 0.0,
             bops: Any = None, bops_limit: float | Budget | None = None, latency: Any = None,
             latency_limit: float | Budget | None = None, tied: Iterable[Any] = (),
             pinned: Mapping[int, int] | None = None, max_points: int | None = None,
             time_limit: float | None = None, sensitivity: Any = None) -> Allocation:
    """Least-total-omega plan under ``budget`` (and BOPs/latency limits with ``method='ilp'``).

    ``method``: a name in :data:`ALLOCATORS` (``frontier``, ``ilp``, ``v1-rule``...; an
    unknown one raises :class:`ConfigError` listing them). ``budget`` None means no size limit.
    ``bops``/``latency`` (L, B) matrices are reported in the result even without limits.
    ``method='frontier'`` supports size budgets with ``tied``/``pinned``; BOPs/latency limits
    need ``method='ilp'``. ``pinned`` maps a layer index to a choice index (a column of
    ``bits``). ``sensitivity`` (L,): per-layer scores for ordering rules (``v1-rule``: lambda_i /
    n_i). Infeasible budgets raise :class:`BudgetError` giving the smallest feasible value in
    the budget's own unit. Cost: the allocator's (frontier: dynamic programming over layers;
    ilp: one HiGHS solve; v1-rule: O(L x B) size evaluations).
    """
    om = as_omega(omega)
    n, b = as_params(params), as_bits(bits)
    if om.shape != (n.size, b.size):
        raise ConfigError(f"omega has shape {om.shape}: give ({n.size}, {b.size}) = (len(params), "
                          "len(bits))")
    sz = size_matrix(n, b, size)
    fn = ALLOCATORS.get(ALLOCATORS.check(method, "method"))
    if budget is not None and not isinstance(budget, Budget):
        raise ConfigError(f"budget={budget!r}: give a Budget, e.g. Budget('compression', 8), or "
                          "None for no size limit")
    bm = None if bops is None else as_matrix(bops, om.shape, "bops")
    lm = None if latency is None else as_matrix(latency, om.shape, "latency")
    for name, matrix, lim in (("bops", bm, bops_limit), ("latency", lm, latency_limit)):
        if lim is not None and matrix is None:
            raise ConfigError(f"{name}_limit given without the {name} matrix: pass {name}=(L, B) "
                              "array")
    limit = None if budget is None else size_limit_bits(budget, n, b, size=size,
                                                        fixed_bits=fixed_bits)

    def size_describe(best: float, context: str) -> str:
        return size_budget_message(budget, best, n, b, size=size,  # type: ignore[arg-type]
                                   fixed_bits=fixed_bits, context=context)

    sens = None if sensitivity is None else np.asarray(sensitivity, dtype=float)
    problem = AllocationProblem(om, n, b, sz, budget, limit, size_describe, bm, bops_limit, lm,
                                latency_limit, tied, pinned, max_points, time_limit, sens,
                                fixed_bits)
    return fn(problem)


@register_allocator("frontier")
def _frontier_allocator(p: AllocationProblem) -> Allocation:
    """HAWQ-V2 / ZeroQ: the least-omega plan on the exact Pareto frontier within the size limit."""
    if p.bops_limit is not None or p.latency_limit is not None:
        raise ConfigError("method='frontier' supports only a size budget: use method='ilp' "
                          "for bops_limit/latency_limit")
    front = pareto_frontier(p.omega, size=p.size, tied=p.tied, pinned=p.pinned,
                            max_points=p.max_points)
    if p.size_limit is None:
        k = len(front) - 1
    elif not fits(float(front.sizes[0]), p.size_limit):
        raise BudgetError(p.size_message(float(front.sizes[0]), ""))
    else:
        k = select_on_frontier(front, p.size_limit)
    return make_allocation(front.plan(k), p.omega, p.params, p.bits, p.size, p.bops,
                            p.latency, "frontier", front.exact)


@register_allocator("ilp")
def _ilp_allocator(p: AllocationProblem) -> Allocation:
    """HAWQ-V3: the integer program under every given limit (size, BOPs, latency) at once."""
    limits = []
    if p.size_limit is not None:
        limits.append(_Limit("size", p.size, p.size_limit, p.size_message))
    for name, matrix, lim, unit in (("bops", p.bops, p.bops_limit, " BOPs"),
                                    ("latency", p.latency, p.latency_limit, "")):
        if lim is None:
            continue
        raw = resource_limit(lim, matrix, f"{name}_limit")
        if isinstance(lim, Budget):
            def describe(best: float, context: str, _n=name, _lim=lim, _m=matrix) -> str:
                r = resource_in_unit(_lim, best, _m)
                where = f" {context}" if context else ""
                return (f"{_n}_limit={_lim} is infeasible{where}: the smallest feasible value is "
                        f"r={format_value(r, 'up')}; raise r or relax the other limits")
        else:
            describe = _raw_limit(f"{name}_limit={format_value(raw)}", name, unit)
        limits.append(_Limit(name + "_limit", matrix, raw, describe))
    choices, optimal = _solve(p.omega, limits, p.tied, p.pinned, p.time_limit, 0.0)
    return make_allocation(choices, p.omega, p.params, p.bits, p.size, p.bops, p.latency,
                            "ilp", optimal)


@register_allocator("v1-rule", needs_sensitivity=True)
def _v1_rule_allocator(p: AllocationProblem) -> Allocation:
    """HAWQ-V1: the relative-precision ordering rule by ``sensitivity``
    (:func:`hawq_v1_allocate`)."""
    if p.sensitivity is None:
        raise ConfigError("method='v1-rule' orders layers by their sensitivity: pass "
                          "sensitivity= (lambda_i / n_i per layer, e.g. top Hessian eigenvalue "
                          "over weight count)")
    if p.budget is None:
        raise ConfigError("method='v1-rule' needs a size budget (e.g. Budget('compression', 8))")
    if p.bops_limit is not None or p.latency_limit is not None or p.pinned or list(p.tied):
        raise ConfigError("method='v1-rule' supports only a size budget (no bops/latency limits, "
                          "tied or pinned layers): use method='ilp'")
    return hawq_v1_allocate(p.sensitivity, p.params, p.bits, p.budget, omega=p.omega,
                            fixed_bits=p.fixed_bits)


# ----------------------------------------------------------------------------- HAWQ-V1 rule

def hawq_v1_allocate(sensitivity: Any, params: Any, bits: Any, size_limit: float | Budget, *,
                     omega: Any = None, fixed_bits: float = 0.0) -> Allocation:
    """HAWQ-V1 relative precision ordering: a more sensitive layer never gets fewer bits.

    ``sensitivity[l]`` is lambda_l / n_l (top Hessian eigenvalue over weight count). Rule (level
    sweeps): start with every layer at the highest bit width; sweep the layers in ascending
    sensitivity (ties: lower index first), lowering each by one step until the size fits
    ``size_limit`` (bits, or a :class:`Budget`); if a whole sweep is not enough, sweep again one
    level lower. Every layer moves one step before any moves two, and the ordering holds at every
    step. ``omega`` (optional) fills ``total_omega``. Raises :class:`BudgetError` when even the
    all-lowest plan does not fit. Cost: O(L·B) size evaluations.
    """
    n, b = as_params(params), as_bits(bits)
    sens = np.asarray(sensitivity, dtype=float)
    if sens.shape != n.shape:
        raise ConfigError(f"sensitivity has shape {sens.shape}: give one value per layer "
                          f"({n.size})")
    if not np.all(np.isfinite(sens)):
        raise ConfigError("sensitivity has a NaN or infinite entry: give finite lambda_i/n_i")
    om = None if omega is None else as_omega(omega)
    if om is not None and om.shape != (n.size, b.size):
        raise ConfigError(f"omega has shape {om.shape}: give ({n.size}, {b.size})")
    sz = size_matrix(n, b)
    if isinstance(size_limit, Budget):
        limit = size_limit_bits(size_limit, n, b, fixed_bits=fixed_bits)
    else:
        limit = float(size_limit)
        if math.isnan(limit):
            raise ConfigError("size_limit is NaN: give a size in bits or a Budget")
    ladder = np.argsort(b, kind="stable")  # choice indices from lowest to highest bits
    level = np.full(n.size, b.size - 1)
    rows = np.arange(n.size)
    current = float(sz[:, ladder[-1]].sum())
    smallest = float(sz[:, ladder[0]].sum())
    if not fits(smallest, limit):
        if isinstance(size_limit, Budget):
            raise BudgetError(size_budget_message(size_limit, smallest, n, b,
                                                  fixed_bits=fixed_bits,
                                                  context="(HAWQ-V1 rule)"))
        raise BudgetError(f"size_limit={format_value(limit)} bits is infeasible: the smallest "
                          f"size (all {_num(b[ladder[0]])}-bit) is {format_value(smallest)} bits")
    order = np.lexsort((np.arange(n.size), sens))  # least sensitive first
    for lvl in range(b.size - 1, 0, -1):  # sweep: every layer one step down before any two
        if fits(current, limit):
            break
        for layer in order:
            if level[layer] == lvl and not fits(current, limit):
                level[layer] -= 1
                current = float(sz[rows, ladder[level]].sum())
    return make_allocation(ladder[level], om, n, b, sz, None, None, "hawq-v1", True)
