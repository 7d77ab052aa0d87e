"""Budgets for bit allocation: what "fits" means, in the unit the user thinks in.

A :class:`Budget` is one of

* ``Budget("bytes", B)``: the quantized weights take at most ``B`` bytes, i.e. ``weight_bits/8``
  (plus an optional ``fixed_bits`` overhead for what stays float, counted for this kind only);
* ``Budget("compression", c)``: compression ratio versus FP32 over the quantized weights only,
  ``32*sum(n) / sum(n*b)`` (so all-4-bit is exactly 8x), at least ``c``;
* ``Budget("avg_bits", a)``: ``sum(n*b) / sum(n)`` at most ``a``;
* ``Budget("fraction", r)``: HAWQ-V3 style ``min_size + r*(max_size - min_size)`` with ``r`` in
  [0, 1], where min/max are the all-lowest/all-highest plans (row-wise min/max of the size matrix).

:func:`size_limit_bits` turns any of them into a limit on the weight size in bits, and
:func:`size_in_unit` maps a size in bits back into the budget's unit (used by error messages to
state the smallest feasible value in the unit the user gave). BOPs and latency limits are plain
numbers, or ``Budget("fraction", r)`` over their own matrix (:func:`resource_limit`).

All functions here are pure numpy; nothing imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import numpy as np

from hawq.base.errors import ConfigError

__all__ = ["BUDGET_KINDS", "Budget", "REL_TOL", "as_bits", "as_matrix", "as_omega", "as_params",
           "fits", "format_value", "resource_in_unit", "resource_limit", "size_budget_message",
           "size_in_unit", "size_limit_bits", "size_matrix", "slack"]

BUDGET_KINDS = ("bytes", "compression", "avg_bits", "fraction")
_UNITS = {"bytes": "bytes", "compression": "x compression", "avg_bits": "average bits",
          "fraction": "(fraction r)"}
REL_TOL = 1e-9  # a plan "fits" a limit when value <= limit + REL_TOL * max(1, |limit|)


def fits(value: float, limit: float) -> bool:
    """``value <= limit`` up to a relative tolerance of 1e-9 (unit conversions round)."""
    return value <= limit + slack(limit)


def slack(limit: float) -> float:
    """The tolerance :func:`fits` allows above ``limit``."""
    return REL_TOL * max(1.0, abs(float(limit)))


@dataclass(frozen=True)
class Budget:
    """A model-size budget; see the module docstring for the four kinds."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ConfigError(f"Budget kind={self.kind!r} is not known: use one of "
                              f"{', '.join(repr(k) for k in BUDGET_KINDS)}")
        try:
            value = float(self.value)
        except (TypeError, ValueError):
            raise ConfigError(f"Budget({self.kind!r}, {self.value!r}): value must be a number") \
                from None
        if not math.isfinite(value):
            raise ConfigError(f"Budget({self.kind!r}, {self.value!r}): value must be finite")
        if self.kind == "fraction" and not 0.0 <= value <= 1.0:
            raise ConfigError(f"Budget('fraction', {self.value!r}): r must be in [0, 1] "
                              "(0 = all-lowest bits, 1 = all-highest bits)")
        if self.kind != "fraction" and value <= 0:
            raise ConfigError(f"Budget({self.kind!r}, {self.value!r}): value must be > 0")
        object.__setattr__(self, "value", value)

    def __str__(self) -> str:
        return f"Budget({self.kind!r}, {format_value(self.value)})"


# ----------------------------------------------------------------------------- validation

def as_params(params: Any, name: str = "params") -> np.ndarray:
    """Validated (L,) float array of positive, finite weight counts."""
    arr = np.asarray(params, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError(f"{name} has shape {arr.shape}: give a non-empty 1-D array with one "
                          "weight count per layer")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ConfigError(f"{name}={arr.tolist()} has a non-positive or non-finite entry: every "
                          "layer needs a positive weight count")
    return arr


def as_bits(bits: Any, name: str = "bits") -> np.ndarray:
    """Validated (B,) float array of distinct, positive, finite bit widths."""
    arr = np.asarray(bits, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError(f"{name} has shape {arr.shape}: give a non-empty 1-D sequence of bit "
                          "widths, e.g. (2, 4, 8)")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ConfigError(f"{name}={arr.tolist()}: bit widths must be positive and finite")
    if np.unique(arr).size != arr.size:
        raise ConfigError(f"{name}={arr.tolist()} repeats a bit width: give each one once")
    return arr


def as_matrix(matrix: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    """Validated (L, B) float array of finite, non-negative resource costs."""
    arr = np.asarray(matrix, dtype=float)
    if arr.shape != tuple(shape):
        raise ConfigError(f"{name} has shape {arr.shape}: give an array of shape {tuple(shape)} "
                          "(layers x choices)")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ConfigError(f"{name} has a negative or non-finite entry: resource costs must be "
                          "finite and >= 0 (forbid a choice with +inf in omega instead)")
    return arr


def as_omega(omega: Any) -> np.ndarray:
    """Validated (L, B) float cost matrix; +inf forbids a choice, NaN and -inf are refused."""
    arr = np.asarray(omega, dtype=float)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ConfigError(f"omega has shape {arr.shape}: give a non-empty (layers x choices) "
                          "array")
    bad = np.isnan(arr) | (arr == -np.inf)
    if bad.any():
        layer, choice = map(int, np.argwhere(bad)[0])
        raise ConfigError(f"omega[{layer}, {choice}]={arr[layer, choice]}: costs must be finite "
                          "or +inf (to forbid a choice)")
    return arr


def size_matrix(params: Any, bits: Any, size: Any = None) -> np.ndarray:
    """(L, B) weight size in bits: ``size`` if given, else ``params[:, None] * bits[None, :]``."""
    n, b = as_params(params), as_bits(bits)
    if size is None:
        return n[:, None] * b[None, :]
    return as_matrix(size, (n.size, b.size), "size")


# ----------------------------------------------------------------------------- conversions

def _check_fixed(fixed_bits: float) -> float:
    fixed = float(fixed_bits)
    if not math.isfinite(fixed) or fixed < 0:
        raise ConfigError(f"fixed_bits={fixed_bits!r}: give the float overhead in bits (>= 0)")
    return fixed


def size_limit_bits(budget: Budget, params: Any, bits: Any, *, size: Any = None,
                    fixed_bits: float = 0.0) -> float:
    """The largest total weight size (bits, over the quantized weights) that ``budget`` allows.

    ``size`` overrides the default (L, B) size matrix ``params x bits``. ``fixed_bits`` (what stays
    float, e.g. biases) is added to the size for the ``"bytes"`` kind only.
    """
    if not isinstance(budget, Budget):
        raise ConfigError(f"budget={budget!r}: give a hawq.maths.budgets.Budget, e.g. "
                          "Budget('compression', 8) or Budget('bytes', 1e6)")
    s = size_matrix(params, bits, size)
    total_n = float(np.sum(as_params(params)))
    fixed = _check_fixed(fixed_bits)
    if budget.kind == "bytes":
        return budget.value * 8.0 - fixed
    if budget.kind == "compression":
        return 32.0 * total_n / budget.value
    if budget.kind == "avg_bits":
        return budget.value * total_n
    lo, hi = float(s.min(axis=1).sum()), float(s.max(axis=1).sum())
    return lo + budget.value * (hi - lo)


def size_in_unit(kind: str, size_bits: float, params: Any, bits: Any, *, size: Any = None,
                 fixed_bits: float = 0.0) -> float:
    """Inverse of :func:`size_limit_bits`: the budget value of kind ``kind`` at ``size_bits``."""
    s = size_matrix(params, bits, size)
    total_n = float(np.sum(as_params(params)))
    if kind == "bytes":
        return (size_bits + _check_fixed(fixed_bits)) / 8.0
    if kind == "compression":
        return 32.0 * total_n / size_bits if size_bits > 0 else math.inf
    if kind == "avg_bits":
        return size_bits / total_n
    if kind == "fraction":
        lo, hi = float(s.min(axis=1).sum()), float(s.max(axis=1).sum())
        return 0.0 if hi <= lo else (size_bits - lo) / (hi - lo)
    raise ConfigError(f"kind={kind!r}: use one of {BUDGET_KINDS}")


def resource_limit(limit: Any, matrix: np.ndarray, name: str) -> float:
    """A BOPs/latency limit: a plain number, or ``Budget("fraction", r)`` over ``matrix``."""
    if isinstance(limit, Budget):
        if limit.kind != "fraction":
            raise ConfigError(f"{name}={limit}: only Budget('fraction', r) or a plain number is "
                              f"meaningful for {name}")
        lo, hi = float(matrix.min(axis=1).sum()), float(matrix.max(axis=1).sum())
        return lo + limit.value * (hi - lo)
    try:
        value = float(limit)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={limit!r}: give a number or Budget('fraction', r)") from None
    if math.isnan(value):
        raise ConfigError(f"{name}={limit!r}: give a number or Budget('fraction', r)")
    return value


def resource_in_unit(limit: Any, value: float, matrix: np.ndarray) -> float:
    """Inverse of :func:`resource_limit`: ``value`` as r when ``limit`` was a fraction."""
    if isinstance(limit, Budget):
        lo, hi = float(matrix.min(axis=1).sum()), float(matrix.max(axis=1).sum())
        return 0.0 if hi <= lo else (value - lo) / (hi - lo)
    return value


# ----------------------------------------------------------------------------- messages

def _short(x: float) -> str:
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def format_value(x: float, direction: str = "exact") -> str:
    """Short decimal for ``x``: exact when 12 significant digits suffice, else rounded to 10
    digits towards ``direction`` ("up"/"down") so that the stated value stays feasible."""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    for digits in range(1, 13):
        if float(f"{x:.{digits}g}") == x:
            return _short(x)
    if direction == "exact":
        return _short(x)
    dec = Decimal(x)
    quantum = Decimal(1).scaleb(dec.adjusted() - 9)
    return _short(float(dec.quantize(quantum, rounding=ROUND_CEILING if direction == "up"
                                     else ROUND_FLOOR)))


def size_budget_message(budget: Budget, min_bits: float, params: Any, bits: Any, *,
                        size: Any = None, fixed_bits: float = 0.0, context: str = "") -> str:
    """BudgetError text for a size budget that no plan meets: the smallest feasible value, in the
    budget's unit (for compression: the largest feasible ratio)."""
    best = size_in_unit(budget.kind, min_bits, params, bits, size=size, fixed_bits=fixed_bits)
    where = f" {context}" if context else ""
    if budget.kind == "compression":
        text = format_value(best, "down")
        return (f"{budget} is infeasible{where}: the highest achievable compression is {text}x "
                f"({format_value(min_bits, 'up')} weight bits); give "
                f"Budget('compression', {text}) or less, or allow lower bit widths")
    text = format_value(best, "up")
    extra = ""
    if budget.kind == "bytes" and fixed_bits:
        extra = f", including fixed_bits={format_value(fixed_bits)}"
    return (f"{budget} is infeasible{where}: the smallest feasible value is {text} "
            f"{_UNITS[budget.kind]} ({format_value(min_bits, 'up')} weight bits{extra}); give "
            f"Budget({budget.kind!r}, {text}) or more, or allow lower bit widths")
